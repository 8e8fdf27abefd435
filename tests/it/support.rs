//! Shared test support: PKI, echo upstream, raw listeners, the in-process daemon harness and a
//! proxy client.

pub mod daemon;
pub mod dns;
pub mod echo;
pub mod h2raw;
pub mod hostile;
pub mod pg;
pub mod pki;
pub mod proxy_client;
pub mod raw;

/// Declared by `pg` (which other test binaries include by path), so there is one counter.
pub use pg::ports;
