//! The PostgreSQL [`Store`] (fleet mode): many daemons ("nodes") share one database.
//!
//! How the synchronous [`Store`] trait meets an async driver: the store owns a small tokio
//! runtime of its own (one worker thread) that runs the connection pool (deadpool-postgres over
//! tokio-postgres). Each trait method spawns its query there and blocks the *calling* thread
//! until it answers or `OP_TIMEOUT` passes — through `block_in_place` when that thread is a
//! worker of the daemon's runtime, whose other tasks then move to another thread. Callers are the admin API, sandbox creation and the
//! follower's refreshes — never the proxy's per-request path, which only reads in-memory
//! snapshots. A separate runtime means a call works from any thread, inside or outside the
//! daemon's runtime (a `block_on` there would panic), and a hung database costs the admin
//! caller a bounded wait, not a stuck proxy.
//!
//! Invariants (besides the trait's):
//! - Every value is sealed with the same AEAD and associated data as in SQLite, through
//!   [`seal_secret`] / `rows::RawSecret::into_record` and the crypto module's per-row AAD functions, so a
//!   row copied between stores, secrets or databases fails to open.
//! - A write that seals verifies the key-check record in its own transaction (`FOR SHARE`),
//!   and a rotation holds that row `FOR UPDATE`: a node still on the old key can never write a
//!   row under it once a rotation has committed.
//! - A change that running sandboxes must see (secret put/delete, allowlist update, store
//!   delete) moves `stores.generation` and sends `NOTIFY sealgate_store_changed, '<store id>'`
//!   in the same transaction: ids only, never a value ([`follow`]).
//! - Sandbox rows carry their node; this store loads and purges only its own node's rows.
//! - No error text contains the database password ([`DatabaseUrl`]).
//! - Every `stores` and `secrets` row carries `policy_mac` ([`crypto::StorePolicy`],
//!   [`crypto::SecretPolicy`], as in SQLite); every read that returns a record or metadata
//!   verifies it and a mismatch is [`StoreError::Corrupt`], like an altered ciphertext. Every
//!   write that changes a policy (or a secret's version) writes its new MAC in the same
//!   statement; a rotation re-MACs every row under the new key after verifying it under the old.

pub mod follow;
mod ops;
mod schema;
pub mod url;

use std::cell::Cell;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use deadpool_postgres::{Manager, Object, Pool};
use time::OffsetDateTime;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{NoTls, Socket};

use super::crypto::{self, MasterKey};
use super::{
    RotationStats, SandboxRow, SecretMeta, SecretRecord, Store, StoreError, StoreListing,
    StoreRecord,
};
use crate::secret::{Location, SecretValue};

pub use follow::{Follower, Health, NodeClaim};
pub use url::{DatabaseUrl, CA_FILES_WITHOUT_TLS};

/// The channel every change is announced on; the payload is a store id.
pub const CHANNEL: &str = "sealgate_store_changed";

/// Longest a store call waits for the database (pool wait + connect + query) before answering
/// [`StoreError::Unavailable`].
const OP_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs `wait` (a blocking wait for the database) so that it never holds a worker of the
/// daemon's runtime: on a multi-thread runtime worker, `block_in_place` first hands that
/// worker's other tasks (admin requests, background tasks) to another thread, so a slow or
/// locked database stalls only the caller. Elsewhere it just runs — which on a proxy worker
/// (single-threaded) would stall its connections; nothing on the proxy path calls the store.
fn off_the_workers<T>(wait: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(wait),
        _ => wait(),
    }
}

/// Connections kept per node (one of them holds the node's id, [`PgStore::claim_node`]).
const POOL_SIZE: usize = 8;

/// First key of the node-id advisory locks (the second is `hashtext(node_id)`): "sgnd".
const NODE_LOCK_CLASS: i32 = 0x7367_6e64;

/// Plaintext of the key-check record of a database whose rows predate policy MACs (same as
/// SQLite).
const KEY_CHECK_PLAINTEXT: &[u8] = b"sealgate key check";

/// Plaintext of the key-check record once every row carries its policy MAC (same as SQLite).
const KEY_CHECK_PLAINTEXT_V2: &[u8] = b"sealgate key check v2: policy MACs";

/// Plaintext of the key-check record once, also, every sandbox row's CA key is bound to its
/// columns, `node_id` included (same as SQLite).
const KEY_CHECK_PLAINTEXT_V3: &[u8] = b"sealgate key check v3: policy MACs, bound sandbox rows";

/// `meta.key` of the key-check record.
const KEY_CHECK_ROW: &str = "key_check";

/// `[node] id` rules: 1–64 of `A-Z a-z 0-9 . _ -`, so it is safe in logs, metrics and SQL text.
///
/// # Errors
/// Why the id is refused.
pub fn check_node_id(id: &str) -> Result<(), &'static str> {
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if id.is_empty() || id.len() > 64 || !id.chars().all(ok) {
        return Err("must be 1-64 characters of A-Z, a-z, 0-9, '.', '_', '-'");
    }
    Ok(())
}

/// The machine's host name cut to a valid node id ("node" if it has none). Read with
/// `gethostname(2)`, not from `/proc/sys/kernel/hostname`: the shipped unit's `ProcSubset=pid`
/// hides `/proc/sys`, and every node of a fleet was "node" (outside pass: the second refused to
/// start).
pub fn default_node_id() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most that many bytes.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let len = if rc == 0 {
        buf.iter().position(|&b| b == 0).unwrap_or(buf.len())
    } else {
        0
    };
    let name = String::from_utf8_lossy(&buf[..len]);
    let id: String = name
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        .take(64)
        .collect();
    if id.is_empty() {
        "node".to_owned()
    } else {
        id
    }
}

/// What the async side shares: the pool, the key, this node and the (redacted) location.
struct Db {
    pool: Pool,
    /// The connection holding this node's id ([`PgStore::claim_node`]) while the daemon runs.
    node_claim: std::sync::Mutex<Option<ClaimConn>>,
    key: RwLock<Arc<MasterKey>>,
    node_id: String,
    url: DatabaseUrl,
    /// Test hook: make the next rotation fail after re-sealing everything, before commit.
    #[cfg(test)]
    fail_rotation_before_commit: std::sync::atomic::AtomicBool,
}

impl Db {
    /// Closes every idle pooled connection. Called when an operation timed out: its connection
    /// went back to the pool when the operation was dropped, and one that stopped answering
    /// (a half-open link: a firewall or NAT that lost its state) looks healthy to the pool's
    /// check (it is not closed), so it was handed to later operations, each of which waited
    /// the whole timeout (found from outside: every call drawing it answered 503 after 5 s,
    /// until the link was cut by hand). Which idle connection it is cannot be told, so all go;
    /// new ones are made on demand.
    fn drop_idle_connections(&self) {
        let dropped = self.pool.retain(|_, _| false).removed.len();
        tracing::warn!(
            dropped,
            "a database operation timed out: idle database connections closed"
        );
    }

    async fn client(&self) -> Result<Object, StoreError> {
        self.pool.get().await.map_err(|e| {
            StoreError::Unavailable(format!("database {} unreachable: {}", self.url, causes(&e)))
        })
    }

    fn key(&self) -> Arc<MasterKey> {
        Arc::clone(&self.key.read().unwrap_or_else(PoisonError::into_inner))
    }

    fn wrong_key(&self) -> StoreError {
        StoreError::WrongMasterKey(PathBuf::from(self.url.redacted()))
    }

    /// `why` a row failed its checks, with the likelier cause when this node's key no longer
    /// opens the database's key check: the key was rotated while this node ran (cut off, or
    /// left out), and every row it reads fails — not tampering (an outside review was sent to
    /// the tamper repair). Only read when a row has failed, so a sound node pays nothing.
    async fn key_hint(&self, why: String) -> String {
        let Ok(client) = self.client().await else {
            return why;
        };
        match read_key_check(&**client, false).await {
            Ok(Some(sealed)) if verify_key_check(&sealed, &self.key(), self).is_ok() => why,
            // A missing key check is itself an edit by hand, not a rotation.
            Ok(None) => why,
            Ok(Some(_)) => format!(
                "{why}; this node's master key no longer opens the database's key check (was \
                 the key rotated while it ran?): give it the current key and restart it"
            ),
            Err(_) => why,
        }
    }

    #[cfg(test)]
    fn injected_rotation_failure(&self) -> Result<(), StoreError> {
        use std::sync::atomic::Ordering;
        if self
            .fail_rotation_before_commit
            .swap(false, Ordering::SeqCst)
        {
            return Err(StoreError::Unavailable("injected rotation failure".into()));
        }
        Ok(())
    }

    #[cfg(not(test))]
    fn injected_rotation_failure(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// The PostgreSQL-backed [`Store`].
///
/// # Memory usage
/// Up to `POOL_SIZE` connections and one runtime thread; per call, the rows it returns. A
/// rotation holds every sealed blob of the database (all nodes' sandboxes) in memory at once.
pub struct PgStore {
    db: Arc<Db>,
    rt: Option<tokio::runtime::Runtime>,
}

impl Drop for PgStore {
    fn drop(&mut self) {
        // `shutdown_background` is the one way to drop a runtime from inside another runtime.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// [`PgStore::is_initialised`] over one connection made with `tls`.
async fn probe<T>(pg: tokio_postgres::Config, tls: T, url: &DatabaseUrl) -> Result<bool, StoreError>
where
    T: MakeTlsConnect<Socket>,
    T::Stream: Send + 'static,
{
    let (client, conn) = pg.connect(tls).await.map_err(|e| {
        StoreError::Unavailable(format!("database {url} unreachable: {}", causes(&e)))
    })?;
    let conn = tokio::spawn(conn);
    let row = client
        .query_one("SELECT to_regclass('meta') IS NOT NULL", &[])
        .await
        .map_err(pg_err)?;
    let has_meta: bool = row.get(0);
    let initialised = has_meta && read_key_check(&client, false).await?.is_some();
    drop(client);
    let _ = conn.await;
    Ok(initialised)
}

impl PgStore {
    /// Connects to `url` as node `node_id`, applies pending migrations under an advisory lock,
    /// then writes the key-check record into a new database or verifies it.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] if the database cannot be reached; [`StoreError::WrongMasterKey`]
    /// if `key` is not this database's key; [`StoreError::SchemaTooNew`].
    pub fn open(url: &DatabaseUrl, node_id: &str, key: MasterKey) -> Result<Self, StoreError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("sealgate-pg")
            .enable_all()
            .build()?;
        let mut pg = url.pg_config();
        pg.connect_timeout(Duration::from_secs(3));
        pg.application_name(format!("sealgate/{node_id}"));
        // A server that vanished without a reset (a failover, a partition) is noticed in
        // seconds, not after the system's two hours of idle keepalive.
        pg.keepalives_idle(Duration::from_secs(10));
        pg.keepalives_interval(Duration::from_secs(2));
        pg.keepalives_retries(3);
        pg.tcp_user_timeout(Duration::from_secs(10));
        let manager = match url.tls() {
            Some(tls) => Manager::new(pg, tls),
            None => Manager::new(pg, NoTls),
        };
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(OP_TIMEOUT))
            .create_timeout(Some(Duration::from_secs(3)))
            .recycle_timeout(Some(Duration::from_secs(3)))
            .build()
            .map_err(|e| StoreError::InvalidInput(format!("database pool: {e}")))?;
        let db = Arc::new(Db {
            pool,
            node_claim: std::sync::Mutex::new(None),
            key: RwLock::new(Arc::new(key)),
            node_id: node_id.to_owned(),
            url: url.clone(),
            #[cfg(test)]
            fail_rotation_before_commit: std::sync::atomic::AtomicBool::new(false),
        });
        let store = PgStore { db, rt: Some(rt) };
        store.block(|db| async move { schema::prepare(&db, &db.key()).await })?;
        Ok(store)
    }

    /// Claims this node's id for as long as the store lives: a session advisory lock on a
    /// connection kept aside (PostgreSQL drops it with the session, so a crashed daemon frees
    /// its id). A second daemon started with the same `[node] id` — a cloned host keeps its
    /// hostname — would serve, sweep and refresh the first one's sandboxes, and a sandbox
    /// deleted through one would go on working through the other: it is refused instead.
    ///
    /// # Errors
    /// [`StoreError::Conflict`] when another live session still holds the id after
    /// [`CLAIM_AT_START`]; database errors.
    ///
    /// The claim is kept: a task checks the connection every [`CLAIM_CHECK`], and when it has
    /// closed (a database restart or failover ends every session) claims the id again on a new
    /// one. Before, the id stayed free after the first database restart, and a second daemon
    /// with the same id started and served the sandboxes of the first (found from outside: a
    /// sandbox deleted through the first went on unsealing through the twin). If another
    /// session holds the id by then, [`NodeClaim`] says so, and the follower refuses to unseal
    /// until the id is this node's again.
    pub fn claim_node(&self) -> Result<Arc<NodeClaim>, StoreError> {
        let client = self.block(|db| async move {
            let deadline = tokio::time::Instant::now() + CLAIM_AT_START;
            loop {
                match try_claim(&db).await? {
                    Claim::Held(conn) => return Ok(conn),
                    Claim::HeldBy(..) if tokio::time::Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Claim::HeldBy(_, app) => {
                        return Err(StoreError::Conflict(held_by(&db.node_id, app.as_deref())))
                    }
                }
            }
        })?;
        *self
            .db
            .node_claim
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(client);
        let claim = Arc::new(NodeClaim::default());
        if let Some(rt) = &self.rt {
            rt.spawn(keep_claim(self.db.clone(), claim.clone()));
        }
        Ok(claim)
    }

    /// Whether the database at `url` already holds a key-check record (was initialised under
    /// some key). Reads only: creates no table and takes no lock. Used before loading the key,
    /// so a node without a key file refuses instead of creating a key that cannot fit.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] if the database cannot be reached; database errors.
    pub fn is_initialised(url: &DatabaseUrl) -> Result<bool, StoreError> {
        let mut pg = url.pg_config();
        pg.connect_timeout(Duration::from_secs(3));
        let redacted = url.clone();
        // A thread of its own: the caller may be inside another runtime.
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                // connect_timeout bounds the TCP connect only; a server that stalls in the TLS
                // or startup exchange must not hang the daemon's start.
                let probing = async {
                    match redacted.tls() {
                        Some(tls) => probe(pg, tls, &redacted).await,
                        None => probe(pg, NoTls, &redacted).await,
                    }
                };
                tokio::time::timeout(OP_TIMEOUT, probing)
                    .await
                    .unwrap_or_else(|_| {
                        Err(StoreError::Unavailable(format!(
                            "database {redacted}: no answer within {OP_TIMEOUT:?}"
                        )))
                    })
            })
        })
        .join()
        .unwrap_or_else(|_| Err(StoreError::Unavailable("database probe panicked".into())))
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.db.node_id
    }

    /// The database location with its password redacted.
    pub fn location(&self) -> &DatabaseUrl {
        &self.db.url
    }

    /// `stores.generation` of each store in `ids` that still exists.
    ///
    /// # Errors
    /// Database failures.
    pub fn generations(&self, ids: Vec<String>) -> Result<Vec<(String, i64)>, StoreError> {
        self.block(|db| async move { ops::generations(&**db.client().await?, &ids).await })
    }

    /// Runs `op` on the store's runtime and blocks this thread for its answer (at most
    /// `OP_TIMEOUT`, then [`StoreError::Unavailable`]).
    fn block<T, F, Fut>(&self, op: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Db>) -> Fut,
        Fut: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let rt = self
            .rt
            .as_ref()
            .expect("runtime lives as long as the store");
        let (op, db) = (op(self.db.clone()), self.db.clone());
        let fut = async move {
            match op.await {
                Err(StoreError::Corrupt(why)) => Err(StoreError::Corrupt(db.key_hint(why).await)),
                other => other,
            }
        };
        let db = self.db.clone();
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let timed = async move {
            // A statement of its own: the operation (and the connection it holds, back to the
            // pool) is dropped by the time the connections are closed.
            let timed = tokio::time::timeout(OP_TIMEOUT, fut).await;
            let answer = timed.unwrap_or_else(|_| {
                db.drop_idle_connections();
                Err(StoreError::Unavailable(format!(
                    "database {} did not answer within {}s",
                    db.url,
                    OP_TIMEOUT.as_secs()
                )))
            });
            match answer {
                Err(StoreError::Unavailable(why)) if WRITE_SENT.with(Cell::get) => {
                    Err(StoreError::Unconfirmed(why))
                }
                other => other,
            }
        };
        rt.spawn(WRITE_SENT.scope(Cell::new(false), async move {
            let _ = tx.send(timed.await);
        }));
        let wait = move || {
            rx.recv().unwrap_or_else(|_| {
                Err(StoreError::Unavailable(
                    "the database runtime stopped".into(),
                ))
            })
        };
        off_the_workers(wait)
    }
}

impl Store for PgStore {
    fn create_store(
        &self,
        name: &str,
        egress_allowlist: Option<Vec<String>>,
    ) -> Result<StoreRecord, StoreError> {
        let record = StoreRecord::new(name, egress_allowlist);
        let rec = record.clone();
        self.block(
            |db| async move { ops::insert_store(&db, &mut **db.client().await?, &rec).await },
        )?;
        Ok(record)
    }

    fn list_stores(&self) -> Result<StoreListing, StoreError> {
        self.block(|db| async move {
            let client = db.client().await?;
            ops::list_stores(&**client, &db.key()).await
        })
    }

    fn get_store(&self, id: &str) -> Result<StoreRecord, StoreError> {
        let id = id.to_owned();
        self.block(
            |db| async move { ops::store_by_id(&**db.client().await?, &db.key(), &id).await },
        )
    }

    fn find_store(&self, id_or_name: &str) -> Result<StoreRecord, StoreError> {
        let key = id_or_name.to_owned();
        self.block(
            |db| async move { ops::find_store(&**db.client().await?, &db.key(), &key).await },
        )
    }

    fn update_store(
        &self,
        id: &str,
        name: Option<&str>,
        egress_allowlist: Option<Option<Vec<String>>>,
    ) -> Result<StoreRecord, StoreError> {
        let (id, name) = (id.to_owned(), name.map(str::to_owned));
        self.block(|db| async move {
            ops::update_store(&db, &mut **db.client().await?, &id, name, egress_allowlist).await
        })
    }

    fn delete_store(&self, id: &str) -> Result<(), StoreError> {
        let id = id.to_owned();
        self.block(|db| async move { ops::delete_store(&mut **db.client().await?, &id).await })
    }

    fn store_with_secrets(&self, id: &str) -> Result<(StoreRecord, Vec<SecretRecord>), StoreError> {
        let id = id.to_owned();
        self.block(|db| async move {
            let mut client = db.client().await?;
            let client: &mut tokio_postgres::Client = &mut client;
            let tx = client
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await
                .map_err(pg_err)?;
            let key = db.key();
            let store = ops::store_by_id(&tx, &key, &id).await?;
            let secrets = ops::select_secrets(&tx, &id, true).await?;
            let secrets = secrets.into_iter().map(|raw| raw.into_record(&key));
            let secrets = secrets.collect::<Result<Vec<_>, _>>()?;
            // Read-only: its end is no write (`commit` would mark one).
            tx.commit().await.map_err(pg_err)?;
            Ok((store, secrets))
        })
    }

    fn deleted_store(
        &self,
        id: &str,
    ) -> Result<Option<(StoreRecord, Vec<SecretRecord>)>, StoreError> {
        let id = id.to_owned();
        self.block(
            |db| async move { ops::deleted_store(&**db.client().await?, &db.key(), &id).await },
        )
    }

    fn put_secret(
        &self,
        store_id: &str,
        name: &str,
        value: &SecretValue,
        allowed_hosts: Option<Vec<String>>,
        locations: Vec<Location>,
    ) -> Result<SecretMeta, StoreError> {
        let (store_id, name, value) = (store_id.to_owned(), name.to_owned(), value.clone());
        self.block(|db| async move {
            let put = ops::Put {
                store_id: &store_id,
                name: &name,
                value: &value,
                allowed_hosts,
                locations,
            };
            ops::put_secret(&db, &mut **db.client().await?, put).await
        })
    }

    fn list_secrets(&self, store_id: &str) -> Result<Vec<SecretMeta>, StoreError> {
        let store_id = store_id.to_owned();
        self.block(|db| async move {
            let client = db.client().await?;
            ops::require_store(&**client, &store_id).await?;
            let key = db.key();
            ops::select_secrets(&**client, &store_id, false)
                .await?
                .into_iter()
                .map(|raw| raw.into_meta(&key))
                .collect()
        })
    }

    fn load_secrets(&self, store_id: &str) -> Result<Vec<SecretRecord>, StoreError> {
        let store_id = store_id.to_owned();
        self.block(|db| async move {
            let client = db.client().await?;
            ops::require_store(&**client, &store_id).await?;
            let key = db.key();
            ops::select_secrets(&**client, &store_id, true)
                .await?
                .into_iter()
                .map(|raw| raw.into_record(&key))
                .collect()
        })
    }

    fn delete_secret(&self, store_id: &str, name: &str) -> Result<(), StoreError> {
        let (store_id, name) = (store_id.to_owned(), name.to_owned());
        self.block(|db| async move {
            ops::delete_secret(&mut **db.client().await?, &store_id, &name).await
        })
    }

    fn insert_sandbox(&self, row: &SandboxRow) -> Result<(), StoreError> {
        let row = row.clone();
        self.block(
            |db| async move { ops::insert_sandbox(&db, &mut **db.client().await?, &row).await },
        )
    }

    fn update_sandbox_snapshot(&self, id: &str, snapshot: &SecretValue) -> Result<(), StoreError> {
        let (id, snapshot) = (id.to_owned(), snapshot.clone());
        self.block(|db| async move {
            ops::update_snapshot(&db, &mut **db.client().await?, &id, &snapshot).await
        })
    }

    fn update_sandbox_snapshots(&self, rows: &[(String, SecretValue)]) -> Result<(), StoreError> {
        let rows = rows.to_vec();
        self.block(|db| async move {
            ops::update_snapshots(&db, &mut **db.client().await?, &rows).await
        })
    }

    fn load_sandboxes(&self) -> Result<Vec<SandboxRow>, StoreError> {
        self.block(|db| async move {
            let raws = ops::select_sandboxes(&**db.client().await?, &db.node_id).await?;
            let key = db.key();
            raws.into_iter().map(|raw| raw.into_row(&key)).collect()
        })
    }

    fn sandbox_ids(&self) -> Result<std::collections::HashSet<String>, StoreError> {
        self.block(
            |db| async move { ops::select_sandbox_ids(&**db.client().await?, &db.node_id).await },
        )
    }

    fn delete_sandbox(&self, id: &str) -> Result<(), StoreError> {
        let id = id.to_owned();
        self.block(|db| async move {
            ops::delete_sandbox(&**db.client().await?, &id, &db.node_id).await
        })
    }

    fn sandbox_elsewhere(&self, id: &str) -> Result<Option<String>, StoreError> {
        let now = ops::to_nanos(OffsetDateTime::now_utc(), "lookup time")?;
        let id = id.to_owned();
        self.block(|db| async move {
            ops::other_node_of(&**db.client().await?, &id, &db.node_id, now).await
        })
    }

    fn purge_expired_sandboxes(&self, now: OffsetDateTime) -> Result<Vec<String>, StoreError> {
        let now = ops::to_nanos(now, "purge time")?;
        self.block(
            |db| async move { ops::purge_expired(&**db.client().await?, &db.node_id, now).await },
        )
    }

    fn check(&self) -> Result<(), StoreError> {
        self.block(|db| async move {
            let client = db.client().await?;
            let sealed = read_key_check(&**client, false)
                .await?
                .ok_or_else(|| db.wrong_key())?;
            verify_key_check(&sealed, &db.key(), &db).map(drop)
        })
    }

    fn rotate_master_key(&self, new_key: &MasterKey) -> Result<RotationStats, StoreError> {
        let new = new_key.duplicate();
        let stats = self.block(|db| async move {
            refuse_while_nodes_run(&db).await?;
            let stats = ops::reseal_all(&db, &mut **db.client().await?, &new).await?;
            *db.key.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(new);
            Ok(stats)
        })?;
        Ok(stats)
    }
}

/// How long a starting node waits for its id to be let go before it counts as in use: the
/// server ends a stopped daemon's session, and lets its id go, a moment after the daemon is
/// gone (a restart, `systemctl restart`, could find it still held). Within the store's
/// `OP_TIMEOUT`.
const CLAIM_AT_START: Duration = Duration::from_secs(3);

/// How often the connection holding the node's id is checked ([`PgStore::claim_node`]).
/// A quarter second: a twin started while the database was restarting wins the id if it
/// claims it first (an outside re-check saw one win against a check every second).
const CLAIM_CHECK: Duration = Duration::from_millis(250);

/// How long the connection holding the node's id may take to answer its probe.
const CLAIM_PROBE: Duration = Duration::from_secs(2);

/// A server session: its process id and start time (a pid alone can be reused, by another
/// server after a failover or by the same one).
type Session = (i32, String);

/// The connection holding this node's id, out of the pool (dropped, it closes, and the
/// server lets the id go with its session), and its server session.
struct ClaimConn {
    client: deadpool_postgres::ClientWrapper,
    session: Session,
}

/// What a try to take this node's id found.
enum Claim {
    Held(ClaimConn),
    /// Another session holds it: that session, if it could be seen (a session of another
    /// role shows no start time).
    /// The second field is that session's `application_name`.
    HeldBy(Option<(i32, Option<String>)>, Option<String>),
}

/// Why a node may not take its id. The lock's key is the 32-bit `hashtext` of the id, so two
/// ids can share it: the holder's `application_name` (`sealgate/<its id>`) tells such a
/// collision from a twin (outside pass: `worker-23004` was refused as "in use" by
/// `worker-102090`, and the operator was sent looking for a twin that did not exist).
fn held_by(node_id: &str, holder_app: Option<&str>) -> String {
    // PostgreSQL keeps the first 63 bytes of an `application_name`: a longer one of a twin is
    // a prefix of this node's own (review).
    let own = format!("sealgate/{node_id}");
    let twin = |a: &str| a == own || (a.len() >= 63 && own.starts_with(a));
    match holder_app
        .filter(|a| !twin(a))
        .and_then(|a| a.strip_prefix("sealgate/"))
    {
        Some(other) => format!(
            "node id '{node_id}' shares its database lock with the running node '{other}' \
             (their ids hash alike): rename one of them in [node] id"
        ),
        _ => format!(
            "node id '{node_id}' is in use by another running daemon on this database; give \
             each daemon its own [node] id"
        ),
    }
}

/// The `pg_locks` rows (as `l`) of this database. Advisory locks are per database, but
/// `pg_locks` shows the whole server's: unfiltered, a rotation counted the nodes of every
/// other fleet sharing the server as running here (and was refused), and a node looking for
/// the holder of its id could be shown another database's.
const THIS_DATABASE: &str =
    "l.database = (SELECT oid FROM pg_database WHERE datname = current_database())";

/// Tries to take this node's id lock on a connection taken out of the pool first, so a try
/// cut short (a timeout) closes it rather than handing a connection that holds the id back to
/// the pool (review: the node then found its own id "taken").
async fn try_claim(db: &Db) -> Result<Claim, StoreError> {
    let client = Object::take(db.client().await?);
    let row = client
        .query_one(
            &format!(
                "SELECT pg_try_advisory_lock($1::int4, hashtext($2)), pg_backend_pid(), \
                 (SELECT backend_start::text FROM pg_stat_activity WHERE pid = pg_backend_pid()), \
                 h.pid, h.started, h.app \
                 FROM (SELECT 1) AS one LEFT JOIN LATERAL ( \
                   SELECT l.pid, a.backend_start::text AS started, a.application_name AS app \
                   FROM pg_locks l \
                   LEFT JOIN pg_stat_activity a ON a.pid = l.pid \
                   WHERE l.locktype = 'advisory' AND l.granted AND l.classid = $1::int4::oid \
                   AND l.objid = hashtext($2)::oid AND l.objsubid = 2 AND {THIS_DATABASE} \
                   AND l.pid <> pg_backend_pid() LIMIT 1) AS h ON true"
            ),
            &[&NODE_LOCK_CLASS, &db.node_id],
        )
        .await
        .map_err(pg_err)?;
    let held: bool = row.get(0);
    if held {
        let session = (
            row.get(1),
            row.get::<_, Option<String>>(2).unwrap_or_default(),
        );
        return Ok(Claim::Held(ClaimConn { client, session }));
    }
    let holder: Option<i32> = row.get(3);
    Ok(Claim::HeldBy(
        holder.map(|pid| (pid, row.get(4))),
        row.get(5),
    ))
}

/// Ends this node's own old session, which still holds the id on the server: its connection
/// is gone on this side (a partition), and the server keeps the session until its keepalive
/// gives up — two hours by default, the node not current all that time (re-check). Only a
/// session whose pid *and* start time match the one that claimed the id is ended.
async fn end_own_session(db: &Db, (pid, started): &Session) -> Result<(), StoreError> {
    db.client()
        .await?
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE pid = $1 AND backend_start::text = $2",
            &[pid, started],
        )
        .await
        .map_err(pg_err)
        .map(drop)
}

/// Whether the connection holding the id still answers. Only asking tells: a connection to a
/// server that vanished without a reset looks open for hours (review: a twin could take the
/// id on the new primary of a failover while this node went on serving).
async fn answers(conn: &ClaimConn) -> bool {
    matches!(
        tokio::time::timeout(CLAIM_PROBE, conn.client.simple_query("SELECT 1")).await,
        Ok(Ok(_))
    )
}

/// Keeps the node's id claimed (see [`PgStore::claim_node`]); runs as long as the store.
/// Every [`CLAIM_CHECK`] the connection holding it is probed; one that fails is closed and
/// the id claimed again on a new one. Until then the claim is unverified (the node does not
/// count as current); if another session holds it, the id is taken (the node unseals
/// nothing) — unless that session is this node's own old one, not yet gone on the server.
async fn keep_claim(db: Arc<Db>, claim: Arc<NodeClaim>) {
    let mut tick = tokio::time::interval(CLAIM_CHECK);
    let mut old: Option<Session> = None;
    loop {
        tick.tick().await;
        let held = db
            .node_claim
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(conn) = held {
            if answers(&conn).await {
                *db.node_claim.lock().unwrap_or_else(PoisonError::into_inner) = Some(conn);
                continue;
            }
            tracing::warn!(node = %db.node_id, "the connection holding this node's id stopped answering: claiming the id again");
            old = Some(conn.session.clone());
            claim.set_unverified(true);
        }
        match tokio::time::timeout(OP_TIMEOUT, try_claim(&db)).await {
            Ok(Ok(Claim::Held(conn))) => {
                *db.node_claim.lock().unwrap_or_else(PoisonError::into_inner) = Some(conn);
                claim.set_taken(false);
                claim.set_unverified(false);
                old = None;
                tracing::info!(node = %db.node_id, "node id claimed again on a new connection");
            }
            // Released meanwhile: tried again at the next check.
            Ok(Ok(Claim::HeldBy(None, _))) => {}
            Ok(Ok(Claim::HeldBy(Some((pid, Some(started))), _)))
                if old.as_ref() == Some(&(pid, started.clone())) =>
            {
                tracing::info!(node = %db.node_id, pid, "ending this node's own old session, which still holds its id");
                let _ =
                    tokio::time::timeout(OP_TIMEOUT, end_own_session(&db, &(pid, started))).await;
            }
            Ok(Ok(Claim::HeldBy(Some(_), _))) => {
                if claim.set_taken(true) {
                    tracing::error!(
                        node = %db.node_id,
                        "node id is held by another daemon on this database (a twin started \
                         while the connection holding it was down): refusing to unseal until \
                         it is this node's again; give each daemon its own [node] id"
                    );
                }
            }
            // The database is away: tried again at the next check (the follower's lag and
            // `max_staleness_secs` cover the outage itself).
            Ok(Err(_)) | Err(_) => {}
        }
    }
}

/// A rotation while nodes run would leave them sealing with the old key (their revocations
/// would answer 204 and never apply). Running nodes hold their id's advisory lock
/// ([`PgStore::claim_node`]); a node just stopped may take a moment to let go, so this waits up
/// to [`ROTATION_WAIT`] for them to be gone.
async fn refuse_while_nodes_run(db: &Db) -> Result<(), StoreError> {
    let deadline = tokio::time::Instant::now() + ROTATION_WAIT;
    loop {
        let running: i64 = db
            .client()
            .await?
            .query_one(
                &format!(
                    "SELECT count(*) FROM pg_locks l WHERE l.locktype = 'advisory' \
                     AND l.granted AND l.classid = $1::int4::oid AND l.objsubid = 2 \
                     AND {THIS_DATABASE}"
                ),
                &[&NODE_LOCK_CLASS],
            )
            .await
            .map_err(pg_err)?
            .get(0);
        if running == 0 {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(StoreError::Conflict(format!(
                "{running} node(s) still run against this database: stop every node before \
                 rotating the master key (each would keep sealing with the old key)"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How long a rotation waits for nodes just stopped to let go of their ids (within the
/// store's `OP_TIMEOUT`).
const ROTATION_WAIT: Duration = Duration::from_secs(3);

// ---- sealing: the one place values meet the crypto module -----------------------------------

/// Seals a secret value bound to its row (store id, name, version).
fn seal_secret(key: &MasterKey, store_id: &str, meta: &SecretMeta, value: &[u8]) -> Vec<u8> {
    crypto::seal(
        key,
        &crypto::secret_aad(store_id, &meta.name, meta.version),
        value,
    )
}

/// The sealed key-check record (`FOR SHARE` / `FOR UPDATE` when `lock`), if there is one.
async fn read_key_check(
    client: &impl tokio_postgres::GenericClient,
    lock: bool,
) -> Result<Option<Vec<u8>>, StoreError> {
    let sql = if lock {
        "SELECT value FROM meta WHERE key = $1 FOR SHARE"
    } else {
        "SELECT value FROM meta WHERE key = $1"
    };
    let row = client
        .query_opt(sql, &[&KEY_CHECK_ROW])
        .await
        .map_err(pg_err)?;
    Ok(row.map(|r| r.get(0)))
}

/// What an authentic key-check record says about the rows.
#[derive(Debug, PartialEq, Eq)]
enum KeyCheck {
    /// v1: written before policy MACs; the rows' MACs still have to be computed.
    Legacy,
    /// v2: every row carries its policy MAC; sandbox CA keys may still be bound to the id only.
    PolicyMacs,
    /// v3: also, every sandbox row's CA key is bound to its columns.
    BoundSandboxes,
}

/// Which record `sealed` is, iff it is the key-check record under `key`.
fn verify_key_check(sealed: &[u8], key: &MasterKey, db: &Db) -> Result<KeyCheck, StoreError> {
    match crypto::open(key, crypto::key_check_aad(), sealed) {
        Ok(plain) if plain.expose() == KEY_CHECK_PLAINTEXT_V3 => Ok(KeyCheck::BoundSandboxes),
        Ok(plain) if plain.expose() == KEY_CHECK_PLAINTEXT_V2 => Ok(KeyCheck::PolicyMacs),
        Ok(plain) if plain.expose() == KEY_CHECK_PLAINTEXT => Ok(KeyCheck::Legacy),
        _ => Err(db.wrong_key()),
    }
}

/// Writes (inserts or replaces) the v3 key-check record under `key`: call only once every row
/// carries its policy MAC under `key` and every sandbox row's CA key is bound to its columns.
async fn write_key_check(
    client: &impl tokio_postgres::GenericClient,
    key: &MasterKey,
) -> Result<(), StoreError> {
    let sealed = crypto::seal(key, crypto::key_check_aad(), KEY_CHECK_PLAINTEXT_V3);
    client
        .execute(
            "INSERT INTO meta (key, value) VALUES ($1, $2) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            &[&KEY_CHECK_ROW, &sealed],
        )
        .await
        .map_err(pg_err)?;
    Ok(())
}

/// `e` and its sources, each once: the pool and the driver wrap the reason a connection failed
/// (a refused connection, a certificate the TLS layer rejected) several layers deep. Driver and
/// TLS errors never carry the connection string, so no password can appear here.
pub(super) fn causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let c = cause.to_string();
        if !text.contains(&c) {
            text.push_str(": ");
            text.push_str(&c);
        }
        source = cause.source();
    }
    text
}

tokio::task_local! {
    /// Set once an operation run by [`PgStore::block`] has sent a write the database may
    /// apply ([`write_sent`]): an operation that then goes unanswered is
    /// [`StoreError::Unconfirmed`], one that never got that far is [`StoreError::Unavailable`]
    /// and changed nothing (outside pass: every outage, a refused connection and a GET
    /// included, was answered "it may have been applied").
    static WRITE_SENT: Cell<bool>;
}

/// Marks the running operation as having sent a write (a `COMMIT`, or a statement outside a
/// transaction): from here on it may have been applied whatever answer comes back.
fn write_sent() {
    let _ = WRITE_SENT.try_with(|sent| sent.set(true));
}

/// Commits `tx`, marked as a write sent ([`write_sent`]).
async fn commit(tx: tokio_postgres::Transaction<'_>) -> Result<(), StoreError> {
    write_sent();
    tx.commit().await.map_err(pg_err)
}

/// Driver errors: a server-side error (with an SQLSTATE) is a database error; anything else
/// (refused, reset, closed connection) means the database is unreachable.
fn pg_err(e: tokio_postgres::Error) -> StoreError {
    match e.as_db_error() {
        Some(db) => StoreError::Postgres(format!("{}: {}", db.code().code(), db.message())),
        None => StoreError::Unavailable(format!("database unreachable: {e}")),
    }
}

fn now_nanos() -> i64 {
    ops::to_nanos(OffsetDateTime::now_utc(), "now").unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests;
