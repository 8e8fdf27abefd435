//! The TLS session cache shared by every leaf: what rustls's `ServerSessionMemoryCache`
//! does, with a constant-time `take`.
//!
//! Why: rustls's cache finds a taken entry in its eviction queue by a linear scan
//! (`LimitedCache::remove`). TLS 1.3 resumption takes its ticket (single use), so with the
//! 4,096 entries sealgate keeps, every resumed handshake compared up to 4,096 keys: 4.8 % of
//! the proxy's CPU with a new TLS connection per request
//! (`benches/records/2026-12-03-session16-tls.md`). Here the entries sit in an LRU map
//! (`hashlink`, already built for rusqlite) where put, get, take and eviction are O(1).
//!
//! Invariants: at most `capacity` entries, evicted oldest first (a `get` does not refresh an
//! entry, as in rustls's cache); an entry older than `max_age` is never returned (rustls does
//! not check a stored session's age on TLS 1.2 resumption, so without this an id resumed over
//! and over would keep one master secret for ever); a taken entry is gone (a ticket resumes
//! once); the values are session secrets and are never formatted (`Debug` shows the count).

use std::fmt;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hashlink::LruCache;
use rustls::server::StoresServerSessions;

/// Sessions by id, oldest evicted first.
pub struct SessionCache {
    entries: Mutex<LruCache<Vec<u8>, Stored>>,
    max_age: Duration,
}

/// One session and when it was stored.
struct Stored {
    at: Instant,
    value: Vec<u8>,
}

impl SessionCache {
    /// An empty cache holding at most `capacity` (at least 1) sessions, each for at most
    /// `max_age`.
    pub fn new(capacity: usize, max_age: Duration) -> Self {
        SessionCache {
            entries: Mutex::new(LruCache::new(capacity.max(1))),
            max_age,
        }
    }

    /// How many sessions are held (expired ones included until they are looked up or
    /// evicted).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True when no session is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn fresh(&self, stored: &Stored) -> bool {
        stored.at.elapsed() <= self.max_age
    }

    /// A poisoned lock means a panic inside hashlink mid-operation, which may have left the
    /// map inconsistent: the sessions are dropped (resumption falls back to full handshakes)
    /// and the cache serves on, rather than failing every later handshake.
    fn lock(&self) -> MutexGuard<'_, LruCache<Vec<u8>, Stored>> {
        self.entries.lock().unwrap_or_else(|poisoned| {
            let mut entries = poisoned.into_inner();
            entries.clear();
            self.entries.clear_poison();
            entries
        })
    }
}

impl StoresServerSessions for SessionCache {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        let at = Instant::now();
        self.lock().insert(key, Stored { at, value });
        true
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        let mut entries = self.lock();
        let fresh = self.fresh(entries.peek(key)?);
        if !fresh {
            entries.remove(key);
            return None;
        }
        entries.peek(key).map(|s| s.value.clone())
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        let stored = self.lock().remove(key)?;
        self.fresh(&stored).then_some(stored.value)
    }

    fn can_cache(&self) -> bool {
        true
    }
}

impl fmt::Debug for SessionCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionCache")
            .field("sessions", &self.len())
            .field("max_age", &self.max_age)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(capacity: usize) -> SessionCache {
        SessionCache::new(capacity, Duration::from_secs(3600))
    }

    fn key(n: u32) -> Vec<u8> {
        let mut k = vec![0u8; 32];
        k[..4].copy_from_slice(&n.to_be_bytes());
        k
    }

    #[test]
    fn put_get_and_take_once() {
        let c = cache(8);
        assert!(c.put(key(1), b"one".to_vec()));
        assert_eq!(c.get(&key(1)).as_deref(), Some(&b"one"[..]));
        assert_eq!(c.take(&key(1)).as_deref(), Some(&b"one"[..]));
        assert_eq!(c.take(&key(1)), None, "a ticket resumes once");
        assert_eq!(c.get(&key(1)), None);
        assert!(c.is_empty());
    }

    #[test]
    fn holds_at_most_its_capacity_evicting_the_oldest() {
        let c = cache(3);
        for n in 0..3 {
            c.put(key(n), vec![n as u8]);
        }
        assert!(c.get(&key(0)).is_some(), "a get does not make 0 younger");
        c.put(key(3), vec![3]);
        assert_eq!(c.len(), 3);
        assert_eq!(c.get(&key(0)), None, "0 was the oldest");
        for n in [1, 2, 3] {
            assert!(c.get(&key(n)).is_some(), "{n}");
        }
    }

    #[test]
    fn a_session_older_than_max_age_is_not_returned() {
        let c = SessionCache::new(4, Duration::from_millis(50));
        c.put(key(1), b"old".to_vec());
        c.put(key(2), b"old".to_vec());
        assert!(c.get(&key(1)).is_some(), "fresh");
        std::thread::sleep(Duration::from_millis(80));
        c.put(key(3), b"new".to_vec());
        assert_eq!(c.get(&key(1)), None, "get of an expired session");
        assert_eq!(c.take(&key(2)), None, "take of an expired session");
        assert_eq!(c.len(), 1, "expired entries that were looked up are gone");
        assert_eq!(c.take(&key(3)).as_deref(), Some(&b"new"[..]));
    }

    #[test]
    fn a_put_for_a_held_id_replaces_it() {
        let c = cache(2);
        c.put(key(1), b"a".to_vec());
        c.put(key(1), b"b".to_vec());
        assert_eq!(c.len(), 1);
        assert_eq!(c.take(&key(1)).as_deref(), Some(&b"b"[..]));
    }

    #[test]
    fn debug_shows_no_session() {
        let c = cache(2);
        c.put(key(1), b"SECRET-SESSION-BYTES".to_vec());
        let shown = format!("{c:?}");
        assert!(!shown.contains("SECRET"), "{shown}");
        assert!(shown.contains("sessions: 1"), "{shown}");
        assert!(!shown.contains("83"), "no byte of the value: {shown}");
    }

    #[test]
    fn a_poisoned_lock_still_serves() {
        let c = std::sync::Arc::new(cache(2));
        c.put(key(1), b"a".to_vec());
        let held = c.clone();
        let _ = std::thread::spawn(move || {
            let _guard = held.entries.lock().unwrap();
            panic!("poison the lock");
        })
        .join();
        assert_eq!(c.take(&key(1)), None, "the sessions went with the poison");
        c.put(key(2), b"b".to_vec());
        assert_eq!(
            c.take(&key(2)).as_deref(),
            Some(&b"b"[..]),
            "and it serves on"
        );
    }
}
