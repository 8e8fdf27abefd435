//! An HTTP/1.1 origin's announced idle timeout (`Keep-Alive: timeout=N`, sent by Apache httpd
//! and Node), honoured: a pooled connection idle for a second less than that is retired
//! before the origin closes it.
//!
//! Why: an origin that closes a kept-alive connection at its idle timeout as a request goes
//! out leaves the request's fate unknown, and a POST is then not sent again (RFC 9110 §9.2.2;
//! [`crate::proxy::failure`]), so its client gets a 502. CI met that against Apache
//! (`KeepAliveTimeout 100ms`) on a loaded machine. Node's undici client retires connections
//! the same way (a second before the announced timeout).
//!
//! How: the connection's reader ([`super::overhead::Counted`]) ends its reads (end of file) once
//! the connection has been idle — its last answer ended and nothing was written since — for
//! the limit; hyper then closes it, or, if a request was being handed to it at that moment,
//! gives the request back unsent and the pooled client sends it on another connection
//! (hyper reads before it writes). An armed timer closes an idle connection at the limit.
//!
//! Invariants: a connection is never retired while a request or answer is in flight on it
//! (a write since the last answer's head, or an answer not yet ended, keeps it busy), nor once
//! upgraded (a WebSocket relay); without the header nothing changes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How long before the origin's announced timeout a connection is retired (undici's default).
pub const MARGIN: Duration = Duration::from_secs(1);

/// Announced timeouts past this are left to the pool's own idle timeout.
const LONGEST: Duration = Duration::from_secs(24 * 3600);

/// "No limit announced" and "not idle".
const NONE: u64 = u64::MAX;

/// One connection's idle state, shared by its reader and its answers.
#[derive(Debug)]
pub struct KeepAlive {
    /// How long the connection may stay idle, in ms ([`NONE`]: unknown).
    limit_ms: AtomicU64,
    /// When it became idle, in ms since [`base`] ([`NONE`]: busy).
    idle_since: AtomicU64,
    /// Writes so far (each is part of a request).
    writes: AtomicU64,
    /// `writes` when the last answer's head arrived.
    writes_at_head: AtomicU64,
}

impl Default for KeepAlive {
    fn default() -> KeepAlive {
        KeepAlive {
            limit_ms: AtomicU64::new(NONE),
            idle_since: AtomicU64::new(NONE),
            writes: AtomicU64::new(0),
            writes_at_head: AtomicU64::new(0),
        }
    }
}

/// The instant the process's idle clocks count from.
fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    u64::try_from(base().elapsed().as_millis()).unwrap_or(NONE - 1)
}

impl KeepAlive {
    /// An answer's head arrived, announcing `timeout` (its `Keep-Alive` header), if any.
    pub fn answer_began(&self, timeout: Option<Duration>) {
        if let Some(t) = timeout {
            let limit = t.saturating_sub(MARGIN).as_millis();
            self.limit_ms
                .store(u64::try_from(limit).unwrap_or(NONE - 1), Ordering::Release);
        }
        self.idle_since.store(NONE, Ordering::Release);
        self.writes_at_head
            .store(self.writes.load(Ordering::Acquire), Ordering::Release);
    }

    /// The answer ended: the connection is idle unless a request was written since its head
    /// (hyper may hand the connection on before the answer's last frame is read here, and a
    /// request body may still be going out after an early answer).
    pub fn answer_ended(&self) {
        if self.writes.load(Ordering::Acquire) == self.writes_at_head.load(Ordering::Acquire) {
            self.idle_since.store(now_ms(), Ordering::Release);
        }
    }

    /// Bytes were written: a request is going out.
    pub fn wrote(&self) {
        self.writes.fetch_add(1, Ordering::AcqRel);
        self.idle_since.store(NONE, Ordering::Release);
    }

    /// When the idle connection is to be retired, if it is idle under an announced limit.
    pub fn retire_at(&self) -> Option<Instant> {
        let (limit, since) = (
            self.limit_ms.load(Ordering::Acquire),
            self.idle_since.load(Ordering::Acquire),
        );
        if limit == NONE || since == NONE {
            return None;
        }
        Some(base() + Duration::from_millis(since.saturating_add(limit)))
    }
}

/// The idle timeout an answer's `Keep-Alive` header announces (`timeout=N`, in seconds), if
/// any; one past [`LONGEST`] counts as none.
pub fn announced(headers: &http::HeaderMap) -> Option<Duration> {
    const KEEP_ALIVE: http::HeaderName = http::HeaderName::from_static("keep-alive");
    let timeout = headers
        .get_all(KEEP_ALIVE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("timeout"))?;
    let secs: u64 = timeout.1.trim().trim_matches('"').parse().ok()?;
    Some(Duration::from_secs(secs)).filter(|d| *d <= LONGEST)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&str]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for v in values {
            h.append("keep-alive", v.parse().unwrap());
        }
        h
    }

    #[test]
    fn the_timeout_is_read_from_what_apache_and_node_send() {
        let secs = |v: &[&str]| announced(&headers(v)).map(|d| d.as_secs());
        assert_eq!(secs(&["timeout=5, max=100"]), Some(5)); // Apache
        assert_eq!(secs(&["timeout=5"]), Some(5)); // Node
        assert_eq!(secs(&["max=3, TimeOut = 0"]), Some(0));
        assert_eq!(secs(&["max=3", "timeout=\"7\""]), Some(7));
        assert_eq!(secs(&[]), None);
        assert_eq!(secs(&["max=100"]), None);
        assert_eq!(secs(&["timeout=-1"]), None);
        assert_eq!(secs(&["timeout=5s"]), None);
        assert_eq!(
            secs(&["timeout=99999999999"]),
            None,
            "past a day: the pool's own"
        );
    }

    #[test]
    fn only_an_idle_connection_under_an_announced_limit_is_retired() {
        let k = KeepAlive::default();
        k.wrote();
        k.answer_began(None);
        k.answer_ended();
        assert_eq!(k.retire_at(), None, "no limit announced");
        k.wrote();
        k.answer_began(Some(Duration::from_secs(5)));
        assert_eq!(k.retire_at(), None, "the answer is still coming");
        let before = Instant::now();
        k.answer_ended();
        let at = k.retire_at().expect("idle");
        let after = at.saturating_duration_since(before);
        assert!(
            (Duration::from_millis(3_990)..=Duration::from_millis(4_010)).contains(&after),
            "{after:?}"
        );
        k.wrote();
        assert_eq!(k.retire_at(), None, "a request is going out");
    }

    #[test]
    fn a_request_written_before_the_last_answer_ended_keeps_the_connection_busy() {
        let k = KeepAlive::default();
        k.wrote();
        k.answer_began(Some(Duration::from_secs(5)));
        k.wrote(); // hyper handed the connection on before the answer's end was read here
        k.answer_ended();
        assert_eq!(k.retire_at(), None);
    }

    #[test]
    fn a_timeout_under_the_margin_retires_the_connection_as_its_answer_ends() {
        let k = KeepAlive::default();
        k.wrote();
        k.answer_began(Some(Duration::from_secs(0)));
        k.answer_ended();
        assert!(k.retire_at().expect("idle") <= Instant::now());
    }
}
