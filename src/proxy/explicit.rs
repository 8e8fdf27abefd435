//! The explicit proxy listener (`HTTPS_PROXY`): HTTP/1.1 forward-proxy protocol.
//!
//! `CONNECT host:port` with the sandbox's `Proxy-Authorization` opens an intercepted tunnel;
//! absolute-form `http://` requests are forwarded without substitution (never unseal over
//! plaintext). The CONNECT authority is parsed strictly and checked against the egress policy
//! before any DNS lookup, leaf mint or upstream connection.
//!
//! Admission ([`super::admission`]): a connection is unidentified until a request carries the
//! sandbox's valid `Proxy-Authorization`; it must get there within
//! `unauthenticated_timeout_secs` (else it is closed), and from then on counts against its
//! sandbox's `max_connections_per_sandbox` (over the cap: 429 `too_many_connections`, closed).

use std::net::SocketAddr;
use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::h1_guard::{self, FramingRefused, GuardTag, H1Guard};
use super::intercept;
use super::respond::{Code, Refusal};
use super::{forward, ProxyBody, ProxyState, Tunnel};
use crate::audit::RequestEvent;
use crate::policy::{self, Dest, Scheme};
use crate::sandbox::Sandbox;

/// Serves one client connection of the explicit listener.
pub async fn serve_client(state: Arc<ProxyState>, tcp: TcpStream, peer: SocketAddr) {
    let rt = state.runtime();
    let st = state.clone();
    let tag = GuardTag::new();
    let io = H1Guard::new(
        tcp,
        rt.proxy.max_header_bytes,
        rt.proxy.header_read_timeout,
        tag.clone(),
    );
    let svc = service_fn(move |mut req: Request<Incoming>| {
        tag.mark(&mut req);
        let (upgrade, connect) = (
            h1_guard::wants_upgrade(&req),
            req.method() == Method::CONNECT,
        );
        let st = st.clone();
        async move {
            let mut resp = outer(st, peer, req).await;
            if let Ok(r) = &mut resp {
                h1_guard::close_unless_upgraded(upgrade, connect, r);
            }
            resp
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(rt.proxy.header_read_timeout)
        .max_buf_size(rt.proxy.max_header_bytes.max(8192))
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades();
    tokio::pin!(conn);
    let mut shutdown = state.shutdown_signal();
    let slot = super::connection_slot();
    let unidentified = async {
        match &slot {
            Some(s) => s.closed(rt.proxy.unauthenticated_timeout).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = unidentified => {
            tracing::debug!(%peer, "connection closed before it identified itself (proxy.unauthenticated_timeout_secs, or room made for newer connections)");
        }
        _ = shutdown.changed() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(rt.proxy.shutdown_grace, conn).await;
        }
    }
}

async fn outer(
    state: Arc<ProxyState>,
    _peer: SocketAddr,
    mut req: Request<Incoming>,
) -> Result<Response<ProxyBody>, std::convert::Infallible> {
    if let Some(FramingRefused(r)) = req.extensions_mut().remove() {
        audit_refusal(&state, None, &req, "-".into(), &r);
        return Ok(r.into_response());
    }
    let Some(sandbox) = identify(&state, &req) else {
        let r = Refusal::new(
            Code::ProxyAuthRequired,
            "proxy credentials missing or wrong (use the sandbox's proxy URL)",
        );
        audit_refusal(&state, None, &req, "-".into(), &r);
        return Ok(r.into_response());
    };
    if let Err(r) = count_against(&state, &sandbox) {
        audit_refusal(&state, Some(&sandbox.id), &req, "-".into(), &r);
        let mut resp = r.into_response();
        resp.headers_mut()
            .insert(header::CONNECTION, http::HeaderValue::from_static("close"));
        return Ok(resp);
    }
    let result = if req.method() == Method::CONNECT {
        connect(&state, &sandbox, req)
    } else if req.uri().scheme_str().is_some() {
        plain(&state, &sandbox, req).await
    } else {
        Err(Refusal::new(
            Code::BadRequest,
            "expected CONNECT or an absolute http:// URI",
        ))
    };
    Ok(result.unwrap_or_else(Refusal::into_response))
}

/// Moves this connection onto `sandbox`'s connection budget (first identified request only).
fn count_against(state: &ProxyState, sandbox: &Sandbox) -> Result<(), Refusal> {
    let Some(slot) = super::connection_slot() else {
        return Ok(());
    };
    let max = state.runtime().proxy.max_connections_per_sandbox;
    slot.authenticate(&sandbox.id, max).map_err(|e| {
        state
            .metrics
            .tunnel("deny", Code::TooManyConnections.as_str());
        Refusal::new(Code::TooManyConnections, e.to_string())
    })
}

/// The sandbox named by `Proxy-Authorization: Basic base64(id:token)`.
fn identify<B>(state: &ProxyState, req: &Request<B>) -> Option<Arc<Sandbox>> {
    let v = req
        .headers()
        .get(header::PROXY_AUTHORIZATION)?
        .to_str()
        .ok()?;
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

fn connect(
    state: &Arc<ProxyState>,
    sandbox: &Arc<Sandbox>,
    mut req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Refusal> {
    let target = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .unwrap_or_default();
    let tunnel = admit(state, sandbox, &target)
        .map_err(|r| refuse_connect(state, sandbox, &req, &target, r))?;
    state.metrics.tunnel("allow", "ok");
    let on_upgrade = hyper::upgrade::on(&mut req);
    let st = state.clone();
    let slot = super::connection_slot();
    state.spawn_connection(async move {
        let _slot = slot;
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        if let Err(e) = run_tunnel(st, tunnel, TokioIo::new(upgraded)).await {
            tracing::debug!(error = %e, "tunnel ended before serving");
        }
    });
    let mut resp = Response::new(
        Empty::<Bytes>::new()
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *resp.status_mut() = StatusCode::OK;
    Ok(resp)
}

/// The CONNECT decisions, in order and before any DNS lookup, leaf mint or upstream
/// connection: strict target parsing, the store allowlist, IP-literal vetting, the tunnel cap.
fn admit(
    state: &Arc<ProxyState>,
    sandbox: &Arc<Sandbox>,
    target: &str,
) -> Result<Arc<Tunnel>, Refusal> {
    let dest = policy::parse_authority(target, None)
        .map_err(|e| Refusal::new(Code::BadRequest, format!("CONNECT target: {e}")))?;
    if !sandbox.snapshot().egress_allowed(&dest, Scheme::Https) {
        let msg = format!("{dest} is not in the store's egress_allowlist");
        return Err(Refusal::new(Code::EgressDenied, msg));
    }
    let rt = state.runtime();
    if let Err(e) = rt.dialing.precheck(&dest) {
        return Err(Refusal::new(
            Code::EgressDenied,
            format!("address vetting: {e}"),
        ));
    }
    let max = rt.proxy.max_tunnels_per_sandbox;
    let guard = sandbox.try_open_tunnel(max).ok_or_else(|| {
        let msg = format!("sandbox has {max} tunnels open (proxy.max_tunnels_per_sandbox)");
        Refusal::new(Code::TooManyTunnels, msg)
    })?;
    Ok(Tunnel::new(
        state.clone(),
        sandbox.clone(),
        dest,
        Scheme::Https,
        "explicit",
        Some(guard),
    ))
}

async fn run_tunnel<IO>(
    state: Arc<ProxyState>,
    tunnel: Arc<Tunnel>,
    io: IO,
) -> Result<(), intercept::InterceptError>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let rt = state.runtime();
    let start = intercept::read_hello(&rt, io).await?;
    let sni = intercept::sni_host(&start)?;
    intercept::check_sni(sni.as_ref(), &tunnel.dest)?;
    intercept::serve(state, tunnel, start).await
}

fn refuse_connect<B>(
    state: &ProxyState,
    sandbox: &Sandbox,
    req: &Request<B>,
    target: &str,
    r: Refusal,
) -> Refusal {
    state.metrics.tunnel("deny", r.code.as_str());
    audit_refusal(state, Some(&sandbox.id), req, target.to_owned(), &r);
    r
}

fn audit_refusal<B>(
    state: &ProxyState,
    sandbox: Option<&str>,
    req: &Request<B>,
    host: String,
    r: &Refusal,
) {
    state.metrics.request("deny", r.code.as_str());
    state.audit.request(&RequestEvent {
        sandbox,
        mode: "explicit",
        host: &host,
        method: req.method().as_str(),
        path: if req.method() == Method::CONNECT {
            ""
        } else {
            req.uri().path()
        },
        decision: "deny",
        code: Some(r.code.as_str()),
        rule: Some(r.message.clone()),
        status: r.code.status().as_u16(),
        ..Default::default()
    });
}

/// Absolute-form plain HTTP: policy-checked, forwarded, never unsealed.
async fn plain(
    state: &Arc<ProxyState>,
    sandbox: &Arc<Sandbox>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Refusal> {
    if !req
        .uri()
        .scheme_str()
        .is_some_and(|s| s.eq_ignore_ascii_case("http"))
    {
        return Err(Refusal::new(
            Code::BadRequest,
            "only http:// URIs are proxied in plain form; use CONNECT for https",
        ));
    }
    let auth = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .unwrap_or_default();
    let dest: Dest = policy::parse_authority(&auth, Some(80))
        .map_err(|e| Refusal::new(Code::BadRequest, format!("request URI: {e}")))?;
    if !sandbox.snapshot().egress_allowed(&dest, Scheme::Http) {
        let r = Refusal::new(
            Code::EgressDenied,
            format!("{dest} is not in the store's egress_allowlist"),
        );
        audit_refusal(state, Some(&sandbox.id), &req, dest.authority(), &r);
        return Err(r);
    }
    if let Err(e) = state.runtime().dialing.precheck(&dest) {
        let r = Refusal::new(Code::EgressDenied, format!("address vetting: {e}"));
        audit_refusal(state, Some(&sandbox.id), &req, dest.authority(), &r);
        return Err(r);
    }
    let tunnel = Tunnel::new(
        state.clone(),
        sandbox.clone(),
        dest,
        Scheme::Http,
        "explicit",
        None,
    );
    Ok(forward::handle(tunnel, req)
        .await
        .unwrap_or_else(|never| match never {}))
}
