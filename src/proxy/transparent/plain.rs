//! Plain HTTP on a redirected connection (port 80, or another port whose first byte is an HTTP
//! method's): the destination is the first request's `Host` (its port must be the original
//! destination port), then the connection is served by [`intercept::serve_http`] with
//! [`Scheme::Http`], which never unseals and refuses (421) any later request naming another
//! host.
//!
//! The request head is read into a buffer (bounded by `max_header_bytes`, `max_header_fields`
//! and `header_read_timeout`, however many segments it spans — the same limits the framing
//! guard applies after it) and replayed to hyper through [`Rewind`], so hyper parses exactly
//! the bytes the sandbox sent. Every refusal here — the head, the `Host`, the admission step —
//! is recorded once, in [`serve`]; a refused head is answered raw (hyper, given a head it
//! cannot parse, answered its own bare 400), the others by [`reply_once`].

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;

use super::TransparentError;
use crate::policy::{self, Dest, Scheme};
use crate::proxy::admit::admit;
use crate::proxy::intercept;
use crate::proxy::outcome::{self, Attempt};
use crate::proxy::refusal::{answer_once, answer_raw, Code, Refusal};
use crate::proxy::rewind::Rewind;
use crate::proxy::serve::Protocols;
use crate::proxy::{ListenerKind, LiveSettings, ProxyState};
use crate::sandbox::Sandbox;

/// Serves one redirected plain-HTTP connection.
///
/// # Errors
/// The head could not be read (timeout, too large, not HTTP) or the request was refused.
pub async fn serve(
    state: Arc<ProxyState>,
    live: Arc<LiveSettings>,
    sandbox: Arc<Sandbox>,
    mut tcp: TcpStream,
    orig: SocketAddr,
) -> Result<(), TransparentError> {
    let mut at = Attempt::connection(ListenerKind::Transparent, "HTTP");
    at.sandbox = Some(sandbox.clone());
    at.host = orig.to_string();
    let limit = live.proxy.max_header_bytes.max(1024);
    let read = read_head(&mut tcp, limit, live.proxy.max_header_fields);
    let head = tokio::time::timeout(live.proxy.header_read_timeout, read)
        .await
        .map_err(|_| TransparentError::Head("timed out".into()))?;
    let (buf, host) = match head {
        Ok(x) => x,
        Err(HeadError::Io(e)) => return Err(TransparentError::Head(e.to_string())),
        Err(HeadError::Refused(r, head)) => {
            record(&state, at, &head, &r);
            answer_raw(tcp, &r).await;
            return Err(TransparentError::Refused(r.message));
        }
    };
    let stream = Rewind::new(buf.clone(), tcp);
    let admitted = dest_for(&host, orig).and_then(|dest| {
        at.host = dest.authority();
        admit(
            &state,
            &live,
            &sandbox,
            dest,
            Scheme::Http,
            ListenerKind::Transparent,
        )
    });
    let tunnel = match admitted {
        Ok(t) => t,
        Err(r) => {
            record(&state, at, &buf, &r);
            return reply_once(stream, r).await;
        }
    };
    intercept::serve_http(live, tunnel, stream, Protocols::Http1).await;
    Ok(())
}

/// The destination named by `Host`; its port (80 when absent) must be the original port.
fn dest_for(host: &str, orig: SocketAddr) -> Result<Dest, Refusal> {
    let dest = policy::parse_authority(host, Some(80))
        .map_err(|e| Refusal::new(Code::BadRequest, format!("Host header: {e}")))?;
    if dest.port != orig.port() {
        return Err(Refusal::new(
            Code::AuthorityMismatch,
            format!(
                "Host names port {} but the connection was to port {}",
                dest.port,
                orig.port()
            ),
        ));
    }
    Ok(dest)
}

enum HeadError {
    Io(io::Error),
    /// Why the head is refused (answered raw: hyper is not given a head it may not parse),
    /// and what of it was read.
    Refused(Refusal, Bytes),
}

/// Reads until the first request head is complete; returns the bytes read and its one `Host`.
async fn read_head(
    tcp: &mut TcpStream,
    limit: usize,
    max_fields: usize,
) -> Result<(Bytes, String), HeadError> {
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        if tcp.read_buf(&mut buf).await.map_err(HeadError::Io)? == 0 {
            return Err(HeadError::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        match parse_host(&buf, max_fields) {
            Ok(Some(host)) => return Ok((buf.freeze(), host)),
            Ok(None) if buf.len() <= limit => {}
            Ok(None) => {
                let r = Refusal::new(
                    Code::HeadersTooLarge,
                    "request head exceeds proxy.max_header_bytes",
                );
                return Err(HeadError::Refused(r, buf.freeze()));
            }
            Err(r) => return Err(HeadError::Refused(r, buf.freeze())),
        }
    }
}

/// `Ok(None)` while the head is incomplete; the single `Host` value once it is complete.
///
/// # Errors
/// Not HTTP/1.x, more than `max_fields` header fields, no `Host`, several `Host` headers, or
/// a non-ASCII `Host`.
pub fn parse_host(buf: &[u8], max_fields: usize) -> Result<Option<String>, Refusal> {
    let mut headers = vec![httparse::EMPTY_HEADER; max_fields.max(1)];
    let mut req = httparse::Request::new(&mut headers);
    let bad = |m: &str| Refusal::new(Code::BadRequest, m);
    match req.parse(buf) {
        Ok(httparse::Status::Partial) => return Ok(None),
        Ok(httparse::Status::Complete(_)) => {}
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Refusal::new(
                Code::HeadersTooLarge,
                "more header fields than proxy.max_header_fields",
            ))
        }
        Err(e) => return Err(bad(&format!("malformed HTTP request: {e}"))),
    }
    let mut hosts = req
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("host"));
    let (Some(first), None) = (hosts.next(), hosts.next()) else {
        return Err(bad("plain HTTP needs exactly one Host header"));
    };
    let host = std::str::from_utf8(first.value)
        .ok()
        .filter(|s| s.is_ascii())
        .ok_or_else(|| bad("Host header is not ASCII"))?;
    Ok(Some(host.trim().to_owned()))
}

/// Records the refusal of the request `head` begins, with its method, its path and the
/// length of the answer it gets.
fn record(state: &ProxyState, at: Attempt<'_>, head: &[u8], r: &Refusal) {
    let (method, path) = request_line(head);
    let at = Attempt {
        method: &method,
        path: &path,
        bytes_down: r.answer_len(),
        ..at
    };
    outcome::refuse(state, &at, r);
}

/// The method and the path (without the query, as every audit line has it) of a head
/// [`parse_host`] found complete; `HTTP` and an empty path if it cannot tell.
fn request_line(head: &[u8]) -> (String, String) {
    let mut headers = [httparse::EMPTY_HEADER; 0];
    let mut req = httparse::Request::new(&mut headers);
    // Fields are not needed: a partial parse has the method and target once the line is read.
    let _ = req.parse(head);
    let method = req.method.unwrap_or("HTTP").to_owned();
    let target = req.path.unwrap_or("");
    let path = match target.parse::<http::Uri>() {
        Ok(uri) => uri.path().to_owned(),
        Err(_) => String::new(),
    };
    (method, path)
}

/// Answers the first request with the refusal (see [`answer_once`]); the connection ends.
async fn reply_once<S>(stream: S, r: Refusal) -> Result<(), TransparentError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let message = r.message.clone();
    answer_once(stream, r).await;
    Err(TransparentError::Refused(message))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn orig80() -> SocketAddr {
        "198.18.0.1:80".parse().unwrap()
    }

    #[test]
    fn a_refused_heads_line_gives_its_method_and_path_without_the_query() {
        let head = b"POST /v1/x?key=osb_sealed_abc HTTP/1.1\r\nHost: a.x\r\nA: b\r\n\r\n";
        assert_eq!(request_line(head), ("POST".into(), "/v1/x".into()));
        let absolute = b"GET http://a.x/p?q HTTP/1.1\r\nHost: a.x\r\n\r\n";
        assert_eq!(request_line(absolute), ("GET".into(), "/p".into()));
        assert_eq!(request_line(b"\x16\x03"), ("HTTP".into(), String::new()));
    }

    #[test]
    fn host_is_taken_from_a_complete_head_only() {
        assert_eq!(
            parse_host(b"GET / HTTP/1.1\r\nHost: a.x", 100).unwrap(),
            None
        );
        let h = parse_host(b"GET / HTTP/1.1\r\nHost: A.x\r\n\r\n", 100).unwrap();
        assert_eq!(h.as_deref(), Some("A.x"));
    }

    #[test]
    fn missing_or_duplicate_host_is_refused() {
        assert!(parse_host(b"GET / HTTP/1.1\r\nX: y\r\n\r\n", 100).is_err());
        assert!(parse_host(b"GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n", 100).is_err());
        assert!(parse_host(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 100).is_err());
    }

    #[test]
    fn the_header_field_limit_is_the_configured_one() {
        let head = |n: usize| {
            let fields: String = (0..n).map(|i| format!("X{i}: 1\r\n")).collect();
            format!("GET / HTTP/1.1\r\nHost: a.x\r\n{fields}\r\n").into_bytes()
        };
        assert!(parse_host(&head(9), 10).unwrap().is_some());
        let r = parse_host(&head(10), 10).unwrap_err();
        assert_eq!(r.code, Code::HeadersTooLarge);
    }

    #[test]
    fn host_port_must_match_the_original_port() {
        assert_eq!(dest_for("a.x", orig80()).unwrap().authority(), "a.x:80");
        assert_eq!(dest_for("A.X:80", orig80()).unwrap().authority(), "a.x:80");
        let r = dest_for("a.x:8080", orig80()).unwrap_err();
        assert_eq!(r.code, Code::AuthorityMismatch);
        assert_eq!(
            dest_for("a@b", orig80()).unwrap_err().code,
            Code::BadRequest
        );
    }
}
