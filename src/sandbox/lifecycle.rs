//! Creating, restoring, refreshing and ending sandboxes: the glue between the store (durable,
//! sealed) and the registry (live, compiled).
//!
//! Invariants: a sandbox is durable before it is live (row inserted, then registered); a snapshot
//! change is durable before it is visible; ending a sandbox removes it from the registry first,
//! so its tokens stop working even if the database write fails.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::Serialize;
use time::OffsetDateTime;

use super::registry::RegistryError;
use super::snapshot::SnapshotError;
use super::tombstones::Tombstones;
use super::{is_sandbox_id, new_id, Registry, Sandbox, SandboxParts, Snapshot};
use crate::ca::{CaError, LeafCache, SandboxCa};
use crate::secret::SecretValue;
use crate::store::postgres::follow;
use crate::store::{SandboxRow, SecretMeta, SecretRecord, Store, StoreError, StoreRecord};
use crate::token::Token;

/// Sandbox operation failures.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// No such sandbox.
    #[error("sandbox {0} not found")]
    NotFound(String),
    /// Fleet mode: the sandbox lives on another node, whose admin API manages it.
    #[error("sandbox {id} is not on this node: it runs on node {node}; manage it through that node's admin API")]
    OnAnotherNode {
        /// The sandbox.
        id: String,
        /// The node holding it.
        node: String,
    },
    /// The request is invalid (message says why).
    #[error("{0}")]
    BadRequest(String),
    /// Conflicts with a live sandbox.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// Store failure (includes "store not found").
    #[error(transparent)]
    Store(#[from] StoreError),
    /// CA generation or loading failed.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// A stored snapshot is unusable.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// The record of deletions pending since an outage is unreadable (message says why).
    #[error("{0}")]
    PendingDeletions(String),
    /// The sandbox has stopped, but neither its row deletion nor its record could be written:
    /// it would serve again after a restart; a repeated `DELETE` tries again.
    #[error("sandbox {id} has stopped, but its deletion could not be made durable ({why}): it would serve again after a restart; free the store's disk or bring the database back, then repeat the DELETE")]
    NotDurable {
        /// The sandbox.
        id: String,
        /// The store's error.
        why: String,
    },
    /// Writing the CA certificate file failed.
    #[error("cannot write CA certificate {path}: {source}")]
    CertFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// `POST /v1/sandboxes` body.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSandbox {
    /// Store name or id.
    pub secret_store: String,
    /// Lifetime in seconds: a whole number, written `600` or `600.0` ([`whole_seconds`]).
    #[serde(default, deserialize_with = "whole_seconds")]
    pub timeout: Option<u64>,
    /// Transparent-mode identity (chosen by the daemon for `"isolation": "netns"`).
    pub source_ip: Option<IpAddr>,
    /// `"none"` (default: proxy only) or `"netns"` (daemon-owned namespace; see `isolation`).
    #[serde(default)]
    pub isolation: Option<String>,
    /// Extra plain environment variables for the sandbox's commands (`netns` only).
    #[serde(default)]
    pub envs: Option<BTreeMap<String, String>>,
    /// The id to give it, chosen by the daemon beforehand (isolated sandboxes are listed
    /// under their id before their row exists); never from the API.
    #[serde(skip)]
    pub id: Option<String>,
}

/// Whole seconds as a JSON number, with or without a zero fraction: JSON does not tell `600`
/// from `600.0`, and Python's `json.dumps` writes a float's (an outside check got 400 for
/// `"timeout": 600.0`). A fraction, a negative or a number past `u64` is refused.
fn whole_seconds<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    use serde::de::Error as _;
    use serde::Deserialize as _;
    let Some(n) = Option::<serde_json::Number>::deserialize(d)? else {
        return Ok(None);
    };
    if let Some(whole) = n.as_u64() {
        return Ok(Some(whole));
    }
    match n.as_f64() {
        Some(f) if f >= 0.0 && f.fract() == 0.0 && f < u64::MAX as f64 => Ok(Some(f as u64)),
        _ => Err(D::Error::custom(format!(
            "expected whole seconds (a number such as 600), got {n}"
        ))),
    }
}

/// The namespace of an isolated sandbox, as the API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct NetnsInfo {
    /// `ip netns` name, e.g. `sealgate-0005`.
    pub name: String,
    /// Host side of the veth, e.g. `sg0005h`.
    pub interface: String,
    /// The sandbox's address inside (its `source_ip`).
    pub address: IpAddr,
    /// The host-side address (gateway and DNS server).
    pub gateway: IpAddr,
}

/// The user an isolated sandbox's commands run as.
#[derive(Clone, Debug, Serialize)]
pub struct UserInfo {
    /// Its name inside (`sandbox` for a user of the sandbox's own).
    pub name: String,
    /// User id on the host and inside.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

/// What the API returns for a sandbox. `proxy_env` (holding the proxy password) only at creation.
#[derive(Debug, Serialize)]
pub struct SandboxInfo {
    /// Sandbox id.
    pub id: String,
    /// Source store id.
    pub secret_store_id: String,
    /// The store's name: as it is now on `GET` (the admin API looks it up), at creation in the
    /// create answer; the name when the sandbox was made once the store is deleted.
    pub secret_store_name: String,
    /// RFC 3339.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// RFC 3339.
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    /// Transparent identity.
    pub source_ip: Option<IpAddr>,
    /// Secret name → sealed token.
    pub env: BTreeMap<String, String>,
    /// Proxy and CA variables (creation only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_env: Option<BTreeMap<String, String>>,
    /// Path of the CA certificate file.
    pub ca_cert_path: String,
    /// The CA certificate.
    pub ca_cert_pem: String,
    /// `"none"` or `"netns"`.
    pub isolation: &'static str,
    /// Extra plain environment variables of the sandbox's commands.
    pub envs: BTreeMap<String, String>,
    /// Host path of the sandbox's work directory (`/home/user` inside), isolated sandboxes only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// The sandbox's network namespace, isolated sandboxes only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns: Option<NetnsInfo>,
    /// Who its commands run as, isolated sandboxes only: files handed in through `workdir`
    /// must belong to this uid and gid for the sandbox to write them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<UserInfo>,
    /// Fleet mode: the node that owns the sandbox (absent with SQLite).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// Settings the lifecycle needs from the daemon.
#[derive(Clone, Debug)]
pub struct LifecycleConfig {
    /// Absolute directory for `<id>.pem`.
    pub cert_dir: PathBuf,
    /// `host:port` written into proxy URLs.
    pub proxy_public: String,
    /// Default lifetime.
    pub default_timeout: Duration,
    /// Longest lifetime.
    pub max_timeout: Duration,
    /// Fleet mode: this node's id, shown on every sandbox; None with SQLite.
    pub node: Option<String>,
    /// Where deletions the database could not take yet are remembered across restarts.
    pub tombstones: Tombstones,
}

/// Sandbox operations over the store and the registry.
pub struct Sandboxes {
    store: Arc<dyn Store>,
    registry: Arc<Registry>,
    leaves: Arc<LeafCache>,
    cfg: LifecycleConfig,
    /// While cut off too long (fleet mode): each sandbox's real snapshot, set aside while a
    /// locked copy (no secret unsealable anywhere) serves.
    locked: Mutex<HashMap<Arc<str>, Arc<Snapshot>>>,
    /// Locked for staleness ([`Sandboxes::set_locked`]).
    stale: std::sync::atomic::AtomicBool,
    /// Stores that cannot be read (a row corrupt or tampered with): their sandboxes serve
    /// locked copies until the store reads cleanly again ([`Sandboxes::quarantined`]).
    quarantined: Mutex<HashSet<String>>,
    /// The stores of `quarantined` whose *live* row failed its checks here (not a kept state):
    /// deleting such a store is the documented repair, so its corrupt kept state lifts the
    /// quarantine ([`Sandboxes::apply_store_change`]); a kept state found corrupt otherwise
    /// keeps it.
    corrupt_live: Mutex<HashSet<String>>,
    /// Held for the whole of each re-snapshot of a store (read, durable write, swap), so two
    /// of them (the follower's, an admin write's) never swap in out of order. The lock map
    /// (`locked`) is taken only around the computing and the swapping, never across the
    /// database: the staleness watchdog waits for it (a hung write held the lock off for 5 s).
    applying: Mutex<()>,
    /// Sandboxes whose row was found gone when the node got its id back
    /// ([`Sandboxes::reconcile_rows`]): ended, waiting for the sweep to audit them and end
    /// their isolation.
    ended_elsewhere: Mutex<Vec<Arc<str>>>,
    /// Sandboxes ended here whose row the database could not delete yet (it was unreachable):
    /// retried by [`Sandboxes::sweep_expired`], and a repeated `DELETE` of one succeeds.
    /// Mirrored in `cfg.tombstones` whenever it changes (under this lock), so a restart before
    /// the database returns does not serve them again.
    pending_deletes: Mutex<HashSet<String>>,
    /// The last write of `pending_deletes` to `cfg.tombstones` failed: retried every sweep.
    unrecorded: std::sync::atomic::AtomicBool,
    /// Called with each sandbox as it ends (the daemon closes its idle upstream connections).
    on_end: std::sync::OnceLock<Box<EndHook>>,
    /// Sandboxes the last restore ended instead of serving: (id, action) for the audit log,
    /// taken once by the daemon when the log is open ([`Sandboxes::take_ended_at_start`]).
    ended_at_start: Mutex<Vec<(String, &'static str)>>,
}

/// See [`Sandboxes::on_end`].
type EndHook = dyn Fn(&Arc<Sandbox>) + Send + Sync;

impl Sandboxes {
    /// Wires the service.
    pub fn new(
        store: Arc<dyn Store>,
        registry: Arc<Registry>,
        leaves: Arc<LeafCache>,
        cfg: LifecycleConfig,
    ) -> Self {
        Sandboxes {
            store,
            registry,
            leaves,
            cfg,
            locked: Mutex::default(),
            stale: std::sync::atomic::AtomicBool::new(false),
            quarantined: Mutex::default(),
            corrupt_live: Mutex::default(),
            applying: Mutex::default(),
            ended_elsewhere: Mutex::default(),
            pending_deletes: Mutex::default(),
            unrecorded: std::sync::atomic::AtomicBool::new(false),
            on_end: std::sync::OnceLock::new(),
            ended_at_start: Mutex::default(),
        }
    }

    /// Stores that cannot be read (a row failed to authenticate or decode), sorted. Their
    /// running sandboxes unseal nothing: a revocation written next to a tampered row must not
    /// be silently skipped while the old snapshot goes on unsealing (an outside test saw a
    /// revoked value served on every node, with `/readyz` ready and no lag). A quarantine
    /// outlives none of its sandboxes: once the last is gone (deleted, expired) the store is
    /// dropped from the set, so `/readyz` no longer names a store the operator has dealt with
    /// (it did until a restart, even after the store and its sandbox were deleted).
    pub fn quarantined(&self) -> Vec<String> {
        let mut q = lock(&self.quarantined);
        q.retain(|id| !self.registry.of_store(id).is_empty());
        let mut ids: Vec<String> = q.iter().cloned().collect();
        ids.sort();
        ids
    }

    /// The store and its secrets; a corrupt or tampered row quarantines the store (its
    /// sandboxes in `affected` are locked) before the error is returned.
    fn read_store(
        &self,
        store_id: &str,
        affected: &[Arc<Sandbox>],
    ) -> Result<(StoreRecord, Vec<SecretRecord>), StoreError> {
        let read = self.store.store_with_secrets(store_id);
        if let Err(StoreError::Corrupt(why)) = &read {
            self.quarantine(store_id, affected, why);
            lock(&self.corrupt_live).insert(store_id.to_owned());
        }
        read
    }

    /// A store deleted meanwhile: its last state, if the backend keeps it, which the sandboxes
    /// take as their final snapshot (DESIGN §3: a store's deletion leaves running sandboxes
    /// with the snapshot they had — here, the one they would have had on the node that deleted
    /// it, not an older one this node had not updated yet). A corrupt kept state quarantines.
    fn read_deleted_store(
        &self,
        store_id: &str,
        affected: &[Arc<Sandbox>],
    ) -> Result<Option<(StoreRecord, Vec<SecretRecord>)>, StoreError> {
        let read = self.store.deleted_store(store_id);
        if let Err(StoreError::Corrupt(why)) = &read {
            self.quarantine(store_id, affected, why);
        }
        read
    }

    fn quarantine(&self, store_id: &str, affected: &[Arc<Sandbox>], why: &str) {
        let newly = lock(&self.quarantined).insert(store_id.to_owned());
        let mut held = lock(&self.locked);
        affected.iter().for_each(|sb| self.lock_one(&mut held, sb));
        if newly {
            tracing::error!(
                store = %store_id,
                sandboxes = affected.len(),
                error = %why,
                "store cannot be read (a row is corrupt or was tampered with, or the database \
                 failed right after a change to it): its running sandboxes on this node unseal \
                 nothing until it reads cleanly"
            );
        }
    }

    /// After `store_id` was read and applied cleanly: lifts its quarantine (the sandboxes stay
    /// locked while the node is stale). `stale` is read under the lock map, as
    /// [`Sandboxes::set_locked`] writes it: read before, a lock arriving in between was undone
    /// for these sandboxes (review).
    fn release(&self, store_id: &str, affected: &[Arc<Sandbox>]) {
        lock(&self.corrupt_live).remove(store_id);
        if !lock(&self.quarantined).remove(store_id) {
            return;
        }
        tracing::info!(store = %store_id, "store reads cleanly again: its sandboxes unseal again");
        let mut held = lock(&self.locked);
        if self.stale.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        for sb in affected {
            if let Some(real) = held.remove(&sb.id) {
                self.registry.replace_snapshot(sb, copy_of(&real));
            }
        }
    }

    /// Serves a locked copy of `sb`'s snapshot, keeping the real one in `held`.
    fn lock_one(&self, held: &mut HashMap<Arc<str>, Arc<Snapshot>>, sb: &Arc<Sandbox>) {
        if held.contains_key(&sb.id) {
            return;
        }
        let real = sb.snapshot();
        match locked_copy(&real) {
            Ok(copy) => {
                self.registry.replace_snapshot(sb, copy);
                held.insert(sb.id.clone(), real);
            }
            Err(e) => tracing::error!(sandbox = %sb.id, error = %e, "cannot lock sandbox"),
        }
    }

    /// The leaf cache (for the proxy and metrics).
    pub fn leaves(&self) -> &Arc<LeafCache> {
        &self.leaves
    }

    /// The registry (for the proxy).
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Purges expired sessions, then registers every stored one (same CA, same tokens)
    /// except those an earlier run deleted while the database was unreachable, whose rows are
    /// deleted now.
    ///
    /// # Errors
    /// A row that fails to decrypt or parse, or an unreadable record of pending deletions: the
    /// daemon refuses to start rather than run with part of its sandboxes silently gone, or
    /// with deleted ones back.
    pub fn restore(&self) -> Result<usize, SandboxError> {
        let deleted = self.cfg.tombstones.load()?;
        let now = OffsetDateTime::now_utc();
        // Their CA files go too (they had stayed forever: found from outside).
        // Only ids of the daemon's own form name a file: an id comes from the database, and
        // one written there as "../x" must not make a root daemon remove or write files
        // outside cert_dir (review).
        let mut ended = Vec::new();
        for id in self.store.purge_expired_sandboxes(now)? {
            if is_sandbox_id(&id) {
                let _ = std::fs::remove_file(self.cert_path(&id));
                ended.push((id, "sandbox.expire"));
            }
        }
        let rows = self.store.load_sandboxes()?;
        let mut n = 0;
        for row in rows {
            if !is_sandbox_id(&row.id) {
                return Err(StoreError::Corrupt(format!(
                    "a sandbox row's id ({} characters) is not a sandbox id",
                    row.id.chars().count()
                ))
                .into());
            }
            if deleted.contains(&row.id) {
                tracing::info!(sandbox = %row.id, "not restored: its end was recorded (deleted while the store refused writes, or isolated in an earlier run)");
                let _ = std::fs::remove_file(self.cert_path(&row.id));
                ended.push((row.id, "sandbox.end"));
                continue;
            }
            let sb = self.revive(row)?;
            self.write_cert(&sb)?;
            self.registry.insert(sb)?;
            n += 1;
        }
        *self.pending() = deleted;
        *lock(&self.ended_at_start) = ended;
        self.retry_pending_deletes();
        Ok(n)
    }

    fn revive(&self, row: SandboxRow) -> Result<Arc<Sandbox>, SandboxError> {
        let ca = Arc::new(SandboxCa::from_parts(&row.ca_cert_pem, &row.ca_key)?);
        let snapshot = Snapshot::from_sealable(&row.snapshot)?;
        let mut hash = [0u8; 32];
        if row.proxy_token_hash.len() == 32 {
            hash.copy_from_slice(&row.proxy_token_hash);
        }
        let parts = SandboxParts {
            id: row.id,
            store_id: row.store_id,
            created_at: row.created_at,
            expires_at: row.expires_at,
            source_ip: row.source_ip,
            proxy_token_hash: hash,
            ca,
        };
        Ok(Arc::new(Sandbox::new(parts, snapshot)))
    }

    /// Creates a sandbox from a store snapshot.
    ///
    /// # Errors
    /// Unknown store, bad timeout, taken source IP, CA or store failures.
    pub fn create(&self, req: CreateSandbox) -> Result<SandboxInfo, SandboxError> {
        let timeout = self.timeout(req.timeout)?;
        let source_ip = req.source_ip.map(connection_source).transpose()?;
        if let Some(ip) = source_ip {
            if let Some(other) = self.registry.by_source_ip(ip) {
                return Err(RegistryError::SourceIpTaken(ip, other.id.to_string()).into());
            }
        }
        let store = self.store.find_store(&req.secret_store)?;
        let secrets = self.store.load_secrets(&store.id)?;
        let with_tokens = secrets
            .into_iter()
            .map(|s| (s, Token::generate()))
            .collect();
        let snapshot = Snapshot::build(
            store.name.clone(),
            store.egress_allowlist.clone(),
            with_tokens,
        )?;
        let id = req.id.clone().unwrap_or_else(new_id);
        let proxy_token = crate::random::random_hex(16);
        let ca = Arc::new(SandboxCa::generate(&id)?);
        let now = OffsetDateTime::now_utc();
        let parts = SandboxParts {
            id,
            store_id: store.id.clone(),
            created_at: now,
            expires_at: now + timeout,
            source_ip,
            proxy_token_hash: sha256(proxy_token.as_bytes()),
            ca,
        };
        let sb = Arc::new(Sandbox::new(parts, snapshot));
        if let Err(e) = self.store.insert_sandbox(&row_of(&sb)) {
            // Unconfirmed (the answer to its COMMIT lost): the row may be there, and the next
            // start would serve a sandbox whose credentials nobody holds, or its source address
            // would collide with a retry's row and stop the start (review). Its deletion is
            // made now or kept pending, as for a DELETE while the database is away.
            if matches!(e, StoreError::Unconfirmed(_)) {
                let _ = self.delete_row(&sb.id);
            }
            return Err(e.into());
        }
        // A create that fails takes its row with it, or the next start would serve a sandbox
        // whose create answered an error (review).
        if let Err(e) = self.write_cert(&sb) {
            let _ = self.store.delete_sandbox(&sb.id);
            return Err(e);
        }
        if let Err(e) = self.registry.insert(sb.clone()) {
            let _ = self.store.delete_sandbox(&sb.id);
            return Err(e.into());
        }
        let expires_at = sb
            .expires_at
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        tracing::info!(sandbox = %sb.id, store = %store.id, %expires_at, "sandbox created");
        let mut info = self.info(&sb);
        info.proxy_env = Some(self.proxy_env(&sb, &proxy_token));
        Ok(info)
    }

    /// Checks a create request's store and timeout, and that its `envs` name none of the
    /// store's secrets, without creating anything (callers that build expensive things around
    /// a sandbox check first).
    ///
    /// # Errors
    /// Unknown store, bad timeout, a variable of `envs` named like a secret.
    pub fn precheck(
        &self,
        req: &CreateSandbox,
        envs: &BTreeMap<String, String>,
    ) -> Result<(), SandboxError> {
        self.timeout(req.timeout)?;
        let store = self.store.find_store(&req.secret_store)?;
        if !envs.is_empty() {
            let secrets = self.store.list_secrets(&store.id)?;
            if let Some(m) = secrets.iter().find(|m| envs.contains_key(&m.name)) {
                return Err(SandboxError::BadRequest(shadowed_secret(
                    "envs",
                    &m.name,
                    &store.name,
                )));
            }
        }
        Ok(())
    }

    fn timeout(&self, requested: Option<u64>) -> Result<Duration, SandboxError> {
        let t = requested
            .map(Duration::from_secs)
            .unwrap_or(self.cfg.default_timeout);
        if t.is_zero() || t > self.cfg.max_timeout {
            return Err(SandboxError::BadRequest(format!(
                "timeout must be between 1 and {} seconds",
                self.cfg.max_timeout.as_secs()
            )));
        }
        Ok(t)
    }

    /// One live sandbox.
    ///
    /// # Errors
    /// [`SandboxError::NotFound`].
    pub fn get(&self, id: &str) -> Result<SandboxInfo, SandboxError> {
        let sb = self.registry.get(id).ok_or_else(|| self.not_here(id))?;
        Ok(self.info(&sb))
    }

    /// All live sandboxes, oldest first.
    pub fn list(&self) -> Vec<SandboxInfo> {
        let now = OffsetDateTime::now_utc();
        let mut all: Vec<_> = self
            .registry
            .all()
            .into_iter()
            .filter(|s| !s.is_expired(now))
            .collect();
        all.sort_by_key(|s| (s.created_at, s.id.clone()));
        all.iter().map(|s| self.info(s)).collect()
    }

    /// Ends a sandbox at once: tokens and CA stop working before this returns.
    ///
    /// The sandbox ends whatever the database says. If its row cannot be deleted (the
    /// database unreachable, its disk full, any store failure), the deletion is kept, written
    /// to `data_dir` ([`Tombstones`]) and retried every sweep, and a restart does not serve
    /// the sandbox again. Outside tests saw both halves fail: a 503 (PostgreSQL down) and a
    /// 500 (SQLite's disk full) for a sandbox that had in fact stopped, a retry answer 404,
    /// and the row bring the sandbox back at the next restart.
    ///
    /// # Errors
    /// [`SandboxError::NotFound`] if it was neither live nor pending deletion;
    /// [`SandboxError::NotDurable`] if neither the row deletion nor its record could be
    /// written (the sandbox has stopped, but would serve again after a restart: a repeated
    /// `DELETE` tries both again).
    pub fn delete(&self, id: &str) -> Result<(), SandboxError> {
        let Some(sb) = self.registry.remove(id) else {
            if self.pending().contains(id) {
                return self.delete_row(id);
            }
            return Err(self.not_here(id));
        };
        self.forget(&sb);
        self.delete_row(id)?;
        tracing::info!(sandbox = %id, "sandbox deleted");
        Ok(())
    }

    /// Deletes the row of ended sandbox `id`, or records the deletion as pending when the
    /// store refuses it; `Err` only when neither could be written.
    fn delete_row(&self, id: &str) -> Result<(), SandboxError> {
        let why = match self.store.delete_sandbox(id) {
            Ok(()) | Err(StoreError::NotFound(_)) => {
                let mut pending = self.pending();
                if pending.remove(id) {
                    self.record(&pending);
                }
                return Ok(());
            }
            Err(e) => e.to_string(),
        };
        let mut pending = self.pending();
        pending.insert(id.to_owned());
        if self.record(&pending) {
            tracing::warn!(sandbox = %id, error = %why, "sandbox ended; its row is deleted once the store takes writes again");
            return Ok(());
        }
        tracing::error!(sandbox = %id, error = %why, "sandbox ended, but neither its row deletion nor its record could be written: it would serve again after a restart");
        Err(SandboxError::NotDurable {
            id: id.to_owned(),
            why,
        })
    }

    /// [`SandboxError::NotFound`], or in fleet mode [`SandboxError::OnAnotherNode`] when another
    /// node holds `id` (a failed lookup is just "not found": the call was for this node).
    fn not_here(&self, id: &str) -> SandboxError {
        let elsewhere = if self.cfg.node.is_some() && is_sandbox_id(id) {
            self.store.sandbox_elsewhere(id).ok().flatten()
        } else {
            None
        };
        match elsewhere {
            Some(node) => SandboxError::OnAnotherNode {
                id: id.into(),
                node,
            },
            None => SandboxError::NotFound(id.into()),
        }
    }

    /// The sandboxes deleted while the database was unreachable whose rows are still there
    /// (sorted).
    pub fn pending_deletions(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.pending().iter().cloned().collect();
        ids.sort();
        ids
    }

    /// The sandboxes the restore ended instead of serving, once: (id, audit action) —
    /// `sandbox.expire` for those that expired while the daemon was down, `sandbox.end` for
    /// those whose end was recorded (deleted while the store refused writes, or isolated in an
    /// earlier run). A sandbox's life can then be read from the audit log alone (review).
    pub fn take_ended_at_start(&self) -> Vec<(String, &'static str)> {
        std::mem::take(&mut *lock(&self.ended_at_start))
    }

    /// Where the pending deletions are recorded across restarts (none in unit tests).
    pub fn pending_deletions_file(&self) -> Option<&Path> {
        self.cfg.tombstones.path()
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        lock(&self.pending_deletes)
    }

    /// Mirrors `pending` on disk; false (and logged) if that failed (the sandboxes have ended
    /// either way).
    fn record(&self, pending: &HashSet<String>) -> bool {
        let saved = self.cfg.tombstones.save(pending);
        self.unrecorded
            .store(saved.is_err(), std::sync::atomic::Ordering::Release);
        let Err(e) = saved else {
            return true;
        };
        let file = self.pending_deletions_file().map(Path::display);
        tracing::error!(
            file = %file.map(|f| f.to_string()).unwrap_or_default(),
            error = %e,
            "cannot record the sandboxes whose rows the store could not delete: a restart \
             before their rows go would serve them again"
        );
        false
    }

    /// At shutdown: tries the pending row deletions (and their record) once more — an
    /// operator who frees a full disk and restarts at once must not get the sandboxes back
    /// (review: a stop within the half second before the next sweep left the rows) — and
    /// returns what is still pending and whether that is recorded on disk.
    pub fn settle_pending(&self) -> (Vec<String>, bool) {
        self.retry_pending_deletes();
        let recorded = !self.unrecorded.load(std::sync::atomic::Ordering::Acquire);
        (self.pending_deletions(), recorded)
    }

    /// Retries the row deletions the database refused while unreachable.
    fn retry_pending_deletes(&self) {
        let ids: Vec<String> = self.pending().iter().cloned().collect();
        let mut done = Vec::new();
        for id in ids {
            match self.store.delete_sandbox(&id) {
                Ok(()) | Err(StoreError::NotFound(_)) => done.push(id),
                // Logged when the deletion was kept; the next sweep tries again. An
                // unreachable database ends the round (each try would wait for it); any other
                // error is this row's, and the others are still tried.
                Err(e) => {
                    tracing::debug!(sandbox = %id, error = %e, "sandbox row still not deleted");
                    if matches!(e, StoreError::Unavailable(_) | StoreError::Unconfirmed(_)) {
                        break;
                    }
                }
            }
        }
        let mut pending = self.pending();
        for id in &done {
            pending.remove(id);
            tracing::info!(sandbox = %id, "row of an ended sandbox removed (its deletion had been pending)");
        }
        // One write of the record per round, not one per row (review: quadratic after a
        // long outage).
        if !done.is_empty() || self.unrecorded.load(std::sync::atomic::Ordering::Acquire) {
            self.record(&pending);
        }
    }

    fn forget(&self, sb: &Arc<Sandbox>) {
        self.leaves.remove_sandbox(&sb.id);
        let _ = std::fs::remove_file(self.cert_path(&sb.id));
        if let Some(hook) = self.on_end.get() {
            hook(sb);
        }
    }

    /// Sets what runs as each sandbox ends (once; later calls are ignored). The daemon drops
    /// the sandbox's upstream client sets there: their idle connections had stayed open for
    /// `pool_idle_timeout_secs` after a DELETE or an expiry (found from outside).
    pub fn on_end(&self, hook: impl Fn(&Arc<Sandbox>) + Send + Sync + 'static) {
        let _ = self.on_end.set(Box::new(hook));
    }

    /// After this node got its id back from a spell out of its hands (held by another daemon,
    /// or its claim lost; fleet mode): ends every live sandbox whose row is gone — deleted
    /// through a twin, which was this node for the database meanwhile; they had unsealed again
    /// here (review, re-check). The registry is read before the rows: a sandbox's row is written before it
    /// is registered, so one created meanwhile is never taken for gone. Returns how many
    /// ended; the sweep audits them and ends their isolation
    /// ([`Sandboxes::take_ended_elsewhere`]).
    ///
    /// # Errors
    /// Store failures (nothing ended; the follower tries again at its next full check).
    pub fn reconcile_rows(&self) -> Result<usize, SandboxError> {
        let live = self.registry.all();
        // Ids only: cheap, and a row that fails its checks still counts as there (its
        // sandbox is dealt with by the quarantine, not ended here).
        let rows = self.store.sandbox_ids()?;
        let mut ended = Vec::new();
        for sb in live.iter().filter(|sb| !rows.contains(&*sb.id)) {
            if let Some(sb) = self.registry.remove(&sb.id) {
                self.forget(&sb);
                tracing::warn!(sandbox = %sb.id, "sandbox deleted while this node's id was out of its hands: ended here");
                ended.push(sb.id.clone());
            }
        }
        let n = ended.len();
        lock(&self.ended_elsewhere).extend(ended);
        Ok(n)
    }

    /// The sandboxes [`Sandboxes::reconcile_rows`] ended since the last call.
    pub fn take_ended_elsewhere(&self) -> Vec<Arc<str>> {
        std::mem::take(&mut *lock(&self.ended_elsewhere))
    }

    /// Ends every sandbox whose time is up; returns their ids.
    /// Also retries row deletions left pending by an outage ([`Sandboxes::delete`]).
    pub fn sweep_expired(&self) -> Vec<Arc<str>> {
        self.retry_pending_deletes();
        let now = OffsetDateTime::now_utc();
        let ids = self.registry.expired(now);
        for id in &ids {
            if let Some(sb) = self.registry.remove(id) {
                self.forget(&sb);
            }
            if let Err(e) = self.store.delete_sandbox(id) {
                tracing::warn!(sandbox = %id, error = %e, "could not delete expired sandbox row");
            }
            tracing::info!(sandbox = %id, "sandbox expired");
        }
        ids
    }

    /// How many live sandboxes of `store_id` on this node hold no token for secret `name`
    /// (created before it was added, or it was deleted since): a set of that secret does not
    /// reach them.
    pub fn lacking_secret(&self, store_id: &str, name: &str) -> usize {
        self.registry
            .of_store(store_id)
            .iter()
            .filter(|sb| sb.snapshot().secrets().iter().all(|s| &*s.name != name))
            .count()
    }

    /// Re-snapshots every live sandbox of `store_id` after its secrets or allowlist changed.
    /// Tokens stay the same; a deleted secret drops out; secrets added later are not added
    /// (the sandbox never received a token for them).
    ///
    /// # Errors
    /// Store failures; live sandboxes keep their previous snapshot then.
    pub fn refresh_store(&self, store_id: &str) -> Result<usize, SandboxError> {
        let (affected, changed) = self.refresh(store_id)?;
        if changed > 0 {
            tracing::info!(store = %store_id, sandboxes = changed, "running sandboxes refreshed");
        }
        Ok(affected)
    }

    /// At start (single host): [`Sandboxes::refresh_store`] for the sandboxes restored from
    /// `store_id`. Their rows are rewritten at every change before it is served, so a snapshot
    /// that changes here was behind its store — put back from a backup or by a stale `-wal`
    /// (outside pass h38b: a rotated value and a deleted secret served again), or a change
    /// whose snapshots were not written before a crash — and is said. Returns how many changed.
    ///
    /// # Errors
    /// As [`Sandboxes::refresh_store`].
    pub fn catch_up(&self, store_id: &str) -> Result<usize, SandboxError> {
        let (_, changed) = self.refresh(store_id)?;
        if changed > 0 {
            tracing::warn!(
                store = %store_id,
                sandboxes = changed,
                "sandboxes were restored with a snapshot behind their store's rows (a backup or \
                 -wal put back, or a change cut short by a crash): brought up to date before \
                 serving"
            );
        }
        Ok(changed)
    }

    /// (sandboxes of `store_id`, how many of them changed).
    fn refresh(&self, store_id: &str) -> Result<(usize, usize), SandboxError> {
        let _applying = lock(&self.applying);
        let affected = self.registry.of_store(store_id);
        if affected.is_empty() {
            return Ok((0, 0));
        }
        let (store, secrets) = self.read_store(store_id, &affected)?;
        let changed = self.resnapshot_all(&affected, &store.egress_allowlist, &secrets)?;
        self.release(store_id, &affected);
        Ok((affected.len(), changed))
    }

    /// [`Sandboxes::refresh_store`] after a change that is already committed: the change
    /// stands whatever the refresh meets, so its failure is not returned (the admin API
    /// answered 500 for committed writes, and left them out of the audit log). Fail closed: a
    /// store that could not be re-read is quarantined — a store failing its checks by the read
    /// itself, any other failure here — so its running sandboxes unseal nothing rather than
    /// go on with the snapshot from before a revocation; the next clean read lifts it. A store
    /// deleted meanwhile leaves its sandboxes as they are (DESIGN §3).
    pub fn refresh_committed(&self, store_id: &str) {
        match self.refresh_store(store_id) {
            Ok(_) | Err(SandboxError::Store(StoreError::NotFound(_) | StoreError::Corrupt(_))) => {}
            Err(e) => {
                let affected = self.registry.of_store(store_id);
                self.quarantine(store_id, &affected, &e.to_string());
            }
        }
    }

    /// Applies a change another node (or this one) made to `store_id` to this node's running
    /// sandboxes of it, as [`Sandboxes::refresh_store`] does (fleet mode, called by the
    /// follower). A store that no longer exists changes nothing: its sandboxes keep their
    /// snapshot (DESIGN.md §3).
    ///
    /// # Errors
    /// Store failures; the sandboxes keep their previous snapshot then.
    pub fn apply_store_change(&self, store_id: &str) -> Result<usize, SandboxError> {
        let _applying = lock(&self.applying);
        let affected = self.registry.of_store(store_id);
        if affected.is_empty() {
            return Ok(0);
        }
        let (store, secrets) = match self.read_store(store_id, &affected) {
            Err(StoreError::NotFound(_)) => {
                // Deleting a quarantined store is how an operator repairs its corrupt row
                // (docs/operations.md), and the kept state is the same corrupt row: its
                // sandboxes unseal nothing, and the quarantine, which held `/readyz` at 503
                // until they ended (hours; found from outside), is lifted. A kept state found
                // corrupt otherwise (tampered after the deletion) quarantines, as a live row.
                // Only a quarantine its live row caused counts: one the kept state itself caused
                // at an earlier try (or at the start) lifted itself at the next (review).
                let live_row_corrupt = lock(&self.corrupt_live).contains(store_id);
                match self.read_deleted_store(store_id, &affected) {
                    Ok(Some(last)) => last,
                    Ok(None) => return self.forget_unknown_store(store_id, &affected),
                    Err(StoreError::Corrupt(_)) if live_row_corrupt => {
                        let n = self.forget_unknown_store(store_id, &affected)?;
                        self.release(store_id, &affected);
                        return Ok(n);
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            other => other?,
        };
        let changed = self.resnapshot_all(&affected, &store.egress_allowlist, &secrets)?;
        self.release(store_id, &affected);
        if changed > 0 {
            tracing::info!(store = %store_id, sandboxes = changed, "store change applied to running sandboxes");
        }
        Ok(affected.len())
    }

    /// The sandboxes of `affected` whose snapshot the store's current allowlist and secrets
    /// change, each with its new snapshot and that snapshot's sealable form. A sandbox left as
    /// it was is not among them: swapping in an equal snapshot refused every request in flight
    /// that had unsealed ("the sandbox's store changed ... send the request again") at each
    /// fleet node's start — its follower's first check re-applies what the start applied — and
    /// after each reconnect of the follower (found by a test that failed under load).
    /// A locked sandbox serves a copy allowed nowhere: the change applies to the real snapshot
    /// it holds (retired values keep their real scope), and the lock stays.
    #[allow(clippy::type_complexity)]
    fn changed_snapshots(
        &self,
        affected: &[Arc<Sandbox>],
        allowlist: &Option<Vec<String>>,
        secrets: &[SecretRecord],
    ) -> Result<(Vec<(Arc<Sandbox>, Snapshot)>, Vec<(String, SecretValue)>), SandboxError> {
        let held = lock(&self.locked);
        let (mut changed, mut rows) = (Vec::new(), Vec::new());
        for sb in affected {
            let old = held.get(&sb.id).cloned().unwrap_or_else(|| sb.snapshot());
            let new = resnapshot(&old, allowlist, secrets)?;
            let sealed = new.to_sealable();
            if sealed.expose() != old.to_sealable().expose() {
                rows.push((sb.id.to_string(), sealed));
                changed.push((sb.clone(), new));
            }
        }
        Ok((changed, rows))
    }

    /// Sandboxes of a store found deleted without a last state they can take: none was kept
    /// (their rows came after the deletion: a creation that raced it; a deletion keeps the last
    /// state only for the sandboxes it finds), so what they read may predate a change made just
    /// before it — a rotation, a narrowing — which nothing would ever apply; or the kept state
    /// is corrupt. They unseal nothing from now on (found from outside: such sandboxes served
    /// what they read at creation, also after a restart). Only fleet mode gets here (the
    /// follower and the restore's catch-up).
    fn forget_unknown_store(
        &self,
        store_id: &str,
        affected: &[Arc<Sandbox>],
    ) -> Result<usize, SandboxError> {
        let allowlist = affected[0].snapshot().egress_allowlist.clone();
        if self.resnapshot_all(affected, &allowlist, &[])? == 0 {
            return Ok(affected.len());
        }
        tracing::warn!(
            store = %store_id,
            sandboxes = affected.len(),
            "store deleted and its last state unknown or unreadable: its sandboxes here unseal \
             nothing"
        );
        Ok(affected.len())
    }

    /// Locks (`true`) every running sandbox: a copy of its snapshot in which no secret is
    /// allowed anywhere serves until unlocked (`false`), which puts the real snapshots back.
    /// Fail closed for a node cut off from the shared database longer than
    /// `store.max_staleness_secs`: a token sent anywhere is refused (`secret_host_denied`).
    /// Sandboxes of a quarantined store ([`Sandboxes::quarantined`]) stay locked on unlock.
    pub fn set_locked(&self, locked: bool) {
        let mut held = lock(&self.locked);
        self.stale
            .store(locked, std::sync::atomic::Ordering::Release);
        if !locked {
            let quarantined = lock(&self.quarantined);
            held.retain(|id, real| {
                let Some(sb) = self.registry.get(id) else {
                    return false;
                };
                if quarantined.contains(&sb.store_id) {
                    return true;
                }
                self.registry.replace_snapshot(&sb, copy_of(real));
                false
            });
            return;
        }
        for sb in self.registry.all() {
            self.lock_one(&mut held, &sb);
        }
    }

    /// Re-snapshots `affected` against the store's current allowlist and secrets: every new
    /// snapshot is made durable in one batch, then swapped in (durable before visible). Runs
    /// under `applying`; the lock map is not held across the write, so a lock taken meanwhile
    /// is honoured at the swap (the new snapshot goes aside and a locked copy serves) and an
    /// unlock meanwhile leaves the swap to serve the new one. A sandbox the change leaves as it
    /// was keeps its snapshot, row and all ([`Sandboxes::changed_snapshots`]). Returns how
    /// many changed.
    fn resnapshot_all(
        &self,
        affected: &[Arc<Sandbox>],
        allowlist: &Option<Vec<String>>,
        secrets: &[SecretRecord],
    ) -> Result<usize, SandboxError> {
        let (changed, rows) = self.changed_snapshots(affected, allowlist, secrets)?;
        if changed.is_empty() {
            return Ok(0);
        }
        let count = changed.len();
        self.store.update_sandbox_snapshots(&rows)?;
        let mut held = lock(&self.locked);
        for (sb, snap) in changed {
            let Some(real) = held.get_mut(&sb.id) else {
                self.registry.replace_snapshot(&sb, snap);
                continue;
            };
            match locked_copy(&snap) {
                Ok(copy) => {
                    self.registry.replace_snapshot(&sb, copy);
                    *real = Arc::new(snap);
                }
                Err(e) => tracing::error!(sandbox = %sb.id, error = %e, "cannot lock sandbox"),
            }
        }
        Ok(count)
    }

    fn info(&self, sb: &Sandbox) -> SandboxInfo {
        let snap = sb.snapshot();
        SandboxInfo {
            id: sb.id.to_string(),
            secret_store_id: sb.store_id.clone(),
            secret_store_name: snap.store_name.clone(),
            created_at: sb.created_at,
            expires_at: sb.expires_at,
            source_ip: sb.source_ip,
            env: snap
                .secrets()
                .iter()
                .map(|e| (e.name.to_string(), e.token.to_string()))
                .collect(),
            proxy_env: None,
            ca_cert_path: self.cert_path(&sb.id).display().to_string(),
            ca_cert_pem: sb.ca.cert_pem().to_owned(),
            isolation: "none",
            envs: BTreeMap::new(),
            workdir: None,
            netns: None,
            user: None,
            node: self.cfg.node.clone(),
        }
    }

    fn proxy_env(&self, sb: &Sandbox, proxy_token: &str) -> BTreeMap<String, String> {
        let url = format!("http://{}:{}@{}", sb.id, proxy_token, self.cfg.proxy_public);
        let ca = self.cert_path(&sb.id).display().to_string();
        let mut env = BTreeMap::new();
        for k in PROXY_URL_VARS {
            env.insert((*k).to_owned(), url.clone());
        }
        for k in NO_PROXY_VARS {
            env.insert((*k).to_owned(), "localhost,127.0.0.1,::1".to_owned());
        }
        for k in CA_VARS {
            env.insert((*k).to_owned(), ca.clone());
        }
        env.insert(NODE_PROXY_VAR.to_owned(), "1".to_owned());
        env
    }

    /// `cert_dir/<id>.pem`.
    pub fn cert_path(&self, id: &str) -> PathBuf {
        self.cfg.cert_dir.join(format!("{id}.pem"))
    }

    fn write_cert(&self, sb: &Sandbox) -> Result<(), SandboxError> {
        let path = self.cert_path(&sb.id);
        crate::fsutil::replace_public_file(&path, sb.ca.cert_pem().as_bytes())
            .map_err(|source| SandboxError::CertFile { path, source })
    }
}

fn resnapshot(
    old: &Snapshot,
    allowlist: &Option<Vec<String>>,
    current: &[SecretRecord],
) -> Result<Snapshot, SnapshotError> {
    let by_name: HashMap<&str, &SecretRecord> =
        current.iter().map(|s| (s.meta.name.as_str(), s)).collect();
    let kept = old
        .secrets()
        .iter()
        .filter_map(|e| by_name.get(&*e.name).map(|rec| ((*rec).clone(), e.token)))
        .collect();
    let new = Snapshot::build(old.store_name.clone(), allowlist.clone(), kept)?;
    let retired = old.retired_by(&new);
    Ok(new.with_retired(retired))
}

impl follow::Target for Sandboxes {
    fn watched_stores(&self) -> Vec<String> {
        let ids: BTreeSet<String> = self
            .registry
            .all()
            .iter()
            .map(|s| s.store_id.clone())
            .collect();
        ids.into_iter().collect()
    }

    fn apply_store_change(&self, store_id: &str) -> Result<(), follow::ApplyError> {
        match Sandboxes::apply_store_change(self, store_id) {
            Ok(_) => Ok(()),
            // `read_store` quarantined the store's sandboxes.
            Err(e @ SandboxError::Store(StoreError::Corrupt(_))) => {
                Err(follow::ApplyError::Quarantined(e.to_string()))
            }
            Err(e) => Err(follow::ApplyError::NotApplied(e.to_string())),
        }
    }

    fn set_locked(&self, locked: bool) {
        Sandboxes::set_locked(self, locked);
    }

    fn reconcile_rows(&self) -> Result<(), follow::ApplyError> {
        Sandboxes::reconcile_rows(self)
            .map(drop)
            .map_err(|e| follow::ApplyError::NotApplied(e.to_string()))
    }
}

/// The records a snapshot was built from, with each secret's `allowed_hosts` replaced.
fn records_of(
    snap: &Snapshot,
    allowed: impl Fn(&super::SecretEntry) -> Option<Vec<String>>,
) -> Vec<(SecretRecord, Token)> {
    let epoch = OffsetDateTime::UNIX_EPOCH;
    snap.secrets()
        .iter()
        .map(|e| {
            let meta = SecretMeta {
                name: e.name.to_string(),
                allowed_hosts: allowed(e),
                locations: e.locations.to_vec(),
                version: 0,
                created_at: epoch,
                updated_at: epoch,
            };
            let rec = SecretRecord {
                meta,
                value: e.value.clone(),
            };
            (rec, e.token)
        })
        .collect()
}

/// `m`'s guard; a poisoned lock (a panic elsewhere) still guards consistent data here: every
/// critical section leaves its map whole.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `snap` with every secret allowed nowhere (tokens kept, so they are recognised and refused).
fn locked_copy(snap: &Snapshot) -> Result<Snapshot, SnapshotError> {
    let secrets = records_of(snap, |_| Some(Vec::new()));
    Ok(Snapshot::build(
        snap.store_name.clone(),
        snap.egress_allowlist.clone(),
        secrets,
    )?
    .with_retired(snap.retired().to_vec())
    .locked_copy_of(snap))
}

/// An equal, freshly compiled copy of `snap`.
fn copy_of(snap: &Snapshot) -> Snapshot {
    let secrets = records_of(snap, |e| e.allowed_hosts.clone());
    Snapshot::build(
        snap.store_name.clone(),
        snap.egress_allowlist.clone(),
        secrets,
    )
    .expect("patterns of a built snapshot compile again")
    .with_retired(snap.retired().to_vec())
}

fn row_of(sb: &Sandbox) -> SandboxRow {
    let snap = sb.snapshot();
    SandboxRow {
        id: sb.id.to_string(),
        store_id: sb.store_id.clone(),
        store_name: snap.store_name.clone(),
        created_at: sb.created_at,
        expires_at: sb.expires_at,
        source_ip: sb.source_ip,
        proxy_token_hash: sb.proxy_token_hash.to_vec(),
        ca_cert_pem: sb.ca.cert_pem().to_owned(),
        ca_key: sb.ca.key_pkcs8_der(),
        snapshot: snap.to_sealable(),
    }
}

/// Variables holding the sandbox's proxy URL in `proxy_env`.
pub const PROXY_URL_VARS: &[&str] = &["HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"];

/// Variables holding the hosts that bypass the proxy in `proxy_env`.
pub const NO_PROXY_VARS: &[&str] = &["NO_PROXY", "no_proxy"];

/// Node's built-in `fetch` and `http` ignore `HTTPS_PROXY` unless this is `1` (Node ≥ 24 and
/// 22.21; older Node ignores both, found from outside with Node 20): set in `proxy_env`.
pub const NODE_PROXY_VAR: &str = "NODE_USE_ENV_PROXY";

/// The sandbox id in an isolated sandbox's commands.
pub const SANDBOX_ID_VAR: &str = "SEALGATE_SANDBOX_ID";

/// True if sealgate sets variable `name` itself in a sandbox's environment (`proxy_env`, or
/// an isolated sandbox's commands), where a secret of that name would clash with it: its
/// token would be overwritten, or would overwrite what the sandbox needs.
pub fn set_by_sealgate(name: &str) -> bool {
    name == SANDBOX_ID_VAR
        || name == NODE_PROXY_VAR
        || [PROXY_URL_VARS, NO_PROXY_VARS, CA_VARS]
            .iter()
            .any(|vars| vars.contains(&name))
}

/// Variables pointed at the sandbox CA certificate (DESIGN §7 "Clients"); the one list for
/// both the returned proxy environment and isolated commands.
pub const CA_VARS: &[&str] = &[
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "NODE_EXTRA_CA_CERTS",
    "GIT_SSL_CAINFO",
    // gRPC's C core (Python grpcio, Ruby, PHP, C++) reads neither SSL_CERT_FILE nor the system
    // store for its default roots.
    "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH",
    // npm: a `cafile` in an npmrc (distributions and CI images set one) overrides
    // NODE_EXTRA_CA_CERTS, and `npm install` failed SELF_SIGNED_CERT_IN_CHAIN (outside pass).
    "NPM_CONFIG_CAFILE",
];

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}
/// A `source_ip` as the transparent listener will see it: an IPv4-mapped IPv6 address is the
/// IPv4 address (the listener canonicalises peers the same way, so `::ffff:10.0.0.2` and
/// `10.0.0.2` are one address, and one sandbox at a time may hold it). An address no
/// connection can come from (unspecified, multicast, broadcast) is refused.
fn connection_source(ip: IpAddr) -> Result<IpAddr, SandboxError> {
    let ip = ip.to_canonical();
    let never = ip.is_unspecified()
        || ip.is_multicast()
        || matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
    if never {
        return Err(SandboxError::BadRequest(format!(
            "source_ip {ip} is never the source of a connection (unspecified, multicast or broadcast)"
        )));
    }
    Ok(ip)
}

/// Why a variable of `field` (`envs`, a command's `env`) may not carry a secret's name: the
/// sandbox holds that secret's sealed token in it. A plain value there would hide the token
/// from the sandbox's code while its `env` still showed it, and the likeliest plain value
/// is the real one (code moved from the host's environment): refused, never overridden.
pub fn shadowed_secret(field: &str, name: &str, store: &str) -> String {
    format!(
        "{field}: {name} is a secret of store {store}: the sandbox holds its sealed token in \
         {name}; leave it out of {field}"
    )
}
