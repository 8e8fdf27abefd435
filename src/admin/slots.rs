//! Who holds the admin listener's connection slots, and which of them a newcomer may take.
//!
//! Invariants:
//! - A connection is *open*, *trusted* or *evicted*. It becomes trusted when a request
//!   carrying the admin token starts on it, evicted when a newcomer takes its slot, and never
//!   leaves evicted. Each move is one compare-and-swap, so a request that started with the
//!   running token is never cut short by an eviction, and an evicted connection runs no
//!   request at all (it is closed; a head parsed before it closes is answered 503).
//! - Trust is for the token the connection sent: once a reload has replaced it (its
//!   [`super::AdminToken::generation`] moved on), an idle connection trusted under the old
//!   one is evictable like an open one. A leaked token had kept every slot after the
//!   rotation, the operator's new token locked out until a restart (outside re-check).
//! - When every slot is taken, a newcomer evicts the oldest open connection that is at least
//!   [`GRACE`] old (time for its first head to arrive), one without a request in flight first;
//!   only when every open connection is younger does it take the oldest of those.
//!   An open connection's requests carry no token: health probes and 401s, cheap to lose. So
//!   any local process can still connect without the token, but cannot keep the operator out
//!   by holding the slots, whether with half-sent heads (an outside review: 200 of them slowed
//!   every admin call to ~10 s, the header timeout) or with unauthenticated requests kept in
//!   flight (`/readyz` queued on the store's lock; a later review).
//! - An evicted connection is told once; it closes when its task sees the notice.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// How long a new connection is safe from eviction.
pub const GRACE: Duration = Duration::from_millis(250);

const OPEN: u8 = 0;
const TRUSTED: u8 = 1;
const EVICTED: u8 = 2;

/// One admin connection as the slot table sees it.
pub struct Conn {
    state: AtomicU8,
    /// The token generation of its last request that carried the token.
    generation: AtomicU64,
    in_flight: AtomicUsize,
    born: Instant,
    notice: Notify,
}

impl Conn {
    fn new() -> Conn {
        Conn {
            state: AtomicU8::new(OPEN),
            generation: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            born: Instant::now(),
            notice: Notify::new(),
        }
    }

    /// A request arrived; `authenticated` with the token generation it matched if it carried
    /// the admin token. False if the connection was evicted: the request must not run. Pair
    /// with [`Conn::finished`] either way.
    pub fn started(&self, authenticated: Option<u64>) -> bool {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        let state = if let Some(generation) = authenticated {
            self.generation.fetch_max(generation, Ordering::AcqRel);
            match self
                .state
                .compare_exchange(OPEN, TRUSTED, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => TRUSTED,
                Err(now) => now,
            }
        } else {
            self.state.load(Ordering::Acquire)
        };
        state != EVICTED
    }

    /// A request's response head went out.
    pub fn finished(&self) {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }

    /// Resolves when a newcomer has evicted this connection.
    pub async fn evicted(&self) {
        self.notice.notified().await;
    }

    /// Open → evicted, with the notice; trusted → evicted too when trusted under a token
    /// older than generation `current` and idle. False if it stays (or was evicted already).
    fn evict(&self, current: u64) -> bool {
        let stale = self.generation.load(Ordering::Acquire) < current && self.idle();
        let from: &[u8] = if stale { &[OPEN, TRUSTED] } else { &[OPEN] };
        let moved = from.iter().any(|&s| {
            self.state
                .compare_exchange(s, EVICTED, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        });
        if moved {
            self.notice.notify_one();
        }
        moved
    }

    fn idle(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0
    }
}

/// The connections being served, oldest first.
pub struct Table {
    conns: Mutex<BTreeMap<u64, Arc<Conn>>>,
    next: AtomicUsize,
    grace: Duration,
}

impl Default for Table {
    fn default() -> Self {
        Table::with_grace(GRACE)
    }
}

/// A connection's entry; removed from the table when dropped.
pub struct Entry {
    table: Arc<Table>,
    id: u64,
    /// The connection's state.
    pub conn: Arc<Conn>,
}

impl Table {
    /// A table whose connections are safe from eviction for their first `grace`.
    pub fn with_grace(grace: Duration) -> Table {
        Table {
            conns: Mutex::default(),
            next: AtomicUsize::new(0),
            grace,
        }
    }

    /// Registers a new connection (the newest).
    pub fn enter(self: &Arc<Self>) -> Entry {
        let id = self.next.fetch_add(1, Ordering::Relaxed) as u64;
        let conn = Arc::new(Conn::new());
        self.lock().insert(id, conn.clone());
        Entry {
            table: self.clone(),
            id,
            conn,
        }
    }

    /// Evicts an open connection (or an idle one trusted under a token older than generation
    /// `current`): the oldest past its grace, idle ones first; else the oldest still in its
    /// grace, idle ones first (never waiting on the grace: that would cap how fast a full
    /// listener takes connections off the backlog). False if none is evictable.
    pub fn evict_one(&self, current: u64) -> bool {
        let conns = self.lock();
        let now = Instant::now();
        let tier = |aged: bool, idle: bool| {
            conns.values().filter(move |c| {
                (now.saturating_duration_since(c.born) >= self.grace) == aged && c.idle() == idle
            })
        };
        let mut order = tier(true, true)
            .chain(tier(true, false))
            .chain(tier(false, true))
            .chain(tier(false, false));
        order.any(|c| c.evict(current))
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

    fn evicted(c: &Conn) -> bool {
        c.state.load(Ordering::Relaxed) == EVICTED
    }

    #[test]
    fn the_oldest_open_connection_goes_first_idle_before_busy() {
        let table = Arc::new(Table::with_grace(Duration::ZERO));
        let trusted = table.enter();
        assert!(trusted.conn.started(Some(0)));
        trusted.conn.finished();
        let busy = table.enter();
        assert!(busy.conn.started(None));
        let idle = table.enter();
        let newer = table.enter();
        assert!(table.evict_one(0));
        assert!(evicted(&idle.conn) && !evicted(&newer.conn) && !evicted(&busy.conn));
        assert!(table.evict_one(0), "then the next idle one");
        assert!(evicted(&newer.conn));
        assert!(
            table.evict_one(0),
            "then one with an unauthenticated request in flight"
        );
        assert!(evicted(&busy.conn));
        assert!(!table.evict_one(0), "a trusted connection stays");
        assert!(!evicted(&trusted.conn));
        drop((trusted, busy, idle, newer));
        assert!(table.lock().is_empty());
    }

    /// Trusting and evicting exclude each other: whichever comes first wins, and an evicted
    /// connection runs no request, with the token or without.
    #[test]
    fn an_evicted_connection_runs_no_request_and_a_trusted_one_is_never_evicted() {
        let table = Arc::new(Table::with_grace(Duration::ZERO));
        let a = table.enter();
        assert!(table.evict_one(0));
        assert!(!a.conn.started(Some(0)), "evicted before its head was read");
        assert!(!a.conn.started(None));
        let b = table.enter();
        assert!(b.conn.started(Some(0)));
        b.conn.finished();
        assert!(!table.evict_one(0), "b is trusted, a already evicted");
    }

    /// A connection trusted under a replaced token is evictable once idle; one that sent the
    /// new token is not.
    #[test]
    fn trust_under_a_replaced_token_ends_with_it() {
        let table = Arc::new(Table::with_grace(Duration::ZERO));
        let (old, renewed) = (table.enter(), table.enter());
        assert!(old.conn.started(Some(0)));
        assert!(renewed.conn.started(Some(0)));
        old.conn.finished();
        renewed.conn.finished();
        assert!(!table.evict_one(0), "both trusted under the running token");
        assert!(renewed.conn.started(Some(1)));
        renewed.conn.finished();
        let busy_old = table.enter();
        assert!(busy_old.conn.started(Some(0)));
        assert!(table.evict_one(1));
        assert!(evicted(&old.conn) && !evicted(&renewed.conn));
        assert!(!table.evict_one(1), "one with a request in flight stays");
        busy_old.conn.finished();
        assert!(table.evict_one(1));
        assert!(evicted(&busy_old.conn));
    }

    /// A connection in its grace goes only when every open one is in its grace, and then the
    /// oldest first: the grace never stops the listener from making room.
    #[test]
    fn connections_in_their_grace_go_last_but_do_go() {
        let table = Arc::new(Table::with_grace(Duration::from_millis(200)));
        let old = table.enter();
        std::thread::sleep(Duration::from_millis(250));
        let (young, younger) = (table.enter(), table.enter());
        assert!(table.evict_one(0));
        assert!(evicted(&old.conn) && !evicted(&young.conn));
        assert!(table.evict_one(0));
        assert!(evicted(&young.conn) && !evicted(&younger.conn));
    }
}
