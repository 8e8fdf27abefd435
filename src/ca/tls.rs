//! The rustls side of a leaf: the shared session cache and the per-leaf config (the crypto
//! provider is the process's, [`crate::tls_provider`]).

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use rustls::server::{ClientHello, ResolvesServerCert, StoresServerSessions};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

use super::{CaError, SessionCache};

/// ALPN protocols offered to sandboxes, in preference order. `http/1.0` (RFC 7301's registry)
/// for a client that offers only it (`curl --http1.0`): it was refused at the handshake with
/// `no_application_protocol`, where nginx, h2o and uvicorn serve it (outside pass h47b); it is
/// served by the HTTP/1 path, which answers HTTP/1.0 requests as HTTP/1.0.
const ALPN: [&[u8]; 3] = [b"h2", b"http/1.1", b"http/1.0"];

/// Sessions remembered for resumption across all leaves of all sandboxes.
///
/// Why sharing is safe: ids and tickets are random and chosen by rustls (a client's own id is
/// never stored), and resuming one needs its secret, which only the client that made the
/// session holds: whoever can resume a session could already read that client's traffic.
/// rustls also requires the same suite and the same SNI (no SNI matches no SNI, so sessions of
/// IP-literal destinations resume across hosts). Nothing sealgate decides rests on the TLS
/// session: the sandbox, destination and leaf are fixed before the handshake.
const SESSION_CACHE_SIZE: usize = 4096;

/// The longest a stored session resumes: the ticket lifetime rustls announces for stateful
/// tickets (24 h, as RFC 5246 suggests for TLS 1.2 session ids).
const SESSION_MAX_AGE: Duration = Duration::from_secs(24 * 60 * 60);

/// TLS 1.3 tickets sent after each full or resumed handshake. rustls sends 2 by default, each
/// costing three draws from the OS CSPRNG, a key derivation, a cache entry and a record; a
/// client reconnecting resumes with one and gets a new one each time (Go's servers send 1).
/// A client opening several connections at once resumes one of them and does full
/// handshakes for the others.
const TLS13_TICKETS: usize = 1;

static SESSIONS: LazyLock<Arc<dyn StoresServerSessions>> =
    LazyLock::new(|| Arc::new(SessionCache::new(SESSION_CACHE_SIZE, SESSION_MAX_AGE)));

/// A server config that always presents `certified` (TLS 1.2 and 1.3, ALPN h2 then http/1.1),
/// choosing the suite by the provider's order, not the client's (AES-128-GCM when offered:
/// [`crate::tls_provider`]).
///
/// # Errors
/// [`CaError::Tls`] if rustls rejects the protocol versions for the provider.
pub(super) fn server_config(certified: Arc<CertifiedKey>) -> Result<Arc<ServerConfig>, CaError> {
    let mut config = ServerConfig::builder_with_provider(crate::tls_provider::provider().clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(FixedCert(certified)));
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    config.session_storage = SESSIONS.clone();
    config.ignore_client_order = true;
    config.send_tls13_tickets = TLS13_TICKETS;
    Ok(Arc::new(config))
}

/// Answers every ClientHello with the same leaf (the proxy picked the leaf from the
/// destination before the handshake, so SNI is not consulted here).
#[derive(Debug)]
struct FixedCert(Arc<CertifiedKey>);

impl ResolvesServerCert for FixedCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}
