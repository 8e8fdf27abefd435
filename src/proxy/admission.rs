//! Connection admission: which client connections may hold a slot, and for how long.
//!
//! Why: a connection costs a socket, a task and buffers from the moment it is accepted, but
//! its sandbox is known only once it identified itself (explicit: a request with valid
//! `Proxy-Authorization`; transparent: the source IP, known at accept). A single global pool
//! taken at accept lets anyone who can open TCP connections — silent ones cost nothing — hold
//! every slot until `header_read_timeout` and deny service to every sandbox.
//!
//! Budgets (`[proxy]` in proxy.toml, read at each accept so a reload applies to new
//! connections):
//! - `max_connections`: every open client connection on all listeners;
//! - `max_unauthenticated_connections`: connections whose sandbox is not known yet, and of
//!   those at most `max_unauthenticated_per_source` from one source IP;
//! - `max_connections_per_sandbox`: identified connections of one sandbox (a CONNECT tunnel
//!   counts as its connection until the tunnel closes);
//! - `unauthenticated_timeout_secs`: how long a connection may stay unidentified.
//!
//! A connection is *idle* once its task has been serving it for [`IDLE_AFTER`] without it
//! identifying itself: only then is it known to be silent. One that was accepted but whose
//! task has not run yet, or has just begun, may have its request waiting unread in its socket
//! — in a burst the accept loop runs ahead of the connections' tasks, and pushing out the
//! oldest of them closed connections that had sent valid credentials, silently (found from
//! outside: 300 connections at once from one address, 44 closed without an answer).
//!
//! Rules, in order, at accept:
//! 1. a source already holding its share of unidentified connections loses its oldest idle
//!    ones, until it is under its share, to make room (it competes only with itself); with
//!    none idle, the newcomer is admitted past the share (the unidentified budget still
//!    bounds it, and the burst identifies itself in a moment);
//! 2. when the unidentified budget is full, the oldest idle unidentified connection (any
//!    source) is closed to make room, else the oldest (the budget is a hard bound);
//! 3. when `max_connections` is full, likewise; only when every slot is held by identified
//!    connections is the new one refused.
//!
//! So silent connections never keep a new connection out: once idle they make room for it,
//! and only identified connections — at most `max_connections_per_sandbox` per sandbox — can
//! fill `max_connections`. Every connection closed to make room is counted
//! (`sealgate_connections_evicted_total`). On identification a connection leaves the unidentified budget
//! and counts against its sandbox; a sandbox at its cap gets 429 `too_many_connections` and
//! the connection is closed, without touching any other sandbox's budget.
//!
//! All counters live under one mutex, taken once at accept, once at identification and once
//! at close: eviction and release are synchronous, so a count never includes a connection
//! that was already pushed out (its task ends at its next poll).
//!
//! # Memory usage
//! One map entry per open connection (unidentified: ~64 bytes in two ordered maps) and one
//! per sandbox with open connections.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use tokio_util::sync::CancellationToken;

/// How long a connection's task serves it unidentified before it counts as idle (silent):
/// a client that sent its request is identified well within this once its task runs.
pub const IDLE_AFTER: Duration = Duration::from_millis(250);

/// How often [`Admission::unserved_evictions`] reports at most.
pub const WARN_EVERY: Duration = Duration::from_secs(10);

/// The budgets, from `[proxy]`.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// `max_connections`.
    pub max_connections: usize,
    /// `max_unauthenticated_connections`.
    pub max_unauthenticated: usize,
    /// `max_unauthenticated_per_source`.
    pub max_unauthenticated_per_source: usize,
    /// `max_connections_per_sandbox`.
    pub max_per_sandbox: usize,
}

/// Why an identified connection may not continue.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum AdmitError {
    /// The sandbox holds `max_connections_per_sandbox` connections already.
    #[error("sandbox has {0} connections open (proxy.max_connections_per_sandbox)")]
    SandboxAtCap(usize),
    /// The connection was pushed out (evicted) before it identified itself.
    #[error("connection was closed to make room before it identified itself")]
    Evicted,
}

/// What the connection budgets hold; one per proxy.
#[derive(Default)]
pub struct Admission {
    state: Mutex<State>,
    /// Connections closed to make room.
    evicted: Counter,
    /// Set when a connection that was not idle was closed (read without the lock at every
    /// accept; [`Admission::unserved_evictions`]).
    unserved: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct State {
    /// Counted connections (identified + unidentified).
    open: usize,
    next_id: u64,
    /// Unidentified connections, oldest first.
    pending: BTreeMap<u64, Pending>,
    /// Unidentified connection ids per source, oldest first.
    per_source: HashMap<IpAddr, BTreeSet<u64>>,
    /// Identified connections per sandbox id.
    per_sandbox: HashMap<Arc<str>, usize>,
    /// Connections closed to make room, ever.
    evicted: u64,
    /// Of those, ones that were not idle (a burst past `max_unauthenticated_connections` or
    /// `max_connections`) since the last warning, and when that was.
    unserved_evictions: u64,
    warned: Option<Instant>,
}

struct Pending {
    source: IpAddr,
    evict: CancellationToken,
    /// When its task began serving it ([`Slot::serving`]).
    serving: Option<Instant>,
}

impl Pending {
    fn idle(&self, now: Instant) -> bool {
        self.serving
            .is_some_and(|at| now.duration_since(at) >= IDLE_AFTER)
    }
}

/// One admitted connection's place in the budgets; released on drop. Shared (`Arc`) between
/// a connection and the CONNECT tunnel that outlives its HTTP/1 exchange.
pub struct Slot {
    admission: Arc<Admission>,
    id: u64,
    evicted: CancellationToken,
    /// The sandbox it counts against, once identified.
    sandbox: Mutex<Option<Arc<str>>>,
}

impl Admission {
    /// Admits a connection from `source`, making room by closing the oldest unidentified
    /// connections as the rules above say; `None` when `max_connections` is full of identified
    /// connections.
    pub fn admit(self: &Arc<Self>, source: IpAddr, limits: &Limits) -> Option<Arc<Slot>> {
        self.admit_at(source, limits, Instant::now())
    }

    fn admit_at(
        self: &Arc<Self>,
        source: IpAddr,
        limits: &Limits,
        now: Instant,
    ) -> Option<Arc<Slot>> {
        let mut st = self.lock();
        let evicted_before = st.evicted;
        while let Some(id) = st.idle_past_share(source, limits, now) {
            st.evict(id);
        }
        if st.pending.len() >= limits.max_unauthenticated {
            st.evict_oldest(now);
        }
        let full = st.open >= limits.max_connections && !st.evict_oldest(now);
        let evicted = st.evicted - evicted_before;
        if evicted > 0 {
            self.evicted.inc_by(evicted);
        }
        if st.unserved_evictions > 0 {
            self.unserved
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        if full {
            return None;
        }
        let (id, evict) = (st.next_id, CancellationToken::new());
        st.next_id += 1;
        st.open += 1;
        st.per_source.entry(source).or_default().insert(id);
        let pending = Pending {
            source,
            evict: evict.clone(),
            serving: None,
        };
        st.pending.insert(id, pending);
        Some(Arc::new(Slot {
            admission: self.clone(),
            id,
            evicted: evict,
            sandbox: Mutex::new(None),
        }))
    }

    /// An admission whose evictions count into `evicted` (a registered metric).
    pub fn counted(evicted: Counter) -> Admission {
        Admission {
            evicted,
            ..Admission::default()
        }
    }

    /// How many connections that were not idle were closed to make room since the last time
    /// this answered `Some`, at most once per [`WARN_EVERY`]: such a close may have hit a
    /// client whose request waited unread, so the operator hears of it (found from outside:
    /// a burst of 2,000 lost 787 with only the counter to show).
    pub fn unserved_evictions(&self) -> Option<u64> {
        if !self.unserved.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        let mut st = self.lock();
        let now = Instant::now();
        let due = st
            .warned
            .is_none_or(|at| now.duration_since(at) >= WARN_EVERY);
        if st.unserved_evictions == 0 || !due {
            return None;
        }
        st.warned = Some(now);
        self.unserved
            .store(false, std::sync::atomic::Ordering::Relaxed);
        Some(std::mem::take(&mut st.unserved_evictions))
    }

    /// Unidentified connections now (for tests and metrics).
    pub fn unauthenticated(&self) -> usize {
        self.lock().pending.len()
    }

    /// Identified connections of `sandbox` now.
    pub fn of_sandbox(&self, sandbox: &str) -> usize {
        self.lock().per_sandbox.get(sandbox).copied().unwrap_or(0)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section is a few map operations that cannot leave the counts
        // half-updated by a panic, so a poisoned lock is safe to reuse.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl State {
    /// Closes the unidentified connection `id`: it leaves every count now; its task sees the
    /// cancellation and ends.
    fn evict(&mut self, id: u64) {
        let Some(p) = self.pending.remove(&id) else {
            return;
        };
        self.forget_source(p.source, id);
        self.open -= 1;
        self.evicted += 1;
        p.evict.cancel();
    }

    /// The oldest idle connection of `source` while it holds its share or more (a burst may
    /// have taken it past: it goes back under its share as its connections turn idle).
    fn idle_past_share(&self, source: IpAddr, limits: &Limits, now: Instant) -> Option<u64> {
        let mine = self.per_source.get(&source)?;
        if mine.len() < limits.max_unauthenticated_per_source {
            return None;
        }
        mine.iter().copied().find(|id| self.pending[id].idle(now))
    }

    /// Evicts the oldest idle unidentified connection, else the oldest (counted in
    /// `unserved_evictions`); false when there is none.
    fn evict_oldest(&mut self, now: Instant) -> bool {
        if let Some(id) = self
            .pending
            .iter()
            .find(|(_, p)| p.idle(now))
            .map(|(id, _)| *id)
        {
            self.evict(id);
            return true;
        }
        match self.pending.keys().next().copied() {
            Some(id) => {
                self.evict(id);
                self.unserved_evictions += 1;
                true
            }
            None => false,
        }
    }

    fn forget_source(&mut self, source: IpAddr, id: u64) {
        if let Some(ids) = self.per_source.get_mut(&source) {
            ids.remove(&id);
            if ids.is_empty() {
                self.per_source.remove(&source);
            }
        }
    }
}

impl Slot {
    /// Moves the connection from the unidentified budget to `sandbox`'s. A connection that is
    /// already identified stays counted against its first sandbox (later requests on a
    /// keep-alive connection may name another; they do not move it).
    ///
    /// # Errors
    /// [`AdmitError::SandboxAtCap`] (the connection stays unidentified and is to be closed);
    /// [`AdmitError::Evicted`] when it was pushed out first.
    pub fn authenticate(
        &self,
        sandbox: &Arc<str>,
        max_per_sandbox: usize,
    ) -> Result<(), AdmitError> {
        let mut mine = self.sandbox.lock().unwrap_or_else(|e| e.into_inner());
        if mine.is_some() {
            return Ok(());
        }
        let mut st = self.admission.lock();
        if !st.pending.contains_key(&self.id) {
            return Err(AdmitError::Evicted);
        }
        let held = st.per_sandbox.get(sandbox).copied().unwrap_or(0);
        if held >= max_per_sandbox {
            return Err(AdmitError::SandboxAtCap(max_per_sandbox));
        }
        let p = st.pending.remove(&self.id).expect("checked above");
        st.forget_source(p.source, self.id);
        *st.per_sandbox.entry(sandbox.clone()).or_default() += 1;
        *mine = Some(sandbox.clone());
        Ok(())
    }

    /// Its task begins serving it: from [`IDLE_AFTER`] on it may be closed to make room.
    pub fn serving(&self) {
        self.serving_at(Instant::now());
    }

    fn serving_at(&self, now: Instant) {
        if let Some(p) = self.admission.lock().pending.get_mut(&self.id) {
            p.serving.get_or_insert(now);
        }
    }

    /// True once the connection has identified itself.
    pub fn is_authenticated(&self) -> bool {
        self.sandbox
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Resolves when the connection must be closed for admission reasons: it was evicted, or
    /// `timeout` passed while it was still unidentified. Never resolves for a connection that
    /// identified itself in time.
    pub async fn closed(&self, timeout: Duration) {
        tokio::select! {
            _ = self.evicted.cancelled() => {}
            _ = tokio::time::sleep(timeout) => {
                if self.is_authenticated() {
                    std::future::pending::<()>().await;
                }
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let sandbox = self
            .sandbox
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let mut st = self.admission.lock();
        match sandbox {
            Some(sb) => {
                if let Some(n) = st.per_sandbox.get_mut(&sb) {
                    *n -= 1;
                    if *n == 0 {
                        st.per_sandbox.remove(&sb);
                    }
                }
                st.open -= 1;
            }
            None => {
                if let Some(p) = st.pending.remove(&self.id) {
                    st.forget_source(p.source, self.id);
                    st.open -= 1;
                }
                // else: evicted, and already uncounted then.
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max: usize, unauth: usize, per_source: usize, per_sandbox: usize) -> Limits {
        Limits {
            max_connections: max,
            max_unauthenticated: unauth,
            max_unauthenticated_per_source: per_source,
            max_per_sandbox: per_sandbox,
        }
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn a_source_at_its_share_loses_its_own_oldest_idle_one() {
        let a = Arc::new(Admission::default());
        let l = limits(100, 10, 2, 10);
        let t0 = Instant::now();
        let first = a.admit_at(ip(1), &l, t0).unwrap();
        let second = a.admit_at(ip(1), &l, t0).unwrap();
        let other = a.admit_at(ip(2), &l, t0).unwrap();
        for s in [&first, &second, &other] {
            s.serving_at(t0);
        }
        let third = a.admit_at(ip(1), &l, t0 + IDLE_AFTER).unwrap();
        assert!(first.evicted.is_cancelled());
        assert_eq!(a.evicted.get(), 1);
        assert!(!second.evicted.is_cancelled() && !third.evicted.is_cancelled());
        assert!(!other.evicted.is_cancelled());
        assert_eq!(a.unauthenticated(), 3);
        drop(first);
        assert_eq!(
            a.unauthenticated(),
            3,
            "an evicted slot is not counted twice"
        );
    }

    /// A burst from one source: the accept loop runs ahead of the connections' tasks, whose
    /// requests wait unread. None of them is idle, so none is pushed out: the newcomers go
    /// past the source's share (an outside test lost 44 of 300 credentialed connections).
    #[test]
    fn a_burst_from_one_source_goes_past_its_share_instead_of_closing_its_oldest() {
        let a = Arc::new(Admission::default());
        let l = limits(100, 10, 2, 10);
        let t0 = Instant::now();
        let burst: Vec<_> = (0..5).map(|_| a.admit_at(ip(1), &l, t0).unwrap()).collect();
        burst[0].serving_at(t0);
        let later = a.admit_at(ip(1), &l, t0 + IDLE_AFTER / 2).unwrap();
        assert!(burst
            .iter()
            .chain([&later])
            .all(|s| !s.evicted.is_cancelled()));
        assert_eq!((a.unauthenticated(), a.evicted.get()), (6, 0));
    }

    #[test]
    fn a_full_unauthenticated_budget_pushes_out_the_oldest_idle_else_the_oldest() {
        let a = Arc::new(Admission::default());
        let l = limits(100, 3, 3, 10);
        let t0 = Instant::now();
        let slots: Vec<_> = (0..3).map(|i| a.admit_at(ip(i), &l, t0).unwrap()).collect();
        slots[1].serving_at(t0);
        let newcomer = a.admit_at(ip(9), &l, t0 + IDLE_AFTER).unwrap();
        assert!(slots[1].evicted.is_cancelled(), "the idle one");
        assert!(!slots[0].evicted.is_cancelled());
        let next = a.admit_at(ip(8), &l, t0 + IDLE_AFTER).unwrap();
        assert!(slots[0].evicted.is_cancelled(), "a hard bound: the oldest");
        assert_eq!(a.unserved_evictions(), Some(1), "reported");
        assert_eq!(a.unserved_evictions(), None, "once");
        assert!(!newcomer.evicted.is_cancelled() && !next.evicted.is_cancelled());
        assert_eq!(a.unauthenticated(), 3);
    }

    #[test]
    fn identified_connections_are_never_evicted_and_fill_max_connections() {
        let a = Arc::new(Admission::default());
        let l = limits(2, 2, 2, 10);
        let sb: Arc<str> = "sbx_a".into();
        let one = a.admit(ip(1), &l).unwrap();
        one.authenticate(&sb, 10).unwrap();
        let two = a.admit(ip(1), &l).unwrap();
        two.authenticate(&sb, 10).unwrap();
        assert!(
            a.admit(ip(2), &l).is_none(),
            "full of identified connections"
        );
        drop(one);
        let three = a.admit(ip(2), &l).unwrap();
        let four = a.admit(ip(3), &l).unwrap();
        assert!(
            three.evicted.is_cancelled(),
            "room made from the unidentified"
        );
        assert!(!four.evicted.is_cancelled() && !two.evicted.is_cancelled());
        assert_eq!(three.authenticate(&sb, 10), Err(AdmitError::Evicted));
    }

    #[test]
    fn a_sandbox_at_its_cap_does_not_touch_another_sandbox() {
        let a = Arc::new(Admission::default());
        let l = limits(100, 10, 10, 2);
        let (x, y): (Arc<str>, Arc<str>) = ("sbx_x".into(), "sbx_y".into());
        let held: Vec<_> = (0..2)
            .map(|_| {
                let s = a.admit(ip(1), &l).unwrap();
                s.authenticate(&x, 2).unwrap();
                s
            })
            .collect();
        let over = a.admit(ip(1), &l).unwrap();
        assert_eq!(over.authenticate(&x, 2), Err(AdmitError::SandboxAtCap(2)));
        let other = a.admit(ip(1), &l).unwrap();
        assert_eq!(other.authenticate(&y, 2), Ok(()));
        assert_eq!((a.of_sandbox("sbx_x"), a.of_sandbox("sbx_y")), (2, 1));
        drop(held);
        drop(other);
        assert_eq!((a.of_sandbox("sbx_x"), a.of_sandbox("sbx_y")), (0, 0));
        assert_eq!(over.authenticate(&x, 2), Ok(()), "room again");
    }

    #[test]
    fn authentication_is_sticky_and_counts_once() {
        let a = Arc::new(Admission::default());
        let l = limits(100, 10, 10, 1);
        let (x, y): (Arc<str>, Arc<str>) = ("sbx_x".into(), "sbx_y".into());
        let s = a.admit(ip(1), &l).unwrap();
        s.authenticate(&x, 1).unwrap();
        s.authenticate(&x, 1).unwrap();
        s.authenticate(&y, 1).unwrap();
        assert_eq!((a.of_sandbox("sbx_x"), a.of_sandbox("sbx_y")), (1, 0));
        assert_eq!(a.unauthenticated(), 0);
        drop(s);
        assert_eq!(a.lock().open, 0);
    }

    #[tokio::test]
    async fn unidentified_connections_time_out_identified_ones_do_not() {
        let a = Arc::new(Admission::default());
        let l = limits(100, 10, 10, 10);
        let t = Duration::from_millis(100);
        let silent = a.admit(ip(1), &l).unwrap();
        tokio::time::timeout(Duration::from_secs(5), silent.closed(t))
            .await
            .expect("closed at the deadline");
        let good = a.admit(ip(1), &l).unwrap();
        good.authenticate(&Arc::from("sbx_a"), 10).unwrap();
        let r = tokio::time::timeout(Duration::from_millis(400), good.closed(t)).await;
        assert!(r.is_err(), "an identified connection is not closed");
    }
}
