//! The bounded, single-flight cache of minted leaves, keyed by (sandbox id, host).
//!
//! Layout: `sandbox id → SandboxLeaves { host → Slot }`. Two levels let the hit path look up a
//! borrowed `&str` and `&LeafName` without allocating, and make [`LeafCache::remove_sandbox`]
//! one map removal.
//!
//! Single flight: a slot is an async `OnceCell`; every caller that misses on the same key waits
//! on the same cell, and exactly one of them runs the mint. If that mint fails (or its future is
//! dropped) the next waiter tries again.
//!
//! Eviction (when more than `capacity` leaves are cached): remove one *finished* leaf, first
//! from the sandbox that just inserted (a sandbox that walks through many hosts churns its own
//! entries, not its neighbours'), otherwise from the first other sandbox that has one. Which
//! leaf goes is whatever the hash map yields first, i.e. effectively random; that is cheap (no
//! recency bookkeeping on the hit path) and the cost of a wrong choice is one re-mint
//! (~50 µs). In-flight slots are never evicted.
//!
//! Lock order: the outer map's shard lock may be held while taking a sandbox's `RwLock`, never
//! the other way round.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, PoisonError, RwLock, RwLockWriteGuard};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use time::OffsetDateTime;
use tokio::sync::OnceCell;

use super::{CaError, Leaf, LeafName, SandboxCa};
use crate::metrics::LeafCounters;

/// A cached leaf is re-minted after this long, well inside its 199-day validity, so a
/// long-lived sandbox never receives an expired leaf. (A leaf cut short by its CA's notAfter is
/// refreshed at that moment instead, and the re-mint then fails with `CaExpired`.)
const REFRESH_AFTER: Duration = Duration::from_secs(180 * 24 * 3600);

/// Counters since the cache was created (relaxed atomics: exact totals, no ordering), read
/// from the cache's [`LeafCounters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Lookups answered from the cache.
    pub hits: u64,
    /// Lookups that had to wait for, or run, a mint.
    pub misses: u64,
    /// Leaves actually minted.
    pub mints: u64,
}

/// Bounded, single-flight leaf cache shared by all connections (see the module docs for the
/// eviction rule).
///
/// # Memory usage
/// About `capacity` leaves (each ~2 KB: two certificates, a key, a `ServerConfig`; TLS
/// sessions live in one process-wide cache), plus one small entry per sandbox that has cached
/// leaves. The bound can be exceeded briefly by concurrent inserts and by in-flight mints.
pub struct LeafCache {
    sandboxes: DashMap<Arc<str>, Arc<SandboxLeaves>>,
    capacity: usize,
    len: AtomicUsize,
    counters: LeafCounters,
}

/// A minted leaf and the moment it should be replaced.
#[derive(Debug)]
struct Minted {
    leaf: Arc<Leaf>,
    refresh_at: Instant,
}

impl Minted {
    fn fresh(&self, now: Instant) -> bool {
        now < self.refresh_at
    }
}

type Slot = OnceCell<Minted>;

/// One sandbox's leaves.
#[derive(Debug, Default)]
struct SandboxLeaves {
    inner: RwLock<Slots>,
}

/// Invariant: once `retired` is set the map is empty and stays empty, and the entry is no
/// longer reachable from `LeafCache::sandboxes`; every insert checks the flag under the same
/// lock, so `LeafCache::len` never counts a leaf that nobody can reach.
#[derive(Debug, Default)]
struct Slots {
    map: HashMap<LeafName, Arc<Slot>>,
    retired: bool,
}

impl SandboxLeaves {
    fn write(&self) -> RwLockWriteGuard<'_, Slots> {
        self.inner.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// The fresh leaf for `name`, if one is cached.
    fn get_fresh(&self, name: &LeafName, now: Instant) -> Option<Arc<Leaf>> {
        let slots = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        let minted = slots.map.get(name)?.get()?;
        minted.fresh(now).then(|| minted.leaf.clone())
    }

    /// The slot for `name` (a new one replaces a stale leaf), and whether one was added. An
    /// added slot is counted in `len` before the lock is released, so a concurrent `retire`
    /// can never subtract it first (which would wrap the counter). `None` if retired.
    fn slot(&self, name: &LeafName, now: Instant, len: &AtomicUsize) -> Option<(Arc<Slot>, bool)> {
        let mut slots = self.write();
        if slots.retired {
            return None;
        }
        if let Some(slot) = slots.map.get(name) {
            if slot.get().is_none_or(|m| m.fresh(now)) {
                return Some((slot.clone(), false));
            }
        }
        let slot = Arc::new(Slot::new());
        let added = slots.map.insert(name.clone(), slot.clone()).is_none();
        if added {
            len.fetch_add(1, Relaxed);
        }
        Some((slot, added))
    }

    /// Removes `name` if it still maps to the unfinished `slot`; returns whether it did.
    fn forget(&self, name: &LeafName, slot: &Arc<Slot>) -> bool {
        let mut slots = self.write();
        let same = slots
            .map
            .get(name)
            .is_some_and(|s| Arc::ptr_eq(s, slot) && !s.initialized());
        same && slots.map.remove(name).is_some()
    }

    /// Removes one finished leaf other than `keep`; returns whether it did.
    fn evict_one(&self, keep: Option<&LeafName>) -> bool {
        let mut slots = self.write();
        let victim = slots
            .map
            .iter()
            .find(|(name, slot)| Some(*name) != keep && slot.initialized())
            .map(|(name, _)| name.clone());
        victim.is_some_and(|name| slots.map.remove(&name).is_some())
    }

    /// Retires the entry (it has been, or is being, unlinked); returns how many leaves it held.
    fn retire(&self) -> usize {
        let mut slots = self.write();
        slots.retired = true;
        let n = slots.map.len();
        slots.map.clear();
        n
    }

    /// Retires the entry if it holds nothing; returns whether it did.
    fn retire_if_empty(&self) -> bool {
        let mut slots = self.write();
        slots.retired |= slots.map.is_empty();
        slots.retired
    }
}

impl LeafCache {
    /// An empty cache holding at most `capacity` leaves (at least one), counting into
    /// counters of its own (not registered anywhere).
    pub fn new(capacity: usize) -> Self {
        Self::with_counters(capacity, LeafCounters::default())
    }

    /// An empty cache counting hits, misses, mints and entries into `counters` (the daemon
    /// passes the ones its metrics registry owns).
    pub fn with_counters(capacity: usize, counters: LeafCounters) -> Self {
        Self {
            sandboxes: DashMap::new(),
            capacity: capacity.max(1),
            len: AtomicUsize::new(0),
            counters,
        }
    }

    /// The leaf for `name` in sandbox `sandbox_id`, minted by `ca` on a miss. Concurrent misses
    /// for the same key mint exactly once.
    ///
    /// The hit path is two hash lookups on borrowed keys (SipHash: host names come from the
    /// sandbox), a read lock, a clock read and an `Arc` clone, with no allocation (~150 ns
    /// optimised). A miss mints inline: ~50 µs of CPU on the calling task, less than handing it
    /// to a blocking thread would cost.
    ///
    /// `ca` must be the CA of `sandbox_id`; leaves are cached per sandbox id, so a sandbox's CA
    /// must not change while it has cached leaves (call [`LeafCache::remove_sandbox`] first).
    ///
    /// # Errors
    /// Whatever [`SandboxCa::mint_leaf`] or [`Leaf::new`] returns; a failed mint is not cached.
    pub async fn get_or_mint(
        &self,
        sandbox_id: &str,
        ca: &Arc<SandboxCa>,
        name: &LeafName,
    ) -> Result<Arc<Leaf>, CaError> {
        if let Some(leaf) = self.lookup(sandbox_id, name) {
            self.counters.hits.inc();
            return Ok(leaf);
        }
        self.counters.misses.inc();
        let (entry, slot) = self.slot(sandbox_id, name);
        let minted = slot.get_or_try_init(|| self.mint(ca, name)).await;
        let leaf = match minted {
            Ok(minted) => Ok(minted.leaf.clone()),
            Err(err) => {
                if entry.forget(name, &slot) {
                    self.len.fetch_sub(1, Relaxed);
                }
                Err(err)
            }
        };
        self.note_len();
        leaf
    }

    /// Publishes the entry count (called after every change of `len`).
    fn note_len(&self) {
        self.counters.entries.set(self.len() as i64);
    }

    /// Drops every cached leaf of `sandbox_id` (call when the sandbox ends). A mint in flight
    /// for it finishes for its waiters but is not kept.
    pub fn remove_sandbox(&self, sandbox_id: &str) {
        if let Some((_, entry)) = self.sandboxes.remove(sandbox_id) {
            self.len.fetch_sub(entry.retire(), Relaxed);
            self.note_len();
        }
    }

    /// Hit, miss and mint counters.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.counters.hits.get(),
            misses: self.counters.misses.get(),
            mints: self.counters.mints.get(),
        }
    }

    /// Number of cached leaves (finished or in flight).
    pub fn len(&self) -> usize {
        self.len.load(Relaxed)
    }

    /// True if no leaf is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lookup(&self, sandbox_id: &str, name: &LeafName) -> Option<Arc<Leaf>> {
        self.sandboxes
            .get(sandbox_id)?
            .get_fresh(name, Instant::now())
    }

    /// The sandbox entry and the slot for `name`, inserting (and evicting) as needed.
    fn slot(&self, sandbox_id: &str, name: &LeafName) -> (Arc<SandboxLeaves>, Arc<Slot>) {
        loop {
            let entry = self.entry(sandbox_id);
            // `None`: the entry was retired after we fetched it; the next fetch gets a new one.
            if let Some((slot, added)) = entry.slot(name, Instant::now(), &self.len) {
                if added {
                    self.shrink(&entry, name);
                }
                return (entry, slot);
            }
        }
    }

    fn entry(&self, sandbox_id: &str) -> Arc<SandboxLeaves> {
        if let Some(entry) = self.sandboxes.get(sandbox_id) {
            return entry.clone();
        }
        self.sandboxes
            .entry(Arc::from(sandbox_id))
            .or_default()
            .clone()
    }

    async fn mint(&self, ca: &SandboxCa, name: &LeafName) -> Result<Minted, CaError> {
        self.counters.mints.inc();
        let leaf = Leaf::new(ca.mint_leaf(name)?)?;
        Ok(Minted {
            leaf: Arc::new(leaf),
            refresh_at: refresh_at(ca, Instant::now()),
        })
    }

    /// Evicts finished leaves until the cache is within capacity or nothing more can go.
    fn shrink(&self, own: &SandboxLeaves, keep: &LeafName) {
        while self.len() > self.capacity {
            let evicted = own.evict_one(Some(keep)) || self.evict_elsewhere(own);
            if !evicted {
                return;
            }
            self.len.fetch_sub(1, Relaxed);
        }
    }

    /// Evicts one finished leaf from a sandbox other than `own`; unlinks sandboxes found empty.
    fn evict_elsewhere(&self, own: &SandboxLeaves) -> bool {
        let mut empty = Vec::new();
        let mut evicted = false;
        for item in self.sandboxes.iter() {
            let entry = item.value();
            if std::ptr::eq(entry.as_ref(), own) {
                continue;
            }
            if entry.evict_one(None) {
                evicted = true;
                break;
            }
            empty.push(item.key().clone());
        }
        self.unlink_empty(&empty);
        evicted
    }

    fn unlink_empty(&self, ids: &[Arc<str>]) {
        for id in ids {
            self.sandboxes
                .remove_if(id, |_, entry| entry.retire_if_empty());
        }
    }
}

impl fmt::Debug for LeafCache {
    /// Sizes and counters only (the entries are large and say nothing useful).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeafCache")
            .field("capacity", &self.capacity)
            .field("len", &self.len())
            .field("sandboxes", &self.sandboxes.len())
            .field("stats", &self.stats())
            .finish()
    }
}

/// When a leaf minted by `ca` at `now` must be replaced: after [`REFRESH_AFTER`], or when the
/// CA (and so the leaf, whose notAfter is clamped to it) expires, whichever comes first.
fn refresh_at(ca: &SandboxCa, now: Instant) -> Instant {
    let ca_left = ca.not_after() - OffsetDateTime::now_utc();
    let ca_left = Duration::try_from(ca_left).unwrap_or(Duration::ZERO);
    now + REFRESH_AFTER.min(ca_left)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dns(host: &str) -> LeafName {
        LeafName::Dns(host.to_owned())
    }

    fn ca(id: &str) -> Arc<SandboxCa> {
        Arc::new(SandboxCa::generate(id).expect("generate CA"))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_misses_mint_once() {
        let cache = Arc::new(LeafCache::new(16));
        let ca = ca("sbx_a");
        let tasks: Vec<_> = (0..32)
            .map(|_| {
                let (cache, ca) = (cache.clone(), ca.clone());
                tokio::spawn(async move {
                    cache
                        .get_or_mint("sbx_a", &ca, &dns("api.example.test"))
                        .await
                })
            })
            .collect();
        let mut leaves = Vec::new();
        for task in tasks {
            leaves.push(task.await.expect("join").expect("mint"));
        }
        let stats = cache.stats();
        assert_eq!(stats.mints, 1);
        assert_eq!(stats.hits + stats.misses, 32);
        assert!(leaves.iter().all(|l| Arc::ptr_eq(l, &leaves[0])));
        assert_eq!(cache.len(), 1);
    }

    #[tokio::test]
    async fn hit_returns_same_leaf() {
        let cache = LeafCache::new(4);
        let ca = ca("sbx_a");
        let first = cache
            .get_or_mint("sbx_a", &ca, &dns("a.test"))
            .await
            .unwrap();
        let second = cache
            .get_or_mint("sbx_a", &ca, &dns("a.test"))
            .await
            .unwrap();
        assert!(Arc::ptr_eq(&first, &second));
        let stats = cache.stats();
        assert_eq!((stats.hits, stats.misses, stats.mints), (1, 1, 1));
    }

    #[tokio::test]
    async fn capacity_bound_holds() {
        let cache = LeafCache::new(5);
        let (a, b) = (ca("sbx_a"), ca("sbx_b"));
        for i in 0..20 {
            let (id, ca) = if i % 3 == 0 {
                ("sbx_b", &b)
            } else {
                ("sbx_a", &a)
            };
            let name = dns(&format!("h{i}.example.test"));
            let leaf = cache.get_or_mint(id, ca, &name).await.unwrap();
            assert!(cache.len() <= 5, "len {} after {i}", cache.len());
            // The leaf just minted is never the one evicted.
            let again = cache.get_or_mint(id, ca, &name).await.unwrap();
            assert!(Arc::ptr_eq(&leaf, &again));
        }
        assert_eq!(cache.len(), 5);
        assert_eq!(cache.stats().mints, 20);
    }

    #[tokio::test]
    async fn new_sandbox_evicts_from_others_and_unlinks_empty() {
        let cache = LeafCache::new(1);
        let (a, b) = (ca("sbx_a"), ca("sbx_b"));
        cache
            .get_or_mint("sbx_a", &a, &dns("a.test"))
            .await
            .unwrap();
        cache
            .get_or_mint("sbx_b", &b, &dns("b.test"))
            .await
            .unwrap();
        assert_eq!(cache.len(), 1);
        cache
            .get_or_mint("sbx_a", &a, &dns("a.test"))
            .await
            .unwrap();
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.stats().mints, 3);
        assert!(cache.sandboxes.len() <= 2);
    }

    #[tokio::test]
    async fn remove_sandbox_drops_entries() {
        let cache = LeafCache::new(16);
        let (a, b) = (ca("sbx_a"), ca("sbx_b"));
        for host in ["x.test", "y.test", "z.test"] {
            cache.get_or_mint("sbx_a", &a, &dns(host)).await.unwrap();
        }
        cache
            .get_or_mint("sbx_b", &b, &dns("x.test"))
            .await
            .unwrap();
        assert_eq!(cache.len(), 4);
        cache.remove_sandbox("sbx_a");
        assert_eq!(cache.len(), 1);
        assert!(cache.lookup("sbx_a", &dns("x.test")).is_none());
        assert!(cache.lookup("sbx_b", &dns("x.test")).is_some());
        cache.remove_sandbox("sbx_missing");
        cache
            .get_or_mint("sbx_a", &a, &dns("x.test"))
            .await
            .unwrap();
        assert_eq!(cache.stats().mints, 5);
    }

    #[tokio::test]
    async fn failed_mint_is_not_cached() {
        let cache = LeafCache::new(4);
        let ca = ca("sbx_a");
        let bad = dns("bad\u{e9}.test");
        assert!(matches!(
            cache.get_or_mint("sbx_a", &ca, &bad).await,
            Err(CaError::InvalidName(_))
        ));
        assert_eq!(cache.len(), 0);
    }

    /// Leaves actually reachable, counted the slow way.
    fn reachable(cache: &LeafCache) -> usize {
        cache
            .sandboxes
            .iter()
            .map(|e| e.value().inner.read().unwrap().map.len())
            .sum()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn count_stays_exact_under_churn() {
        let cache = Arc::new(LeafCache::new(8));
        let cas: Arc<Vec<_>> = Arc::new((0..4).map(|i| ca(&format!("sbx_{i}"))).collect());
        let tasks: Vec<_> = (0..8u64)
            .map(|seed| {
                let (cache, cas) = (cache.clone(), cas.clone());
                tokio::spawn(async move {
                    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
                    for _ in 0..150 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let (sbx, host) = ((x % 4) as usize, (x >> 8) % 12);
                        let id = format!("sbx_{sbx}");
                        if host == 0 {
                            cache.remove_sandbox(&id);
                            continue;
                        }
                        let name = dns(&format!("h{host}.test"));
                        cache.get_or_mint(&id, &cas[sbx], &name).await.unwrap();
                        tokio::task::yield_now().await;
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(cache.len(), reachable(&cache));
        let stats = cache.stats();
        assert!(stats.mints <= stats.misses);
        assert!(stats.hits > 0 && stats.mints > 8);
    }

    #[test]
    fn debug_is_a_summary() {
        let shown = format!("{:?}", LeafCache::new(3));
        assert!(
            shown.starts_with("LeafCache { capacity: 3, len: 0"),
            "{shown}"
        );
    }

    /// A CA whose notAfter is `left` from now.
    fn short_lived_ca(left: time::Duration) -> SandboxCa {
        let now = OffsetDateTime::now_utc();
        let mut params = super::super::params::ca_params("sbx_short", now).unwrap();
        params.not_after = now + left;
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = params.self_signed(&key).unwrap();
        let key = crate::secret::SecretValue::new(key.serialize_der());
        SandboxCa::from_parts(&cert.pem(), &key).unwrap()
    }

    #[test]
    fn refresh_is_clamped_to_ca_expiry() {
        let now = Instant::now();
        assert_eq!(refresh_at(&ca("sbx_a"), now), now + REFRESH_AFTER);
        let day = refresh_at(&short_lived_ca(time::Duration::days(1)), now) - now;
        assert!(day > Duration::from_secs(86_000) && day <= Duration::from_secs(86_400));
        let gone = short_lived_ca(time::Duration::seconds(-5));
        assert_eq!(refresh_at(&gone, now), now);
        assert!(matches!(
            gone.mint_leaf(&dns("a.test")),
            Err(CaError::CaExpired)
        ));
    }

    #[test]
    fn stale_slot_is_replaced() {
        let (entry, len) = (SandboxLeaves::default(), AtomicUsize::new(0));
        let name = dns("a.test");
        let (slot, added) = entry.slot(&name, Instant::now(), &len).unwrap();
        assert!(added);
        let leaf = Leaf::new(ca("sbx_a").mint_leaf(&name).unwrap()).unwrap();
        let now = Instant::now();
        slot.set(Minted {
            leaf: Arc::new(leaf),
            refresh_at: now,
        })
        .unwrap();
        assert!(entry.get_fresh(&name, now).is_none());
        let (replacement, added) = entry.slot(&name, now, &len).unwrap();
        assert!(!added);
        assert_eq!(len.load(Relaxed), 1);
        assert!(!Arc::ptr_eq(&slot, &replacement));
    }
}
