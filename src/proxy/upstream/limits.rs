//! Learns how many streams an HTTP/2 origin serves per connection, so that sealgate retires
//! its connections to that origin before the origin ends them.
//!
//! Why: nginx ends every h2 connection after `keepalive_requests` streams (1,000 by default)
//! with a GOAWAY. Now and then (about one such close in 50 under load) nginx 1.22 then closes
//! without answering the stream that reached the limit. That stream "might have been
//! processed" (RFC 9113 §6.8), so a POST on it cannot be sent again and the sandbox gets a
//! 502. A connection that never reaches the limit never meets that close, and never has
//! streams refused above a GOAWAY either.
//!
//! How: a graceful GOAWAY (`NO_ERROR`) that names one of our streams still waiting for its
//! answer tells how many of our streams the origin took on that connection (its
//! last-stream-id): nginx sends it as the stream reaching `keepalive_requests` arrives. An idle
//! timeout or a reload names a stream long answered and teaches nothing. The same count twice
//! in a row is taken as the origin's per-connection limit. Later connections to that origin
//! are retired by sealgate after [`StreamLimits::retire_after`] streams: a quarter below the
//! limit, which absorbs the streams already on their way when the retirement is decided as
//! long as they are fewer than a quarter of the limit (nginx: up to 128 concurrent streams
//! against 250; with a small limit and many concurrent requests some connections still reach
//! the origin's own GOAWAY, which is handled as before). Retiring is graceful: the connection
//! finishes every stream opened on it, takes no new one, and closes once idle
//! ([`super::goaway::RefuseAfterGoaway`]).
//!
//! Invariants: bounded (at most [`MAX_ORIGINS`] origins are remembered: a new one takes the
//! place of an unconfirmed one, or else of any, so a sandbox that answers under thousands of
//! names cannot keep other origins from ever being learned — outside review); a limit below [`MIN_LIMIT`] is never learned, so an origin can lower only its own
//! connection reuse, and not below that floor; no stream is failed by the retirement itself —
//! a request hyper holds for a stream slot when h2 sees the GOAWAY fails as it would at the
//! origin's own GOAWAY (idempotent ones are sent again, `proxy::failure`).

use dashmap::DashMap;

/// Origins remembered at most (a sandbox could otherwise grow the map with one wildcard).
pub const MAX_ORIGINS: usize = 4096;

/// The smallest per-connection limit learned. Lower counts are idle connections closing, not
/// a limit worth retiring early for.
pub const MIN_LIMIT: u32 = 8;

/// Per-origin stream limits learned from graceful GOAWAYs. Keyed by `host:port` as dialled.
#[derive(Debug, Default)]
pub struct StreamLimits {
    origins: DashMap<Box<str>, Learned>,
}

#[derive(Debug, Clone, Copy)]
struct Learned {
    /// The count the last graceful GOAWAY carried.
    last: u32,
    /// Confirmed: two graceful GOAWAYs in a row carried it.
    limit: Option<u32>,
}

impl StreamLimits {
    /// After how many streams a new connection to `origin` is retired, once its limit is known.
    pub fn retire_after(&self, origin: &str) -> Option<u32> {
        let limit = self.origins.get(origin)?.limit?;
        Some(limit - limit / 4)
    }

    /// The origin sent a graceful GOAWAY after taking `taken` of our streams on a connection.
    pub fn graceful_goaway(&self, origin: &str, taken: u32) {
        if taken < MIN_LIMIT {
            return;
        }
        if let Some(mut e) = self.origins.get_mut(origin) {
            if e.last == taken && e.limit != Some(taken) {
                tracing::debug!(
                    origin,
                    limit = taken,
                    "upstream h2: the origin ends connections after this many streams; \
                     retiring them earlier"
                );
                e.limit = Some(taken);
            }
            e.last = taken;
            return;
        }
        if self.origins.len() >= MAX_ORIGINS {
            self.make_room();
        }
        self.origins.insert(
            origin.into(),
            Learned {
                last: taken,
                limit: None,
            },
        );
    }

    /// Forgets one origin: an unconfirmed one if there is one, else any (a forgotten limit is
    /// learned again from the next two GOAWAYs). Scans at most [`MAX_ORIGINS`] entries, once
    /// per new origin while full.
    fn make_room(&self) {
        let victim = self
            .origins
            .iter()
            .find(|e| e.limit.is_none())
            .map(|e| e.key().clone())
            .or_else(|| self.origins.iter().next().map(|e| e.key().clone()));
        if let Some(k) = victim {
            self.origins.remove(&k);
        }
    }

    /// How many origins are remembered.
    pub fn len(&self) -> usize {
        self.origins.len()
    }

    /// True when no origin is remembered.
    pub fn is_empty(&self) -> bool {
        self.origins.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_count_twice_in_a_row_is_the_limit() {
        let l = StreamLimits::default();
        l.graceful_goaway("a:443", 1000);
        assert_eq!(l.retire_after("a:443"), None, "one GOAWAY proves nothing");
        l.graceful_goaway("a:443", 1000);
        assert_eq!(l.retire_after("a:443"), Some(750));
        assert_eq!(l.retire_after("b:443"), None, "per origin");
    }

    #[test]
    fn idle_closes_at_varying_counts_confirm_nothing_and_keep_a_learned_limit() {
        let l = StreamLimits::default();
        for n in [37, 12, 900, 41] {
            l.graceful_goaway("a:443", n);
        }
        assert_eq!(l.retire_after("a:443"), None);
        l.graceful_goaway("a:443", 1000);
        l.graceful_goaway("a:443", 1000);
        l.graceful_goaway("a:443", 30);
        assert_eq!(l.retire_after("a:443"), Some(750));
        l.graceful_goaway("a:443", 100);
        l.graceful_goaway("a:443", 100);
        assert_eq!(
            l.retire_after("a:443"),
            Some(75),
            "a lowered limit is learned"
        );
    }

    #[test]
    fn a_full_map_still_learns_new_origins() {
        let l = StreamLimits::default();
        l.graceful_goaway("real:443", 1000);
        l.graceful_goaway("real:443", 1000);
        for i in 0..MAX_ORIGINS + 10 {
            l.graceful_goaway(&format!("o{i}.attacker.test:443"), 100);
        }
        assert!(l.len() <= MAX_ORIGINS);
        assert_eq!(
            l.retire_after("real:443"),
            Some(750),
            "unconfirmed entries go first"
        );
        l.graceful_goaway("late:443", 200);
        l.graceful_goaway("late:443", 200);
        assert_eq!(l.retire_after("late:443"), Some(150), "learned while full");
        for i in 0..MAX_ORIGINS + 10 {
            let o = format!("c{i}.attacker.test:443");
            l.graceful_goaway(&o, 100);
            l.graceful_goaway(&o, 100);
        }
        assert!(l.len() <= MAX_ORIGINS);
        l.graceful_goaway("later:443", 300);
        l.graceful_goaway("later:443", 300);
        assert_eq!(
            l.retire_after("later:443"),
            Some(225),
            "confirmed entries make room too"
        );
    }

    #[test]
    fn tiny_counts_are_never_learned() {
        let l = StreamLimits::default();
        for _ in 0..4 {
            l.graceful_goaway("a:443", MIN_LIMIT - 1);
        }
        assert_eq!(l.retire_after("a:443"), None);
        assert!(l.is_empty());
        l.graceful_goaway("a:443", MIN_LIMIT);
        l.graceful_goaway("a:443", MIN_LIMIT);
        assert_eq!(l.retire_after("a:443"), Some(MIN_LIMIT - MIN_LIMIT / 4));
    }
}
