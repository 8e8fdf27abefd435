//! Who holds the admin listener's connection slots, and which of them a newcomer may take.
//!
//! Invariants:
//! - A connection that has sent a request carrying the admin token is *trusted* and is never
//!   evicted; nor is one with a request in flight.
//! - When every slot is taken, a newcomer evicts the oldest connection that is neither: one
//!   that has only sent half a head, or only unauthenticated requests and now sits idle. So
//!   any local process can still open connections without the token, but cannot keep the
//!   operator out by holding the slots with half-sent heads (an outside review: 200 of them
//!   slowed every admin call to ~10 s, the header timeout).
//! - An evicted connection is told once; it closes when its task sees the notice.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::Notify;

/// One admin connection as the slot table sees it.
#[derive(Default)]
pub struct Conn {
    trusted: AtomicBool,
    in_flight: AtomicUsize,
    evicted: AtomicBool,
    notice: Notify,
}

impl Conn {
    /// A request arrived; `authenticated` if it carried the admin token. Pair with
    /// [`Conn::finished`].
    pub fn started(&self, authenticated: bool) {
        if authenticated {
            self.trusted.store(true, Ordering::Relaxed);
        }
        self.in_flight.fetch_add(1, Ordering::AcqRel);
    }

    /// A request's response head went out.
    pub fn finished(&self) {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }

    /// Resolves when a newcomer has evicted this connection.
    pub async fn evicted(&self) {
        self.notice.notified().await;
    }

    fn evictable(&self) -> bool {
        !self.trusted.load(Ordering::Relaxed)
            && self.in_flight.load(Ordering::Acquire) == 0
            && !self.evicted.load(Ordering::Relaxed)
    }
}

/// The connections being served, oldest first.
#[derive(Default)]
pub struct Table {
    conns: Mutex<BTreeMap<u64, Arc<Conn>>>,
    next: AtomicUsize,
}

/// A connection's entry; removed from the table when dropped.
pub struct Entry {
    table: Arc<Table>,
    id: u64,
    /// The connection's state.
    pub conn: Arc<Conn>,
}

impl Table {
    /// Registers a new connection (the newest).
    pub fn enter(self: &Arc<Self>) -> Entry {
        let id = self.next.fetch_add(1, Ordering::Relaxed) as u64;
        let conn = Arc::new(Conn::default());
        self.lock().insert(id, conn.clone());
        Entry {
            table: self.clone(),
            id,
            conn,
        }
    }

    /// Evicts the oldest evictable connection; false if there is none.
    pub fn evict_one(&self) -> bool {
        let conns = self.lock();
        let Some(victim) = conns.values().find(|c| c.evictable()) else {
            return false;
        };
        victim.evicted.store(true, Ordering::Relaxed);
        victim.notice.notify_one();
        true
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<Conn>>> {
        self.conns.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.table.lock().remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_untrusted_idle_connection_goes_first() {
        let table = Arc::new(Table::default());
        let trusted = table.enter();
        trusted.conn.started(true);
        trusted.conn.finished();
        let busy = table.enter();
        busy.conn.started(false);
        let idle = table.enter();
        let newer = table.enter();
        assert!(table.evict_one());
        assert!(idle.conn.evicted.load(Ordering::Relaxed));
        assert!(!newer.conn.evicted.load(Ordering::Relaxed));
        assert!(table.evict_one(), "then the next one");
        assert!(newer.conn.evicted.load(Ordering::Relaxed));
        assert!(!table.evict_one(), "trusted and busy connections stay");
        busy.conn.finished();
        assert!(table.evict_one(), "an unauthenticated request that ended");
        drop((trusted, busy, idle, newer));
        assert!(table.lock().is_empty());
    }
}
