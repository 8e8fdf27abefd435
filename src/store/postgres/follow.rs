//! Following the shared database: every node applies changes made through any node's admin API
//! to its own running sandboxes, and knows how stale it is.
//!
//! How (one task per node, on the daemon's runtime, with its own connection — not the pool):
//! 1. `LISTEN sealgate_store_changed`. A writer's transaction moves `stores.generation` and
//!    notifies the store id at commit ([`super::CHANNEL`]); the payload is an id, never a value.
//! 2. Notifications are lost while the connection is down, so every `CHECK_INTERVAL` the task
//!    also reads the generations of every store with a live sandbox here and re-snapshots each
//!    store whose generation differs from the one it last applied. Right after (re)connecting it
//!    does this at once: a node catches up by itself.
//! 3. Every check that answered and was applied marks the node fresh ([`Health`]); a
//!    connection alone does not (a database that accepts connections and stalls its queries
//!    kept a node fresh at every reconnect). The lag (time since the last fresh mark) is
//!    exported as `sealgate_store_sync_lag_seconds`. With `max_staleness` set, a node cut off
//!    longer than that *locks* its sandboxes — no secret is unsealed anywhere (fail closed) —
//!    until it is back and a full check has re-applied every store.
//!
//! Applying a change goes through [`Target`] (implemented by the sandbox lifecycle) on a blocking
//! thread, since it reads the store. The proxy's per-request path never waits for any of this:
//! it reads the snapshot the follower last swapped in.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{mpsc, watch};
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{AsyncMessage, Client, NoTls, Socket};

use super::{DatabaseUrl, CHANNEL};

/// How often the generations are compared (bounds propagation time when a notification is lost).
pub const CHECK_INTERVAL: Duration = Duration::from_millis(250);

/// Wait between reconnection attempts.
const RETRY_INTERVAL: Duration = Duration::from_millis(250);

/// How often a store whose change could not be applied is tried again at the same generation.
const FAILING_RETRY: Duration = Duration::from_secs(2);

/// Notifications queued for the follower; more are dropped (the periodic check catches up).
/// Any role that can connect can NOTIFY the channel: an outside review grew every node by 8 KiB
/// per notification, without end, through the unbounded queue this replaced.
const NOTES_QUEUED: usize = 1024;

/// The longest payload taken as a store id (ids are 36-character UUIDs).
const MAX_NOTE: usize = 64;

/// Longest a connect or a check query may take before the connection counts as down.
const QUERY_TIMEOUT: Duration = Duration::from_secs(3);

/// What the follower drives: this node's live sandboxes.
pub trait Target: Send + Sync + 'static {
    /// Ids of the stores that have live sandboxes on this node.
    fn watched_stores(&self) -> Vec<String>;
    /// Re-snapshots this node's sandboxes of `store_id` from the database (blocking). A store
    /// that no longer exists is not an error: its sandboxes keep their snapshot.
    ///
    /// # Errors
    /// [`ApplyError`]: the change is tried again later.
    fn apply_store_change(&self, store_id: &str) -> Result<(), ApplyError>;
    /// Cut off too long (`true`): no secret may be unsealed anywhere until `false`. Does no
    /// I/O: the follower calls it inline, in the task that also runs the watchdog, so a lock
    /// and an unlock always land in the order they were decided (an unlock on a blocking
    /// thread could land after a later lock and leave the node unsealing while "locked").
    fn set_locked(&self, locked: bool);
    /// Ends every live sandbox whose row is gone (blocking); run once the node has its id back
    /// after it was out of its hands (a twin may have deleted them meanwhile), before any
    /// unlock.
    ///
    /// # Errors
    /// [`ApplyError`]: tried again at the next full check; a lock stays meanwhile.
    fn reconcile_rows(&self) -> Result<(), ApplyError>;
}

/// Whether this node holds its `[node] id` on the database (kept by the store,
/// [`super::PgStore::claim_node`]; read by the follower, which refuses to unseal while another
/// session holds it, and does not count itself current while the claim is unverified).
#[derive(Default)]
pub struct NodeClaim {
    taken: AtomicBool,
    /// The connection holding the id failed its probe or is gone and the id is not claimed
    /// again yet: the node may have lost it without knowing (a failover, a partition).
    unverified: AtomicBool,
    /// The id was out of this node's hands (its claim lost, or held elsewhere) since the last
    /// reconcile: sandboxes may have been deleted through a twin ([`Target::reconcile_rows`]).
    /// Set by any loss, not only by a twin seen: a twin that came and went while this node was
    /// cut off is never seen (re-check: the node served a sandbox deleted through it).
    out_of_hand: AtomicBool,
}

impl NodeClaim {
    /// Another daemon holds this node's id.
    pub fn taken_elsewhere(&self) -> bool {
        self.taken.load(Ordering::Acquire)
    }

    /// Records whether the id is held elsewhere; `true` if that changed.
    pub fn set_taken(&self, taken: bool) -> bool {
        if taken {
            self.out_of_hand.store(true, Ordering::Release);
        }
        self.taken.swap(taken, Ordering::AcqRel) != taken
    }

    /// Records whether the claim is unverified (see the field).
    pub fn set_unverified(&self, unverified: bool) {
        if unverified {
            self.out_of_hand.store(true, Ordering::Release);
        }
        self.unverified.store(unverified, Ordering::Release);
    }

    /// Why the node cannot count its id as its own, if it cannot.
    fn problem(&self, node: &str) -> Option<String> {
        if self.taken_elsewhere() {
            return Some(taken_reason(node));
        }
        self.unverified.load(Ordering::Acquire).then(|| {
            format!("node id '{node}' is not claimed on the database yet (its connection failed)")
        })
    }
}

fn taken_reason(node: &str) -> String {
    format!(
        "node id '{node}' is held by another daemon on this database: this node unseals nothing"
    )
}

/// Why a store's change was not applied.
#[derive(Debug)]
pub enum ApplyError {
    /// The database answered with data that cannot be applied (a corrupt or tampered row): the
    /// target has locked that store's sandboxes, so the node stays fresh for the others.
    Quarantined(String),
    /// The change could not be read or applied (the store read timed out, the database
    /// failed): the node is behind and must not count as fresh.
    NotApplied(String),
}

impl std::fmt::Display for ApplyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApplyError::Quarantined(why) | ApplyError::NotApplied(why) => f.write_str(why),
        }
    }
}

/// A store whose change this node has not applied yet.
struct Failing {
    generation: i64,
    tried_at: Instant,
    /// The store is quarantined ([`ApplyError::Quarantined`]); else the node is behind on it.
    quarantined: bool,
}

/// This node's view of its connection to the database. Shared with `/readyz`.
pub struct Health {
    epoch: Instant,
    /// Milliseconds after `epoch` of the last successful round trip.
    last_ok_ms: AtomicU64,
    online: AtomicBool,
    reason: Mutex<Option<String>>,
    /// The node's claim on its id: while another daemon holds it, the node refuses to unseal
    /// whatever its lag ([`Health::refusing`]).
    claim: Arc<NodeClaim>,
    /// This node's id, named by [`Health::refusal`].
    node: String,
}

impl Health {
    /// The health of node `node`, starting connected, as `claim` says.
    pub fn watching(node: &str, claim: Arc<NodeClaim>) -> Health {
        Health {
            epoch: Instant::now(),
            last_ok_ms: AtomicU64::new(0),
            online: AtomicBool::new(true),
            reason: Mutex::new(None),
            claim,
            node: node.to_owned(),
        }
    }

    /// Time since the last successful round trip with the database.
    pub fn lag(&self) -> Duration {
        let last = Duration::from_millis(self.last_ok_ms.load(Ordering::Acquire));
        self.epoch.elapsed().saturating_sub(last)
    }

    /// The node refuses to unseal whatever its lag (another daemon holds its id): `/readyz`
    /// says so at once, and sandbox creates and deletes are refused from that moment.
    pub fn refusing(&self) -> bool {
        self.claim.taken_elsewhere()
    }

    /// Why the node refuses whatever its lag, if it does ([`Health::refusing`]). Read from the
    /// claim, not from [`Health::problem`]: that is the follower's last reason, which a failed
    /// check overwrites (or has not yet replaced with this one), and `/readyz` said "disconnected"
    /// or "not claimed yet" of a node whose id another daemon held.
    pub fn refusal(&self) -> Option<String> {
        self.refusing().then(|| taken_reason(&self.node))
    }

    /// `None` while connected; else why not.
    pub fn problem(&self) -> Option<String> {
        if self.online.load(Ordering::Acquire) {
            return None;
        }
        let reason = self.reason.lock().unwrap_or_else(PoisonError::into_inner);
        Some(reason.clone().unwrap_or_else(|| "disconnected".into()))
    }

    /// The start read every store it restored since `began`: the node is current as of then.
    /// The start can take seconds (thousands of sandboxes), and its length is no lag: without
    /// this the follower's watchdog locked a node at every slow start, until its first check.
    pub fn restored(&self, began: Instant) {
        self.ok_at(began);
    }

    /// A check asked at `asked` answered and everything it found was applied: the node is
    /// current as of `asked` — not as of the end of the applying, which can take seconds while
    /// changes made meanwhile are not applied (review: a long catch-up then read as no lag).
    fn ok_at(&self, asked: Instant) {
        let at = asked.saturating_duration_since(self.epoch).as_millis() as u64;
        self.last_ok_ms.fetch_max(at, Ordering::AcqRel);
        if !self.online.swap(true, Ordering::AcqRel) {
            tracing::info!("database connection restored");
        }
    }

    fn down(&self, why: String) {
        if self.online.swap(false, Ordering::AcqRel) {
            tracing::warn!(error = %why, "not current with the database; serving from snapshots");
        }
        *self.reason.lock().unwrap_or_else(PoisonError::into_inner) = Some(why);
    }
}

/// The follower of one node.
pub struct Follower {
    /// Where to listen (redacted in every message).
    pub url: DatabaseUrl,
    /// This node's id, shown as `application_name` `sealgate/<id>/follower` in
    /// `pg_stat_activity` (the pool's connections are `sealgate/<id>`).
    pub node: String,
    /// Shared health.
    pub health: Arc<Health>,
    /// `[store] max_staleness_secs`, if on.
    pub max_staleness: Option<Duration>,
    /// `sealgate_store_sync_lag_seconds`.
    pub lag_gauge: Gauge<f64, AtomicU64>,
    /// Whether this node still holds its id.
    pub claim: Arc<NodeClaim>,
    /// `[store] reread_secs`: how often every watched store is re-read whatever its
    /// generation. The generation is a bare column: a database writer could make a later
    /// change carry a generation this node had applied already (`setval` on its sequence, or
    /// a trigger that keeps it), and the change — a revocation — was never applied here while
    /// the node reported itself current (outside pass). Re-reading bounds that to this long;
    /// a re-read that changes nothing swaps nothing.
    pub reread: Duration,
}

/// The generation recorded for a store found deleted once its last state is applied
/// (generations come from a sequence, so never negative).
const DELETED: i64 = -1;

/// Per-connection state: the generation applied per store.
#[derive(Default)]
struct Applied {
    generations: HashMap<String, i64>,
    /// When each store was last read and applied ([`Follower::reread`]).
    read_at: HashMap<String, Instant>,
    /// Stores whose last change could not be applied, with the generation and time of the
    /// last try (logged once until it applies).
    failing: HashMap<String, Failing>,
}

impl Follower {
    /// Runs until `shutdown` turns true: follows the database, and beside it a watchdog that
    /// every [`CHECK_INTERVAL`] exports the lag and locks the node once it is past
    /// `max_staleness`, whatever the follower is waiting for. The lock had been decided only
    /// when the follower came round, so a store read that hung (5 s) or a connect (3 s) held
    /// it back past `max_staleness`, serving what a change had revoked.
    pub async fn run(self, target: Arc<dyn Target>, shutdown: watch::Receiver<bool>) {
        let locked = AtomicBool::new(false);
        let watchdog = async {
            let mut tick = tokio::time::interval(CHECK_INTERVAL);
            loop {
                tick.tick().await;
                self.report(&target, &locked);
            }
        };
        tokio::select! {
            () = self.follow(&target, &locked, shutdown) => {}
            () = watchdog => {}
        }
    }

    /// Sessions one after another, until `shutdown` turns true.
    async fn follow(
        &self,
        target: &Arc<dyn Target>,
        locked: &AtomicBool,
        mut shutdown: watch::Receiver<bool>,
    ) {
        use futures_util::FutureExt as _;
        let mut applied = Applied::default();
        loop {
            // A panic in a session (a bug) ends that session, not the follower: a dead follower
            // stops every change reaching this node while its health looked fine.
            let session = self.session(target, &mut applied, locked, &mut shutdown);
            let ended = match std::panic::AssertUnwindSafe(session).catch_unwind().await {
                Ok(ended) => ended,
                Err(_) => {
                    applied.generations.clear();
                    Err("the follower failed (a bug, logged above); reconnecting".into())
                }
            };
            match ended {
                Ok(()) => return,
                Err(why) => self.health.down(why),
            }
            tokio::select! {
                _ = tokio::time::sleep(RETRY_INTERVAL) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// One connection's life: LISTEN, catch up, then notifications and periodic checks.
    /// `Ok` only on shutdown.
    async fn session(
        &self,
        target: &Arc<dyn Target>,
        applied: &mut Applied,
        locked: &AtomicBool,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), String> {
        // A connection is not freshness: a database that accepts connections and stalls its
        // queries kept a node "fresh" at every reconnect (review). Only a check that answered
        // and was applied counts ([`Self::check`]).
        let (client, mut notes) = self.connect().await?;
        if locked.load(Ordering::Acquire) {
            // Back after a lock: every store is re-applied (into the held real snapshots; the
            // lock stays) before the first full check unlocks.
            applied.generations.clear();
        }
        let mut tick = tokio::time::interval(CHECK_INTERVAL);
        loop {
            let (ids, full) = tokio::select! {
                note = notes.recv() => match note {
                    Some(id) => (vec![id], false),
                    None => return Err("the database closed the connection".into()),
                },
                _ = tick.tick() => (target.watched_stores(), true),
                _ = shutdown.changed() => return Ok(()),
            };
            if full {
                self.due_rereads(applied, &ids);
            }
            let asked = Instant::now();
            self.check(&client, target, applied, ids, full, asked)
                .await?;
            if full && self.health.problem().is_none() && self.reconciled(target).await {
                self.unlock(target, locked);
            }
        }
    }

    /// Forgets the applied generation of the stores read longest ago, once past `reread`, so
    /// that this check reads them again: a share of them per check (`CHECK_INTERVAL` of
    /// `reread`), so each is read once per period without one check reading every store —
    /// which held every notification, and the node's freshness, back for as long (review: at
    /// ~6 ms a store, 150 stores made `/readyz` flap every minute).
    fn due_rereads(&self, applied: &mut Applied, watched: &[String]) {
        let share = watched.len() as u128 * CHECK_INTERVAL.as_millis();
        let per_check = share.div_ceil(self.reread.as_millis().max(1)).max(1);
        let per_check = usize::try_from(per_check).unwrap_or(usize::MAX);
        let now = Instant::now();
        let mut due: Vec<(&String, Instant)> = watched
            .iter()
            .filter_map(|id| Some((id, *applied.read_at.get(id)?)))
            .filter(|(_, at)| now.duration_since(*at) >= self.reread)
            .collect();
        due.sort_by_key(|(_, at)| *at);
        for (id, _) in due.into_iter().take(per_check) {
            applied.generations.remove(id);
        }
    }

    /// After the id was out of this node's hands, ends the sandboxes deleted meanwhile
    /// (through a twin) before anything else; `false` while that is still to do (it failed:
    /// tried again at the next full check, and the lock, if any, stays).
    async fn reconciled(&self, target: &Arc<dyn Target>) -> bool {
        if !self.claim.out_of_hand.swap(false, Ordering::AcqRel) {
            return true;
        }
        let t = target.clone();
        let done = tokio::task::spawn_blocking(move || t.reconcile_rows()).await;
        if matches!(done, Ok(Ok(()))) {
            return true;
        }
        self.claim.out_of_hand.store(true, Ordering::Release);
        tracing::warn!("could not compare the sandboxes with their rows after the node id came back: tried again at the next check");
        false
    }

    /// Lifts the lock once current again: connected, the id its own, and current as of less
    /// than `max_staleness` ago — a catch-up that took longer is current only as of when it
    /// asked, and unlocking on it had the watchdog lock again at its next look, with an ERROR
    /// (outside re-check). No await between the last look at the node's state and the unlock:
    /// the watchdog, polled by the same task, cannot lock in between.
    fn unlock(&self, target: &Arc<dyn Target>, locked: &AtomicBool) {
        if self.health.problem().is_some() || self.claim.problem(&self.node).is_some() {
            return;
        }
        if self
            .max_staleness
            .is_some_and(|max| self.health.lag() > max)
        {
            return;
        }
        if locked.swap(false, Ordering::AcqRel) {
            target.set_locked(false);
            tracing::info!("store reachable again: sandboxes unlocked after catching up");
        }
    }

    async fn connect(&self) -> Result<(Client, mpsc::Receiver<String>), String> {
        match self.url.tls() {
            Some(tls) => self.connect_with(tls).await,
            None => self.connect_with(NoTls).await,
        }
    }

    /// [`Self::connect`] with the URL's TLS choice.
    async fn connect_with<T>(&self, tls: T) -> Result<(Client, mpsc::Receiver<String>), String>
    where
        T: MakeTlsConnect<Socket>,
        T::Stream: Send + 'static,
    {
        let url = &self.url;
        let mut config = self.url.pg_config();
        config.application_name(format!("sealgate/{}/follower", self.node));
        let connecting = config.connect(tls);
        let (client, mut conn) = tokio::time::timeout(QUERY_TIMEOUT, connecting)
            .await
            .map_err(|_| format!("database {url}: connect timed out"))?
            .map_err(|e| format!("database {url} unreachable: {}", super::causes(&e)))?;
        let (tx, rx) = mpsc::channel(NOTES_QUEUED);
        tokio::spawn(async move {
            while let Some(msg) = std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                match msg {
                    // A hint only: any role that can connect may NOTIFY this channel. A payload
                    // that is no store id, or one past a full queue, is dropped; the periodic
                    // check finds what it would have named.
                    Ok(AsyncMessage::Notification(n)) if n.payload().len() <= MAX_NOTE => {
                        let _ = tx.try_send(n.payload().to_owned());
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        });
        timed(client.batch_execute(&format!("LISTEN {CHANNEL}")))
            .await
            .map_err(|e| format!("database {url}: LISTEN failed: {e}"))?;
        Ok((client, rx))
    }

    /// Compares the generations of `ids` (those with live sandboxes here) with what was
    /// applied, and applies each store that moved.
    ///
    /// Only a full check (every watched store) asked at `asked` makes the node current as of
    /// `asked`; a check of one notified store only ever says it is not.
    async fn check(
        &self,
        client: &Client,
        target: &Arc<dyn Target>,
        applied: &mut Applied,
        ids: Vec<String>,
        full: bool,
        asked: Instant,
    ) -> Result<(), String> {
        let watched: HashSet<String> = target.watched_stores().into_iter().collect();
        let ids: Vec<String> = ids.into_iter().filter(|id| watched.contains(id)).collect();
        let rows = timed(client.query(
            "SELECT id, generation FROM stores WHERE id = ANY($1)",
            &[&ids],
        ))
        .await
        .map_err(|e| format!("database {}: generation check failed: {e}", self.url))?;
        applied.generations.retain(|id, _| watched.contains(id));
        applied.failing.retain(|id, _| watched.contains(id));
        applied.read_at.retain(|id, _| watched.contains(id));
        // A row that does not decode (a NULL written by hand) is an error of the check, never a
        // panic: the follower task died on one, silently, and revocations stopped (review).
        let mut current: HashMap<String, i64> = rows
            .iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect::<Result<_, tokio_postgres::Error>>()
            .map_err(|e| format!("database {}: a stores row does not decode: {e}", self.url))?;
        // Deleted stores: their last state is applied once (`Target::apply_store_change`
        // reads it from where the deletion kept it), however many changes this node missed.
        for id in ids {
            current.entry(id).or_insert(DELETED);
        }
        for (id, generation) in current {
            if applied.generations.get(&id) == Some(&generation) {
                applied.failing.remove(&id);
                continue;
            }
            // A store that failed at this generation is tried again only now and then: it is
            // read whole each time, and a tampered row of 32 MiB kept PostgreSQL busy at every
            // poll (review). A new generation (a repair, a change) is tried at once.
            let tried = applied.failing.get(&id);
            if tried
                .is_some_and(|f| f.generation == generation && f.tried_at.elapsed() < FAILING_RETRY)
            {
                continue;
            }
            let t = target.clone();
            let sid = id.clone();
            let outcome = tokio::task::spawn_blocking(move || t.apply_store_change(&sid))
                .await
                .map_err(|e| e.to_string())?;
            // Retried every [`FAILING_RETRY`] and reported once until it applies. What was
            // applied before no longer stands (a quarantine may hold its sandboxes): a repair
            // that brings the store back to that very generation (a restored backup) must be
            // applied, or the quarantine outlived the fault (outside review).
            if let Err(e) = outcome {
                applied.generations.remove(&id);
                let failing = Failing {
                    generation,
                    tried_at: Instant::now(),
                    quarantined: matches!(e, ApplyError::Quarantined(_)),
                };
                if applied.failing.insert(id.clone(), failing).is_none() {
                    tracing::error!(store = %id, error = %e, "a change of this store cannot be applied");
                }
                continue;
            }
            applied.failing.remove(&id);
            applied.read_at.insert(id.clone(), Instant::now());
            applied.generations.insert(id, generation);
        }
        // Fresh once every change is applied, not when the query is sent or the rows arrive. A
        // quarantined store (a corrupt row: its sandboxes are locked) is not an outage; a store
        // whose change could not be read is: the generation query had answered, the read of
        // the store then timed out, and the node counted as fresh while it served the value the
        // change had revoked (seen under load: a stall that began between the two).
        match self.not_current(applied) {
            None if full => self.health.ok_at(asked),
            None => {}
            Some(why) => self.health.down(why),
        }
        Ok(())
    }

    /// Why this node is not current although its check answered: a change it could not read,
    /// or its id held by another daemon or not verified as its own.
    fn not_current(&self, applied: &Applied) -> Option<String> {
        if let Some(why) = self.claim.problem(&self.node) {
            return Some(why);
        }
        let (id, _) = applied.failing.iter().find(|(_, f)| !f.quarantined)?;
        Some(format!("a change of store {id} is not applied yet"))
    }

    /// Updates the lag gauge and locks the node's sandboxes once cut off too long, or while
    /// another daemon holds this node's id.
    fn report(&self, target: &Arc<dyn Target>, locked: &AtomicBool) {
        let lag = self.health.lag();
        self.lag_gauge.set(lag.as_secs_f64());
        if self.claim.taken_elsewhere() {
            self.health.down(taken_reason(&self.node));
            if !locked.swap(true, Ordering::AcqRel) {
                target.set_locked(true);
            }
            return;
        }
        let Some(max) = self.max_staleness else {
            return;
        };
        if lag > max && !locked.swap(true, Ordering::AcqRel) {
            tracing::error!(
                cut_off_secs = lag.as_secs(),
                max_staleness_secs = max.as_secs(),
                "cut off from the database longer than store.max_staleness_secs: refusing to unseal"
            );
            target.set_locked(true);
        }
    }
}

async fn timed<T>(
    fut: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, String> {
    match tokio::time::timeout(QUERY_TIMEOUT, fut).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The refusal is read from the claim: the follower's last problem (a check that timed out,
    /// the claim not verified yet) must not stand in for "held by another daemon" in `/readyz`.
    #[test]
    fn a_refusal_names_the_taken_id_whatever_the_followers_last_problem() {
        let claim = Arc::new(NodeClaim::default());
        let health = Health::watching("node-c", claim.clone());
        assert_eq!(health.refusal(), None);
        claim.set_unverified(true);
        health.down("timed out".into());
        assert_eq!(health.refusal(), None, "unverified is not taken");
        assert!(claim.set_taken(true));
        let why = health.refusal().expect("refusing");
        assert!(
            why.contains("node id 'node-c' is held by another daemon"),
            "{why}"
        );
        assert_eq!(health.problem().as_deref(), Some("timed out"));
        claim.set_taken(false);
        assert_eq!(health.refusal(), None);
    }
}
