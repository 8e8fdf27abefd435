//! Sending upstream: which of the sandbox's clients a request goes on, its retries, and the
//! room it waits for at an upstream connection cap.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, Version};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::capture_connection;

use super::body::{broken, timed_out, UpBody};
use super::Handed;
use crate::metrics::Counted;
use crate::policy::Scheme;
use crate::proxy::failure::UpstreamCap;
use crate::proxy::linger::{BodyBreak, ClientFailed};
use crate::proxy::progress::Progress;
use crate::proxy::refusal::Refusal;
use crate::proxy::upstream::keep_alive::Captured;
use crate::proxy::{LiveSettings, ProxyBody, Tunnel};

/// Sends the request and waits for the response head: `response_timeout` from the request's
/// last byte (a streamed body's `progress`; see [`crate::proxy::progress`]).
///
/// Held-body requests to an origin that has answered over h2 go on the dual-protocol client's
/// h2 connection there while it holds a usable one ([`crate::proxy::upstream::LiveH2`]), else
/// to the h2-only client (one connection attempt at a time, see
/// [`crate::proxy::upstream::KnownH2`]); if that origin no longer chooses h2, it is forgotten
/// and the request goes to the dual-protocol client (nothing was sent). Streamed bodies stay
/// on the dual-protocol client: their bytes could not be sent twice.
///
/// A request the upstream provably did not process — refused with REFUSED_STREAM, or on a stream
/// above a GOAWAY's last-stream-id (see [`crate::proxy::upstream::RefuseAfterGoaway`]) — is sent
/// again when its body was held in full: on `client_retry`'s pool (so the requests one GOAWAY
/// refuses share one new connection rather than open one each), and if that refuses too, once more
/// on a fresh connection. An idempotent request whose HTTP/1 connection closed under it goes again
/// on a fresh connection straight away ([`crate::proxy::failure::over_h2`]). HTTP/1 connections
/// closed before the request was written are retried by the pooled client itself.
pub(super) async fn send(
    t: &Tunnel,
    rt: &LiveSettings,
    head: Request<()>,
    body: UpBody,
    progress: Option<&Progress>,
    websocket: bool,
) -> Result<Response<Incoming>, Refusal> {
    let started = Instant::now();
    let timeout = rt.upstream.config.response_timeout;
    let client_failed = head.extensions().get::<ClientFailed>().cloned();
    let method = head.method().clone();
    let sending = attempts(t, rt, head, body, websocket);
    tokio::pin!(sending);
    let answered = loop {
        let until = crate::proxy::progress::deadline(started, progress, timeout);
        match tokio::time::timeout_at(until.into(), &mut sending).await {
            Ok(answered) => break answered,
            // The body moved meanwhile: the wait is counted from its last byte.
            Err(_) if crate::proxy::progress::deadline(started, progress, timeout) > until => {}
            Err(_) => return Err(timed_out(t, progress)),
        }
    };
    let broke = client_failed.map_or(BodyBreak::None, |f| f.get());
    let resp = match answered {
        Err(_) if broke != BodyBreak::None => return Err(broken(broke)),
        Err(e) => return Err(crate::proxy::failure::classify(t, &e, &method)),
        Ok(r) => r,
    };
    t.state
        .metrics
        .upstream_latency
        .observe(started.elapsed().as_secs_f64());
    Ok(resp)
}

type Attempt = Result<Response<Incoming>, hyper_util::client::legacy::Error>;

/// The attempts of [`send`], without its timeout.
async fn attempts(
    t: &Tunnel,
    rt: &LiveSettings,
    head: Request<()>,
    body: UpBody,
    websocket: bool,
) -> Attempt {
    let bytes = match body {
        UpBody::Held(b) => b,
        UpBody::Streamed(b) => return send_streamed(t, rt, websocket, head, b).await,
    };
    // Only TLS origins can have chosen h2 (ALPN); `known_h2` is keyed by the origin without
    // its default port, so `http://H` and `https://H` share a key, and a plain request sent
    // after an h2 answer from `https://H` went to the h2-only client, which spoke h2 in clear
    // to the plain origin (502 for every sandbox until a reload: two outside passes).
    let tls = t.scheme == Scheme::Https;
    let known = tls && !websocket && rt.known_h2.contains(&t.origin);
    let which = match (websocket, known) {
        (true, _) => Which::H1,
        (false, true) => Which::KnownH2,
        (false, false) => Which::Either,
    };
    match send_held(t, rt, which, &head, &bytes).await {
        Ok(resp) => {
            if tls && !known && resp.version() == Version::HTTP_2 {
                rt.known_h2.learn(&t.origin);
            }
            Ok(resp)
        }
        // Only the h2-only client fails so (`KnownH2` picked it: see [`client`]).
        Err(e) if known && crate::proxy::failure::not_h2(&e) => {
            rt.known_h2.forget(&t.origin);
            send_held(t, rt, Which::Either, &head, &bytes).await
        }
        Err(e) if crate::proxy::failure::may_send_again(&e, head.method()) => {
            tracing::debug!(dest = %t.dest, error = %crate::proxy::failure::chain(&e),
                "upstream did not process the request, or it is idempotent; retrying");
            // `known`: a request on the dual-protocol client's h2 connection whose failure is
            // an I/O error carries no h2 error to tell it (review h47d).
            match known || crate::proxy::failure::over_h2(&e) {
                true => retry(t, rt, &head, &bytes).await,
                // An HTTP/1 connection closed under it (a kept-alive connection the origin
                // timed out): a new connection, offering both protocols.
                false => send_held(t, rt, Which::Fresh, &head, &bytes).await,
            }
        }
        Err(e) => Err(e),
    }
}

/// A streamed body goes once: it cannot wait for room or go again. At an upstream cap it
/// gets its refusal at once and the client sets that hold the cap's idle connections are
/// dropped ([`drop_idle`]) for the client's next try.
async fn send_streamed(
    t: &Tunnel,
    rt: &LiveSettings,
    websocket: bool,
    head: Request<()>,
    body: ProxyBody,
) -> Attempt {
    let which = if websocket { Which::H1 } else { Which::Either };
    let mut head = head;
    let mut unanswered = CutUnanswered(None);
    if !websocket {
        frame_streamed(&mut head, &body);
        unanswered.0 = ask_keep_alive(&mut head, which);
    }
    let sent = client(rt, t, which)
        .request(attach(t, head, UpBody::Streamed(body)))
        .await;
    let captured = unanswered.0.take();
    let sent = sent.inspect(|r| honour(rt, r, captured.as_ref()));
    if let Some(cap) = sent
        .as_ref()
        .err()
        .and_then(crate::proxy::failure::upstream_cap)
    {
        drop_idle(t, rt, cap);
    }
    sent
}

/// A streamed upload's exchange dropped before it ended (the response timeout's 504, the
/// client gone) ends its HTTP/1 connection ([`crate::proxy::upstream::OverheadOf::cut_connection`]):
/// hyper's task, blocked writing into a socket an origin that neither answers nor reads had
/// stopped taking, held the connection, its place in the sandbox's upstream budget and
/// megabytes of queued upload for as long as the origin kept it (outside pass h49e: minutes;
/// two such 504s at a cap of two refused every later request 429). Such a connection could
/// not carry another exchange anyway. Holds the captured connection until the exchange ends.
struct CutUnanswered(Option<Captured>);

impl Drop for CutUnanswered {
    fn drop(&mut self) {
        let Some(Captured(captured)) = self.0.take() else {
            return;
        };
        let mut extras = http::Extensions::new();
        if let Some(connected) = captured.connection_metadata().as_ref() {
            connected.get_extras(&mut extras);
        }
        if let Some(conn) = extras.get::<crate::proxy::upstream::OverheadOf>() {
            conn.cut_connection();
        }
    }
}

/// hyper's h1 client assumes a GET or HEAD has no body: one of unknown length goes out as no
/// body at all (the origin answered a bodiless GET) unless the request says it is chunked.
/// So a streamed body of unknown length on those methods is marked chunked; hyper's h2 client
/// removes the field (h2 frames bodies itself), other methods are chunked by hyper anyway.
fn frame_streamed(head: &mut Request<()>, body: &ProxyBody) {
    let bodiless_by_default = matches!(*head.method(), Method::GET | Method::HEAD);
    if bodiless_by_default && body.size_hint().exact().is_none() {
        head.headers_mut().insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
    }
}

/// A request on the dual-protocol client (which may go over HTTP/1.1, and is never a
/// WebSocket upgrade, whose `Connection` names `upgrade`) says `Connection: keep-alive`, as
/// browsers do (Apache httpd announces its idle timeout, `Keep-Alive: timeout=N`, only when
/// asked; hyper's h2 client drops the field), and its connection is captured so that its
/// answer's head can retire it before that timeout ([`honour`]). The fresh client has no pool
/// to retire a connection from.
///
/// `te` is not listed beside `keep-alive`, though RFC 9110 §10.1.4 asks it of a sender of
/// `TE` over HTTP/1.1: which protocol the origin picks is not known here, and hyper's h2
/// client removes every field `Connection` names, so `TE: trailers` would not reach an h2
/// origin (gRPC needs it; tried 2026-12-07, `curl_sees_every_response_shape` caught it).
fn ask_keep_alive(head: &mut Request<()>, which: Which) -> Option<Captured> {
    const KEEP_ALIVE: HeaderValue = HeaderValue::from_static("keep-alive");
    if !matches!(which, Which::Either) {
        return None;
    }
    if !head.headers().contains_key(header::CONNECTION) {
        head.headers_mut().insert(header::CONNECTION, KEEP_ALIVE);
    }
    Some(Captured(capture_connection(head)))
}

/// The answer's head is taken: its connection learns when to retire
/// ([`crate::proxy::upstream::keep_alive::honour`]). Here, not later with the answer, so that
/// an answer refused on its way to the sandbox counts too, and before hyper-util can hand the
/// connection to another request.
fn honour(rt: &LiveSettings, resp: &Response<Incoming>, captured: Option<&Captured>) {
    let pool_idle = rt.upstream.config.pool_idle_timeout;
    crate::proxy::upstream::keep_alive::honour(resp, captured, pool_idle);
}

/// Sends a held-body request on the sandbox's client `which`; at an upstream cap it makes
/// room ([`make_room`]) and, if that freed a slot, sends once more (nothing was sent the
/// first time). Every dial point of a held body goes through here: the first attempt, the
/// h2 fallback, and both retries.
async fn send_held(
    t: &Tunnel,
    rt: &LiveSettings,
    which: Which,
    head: &Request<()>,
    bytes: &Bytes,
) -> Attempt {
    let send = || {
        let mut head = head.clone();
        let captured = ask_keep_alive(&mut head, which);
        let sending = client(rt, t, which).request(attach(t, head, UpBody::Held(bytes.clone())));
        async move { sending.await.inspect(|r| honour(rt, r, captured.as_ref())) }
    };
    let sent = send().await;
    let Some(cap) = sent
        .as_ref()
        .err()
        .and_then(crate::proxy::failure::upstream_cap)
    else {
        return sent;
    };
    if !make_room(t, rt, cap).await {
        return sent;
    }
    send().await
}

/// Which of a sandbox's clients (`proxy::clients::Clients`) a request goes on.
#[derive(Clone, Copy)]
enum Which {
    /// h2 or HTTP/1.1, whichever the origin chooses.
    Either,
    /// Held bodies to an origin known to speak h2: the dual-protocol client while it holds a
    /// usable h2 connection there (`upstream::LiveH2`: a second one from the h2-only client
    /// cost a handshake and ~92 KB), else the h2-only client. Decided when the client is
    /// taken, so a send again after making room decides anew. No `Connection: keep-alive`,
    /// no capture (nothing to retire on h2).
    KnownH2,
    /// HTTP/1.1 only: WebSocket upgrades.
    H1,
    /// h2 only, a pool of its own: the retry of a request the origin did not process.
    Retry,
    /// No pool: the last resort when the retry connection refuses too.
    Fresh,
}

/// The sandbox's client `which`. A clone: a request waiting for its answer keeps that one
/// client's pool alive, not the sandbox's whole set, so [`make_room`] can close the idle
/// connections of the others.
fn client(rt: &LiveSettings, t: &Tunnel, which: Which) -> crate::proxy::UpstreamClient {
    let clients = rt.clients(&t.sandbox);
    match which {
        Which::Either => clients.client.clone(),
        Which::KnownH2 => {
            let idle = rt.upstream.config.pool_idle_timeout;
            match clients.dual_h2.holds(t.origin.as_str(), idle) {
                true => clients.client.clone(),
                false => clients.client_h2.clone(),
            }
        }
        Which::H1 => clients.client_h1.clone(),
        Which::Retry => clients.client_retry.clone(),
        Which::Fresh => clients.client_fresh.clone(),
    }
}

/// A sandbox at its upstream cap (`[upstream] max_connections_per_sandbox`) may hold it with
/// idle pooled connections, left by requests to other hosts, and the daemon at its cap
/// (`[upstream] max_connections`) with the idle connections of any sandbox: the sets holding
/// them are dropped ([`drop_idle`]) and the request waits up to [`ROOM_WAIT`] for a slot
/// under `cap`. True if one is free.
async fn make_room(t: &Tunnel, rt: &LiveSettings, cap: UpstreamCap) -> bool {
    drop_idle(t, rt, cap);
    let config = &rt.upstream.config;
    let full = || match cap {
        UpstreamCap::Sandbox => t.sandbox.upstream.open() >= config.max_connections_per_sandbox,
        UpstreamCap::Daemon => rt.upstream.counts.connections.open() >= config.max_connections,
    };
    let deadline = tokio::time::Instant::now() + ROOM_WAIT;
    while full() {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    true
}

/// Drops the client sets that hold `cap`'s idle connections, which closes every idle one of
/// them that no request is waiting on (a connection in use closes when its exchange ends):
/// the sandbox's on every worker, or at the daemon's cap every sandbox's.
fn drop_idle(t: &Tunnel, rt: &LiveSettings, cap: UpstreamCap) {
    match cap {
        UpstreamCap::Sandbox => rt.drop_clients(&t.sandbox),
        UpstreamCap::Daemon => rt.drop_all_clients(),
    }
}

/// How long a request at an upstream cap waits for the idle connections it had
/// closed to go (each closes on its own worker, at once unless that worker is busy).
const ROOM_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

/// The retry of a request the upstream did not process: `client_retry`, then, if that
/// refuses too (or the origin no longer chooses h2), a fresh connection.
async fn retry(t: &Tunnel, rt: &LiveSettings, head: &Request<()>, bytes: &Bytes) -> Attempt {
    match send_held(t, rt, Which::Retry, head, bytes).await {
        Err(e) if crate::proxy::failure::not_processed(&e) || crate::proxy::failure::not_h2(&e) => {
            send_held(t, rt, Which::Fresh, head, bytes).await
        }
        other => other,
    }
}

/// The request with its body, counted into the `bytes_up` metric, and marking the request's
/// [`Handed`] (from its extensions) when hyper takes it to a connection.
fn attach(t: &Tunnel, head: Request<()>, body: UpBody) -> Request<ProxyBody> {
    let body = match body {
        UpBody::Held(b) => Full::new(b).map_err(|never| match never {}).boxed_unsync(),
        UpBody::Streamed(b) => b,
    };
    let body = Counted::new(body, t.state.metrics.bytes_up.clone()).boxed_unsync();
    let body = match head.extensions().get::<Handed>() {
        Some(handed) => Marking(body, handed.clone()).boxed_unsync(),
        None => body,
    };
    head.map(|()| body)
}

/// A request body that marks its [`Handed`] when hyper looks at it.
struct Marking(ProxyBody, Handed);

impl Body for Marking {
    type Data = Bytes;
    type Error = crate::proxy::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.1.mark();
        Pin::new(&mut self.0).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.1.mark();
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.1.mark();
        self.0.size_hint()
    }
}
