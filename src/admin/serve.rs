//! The admin listener's accept loop: HTTP/1.1 connections to the [`super::router`], bounded.
//!
//! Invariants:
//! - At most `[admin] max_connections` connections are served at once; past that the listener
//!   is not polled, so further connections wait in the kernel's backlog and cost the daemon no
//!   descriptor (an outside test exhausted the daemon's descriptors — proxy included — by
//!   opening half-sent admin requests from any local process).
//! - A request head must arrive within `[admin] header_read_timeout_secs` of the connection
//!   or of the previous answer (an idle keep-alive connection is closed then too).
//! - Shutdown stops accepting, lets connections finish their request, and waits at most
//!   [`SHUTDOWN_WAIT`] for them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tower_service::Service as _;

/// How long shutdown waits for admin connections still busy (a streamed command).
pub const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

pub use crate::config::AdminLimits as Limits;

/// Serves `listener` until `shutdown` changes.
pub async fn serve(
    router: axum::Router,
    listener: TcpListener,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    loop {
        let slot = tokio::select! {
            s = slots.clone().acquire_owned() => s.expect("the semaphore is never closed"),
            _ = shutdown.changed() => break,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "admin listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let conn = http.serve_connection(TokioIo::new(stream), service(router.clone(), peer));
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
            drop(slot);
        });
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_WAIT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("admin connections still open at shutdown were cut");
    }
}

/// The router for one connection, with its peer address for `ConnectInfo`.
fn service(
    router: axum::Router,
    peer: SocketAddr,
) -> impl hyper::service::Service<
    hyper::Request<Incoming>,
    Response = axum::response::Response,
    Error = std::convert::Infallible,
    Future = impl Send,
> + Clone {
    hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        let mut router = router.clone();
        async move { router.call(req).await }
    })
}
