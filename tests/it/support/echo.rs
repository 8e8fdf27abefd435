//! In-process origin (HTTPS or plain HTTP) that records exactly what it received and answers by route.
//!
//! Routes, by path prefix (anything else behaves like `/echo`):
//!
//! | path | response |
//! |---|---|
//! | `/echo…` | 200 JSON `{"method","uri","version","headers":{..},"body"}` + `x-echo-authorization` / `x-echo-api-key` |
//! | `/reflect…` | `authorization` / `x-api-key` values in `x-reflect`, `set-cookie: session=<v>; Path=/` and 3× in a text body |
//! | `/gzip…`, `/br…` | the `/echo` JSON, gzip- or brotli-compressed, with `content-encoding` |
//! | `/br-slow?ms=N` | the same brotli body, its last byte sent N ms after the rest (default 1000) |
//! | `/sse…` | `text/event-stream`: 5 × `data: <authorization>\n\n`, each cut into 3 frames 20 ms apart |
//! | `/redirect…` | 302 to `https://other.example.test/landing` |
//! | `/status/NNN` | status NNN (200–599), empty body |
//! | `/slow?ms=N&chunks=K` | K chunks of 1 KiB, N ms apart (defaults 100 ms, 3 chunks) |
//! | `/pkt?ms=N&n=K` | git's upload-pack keep-alives: K × `0005\x01`, N ms apart, then `0000` (defaults 300 ms, 4) |
//! | `/big?bytes=N` | N bytes of `a` in 16 KiB chunks, with `content-length` |
//! | `/ws…` | WebSocket echo of text and binary messages (HTTP/1.1 upgrade) |
//! | `/tail?n=K` | `text/event-stream`: `data: <x-api-key>\n\n` of each of the next K requests (a request inspector's live view), then ends |
//!
//! Invariant: a request is recorded (full body read, even chunked) *before* its response is
//! produced, so once a client sees a response, [`Echo::requests`] already contains the request.
#![allow(dead_code)] // shared by many tests; each test binary module uses a different subset

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

/// One request exactly as the origin received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    /// `GET`, `POST`, …
    pub method: String,
    /// The request target as received: `path?query` (the full URI only for authority-form).
    pub uri: String,
    /// HTTP version of the connection (HTTP/1.1 or HTTP/2).
    pub version: http::Version,
    /// Header fields with lowercased names, in arrival order of each distinct name; repeated
    /// fields of one name are listed together (that is how `http::HeaderMap` stores them).
    pub headers: Vec<(String, Vec<u8>)>,
    /// The complete request body (what was read before an error, if the client aborted).
    pub body: Vec<u8>,
    /// The request's trailer fields (lowercased names), if it had any.
    pub trailers: Vec<(String, Vec<u8>)>,
    /// The `Host` header, or the HTTP/2 `:authority`.
    pub host: Option<String>,
    /// Which of the origin's connections carried it: 1 for the first accepted, and so on.
    pub conn: usize,
}

impl Recorded {
    /// All values of header `name` (lowercase), in order.
    pub fn header_values(&self, name: &str) -> Vec<&[u8]> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
            .collect()
    }

    /// The first value of header `name` (lowercase), lossily decoded.
    pub fn header(&self, name: &str) -> Option<String> {
        let value = self.header_values(name).into_iter().next()?;
        Some(String::from_utf8_lossy(value).into_owned())
    }

    /// Whether the URI, any header value or the body contains `needle`.
    pub fn contains(&self, needle: &[u8]) -> bool {
        contains(self.uri.as_bytes(), needle)
            || self.headers.iter().any(|(_, v)| contains(v, needle))
            || contains(&self.body, needle)
            || self.trailers.iter().any(|(_, v)| contains(v, needle))
    }

    fn path(&self) -> &str {
        self.uri.split('?').next().unwrap_or("")
    }
}

/// A running origin on `127.0.0.1:<ephemeral>`; dropping it stops the listener, every open
/// connection and every WebSocket session.
pub struct Echo {
    /// Where the origin listens.
    pub addr: SocketAddr,
    state: Arc<State>,
    _shutdown: watch::Sender<()>,
}

#[derive(Default)]
struct State {
    requests: Mutex<Vec<Recorded>>,
    connections: AtomicUsize,
    handshakes: AtomicUsize,
}

impl State {
    fn requests(&self) -> MutexGuard<'_, Vec<Recorded>> {
        self.requests.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Echo {
    /// Starts an HTTPS origin (HTTP/1.1 and HTTP/2 via ALPN, upgrades enabled) using `cfg`.
    ///
    /// # Panics
    /// If binding a loopback port fails.
    pub async fn start_tls(cfg: Arc<rustls::ServerConfig>) -> Echo {
        start(Some(TlsAcceptor::from(cfg))).await
    }

    /// Starts an HTTPS origin at `addr` (e.g. 127.0.0.2 with the port of a decoy on
    /// 127.0.0.3, for the DNS tests).
    ///
    /// # Panics
    /// If binding fails.
    pub async fn start_tls_at(addr: SocketAddr, cfg: Arc<rustls::ServerConfig>) -> Echo {
        start_at(addr, Some(TlsAcceptor::from(cfg))).await
    }

    /// Starts a plain-HTTP origin (HTTP/1.1; HTTP/2 prior knowledge is also understood).
    ///
    /// # Panics
    /// If binding a loopback port fails.
    pub async fn start_plain() -> Echo {
        start(None).await
    }

    /// Every request recorded since start (or the last [`Echo::clear`]), in completion order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests().clone()
    }

    /// TCP connections accepted (counted before any TLS handshake).
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// TLS handshakes completed (always 0 for a plain origin).
    pub fn tls_handshakes(&self) -> usize {
        self.state.handshakes.load(Ordering::SeqCst)
    }

    /// Whether any recorded request's URI, header value or body contains `needle`.
    pub fn received_bytes_contain(&self, needle: &[u8]) -> bool {
        self.state.requests().iter().any(|r| r.contains(needle))
    }

    /// Forgets recorded requests and resets both counters to 0.
    pub fn clear(&self) {
        // Releases the memory too (the load test measures the process's heap).
        *self.state.requests() = Vec::new();
        self.state.connections.store(0, Ordering::SeqCst);
        self.state.handshakes.store(0, Ordering::SeqCst);
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

// ---------------------------------------------------------------------------------------------
// Accepting and serving connections

async fn start(tls: Option<TlsAcceptor>) -> Echo {
    start_at(([127, 0, 0, 1], 0).into(), tls).await
}

async fn start_at(addr: SocketAddr, tls: Option<TlsAcceptor>) -> Echo {
    let listener = TcpListener::bind(addr).await.expect("bind echo origin");
    let addr = listener.local_addr().expect("echo origin address");
    let state = Arc::new(State::default());
    let (tx, rx) = watch::channel(());
    let ctx = Ctx {
        tls,
        state: state.clone(),
        shutdown: rx,
    };
    spawn_until_shutdown(&ctx.shutdown, accept_loop(listener, ctx.clone()));
    Echo {
        addr,
        state,
        _shutdown: tx,
    }
}

/// What every connection task needs; `shutdown` closes when the [`Echo`] is dropped.
#[derive(Clone)]
struct Ctx {
    tls: Option<TlsAcceptor>,
    state: Arc<State>,
    shutdown: watch::Receiver<()>,
}

/// Runs `fut` on the runtime until it finishes or the owning [`Echo`] is dropped.
fn spawn_until_shutdown(
    shutdown: &watch::Receiver<()>,
    fut: impl Future<Output = ()> + Send + 'static,
) {
    let mut shutdown = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = fut => {}
            _ = shutdown.changed() => {}
        }
    });
}

async fn accept_loop(listener: TcpListener, ctx: Ctx) {
    loop {
        match listener.accept().await {
            Ok((tcp, _)) => {
                let conn = ctx.state.connections.fetch_add(1, Ordering::SeqCst) + 1;
                spawn_until_shutdown(&ctx.shutdown, serve_tcp(tcp, conn, ctx.clone()));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

async fn serve_tcp(tcp: TcpStream, conn: usize, ctx: Ctx) {
    let _ = tcp.set_nodelay(true);
    match ctx.tls.clone() {
        None => serve_http(tcp, conn, ctx).await,
        Some(acceptor) => {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            ctx.state.handshakes.fetch_add(1, Ordering::SeqCst);
            serve_http(tls, conn, ctx).await;
        }
    }
}

async fn serve_http<I>(io: I, conn: usize, ctx: Ctx)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| handle(req, conn, ctx.clone()));
    let builder = auto::Builder::new(TokioExecutor::new());
    let _ = builder
        .serve_connection_with_upgrades(TokioIo::new(io), service)
        .await;
}

async fn handle(
    mut req: Request<Incoming>,
    conn: usize,
    ctx: Ctx,
) -> Result<Response<RespBody>, Infallible> {
    let upgrade = is_websocket(&req).then(|| hyper::upgrade::on(&mut req));
    if req.uri().path().starts_with("/early") {
        // Answers at once (as an ingestion API that replies 202 before the body ends), and
        // records the request once its body is in; `/early-206` answers 206.
        let status = match req.uri().path() {
            "/early-206" => StatusCode::PARTIAL_CONTENT,
            _ => StatusCode::OK,
        };
        let state = ctx.state.clone();
        tokio::spawn(async move {
            let rec = record(req, conn).await;
            state.requests().push(rec);
        });
        return Ok(response(status, empty()));
    }
    let rec = record(req, conn).await;
    ctx.state.requests().push(rec.clone());
    if rec.path().starts_with("/tail") {
        return Ok(tail(&rec, &ctx));
    }
    Ok(route(&rec, upgrade, &ctx.shutdown).await)
}

fn is_websocket<B>(req: &Request<B>) -> bool {
    let upgrade = req
        .headers()
        .get(header::UPGRADE)
        .map(HeaderValue::as_bytes);
    req.uri().path().starts_with("/ws")
        && upgrade.is_some_and(|u| u.eq_ignore_ascii_case(b"websocket"))
}

/// Reads the whole request (frame by frame, so a chunked upload is kept complete).
async fn record(req: Request<Incoming>, conn: usize) -> Recorded {
    let (parts, mut body) = req.into_parts();
    let (mut bytes, mut trailers) = (Vec::new(), Vec::new());
    while let Some(Ok(frame)) = body.frame().await {
        if let Some(data) = frame.data_ref() {
            bytes.extend_from_slice(data);
        }
        if let Some(t) = frame.trailers_ref() {
            let field =
                |(n, v): (&HeaderName, &HeaderValue)| (n.to_string(), v.as_bytes().to_vec());
            trailers.extend(t.iter().map(field));
        }
    }
    let host = parts.headers.get(header::HOST).map(|h| lossy(h.as_bytes()));
    Recorded {
        method: parts.method.to_string(),
        uri: parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.to_string(), |pq| pq.to_string()),
        version: parts.version,
        headers: parts
            .headers
            .iter()
            .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
            .collect(),
        body: bytes,
        trailers,
        host: host.or_else(|| parts.uri.authority().map(|a| a.to_string())),
        conn,
    }
}

// ---------------------------------------------------------------------------------------------
// Routes

type RespBody = BoxBody<Bytes, io::Error>;

async fn route(
    rec: &Recorded,
    upgrade: Option<OnUpgrade>,
    shutdown: &watch::Receiver<()>,
) -> Response<RespBody> {
    let path = rec.path();
    let p = |prefix: &str| path.starts_with(prefix);
    if p("/ws") {
        websocket(rec, upgrade, shutdown)
    } else if p("/status/") {
        status(path)
    } else if p("/slow") {
        slow(rec, shutdown)
    } else if p("/pkt") {
        keep_alives(rec, shutdown)
    } else if p("/big") {
        big(rec, shutdown)
    } else if p("/sse") {
        sse(rec, shutdown)
    } else if p("/gzip") {
        compressed(rec, "gzip", gzip(&echo_json(rec)))
    } else if p("/br-slow") {
        brotli_slow(rec, shutdown).await
    } else if p("/br") {
        compressed(rec, "br", brotli(&echo_json(rec)).await)
    } else if p("/reflect") {
        reflect(rec)
    } else if p("/b64") {
        b64(rec)
    } else if p("/redirect") {
        redirect()
    } else if p("/many-headers") {
        many_headers()
    } else if p("/hang") {
        // The answer's head comes 3 s late (past a short `response_timeout_secs`).
        let mut stop = shutdown.clone();
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(3)) => {}
            _ = stop.changed() => {}
        }
        echo(rec)
    } else {
        echo(rec)
    }
}

fn echo(rec: &Recorded) -> Response<RespBody> {
    let mut resp = response(StatusCode::OK, full(echo_json(rec)));
    set(&mut resp, header::CONTENT_TYPE, b"application/json");
    add_echo_headers(&mut resp, rec);
    resp
}

/// `{"method","uri","version","headers":{name: value},"body"}`; repeated header values are
/// joined with `", "`, and values and body are decoded lossily.
fn echo_json(rec: &Recorded) -> Vec<u8> {
    let mut headers = serde_json::Map::new();
    for (name, value) in &rec.headers {
        let value = lossy(value);
        let merged = match headers.get(name).and_then(|v| v.as_str()) {
            Some(prev) => format!("{prev}, {value}"),
            None => value,
        };
        headers.insert(name.clone(), merged.into());
    }
    let json = serde_json::json!({
        "method": rec.method,
        "uri": rec.uri,
        "version": format!("{:?}", rec.version),
        "headers": headers,
        "body": lossy(&rec.body),
    });
    serde_json::to_vec(&json).expect("JSON value serializes")
}

fn add_echo_headers(resp: &mut Response<RespBody>, rec: &Recorded) {
    for (from, to) in [
        ("authorization", "x-echo-authorization"),
        ("x-api-key", "x-echo-api-key"),
    ] {
        if let Some(value) = rec.header_values(from).first() {
            set(resp, HeaderName::from_static(to), value);
        }
    }
}

/// The credential values a route reflects: `authorization` then `x-api-key`, when present.
fn credentials(rec: &Recorded) -> Vec<Vec<u8>> {
    let mut values: Vec<Vec<u8>> = rec
        .header_values("authorization")
        .into_iter()
        .map(<[u8]>::to_vec)
        .collect();
    values.extend(
        rec.header_values("x-api-key")
            .into_iter()
            .map(<[u8]>::to_vec),
    );
    values
}

/// The echo JSON, base64-encoded (standard alphabet): a value inside lands at whatever byte
/// offset the request's other fields put it.
fn b64(rec: &Recorded) -> Response<RespBody> {
    use base64::Engine as _;
    let body = base64::engine::general_purpose::STANDARD.encode(echo_json(rec));
    let mut resp = response(StatusCode::OK, full(body.into_bytes()));
    set(&mut resp, header::CONTENT_TYPE, b"text/plain");
    resp
}

fn reflect(rec: &Recorded) -> Response<RespBody> {
    let values = credentials(rec);
    let mut body = Vec::new();
    for v in &values {
        body.extend_from_slice(b"value: ");
        body.extend_from_slice(&[v.as_slice(); 3].join(&b' '));
        body.push(b'\n');
    }
    let mut resp = response(StatusCode::OK, full(body));
    set(
        &mut resp,
        header::CONTENT_TYPE,
        b"text/plain; charset=utf-8",
    );
    for v in &values {
        add(&mut resp, HeaderName::from_static("x-reflect"), v);
        add(
            &mut resp,
            header::SET_COOKIE,
            &[&b"session="[..], v, b"; Path=/"].concat(),
        );
    }
    resp
}

fn compressed(rec: &Recorded, encoding: &str, body: Vec<u8>) -> Response<RespBody> {
    let mut resp = response(StatusCode::OK, full(body));
    set(&mut resp, header::CONTENT_TYPE, b"application/json");
    set(&mut resp, header::CONTENT_ENCODING, encoding.as_bytes());
    add_echo_headers(&mut resp, rec);
    resp
}

fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data).expect("gzip into a Vec");
    enc.finish().expect("gzip into a Vec")
}

async fn brotli(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut enc = async_compression::tokio::bufread::BrotliEncoder::new(data);
    enc.read_to_end(&mut out).await.expect("brotli into a Vec");
    out
}

async fn brotli_slow(rec: &Recorded, shutdown: &watch::Receiver<()>) -> Response<RespBody> {
    let ms = query_u64(&rec.uri, "ms").unwrap_or(1000);
    let body = brotli(&echo_json(rec)).await;
    let (rest, last) = body.split_at(body.len() - 1);
    let frames = vec![Bytes::copy_from_slice(rest), Bytes::copy_from_slice(last)];
    let mut resp = response(
        StatusCode::OK,
        stream(shutdown, frames, Duration::from_millis(ms)),
    );
    set(&mut resp, header::CONTENT_TYPE, b"application/json");
    set(&mut resp, header::CONTENT_ENCODING, b"br");
    resp
}

fn redirect() -> Response<RespBody> {
    let mut resp = response(StatusCode::FOUND, empty());
    set(
        &mut resp,
        header::LOCATION,
        b"https://other.example.test/landing",
    );
    resp
}

/// 150 header fields: more than an HTTP/1 client parses by default (hyper: 100).
fn many_headers() -> Response<RespBody> {
    let mut resp = response(StatusCode::OK, empty());
    for i in 0..150 {
        let name = http::HeaderName::try_from(format!("x-field-{i}")).expect("name");
        resp.headers_mut()
            .insert(name, http::HeaderValue::from_static("1"));
    }
    resp
}

fn status(path: &str) -> Response<RespBody> {
    let code = path["/status/".len()..].parse::<u16>().ok();
    let code = code
        .filter(|c| (200..600).contains(c))
        .and_then(|c| StatusCode::from_u16(c).ok());
    response(code.unwrap_or(StatusCode::BAD_REQUEST), empty())
}

/// `data: <value>\n\n` five times, each event cut in the middle of the value and before the
/// final newline, e.g. value `Bearer abcd` → `data: Beare` | `r abcd\n` | `\n`.
fn sse(rec: &Recorded, shutdown: &watch::Receiver<()>) -> Response<RespBody> {
    let value = credentials(rec).into_iter().next().unwrap_or_default();
    let frames: Vec<Bytes> = (0..5).flat_map(|_| sse_event_frames(&value)).collect();
    let body = stream(shutdown, frames, Duration::from_millis(20));
    let mut resp = response(StatusCode::OK, body);
    set(&mut resp, header::CONTENT_TYPE, b"text/event-stream");
    set(&mut resp, header::CACHE_CONTROL, b"no-cache");
    resp
}

/// The `x-api-key` of each of the next `n` requests, as events, as they arrive.
fn tail(rec: &Recorded, ctx: &Ctx) -> Response<RespBody> {
    let n = query_u64(&rec.uri, "n").unwrap_or(1) as usize;
    let (tx, rx) = mpsc::channel(4);
    let state = ctx.state.clone();
    let mut next = state.requests().len();
    spawn_until_shutdown(&ctx.shutdown, async move {
        for _ in 0..n {
            let rec = loop {
                if let Some(r) = state.requests().get(next).cloned() {
                    break r;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            };
            next += 1;
            let value = rec.header_values("x-api-key").first().map(|v| v.to_vec());
            let event = [&b"data: "[..], &value.unwrap_or_default(), b"\n\n"].concat();
            if tx.send(Bytes::from(event)).await.is_err() {
                return;
            }
        }
    });
    let mut resp = response(StatusCode::OK, ChannelBody { rx }.boxed());
    set(&mut resp, header::CONTENT_TYPE, b"text/event-stream");
    resp
}

fn sse_event_frames(value: &[u8]) -> Vec<Bytes> {
    let event = [&b"data: "[..], value, b"\n\n"].concat();
    let (mid, end) = (6 + value.len() / 2, event.len() - 1);
    [&event[..mid], &event[mid..end], &event[end..]]
        .into_iter()
        .map(Bytes::copy_from_slice)
        .collect()
}

fn slow(rec: &Recorded, shutdown: &watch::Receiver<()>) -> Response<RespBody> {
    let ms = query_u64(&rec.uri, "ms").unwrap_or(100);
    let chunks = query_u64(&rec.uri, "chunks").unwrap_or(3);
    let frames = (0..chunks)
        .map(|_| Bytes::from_static(&[b's'; 1024]))
        .collect();
    let mut resp = response(
        StatusCode::OK,
        stream(shutdown, frames, Duration::from_millis(ms)),
    );
    set(&mut resp, header::CONTENT_TYPE, b"application/octet-stream");
    if rec.uri.contains("length") {
        // Announced, so a proxy may read it whole before it answers.
        let length = (chunks * 1024).to_string();
        set(&mut resp, header::CONTENT_LENGTH, length.as_bytes());
    }
    resp
}

fn keep_alives(rec: &Recorded, shutdown: &watch::Receiver<()>) -> Response<RespBody> {
    let ms = query_u64(&rec.uri, "ms").unwrap_or(300);
    let n = query_u64(&rec.uri, "n").unwrap_or(4);
    let mut frames: Vec<Bytes> = (0..n).map(|_| Bytes::from_static(b"0005\x01")).collect();
    frames.push(Bytes::from_static(b"0000"));
    let body = stream(shutdown, frames, Duration::from_millis(ms));
    let mut resp = response(StatusCode::OK, body);
    set(
        &mut resp,
        header::CONTENT_TYPE,
        b"application/x-git-upload-pack-result",
    );
    resp
}

fn big(rec: &Recorded, shutdown: &watch::Receiver<()>) -> Response<RespBody> {
    const CHUNK: u64 = 16 * 1024;
    let total = query_u64(&rec.uri, "bytes").unwrap_or(0);
    let (tx, rx) = mpsc::channel(4);
    spawn_until_shutdown(shutdown, async move {
        let chunk = Bytes::from(vec![b'a'; CHUNK as usize]);
        let mut left = total;
        while left > 0 {
            let n = left.min(CHUNK);
            if tx.send(chunk.slice(..n as usize)).await.is_err() {
                return;
            }
            left -= n;
        }
    });
    let mut resp = response(StatusCode::OK, ChannelBody { rx }.boxed());
    set(&mut resp, header::CONTENT_TYPE, b"application/octet-stream");
    set(
        &mut resp,
        header::CONTENT_LENGTH,
        total.to_string().as_bytes(),
    );
    resp
}

fn query_u64(uri: &str, key: &str) -> Option<u64> {
    let query = uri.split_once('?')?.1;
    query.split('&').find_map(|kv| match kv.split_once('=') {
        Some((k, v)) if k == key => v.parse().ok(),
        _ => None,
    })
}

// ---------------------------------------------------------------------------------------------
// WebSocket

fn websocket(
    rec: &Recorded,
    upgrade: Option<OnUpgrade>,
    shutdown: &watch::Receiver<()>,
) -> Response<RespBody> {
    let key = rec
        .header_values("sec-websocket-key")
        .first()
        .map(|k| k.to_vec());
    let (Some(key), Some(upgrade)) = (key, upgrade) else {
        return response(
            StatusCode::BAD_REQUEST,
            full(b"websocket handshake expected".to_vec()),
        );
    };
    // `/ws?greet`: first a text message echoing the upgrade's `x-api-key` (as a hostile
    // upstream would hand a value back), then whole and in two fragments (the value split).
    let greet = rec
        .uri
        .contains("greet")
        .then(|| rec.header("x-api-key").unwrap_or_default());
    spawn_until_shutdown(shutdown, websocket_echo(upgrade, greet));
    let mut resp = response(StatusCode::SWITCHING_PROTOCOLS, empty());
    set(&mut resp, header::UPGRADE, b"websocket");
    set(&mut resp, header::CONNECTION, b"Upgrade");
    set(
        &mut resp,
        header::SEC_WEBSOCKET_ACCEPT,
        derive_accept_key(&key).as_bytes(),
    );
    resp
}

/// Echoes text and binary messages until the peer closes; tungstenite answers pings and the
/// close handshake by itself while we keep reading.
async fn websocket_echo(upgrade: OnUpgrade, greet: Option<String>) {
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::Message;
    let Ok(upgraded) = upgrade.await else { return };
    let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
    if let Some(key) = greet {
        let text = format!("key={key}");
        let (one, two) = text.as_bytes().split_at(text.len() / 2);
        let first = Frame::message(one.to_vec(), OpCode::Data(Data::Text), false);
        let second = Frame::message(two.to_vec(), OpCode::Data(Data::Continue), true);
        let sent = async {
            ws.send(Message::Text(text.clone())).await?;
            ws.send(Message::Frame(first)).await?;
            ws.send(Message::Frame(second)).await
        };
        if sent.await.is_err() {
            return;
        }
    }
    while let Some(Ok(msg)) = ws.next().await {
        if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Bodies and response helpers

/// A response body fed by a task through a bounded channel (backpressure included); it ends
/// when the sender is dropped.
struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.rx
            .poll_recv(cx)
            .map(|chunk| chunk.map(|data| Ok(Frame::data(data))))
    }
}

/// Sends `frames` as separate body frames, sleeping `gap` between consecutive ones.
fn stream(shutdown: &watch::Receiver<()>, frames: Vec<Bytes>, gap: Duration) -> RespBody {
    let (tx, rx) = mpsc::channel(1);
    spawn_until_shutdown(shutdown, async move {
        for (i, frame) in frames.into_iter().enumerate() {
            if i > 0 {
                tokio::time::sleep(gap).await;
            }
            if tx.send(frame).await.is_err() {
                return;
            }
        }
    });
    ChannelBody { rx }.boxed()
}

fn full(data: Vec<u8>) -> RespBody {
    Full::new(Bytes::from(data))
        .map_err(|never| match never {})
        .boxed()
}

fn empty() -> RespBody {
    full(Vec::new())
}

fn response(status: StatusCode, body: RespBody) -> Response<RespBody> {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    resp
}

/// Sets header `name`; values come from request headers or literals, so they are valid.
fn set(resp: &mut Response<RespBody>, name: HeaderName, value: &[u8]) {
    if let Ok(value) = HeaderValue::from_bytes(value) {
        resp.headers_mut().insert(name, value);
    }
}

fn add(resp: &mut Response<RespBody>, name: HeaderName, value: &[u8]) {
    if let Ok(value) = HeaderValue::from_bytes(value) {
        resp.headers_mut().append(name, value);
    }
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}
