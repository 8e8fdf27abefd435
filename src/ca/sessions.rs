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
//! Invariants: at most `capacity` entries; a taken entry is gone (a ticket resumes once);
//! the values are session secrets and are never formatted (`Debug` shows the count only).

use std::fmt;
use std::sync::{Mutex, MutexGuard, PoisonError};

use hashlink::LruCache;
use rustls::server::StoresServerSessions;

/// Sessions by id, least recently used evicted first.
pub struct SessionCache {
    entries: Mutex<LruCache<Vec<u8>, Vec<u8>>>,
}

impl SessionCache {
    /// An empty cache holding at most `capacity` (at least 1) sessions.
    pub fn new(capacity: usize) -> Self {
        SessionCache {
            entries: Mutex::new(LruCache::new(capacity.max(1))),
        }
    }

    /// How many sessions are held.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True when no session is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A panic elsewhere cannot leave the map half-changed (every operation is one call on
    /// it), so a poisoned lock is taken over rather than failing every later handshake.
    fn lock(&self) -> MutexGuard<'_, LruCache<Vec<u8>, Vec<u8>>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl StoresServerSessions for SessionCache {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        self.lock().insert(key, value);
        true
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.lock().get(key).cloned()
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.lock().remove(key)
    }

    fn can_cache(&self) -> bool {
        true
    }
}

impl fmt::Debug for SessionCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionCache")
            .field("sessions", &self.len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u32) -> Vec<u8> {
        let mut k = vec![0u8; 32];
        k[..4].copy_from_slice(&n.to_be_bytes());
        k
    }

    #[test]
    fn put_get_and_take_once() {
        let c = SessionCache::new(8);
        assert!(c.put(key(1), b"one".to_vec()));
        assert_eq!(c.get(&key(1)).as_deref(), Some(&b"one"[..]));
        assert_eq!(c.take(&key(1)).as_deref(), Some(&b"one"[..]));
        assert_eq!(c.take(&key(1)), None, "a ticket resumes once");
        assert_eq!(c.get(&key(1)), None);
        assert!(c.is_empty());
    }

    #[test]
    fn holds_at_most_its_capacity_evicting_the_least_recent() {
        let c = SessionCache::new(3);
        for n in 0..3 {
            c.put(key(n), vec![n as u8]);
        }
        assert!(c.get(&key(0)).is_some(), "0 is now the most recent");
        c.put(key(3), vec![3]);
        assert_eq!(c.len(), 3);
        assert_eq!(c.get(&key(1)), None, "1 was the least recent");
        for n in [0, 2, 3] {
            assert!(c.get(&key(n)).is_some(), "{n}");
        }
    }

    #[test]
    fn a_put_for_a_held_id_replaces_it() {
        let c = SessionCache::new(2);
        c.put(key(1), b"a".to_vec());
        c.put(key(1), b"b".to_vec());
        assert_eq!(c.len(), 1);
        assert_eq!(c.take(&key(1)).as_deref(), Some(&b"b"[..]));
    }

    #[test]
    fn debug_shows_no_session() {
        let c = SessionCache::new(2);
        c.put(key(1), b"SECRET-SESSION-BYTES".to_vec());
        let shown = format!("{c:?}");
        assert!(!shown.contains("SECRET"), "{shown}");
        assert!(shown.contains("sessions: 1"), "{shown}");
    }

    #[test]
    fn a_poisoned_lock_still_serves() {
        let c = std::sync::Arc::new(SessionCache::new(2));
        c.put(key(1), b"a".to_vec());
        let held = c.clone();
        let _ = std::thread::spawn(move || {
            let _guard = held.entries.lock().unwrap();
            panic!("poison the lock");
        })
        .join();
        assert_eq!(c.take(&key(1)).as_deref(), Some(&b"a"[..]));
    }
}
