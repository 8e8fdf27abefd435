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
//! flight on it is touched. An announced timeout within [`MARGIN`] poisons it at the answer's
//! head; a longer one `timeout − MARGIN` after the head, unless another answer began on it
//! since (that answer's own head then counts). The head comes before the answer's end, so the
//! connection is retired no later than `timeout − MARGIN` after it fell idle: sometimes
//! earlier (a long answer), which costs a new connection and never a request.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::client::legacy::connect::CaptureConnection;

use super::overhead::Overhead;

/// How long before the origin's announced timeout a connection is retired.
pub const MARGIN: Duration = Duration::from_secs(1);

/// Announced timeouts past this are left to the pool's own idle timeout.
const LONGEST: Duration = Duration::from_secs(24 * 3600);

/// The connection a request went on, for retiring it after its answer's head
/// ([`honour`]); put into the answer's extensions by the sender.
#[derive(Clone, Debug)]
pub struct Captured(pub CaptureConnection);

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

/// An answer's head arrived on the HTTP/1 connection `conn` (whose counts are `overhead`),
/// announcing `timeout`: the connection is retired at once, or `timeout − MARGIN` from now
/// unless another answer begins on it first. Must be called for every answer's head on the
/// connection, announcing or not (it counts them).
pub fn honour(overhead: &Arc<Overhead>, timeout: Option<Duration>, conn: Option<&Captured>) {
    let answer = overhead.answers.fetch_add(1, Ordering::AcqRel) + 1;
    let (Some(timeout), Some(Captured(conn))) = (timeout, conn) else {
        return;
    };
    let Some(wait) = timeout.checked_sub(MARGIN).filter(|w| !w.is_zero()) else {
        return poison(conn);
    };
    let (overhead, conn) = (Arc::clone(overhead), conn.clone());
    tokio::spawn(async move {
        tokio::time::sleep(wait).await;
        if overhead.answers.load(Ordering::Acquire) == answer {
            poison(&conn);
        }
    });
}

fn poison(conn: &CaptureConnection) {
    if let Some(c) = conn.connection_metadata().as_ref() {
        c.poison();
    }
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
}
