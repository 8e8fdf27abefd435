//! A test client that speaks to sealgate the way a sandbox does: CONNECT with proxy
//! credentials, TLS trusting only the sandbox CA, then h1 or h2 requests.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{pem::PemObject, CertificateDer, ServerName};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// What a sandbox holds: proxy credentials, its CA and its env.
#[derive(Clone)]
pub struct SandboxCreds {
    pub id: String,
    pub proxy_token: String,
    pub ca_pem: String,
    pub env: Value,
    pub proxy_env: Value,
}

impl SandboxCreds {
    /// Parses a `POST /v1/sandboxes` answer.
    pub fn from_answer(v: &Value) -> Self {
        let url = v["proxy_env"]["HTTPS_PROXY"].as_str().unwrap();
        let creds = url.trim_start_matches("http://").split('@').next().unwrap();
        let (id, tok) = creds.split_once(':').unwrap();
        SandboxCreds {
            id: id.into(),
            proxy_token: tok.into(),
            ca_pem: v["ca_cert_pem"].as_str().unwrap().into(),
            env: v["env"].clone(),
            proxy_env: v["proxy_env"].clone(),
        }
    }

    /// The sealed token of a secret.
    pub fn token(&self, name: &str) -> String {
        self.env[name].as_str().unwrap().to_owned()
    }

    /// `Proxy-Authorization` value.
    pub fn proxy_auth(&self) -> String {
        basic(&self.id, &self.proxy_token)
    }
}

/// `Basic base64(user:pass)`.
pub fn basic(user: &str, pass: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

/// A CONNECT answer that was not 200.
#[derive(Debug)]
pub struct Refused {
    pub status: u16,
    pub head: String,
    pub body: String,
}

/// How long [`connect`] waits for the proxy's answer to CONNECT (generous: a hang, not a slow
/// machine, must fail).
pub const CONNECT_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

/// Sends `CONNECT target` with optional proxy auth; Ok(stream) on 200.
pub async fn connect(
    proxy: SocketAddr,
    auth: Option<&str>,
    target: &str,
) -> Result<TcpStream, Refused> {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    let mut head = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some(a) = auth {
        head.push_str(&format!("Proxy-Authorization: {a}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    // A proxy that never answers the CONNECT fails the test instead of hanging it.
    let (status, head, body) = tokio::time::timeout(CONNECT_DEADLINE, read_response_head(&mut s))
        .await
        .unwrap_or_else(|_| panic!("no CONNECT answer for {target} within {CONNECT_DEADLINE:?}"));
    if status == 200 {
        return Ok(s);
    }
    Err(Refused { status, head, body })
}

/// Reads a response head (and a Content-Length body, if any) byte by byte: (status, head,
/// body); status 0 when the stream ended first.
pub async fn read_response_head<S>(s: &mut S) -> (u16, String, String)
where
    S: tokio::io::AsyncRead + Unpin,
{
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte).await {
            Ok(1) => buf.push(byte[0]),
            _ => break,
        }
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let len = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse::<usize>().unwrap_or(0))
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    if len > 0 {
        let _ = s.read_exact(&mut body).await;
    }
    (status, head, String::from_utf8_lossy(&body).into_owned())
}

/// TLS over an open tunnel, trusting only `ca_pem`, with `sni` and ALPN.
pub async fn tls(
    stream: TcpStream,
    ca_pem: &str,
    sni: &str,
    alpn: &[&[u8]],
) -> std::io::Result<TlsStream<TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    #[allow(deprecated)] // as in src/tls_provider.rs
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    let name = ServerName::try_from(sni.to_owned()).unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, stream)
        .await
}

/// A collected response.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Answer {
    /// Body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
    /// Body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    /// The `x-sealgate-error` code.
    pub fn code(&self) -> Option<String> {
        self.headers
            .get("x-sealgate-error")
            .map(|v| v.to_str().unwrap().to_owned())
    }
}

async fn collect(resp: Response<hyper::body::Incoming>) -> Answer {
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// An h1 connection through the proxy to `target` (host:port) with SNI = host.
pub async fn h1(proxy: SocketAddr, sb: &SandboxCreds, target: &str) -> http1::SendRequest<ReqBody> {
    let tcp = connect(proxy, Some(&sb.proxy_auth()), target)
        .await
        .expect("CONNECT accepted");
    let host = target.rsplit_once(':').unwrap().0;
    let tls = tls(tcp, &sb.ca_pem, host, &[b"http/1.1"])
        .await
        .expect("TLS with sandbox CA");
    let (send, conn) = http1::handshake(TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn.with_upgrades());
    send
}

/// An h2 connection through the proxy.
pub async fn h2(proxy: SocketAddr, sb: &SandboxCreds, target: &str) -> http2::SendRequest<ReqBody> {
    let tcp = connect(proxy, Some(&sb.proxy_auth()), target)
        .await
        .expect("CONNECT accepted");
    let host = target.rsplit_once(':').unwrap().0;
    let tls = tls(tcp, &sb.ca_pem, host, &[b"h2"])
        .await
        .expect("TLS with sandbox CA");
    assert_eq!(
        tls.get_ref().1.alpn_protocol(),
        Some(&b"h2"[..]),
        "h2 negotiated"
    );
    let (send, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

/// Sends one h1 request and collects the answer.
pub async fn send1(c: &mut http1::SendRequest<ReqBody>, req: Request<ReqBody>) -> Answer {
    c.ready().await.unwrap();
    collect(c.send_request(req).await.unwrap()).await
}

/// Sends one h2 request and collects the answer.
pub async fn send2(c: &mut http2::SendRequest<ReqBody>, req: Request<ReqBody>) -> Answer {
    c.ready().await.unwrap();
    collect(c.send_request(req).await.unwrap()).await
}

/// GET with extra headers.
pub fn get(uri: &str, host: &str, headers: &[(&str, &str)]) -> Request<ReqBody> {
    let mut b = Request::builder().method("GET").uri(uri);
    if !host.is_empty() {
        b = b.header("host", host);
    }
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(full(Bytes::new())).unwrap()
}

/// POST with a body and extra headers.
pub fn post(
    uri: &str,
    host: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Request<ReqBody> {
    let mut b = Request::builder().method("POST").uri(uri);
    if !host.is_empty() {
        b = b.header("host", host);
    }
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(full(body.into())).unwrap()
}

/// Request body type of the test client.
pub type ReqBody = BoxBody<Bytes, std::convert::Infallible>;

/// A complete body.
pub fn full(b: Bytes) -> ReqBody {
    Full::new(b).boxed()
}

/// A body sent as separate frames, each written after a short pause so the proxy reads them
/// as separate TLS records / DATA frames.
pub fn chunked(chunks: Vec<Bytes>) -> ReqBody {
    let s = futures_util::stream::unfold(chunks.into_iter(), |mut it| async move {
        let c = it.next()?;
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        Some((
            Ok::<_, std::convert::Infallible>(http_body::Frame::data(c)),
            it,
        ))
    });
    StreamBody::new(s).boxed()
}

/// A body of `chunks`, each written `gap` after the one before (the first at once).
pub fn paced(chunks: Vec<Bytes>, gap: std::time::Duration) -> ReqBody {
    paced_from(chunks, gap, gap)
}

/// [`paced`], with `second` between the first chunk and the second (an HTTP/1.1 upload that
/// pauses there past `proxy::unframed::WAIT` streams instead of being read ahead).
pub fn paced_from(
    chunks: Vec<Bytes>,
    second: std::time::Duration,
    gap: std::time::Duration,
) -> ReqBody {
    let s = futures_util::stream::unfold((chunks.into_iter(), 0), move |(mut it, i)| async move {
        let c = it.next()?;
        match i {
            0 => {}
            1 => tokio::time::sleep(second).await,
            _ => tokio::time::sleep(gap).await,
        }
        Some((
            Ok::<_, std::convert::Infallible>(http_body::Frame::data(c)),
            (it, i + 1),
        ))
    });
    StreamBody::new(s).boxed()
}

/// POST with a streamed (chunked) body.
pub fn post_chunked(
    uri: &str,
    host: &str,
    headers: &[(&str, &str)],
    chunks: Vec<Bytes>,
) -> Request<ReqBody> {
    let mut b = Request::builder().method("POST").uri(uri);
    if !host.is_empty() {
        b = b.header("host", host);
    }
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(chunked(chunks)).unwrap()
}
