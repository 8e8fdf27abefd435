//! The explicit proxy listener (`HTTPS_PROXY`): HTTP/1.1 forward-proxy protocol.
//!
//! `CONNECT host:port` with the sandbox's `Proxy-Authorization` opens an intercepted tunnel;
//! absolute-form `http://` requests are forwarded without substitution (never unseal over
//! plaintext). The CONNECT authority is parsed strictly and goes through the admission step
//! ([`super::admit`]) before any DNS lookup, leaf mint or upstream connection.
//!
//! Admission ([`super::admission`]): a connection is unidentified until a request carries the
//! sandbox's valid `Proxy-Authorization`; it must get there within
//! `unauthenticated_timeout_secs` (else it is closed), and from then on counts against its
//! sandbox's `max_connections_per_sandbox` (over the cap: 429 `too_many_connections`, closed).
//!
//! Every refusal made here is recorded once, in [`outer`], through [`outcome::refuse`];
//! requests that reach the per-request pipeline are recorded by [`forward`].

use std::net::SocketAddr;
use std::sync::Arc;

use base64::Engine as _;
use http::{header, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::admit::admit;
use super::h1_guard::FramingRefused;
use super::intercept;
use super::outcome::{self, Attempt};
use super::read_ahead::ReadAhead;
use super::refusal::{answer_once, Code, Refusal};
use super::serve::{self, Protocols};
use super::{forward, ListenerKind, LiveSettings, ProxyBody, ProxyState, Tunnel};
use crate::policy::{self, Scheme};
use crate::sandbox::Sandbox;

/// Serves one client connection of the explicit listener.
pub async fn serve_client(state: Arc<ProxyState>, tcp: TcpStream, peer: SocketAddr) {
    let live = state.settings();
    let slot = super::connection_slot();
    if let Some(s) = &slot {
        s.serving();
    }
    let unidentified = async {
        match &slot {
            Some(s) => s.closed(live.proxy.unauthenticated_timeout).await,
            None => std::future::pending().await,
        }
        tracing::debug!(%peer, "connection closed before it identified itself (proxy.unauthenticated_timeout_secs, or room made for newer connections)");
    };
    let st = state.clone();
    let handler = move |req| outer(st.clone(), req);
    serve::serve(&state, &live, tcp, Protocols::Http1, handler, unidentified).await;
}

/// One request on the proxy connection; the one place its refusals are recorded.
async fn outer(state: Arc<ProxyState>, req: Request<Incoming>) -> Response<ProxyBody> {
    let live = state.settings();
    let method = req.method().clone();
    let path = audit_path(&req);
    let mut at = Attempt {
        listener: ListenerKind::Explicit,
        sandbox: None,
        host: "-".into(),
        method: method.as_str(),
        path: &path,
        tunnel: false,
        bytes_down: 0,
    };
    match route(&state, &live, &mut at, req).await {
        Ok(resp) => resp,
        Err(r) => {
            at.bytes_down = r.answer_len();
            outcome::refuse(&state, &at, &r);
            r.into_response()
        }
    }
}

/// The path an audit line names: none for CONNECT, the path for everything else.
fn audit_path<B>(req: &Request<B>) -> String {
    if req.method() == Method::CONNECT {
        String::new()
    } else {
        req.uri().path().to_owned()
    }
}

/// Identifies, counts and dispatches a request; fills `at` as it learns who and where.
async fn route(
    state: &Arc<ProxyState>,
    live: &Arc<LiveSettings>,
    at: &mut Attempt<'_>,
    mut req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Refusal> {
    if let Some(FramingRefused(r)) = req.extensions_mut().remove() {
        return Err(r);
    }
    let Some(sandbox) = identify(state, &req) else {
        return Err(Refusal::new(
            Code::ProxyAuthRequired,
            "proxy credentials missing, wrong or given twice (use the sandbox's proxy URL)",
        ));
    };
    at.sandbox = Some(sandbox.clone());
    if let Err(r) = count_against(live, &sandbox) {
        at.tunnel = true;
        return Err(r);
    }
    if req.method() == Method::CONNECT {
        return connect(state, live, at, &sandbox, req);
    }
    if req.uri().scheme_str().is_some() {
        return plain(state, live, at, &sandbox, req).await;
    }
    Err(Refusal::new(
        Code::BadRequest,
        "expected CONNECT or an absolute http:// URI",
    ))
}

/// Moves this connection onto `sandbox`'s connection budget (first identified request only).
fn count_against(live: &LiveSettings, sandbox: &Sandbox) -> Result<(), Refusal> {
    let Some(slot) = super::connection_slot() else {
        return Ok(());
    };
    let max = live.proxy.max_connections_per_sandbox;
    slot.authenticate(&sandbox.id, max)
        .map_err(|e| Refusal::new(Code::TooManyConnections, e.to_string()))
}

/// The sandbox named by `Proxy-Authorization: Basic base64(id:token)`. Exactly one such
/// header: with two, which one names the sandbox would be a guess, so neither does.
fn identify<B>(state: &ProxyState, req: &Request<B>) -> Option<Arc<Sandbox>> {
    let mut given = req.headers().get_all(header::PROXY_AUTHORIZATION).iter();
    let v = given.next()?.to_str().ok()?;
    if given.next().is_some() {
        return None;
    }
    let (scheme, b64) = v.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let creds = std::str::from_utf8(&raw).ok()?;
    let (id, token) = creds.split_once(':')?;
    let sb = state.registry.get(id)?;
    sb.check_proxy_token(token).then_some(sb)
}

/// CONNECT: strict target parsing, then the admission step; 200 and the tunnel on success.
fn connect(
    state: &Arc<ProxyState>,
    live: &LiveSettings,
    at: &mut Attempt<'_>,
    sandbox: &Arc<Sandbox>,
    mut req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Refusal> {
    let target = named_authority(&req, at);
    authority_form_only(&req)?;
    let dest = policy::parse_authority(&target, None)
        .map_err(|e| Refusal::new(Code::BadRequest, format!("CONNECT target: {e}")))?;
    // A malformed CONNECT is a bad request, counted in `requests_total` only; from here a
    // refusal is the tunnel's.
    at.tunnel = true;
    plain_port(sandbox, &dest)?;
    let tunnel = admit(
        state,
        live,
        sandbox,
        dest,
        Scheme::Https,
        ListenerKind::Explicit,
    )?;
    let on_upgrade = hyper::upgrade::on(&mut req);
    let slot = super::connection_slot();
    state.spawn_connection(async move {
        let _slot = slot;
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        run_tunnel(tunnel, TokioIo::new(upgraded)).await;
    });
    let mut resp = Response::new(super::empty_body());
    *resp.status_mut() = StatusCode::OK;
    Ok(resp)
}

/// A CONNECT to a port the store allows only for plain HTTP (80 under a pattern without a
/// port): tunnels carry TLS only, so it is the uniform 400 saying how to send plain HTTP —
/// what a plain request inside a tunnel gets ([`refuse_plain`]) — not an `egress_denied`
/// saying the host is not allowlisted when it is (outside pass: `ws://` clients, which
/// tunnel with CONNECT, were sent to fix the allowlist).
fn plain_port(sandbox: &Sandbox, dest: &policy::Dest) -> Result<(), Refusal> {
    let snapshot = sandbox.snapshot();
    if snapshot.egress_allowed(dest, Scheme::Https) || !snapshot.egress_allowed(dest, Scheme::Http)
    {
        return Ok(());
    }
    Err(Refusal::new(
        Code::BadRequest,
        format!(
            "CONNECT to {dest}: the store allows it for plain HTTP only, and tunnels carry TLS \
             only; send plain HTTP in absolute form (GET http://host/path) without CONNECT \
             (plain ws:// included)"
        ),
    ))
}

/// A CONNECT target is `host:port` only (RFC 9110 §9.3.6): hyper also parses an absolute URI
/// there, and `CONNECT ftp://h:443/x?y` opened a tunnel to `h:443` (outside pass h38a: no
/// bypass, the authority was used, but the audit line hid what was sent).
fn authority_form_only<B>(req: &Request<B>) -> Result<(), Refusal> {
    let uri = req.uri();
    match uri.scheme().is_none() && uri.path_and_query().is_none() {
        true => Ok(()),
        false => Err(Refusal::new(
            Code::BadRequest,
            "CONNECT target: give host:port only (authority form), without a scheme or path",
        )),
    }
}

/// The request target's authority as the client wrote it (empty when absent), which is also
/// what the audit line names until it is parsed.
fn named_authority<B>(req: &Request<B>, at: &mut Attempt<'_>) -> String {
    let raw = req.uri().authority().map_or("", |a| a.as_str());
    at.host = raw.to_owned();
    raw.to_owned()
}

/// The tunnel after `200`: the ClientHello's SNI must name the CONNECT host (a refusal is
/// recorded like any other), then the intercepted connection is served. A tunnel that opens
/// with an ASCII capital (an HTTP method, not a TLS record) gets [`refuse_plain`] instead of
/// a TLS alert. The handshake timeout runs from the `200`, first byte included.
async fn run_tunnel<IO>(tunnel: Arc<Tunnel>, io: IO)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let live = tunnel.state.settings();
    let deadline = tokio::time::Instant::now() + live.proxy.tls_handshake_timeout;
    let mut io = ReadAhead::new(io);
    match tokio::time::timeout_at(deadline, io.peek()).await {
        // Boxed: a hyper connection laid out inline would grow every tunnel's task.
        Ok(Ok(Some(b))) if b.is_ascii_uppercase() => {
            return Box::pin(refuse_plain(&tunnel, io)).await;
        }
        Ok(Ok(Some(_))) => {}
        Err(_) => {
            return intercept::InterceptError::Timeout
                .record(&tunnel.state.metrics, &tunnel.sandbox.id)
        }
        _ => return tracing::debug!("tunnel closed before its first byte"),
    }
    let result = async {
        let start = intercept::read_hello(deadline, io).await?;
        let sni = intercept::sni_host(&start)?;
        intercept::check_sni(sni.as_ref(), &tunnel.dest)?;
        intercept::serve(live.clone(), tunnel.clone(), start, deadline).await
    }
    .await;
    let Err(e) = result else {
        return;
    };
    match e.refusal() {
        Some(r) => record_in_tunnel(&tunnel, "TLS", &r),
        None => e.record(&tunnel.state.metrics, &tunnel.sandbox.id),
    }
}

/// Plain HTTP sent into a CONNECT tunnel, whose bytes sealgate reads as TLS: one uniform 400
/// (recorded like any refusal) that says what to do instead. Nothing is forwarded.
async fn refuse_plain<IO>(tunnel: &Tunnel, io: ReadAhead<IO>)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let r = Refusal::new(
        Code::BadRequest,
        format!(
            "plain HTTP inside the CONNECT tunnel to {}: tunnels carry TLS only; send plain \
             HTTP in absolute form (GET http://host/path) without CONNECT",
            tunnel.authority
        ),
    );
    record_in_tunnel(tunnel, "HTTP", &r);
    answer_once(io, r).await;
}

/// Records a refusal made inside an admitted tunnel (already counted at CONNECT).
fn record_in_tunnel(tunnel: &Tunnel, protocol: &'static str, r: &Refusal) {
    let mut at = Attempt::connection(ListenerKind::Explicit, protocol);
    at.sandbox = Some(tunnel.sandbox.clone());
    at.host = tunnel.authority.to_string();
    at.tunnel = false; // the tunnel itself was admitted and counted at CONNECT
    if protocol == "HTTP" {
        at.bytes_down = r.answer_len(); // answered once, then closed
    }
    outcome::refuse(&tunnel.state, &at, r);
}

/// Absolute-form plain HTTP: the admission step, then the per-request pipeline (which never
/// unseals over plain HTTP).
async fn plain(
    state: &Arc<ProxyState>,
    live: &Arc<LiveSettings>,
    at: &mut Attempt<'_>,
    sandbox: &Arc<Sandbox>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Refusal> {
    let auth = named_authority(&req, at);
    let http = req
        .uri()
        .scheme_str()
        .is_some_and(|s| s.eq_ignore_ascii_case("http"));
    if !http {
        return Err(Refusal::new(
            Code::BadRequest,
            "only http:// URIs are proxied in plain form; use CONNECT for https",
        ));
    }
    let dest = policy::parse_authority(&auth, Some(80))
        .map_err(|e| Refusal::new(Code::BadRequest, format!("request URI: {e}")))?;
    at.host = dest.authority();
    let tunnel = admit(
        state,
        live,
        sandbox,
        dest,
        Scheme::Http,
        ListenerKind::Explicit,
    )?;
    Ok(forward::handle(tunnel, live.clone(), req).await)
}
