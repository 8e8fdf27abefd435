//! An HTTP/1.1 origin's announced idle timeout (`Keep-Alive: timeout=N`: Node always, Apache
//! httpd when the request says `Connection: keep-alive`), honoured: a pooled connection is
//! not used again once it may have been idle for a second less than that.
//!
//! Why: an origin that closes a kept-alive connection at its idle timeout as a request goes
//! out leaves the request's fate unknown, and a POST is then not sent again (RFC 9110 §9.2.2;
//! [`crate::proxy::failure`]), so its client gets a 502. CI met that against Apache
//! (`KeepAliveTimeout 100ms`) on a loaded machine. Node's undici client retires connections
//! before an announced timeout likewise (a margin of one or two seconds, by version).
//!
//! How: the connection is *poisoned* (hyper-util's `Connected::poison`, reached through
//! `capture_connection`): the pool neither hands it out nor takes it back, and nothing in
//! flight on it is touched. An announced timeout within [`MARGIN`] poisons it as the answer's
//! head is taken (before the connection can be reused: hyper-util holds it until it hands over
//! the answer); a longer one `timeout − MARGIN` after the head of the last answer on it, by one
//! timer task per connection. The head is taken a round trip after the origin's idle clock
//! started at the earliest, so the margin also covers that; and never after it: a long answer
//! retires its connection early, which costs a handshake and never a request. A timeout at
//! or past the pool's own idle timeout is left to the pool, so a timer lives at most that long.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{header, HeaderMap, Response};
use hyper_util::client::legacy::connect::CaptureConnection;

use super::clock::{base, ms_since_base};
use super::overhead::{Overhead, OverheadOf};

/// How long before the origin's announced timeout a connection is retired.
pub const MARGIN: Duration = Duration::from_secs(1);

/// "Not to be retired".
const NEVER: u64 = u64::MAX;

/// The connection a request went on, captured for [`honour`].
#[derive(Clone, Debug)]
pub struct Captured(pub CaptureConnection);

/// One HTTP/1 connection's retirement: when, and whether a timer waits for it.
#[derive(Debug)]
pub struct Idle {
    /// When, in ms since [`base`] ([`NEVER`]: not to be retired; [`ms_since_base`] stays
    /// below it).
    retire_at: AtomicU64,
    /// A timer task waits for `retire_at` (at most one per connection).
    armed: AtomicBool,
}

impl Default for Idle {
    fn default() -> Idle {
        Idle {
            retire_at: AtomicU64::new(NEVER),
            armed: AtomicBool::new(false),
        }
    }
}

/// The idle timeout an answer's `Keep-Alive` header announces (`timeout=N`, in seconds), if
/// any.
pub fn announced(headers: &HeaderMap) -> Option<Duration> {
    const KEEP_ALIVE: http::HeaderName = http::HeaderName::from_static("keep-alive");
    let timeout = headers
        .get_all(KEEP_ALIVE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("timeout"))?;
    let secs: u64 = timeout.1.trim().trim_matches('"').parse().ok()?;
    Some(Duration::from_secs(secs))
}

/// Whether the answer ends its connection (`Connection: close`): the pool will not keep it.
fn closing(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("close"))
}

/// What an answer's head decides for its connection.
#[derive(Debug, PartialEq, Eq)]
enum Retire {
    /// Not to be retired here: no timeout announced, one the pool's own expiry comes before,
    /// or the answer ends the connection anyway.
    Never,
    /// Now: the announced timeout is within [`MARGIN`].
    Now,
    /// This long from now.
    After(Duration),
}

/// The decision for an answer with `headers` on a pool whose idle timeout is `pool_idle`.
fn decide(headers: &HeaderMap, pool_idle: Duration) -> Retire {
    if closing(headers) {
        return Retire::Never;
    }
    match announced(headers).map(|t| t.saturating_sub(MARGIN)) {
        Some(w) if w.is_zero() => Retire::Now,
        Some(w) if w < pool_idle => Retire::After(w),
        _ => Retire::Never,
    }
}

/// An answer's head was taken from the HTTP/1 connection its request went on (`conn`, when
/// captured; h2 answers carry no [`OverheadOf`] and are left alone). The connection is to be
/// retired `timeout − MARGIN` from now if the answer announces `timeout`, at once if that is
/// nothing, and not at all if it announces none, or one at or past `pool_idle` (the pool's
/// own expiry comes first). Each answer's head replaces the last's decision.
pub fn honour<B>(resp: &Response<B>, conn: Option<&Captured>, pool_idle: Duration) {
    let (Some(OverheadOf(overhead)), Some(Captured(conn))) = (resp.extensions().get(), conn) else {
        return;
    };
    let idle = &overhead.keep_alive;
    let wait = match decide(resp.headers(), pool_idle) {
        Retire::Never => return idle.retire_at.store(NEVER, Ordering::Release),
        Retire::Now => {
            idle.retire_at.store(NEVER, Ordering::Release);
            return poison(conn);
        }
        Retire::After(wait) => wait,
    };
    idle.retire_at
        .store(ms_since_base(Instant::now() + wait), Ordering::Release);
    if !idle.armed.swap(true, Ordering::AcqRel) {
        tokio::spawn(timer(Arc::clone(overhead), conn.clone()));
    }
}

/// Waits for the connection's `retire_at`, following it as later answers move it, and poisons
/// the connection when it comes; ends when there is nothing (left) to wait for.
async fn timer(overhead: Arc<Overhead>, conn: CaptureConnection) {
    let idle = &overhead.keep_alive;
    loop {
        let at = idle.retire_at.load(Ordering::Acquire);
        if at == NEVER {
            idle.armed.store(false, Ordering::Release);
            // An answer may have set a time between the load and the store.
            if idle.retire_at.load(Ordering::Acquire) == NEVER
                || idle.armed.swap(true, Ordering::AcqRel)
            {
                return;
            }
            continue;
        }
        tokio::time::sleep_until((base() + Duration::from_millis(at)).into()).await;
        if idle.retire_at.load(Ordering::Acquire) == at {
            idle.retire_at.store(NEVER, Ordering::Release);
            poison(&conn);
        }
    }
}

fn poison(conn: &CaptureConnection) {
    if let Some(c) = conn.connection_metadata().as_ref() {
        c.poison();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
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
        assert_eq!(secs(&["timeout=99999999999999999999"]), None);
    }

    #[test]
    fn a_timeout_within_the_margin_retires_at_once_and_one_past_the_pool_never() {
        let pool = Duration::from_secs(90);
        let after = |v: &[&str]| decide(&headers(v), pool);
        assert_eq!(after(&["timeout=0"]), Retire::Now, "Apache at 100 ms");
        assert_eq!(after(&["timeout=1"]), Retire::Now);
        assert_eq!(after(&["timeout=5"]), Retire::After(Duration::from_secs(4)));
        assert_eq!(
            after(&["timeout=90"]),
            Retire::After(Duration::from_secs(89))
        );
        assert_eq!(
            after(&["timeout=91"]),
            Retire::Never,
            "the pool's expiry comes first"
        );
        assert_eq!(after(&["timeout=86400"]), Retire::Never);
        assert_eq!(after(&["max=5"]), Retire::Never);
        let mut closing = headers(&["timeout=0"]);
        closing.append(header::CONNECTION, "close".parse().unwrap());
        assert_eq!(decide(&closing, pool), Retire::Never, "not kept anyway");
    }

    #[test]
    fn a_closing_answer_is_seen_among_other_tokens() {
        let mut h = HeaderMap::new();
        assert!(!closing(&h));
        h.append(header::CONNECTION, "Keep-Alive".parse().unwrap());
        assert!(!closing(&h));
        h.append(header::CONNECTION, "x-hop, Close".parse().unwrap());
        assert!(closing(&h));
    }
}
