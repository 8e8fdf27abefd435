//! Opens many intercepted connections through sealgate's explicit proxy and holds them idle,
//! so `scripts/bench-e2e` can read the daemon's RSS at N idle connections.
//!
//! ```text
//! idle_conns --proxy 127.0.0.1:3128 --proxy-auth "Basic …" --target origin.bench.test:8443 \
//!            --cacert sandbox-ca.pem --n 1000 --hold-secs 10 [--request "Bearer osb_sealed_…"] \
//!            [--path /v1/messages]
//! ```
//!
//! Each connection: TCP, `CONNECT` with `Proxy-Authorization`, TLS with the sandbox CA (ALPN
//! http/1.1), and with `--request AUTH` one keep-alive GET of `--path` (default `/`) carrying
//! `authorization: AUTH`; an answer other than 2xx counts as a failure.
//! Prints `HELD=<n>` once all are open (failures are counted in `FAILED=`), holds them for
//! `--hold-secs`, then exits.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

#[derive(Clone)]
struct Args {
    proxy: String,
    proxy_auth: String,
    target: String,
    cacert: String,
    n: usize,
    hold_secs: u64,
    request: Option<String>,
    path: String,
}

fn args() -> Args {
    let mut a = Args {
        proxy: "127.0.0.1:3128".into(),
        proxy_auth: String::new(),
        target: String::new(),
        cacert: String::new(),
        n: 1000,
        hold_secs: 10,
        request: None,
        path: "/".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let v = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--proxy" => a.proxy = v,
            "--proxy-auth" => a.proxy_auth = v,
            "--target" => a.target = v,
            "--cacert" => a.cacert = v,
            "--n" => a.n = v.parse().expect("--n"),
            "--hold-secs" => a.hold_secs = v.parse().expect("--hold-secs"),
            "--request" => a.request = Some(v),
            "--path" => a.path = v,
            _ => panic!("unknown flag {flag}"),
        }
    }
    a
}

fn connector(cacert: &str) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(cacert).expect("read --cacert") {
        roots.add(cert.expect("PEM")).expect("add root");
    }
    #[allow(deprecated)] // as in src/tls_provider.rs
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    TlsConnector::from(Arc::new(cfg))
}

type Held = Box<dyn std::any::Any + Send>;

async fn open(a: &Args, tls: &TlsConnector) -> Result<Held, String> {
    let mut tcp = TcpStream::connect(&a.proxy)
        .await
        .map_err(|e| e.to_string())?;
    let head = format!(
        "CONNECT {t} HTTP/1.1\r\nHost: {t}\r\nProxy-Authorization: {}\r\n\r\n",
        a.proxy_auth,
        t = a.target
    );
    tcp.write_all(head.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(tcp);
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .await
        .map_err(|e| e.to_string())?;
    if !line.contains(" 200") {
        return Err(format!("CONNECT answered {}", line.trim()));
    }
    loop {
        line.clear();
        reader
            .read_line(&mut line)
            .await
            .map_err(|e| e.to_string())?;
        if line == "\r\n" || line.is_empty() {
            break;
        }
    }
    let host = a
        .target
        .rsplit_once(':')
        .map_or(a.target.as_str(), |(h, _)| h);
    let name = ServerName::try_from(host.to_owned()).map_err(|e| e.to_string())?;
    let stream = tls
        .connect(name, reader.into_inner())
        .await
        .map_err(|e| e.to_string())?;
    let Some(auth) = &a.request else {
        return Ok(Box::new(stream));
    };
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    let conn = tokio::spawn(conn);
    let req = http::Request::get(a.path.as_str())
        .header(http::header::HOST, &a.target)
        .header(http::header::AUTHORIZATION, auth)
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    resp.into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(format!("request answered {status}"));
    }
    Ok(Box::new((send, conn)))
}

#[tokio::main]
async fn main() {
    let a = args();
    let tls = connector(&a.cacert);
    let mut held: Vec<Held> = Vec::with_capacity(a.n);
    let mut failed = 0usize;
    let mut first_error = None;
    for batch in (0..a.n).collect::<Vec<_>>().chunks(50) {
        let opens = batch.iter().map(|_| open(&a, &tls));
        for r in futures_util::future::join_all(opens).await {
            match r {
                Ok(h) => held.push(h),
                Err(e) => {
                    failed += 1;
                    first_error.get_or_insert(e);
                }
            }
        }
    }
    println!("HELD={} FAILED={failed}", held.len());
    // (the script reads this line to know the connections are open)
    if let Some(e) = first_error {
        eprintln!("first failure: {e}");
    }
    tokio::time::sleep(Duration::from_secs(a.hold_secs)).await;
    drop(held);
}
