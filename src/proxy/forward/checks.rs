//! The checks a request passes before anything is sent: the sandbox still live, egress
//! allowed, the method, the head's framing and size, and the authority naming the tunnel's host;
//! and those that stand while it is out: the guard on a streamed body ([`still_current`]) and
//! the refusal of an answer whose scrubbing cannot be known ([`unknowable`]).

use std::sync::Arc;

use http::header::{self, HeaderMap};
use http::{Method, Request, Version};

use super::Outcome;
use crate::policy::{self, Scheme};
use crate::proxy::refusal::{Code, Refusal};
use crate::proxy::{LiveSettings, Tunnel};
use crate::sandbox::{HostView, Registry, Sandbox, SlotGuard, Snapshot};
use crate::subst;

/// The refusal of a request (or its answer) to a host where the store's values may go, while
/// the node's copy of the store is locked: values changed elsewhere meanwhile — rotated
/// through another node — are unknown here, so answers from the host cannot be scrubbed of
/// them (found from outside). Fail closed, as unsealing does.
pub(super) fn unknowable(t: &Tunnel) -> Refusal {
    Refusal::new(
        Code::Unavailable,
        format!(
            "this node cannot read the sandbox's store now (cut off from the database, or the \
             store quarantined): requests to {}, where its secrets may go, are refused until it \
             can, since their answers could not be scrubbed of values changed meanwhile",
            t.dest
        ),
    )
}

/// Refuses a request to a host where the store's values may go (its `view` scrubs) while
/// the node's copy of the store is locked ([`unknowable`]).
pub(super) fn check_knowable(
    t: &Tunnel,
    snapshot: &Snapshot,
    view: &HostView,
) -> Result<(), Refusal> {
    if crate::proxy::response_scrub::unknowable(snapshot, view) {
        return Err(unknowable(t));
    }
    Ok(())
}

/// One of the sandbox's in-flight request slots (`proxy.max_requests_per_sandbox`), held
/// from before the body is read until the response body is dropped: each request may hold an
/// upstream connection that long, and a sandbox must not spend the daemon's file descriptors.
pub(super) fn start_request(t: &Tunnel, rt: &LiveSettings) -> Result<SlotGuard, Refusal> {
    let max = rt.proxy.max_requests_per_sandbox;
    t.sandbox.try_start_request(max).ok_or_else(|| {
        Refusal::new(
            Code::TooManyRequests,
            format!("sandbox has {max} requests in flight (proxy.max_requests_per_sandbox)"),
        )
    })
}

/// Before anything is sent: reading the body may have taken long (a held body of up to 64 KiB
/// arrives at the sandbox's pace), so the decisions made with `start`, the request's snapshot,
/// must still hold — the sandbox live, and, if anything was unsealed, its store unchanged.
pub(super) fn still_decided(t: &Tunnel, start: &Arc<Snapshot>, o: &Outcome) -> Result<(), Refusal> {
    check_live(t)?;
    if o.report.unsealed.is_empty() || Arc::ptr_eq(&t.sandbox.snapshot(), start) {
        return Ok(());
    }
    Err(store_changed())
}

pub(super) fn store_changed() -> Refusal {
    Refusal::new(
        Code::Unavailable,
        "the sandbox's store changed while the request was being sent; nothing more was \
         unsealed, send the request again",
    )
}

/// The guard of a streamed body ([`crate::subst::SubstBody::with_guard`]): its decisions were made
/// with the sandbox and snapshot of the request's start. Once the sandbox ended (deleted, expired)
/// no further chunk goes out; once its store changed (a secret narrowed, rotated or deleted, the
/// allowlist changed) no chunk that unsealed a value goes out — a body without tokens goes on.
/// Costs a registry lookup per chunk, and a snapshot load per chunk that unsealed.
pub(super) fn still_current(t: &Tunnel, start: Arc<Snapshot>) -> subst::Guard {
    let (registry, sandbox) = (t.state.registry.clone(), t.sandbox.clone());
    Box::new(move |unsealed| {
        is_live(&registry, &sandbox) && (!unsealed || Arc::ptr_eq(&sandbox.snapshot(), &start))
    })
}

/// A connection opened before its sandbox was deleted or expired must stop working at once:
/// every request re-checks that this exact sandbox is still registered and unexpired.
pub(super) fn check_live(t: &Tunnel) -> Result<(), Refusal> {
    if is_live(&t.state.registry, &t.sandbox) {
        return Ok(());
    }
    Err(Refusal::new(Code::SandboxEnded, "this sandbox has ended"))
}

/// True while this exact sandbox is registered and unexpired (not a later one of the same id).
pub(super) fn is_live(registry: &Registry, sandbox: &Arc<Sandbox>) -> bool {
    registry
        .get(&sandbox.id)
        .is_some_and(|live| Arc::ptr_eq(&live, sandbox))
}

/// The store's allowlist is read per request, not only when the tunnel opened: a host removed
/// from `egress_allowlist` gets no further request through a tunnel that is already open (a
/// keep-alive connection could otherwise outlive the change indefinitely).
pub(super) fn check_egress(t: &Tunnel, snapshot: &Snapshot) -> Result<(), Refusal> {
    if snapshot.egress_allowed(&t.dest, t.scheme) {
        return Ok(());
    }
    Err(Refusal::new(
        Code::EgressDenied,
        format!("{} is no longer in the store's egress_allowlist", t.dest),
    ))
}

pub(super) fn check_method<B>(req: &Request<B>) -> Result<(), Refusal> {
    if req.method() == Method::CONNECT {
        return Err(Refusal::new(
            Code::MethodNotAllowed,
            "CONNECT is not allowed inside a tunnel",
        ));
    }
    Ok(())
}

/// Every request must name exactly the tunnel's host and port (DESIGN.md §3 "Destination truth").
pub(super) fn check_authority<B>(t: &Tunnel, req: &Request<B>) -> Result<(), Refusal> {
    let default_port = t.scheme.default_port();
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(Refusal::new(Code::BadRequest, "duplicate Host header"));
    }
    if req.version() <= Version::HTTP_11 && host.is_none() {
        return Err(Refusal::new(Code::BadRequest, "missing Host header"));
    }
    if let Some(h) = host {
        let h = h
            .to_str()
            .map_err(|_| Refusal::new(Code::BadRequest, "Host header is not ASCII"))?;
        same_dest(t, h, default_port, "Host")?;
    }
    if let Some(a) = req.uri().authority() {
        if let Some(s) = req.uri().scheme_str() {
            if !s.eq_ignore_ascii_case(scheme_str(t.scheme)) {
                return Err(Refusal::new(
                    Code::AuthorityMismatch,
                    format!("scheme {s} does not match the tunnel"),
                ));
            }
        }
        same_dest(t, a.as_str(), default_port, "request URI")?;
    } else if host.is_none() {
        return Err(Refusal::new(Code::BadRequest, "request names no host"));
    }
    Ok(())
}

pub(super) fn scheme_str(s: Scheme) -> &'static str {
    match s {
        Scheme::Https => "https",
        Scheme::Http => "http",
    }
}

fn same_dest(t: &Tunnel, raw: &str, default_port: u16, what: &str) -> Result<(), Refusal> {
    if names_exactly(&t.dest, raw, default_port) {
        return Ok(());
    }
    let d = policy::parse_authority(raw, Some(default_port))
        .map_err(|e| Refusal::new(Code::BadRequest, format!("{what}: {e}")))?;
    if d != t.dest {
        return Err(Refusal::new(
            Code::AuthorityMismatch,
            format!("{what} names {d} but this connection is for {}", t.dest),
        ));
    }
    Ok(())
}

/// True if `raw` is `dest`'s own text — its name, when `dest.port` is `default_port`, or
/// `name:port` with the port as written by [`policy::Dest`] — which parses to `dest` itself
/// (a parsed name is its own canonical form): the parse, ~1,500 instructions, is skipped for
/// the `Host` nearly every client sends. Anything else (case, a trailing dot, an IP literal,
/// leading zeros) takes the parse.
fn names_exactly(dest: &policy::Dest, raw: &str, default_port: u16) -> bool {
    let policy::Host::Name(name) = &dest.host else {
        return false;
    };
    match raw.strip_prefix(name.as_str()) {
        Some("") => dest.port == default_port,
        Some(rest) => rest.strip_prefix(':').is_some_and(|port| {
            !port.starts_with('0')
                && port.len() <= 5
                && port.bytes().all(|b| b.is_ascii_digit())
                && port.parse::<u16>() == Ok(dest.port)
        }),
        None => false,
    }
}

/// hyper accepts CL+TE (and drops CL) and repeated CLs; a proxy must not. On h1 the bytes were
/// already judged by [`crate::proxy::h1_guard`] (hyper hides CL+TE from this header map); this
/// check stays as the second line for h2 and anything that reaches it.
pub(super) fn check_framing(h: &HeaderMap) -> Result<(), Refusal> {
    let mut cls = h.get_all(header::CONTENT_LENGTH).iter();
    let Some(cl) = cls.next() else {
        return Ok(());
    };
    if cls.next().is_some() {
        return Err(Refusal::new(
            Code::BadRequest,
            "multiple Content-Length headers",
        ));
    }
    if h.contains_key(header::TRANSFER_ENCODING) {
        return Err(Refusal::new(
            Code::BadRequest,
            "both Content-Length and Transfer-Encoding",
        ));
    }
    let ok = cl
        .to_str()
        .ok()
        .is_some_and(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()));
    if !ok {
        return Err(Refusal::new(Code::BadRequest, "malformed Content-Length"));
    }
    Ok(())
}

/// A body has one media type (RFC 9110 §8.3: `Content-Type` is a singleton field). The first
/// field decides how a value is written into the body (form-encoded, JSON-escaped, or not at
/// all inside gRPC messages), so two fields would let the sandbox have sealgate write it for
/// one type while the origin reads another (outside review). Repeats of one value are
/// harmless and pass.
pub(super) fn check_media_type(h: &HeaderMap) -> Result<(), Refusal> {
    let mut types = h.get_all(header::CONTENT_TYPE).iter();
    let first = types.next();
    if types.any(|t| Some(t) != first) {
        return Err(Refusal::new(
            Code::BadRequest,
            "Content-Type headers that disagree (a body has one media type)",
        ));
    }
    Ok(())
}

/// An h2 request head over `proxy.max_header_bytes` (counted as RFC 9113 §6.5.2 does: name,
/// value and 32 bytes per field, pseudo-header fields included) or with more than
/// `proxy.max_header_fields` fields gets the same 431 an h1 head gets from the
/// [`crate::proxy::h1_guard`]. The h2 server's own limit is set above this one
/// ([`crate::proxy::serve`]), so that a client sees sealgate's answer, not a reset stream or a
/// connection error it would retry.
pub(super) fn check_h2_head<B>(
    p: &crate::config::ProxyConfig,
    req: &Request<B>,
) -> Result<(), Refusal> {
    if req.version() != Version::HTTP_2 {
        return Ok(());
    }
    let h = req.headers();
    if h.len() > p.max_header_fields {
        return Err(Refusal::new(
            Code::HeadersTooLarge,
            "more header fields than proxy.max_header_fields",
        ));
    }
    const PSEUDO: usize = ":method:scheme:authority:path".len() + 4 * 32;
    let uri = req.uri();
    let pseudo = PSEUDO
        + req.method().as_str().len()
        + uri.scheme_str().map_or(0, str::len)
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path_and_query().map_or(0, |pq| pq.as_str().len());
    let fields: usize = h.iter().map(|(n, v)| n.as_str().len() + v.len() + 32).sum();
    if pseudo + fields > p.max_header_bytes {
        return Err(Refusal::new(
            Code::HeadersTooLarge,
            "request header section is larger than proxy.max_header_bytes",
        ));
    }
    Ok(())
}

/// Only WebSocket upgrades on HTTP/1.1 GET are relayed. An offer of `h2c` alone is ignored,
/// as RFC 9110 §7.8 lets a server do: its fields go and the request is served over HTTP/1.1
/// (curl offers it on every `http://` URL with `--http2`, and was refused: outside pass).
/// Others are refused.
pub(super) fn check_upgrade<B>(req: &mut Request<B>) -> Result<bool, Refusal> {
    let Some(up) = req.headers().get(header::UPGRADE) else {
        return Ok(false);
    };
    if up.as_bytes().trim_ascii().eq_ignore_ascii_case(b"h2c") {
        req.headers_mut().remove(header::UPGRADE);
        req.headers_mut().remove("http2-settings");
        return Ok(false);
    }
    let ws = up.as_bytes().eq_ignore_ascii_case(b"websocket");
    if !ws || req.method() != Method::GET || req.version() != Version::HTTP_11 {
        return Err(Refusal::new(
            Code::BadRequest,
            "only WebSocket upgrades are supported",
        ));
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shortcut agrees with the parse on every input: it answers only where the parse
    /// would find the same destination.
    #[test]
    fn an_authority_named_exactly_is_the_parse_s_answer() {
        let inputs = [
            "api.example.test",
            "api.example.test:443",
            "api.example.test:0443",
            "api.example.test:8443",
            "api.example.test:443x",
            "api.example.test:",
            "API.example.test",
            "api.example.test.",
            "api.example.testx",
            "api.example.test:65536",
            "api.example.test:99999",
            "api.example.test:+443",
            "api.example.test@evil.test",
            "api.example.test:443@evil.test",
            "127.0.0.1",
            "[::1]:443",
            "",
        ];
        let dests = [
            "api.example.test:443",
            "api.example.test:8443",
            "127.0.0.1:443",
        ];
        for dest in dests {
            let dest = policy::parse_authority(dest, None).unwrap();
            for raw in inputs {
                for default_port in [443, 80] {
                    let parsed = policy::parse_authority(raw, Some(default_port));
                    let same = parsed.as_ref().is_ok_and(|d| *d == dest);
                    if names_exactly(&dest, raw, default_port) {
                        assert!(same, "{raw:?} for {dest} (default {default_port})");
                    }
                    if same && raw == dest.host.to_string() {
                        assert!(
                            names_exactly(&dest, raw, default_port)
                                || dest.host.to_string().parse::<std::net::IpAddr>().is_ok()
                        );
                    }
                }
            }
        }
        let dest = policy::parse_authority("api.example.test:443", None).unwrap();
        assert!(names_exactly(&dest, "api.example.test", 443));
        assert!(names_exactly(&dest, "api.example.test:443", 80));
    }
}
