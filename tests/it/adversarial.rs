//! The adversarial suite (issue 7): one named test per attack, each asserting both the answer
//! the sandbox gets and what the echo upstream recorded (zero connections or bytes where the
//! attack must not get through). Every harness also greps the daemon and audit logs for every
//! registered secret value when it drops.
//!
//! | module | attack class |
//! |---|---|
//! | [`destination`] | CONNECT target parsing and normalisation |
//! | [`vetting`] | address vetting (literals, DNS answers, own listeners) |
//! | [`dns`] | DNS answers from a resolver the test controls: private, rebinding, mixed |
//! | [`authority`] | requests inside a tunnel naming another host |
//! | [`substitution`] | token handling |
//! | [`smuggling`] | h1 framing (CL+TE and friends) |
//! | [`exhaustion`] | oversized heads, slowloris, tunnel caps, h2 floods |
//! | [`budgets`] | connection budgets: silent connections, one sandbox at its cap |
//! | [`reflection`] | upstreams echoing real values back |
//! | [`transformed`] | echoes in another form (percent, JSON, base64), of old values, and bodies that must decode to the value |
//! | [`responses`] | hostile response channels (reason, names, codings, trailers) and bodiless answers |
//! | [`key_material`] | tampered ciphertexts, admin reachability, leaf minting |
//! | [`store_policy`] | tampered policy rows, a missing master key, unsealable values, open-store ports |
//! | [`fuzz_smoke`] | the fuzz targets' oracles on mutated seeds (stable, bounded) |

mod authority;
mod budgets;
mod destination;
mod dns;
mod exhaustion;
mod fuzz_smoke;
mod key_material;
mod open_answers;
mod reflection;
mod responses;
mod smuggling;
mod store_policy;
mod substitution;
mod transformed;
mod vetting;

use std::net::SocketAddr;
use std::time::Duration;

use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::proxy_explicit::Env;
use crate::support::proxy_client::{self as pc, ReqBody};

/// The usual tunnel target (resolved to the echo upstream by `setup`).
pub const API: &str = "api.example.test:443";

/// The echo upstream saw nothing: no TCP connection, no request.
pub fn assert_upstream_untouched(e: &Env) {
    assert_eq!(e.echo.connections(), 0, "upstream was connected to");
    assert!(e.echo.requests().is_empty(), "upstream received a request");
}

/// Leaves minted by the daemon so far.
pub fn mints(e: &Env) -> u64 {
    e.h.daemon.as_ref().unwrap().proxy.leaves.stats().mints
}

/// Sets the store's allowlist to `*:<port>` for each of `ports`: any host on those ports (an
/// unrestricted store only reaches 443 and 80), so address vetting is what a test exercises.
pub async fn allow_any_host_on(e: &Env, ports: &[u16]) {
    let allow: Vec<String> = ports.iter().map(|p| format!("*:{p}")).collect();
    let (s, v) =
        e.h.api(
            http::Method::PATCH,
            &format!("/v1/stores/{}", e.store),
            Some(serde_json::json!({ "egress_allowlist": allow })),
        )
        .await;
    assert_eq!(s, http::StatusCode::OK, "{v}");
}

/// The status of `CONNECT target` with the sandbox's credentials (0: closed without answer).
pub async fn connect_status(e: &Env, target: &str) -> (u16, String) {
    match pc::connect(e.h.proxy, Some(&e.sb.proxy_auth()), target).await {
        Ok(_) => (200, String::new()),
        Err(r) => (r.status, format!("{}{}", r.head, r.body)),
    }
}

/// CONNECT + TLS (ALPN http/1.1) with SNI `sni`.
pub async fn tls_tunnel(e: &Env, target: &str, sni: &str) -> TlsStream<TcpStream> {
    let tcp = pc::connect(e.h.proxy, Some(&e.sb.proxy_auth()), target)
        .await
        .unwrap_or_else(|r| panic!("CONNECT {target}: {r:?}"));
    pc::tls(tcp, &e.sb.ca_pem, sni, &[b"http/1.1"])
        .await
        .expect("TLS with the sandbox CA")
}

/// An h1 client over an established stream.
pub async fn h1_over<S>(s: S) -> http1::SendRequest<ReqBody>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) = http1::handshake(TokioIo::new(s)).await.unwrap();
    tokio::spawn(conn.with_upgrades());
    send
}

/// Writes `bytes`, then reads until the peer closes or `wait` passes.
pub async fn exchange<S>(s: &mut S, bytes: &[u8], wait: Duration) -> String
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let _ = s.write_all(bytes).await;
    let _ = s.flush().await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Raw bytes to the explicit listener (plain TCP).
pub async fn raw_proxy(proxy: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    exchange(&mut s, bytes, Duration::from_secs(5)).await
}

/// The status code of the first response in `text` (0: none).
pub fn status_of(text: &str) -> u16 {
    text.strip_prefix("HTTP/1.1 ")
        .and_then(|t| t.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// Asserts `text` is the uniform refusal (`status`, JSON, `x-sealgate-error: code`).
pub fn assert_uniform(text: &str, status: u16, code: &str) {
    assert_eq!(status_of(text), status, "{text}");
    let lower = text.to_ascii_lowercase();
    assert!(
        lower.contains(&format!("x-sealgate-error: {code}")),
        "no x-sealgate-error {code}: {text}"
    );
    assert!(lower.contains("content-type: application/json"), "{text}");
    assert!(text.contains(&format!("\"code\":\"{code}\"")), "{text}");
}

/// Waits until `f` holds (polling every 20 ms), failing after `limit`.
pub async fn eventually(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A GET through an h1 connection to `API` with extra headers.
pub async fn get_api(e: &Env, path: &str, headers: &[(&str, &str)]) -> pc::Answer {
    let mut c = pc::h1(e.h.proxy, &e.sb, API).await;
    pc::send1(&mut c, pc::get(path, "api.example.test", headers)).await
}
