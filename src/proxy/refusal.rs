//! The refusal type ([`Refusal`], [`Code`]) and the one place that turns a refusal into the
//! response a sandbox sees (DESIGN.md §5).
//!
//! Invariant: messages name hosts and secret *names*, never values; every refusal carries
//! `content-type: application/json`, the JSON error body and `x-sealgate-error: <code>`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::ProxyBody;

/// The header naming the refusal code; only sealgate's own refusals carry it (an upstream's is
/// stripped).
pub const ERROR_HEADER: HeaderName = HeaderName::from_static("x-sealgate-error");

/// Why a request or tunnel was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    /// 407: missing or wrong proxy credentials.
    ProxyAuthRequired,
    /// 403: destination outside the allowlist or not a public address.
    EgressDenied,
    /// 403: a known token's secret may not go to this host.
    SecretHostDenied,
    /// 421: request names another host than its tunnel.
    AuthorityMismatch,
    /// 400: malformed request.
    BadRequest,
    /// 413: body too large.
    PayloadTooLarge,
    /// 431: header section too large.
    HeadersTooLarge,
    /// 429: too many tunnels for this sandbox.
    TooManyTunnels,
    /// 429: too many connections for this sandbox (`max_connections_per_sandbox`).
    TooManyConnections,
    /// 429: too many requests of this sandbox in flight (`max_requests_per_sandbox`).
    TooManyRequests,
    /// 429: too many upstream connections of this sandbox open, in use or idle
    /// (`[upstream] max_connections_per_sandbox`).
    TooManyUpstreamConnections,
    /// 405: method not supported inside a tunnel (inner CONNECT).
    MethodNotAllowed,
    /// 502: upstream certificate not trusted / TLS failed.
    UpstreamTlsError,
    /// 502: upstream could not be reached or broke the exchange.
    UpstreamUnreachable,
    /// 504: upstream too slow.
    UpstreamTimeout,
    /// 408: the sandbox's own request body stopped for `upstream.response_timeout_secs`.
    RequestTimeout,
    /// 503: the proxy is shutting down or at its connection limit.
    Unavailable,
    /// 403: the sandbox was deleted or expired while its connection was open.
    SandboxEnded,
    /// 499 (nginx's "client closed request"): the client's connection ended before the
    /// answer. Never seen by a client: it is how the audit line is told (no code, as for a
    /// request whose future was dropped).
    ClientGone,
}

impl Code {
    /// The machine-readable code.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::ProxyAuthRequired => "proxy_auth_required",
            Code::EgressDenied => "egress_denied",
            Code::SecretHostDenied => "secret_host_denied",
            Code::AuthorityMismatch => "authority_mismatch",
            Code::BadRequest => "bad_request",
            Code::PayloadTooLarge | Code::HeadersTooLarge => "request_too_large",
            Code::TooManyTunnels => "too_many_tunnels",
            Code::TooManyConnections => "too_many_connections",
            Code::TooManyRequests => "too_many_requests",
            Code::TooManyUpstreamConnections => "too_many_upstream_connections",
            Code::MethodNotAllowed => "method_not_allowed",
            Code::UpstreamTlsError => "upstream_tls_error",
            Code::UpstreamUnreachable => "upstream_unreachable",
            Code::UpstreamTimeout => "upstream_timeout",
            Code::RequestTimeout => "request_timeout",
            Code::Unavailable => "unavailable",
            Code::SandboxEnded => "sandbox_ended",
            Code::ClientGone => "client_gone",
        }
    }

    /// The HTTP status.
    pub fn status(self) -> StatusCode {
        match self {
            Code::ProxyAuthRequired => StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            Code::EgressDenied | Code::SecretHostDenied | Code::SandboxEnded => {
                StatusCode::FORBIDDEN
            }
            Code::AuthorityMismatch => StatusCode::MISDIRECTED_REQUEST,
            Code::BadRequest => StatusCode::BAD_REQUEST,
            Code::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Code::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Code::TooManyTunnels
            | Code::TooManyConnections
            | Code::TooManyRequests
            | Code::TooManyUpstreamConnections => StatusCode::TOO_MANY_REQUESTS,
            Code::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Code::UpstreamTlsError | Code::UpstreamUnreachable => StatusCode::BAD_GATEWAY,
            Code::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Code::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::ClientGone => StatusCode::from_u16(499).expect("499 is a status"),
        }
    }
}

/// A refusal: code plus a message for the sandbox (and the audit log's `rule`).
#[derive(Clone, Debug)]
pub struct Refusal {
    /// The code.
    pub code: Code,
    /// Human message (hosts and secret names only).
    pub message: String,
}

impl Refusal {
    /// A refusal with `code` and `message`.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Refusal {
            code,
            message: message.into(),
        }
    }

    /// The response the sandbox sees.
    pub fn into_response(self) -> Response<ProxyBody> {
        error_response(self.code, &self.message)
    }

    /// The length of the body [`Refusal::into_response`] answers with (the audit line's
    /// `bytes_down` for a refusal that is answered).
    pub fn answer_len(&self) -> u64 {
        error_body(self.code, &self.message).len() as u64
    }
}

/// How long a refused plain-HTTP connection may take to receive its answer.
const ANSWER_DEADLINE: Duration = Duration::from_secs(5);

/// Answers the first HTTP/1 request on `stream` with the refusal (the uniform error response)
/// and closes it, for refusals made before hyper serves the connection.
///
/// hyper parses the request head; when even hyper cannot (not HTTP at all), the connection
/// closes without an answer. Either way it is over within [`ANSWER_DEADLINE`].
pub async fn answer_once<S>(stream: S, r: Refusal)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |_req| {
        let resp = r.clone().into_response();
        async move { Ok::<_, std::convert::Infallible>(resp) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), svc);
    let _ = tokio::time::timeout(ANSWER_DEADLINE, conn).await;
}

/// At most this many connections refused before they are served (the daemon's connection
/// cap) are being answered at once; past it one is closed unanswered, as all were before:
/// answering must not become what a flood of connections exhausts.
const MAX_UNSERVED_ANSWERS: usize = 64;

/// How long answering one such connection may take, its reading of the client's bytes
/// included.
const UNSERVED_ANSWER_DEADLINE: Duration = Duration::from_secs(1);

static UNSERVED_ANSWERS: AtomicUsize = AtomicUsize::new(0);

/// Answers an explicit-proxy connection refused before hyper serves it (the daemon's
/// `proxy.max_connections`) with the uniform HTTP/1.1 refusal, then closes it. The answer is
/// written at once, before the request is read; what the client sent is then read and
/// dropped until it closes, so that closing with unread input does not reset the connection
/// and take the answer with it. Bounded by [`MAX_UNSERVED_ANSWERS`] and
/// [`UNSERVED_ANSWER_DEADLINE`]; the connection is closed unanswered past either (it got a
/// bare reset before; outside review).
pub fn answer_unserved(tcp: TcpStream, r: &Refusal) {
    if UNSERVED_ANSWERS.fetch_add(1, Ordering::AcqRel) >= MAX_UNSERVED_ANSWERS {
        UNSERVED_ANSWERS.fetch_sub(1, Ordering::AcqRel);
        return;
    }
    let raw = raw_answer(r);
    tokio::spawn(async move {
        let _ = tokio::time::timeout(UNSERVED_ANSWER_DEADLINE, write_then_drain(tcp, raw)).await;
        UNSERVED_ANSWERS.fetch_sub(1, Ordering::AcqRel);
    });
}

/// Writes the uniform refusal to `stream` as raw HTTP/1.1 bytes, without reading a request
/// first, then reads and drops what the client still sends (as [`answer_unserved`]), within
/// [`ANSWER_DEADLINE`]: for a head sealgate refused because it is not one hyper would parse
/// (replayed to hyper, it got hyper's bare 400; outside re-check, transparent plain HTTP).
pub async fn answer_raw<S>(stream: S, r: &Refusal)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let _ = tokio::time::timeout(ANSWER_DEADLINE, write_then_drain(stream, raw_answer(r))).await;
}

async fn write_then_drain<S>(mut tcp: S, raw: Vec<u8>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if tcp.write_all(&raw).await.is_err() || tcp.shutdown().await.is_err() {
        return;
    }
    let mut sink = [0u8; 4096];
    let mut left = 64 * 1024usize;
    while let Ok(n @ 1..) = tcp.read(&mut sink).await {
        left = match left.checked_sub(n) {
            Some(l) => l,
            None => return,
        };
    }
}

/// The uniform refusal as raw HTTP/1.1 bytes (for a connection hyper does not serve).
fn raw_answer(r: &Refusal) -> Vec<u8> {
    let body = error_body(r.code, &r.message);
    let status = r.code.status();
    let head = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\n{ERROR_HEADER}: {}\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        r.code.as_str(),
        body.len()
    );
    [head.as_bytes(), &body].concat()
}

/// The uniform error body: `{"error": {"code", "message"}}`.
fn error_body(code: Code, message: &str) -> Bytes {
    let body = serde_json::json!({"error": {"code": code.as_str(), "message": message}});
    Bytes::from(serde_json::to_vec(&body).unwrap_or_default())
}

/// Builds the uniform error response.
pub fn error_response(code: Code, message: &str) -> Response<ProxyBody> {
    let bytes = error_body(code, message);
    let mut resp = Response::new(
        Full::new(bytes)
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *resp.status_mut() = code.status();
    let h = resp.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(ERROR_HEADER, HeaderValue::from_static(code.as_str()));
    if code == Code::ProxyAuthRequired {
        h.insert(
            http::header::PROXY_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"sealgate\""),
        );
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::Code;

    /// Every code a sandbox can see is in the README's table, with its status.
    #[test]
    fn the_readme_lists_every_code_with_its_status() {
        let readme = include_str!("../../README.md");
        let all = [
            Code::ProxyAuthRequired,
            Code::EgressDenied,
            Code::SecretHostDenied,
            Code::AuthorityMismatch,
            Code::BadRequest,
            Code::PayloadTooLarge,
            Code::HeadersTooLarge,
            Code::TooManyTunnels,
            Code::TooManyConnections,
            Code::TooManyRequests,
            Code::TooManyUpstreamConnections,
            Code::MethodNotAllowed,
            Code::UpstreamTlsError,
            Code::UpstreamUnreachable,
            Code::UpstreamTimeout,
            Code::Unavailable,
            Code::SandboxEnded,
        ];
        for code in all {
            let row = readme
                .lines()
                .find(|l| l.starts_with("  | `") && l.contains(&format!("`{}`", code.as_str())))
                .unwrap_or_else(|| panic!("{} is not in the README's table", code.as_str()));
            assert!(
                row.contains(code.status().as_str()),
                "{}: {row}",
                code.as_str()
            );
        }
    }
}
