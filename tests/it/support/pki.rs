//! Test PKI generated at run time: one upstream CA and the leaf `ServerConfig`s it signs.
//!
//! Nothing here is persisted beyond the `TempDir` owned by [`TestPki`]; every test run gets a
//! fresh P-256 CA, so no key material lives in the repository.
#![allow(dead_code)] // shared by many tests; each test binary module uses a different subset

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use rustls::crypto::CryptoProvider;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tempfile::TempDir;

/// Common name of the CA every [`TestPki`] creates.
pub const CA_COMMON_NAME: &str = "sealgate test upstream CA";

/// ALPN offered by [`TestPki::server_config`] when the caller passes none.
pub const DEFAULT_ALPN: &[&[u8]] = &[b"h2", b"http/1.1"];

/// A throwaway CA for the "real upstream" side of integration tests.
///
/// Invariant: `ca_file` holds exactly `ca_pem` and lives as long as this struct (it sits in a
/// `TempDir` that is removed on drop), so a daemon under test may be pointed at it as an extra
/// trust anchor.
pub struct TestPki {
    /// The CA certificate, PEM.
    pub ca_pem: String,
    /// The CA certificate, DER.
    pub ca_der: CertificateDer<'static>,
    /// `ca.pem` inside a temp directory owned by this struct.
    pub ca_file: PathBuf,
    issuer: Issuer<'static, KeyPair>,
    _dir: TempDir,
}

impl TestPki {
    /// Creates the CA "sealgate test upstream CA" and writes it to `ca_file`.
    ///
    /// # Panics
    /// If key generation, signing or writing the temp file fails (test-only code).
    pub fn new() -> TestPki {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("generate CA key");
        let params = ca_params();
        let cert = params.self_signed(&key).expect("self-sign CA");
        let dir = tempfile::tempdir().expect("create temp dir for CA");
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, cert.pem()).expect("write CA file");
        TestPki {
            ca_pem: cert.pem(),
            ca_der: cert.der().clone(),
            ca_file,
            issuer: Issuer::new(params, key),
            _dir: dir,
        }
    }

    /// A ring-backed `ServerConfig` presenting a fresh leaf for all `names`, signed by this CA.
    ///
    /// `names` are DNS names or IP literals (the latter become IP SANs); the first one is also
    /// the subject CN. The leaf carries AKI, the serverAuth EKU and is valid from one hour
    /// ago to seven days from now. ALPN is `alpn`, or h2 + http/1.1 when `alpn` is empty (see
    /// [`TestPki::server_config_without_alpn`] for a server that offers none).
    ///
    /// # Panics
    /// If `names` is empty or holds a name rcgen rejects.
    pub fn server_config(&self, names: &[&str], alpn: &[&[u8]]) -> Arc<rustls::ServerConfig> {
        let alpn = if alpn.is_empty() { DEFAULT_ALPN } else { alpn };
        let mut cfg = self.server_config_inner(names);
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(cfg)
    }

    /// Like [`TestPki::server_config`] but without any ALPN (an HTTP/1.1-only origin).
    pub fn server_config_without_alpn(&self, names: &[&str]) -> Arc<rustls::ServerConfig> {
        Arc::new(self.server_config_inner(names))
    }

    /// A ring-backed `ClientConfig` trusting only this CA, offering `alpn` (may be empty).
    pub fn client_config(&self, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(self.ca_der.clone())
            .expect("add test CA to root store");
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(cfg)
    }

    fn server_config_inner(&self, names: &[&str]) -> rustls::ServerConfig {
        let (cert, key) = self.issue_leaf(names);
        rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default versions")
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .expect("leaf and key match")
    }

    /// A fresh leaf for `names` as PEM `(certificate, PKCS#8 key)`, for third-party servers
    /// (nginx) that read files.
    pub fn leaf_pem(&self, names: &[&str]) -> (String, String) {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("generate leaf key");
        let cert = leaf_params(names)
            .signed_by(&key, &self.issuer)
            .expect("sign leaf");
        (cert.pem(), key.serialize_pem())
    }

    /// Writes a fresh leaf for `names` into `dir` as `<stem>.crt` and `<stem>.key` (PEM:
    /// certificate, PKCS#8 key), for third-party servers that read files. Returns both paths.
    pub fn write_leaf(
        &self,
        dir: &std::path::Path,
        stem: &str,
        names: &[&str],
    ) -> (PathBuf, PathBuf) {
        let (cert, key) = self.leaf_pem(names);
        let (crt, pem) = (
            dir.join(format!("{stem}.crt")),
            dir.join(format!("{stem}.key")),
        );
        std::fs::write(&crt, cert).expect("write leaf certificate");
        std::fs::write(&pem, key).expect("write leaf key");
        (crt, pem)
    }

    /// Issues a leaf for `names`; returns its DER and PKCS#8 key.
    fn issue_leaf(&self, names: &[&str]) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
        assert!(!names.is_empty(), "a leaf needs at least one name");
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("generate leaf key");
        let params = leaf_params(names);
        let cert = params.signed_by(&key, &self.issuer).expect("sign leaf");
        let key_der = PrivatePkcs8KeyDer::from(key.serialize_der());
        (cert.der().clone(), PrivateKeyDer::Pkcs8(key_der))
    }
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}

/// The ring crypto provider every config here uses (never the process default); deprecated
/// by rustls 0.23.48, kept as the daemon keeps it (`src/tls_provider.rs`).
#[allow(deprecated)]
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = common_name(CA_COMMON_NAME);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut params, Duration::from_secs(30 * 86_400));
    params
}

fn leaf_params(names: &[&str]) -> CertificateParams {
    let sans: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let mut params = CertificateParams::new(sans).expect("valid SAN names");
    params.distinguished_name = common_name(names[0]);
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    set_validity(&mut params, Duration::from_secs(7 * 86_400));
    params
}

fn common_name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

/// Valid from one hour ago (clock skew) until `lifetime` from now.
fn set_validity(params: &mut CertificateParams, lifetime: Duration) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - Duration::from_secs(3600);
    params.not_after = now + lifetime;
}
