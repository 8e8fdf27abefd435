//! hudsucker-peer: the #17 comparison peer for `scripts/bench-e2e`. An explicit HTTP proxy on
//! hudsucker that intercepts every CONNECT (TLS with leaves from a fresh rcgen CA), replaces
//! `--token` by `--value` in every request header value and in the request body, and the value
//! back by the token in response bodies. No policy, no audit: the per-request work only.
//!
//! hudsucker-peer --listen 127.0.0.1:0 --ca-out ca.pem --token T --value V
//!                [--upstream-ca origin-ca.pem] [--resolve host=ip:port]
use http_body_util::{BodyExt, Full};
use hudsucker::{
    certificate_authority::RcgenAuthority,
    hyper::{body::Bytes, header, HeaderMap, Method, Request, Response, StatusCode},
    rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose},
    rustls::{self, crypto::aws_lc_rs, pki_types::pem::PemObject, pki_types::CertificateDer},
    Body, HttpContext, HttpHandler, Proxy, RequestOrResponse,
};
use hyper_util::client::legacy::connect::{dns::Name, HttpConnector};
use memchr::memmem::Finder;
use std::task::{Context, Poll};
use std::{collections::HashMap, future::Future, net::SocketAddr, pin::Pin, sync::Arc};

/// `needle` → `with` everywhere in `hay`; None when `hay` has no `needle`.
fn replace(hay: &[u8], needle: &Finder<'static>, with: &[u8]) -> Option<Vec<u8>> {
    let mut hits = needle.find_iter(hay).peekable();
    hits.peek()?;
    let mut out = Vec::with_capacity(hay.len() + with.len());
    let mut last = 0;
    for at in hits {
        out.extend_from_slice(&hay[last..at]);
        out.extend_from_slice(with);
        last = at + needle.needle().len();
    }
    out.extend_from_slice(&hay[last..]);
    Some(out)
}

struct Swap {
    token: Finder<'static>,
    value: Finder<'static>,
}

#[derive(Clone)]
struct Handler(Arc<Swap>);

/// Collects `body`, rewrites it, and fixes content-length in `headers`.
async fn rewrite(
    body: Body,
    headers: &mut HeaderMap,
    find: &Finder<'static>,
    with: &[u8],
) -> Result<Body, hudsucker::Error> {
    let bytes = body.collect().await?.to_bytes();
    let bytes = replace(&bytes, find, with).map_or(bytes, Bytes::from);
    if headers.contains_key(header::CONTENT_LENGTH) || !bytes.is_empty() {
        headers.remove(header::TRANSFER_ENCODING);
        headers.insert(header::CONTENT_LENGTH, bytes.len().into());
    }
    Ok(Body::from(Full::new(bytes)))
}

impl HttpHandler for Handler {
    async fn handle_request(&mut self, _: &HttpContext, req: Request<Body>) -> RequestOrResponse {
        if req.method() == Method::CONNECT {
            return req.into();
        }
        let (mut parts, body) = req.into_parts();
        let s = &self.0;
        for v in parts.headers.values_mut() {
            if let Some(new) = replace(v.as_bytes(), &s.token, s.value.needle()) {
                *v = new
                    .try_into()
                    .expect("token and value are valid header bytes");
            }
        }
        match rewrite(body, &mut parts.headers, &s.token, s.value.needle()).await {
            Ok(body) => Request::from_parts(parts, body).into(),
            Err(_) => status(StatusCode::BAD_REQUEST).into(),
        }
    }

    async fn handle_response(&mut self, _: &HttpContext, res: Response<Body>) -> Response<Body> {
        let (mut parts, body) = res.into_parts();
        let s = &self.0;
        match rewrite(body, &mut parts.headers, &s.value, s.token.needle()).await {
            Ok(body) => Response::from_parts(parts, body),
            Err(_) => status(StatusCode::BAD_GATEWAY),
        }
    }

    /// hudsucker's default (502) but on stderr, since the peer installs no tracing subscriber.
    async fn handle_error(
        &mut self,
        _: &HttpContext,
        err: hyper_util::client::legacy::Error,
    ) -> Response<Body> {
        eprintln!("upstream error: {err:?}");
        status(StatusCode::BAD_GATEWAY)
    }
}

fn status(code: StatusCode) -> Response<Body> {
    let mut res = Response::new(Body::empty());
    *res.status_mut() = code;
    res
}

/// DNS with `--resolve` overrides (the origin's test hostname); everything else via getaddrinfo.
#[derive(Clone)]
struct Resolver(Arc<HashMap<String, SocketAddr>>);

type Addrs = std::vec::IntoIter<SocketAddr>;
impl tower_service::Service<Name> for Resolver {
    type Response = Addrs;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Addrs, std::io::Error>> + Send>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, name: Name) -> Self::Future {
        let fixed = self.0.get(name.as_str()).copied();
        Box::pin(async move {
            match fixed {
                Some(addr) => Ok(vec![addr].into_iter()),
                None => Ok(tokio::net::lookup_host((name.as_str(), 0))
                    .await?
                    .collect::<Vec<_>>()
                    .into_iter()),
            }
        })
    }
}

#[tokio::main]
async fn main() {
    let mut args: HashMap<String, Vec<String>> = HashMap::new();
    let mut it = std::env::args().skip(1);
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        args.entry(k.trim_start_matches("--").to_owned())
            .or_default()
            .push(v);
    }
    let one = |k: &str| {
        args.get(k)
            .and_then(|v| v.last())
            .cloned()
            .unwrap_or_else(|| panic!("--{k} is required"))
    };
    let leak = |s: String| -> &'static [u8] { Box::leak(s.into_bytes().into_boxed_slice()) };
    let swap = Swap {
        token: Finder::new(leak(one("token"))),
        value: Finder::new(leak(one("value"))),
    };

    // A fresh CA for the minted leaves, written out for the client (oha --cacert).
    let key = KeyPair::generate().expect("CA key");
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "hudsucker-peer bench CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = params.self_signed(&key).expect("CA cert");
    std::fs::write(one("ca-out"), cert.pem()).expect("write --ca-out");
    let ca = RcgenAuthority::new(
        Issuer::new(params, key),
        1_000,
        aws_lc_rs::default_provider(),
    );

    // Upstream: trusts --upstream-ca only, offers h2 + http/1.1, --resolve overrides; otherwise
    // what hudsucker's with_rustls_connector builds (hyper-rustls over HttpConnector::new()).
    let mut roots = rustls::RootCertStore::empty();
    for f in args.get("upstream-ca").into_iter().flatten() {
        for c in CertificateDer::pem_file_iter(f).expect("read --upstream-ca") {
            roots
                .add(c.expect("parse --upstream-ca"))
                .expect("add --upstream-ca");
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let resolve = args.get("resolve").into_iter().flatten().map(|kv| {
        let (host, addr) = kv.split_once('=').expect("--resolve HOST=IP:PORT");
        (
            host.to_owned(),
            addr.parse().expect("--resolve HOST=IP:PORT"),
        )
    });
    let mut http = HttpConnector::new_with_resolver(Resolver(Arc::new(resolve.collect())));
    http.enforce_http(false);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);

    let listener = tokio::net::TcpListener::bind(one("listen"))
        .await
        .expect("bind --listen");
    println!(
        "listening on {}",
        listener.local_addr().expect("local addr")
    );
    let proxy = Proxy::builder()
        .with_listener(listener)
        .with_ca(ca)
        .with_http_connector(https)
        .with_http_handler(Handler(Arc::new(swap)))
        .build()
        .expect("proxy");
    proxy.start().await.expect("proxy");
}
