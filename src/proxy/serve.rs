//! The serving glue every sandbox-facing HTTP connection goes through — the explicit proxy
//! connection and every intercepted connection (TLS or plain, explicit or transparent).
//!
//! One function, so the invariants below hold everywhere or nowhere:
//! - the client stream is wrapped in the [`H1Guard`] (framing, head limits, head clock) with a
//!   fresh [`GuardTag`], and the service marks the guard's synthetic refusals
//!   ([`GuardTag::mark`]) before the handler sees a request;
//! - hyper's own HTTP/1 limits are the guard's ([`HeadLimits`]): head bytes, header fields,
//!   header read timeout;
//! - an upgrade-capable request (CONNECT, `Upgrade`) that is not upgraded is answered with
//!   `Connection: close` ([`close_unless_upgraded`]), so hyper never parses a head the guard
//!   did not see;
//! - the connection ends when hyper is done, after `idle_timeout` with no bytes moving and no
//!   request in flight, when the caller's `close_early` fires (dropped at once), or — on
//!   shutdown — after hyper's graceful shutdown, within `shutdown_grace`.

use http::{Method, Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::future::Future;
use tokio::io::{AsyncRead, AsyncWrite};

use super::h1_guard::{
    close_unless_upgraded, wants_upgrade, GuardTag, H1Guard, HeadLimits, MAX_HEADERS,
};
use super::idle::{Activity, Tracked};
use super::{LiveSettings, ProxyBody, ProxyState};

/// Which protocols a connection may speak.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocols {
    /// The explicit proxy connection: HTTP/1.1 only (CONNECT and absolute-form requests).
    Http1,
    /// An intercepted connection: HTTP/1.1 or HTTP/2 (by preface).
    Auto,
}

/// Serves `stream` with `handler` until it ends (see the module docs). `live` is the runtime
/// taken when the connection was accepted: its limits apply for the connection's life.
pub async fn serve<S, H, F>(
    state: &ProxyState,
    live: &LiveSettings,
    stream: S,
    protocols: Protocols,
    handler: H,
    close_early: impl Future<Output = ()>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let activity = Activity::new();
    let tag = GuardTag::new();
    let guarded = H1Guard::new(stream, HeadLimits::of(&live.proxy), tag.clone());
    let io = TokioIo::new(Tracked::new(guarded, activity.clone()));
    let act = activity.clone();
    let svc = service_fn(move |mut req: Request<Incoming>| {
        let in_flight = act.request();
        tag.mark(&mut req);
        let (upgrade, connect) = (wants_upgrade(&req), req.method() == Method::CONNECT);
        let answer = handler(req);
        // Boxed per request: hyper's h1 server keeps one heap slot the size of this future for
        // the connection's whole life (`in_flight`, allocated with the connection), so an idle
        // keep-alive connection would hold the whole request pipeline's state machine.
        Box::pin(async move {
            let mut resp = answer.await;
            close_unless_upgraded(upgrade, connect, &mut resp);
            drop(in_flight);
            Ok::<_, Infallible>(resp)
        })
    });
    let builder = builder(live, protocols);
    let conn = builder.serve_connection_with_upgrades(io, svc);
    tokio::pin!(conn);
    let mut shutdown = state.shutdown_signal();
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = close_early => return,
        _ = activity.idle(live.proxy.idle_timeout) => {}
        _ = shutdown.changed() => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(live.proxy.shutdown_grace, conn).await;
}

/// hyper's server with the guard's limits on HTTP/1 and the h2 limits of `[proxy]`.
fn builder(live: &LiveSettings, protocols: Protocols) -> auto::Builder<TokioExecutor> {
    let p = &live.proxy;
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(p.header_read_timeout)
        .max_buf_size(p.max_header_bytes.max(8192))
        .keep_alive(true);
    if p.max_header_fields != MAX_HEADERS {
        // hyper's default is the same number; setting it moves its parse to the heap.
        b.http1().max_headers(p.max_header_fields);
    }
    match protocols {
        Protocols::Http1 => b = b.http1_only(),
        Protocols::Auto => {
            b.http2()
                .timer(TokioTimer::new())
                .max_concurrent_streams(p.max_h2_streams)
                .max_header_list_size(p.max_header_bytes as u32)
                .max_pending_accept_reset_streams(50)
                .max_local_error_reset_streams(256);
        }
    }
    b
}
