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
//! server's GOAWAY, this side retiring it ([`super::limits`]), a read or write error, EOF, the
//! connection's end. And a destination is held only while a stream was opened on one of its
//! counted connections less than the pool's idle time (less a second) ago: hyper-util's pool
//! drops an h2 entry not checked out for `pool_idle_timeout` at its next sweep, while the
//! connection may stay open under a long answer (review h47d: a count that outlived the pool
//! entry sent each request of the next burst to dial on its own). Otherwise held bodies go to
//! the h2-only client, whose pool makes one connection attempt at a time: a GOAWAY does not
//! make every waiting request dial (the reason that client exists). At most one entry per
//! destination with a counted connection.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Per destination (the request URI's authority, as hyper-util hands it to the connector),
/// how many of one client's h2 connections to it are usable, and when the last stream was
/// opened on one of them.
#[derive(Default)]
pub struct LiveH2(Mutex<HashMap<Box<str>, Held>>);

/// A destination's counted connections.
struct Held {
    connections: usize,
    /// [`now_ms`] when a stream was last opened on one of them (or one was made).
    opened: Arc<AtomicU64>,
}

impl LiveH2 {
    /// True if a connection to `dest` is counted and had a stream opened on it less than
    /// `idle` (the pool's idle timeout) less a second ago.
    pub fn holds(&self, dest: &str, idle: Duration) -> bool {
        let Some(opened) = self
            .lock()
            .get(dest)
            .map(|h| h.opened.load(Ordering::Relaxed))
        else {
            return false;
        };
        let fresh = u64::try_from(idle.saturating_sub(MARGIN).as_millis()).unwrap_or(u64::MAX);
        now_ms().saturating_sub(opened) < fresh
    }

    /// Counts a connection to `dest` until the mark is dropped.
    pub fn mark(self: &Arc<Self>, dest: &str) -> LiveMark {
        let mut map = self.lock();
        let held = map.entry(dest.into()).or_insert_with(|| Held {
            connections: 0,
            opened: Arc::new(AtomicU64::new(0)),
        });
        held.connections += 1;
        held.opened.store(now_ms(), Ordering::Relaxed);
        LiveMark {
            of: self.clone(),
            dest: dest.into(),
            opened: held.opened.clone(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Box<str>, Held>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// How much sooner than the pool's idle timeout a destination stops being held: the pool's
/// sweep may drop the entry at the timeout itself.
const MARGIN: Duration = Duration::from_secs(1);

/// Now on [`super::clock`]: a clock the marks share without a lock.
fn now_ms() -> u64 {
    super::clock::ms_since_base(Instant::now())
}

/// One counted connection ([`LiveH2::mark`]); dropping it uncounts it.
pub struct LiveMark {
    of: Arc<LiveH2>,
    dest: Box<str>,
    opened: Arc<AtomicU64>,
}

impl LiveMark {
    /// A stream was opened on the connection (its pool entry was just checked out).
    pub fn opened(&self) {
        self.opened.store(now_ms(), Ordering::Relaxed);
    }
}

impl std::fmt::Debug for LiveMark {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("LiveMark").field(&self.dest).finish()
    }
}

impl Drop for LiveMark {
    fn drop(&mut self) {
        let mut map = self.of.lock();
        if let Some(held) = map.get_mut(&*self.dest) {
            held.connections -= 1;
            if held.connections == 0 {
                map.remove(&*self.dest);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDLE: Duration = Duration::from_secs(90);

    #[test]
    fn a_destination_is_held_while_one_of_its_marks_lives() {
        let live = Arc::new(LiveH2::default());
        assert!(!live.holds("a.test", IDLE));
        let one = live.mark("a.test");
        let two = live.mark("a.test");
        assert!(live.holds("a.test", IDLE) && !live.holds("b.test", IDLE));
        drop(one);
        assert!(live.holds("a.test", IDLE));
        drop(two);
        assert!(!live.holds("a.test", IDLE));
        assert!(live.lock().is_empty(), "no entry is left behind");
    }

    /// Held only while a stream was opened less than the idle timeout less a second ago.
    #[test]
    fn a_destination_whose_last_stream_is_as_old_as_the_pools_idle_time_is_not_held() {
        let live = Arc::new(LiveH2::default());
        // Idle 2 s: held for 1 s after a stream opens, a margin a busy test machine cannot
        // eat between two lines (review h48b: 200 ms could be).
        let idle = Duration::from_millis(2_000);
        let mark = live.mark("a.test");
        assert!(live.holds("a.test", idle));
        assert!(
            !live.holds("a.test", Duration::from_millis(900)),
            "within the margin"
        );
        std::thread::sleep(Duration::from_millis(1_100));
        assert!(!live.holds("a.test", idle));
        mark.opened();
        assert!(live.holds("a.test", idle));
    }
}
