//! Tests of the CA and leaves against real verifiers: rustls/webpki, the openssl CLI and
//! Python's `ssl` module (strict flags, as Python ≥ 3.13 sets by default).

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::RootCertStore;
use rustls_pki_types::{ServerName, UnixTime};
use time::Duration;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::ParsedExtension;

use super::*;

const HOST: &str = "api.example.test";

fn dns(host: &str) -> LeafName {
    LeafName::Dns(host.to_owned())
}

fn new_ca() -> SandboxCa {
    SandboxCa::generate("sbx_test").expect("generate CA")
}

fn parse(der: &[u8]) -> X509Certificate<'_> {
    x509_parser::parse_x509_certificate(der).expect("parse").1
}

fn verifier(ca: &SandboxCa) -> Arc<WebPkiServerVerifier> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.cert_der().clone()).expect("add root");
    WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        crate::tls_provider::provider().clone(),
    )
    .build()
    .expect("verifier")
}

/// Verifies `leaf`'s chain for `server_name` the way a rustls client would.
fn verify(ca: &SandboxCa, leaf: &CertifiedKey, server_name: &str) -> Result<(), rustls::Error> {
    let name = ServerName::try_from(server_name.to_owned()).expect("server name");
    verifier(ca)
        .verify_server_cert(&leaf.cert[0], &leaf.cert[1..], &name, &[], UnixTime::now())
        .map(|_| ())
}

fn authority_key_id<'a>(cert: &'a X509Certificate<'_>) -> Option<&'a [u8]> {
    cert.iter_extensions()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(aki) => {
                aki.key_identifier.as_ref().map(|k| k.0)
            }
            _ => None,
        })
}

fn subject_key_id<'a>(cert: &'a X509Certificate<'_>) -> Option<&'a [u8]> {
    cert.iter_extensions()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(ski) => Some(ski.0),
            _ => None,
        })
}

#[test]
fn leaf_verifies_for_dns_name() {
    let ca = new_ca();
    let leaf = ca.mint_leaf(&dns(HOST)).unwrap();
    assert_eq!(leaf.cert.len(), 2);
    assert_eq!(&leaf.cert[1], ca.cert_der());
    verify(&ca, &leaf, HOST).expect("leaf verifies");
    leaf.keys_match().expect("key matches leaf");
}

#[test]
fn leaf_verifies_for_ip_literals() {
    let ca = new_ca();
    for ip in ["127.0.0.1", "::1"] {
        let leaf = ca.mint_leaf(&LeafName::Ip(ip.parse().unwrap())).unwrap();
        verify(&ca, &leaf, ip).expect("IP leaf verifies");
        assert!(verify(&ca, &leaf, "127.0.0.2").is_err());
    }
}

#[test]
fn wrong_name_fails() {
    let ca = new_ca();
    let leaf = ca.mint_leaf(&dns(HOST)).unwrap();
    for other in [
        "example.test",
        "evil.api.example.test",
        "api.example.tes",
        "127.0.0.1",
    ] {
        assert!(
            verify(&ca, &leaf, other).is_err(),
            "{other} must not verify"
        );
    }
}

#[test]
fn other_sandboxes_ca_does_not_verify() {
    let (ca, other) = (new_ca(), new_ca());
    let leaf = ca.mint_leaf(&dns(HOST)).unwrap();
    assert!(verify(&other, &leaf, HOST).is_err());
}

#[test]
fn leaf_fields() {
    let ca = new_ca();
    let leaf = ca.mint_leaf(&dns(HOST)).unwrap();
    let (cert, ca_cert) = (parse(&leaf.cert[0]), parse(ca.cert_der()));
    assert_eq!(authority_key_id(&cert), subject_key_id(&ca_cert));
    assert!(authority_key_id(&cert).is_some());
    assert!(!cert.is_ca());
    let cn = cert.subject().iter_common_name().next().unwrap();
    assert_eq!(cn.as_str().unwrap(), HOST);
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && !eku.client_auth);
    let ku = cert.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && !ku.key_cert_sign());
    let validity = cert.validity();
    let lifetime = validity.not_after.to_datetime() - validity.not_before.to_datetime();
    assert_eq!(lifetime, Duration::days(199));
    let backdate = OffsetDateTime::now_utc() - validity.not_before.to_datetime();
    assert!(backdate > Duration::minutes(59) && backdate < Duration::minutes(61));
}

#[test]
fn ca_fields() {
    let ca = new_ca();
    let cert = parse(ca.cert_der());
    let cn = cert.subject().iter_common_name().next().unwrap();
    assert_eq!(cn.as_str().unwrap(), "sealgate sandbox CA sbx_test");
    let org = cert.subject().iter_organization().next().unwrap();
    assert_eq!(org.as_str().unwrap(), "sealgate");
    let bc = cert.basic_constraints().unwrap().unwrap();
    assert!(bc.critical && bc.value.ca);
    assert_eq!(bc.value.path_len_constraint, Some(0));
    let ku = cert.key_usage().unwrap().unwrap().value;
    assert!(ku.key_cert_sign() && ku.crl_sign() && ku.digital_signature());
    assert!(subject_key_id(&cert).is_some());
    let validity = cert.validity();
    let lifetime = validity.not_after.to_datetime() - validity.not_before.to_datetime();
    assert_eq!(lifetime, Duration::days(3652));
    assert_eq!(validity.not_after.to_datetime(), ca.not_after());
}

#[test]
fn serials_are_random_and_positive() {
    let ca = new_ca();
    let a = ca.mint_leaf(&dns(HOST)).unwrap();
    let b = ca.mint_leaf(&dns(HOST)).unwrap();
    let (a, b) = (parse(&a.cert[0]), parse(&b.cert[0]));
    assert_ne!(a.raw_serial(), b.raw_serial());
    for cert in [&a, &b, &parse(ca.cert_der())] {
        let raw = cert.raw_serial();
        assert!(raw[0] & 0x80 == 0, "serial must be positive");
        assert!(
            (15..=17).contains(&raw.len()),
            "128-bit serial, got {} bytes",
            raw.len()
        );
    }
    assert_ne!(
        parse(new_ca().cert_der()).raw_serial(),
        parse(ca.cert_der()).raw_serial()
    );
}

#[test]
fn long_host_gets_san_without_cn() {
    let ca = new_ca();
    let host = format!("{}.example.test", "a".repeat(60));
    let leaf = ca.mint_leaf(&dns(&host)).unwrap();
    assert!(parse(&leaf.cert[0])
        .subject()
        .iter_common_name()
        .next()
        .is_none());
    verify(&ca, &leaf, &host).expect("long host verifies via SAN");
}

#[test]
fn leaf_validity_is_clamped_to_ca() {
    let now = OffsetDateTime::now_utc();
    let soon = now + Duration::days(3);
    let params = params::leaf_params(&dns(HOST), now, soon).unwrap();
    assert_eq!(params.not_after, soon);
    let expired = params::leaf_params(&dns(HOST), now, now - Duration::seconds(1));
    assert!(matches!(expired, Err(CaError::CaExpired)));
}

#[test]
fn from_parts_round_trips() {
    let ca = new_ca();
    let loaded = SandboxCa::from_parts(ca.cert_pem(), &ca.key_pkcs8_der()).unwrap();
    assert_eq!(loaded.cert_der(), ca.cert_der());
    assert_eq!(loaded.cert_pem(), ca.cert_pem());
    assert_eq!(loaded.key_pkcs8_der(), ca.key_pkcs8_der());
    assert_eq!(loaded.not_after(), ca.not_after());
    let leaf = loaded.mint_leaf(&dns(HOST)).unwrap();
    verify(&ca, &leaf, HOST).expect("leaf from loaded CA verifies against the original");
    let ca_cert = parse(ca.cert_der());
    assert_eq!(
        authority_key_id(&parse(&leaf.cert[0])),
        subject_key_id(&ca_cert)
    );
}

#[test]
fn from_parts_rejects_bad_parts() {
    let (ca, other) = (new_ca(), new_ca());
    let mismatched = SandboxCa::from_parts(ca.cert_pem(), &other.key_pkcs8_der());
    assert!(matches!(mismatched, Err(CaError::KeyMismatch)));
    let garbage_key = SecretValue::new(vec![0x30, 0x03, 0x02, 0x01, 0x00]);
    let bad_key = SandboxCa::from_parts(ca.cert_pem(), &garbage_key);
    assert!(matches!(bad_key, Err(CaError::InvalidKey)));
    let bad_cert = SandboxCa::from_parts("not a certificate", &ca.key_pkcs8_der());
    assert!(matches!(bad_cert, Err(CaError::InvalidCert(_))));
}

#[test]
fn from_parts_rejects_a_leaf_as_ca() {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = rcgen::CertificateParams::new(vec![HOST.to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let key_der = SecretValue::new(key.serialize_der());
    let loaded = SandboxCa::from_parts(&cert.pem(), &key_der);
    assert!(matches!(loaded, Err(CaError::NotACa)));
}

#[test]
fn debug_does_not_show_key() {
    let ca = new_ca();
    let shown = format!("{ca:?}");
    assert!(shown.contains("[redacted]"));
    let key = ca.key_pkcs8_der();
    let key_hex: String = key.expose()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert!(!shown.contains(&key_hex));
    assert!(shown.len() < 200, "{shown}");
}

fn write(dir: &Path, name: &str, contents: impl AsRef<[u8]>) -> String {
    let path = dir.join(name);
    std::fs::write(&path, contents).expect("write temp file");
    path.to_str().expect("utf-8 temp path").to_owned()
}

fn openssl(args: &[&str]) -> String {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("run openssl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "openssl {args:?} failed: {text}{err}");
    text
}

#[test]
fn openssl_verifies_and_shows_extensions() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca();
    let leaf = ca.mint_leaf(&dns(HOST)).unwrap();
    let ca_pem = write(dir.path(), "ca.pem", ca.cert_pem());
    let leaf_der = write(dir.path(), "leaf.der", &leaf.cert[0]);
    let leaf_pem = dir.path().join("leaf.pem").to_str().unwrap().to_owned();
    openssl(&[
        "x509", "-inform", "DER", "-in", &leaf_der, "-out", &leaf_pem,
    ]);

    let verified = openssl(&[
        "verify",
        "-x509_strict",
        "-purpose",
        "sslserver",
        "-verify_hostname",
        HOST,
        "-CAfile",
        &ca_pem,
        &leaf_pem,
    ]);
    assert!(verified.contains(": OK"), "{verified}");

    let text = openssl(&["x509", "-in", &leaf_pem, "-noout", "-text"]);
    for needle in [
        "X509v3 Authority Key Identifier",
        "TLS Web Server Authentication",
        "DNS:api.example.test",
        "CA:FALSE",
        "Digital Signature",
    ] {
        assert!(text.contains(needle), "leaf lacks {needle}:\n{text}");
    }
    let ca_text = openssl(&["x509", "-in", &ca_pem, "-noout", "-text"]);
    for needle in [
        "CA:TRUE, pathlen:0",
        "Certificate Sign, CRL Sign",
        "Subject Key Identifier",
    ] {
        assert!(ca_text.contains(needle), "CA lacks {needle}:\n{ca_text}");
    }
}

#[test]
fn openssl_verifies_ip_leaf() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca();
    let leaf = ca
        .mint_leaf(&LeafName::Ip("127.0.0.1".parse().unwrap()))
        .unwrap();
    let ca_pem = write(dir.path(), "ca.pem", ca.cert_pem());
    let leaf_der = write(dir.path(), "leaf.der", &leaf.cert[0]);
    let leaf_pem = dir.path().join("leaf.pem").to_str().unwrap().to_owned();
    openssl(&[
        "x509", "-inform", "DER", "-in", &leaf_der, "-out", &leaf_pem,
    ]);
    let verified = openssl(&[
        "verify",
        "-x509_strict",
        "-verify_ip",
        "127.0.0.1",
        "-CAfile",
        &ca_pem,
        &leaf_pem,
    ]);
    assert!(verified.contains(": OK"), "{verified}");
}

/// Python's `ssl` with the strict flags that Python ≥ 3.13 sets by default; prints the TLS
/// version, the ALPN protocol and the server's reply.
const PYTHON_CLIENT: &str = r#"
import socket, ssl, sys
ctx = ssl.create_default_context(cafile=sys.argv[1])
ctx.verify_flags |= ssl.VERIFY_X509_STRICT | ssl.VERIFY_X509_PARTIAL_CHAIN
ctx.set_alpn_protocols(["h2", "http/1.1"])
with socket.create_connection(("127.0.0.1", int(sys.argv[2])), timeout=10) as raw:
    with ctx.wrap_socket(raw, server_hostname=sys.argv[3]) as tls:
        tls.sendall(b"ping")
        print(tls.version(), tls.selected_alpn_protocol(), tls.cipher()[0], tls.recv(4).decode())
"#;

/// Serves one TLS connection with `leaf`'s server config: reads 4 bytes, answers `pong`.
async fn serve_once(leaf: Arc<Leaf>) -> (u16, tokio::task::JoinHandle<std::io::Result<()>>) {
    serve_n(leaf, 1).await
}

/// [`serve_once`] for `n` connections, one after the other.
async fn serve_n(leaf: Arc<Leaf>, n: usize) -> (u16, tokio::task::JoinHandle<std::io::Result<()>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let acceptor = tokio_rustls::TlsAcceptor::from(leaf.server_config.clone());
    let task = tokio::spawn(async move {
        for _ in 0..n {
            let (tcp, _) = listener.accept().await?;
            let mut tls = acceptor.accept(tcp).await?;
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await?;
            tls.write_all(b"pong").await?;
            tls.shutdown().await?;
        }
        Ok(())
    });
    (port, task)
}

/// Connects twice, the second time offering the first connection's session; prints whether
/// each was resumed.
const PYTHON_RESUMING_CLIENT: &str = r#"
import socket, ssl, sys
ctx = ssl.create_default_context(cafile=sys.argv[1])
if sys.argv[4] == "1.2":
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
session = None
for _ in range(2):
    with socket.create_connection(("127.0.0.1", int(sys.argv[2])), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=sys.argv[3], session=session) as tls:
            tls.sendall(b"ping")
            tls.recv(4)
            print(tls.session_reused)
            session = tls.session
"#;

/// The session cache ([`SessionCache`]) as a real client uses it: OpenSSL resumes with the
/// ticket of its first connection (TLS 1.3, so the ticket is taken on use).
#[tokio::test]
async fn python_client_resumes_its_session() {
    python_resumes("1.3").await;
}

/// The same over TLS 1.2: a session id (the cache's `get`; the leaves issue no RFC 5077
/// tickets).
#[tokio::test]
async fn python_client_resumes_its_tls12_session() {
    python_resumes("1.2").await;
}

#[test]
fn leaf_configs_choose_the_suite_and_send_one_ticket() {
    let leaf = Leaf::new(new_ca().mint_leaf(&dns(HOST)).unwrap()).unwrap();
    assert!(leaf.server_config.ignore_client_order);
    assert_eq!(leaf.server_config.send_tls13_tickets, 1);
    assert!(
        !leaf.server_config.ticketer.enabled(),
        "stateful sessions only"
    );
}

async fn python_resumes(version: &str) {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca();
    let ca_pem = write(dir.path(), "ca.pem", ca.cert_pem());
    let leaf = Arc::new(Leaf::new(ca.mint_leaf(&dns(HOST)).unwrap()).unwrap());
    let (port, server) = serve_n(leaf, 2).await;
    let client = tokio::process::Command::new("python3")
        .args([
            "-c",
            PYTHON_RESUMING_CLIENT,
            &ca_pem,
            &port.to_string(),
            HOST,
            version,
        ])
        .output();
    let out = tokio::time::timeout(std::time::Duration::from_secs(30), client)
        .await
        .expect("python timed out")
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "python failed: {stdout}{stderr}");
    assert_eq!(
        stdout.split_whitespace().collect::<Vec<_>>(),
        ["False", "True"]
    );
    tokio::time::timeout(std::time::Duration::from_secs(5), server)
        .await
        .expect("server timed out")
        .expect("join")
        .expect("server side of both handshakes");
}

async fn python_handshake(server_name: &str) -> (std::process::Output, std::io::Result<()>) {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca();
    let ca_pem = write(dir.path(), "ca.pem", ca.cert_pem());
    let leaf = Arc::new(Leaf::new(ca.mint_leaf(&dns(HOST)).unwrap()).unwrap());
    let (port, server) = serve_once(leaf).await;
    let client = tokio::process::Command::new("python3")
        .args(["-c", PYTHON_CLIENT, &ca_pem, &port.to_string(), server_name])
        .output();
    let out = tokio::time::timeout(std::time::Duration::from_secs(30), client)
        .await
        .expect("python timed out")
        .expect("run python3");
    let served = tokio::time::timeout(std::time::Duration::from_secs(5), server)
        .await
        .map_or_else(
            |_| Err(std::io::ErrorKind::TimedOut.into()),
            |j| j.expect("join"),
        );
    (out, served)
}

#[tokio::test]
async fn python_strict_client_accepts_leaf() {
    let (out, served) = python_handshake(HOST).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "python failed: {stdout}{stderr}");
    // OpenSSL offers TLS_AES_256_GCM_SHA384 first; the leaf chooses by its own order.
    assert_eq!(stdout.trim(), "TLSv1.3 h2 TLS_AES_128_GCM_SHA256 pong");
    served.expect("server side of the handshake");
}

#[tokio::test]
async fn python_rejects_wrong_host() {
    let (out, served) = python_handshake("other.example.test").await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("CERTIFICATE_VERIFY_FAILED"), "{stderr}");
    assert!(served.is_err());
}

#[test]
fn invalid_dns_names_are_refused() {
    let ca = new_ca();
    for bad in [
        "",
        "*.example.test",
        "a..b",
        "-a.test",
        "127.0.0.1",
        "ex ample.test",
        "h\u{e9}.test",
    ] {
        let minted = ca.mint_leaf(&dns(bad));
        assert!(
            matches!(minted, Err(CaError::InvalidName(_))),
            "{bad:?} must be refused"
        );
    }
}
