//! The one rustls crypto provider of the process: ring, with AES-128-GCM and X25519 preferred.
//!
//! Invariant: every TLS configuration sealgate builds (the sandbox-facing leaves in
//! `ca::tls`, the upstream and PostgreSQL clients in `tls_roots`) uses [`provider`]: the
//! leaves choose by its order, and the clients offer in its order (the origin chooses).
//!
//! Why AES-128-GCM first: rustls's default order puts `TLS13_AES_256_GCM_SHA384` first, and a
//! sandbox client (rustls, OpenSSL) offers it first too. Its key schedule hashes with SHA-384,
//! for which ring has no hardware path on AMD CPUs (`sha512_block_data_order_nohw`: 7 % of
//! the proxy's CPU with a new TLS connection per request), while SHA-256 runs on the SHA
//! extensions; AES-128 also takes 10 rounds per block where AES-256 takes 14. AES-128-GCM
//! is the suite TLS 1.3 makes mandatory (RFC 8446 §9.1) and the one Go and BoringSSL servers
//! prefer. The leaves choose by this order whatever the client prefers
//! (`ignore_client_order` in `ca::tls`); the sandbox runs on this host, so it has the AES
//! instructions the proxy has. Nothing is removed: a peer that offers only AES-256 or
//! ChaCha20 still gets it.
//!
//! Why X25519 first: a client sends a key share for the first group of its list only, and
//! rustls 0.23.48 moved ring's P-384 to the head of it. Every new upstream connection then
//! generated a P-384 key (ring has no assembly for it: ~5.8 million instructions, about 45
//! requests' worth through the proxy) that origins preferring X25519 (nginx here, Go's server)
//! discard, asking again with a HelloRetryRequest: a round trip more per connection (found by
//! counting instructions against session 30's build, `BENCH_INSTR=1 scripts/bench-e2e`). The
//! leaves' choice among a client's shares follows the same order. X25519 is what every TLS
//! 1.3 stack offers first; P-256 and P-384 stay, after it.

use std::sync::{Arc, LazyLock};

use rustls::crypto::CryptoProvider;
use rustls::{CipherSuite, NamedGroup, SupportedCipherSuite};

static PROVIDER: LazyLock<Arc<CryptoProvider>> = LazyLock::new(|| {
    let mut provider = ring_provider();
    provider.cipher_suites.sort_by_key(preference);
    provider.kx_groups.sort_by_key(|g| kx_preference(g.name()));
    Arc::new(provider)
});

/// ring's provider. rustls 0.23.48 deprecates it for lacking post-quantum key exchange
/// (X25519MLKEM768, which rustls offers with aws-lc-rs). Kept, as a recorded decision
/// (ARCHITECTURE.md, "TLS provider"): the sandbox-facing leg never leaves the host; on the
/// upstream leg a recorded session could be decrypted only by a future quantum computer, and
/// what it carries (API keys) is rotated long before; ring builds in seconds with `cc` alone
/// and the cipher order above was measured on it. Switching is this one function.
#[allow(deprecated)]
fn ring_provider() -> CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// The provider, built once per process.
pub fn provider() -> &'static Arc<CryptoProvider> {
    &PROVIDER
}

/// Sort key of key-exchange groups: X25519, then P-256, then the rest in ring's order.
fn kx_preference(group: NamedGroup) -> u8 {
    match group {
        NamedGroup::X25519 => 0,
        NamedGroup::secp256r1 => 1,
        _ => 2,
    }
}

/// Sort key: TLS 1.3 before 1.2; within a version AES-128-GCM, then AES-256-GCM, then the
/// rest (ChaCha20-Poly1305) in ring's order (the sort is stable).
fn preference(suite: &SupportedCipherSuite) -> (bool, u8) {
    let bulk = match suite.suite() {
        CipherSuite::TLS13_AES_128_GCM_SHA256
        | CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        | CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => 0,
        CipherSuite::TLS13_AES_256_GCM_SHA384
        | CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
        | CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => 1,
        _ => 2,
    };
    (suite.tls13().is_none(), bulk)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn suites() -> Vec<CipherSuite> {
        provider().cipher_suites.iter().map(|s| s.suite()).collect()
    }

    #[test]
    fn x25519_is_the_first_key_share_then_p256() {
        let groups: Vec<NamedGroup> = provider().kx_groups.iter().map(|g| g.name()).collect();
        assert_eq!(
            groups,
            [
                NamedGroup::X25519,
                NamedGroup::secp256r1,
                NamedGroup::secp384r1
            ]
        );
    }

    #[test]
    fn aes_128_gcm_comes_first_in_each_version() {
        let s = suites();
        assert_eq!(s[0], CipherSuite::TLS13_AES_128_GCM_SHA256, "{s:?}");
        assert_eq!(s[1], CipherSuite::TLS13_AES_256_GCM_SHA384, "{s:?}");
        let first12 = s
            .iter()
            .position(|c| !format!("{c:?}").starts_with("TLS13"))
            .unwrap();
        assert_eq!(
            s[first12],
            CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            "{s:?}"
        );
    }

    #[test]
    fn no_suite_is_added_or_dropped() {
        let mut ours = suites();
        let mut ring: Vec<_> = ring_provider()
            .cipher_suites
            .iter()
            .map(|s| s.suite())
            .collect();
        ours.sort_by_key(|c| u16::from(*c));
        ring.sort_by_key(|c| u16::from(*c));
        assert_eq!(ours, ring);
    }
}
