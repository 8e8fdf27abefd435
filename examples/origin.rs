//! A minimal HTTPS origin on loopback for `scripts/bench-e2e`: h1 and h2 (ALPN), keep-alive,
//! a certificate from a throwaway CA made at start.
//!
//! ```text
//! origin --listen 127.0.0.1:0 --name origin.bench.test --ca-out /tmp/x/origin-ca.pem \
//!        --expect-auth "Bearer <value>"
//! ```
//!
//! `--echo` makes every answer a JSON echo of the request (method, path, headers) instead, for
//! the README's end-to-end demo; with `--expect-auth` the echo also says whether the
//! `authorization` header it *received* was that value (`"received_expected_auth": true`) —
//! the evidence that a proxy substituted the real value, since the echoed headers themselves
//! come back scrubbed. Prints `ORIGIN_ADDR=<ip:port>` once listening. Every request is answered `200` with a
//! ~200-byte JSON body, except that it checks what a proxy must have done: an `authorization`
//! header other than `--expect-auth` gets `403`, and a request body that still contains
//! `osb_sealed_` gets `400`. So a load generator's status histogram shows that every request
//! through the proxy was really substituted.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

const BODY: &[u8] = br#"{"id":"msg_01XFDUDYJgAACzvnptvVoYEL","type":"message","role":"assistant","content":[{"type":"text","text":"Hello! How can I help you today?"}],"stop_reason":"end_turn","usage":{"input_tokens":12,"output_tokens":9}}"#;

struct Args {
    listen: SocketAddr,
    name: String,
    ca_out: String,
    expect_auth: Option<String>,
    echo: bool,
}

const USAGE: &str = "usage: origin [--listen IP:PORT] [--name HOST] [--ca-out FILE] \
[--expect-auth VALUE] [--echo]
  --listen       address to listen on (default 127.0.0.1:0)
  --name         host name in the certificate (default origin.bench.test; 127.0.0.1 always)
  --ca-out       where the throwaway CA certificate is written (default origin-ca.pem)
  --expect-auth  answer 403 unless the authorization header is exactly this value
  --echo         answer with a JSON echo of the request (method, path, headers)";

fn args() -> Args {
    let mut a = Args {
        listen: "127.0.0.1:0".parse().expect("addr"),
        name: "origin.bench.test".into(),
        ca_out: "origin-ca.pem".into(),
        expect_auth: None,
        echo: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            "--echo" => {
                a.echo = true;
                continue;
            }
            _ => {}
        }
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => a.listen = value.parse().expect("--listen ip:port"),
            "--name" => a.name = value,
            "--ca-out" => a.ca_out = value,
            "--expect-auth" => a.expect_auth = Some(value),
            _ => {
                eprintln!("unknown flag {flag}\n{USAGE}");
                std::process::exit(2);
            }
        }
    }
    a
}

/// A CA (written to `ca_out`) and a server config for `name` and 127.0.0.1 signed by it.
fn tls(name: &str, ca_out: &str) -> Arc<rustls::ServerConfig> {
    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("ca key");
    let mut ca = CertificateParams::default();
    ca.distinguished_name
        .push(DnType::CommonName, "bench origin CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).expect("self-sign");
    std::fs::write(ca_out, ca_cert.pem()).expect("write CA");
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("leaf key");
    let mut leaf =
        CertificateParams::new(vec![name.to_owned(), "127.0.0.1".to_owned()]).expect("names");
    leaf.distinguished_name.push(DnType::CommonName, name);
    leaf.use_authority_key_identifier_extension = true;
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = leaf.signed_by(&key, &issuer).expect("sign");
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    #[allow(deprecated)] // as in src/tls_provider.rs
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone(), ca_cert.der().clone()], der)
        .expect("cert");
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(cfg)
}

fn echo(req: &Request<Incoming>, auth_ok: Option<bool>) -> Bytes {
    let headers: serde_json::Map<String, serde_json::Value> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into()))
        .collect();
    let mut v = serde_json::json!({"method": req.method().as_str(), "path": req.uri().to_string(), "headers": headers});
    if let Some(ok) = auth_ok {
        v["received_expected_auth"] = ok.into();
    }
    Bytes::from(v.to_string() + "\n")
}

async fn handle(
    expect: Arc<Option<String>>,
    echo_mode: bool,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let auth_ok = match (req.headers().get(http::header::AUTHORIZATION), &*expect) {
        (Some(got), Some(want)) => got.as_bytes() == want.as_bytes(),
        (None, Some(_)) => false,
        (_, None) => true,
    };
    let echoed = echo_mode.then(|| echo(&req, expect.is_some().then_some(auth_ok)));
    let body = req.into_body().collect().await?.to_bytes();
    let status = if !auth_ok {
        StatusCode::FORBIDDEN
    } else if memchr::memmem::find(&body, b"osb_sealed_").is_some() {
        StatusCode::BAD_REQUEST
    } else {
        StatusCode::OK
    };
    let mut resp = Response::new(Full::new(
        echoed.unwrap_or_else(|| Bytes::from_static(BODY)),
    ));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}

#[tokio::main]
async fn main() {
    let a = args();
    let acceptor = TlsAcceptor::from(tls(&a.name, &a.ca_out));
    let listener = TcpListener::bind(a.listen).await.unwrap_or_else(|e| {
        eprintln!("origin: cannot listen on {}: {e}", a.listen);
        std::process::exit(1)
    });
    println!("ORIGIN_ADDR={}", listener.local_addr().expect("addr"));
    let expect = Arc::new(a.expect_auth);
    let echo_mode = a.echo;
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, expect) = (acceptor.clone(), expect.clone());
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let svc = service_fn(move |req| handle(expect.clone(), echo_mode, req));
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), svc)
                .await;
        });
    }
}
