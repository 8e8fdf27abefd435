//! The serving glue every sandbox-facing HTTP connection goes through — the explicit proxy
//! connection and every intercepted connection (TLS or plain, explicit or transparent).
//!
//! One function, so the invariants below hold everywhere or nowhere:
//! - the client stream is wrapped in the [`H1Guard`] (framing, head limits, head clock) with a
//!   fresh [`GuardTag`], and the service marks the guard's synthetic refusals
//!   ([`GuardTag::mark`]) before the handler sees a request;
//! - hyper's own HTTP/1 limits are the guard's ([`HeadLimits`]): head bytes, header fields.
//!   The header-read timeout is the guard's alone (from a head's first byte): hyper's timer is
//!   off, because hyper re-arms it while a keep-alive connection waits for its next request;
//! - the protocol is the one TLS negotiated by ALPN (`h2` or `http/1.1`: hyper's server for
//!   it, no version sniffing); only TLS without ALPN is served by preface ([`Protocols`]);
//! - an upgrade-capable request (CONNECT, `Upgrade`) that is not upgraded is answered with
//!   `Connection: close` ([`close_unless_upgraded`]), so hyper never parses a head the guard
//!   did not see;
//! - an HTTP/1 connection that has settled between two requests is parked: hyper's connection
//!   (and its buffers) is taken apart, the stream and the guard are kept (`serve_h1`);
//! - the connection ends when hyper is done, after `idle_timeout` with no bytes moving and no
//!   request in flight (between keep-alive requests too), when the caller's `close_early` fires (dropped at once), or — on
//!   shutdown — after hyper's graceful shutdown, within `shutdown_grace`.

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use http::{Method, Request, Response};
use hyper::body::Incoming;
use hyper::body::{Body, Frame, SizeHint};
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

use super::h1_guard::{
    close_unless_upgraded, wants_upgrade, GuardTag, H1Guard, HeadLimits, H2_PREFACE, MAX_HEADERS,
};
use super::idle::{Activity, OpenBody, Tracked};
use super::rewind::Rewind;
use super::{LiveSettings, ProxyBody, ProxyState};

/// Which protocols a connection may speak.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocols {
    /// HTTP/1.1 only: the explicit proxy connection (CONNECT and absolute-form requests), a
    /// redirected plain-HTTP connection, and TLS that negotiated `http/1.1` by ALPN.
    Http1,
    /// HTTP/2 only: TLS that negotiated `h2` by ALPN.
    Http2,
    /// HTTP/1.1 or HTTP/2, picked by the client's first bytes (the h2 preface or not): TLS
    /// without ALPN.
    Auto,
}

impl Protocols {
    /// The protocols of a TLS connection whose ALPN negotiation chose `alpn` (RFC 7301: the
    /// client may then speak only that protocol).
    pub fn of_alpn(alpn: Option<&[u8]>) -> Self {
        match alpn {
            Some(b"h2") => Protocols::Http2,
            Some(_) => Protocols::Http1,
            None => Protocols::Auto,
        }
    }
}

/// Drives the hyper connection `conn` until it ends, `close_early` fires (dropped at once), it
/// is idle for `idle_timeout` or the daemon shuts down (then: hyper's graceful shutdown, within
/// `shutdown_grace`). A macro, not a generic function: passing a hyper connection through a
/// generic `C: Future` makes rustc unable to prove the spawned task `Send` (higher-ranked
/// lifetimes on hyper's `Into<Box<dyn Error>>` bounds).
macro_rules! drive {
    ($conn:ident, $state:expr, $live:expr, $activity:expr, $close_early:expr) => {{
        // Boxed: inline, the largest of the three connection types would size every
        // connection's task, whichever protocol it speaks and before it speaks any.
        let mut $conn = Box::pin($conn);
        let mut shutdown = $state.shutdown_signal();
        let graceful = tokio::select! {
            _ = $conn.as_mut() => false,
            _ = $close_early => false,
            _ = $activity.idle($live.proxy.idle_timeout) => true,
            _ = shutdown.changed() => true,
        };
        if graceful {
            $conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout($live.proxy.shutdown_grace, $conn).await;
        }
    }};
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
    H: Fn(Request<Incoming>) -> F + Send + Sync + Unpin + 'static,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let activity = Activity::new();
    let tag = GuardTag::new();
    let guarded = H1Guard::new(stream, HeadLimits::of(&live.proxy), tag.clone());
    let io = Tracked::new(guarded, activity.clone());
    let act = activity.clone();
    let guard_tag = tag.clone();
    let svc = service_fn(move |mut req: Request<Incoming>| {
        let in_flight = act.request();
        tag.mark(&mut req);
        let (upgrade, connect) = (wants_upgrade(&req), req.method() == Method::CONNECT);
        let head = req.method() == Method::HEAD;
        let answer = handler(req);
        let act = act.clone();
        // Boxed per request: hyper's h1 server keeps one heap slot the size of this future for
        // the connection's whole life (`in_flight`, allocated with the connection), so an idle
        // keep-alive connection would hold the whole request pipeline's state machine.
        Box::pin(async move {
            let mut resp = answer.await;
            close_unless_upgraded(upgrade, connect, &mut resp);
            if head {
                resp = headers_only(resp);
            }
            // The body counts as open before the request stops counting as in flight.
            let resp = resp.map(|b| LiveBody::new(b, &act));
            drop(in_flight);
            Ok::<_, Infallible>(resp)
        })
    });
    // Each protocol's serving boxed: inline, the largest would size every connection's
    // state, whichever protocol it speaks (a parked HTTP/1 tunnel held 2.9 KB of it).
    let io = Rewind::new(Bytes::new(), io);
    match protocols {
        Protocols::Http1 => {
            Box::pin(serve_h1(
                state,
                live,
                io,
                svc,
                &activity,
                &guard_tag,
                close_early,
            ))
            .await
        }
        Protocols::Http2 => Box::pin(serve_h2(state, live, io, svc, &activity, close_early)).await,
        Protocols::Auto => {
            let tag = &guard_tag;
            Box::pin(serve_auto(
                state,
                live,
                io,
                svc,
                (&activity, tag),
                close_early,
            ))
            .await
        }
    }
}

/// Serves HTTP/2 on `io` (see [`drive`]).
async fn serve_h2<S, Svc>(
    state: &ProxyState,
    live: &LiveSettings,
    io: Rewind<Tracked<H1Guard<S>>>,
    svc: Svc,
    activity: &Arc<Activity>,
    close_early: impl Future<Output = ()>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    Svc: hyper::service::HttpService<Incoming, ResBody = LiveBody<ProxyBody>>,
    Svc::Future: Send + 'static,
    Svc::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let conn = http2_builder(live).serve_connection(TokioIo::new(io), svc);
    drive!(conn, state, live, activity.clone(), close_early);
}

/// Serves the protocol the client's first bytes speak: HTTP/2 after its preface, HTTP/1
/// otherwise.
async fn serve_auto<S, Svc>(
    state: &ProxyState,
    live: &LiveSettings,
    mut io: Rewind<Tracked<H1Guard<S>>>,
    svc: Svc,
    (activity, tag): (&Arc<Activity>, &Arc<GuardTag>),
    close_early: impl Future<Output = ()>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    Svc: hyper::service::HttpService<Incoming, ResBody = LiveBody<ProxyBody>> + Unpin,
    Svc::Future: Send + 'static,
    Svc::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tokio::pin!(close_early);
    let mut shutdown = state.shutdown_signal();
    let first = wait_first_bytes(&mut io, live, activity, &mut shutdown, close_early.as_mut());
    if !first.await {
        return;
    }
    if io.prefix().starts_with(H2_PREFACE) {
        let conn = http2_builder(live).serve_connection(TokioIo::new(io), svc);
        drive!(conn, state, live, activity.clone(), close_early);
    } else {
        serve_h1(state, live, io, svc, activity, tag, close_early).await
    }
}

/// An answer to `HEAD` is its head (RFC 9110 §9.3.2), whoever made it: hyper's h1 server drops
/// a body there, its h2 server would send it as DATA, which h2 clients take as a protocol error
/// (curl never showed sealgate's own 403/421/502 to `curl -I`). Headers are kept as they are
/// (an origin's `content-length` is what a GET would have carried).
fn headers_only(resp: Response<ProxyBody>) -> Response<ProxyBody> {
    resp.map(|body| {
        drop(body);
        super::empty_body()
    })
}

/// How long an HTTP/1 connection stays quiet, with nothing in flight, before its hyper
/// connection is parked (see [`serve_h1`]).
#[cfg(not(test))]
const PARK_AFTER: Duration = Duration::from_secs(2);
#[cfg(test)]
const PARK_AFTER: Duration = Duration::from_millis(200);

/// Serves an HTTP/1 connection, one hyper connection at a time.
///
/// hyper allocates 8 KiB of write buffer with its connection and 8 KiB of read buffer at its
/// first read, and keeps both for the connection's life. So hyper's connection is created only
/// once the client sends (`first_bytes`), and a connection that has settled — quiet for
/// [`PARK_AFTER`] with no request in flight, no response body open, every write flushed and
/// the guard between two messages — is *parked*: hyper's connection is taken apart
/// (`into_parts`), its buffers freed, and the stream (with the guard and its framing state)
/// waits for the next request without it. Nothing is lost: hyper had read exactly up to a
/// message boundary and processed it (it returns any byte it did not; then the connection is
/// closed instead, never re-parsed), and had flushed everything it wrote. A busy keep-alive
/// connection never parks, so it pays nothing per request. `io` replays the client's first
/// bytes when the caller already read them (to tell HTTP/1 from the h2 preface).
///
/// Memory: this future is what a parked tunnel holds (with its stream), so it keeps only the
/// wait for the next bytes; each hyper connection is served in a future of its own, boxed
/// ([`serve_conn`]). An async block, not an async fn: an async fn keeps each argument twice
/// in its state (the argument and the local it is moved to).
#[allow(clippy::manual_async_fn)] // on purpose: see above
fn serve_h1<'a, S, Svc>(
    state: &'a ProxyState,
    live: &'a LiveSettings,
    mut io: Rewind<Tracked<H1Guard<S>>>,
    mut svc: Svc,
    activity: &'a Arc<Activity>,
    tag: &'a Arc<GuardTag>,
    close_early: impl Future<Output = ()> + 'a,
) -> impl Future<Output = ()> + 'a
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    Svc: hyper::service::HttpService<Incoming, ResBody = LiveBody<ProxyBody>> + Unpin + 'a,
    Svc::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    async move {
        tokio::pin!(close_early);
        let mut shutdown = state.shutdown_signal();
        loop {
            if io.prefix().is_empty() {
                let first =
                    wait_first_bytes(&mut io, live, activity, &mut shutdown, close_early.as_mut());
                if !first.await {
                    return;
                }
            }
            let conn = Box::pin(serve_conn(
                state,
                live,
                (io, svc),
                (activity, tag),
                close_early.as_mut(),
            ));
            match conn.await {
                Some(parked) => (io, svc) = parked,
                None => return,
            }
        }
    }
}

/// Serves one hyper connection over `io` until it ends (`None`) or settles: then it is parked
/// ([`park`]) and its stream and service come back.
async fn serve_conn<S, Svc>(
    state: &ProxyState,
    live: &LiveSettings,
    (io, svc): (Rewind<Tracked<H1Guard<S>>>, Svc),
    (activity, tag): (&Arc<Activity>, &Arc<GuardTag>),
    close_early: Pin<&mut impl Future<Output = ()>>,
) -> Option<(Rewind<Tracked<H1Guard<S>>>, Svc)>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    Svc: hyper::service::HttpService<Incoming, ResBody = LiveBody<ProxyBody>> + Unpin,
    Svc::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut conn = Box::new(
        http1_builder(live)
            .serve_connection(TokioIo::new(io), svc)
            .with_upgrades(),
    );
    let mut conn_shutdown = state.shutdown_signal();
    let between = || tag.between_messages();
    let end = tokio::select! {
        // Only a clean end lingers: after a failed one (an answer's body that broke off)
        // the client must see the connection cut, not a clean close after a short body.
        done = &mut *conn => if done.is_ok() { End::Finished } else { End::Done },
        _ = close_early => End::Done,
        _ = activity.clone().idle(live.proxy.idle_timeout) => End::Graceful,
        _ = conn_shutdown.changed() => End::Graceful,
        _ = activity.clone().settled(PARK_AFTER, between) => End::Park,
    };
    match end {
        End::Done => None,
        End::Finished => {
            Box::pin(linger(conn, live.proxy.linger)).await;
            None
        }
        End::Graceful => {
            Pin::new(&mut *conn).graceful_shutdown();
            let _ = tokio::time::timeout(live.proxy.shutdown_grace, &mut *conn).await;
            None
        }
        End::Park => {
            let parked = park(*conn);
            if parked.is_some() {
                tracing::debug!("h1 connection parked");
            }
            parked
        }
    }
}

/// Waits for the client's first bytes ([`first_bytes`]) and sets `io` to replay them; false
/// when the connection ends before them: the client closed, `close_early` fired,
/// `idle_timeout` passed or shutdown began.
async fn wait_first_bytes<S: AsyncRead + Unpin>(
    io: &mut Rewind<S>,
    live: &LiveSettings,
    activity: &Arc<Activity>,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
    close_early: Pin<&mut impl Future<Output = ()>>,
) -> bool {
    let first = tokio::select! {
        first = first_bytes(io.inner_mut()) => first,
        _ = close_early => None,
        _ = activity.clone().idle(live.proxy.idle_timeout) => None,
        _ = shutdown.changed() => None,
    };
    let Some(first) = first else { return false };
    io.replay(first);
    true
}

/// How [`serve_h1`]'s wait on one hyper connection ended.
enum End {
    /// The caller closed the connection.
    Done,
    /// hyper is done without an error (its last answer sent, the write side shut):
    /// [`linger`], then the end.
    Finished,
    /// Idle timeout or daemon shutdown: hyper's graceful shutdown, then the end.
    Graceful,
    /// The connection settled: park it.
    Park,
}

/// Reads and drops what the client still sends after hyper ended the connection, within
/// [`super::linger`]'s bounds: hyper ends a connection whose request body it did not read
/// once the answer is out, and closing with unread bytes resets the connection (the client,
/// still writing, lost the answer).
async fn linger<S, Svc>(conn: Box<UpgradeableH1<S, Svc>>, bounds: super::linger::Bounds)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    Svc: hyper::service::HttpService<Incoming, ResBody = LiveBody<ProxyBody>>,
    Svc::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let Some(parts) = conn.into_parts() else {
        return; // upgraded: the relay owns the stream
    };
    let (_, mut io) = parts.io.into_inner().into_parts();
    super::linger::drain(io.get_mut().get_mut(), bounds).await;
}

/// Takes a settled hyper connection apart: the stream and the service, or `None` when hyper
/// holds bytes it has not processed (the connection then ends: they are never parsed again)
/// — unless they are only empty lines, which a server ignores before a request (RFC 9112
/// §2.2): a client that sent a CRLF after its last message, or before its first, and then
/// paused was cut off (outside pass h44b). They are dropped, as hyper would have skipped
/// them.
fn park<S, Svc>(conn: UpgradeableH1<S, Svc>) -> Option<(Rewind<Tracked<H1Guard<S>>>, Svc)>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    Svc: hyper::service::HttpService<Incoming, ResBody = LiveBody<ProxyBody>>,
    Svc::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let parts = conn.into_parts()?;
    let (prefix, mut io) = parts.io.into_inner().into_parts();
    let empty_lines = |b: &[u8]| b.iter().all(|&c| c == b'\r' || c == b'\n');
    if !empty_lines(&parts.read_buf) || !empty_lines(&prefix) {
        tracing::debug!("h1 connection settled with unprocessed bytes: closing it");
        return None;
    }
    io.get_mut().shrink();
    Some((Rewind::new(Bytes::new(), io), parts.service))
}

/// hyper's upgradeable HTTP/1 connection over a guarded, replaying stream.
type UpgradeableH1<S, Svc> =
    http1::UpgradeableConnection<TokioIo<Rewind<Tracked<H1Guard<S>>>>, Svc>;

pin_project_lite::pin_project! {
    /// A response body that counts as open ([`Activity::body`]) until it ends or is dropped,
    /// so a connection streaming a quiet response is never parked.
    pub struct LiveBody<B> {
        #[pin]
        inner: B,
        open: Option<OpenBody>,
    }
}

impl<B: Body> LiveBody<B> {
    fn new(inner: B, activity: &Arc<Activity>) -> Self {
        let open = (!inner.is_end_stream()).then(|| activity.body());
        LiveBody { inner, open }
    }
}

impl<B: Body> Body for LiveBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let r = this.inner.poll_frame(cx);
        if matches!(r, std::task::Poll::Ready(None | Some(Err(_)))) {
            *this.open = None;
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// hyper's first read buffer (its `INIT_BUFFER_SIZE`): what [`first_bytes`] collects at most.
const FIRST_READ: usize = 8192;

/// How many bytes [`first_bytes`] waits for before it allocates anything (kept in the
/// connection's future while it waits).
const PROBE: usize = 64;

/// The first bytes an HTTP/1 connection sends (at most [`FIRST_READ`]: all the guard has
/// released without waiting), read before hyper's connection exists. hyper allocates 8 KiB of
/// write buffer with the connection and 8 KiB of read buffer at its first read; a tunnel that
/// never sends a request never pays them. Handing hyper the released head whole, not a short
/// prefix, also keeps its read buffer at 8 KiB (a short first read makes it double).
/// `None`: the client closed or the read failed (the connection ends).
async fn first_bytes<S: AsyncRead + Unpin>(s: &mut S) -> Option<Bytes> {
    let mut probe = [0u8; PROBE];
    let n = s.read(&mut probe).await.ok().filter(|&n| n > 0)?;
    let mut first = BytesMut::with_capacity(FIRST_READ);
    first.extend_from_slice(&probe[..n]);
    while first.len() < FIRST_READ {
        // Only what is already released: a read that would wait is dropped (nothing is lost;
        // hyper reads the rest).
        match s.read_buf(&mut first).now_or_never() {
            Some(Ok(n)) if n > 0 => {}
            _ => break,
        }
    }
    Some(first.freeze())
}

/// hyper's HTTP/1 server with the guard's limits. No header-read timeout of hyper's own: the
/// guard holds every head until it is complete and runs `header_read_timeout` on it from its
/// first byte, and hyper's timer — re-armed while a keep-alive connection waits for its next
/// request — would close every used keep-alive connection at `header_read_timeout` instead of
/// `idle_timeout`.
fn http1_builder(live: &LiveSettings) -> http1::Builder {
    let p = &live.proxy;
    let mut b = http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(None)
        .max_buf_size(p.max_header_bytes.max(8192))
        .keep_alive(true);
    if p.max_header_fields != MAX_HEADERS {
        // hyper's default is the same number; setting it moves its parse to the heap.
        b.max_headers(p.max_header_fields);
    }
    b
}

/// hyper's HTTP/2 server with the h2 limits of `[proxy]`. Its header-list limit is twice
/// `max_header_bytes`: a head between the two reaches the service, which answers it with the
/// uniform 431 (`forward::checks::check_h2_head`); the h2 crate itself would send a bare 431 and reset
/// the stream, or — for one field spread over CONTINUATION frames — end the whole connection,
/// which clients take as "not processed" and retry. Only a head over twice the limit still
/// meets the h2 crate's answer; the memory it may take stays bounded by that.
///
/// The windows and send buffer are `[proxy] h2_*_bytes` (`config::H2Buffers`): hyper's own
/// (1 MiB windows, a 400 KiB send buffer per stream) let a sandbox that stops reading hold
/// hundreds of KB per stream.
fn http2_builder(live: &LiveSettings) -> http2::Builder<TokioExecutor> {
    let p = &live.proxy;
    let mut b = http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .max_concurrent_streams(p.max_h2_streams)
        .max_header_list_size(
            u32::try_from(p.max_header_bytes.saturating_mul(2)).unwrap_or(u32::MAX),
        )
        .max_pending_accept_reset_streams(50)
        .max_local_error_reset_streams(256)
        .initial_stream_window_size(p.h2.stream_window)
        .initial_connection_window_size(p.h2.connection_window)
        .max_send_buf_size(p.h2.send_buffer);
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn first_bytes_takes_everything_already_sent_up_to_hypers_first_buffer() {
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        let head = format!(
            "GET / HTTP/1.1\r\nHost: a.test\r\nX-Pad: {}\r\n\r\n",
            "p".repeat(300)
        );
        client.write_all(head.as_bytes()).await.unwrap();
        assert_eq!(first_bytes(&mut server).await.unwrap(), head.as_bytes());

        let big = vec![b'x'; FIRST_READ + 100];
        client.write_all(&big).await.unwrap();
        assert_eq!(first_bytes(&mut server).await.unwrap().len(), FIRST_READ);
        let mut rest = [0u8; 200];
        assert_eq!(server.read(&mut rest).await.unwrap(), 100, "nothing lost");

        drop(client);
        assert!(
            first_bytes(&mut server).await.is_none(),
            "EOF before any byte"
        );
    }
}
