//! TLS interception: read the ClientHello (bounded by the handshake timeout, however many
//! segments it spans), check its SNI against the tunnel's destination, present a leaf minted by
//! the sandbox's CA, and serve h1/h2 with the per-request pipeline.
//!
//! Invariant: a leaf is only minted for a destination that already passed the egress policy,
//! so a sandbox can never obtain a certificate for a host it may not reach.

use std::sync::Arc;

use http::Method;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rustls::server::Acceptor;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::{LazyConfigAcceptor, StartHandshake};

use super::h1_guard::{self, GuardTag, H1Guard};
use super::idle::{Activity, Tracked};
use super::{forward, ProxyState, Runtime, Tunnel};
use crate::ca::LeafName;
use crate::policy::{self, Dest, Host};

/// Why an interception ended before serving.
#[derive(Debug, thiserror::Error)]
pub enum InterceptError {
    /// No ClientHello within the timeout.
    #[error("TLS handshake timed out")]
    Timeout,
    /// Not TLS, or a broken handshake.
    #[error("TLS handshake failed: {0}")]
    Handshake(String),
    /// SNI names another host than the tunnel.
    #[error("SNI {sni} does not match tunnel destination {dest}")]
    SniMismatch {
        /// Presented SNI.
        sni: String,
        /// Tunnel destination.
        dest: String,
    },
    /// Leaf minting failed.
    #[error("leaf certificate: {0}")]
    Leaf(String),
}

/// Reads the ClientHello.
///
/// # Errors
/// Timeout or a malformed handshake.
pub async fn read_hello<IO>(rt: &Runtime, io: IO) -> Result<StartHandshake<IO>, InterceptError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let acceptor = LazyConfigAcceptor::new(Acceptor::default(), io);
    tokio::time::timeout(rt.proxy.tls_handshake_timeout, acceptor)
        .await
        .map_err(|_| InterceptError::Timeout)?
        .map_err(|e| InterceptError::Handshake(e.to_string()))
}

/// The SNI of a ClientHello, normalised (None when absent).
///
/// # Errors
/// An SNI that is not a valid host name.
pub fn sni_host<IO>(start: &StartHandshake<IO>) -> Result<Option<Host>, InterceptError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let hello = start.client_hello();
    let Some(sni) = hello.server_name() else {
        return Ok(None);
    };
    policy::normalise_host(sni)
        .map(Some)
        .map_err(|e| InterceptError::Handshake(format!("bad SNI: {e}")))
}

/// The SNI, if any, must name the tunnel's host (an IP-literal tunnel accepts no SNI).
///
/// # Errors
/// [`InterceptError::SniMismatch`].
pub fn check_sni(sni: Option<&Host>, dest: &Dest) -> Result<(), InterceptError> {
    match sni {
        Some(h) if *h != dest.host => Err(InterceptError::SniMismatch {
            sni: h.to_string(),
            dest: dest.to_string(),
        }),
        _ => Ok(()),
    }
}

/// Completes the handshake with the sandbox's leaf for `tunnel.dest` and serves requests until
/// the connection closes, goes idle, or the daemon shuts down.
///
/// # Errors
/// Leaf minting or handshake failures (the connection is dropped).
pub async fn serve<IO>(
    state: Arc<ProxyState>,
    tunnel: Arc<Tunnel>,
    start: StartHandshake<IO>,
) -> Result<(), InterceptError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let rt = state.runtime();
    let leaf = state
        .leaves
        .get_or_mint(
            &tunnel.sandbox.id,
            &tunnel.sandbox.ca,
            &leaf_name(&tunnel.dest.host),
        )
        .await
        .map_err(|e| InterceptError::Leaf(e.to_string()))?;
    let tls = tokio::time::timeout(
        rt.proxy.tls_handshake_timeout,
        start.into_stream(leaf.server_config.clone()),
    )
    .await
    .map_err(|_| InterceptError::Timeout)?
    .map_err(|e| InterceptError::Handshake(e.to_string()))?;
    state.metrics.tls_handshakes.inc();
    serve_http(state, tunnel, tls).await;
    Ok(())
}

/// Serves h1/h2 (auto-detected) on an established stream with the tunnel's request pipeline.
pub async fn serve_http<S>(state: Arc<ProxyState>, tunnel: Arc<Tunnel>, stream: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let rt = state.runtime();
    let activity = Activity::new();
    let tag = GuardTag::new();
    let guarded = H1Guard::new(
        stream,
        rt.proxy.max_header_bytes,
        rt.proxy.header_read_timeout,
        tag.clone(),
    );
    let io = TokioIo::new(Tracked::new(guarded, activity.clone()));
    let builder = http_builder(&rt);
    let act = activity.clone();
    let svc = service_fn(move |mut req| {
        let guard = act.request();
        let tunnel = tunnel.clone();
        tag.mark(&mut req);
        let (upgrade, connect) = (
            h1_guard::wants_upgrade(&req),
            req.method() == Method::CONNECT,
        );
        async move {
            let mut resp = forward::handle(tunnel, req).await;
            if let Ok(r) = &mut resp {
                h1_guard::close_unless_upgraded(upgrade, connect, r);
            }
            drop(guard);
            resp
        }
    });
    let conn = builder.serve_connection_with_upgrades(io, svc);
    tokio::pin!(conn);
    let mut shutdown = state.shutdown_signal();
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = activity.idle(rt.proxy.idle_timeout) => {}
        _ = shutdown.changed() => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(rt.proxy.shutdown_grace, conn).await;
}

fn http_builder(rt: &Runtime) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(rt.proxy.header_read_timeout)
        .max_buf_size(rt.proxy.max_header_bytes.max(8192))
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(rt.proxy.max_h2_streams)
        .max_header_list_size(rt.proxy.max_header_bytes as u32)
        .max_pending_accept_reset_streams(50)
        .max_local_error_reset_streams(256);
    b
}

/// The leaf name for a normalised host.
pub fn leaf_name(h: &Host) -> LeafName {
    match h {
        Host::Name(n) => LeafName::Dns(n.clone()),
        Host::Ip(ip) => LeafName::Ip(*ip),
    }
}
