//! The head that goes upstream: hop-by-hop fields stripped, one `Cookie` field, the head's
//! tokens unsealed, and the codings a scrubbed host may answer with.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Uri, Version};

use super::checks::scheme_str;
use super::Outcome;
use crate::proxy::refusal::{Code, Refusal};
use crate::proxy::{LiveSettings, Tunnel};
use crate::sandbox::HostView;
use crate::subst::{self, Denied};

/// `Keep-Alive`, which `http` has no constant for.
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");

/// Hop-by-hop headers never cross the proxy (RFC 9110 §7.6.1), nor do `Proxy-*` headers.
/// `Trailer` is end-to-end (RFC 9110 §6.6.2) and stays: hyper's HTTP/1 side only sends the
/// trailer fields it announces. On every request's path: no name is parsed from a string and
/// nothing is allocated unless a `Connection` or `Proxy-*` field is there.
pub(super) fn strip_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool) {
    if h.contains_key(header::CONNECTION) {
        let listed: Vec<HeaderName> = h
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .collect();
        for n in listed {
            if !(keep_upgrade && n == header::UPGRADE) {
                h.remove(n);
            }
        }
        h.remove(header::CONNECTION);
    }
    for n in [KEEP_ALIVE, header::TE, header::TRANSFER_ENCODING] {
        h.remove(n);
    }
    // Proxy-Connection, Proxy-Authorization, Proxy-Authenticate and any other Proxy-*.
    if h.keys().any(|k| k.as_str().starts_with("proxy-")) {
        let proxy_headers: Vec<HeaderName> = h
            .keys()
            .filter(|k| k.as_str().starts_with("proxy-"))
            .cloned()
            .collect();
        for n in proxy_headers {
            h.remove(n);
        }
    }
    if keep_upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        h.remove(header::UPGRADE);
    }
}

/// The head sent upstream: origin-form path and query under the tunnel's one authority
/// ([`Tunnel::origin`]), hop-by-hop headers removed, and **no** `Host` of the client's: the
/// pooled client writes the authority exactly once — `:authority` on HTTP/2, `Host` on
/// HTTP/1 — so a server never sees two (nginx < 1.25 answers 400 to `Host` beside
/// `:authority`). `TE: trailers` is the one `TE` value kept (gRPC requires it).
pub(super) fn build_upstream_head(
    t: &Tunnel,
    parts: http::request::Parts,
) -> Result<Request<()>, Refusal> {
    let websocket = parts.headers.contains_key(header::UPGRADE);
    let pq = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    let uri = Uri::builder()
        .scheme(scheme_str(t.scheme))
        .authority(t.origin.clone())
        .path_and_query(pq)
        .build()
        .map_err(|_| Refusal::new(Code::BadRequest, "request target is not a valid URI"))?;
    let mut req = Request::from_parts(parts, ());
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_11;
    let trailers = accepts_trailers(req.headers());
    strip_hop_by_hop(req.headers_mut(), websocket);
    one_cookie_field(req.headers_mut());
    req.headers_mut().remove(header::HOST);
    // Request trailers are never forwarded (`linger::Lingering` drops them): nor their notice.
    req.headers_mut().remove(header::TRAILER);
    if trailers {
        req.headers_mut()
            .insert(header::TE, HeaderValue::from_static("trailers"));
    }
    Ok(req)
}

/// Joins several `Cookie` fields into one, with `; ` (RFC 9113 §8.2.3: h2 clients send each
/// cookie as its own field, and they "MUST be concatenated" before an HTTP/1.1 hop; RFC 6265
/// §5.4: one field). The upstream may be either; one field is right for both (outside pass
/// h38a: nginx and Node join crumbs themselves, servers that keep one field lose the rest).
fn one_cookie_field(h: &mut HeaderMap) {
    let mut cookies = h.get_all(header::COOKIE).iter();
    if cookies.next().is_none() || cookies.next().is_none() {
        return;
    }
    let crumbs = h.get_all(header::COOKIE);
    let mut joined = Vec::with_capacity(crumbs.iter().map(|c| c.len() + 2).sum());
    for c in crumbs {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(c.as_bytes());
    }
    // Valid field values joined by "; " are a valid field value.
    if let Ok(one) = HeaderValue::from_maybe_shared(Bytes::from(joined)) {
        h.insert(header::COOKIE, one);
    }
}

/// True if any `TE` field lists `trailers` (RFC 9110 §10.1.4; case-insensitive token).
fn accepts_trailers(h: &HeaderMap) -> bool {
    h.get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            t.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case("trailers")
        })
}

pub(super) fn unseal_head(
    t: &Tunnel,
    rt: &LiveSettings,
    view: &HostView,
    req: &mut Request<()>,
    o: &mut Outcome,
) -> Result<(), Refusal> {
    if view.is_empty() {
        return Ok(());
    }
    let mode = rt.proxy.on_disallowed_token;
    o.report.max_unsealed = Some(rt.proxy.max_unsealed_bytes);
    subst::substitute_headers(req.headers_mut(), view, mode, &mut o.report)
        .map_err(|d| denied(t, d, o))?;
    if view.any_query {
        if let Some(uri) = subst::substitute_query(req.uri(), view, mode, &mut o.report)
            .map_err(|d| denied(t, d, o))?
        {
            *req.uri_mut() = uri;
        }
    }
    within_budget(rt, &o.report)
}

/// A request that would carry more than `proxy.max_unsealed_bytes` of real values (tokens of a
/// large secret, many times over) is refused: the token past the budget was never unsealed
/// ([`subst::Report::max_unsealed`]); nothing was sent for a budget passed in the head or a
/// held body, and a streamed body is cut off where it passed.
pub(super) fn within_budget(rt: &LiveSettings, report: &subst::Report) -> Result<(), Refusal> {
    if !report.over_budget {
        return Ok(());
    }
    Err(over_budget(rt.proxy.max_unsealed_bytes))
}

/// The refusal of a request over its unsealing budget of `max` bytes.
pub(super) fn over_budget(max: usize) -> Refusal {
    Refusal::new(
        Code::PayloadTooLarge,
        format!(
            "the request would carry more than {max} bytes of real secret values \
             (proxy.max_unsealed_bytes), Basic credentials over {} bytes, or more than {} \
             distinct Basic credentials",
            subst::MAX_BASIC_CREDENTIALS,
            subst::MAX_BASIC_FORMS
        ),
    )
}

/// What is left of the request's budget for its body.
pub(super) fn body_budget(rt: &LiveSettings, o: &Outcome) -> usize {
    rt.proxy
        .max_unsealed_bytes
        .saturating_sub(o.report.unsealed_bytes)
}

/// Where responses are scrubbed, the request may not ask for part of a resource: the scrubber
/// matches whole values, so two ranges (`bytes=0-11`, `bytes=12-`) of a response holding a real
/// value — one the sandbox stored there itself through its token — would carry it past the
/// scrubber in halves. Without `Range` the origin answers the whole resource (RFC 9110 §14.2
/// lets any server ignore it), which is scrubbed; a 206 is refused anyway
/// ([`crate::proxy::response_scrub`]). Likewise gRPC and Connect clients may accept only
/// uncompressed messages here (`grpc-accept-encoding: identity`): a compressed message must be
/// decoded whole before it can be scrubbed (see [`crate::proxy::response_scrub`]); a WebSocket
/// upgrade offers no extension (its frames are scrubbed, none may come compressed).
///
/// And the answer is asked for no content coding at all (`Accept-Encoding: identity`, whatever
/// the client offered; 2026-12-07). A compressed answer is decoded to be scrubbed, and where
/// the decoder's pieces end depends on how well the body compressed: an echoing origin that
/// compressed a guess beside the real value told the sandbox, by the chunk boundaries it got,
/// how long a prefix of the value its guess shared (outside pass h47c: the next character of a
/// real value in ~1,000 requests, through Apache's mod_deflate). Uncompressed, the answer's
/// shape does not depend on the value. The sandbox gets an uncoded body as before (it got the
/// decoded one), the origin sends more bytes, and sealgate decodes nothing. An origin that
/// compresses anyway is still decoded and scrubbed (its brotli and zstd decoders bounded by
/// `[upstream] max_window_decoders[_per_sandbox]`), and its boundaries still say what they say.
pub(super) fn whole_responses_only(h: &mut HeaderMap) {
    h.remove(header::RANGE);
    h.remove(header::IF_RANGE);
    for name in &MESSAGE_ACCEPT_ENCODINGS {
        if h.contains_key(name) {
            h.insert(name, HeaderValue::from_static("identity"));
        }
    }
    h.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    // WebSocket frames are scrubbed here (`crate::proxy::ws_scrub`): none compressed.
    h.remove(header::SEC_WEBSOCKET_EXTENSIONS);
}

/// The fields by which gRPC and Connect clients offer compressed messages.
const MESSAGE_ACCEPT_ENCODINGS: [HeaderName; 2] = [
    HeaderName::from_static("grpc-accept-encoding"),
    HeaderName::from_static("connect-accept-encoding"),
];

/// The sandbox sees the secret name and host; the audit `rule` also names the policy list that
/// excluded the host and where the token was found.
pub(super) fn denied(t: &Tunnel, d: Denied, o: &mut Outcome) -> Refusal {
    let location = match d.location {
        crate::secret::Location::Header => "header",
        crate::secret::Location::Query => "query",
        crate::secret::Location::Body => "body",
    };
    o.rule = Some(format!(
        "{} (token found in the {location})",
        t.sandbox
            .snapshot()
            .denial_rule(&d.secret, &t.dest, t.scheme)
    ));
    if !o.report.refused.contains(&d.secret) {
        o.report.refused.push(d.secret.clone());
    }
    Refusal::new(
        Code::SecretHostDenied,
        format!(
            "secret {} may not be sent to {} (secret allowed_hosts / store egress_allowlist)",
            d.secret, t.dest
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    fn names(h: &HeaderMap) -> Vec<&str> {
        let mut n: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        n.sort_unstable();
        n
    }

    #[test]
    fn scrubbed_hosts_are_asked_for_no_coding() {
        let asked = |pairs: &[(&'static str, &'static str)]| {
            let mut h = fields(pairs);
            whole_responses_only(&mut h);
            let all = h.get_all(header::ACCEPT_ENCODING).iter();
            all.map(|v| v.to_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        };
        let ae = "accept-encoding";
        for offered in [
            &[(ae, "gzip, deflate, br, zstd")][..],
            &[(ae, "gzip"), (ae, "br")],
            &[(ae, "*")],
            &[(ae, "identity")],
            &[],
        ] {
            assert_eq!(asked(offered), ["identity"], "{offered:?}");
        }
    }

    #[test]
    fn hop_by_hop_and_proxy_fields_never_cross() {
        let mut h = fields(&[
            ("connection", "close, X-Hop-Listed"),
            ("connection", "x-second-listed"),
            ("x-hop-listed", "1"),
            ("x-second-listed", "2"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("proxy-authorization", "Basic eA=="),
            ("proxy-connection", "keep-alive"),
            ("proxy-anything", "y"),
            ("upgrade", "websocket"),
            ("trailer", "x-t"),
            ("x-end-to-end", "kept"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(names(&h), ["trailer", "x-end-to-end"]);
    }

    #[test]
    fn cookie_crumbs_travel_as_one_field() {
        let mut h = fields(&[
            ("cookie", "a=1"),
            ("cookie", "b=2"),
            ("cookie", "c=osb_sealed_x"),
        ]);
        one_cookie_field(&mut h);
        let all: Vec<_> = h.get_all(header::COOKIE).iter().collect();
        assert_eq!(all, ["a=1; b=2; c=osb_sealed_x"]);
        let mut one = fields(&[("cookie", "a=1; b=2")]);
        one_cookie_field(&mut one);
        assert_eq!(one.get_all(header::COOKIE).iter().count(), 1);
        let mut none = fields(&[("x", "y")]);
        one_cookie_field(&mut none);
        assert!(!none.contains_key(header::COOKIE));
    }

    #[test]
    fn an_upgrade_keeps_upgrade_and_names_only_it_in_connection() {
        let mut h = fields(&[
            ("connection", "Upgrade, x-hop"),
            ("upgrade", "websocket"),
            ("x-hop", "1"),
        ]);
        strip_hop_by_hop(&mut h, true);
        assert_eq!(names(&h), ["connection", "upgrade"]);
        assert_eq!(h[header::CONNECTION], "upgrade");
        assert_eq!(h[header::UPGRADE], "websocket");
    }

    #[test]
    fn a_head_without_hop_fields_is_left_as_it_is() {
        let mut h = fields(&[("authorization", "Bearer x"), ("accept", "*/*")]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(names(&h), ["accept", "authorization"]);
    }
}
