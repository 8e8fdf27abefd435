//! The origins that answered over h2, so later requests to them go to an `http2_only` client.
//!
//! Why: hyper-util's pool makes one connection attempt per authority at a time only for
//! `http2_only` clients. While ALPN is undecided (`h2` + `http/1.1`), every request that finds
//! no ready connection dials its own; after each GOAWAY of a busy h2 origin that cost ~20 TLS
//! handshakes at 32 connections. Once an origin has answered over h2, its requests go to the
//! h2-only client and wait for the one connection being made — unless the dual-protocol
//! client still holds a usable h2 connection there ([`super::LiveH2`]), which they then share.
//!
//! Invariants: at most `cap` authorities are remembered (a sandbox can reach many names
//! through a wildcard allowlist; beyond the cap origins simply stay on the dual-protocol
//! client); an origin is forgotten as soon as an h2-only handshake does not choose h2. The
//! set belongs to one [`crate::proxy::LiveSettings`], so a reload starts it empty.

use std::borrow::Cow;
use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::DashSet;
use http::uri::Authority;

/// The set of origins known to speak h2 (see the module doc).
pub struct KnownH2 {
    /// Authorities in lower case, as text: `Authority`'s own `Hash` feeds the hasher one byte
    /// at a time (case-insensitively), ~1,400 instructions a lookup, on every request.
    origins: DashSet<Box<str>>,
    /// How many `origins` holds, kept beside it: `DashSet::len` locks every shard, and a full
    /// set is asked on every h2 answer from an origin it could not take.
    len: AtomicUsize,
    cap: usize,
}

impl KnownH2 {
    /// An empty set remembering at most `cap` origins.
    pub fn new(cap: usize) -> Self {
        KnownH2 {
            origins: DashSet::new(),
            len: AtomicUsize::new(0),
            cap,
        }
    }

    /// True if `origin` answered over h2 and has not been forgotten since.
    pub fn contains(&self, origin: &Authority) -> bool {
        self.origins.contains(&*key(origin))
    }

    /// Remembers `origin` (an answer came over h2), unless the set is full (concurrent
    /// learners can pass the cap by at most their own number). Called on every h2 answer to a
    /// request that did not go through the h2-only client (a streamed body, too): a known
    /// origin costs a shard read lock, not a write lock and a clone.
    pub fn learn(&self, origin: &Authority) {
        if self.len.load(Ordering::Relaxed) >= self.cap {
            return;
        }
        let key = key(origin);
        if !self.origins.contains(&*key) && self.origins.insert(key.into()) {
            self.len.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Forgets `origin` (an h2-only handshake with it did not choose h2).
    pub fn forget(&self, origin: &Authority) {
        if self.origins.remove(&*key(origin)).is_some() {
            self.len.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// `origin` in lower case (host names compare case-insensitively); borrowed when it is already.
fn key(origin: &Authority) -> Cow<'_, str> {
    let text = origin.as_str();
    match text.bytes().any(|b| b.is_ascii_uppercase()) {
        true => Cow::Owned(text.to_ascii_lowercase()),
        false => Cow::Borrowed(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &'static str) -> Authority {
        Authority::from_static(s)
    }

    #[test]
    fn learns_forgets_and_stops_at_the_cap() {
        let k = KnownH2::new(2);
        assert!(!k.contains(&a("api.example.com:443")));
        k.learn(&a("api.example.com:443"));
        k.learn(&a("API.example.com:443"));
        assert!(k.contains(&a("api.example.com:443")), "case-insensitive");
        k.learn(&a("b.example.com:443"));
        k.learn(&a("c.example.com:443"));
        assert!(!k.contains(&a("c.example.com:443")), "beyond the cap");
        k.forget(&a("api.example.com:443"));
        assert!(!k.contains(&a("api.example.com:443")));
        k.learn(&a("c.example.com:443"));
        assert!(
            k.contains(&a("c.example.com:443")),
            "room again after a forget"
        );
    }
}
