//! TLS interception: read the ClientHello (bounded by the handshake timeout, however many
//! segments it spans), check its SNI against the tunnel's destination, present a leaf minted by
//! the sandbox's CA, and serve h1/h2 with the per-request pipeline.
//!
//! Invariant: a leaf is only minted for a destination that already passed the egress policy,
//! so a sandbox can never obtain a certificate for a host it may not reach.

use std::sync::Arc;

use rustls::server::Acceptor;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::{LazyConfigAcceptor, StartHandshake};

use super::read_ahead::ReadAhead;

use super::refusal::{Code, Refusal};
use super::serve::{self, Protocols};
use super::{forward, LiveSettings, Tunnel};
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
    /// The client ended the handshake with a fatal alert: its TLS stack refused the leaf
    /// (most often: it does not trust the sandbox's CA) or what was offered.
    #[error("TLS handshake failed: the client sent the alert {0}")]
    ClientAlert(String),
    /// The SNI is not a valid host name.
    #[error("bad SNI: {0}")]
    BadSni(String),
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

impl InterceptError {
    /// The refusal this error stands for, when it is a policy decision (a bad or mismatching
    /// SNI) rather than a broken or slow handshake.
    pub fn refusal(&self) -> Option<Refusal> {
        match self {
            InterceptError::BadSni(_) => Some(Refusal::new(Code::BadRequest, self.to_string())),
            InterceptError::SniMismatch { .. } => {
                Some(Refusal::new(Code::AuthorityMismatch, self.to_string()))
            }
            _ => None,
        }
    }

    /// The `reason` label of `sealgate_tls_handshake_failures_total` for an error that is a
    /// failed handshake, not a refusal.
    pub fn handshake_failure(&self) -> Option<&'static str> {
        match self {
            InterceptError::Timeout => Some("timeout"),
            InterceptError::Handshake(_) => Some("handshake_error"),
            InterceptError::ClientAlert(_) => Some("client_alert"),
            InterceptError::Leaf(_) => Some("leaf"),
            InterceptError::BadSni(_) | InterceptError::SniMismatch { .. } => None,
        }
    }

    /// Counts a failed handshake (not a refusal, which has its audit line) and writes the debug
    /// line that names the sandbox.
    pub fn record(&self, metrics: &crate::metrics::Metrics, sandbox: &str) {
        if let Some(reason) = self.handshake_failure() {
            let labels = crate::metrics::HandshakeFailureLabels { reason };
            metrics.tls_handshake_failures.get_or_create(&labels).inc();
        }
        tracing::debug!(sandbox, error = %self, "TLS interception ended before serving");
    }
}

/// A failed handshake's error: a fatal alert the client sent is told apart from the rest.
fn handshake_error(e: &std::io::Error) -> InterceptError {
    let rustls_error = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
    match rustls_error {
        Some(rustls::Error::AlertReceived(alert)) => {
            InterceptError::ClientAlert(format!("{alert:?}"))
        }
        _ => InterceptError::Handshake(e.to_string()),
    }
}

/// Reads the ClientHello by `deadline` (`tls_handshake_timeout` after the connection was
/// ready for it) from a connection read through a [`ReadAhead`] from here on (a large TLS
/// record in one `recv`, not one per 4 KiB).
///
/// Boxed, the acceptor and what it returns: both hold a whole rustls connection, and a future
/// awaited inline is laid out inside its caller's — the tunnel task, whose size is fixed for
/// its whole life (heaptrack: a 10 KB task cell per idle tunnel before).
///
/// # Errors
/// Timeout or a malformed handshake.
pub async fn read_hello<IO>(
    deadline: tokio::time::Instant,
    io: ReadAhead<IO>,
) -> Result<Box<StartHandshake<ReadAhead<IO>>>, InterceptError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let acceptor = LazyConfigAcceptor::new(Acceptor::default(), io);
    tokio::time::timeout_at(deadline, Box::pin(acceptor))
        .await
        .map_err(|_| InterceptError::Timeout)?
        .map(Box::new)
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
        .map_err(|e| InterceptError::BadSni(e.to_string()))
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
/// the connection closes, goes idle, or the daemon shuts down. `live` is the connection's view
/// of the settings (its limits); each request takes its own.
///
/// # Errors
/// Leaf minting or handshake failures (the connection is dropped).
pub async fn serve<IO>(
    live: Arc<LiveSettings>,
    tunnel: Arc<Tunnel>,
    start: Box<StartHandshake<IO>>,
    deadline: tokio::time::Instant,
) -> Result<(), InterceptError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Both phases boxed: an awaited future is laid out inside this one's state, and this
    // state is every tunnel's task size for its whole life. The stream is boxed too, so the
    // serving futures pass a pointer down, not a rustls connection per async fn argument.
    let tls = Box::pin(handshake(&tunnel, start, deadline)).await?;
    tunnel.state.metrics.tls_handshakes.inc();
    let protocols = Protocols::of_alpn(tls.get_ref().1.alpn_protocol());
    Box::pin(serve_http(live, tunnel, tls, protocols)).await;
    Ok(())
}

/// The sandbox's leaf for `tunnel.dest`, then the rest of the TLS handshake, by `deadline`:
/// the one `tls_handshake_timeout` the ClientHello was read under, so a whole handshake takes
/// at most that (a fresh timeout here let a sandbox hold one open for twice it: review h48c).
async fn handshake<IO>(
    tunnel: &Tunnel,
    start: Box<StartHandshake<IO>>,
    deadline: tokio::time::Instant,
) -> Result<Box<tokio_rustls::server::TlsStream<IO>>, InterceptError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let leaf = tunnel
        .state
        .leaves
        .get_or_mint(
            &tunnel.sandbox.id,
            &tunnel.sandbox.ca,
            &leaf_name(&tunnel.dest.host),
        )
        .await
        .map_err(|e| InterceptError::Leaf(e.to_string()))?;
    let handshake = start.into_stream(leaf.server_config.clone());
    tokio::time::timeout_at(deadline, handshake)
        .await
        .map_err(|_| InterceptError::Timeout)?
        .map(Box::new)
        .map_err(|e| handshake_error(&e))
}

/// Serves `protocols` on an established stream with the tunnel's request pipeline, through the
/// shared serving glue ([`serve::serve`]), with the connection's limits from `live`; each
/// request takes the settings once and passes them down ([`forward::handle`]).
pub async fn serve_http<S>(
    live: Arc<LiveSettings>,
    tunnel: Arc<Tunnel>,
    stream: S,
    protocols: Protocols,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let state = tunnel.state.clone();
    let handler = move |req| {
        let tunnel = tunnel.clone();
        let live = tunnel.state.settings();
        forward::handle(tunnel, live, req)
    };
    let never = std::future::pending::<()>();
    serve::serve(&state, &live, stream, protocols, handler, never).await;
}

/// The leaf name for a normalised host.
pub fn leaf_name(h: &Host) -> LeafName {
    match h {
        Host::Name(n) => LeafName::Dns(n.clone()),
        Host::Ip(ip) => LeafName::Ip(*ip),
    }
}
