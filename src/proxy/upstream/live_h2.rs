//! The destinations a dual-protocol client holds a usable h2 connection to, so that the
//! held-body requests to an origin known to speak h2 ([`super::KnownH2`]) go on the connection
//! the first answer came on instead of a second one the h2-only client would dial.
//!
//! Why: the dual-protocol client offers h2 and http/1.1, and its first request to an origin
//! learns that the origin speaks h2 on an h2 connection that then stays in its pool. Held
//! bodies went to the h2-only client from then on, which dialled its own: every h2 origin took
//! two connections per sandbox and worker (one TLS handshake more for the second request, and
//! ~92 KB idle each: #17's largest remaining item, outside pass h44c).
//!
//! Invariants: a connection is counted from its handshake choosing h2 until the first of: the
//! server's GOAWAY, this side retiring it ([`super::limits`]), the server closing or resetting
//! it, the connection's end. Once none is counted for a destination, held bodies go to the
//! h2-only client again, whose pool makes one connection attempt at a time: a GOAWAY does not
//! make every waiting request dial (the reason that client exists). A count that is briefly
//! stale costs at most a request sent where hyper-util's pool dials for it; nothing is refused
//! for it. At most one entry per destination with a counted connection.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

/// Per destination (the request URI's authority, as hyper-util hands it to the connector),
/// how many of one client's h2 connections to it are usable.
#[derive(Default)]
pub struct LiveH2(Mutex<HashMap<Box<str>, usize>>);

impl LiveH2 {
    /// True if a connection to `dest` is counted.
    pub fn holds(&self, dest: &str) -> bool {
        self.lock().contains_key(dest)
    }

    /// Counts a connection to `dest` until the mark is dropped.
    pub fn mark(self: &Arc<Self>, dest: &str) -> LiveMark {
        *self.lock().entry(dest.into()).or_insert(0) += 1;
        LiveMark {
            of: self.clone(),
            dest: dest.into(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Box<str>, usize>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One counted connection ([`LiveH2::mark`]); dropping it uncounts it.
pub struct LiveMark {
    of: Arc<LiveH2>,
    dest: Box<str>,
}

impl std::fmt::Debug for LiveMark {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("LiveMark").field(&self.dest).finish()
    }
}

impl Drop for LiveMark {
    fn drop(&mut self) {
        let mut map = self.of.lock();
        if let Some(n) = map.get_mut(&*self.dest) {
            *n -= 1;
            if *n == 0 {
                map.remove(&*self.dest);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_destination_is_held_while_one_of_its_marks_lives() {
        let live = Arc::new(LiveH2::default());
        assert!(!live.holds("a.test"));
        let one = live.mark("a.test");
        let two = live.mark("a.test");
        assert!(live.holds("a.test") && !live.holds("b.test"));
        drop(one);
        assert!(live.holds("a.test"));
        drop(two);
        assert!(!live.holds("a.test"));
        assert!(live.lock().is_empty(), "no entry is left behind");
    }
}
