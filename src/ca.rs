//! Per-sandbox certificate authorities, leaf minting and the bounded single-flight leaf cache.
//!
//! Each sandbox gets its own ECDSA P-256 CA ([`SandboxCa`]). When the proxy intercepts TLS for a
//! host it asks the [`LeafCache`] for a [`Leaf`]: a certificate for exactly that host, signed by
//! the sandbox's CA, together with a ready rustls `ServerConfig` that presents it. Leaves are
//! never written to disk; the CA key leaves this module only as a [`SecretValue`] for sealed
//! storage.

mod cache;
mod params;
mod sessions;
mod tls;

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use rcgen::{Issuer, KeyPair, PublicKeyData, PKCS_ECDSA_P256_SHA256};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

use crate::secret::SecretValue;

pub use cache::{CacheStats, LeafCache};
pub use sessions::SessionCache;

/// The host a leaf is minted for, already normalised at the edge (DESIGN §3: lowercase ASCII,
/// no trailing dot, no port). IP literals get an IP SAN, names a DNS SAN.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum LeafName {
    /// A DNS host name such as `api.example.test`.
    Dns(String),
    /// An IP literal such as `127.0.0.1` or `::1`.
    Ip(IpAddr),
}

impl fmt::Display for LeafName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LeafName::Dns(host) => f.write_str(host),
            LeafName::Ip(ip) => ip.fmt(f),
        }
    }
}

/// Everything that can go wrong while creating, loading or using a sandbox CA. All of these are
/// internal failures (the sandbox cannot cause them except through a name rcgen refuses).
/// Messages never contain key material.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// rcgen failed to generate a key or sign a certificate.
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// The OS random number generator failed.
    #[error("the system random number generator failed")]
    Rng,
    /// The stored CA certificate is not a parseable PEM X.509 certificate.
    #[error("stored CA certificate is invalid: {0}")]
    InvalidCert(String),
    /// The stored certificate is not a CA certificate (basicConstraints CA:TRUE).
    #[error("stored certificate is not a CA certificate")]
    NotACa,
    /// The stored key is not a PKCS#8 ECDSA P-256 private key.
    #[error("stored CA key is not a PKCS#8 ECDSA P-256 key")]
    InvalidKey,
    /// The stored key does not belong to the stored certificate.
    #[error("stored CA key does not match the CA certificate's public key")]
    KeyMismatch,
    /// The CA's validity has ended, so no leaf can be minted under it.
    #[error("the sandbox CA has expired")]
    CaExpired,
    /// The host name cannot be put into a certificate.
    #[error("cannot mint a certificate for host {0:?}")]
    InvalidName(String),
    /// rustls refused the leaf key or the server configuration.
    #[error("TLS setup failed: {0}")]
    Tls(#[from] rustls::Error),
}

/// One sandbox's CA: its self-signed certificate and the signing key.
///
/// Invariant: `issuer`'s key matches the public key in `cert_der` (checked by
/// [`SandboxCa::from_parts`], true by construction in [`SandboxCa::generate`]). `Debug` shows
/// only the certificate's subject side, never the key.
pub struct SandboxCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    not_after: OffsetDateTime,
}

impl fmt::Debug for SandboxCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SandboxCa")
            .field("not_after", &self.not_after)
            .field("key", &"[redacted]")
            .finish_non_exhaustive()
    }
}

impl SandboxCa {
    /// New ECDSA P-256 CA: CN `sealgate sandbox CA <sandbox_id>`, O `sealgate`, CA:TRUE pathlen
    /// 0, keyCertSign + cRLSign + digitalSignature, random 128-bit serial, valid from one hour
    /// ago for ten years, with a subject key identifier.
    ///
    /// # Errors
    /// [`CaError::Rcgen`] or [`CaError::Rng`] if key generation or signing fails.
    pub fn generate(sandbox_id: &str) -> Result<Self, CaError> {
        let params = params::ca_params(sandbox_id, OffsetDateTime::now_utc())?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let cert = params.self_signed(&key)?;
        let not_after = params.not_after;
        Ok(Self {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            not_after,
            issuer: Issuer::new(params, key),
        })
    }

    /// Rebuilds a CA from stored parts: its certificate (PEM) and its PKCS#8 DER private key.
    ///
    /// # Errors
    /// [`CaError::InvalidCert`], [`CaError::NotACa`], [`CaError::InvalidKey`] or
    /// [`CaError::KeyMismatch`] when the parts are malformed or do not belong together.
    pub fn from_parts(cert_pem: &str, key_pkcs8_der: &SecretValue) -> Result<Self, CaError> {
        let cert_der = pem_to_der(cert_pem)?;
        let key = load_p256_key(key_pkcs8_der)?;
        let not_after = check_ca_cert(&cert_der, &key)?;
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)?;
        Ok(Self {
            issuer,
            cert_pem: cert_pem.to_owned(),
            cert_der,
            not_after,
        })
    }

    /// The CA certificate in PEM form (what sandboxes trust).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate in DER form.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The CA's last valid instant.
    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    /// The CA private key as PKCS#8 DER, for sealed storage only.
    pub fn key_pkcs8_der(&self) -> SecretValue {
        SecretValue::new(self.issuer.key().serialized_der().to_vec())
    }

    /// Mints a fresh leaf for `name`: its own P-256 key, exact-host SAN (IP SAN for IP
    /// literals), CN = host, random 128-bit serial, AKI = this CA's SKI, serverAuth EKU,
    /// digitalSignature KU, CA:FALSE, valid from one hour ago for 199 days but never past this
    /// CA's notAfter. The chain is `[leaf, ca]`.
    ///
    /// Costs one P-256 key generation and one signature (~50 µs including [`Leaf::new`]);
    /// callers should go through [`LeafCache`].
    ///
    /// # Errors
    /// [`CaError::CaExpired`], [`CaError::InvalidName`], or a generation failure.
    pub fn mint_leaf(&self, name: &LeafName) -> Result<CertifiedKey, CaError> {
        let params = params::leaf_params(name, OffsetDateTime::now_utc(), self.not_after)?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing_key = crate::tls_provider::provider()
            .key_provider
            .load_private_key(der)?;
        let chain = vec![cert.der().clone(), self.cert_der.clone()];
        Ok(CertifiedKey::new(chain, signing_key))
    }
}

/// A ready-to-serve leaf: the certified key and one rustls `ServerConfig` that always presents
/// it (ALPN `h2`, `http/1.1`; the process's provider, `crate::tls_provider`; TLS 1.2 and 1.3).
///
/// Building a `ServerConfig` costs ~20 µs, so it is built once per mint and shared by every
/// connection that uses this leaf. All leaf configs share one process-wide TLS session cache
/// ([`SessionCache`]; why that is safe: `SESSION_CACHE_SIZE` in `ca/tls.rs`), instead of 256
/// preallocated slots each.
#[derive(Debug)]
pub struct Leaf {
    /// The leaf chain `[leaf, ca]` and its signing key.
    pub certified: Arc<CertifiedKey>,
    /// A server config whose resolver always answers with `certified`.
    pub server_config: Arc<rustls::ServerConfig>,
}

impl Leaf {
    /// Wraps a minted key with its server config.
    ///
    /// # Errors
    /// [`CaError::Tls`] if rustls rejects the configuration (not expected with the ring
    /// provider).
    pub fn new(certified: CertifiedKey) -> Result<Self, CaError> {
        let certified = Arc::new(certified);
        let server_config = tls::server_config(certified.clone())?;
        Ok(Self {
            certified,
            server_config,
        })
    }
}

/// The DER of the first `CERTIFICATE` block in `pem`.
fn pem_to_der(pem: &str) -> Result<CertificateDer<'static>, CaError> {
    use rustls_pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| CaError::InvalidCert(e.to_string()))
}

fn load_p256_key(key_pkcs8_der: &SecretValue) -> Result<KeyPair, CaError> {
    let der = PrivatePkcs8KeyDer::from(key_pkcs8_der.expose());
    KeyPair::from_pkcs8_der_and_sign_algo(&der, &PKCS_ECDSA_P256_SHA256)
        .map_err(|_| CaError::InvalidKey)
}

/// Checks that `cert_der` is a CA certificate whose public key is `key`'s; returns its notAfter.
fn check_ca_cert(cert_der: &CertificateDer<'_>, key: &KeyPair) -> Result<OffsetDateTime, CaError> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| CaError::InvalidCert(e.to_string()))?;
    if !cert.is_ca() {
        return Err(CaError::NotACa);
    }
    if cert.public_key().subject_public_key.data.as_ref() != key.der_bytes() {
        return Err(CaError::KeyMismatch);
    }
    Ok(cert.validity().not_after.to_datetime())
}

#[cfg(test)]
mod tests;
