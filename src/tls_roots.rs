//! Verified client TLS configurations: the web PKI roots plus PEM CA files an operator names.
//! Shared by the upstream connector (`[upstream] ca_files`) and the PostgreSQL client
//! (`[store] ca_files`), so both verify the same way.
//!
//! Invariant: every configuration built here verifies the peer's chain and name; there is no
//! way to turn verification off.

use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Builds the verified client TLS config: webpki roots plus `ca_files` (the process's provider,
/// [`crate::tls_provider`], so AES-128-GCM is offered first; TLS 1.2 and 1.3).
///
/// # Errors
/// A CA file that cannot be read or holds no certificate.
pub fn client_tls(ca_files: &[PathBuf]) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for f in ca_files {
        add_pem_roots(&mut roots, f)?;
    }
    let cfg = rustls::ClientConfig::builder_with_provider(crate::tls_provider::provider().clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

fn add_pem_roots(roots: &mut rustls::RootCertStore, f: &Path) -> Result<(), String> {
    use rustls::pki_types::pem::PemObject;
    let certs: Vec<_> = rustls::pki_types::CertificateDer::pem_file_iter(f)
        .map_err(|e| format!("{}: {e}", f.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", f.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate found", f.display()));
    }
    for c in certs {
        roots.add(c).map_err(|e| format!("{}: {e}", f.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_configs_use_the_process_provider() {
        let cfg = client_tls(&[]).expect("web PKI roots alone");
        assert!(Arc::ptr_eq(
            cfg.crypto_provider(),
            crate::tls_provider::provider()
        ));
        assert_eq!(
            cfg.crypto_provider().cipher_suites[0].suite(),
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        );
    }

    #[test]
    fn a_ca_file_without_a_certificate_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let err = client_tls(&[empty]).unwrap_err();
        assert!(err.contains("no certificate found"), "{err}");
    }
}
