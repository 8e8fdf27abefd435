//! A hostile TLS origin on loopback: it answers each request with whatever a test computes
//! from the request it received (the real, unsealed values included).
//!
//! - [`Hostile::h1`] offers only `http/1.1` and writes the test's bytes verbatim: reason
//!   phrases, header names, stacked codings, trailers — anything no server library would
//!   produce. One request per connection: the connection is closed after each answer, so
//!   close-delimited bodies work too.
//! - [`Hostile::h2`] offers only `h2` and serves through hyper's h2 server, for h2 header
//!   names and trailers.
//!
//! Dropping it stops the listener and every connection.
#![allow(dead_code)] // shared by many tests; each test binary module uses a different subset

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body::Frame;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, StreamBody};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

/// The request head an answer is computed from.
#[derive(Clone, Debug)]
pub struct Head {
    /// `GET`, `HEAD`, …
    pub method: String,
    /// The request target.
    pub path: String,
    /// Header fields, names lowercased, in order.
    pub headers: Vec<(String, String)>,
}

impl Head {
    /// The first value of header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Raw bytes answering an h1 request.
pub type H1Answer = Arc<dyn Fn(&Head) -> Vec<u8> + Send + Sync>;
/// An h2 response (the body may end with trailers, see [`body`]).
pub type H2Answer = Arc<dyn Fn(&Head) -> Response<H2Body> + Send + Sync>;
/// The h2 response body type.
pub type H2Body = BoxBody<Bytes, Infallible>;

/// A running hostile origin.
pub struct Hostile {
    /// Where it listens.
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Hostile {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Hostile {
    /// An h1 origin writing `answer(head)` verbatim (the TLS config should offer `http/1.1`).
    ///
    /// # Panics
    /// If binding a loopback port fails.
    pub async fn h1(
        tls: Arc<rustls::ServerConfig>,
        answer: impl Fn(&Head) -> Vec<u8> + Send + Sync + 'static,
    ) -> Hostile {
        let answer: H1Answer = Arc::new(answer);
        start(tls, move |tcp, acceptor| {
            serve_h1(tcp, acceptor, answer.clone())
        })
        .await
    }

    /// An h2 origin answering with `answer(head)` (the TLS config should offer `h2`).
    ///
    /// # Panics
    /// If binding a loopback port fails.
    pub async fn h2(
        tls: Arc<rustls::ServerConfig>,
        answer: impl Fn(&Head) -> Response<H2Body> + Send + Sync + 'static,
    ) -> Hostile {
        let answer: H2Answer = Arc::new(answer);
        start(tls, move |tcp, acceptor| {
            serve_h2(tcp, acceptor, answer.clone())
        })
        .await
    }
}

/// A body of `data` then, if any, `trailers`.
pub fn body(data: Vec<u8>, trailers: Option<HeaderMap>) -> H2Body {
    let frames = [
        Some(Frame::data(Bytes::from(data))),
        trailers.map(Frame::trailers),
    ];
    let frames = frames.into_iter().flatten().map(Ok::<_, Infallible>);
    StreamBody::new(futures_util::stream::iter(frames)).boxed()
}

async fn start<F, Fut>(tls: Arc<rustls::ServerConfig>, serve: F) -> Hostile
where
    F: Fn(TcpStream, TlsAcceptor) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind hostile origin");
    let addr = listener.local_addr().expect("hostile origin address");
    let acceptor = TlsAcceptor::from(tls);
    let task = tokio::spawn(async move {
        let mut conns = JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    if let Ok((tcp, _)) = accepted {
                        conns.spawn(serve(tcp, acceptor.clone()));
                    }
                }
                Some(_) = conns.join_next() => {}
            }
        }
    });
    Hostile { addr, task }
}

async fn serve_h1(tcp: TcpStream, acceptor: TlsAcceptor, answer: H1Answer) {
    let Ok(mut tls) = acceptor.accept(tcp).await else {
        return;
    };
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head = loop {
        match tls.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        if let Some(head) = parse_head(&buf) {
            break head;
        }
    };
    let _ = tls.write_all(&answer(&head)).await;
    let _ = tls.shutdown().await;
}

/// The head in `buf`, once complete (request bodies are not read: tests send none).
fn parse_head(buf: &[u8]) -> Option<Head> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(_)) => Some(Head {
            method: req.method.unwrap_or_default().to_owned(),
            path: req.path.unwrap_or_default().to_owned(),
            headers: req
                .headers
                .iter()
                .map(|h| {
                    let value = String::from_utf8_lossy(h.value).into_owned();
                    (h.name.to_ascii_lowercase(), value)
                })
                .collect(),
        }),
        _ => None,
    }
}

async fn serve_h2(tcp: TcpStream, acceptor: TlsAcceptor, answer: H2Answer) {
    let Ok(tls) = acceptor.accept(tcp).await else {
        return;
    };
    let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let head = Head {
            method: req.method().to_string(),
            path: req.uri().path().to_owned(),
            headers: req
                .headers()
                .iter()
                .map(|(n, v)| {
                    let value = String::from_utf8_lossy(v.as_bytes()).into_owned();
                    (n.as_str().to_owned(), value)
                })
                .collect(),
        };
        let resp = answer(&head);
        async move { Ok::<_, Infallible>(resp) }
    });
    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(tls), service)
        .await;
}
