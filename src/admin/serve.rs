//! The admin listener's accept loop: HTTP/1.1 connections to the [`super::router`], bounded.
//!
//! Invariants:
//! - At most `[admin] max_connections` connections are served at once (an outside test
//!   exhausted the daemon's descriptors — proxy included — by opening half-sent admin requests
//!   from any local process). Past that, one more connection is accepted and held: it takes
//!   the slot of the oldest connection that never sent the admin token, past its grace, idle
//!   ones first ([`super::slots`]), or else waits for a slot, trying again every
//!   [`EVICT_RETRY`]; the rest wait in the kernel's backlog.
//! - A request head must arrive within `[admin] header_read_timeout_secs` of the connection
//!   or of the previous answer (an idle keep-alive connection is closed then too), and the
//!   body of a request that sent the token within `body_read_timeout_secs` ([`super::body`]).
//! - Shutdown stops accepting, lets connections finish their request, and waits at most
//!   [`SHUTDOWN_WAIT`] for them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::response::IntoResponse as _;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tower_service::Service as _;

use super::error::ApiError;
use super::slots::{Conn, Table};
use super::AdminToken;

/// How long shutdown waits for admin connections still busy (a streamed command).
pub const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

/// How often a newcomer waiting for a slot tries to evict again.
const EVICT_RETRY: Duration = Duration::from_millis(50);

pub use crate::config::AdminLimits as Limits;

/// Serves `listener` until `shutdown` changes; `token` is the admin token (a connection that
/// sends it is never evicted to make room).
pub async fn serve(
    router: axum::Router,
    listener: TcpListener,
    limits: Limits,
    token: Arc<AdminToken>,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let table = Arc::new(Table::default());
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    loop {
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
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => match wait_for_slot(&slots, &table, &token, &mut shutdown).await {
                Some(slot) => slot,
                None => break,
            },
        };
        let entry = table.enter();
        let conn = entry.conn.clone();
        let svc = service(
            router.clone(),
            peer,
            token.clone(),
            conn,
            limits.body_read_timeout,
        );
        let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), svc));
        tokio::spawn(async move {
            tokio::select! {
                _ = conn => {}
                () = entry.conn.evicted() => {}
            }
            drop(entry);
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

/// Every slot is taken: evicts a connection without the running token ([`Table::evict_one`])
/// and waits for a slot, evicting again every [`EVICT_RETRY`] while none is free (a connection
/// may be inside its grace, or its request may finish, at the first try). `None` at shutdown.
async fn wait_for_slot(
    slots: &Arc<Semaphore>,
    table: &Table,
    token: &AdminToken,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<OwnedSemaphorePermit> {
    loop {
        table.evict_one(token.generation());
        tokio::select! {
            s = slots.clone().acquire_owned() => return Some(s.expect("the semaphore is never closed")),
            () = tokio::time::sleep(EVICT_RETRY) => {}
            _ = shutdown.changed() => return None,
        }
    }
}

/// The router for one connection, with its peer address for `ConnectInfo`; each request is
/// counted in `conn` (in flight until its response head, and whether it sent `token`); the
/// body of one that sent it is read whole first, within `body_wait` ([`super::body`]).
fn service(
    router: axum::Router,
    peer: SocketAddr,
    token: Arc<AdminToken>,
    conn: Arc<Conn>,
    body_wait: Duration,
) -> impl hyper::service::Service<
    hyper::Request<Incoming>,
    Response = axum::response::Response,
    Error = std::convert::Infallible,
    Future = impl Send,
> + Clone {
    hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        let mut router = router.clone();
        let matched = token.matched(req.headers());
        let authenticated = matched.is_some();
        let (in_flight, runs) = InFlight::start(conn.clone(), matched);
        async move {
            let answer = match (runs, authenticated) {
                (false, _) => Ok(evicted_answer()),
                (true, false) => router.call(req.map(axum::body::Body::new)).await,
                (true, true) => match super::body::read_whole(req, body_wait).await {
                    Ok(req) => router.call(req).await,
                    Err(refused) => Ok(refused.into_response()),
                },
            };
            drop(in_flight);
            answer
        }
    })
}

/// A request counted in its connection's [`Conn`] until dropped (answered or cancelled).
struct InFlight(Arc<Conn>);

impl InFlight {
    /// The request, counted; and whether it may run (its connection was not evicted).
    fn start(conn: Arc<Conn>, authenticated: Option<u64>) -> (InFlight, bool) {
        let runs = conn.started(authenticated);
        (InFlight(conn), runs)
    }
}

/// What a request gets on a connection evicted before it was read: nothing ran; retry.
fn evicted_answer() -> axum::response::Response {
    let mut answer = ApiError::new(
        hyper::StatusCode::SERVICE_UNAVAILABLE,
        "connection_evicted",
        "this connection was closed to make room for another (every admin connection slot was \
         taken); nothing was done: retry on a new connection",
    )
    .into_response();
    answer.headers_mut().insert(
        hyper::header::CONNECTION,
        hyper::header::HeaderValue::from_static("close"),
    );
    answer
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.finished();
    }
}
