//! Persistence of stores, secrets and sandbox sessions: the [`Store`] trait, its records and errors.
//!
//! Invariants every implementation keeps:
//! - Secret values, sandbox CA keys and sandbox snapshots are only ever written sealed
//!   ([`crypto::seal`]) and bound to their row; a row that fails to open is an error
//!   ([`StoreError::Corrupt`]) naming the row, never a silently skipped or empty value.
//! - Store names are unique. Deleting a store deletes its secrets but no sandbox session
//!   (running sandboxes keep their snapshot, DESIGN.md §3).
//! - No error message contains a secret value, a CA key or key material.
//! - Names and host patterns are stored as given: the admin API validates them.

pub mod crypto;
pub mod postgres;
mod rows;
pub mod sqlite;
#[cfg(test)]
pub(crate) mod suite;

use std::net::IpAddr;

use time::OffsetDateTime;

use crate::secret::{Location, SecretValue};

pub use crypto::{CryptoError, KeySource, MasterKey};
pub use postgres::PgStore;
pub use sqlite::SqliteStore;

/// A secret store as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct StoreRecord {
    /// UUID v4, assigned at creation.
    pub id: String,
    /// Unique among stores.
    pub name: String,
    /// `None`: any public host; `Some([])`: no host.
    pub egress_allowlist: Option<Vec<String>>,
    /// When the store was created (UTC).
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// When its name or allowlist last changed (UTC); secret changes do not touch it.
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

impl StoreRecord {
    /// A new store: a fresh UUID v4, created and updated now.
    pub fn new(name: &str, egress_allowlist: Option<Vec<String>>) -> StoreRecord {
        let now = OffsetDateTime::now_utc();
        StoreRecord {
            id: uuid::Uuid::new_v4().to_string(),
            name: name.to_owned(),
            egress_allowlist,
            created_at: now,
            updated_at: now,
        }
    }
}

/// What [`Store::list_stores`] found: every store whose row passes its checks, oldest first,
/// and the ids of the rows that do not.
///
/// Invariant: a row that fails its checks is named in `corrupt` and never appears in `stores`
/// (one damaged row does not hide the others, and is never shown as if it were sound).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoreListing {
    /// The stores whose rows opened, oldest first.
    pub stores: Vec<StoreRecord>,
    /// Ids of the rows that failed their checks ([`StoreError::Corrupt`]).
    pub corrupt: Vec<String>,
}

/// A secret's metadata: everything but the value.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SecretMeta {
    /// The secret's name (an env-var name, validated by the API), unique within its store.
    pub name: String,
    /// `None`: no restriction of its own (the store allowlist decides).
    pub allowed_hosts: Option<Vec<String>>,
    /// Where its token may be unsealed.
    pub locations: Vec<Location>,
    /// 1 on creation, +1 on each replace; bound into the value's associated data.
    #[serde(skip)]
    pub version: u64,
    /// When the secret was first created (kept across replaces; UTC).
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// When the value or its metadata was last replaced (UTC).
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

/// A secret with its decrypted value. Not serialisable, on purpose.
#[derive(Clone, Debug)]
pub struct SecretRecord {
    /// Everything but the value.
    pub meta: SecretMeta,
    /// The real value; `Debug` prints `[redacted]`.
    pub value: SecretValue,
}

/// A persisted sandbox session. `snapshot` is an opaque blob (JSON made by the sandbox module)
/// sealed by the store, as is `ca_key`.
#[derive(Clone, Debug)]
pub struct SandboxRow {
    /// `sbx_…`, unique.
    pub id: String,
    /// The store the sandbox was created from (it may since have been deleted).
    pub store_id: String,
    /// That store's name at creation.
    pub store_name: String,
    /// Creation time (UTC).
    pub created_at: OffsetDateTime,
    /// When the sandbox ends (UTC).
    pub expires_at: OffsetDateTime,
    /// Source address registered for transparent mode.
    pub source_ip: Option<IpAddr>,
    /// Hash of the proxy token (the token itself is never stored).
    pub proxy_token_hash: Vec<u8>,
    /// The sandbox CA's public certificate.
    pub ca_cert_pem: String,
    /// The sandbox CA's private key (sealed at rest).
    pub ca_key: SecretValue,
    /// The sandbox module's snapshot (sealed at rest: it holds secret values and tokens).
    pub snapshot: SecretValue,
}

/// What a master-key rotation re-sealed (the key-check record is always re-sealed too).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RotationStats {
    /// Secret values re-sealed.
    pub secrets: usize,
    /// Sandbox rows re-sealed (CA key and snapshot each).
    pub sandboxes: usize,
}

/// What was looked for and not found, kept apart from its message: an admin answer repeats
/// a name only when it cannot be a value (`admin::error`), which a name holding `'` made
/// impossible to tell from the formatted text (a review).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    /// `store`, `secret` or `sandbox`.
    pub kind: &'static str,
    /// The id or name as the caller gave it.
    pub name: String,
    /// The store a secret was looked for in.
    pub store: Option<String>,
}

impl Missing {
    /// The store `id` (or name).
    pub fn store(id: &str) -> Missing {
        Missing {
            kind: "store",
            name: id.into(),
            store: None,
        }
    }

    /// The sandbox `id`.
    pub fn sandbox(id: &str) -> Missing {
        Missing {
            kind: "sandbox",
            name: id.into(),
            store: None,
        }
    }

    /// The secret `name` in the store `store_id`.
    pub fn secret(name: &str, store_id: &str) -> Missing {
        Missing {
            kind: "secret",
            name: name.into(),
            store: Some(store_id.into()),
        }
    }
}

impl From<rusqlite::Error> for StoreError {
    /// A row mapper's [`sqlite::BadColumn`] is the row being corrupt, named; every other
    /// rusqlite error is the database failing.
    fn from(e: rusqlite::Error) -> Self {
        match sqlite::BadColumn::of(&e) {
            Some(bad) => StoreError::Corrupt(bad.to_string()),
            None => StoreError::Database(e),
        }
    }
}

impl std::fmt::Display for Missing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} '{}'", self.kind, self.name)?;
        match &self.store {
            Some(store) => write!(f, " in store '{store}'"),
            None => Ok(()),
        }
    }
}

/// Errors of the persistence layer. Messages name rows (store ids, secret names, sandbox ids)
/// but never values.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The thing named (e.g. `store 'id'`) does not exist.
    #[error("{0} not found")]
    NotFound(Missing),
    /// A uniqueness rule was violated (e.g. `store name 'x' is already taken`).
    #[error("{0}")]
    Conflict(String),
    /// The key-check record does not open with this master key.
    #[error(
        "the master key does not match this database ({}); a daemon refuses to start with it: \
         give it the key the database was sealed under (a fleet node: the fleet's key), or \
         see docs/operations.md, Master key rotation",
        .0.display()
    )]
    WrongMasterKey(std::path::PathBuf),
    /// A stored row failed to decrypt or decode; names the row, never the value.
    #[error("stored data is corrupt or was tampered with: {0}")]
    Corrupt(String),
    /// The database was written by a newer sealgate.
    #[error("database schema version {found} is newer than this build supports ({supported})")]
    SchemaTooNew {
        /// `PRAGMA user_version` (SQLite) or the highest migration (PostgreSQL) found.
        found: i64,
        /// The newest schema this build knows.
        supported: i64,
    },
    /// As [`StoreError::WrongMasterKey`], for a database read with a non-empty `-wal` beside
    /// it: the daemon's own after a stop without a clean shutdown or an interrupted key
    /// rotation (it holds the latest writes), or one of another copy left by a restore —
    /// which made the right key look wrong (outside pass h38b). Nothing tells the two apart:
    /// a key that opens the file without the `-wal` fits a foreign `-wal` and a rotation
    /// committed in the database's own alike (re-check h38l: a version that named the first
    /// sent an operator to discard a rotation and 97 acknowledged writes). Only the start's
    /// final refusal says this.
    #[error(
        "the master key does not match this database ({}) as read with the -wal file beside it \
         ({}): give the daemon the key the database was sealed under (after an interrupted \
         rotation, the new one). Keep that -wal if this database's own daemon or key rotation \
         stopped without a clean end (it holds the latest writes); only if it came from \
         another copy of the database (a restore that left it behind) move it away and start \
         again. The database file was left as it was",
        .db.display(),
        .wal.display()
    )]
    WrongMasterKeyBesideWal {
        /// The database file.
        db: std::path::PathBuf,
        /// The `-wal` beside it.
        wal: std::path::PathBuf,
    },
    /// A value passed in cannot be stored (e.g. a time outside the representable range).
    #[error("cannot store {0}")]
    InvalidInput(String),
    /// SQLite failed.
    #[error("database error: {0}")]
    Database(rusqlite::Error),
    /// PostgreSQL answered with an error (SQLSTATE and message; never a value).
    #[error("database error: {0}")]
    Postgres(String),
    /// The database cannot be reached right now (fleet mode); the message says which one (its
    /// password redacted) and why. Running sandboxes keep working from their snapshots.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// As `Unavailable`, but after a write was sent (a `COMMIT`, or a statement outside a
    /// transaction): the change may have been applied, and only reading it back tells.
    #[error("store unavailable: {0}")]
    Unconfirmed(String),
    /// Encoding a JSON column failed.
    #[error("encoding a JSON column failed: {0}")]
    Encode(#[from] serde_json::Error),
    /// A file-system operation on the data directory failed.
    #[error("data directory: {0}")]
    Io(#[from] std::io::Error),
    /// Creating the data directory or another key-related operation failed.
    #[error(transparent)]
    Crypto(#[from] CryptoError),
}

/// The persistence layer. Implementations are safe to share between threads; every method is a
/// short blocking call (async callers use `spawn_blocking` or accept the block: sub-millisecond
/// for SQLite; for PostgreSQL a few round trips, bounded at 5 s, on the store's own runtime). The
/// proxy's per-request path never calls it.
pub trait Store: Send + Sync {
    /// Creates a store with a new UUID v4 id.
    ///
    /// # Errors
    /// [`StoreError::Conflict`] if `name` is taken.
    fn create_store(
        &self,
        name: &str,
        egress_allowlist: Option<Vec<String>>,
    ) -> Result<StoreRecord, StoreError>;

    /// All stores, oldest first; a row that fails its checks is listed by id in
    /// [`StoreListing::corrupt`] instead of failing the whole listing.
    fn list_stores(&self) -> Result<StoreListing, StoreError>;

    /// The store with this id.
    ///
    /// # Errors
    /// [`StoreError::NotFound`].
    fn get_store(&self, id: &str) -> Result<StoreRecord, StoreError>;

    /// The store whose id is `id_or_name`, else the one with that name.
    ///
    /// # Errors
    /// [`StoreError::NotFound`].
    fn find_store(&self, id_or_name: &str) -> Result<StoreRecord, StoreError>;

    /// Partial update: `None` leaves a field unchanged; `egress_allowlist: Some(None)` clears the
    /// allowlist (unrestricted). `updated_at` changes only when a field is given.
    ///
    /// # Errors
    /// [`StoreError::NotFound`]; [`StoreError::Conflict`] when renaming to a taken name.
    fn update_store(
        &self,
        id: &str,
        name: Option<&str>,
        egress_allowlist: Option<Option<Vec<String>>>,
    ) -> Result<StoreRecord, StoreError>;

    /// Deletes the store and its secrets; sandbox rows made from it stay.
    ///
    /// # Errors
    /// [`StoreError::NotFound`].
    fn delete_store(&self, id: &str) -> Result<(), StoreError>;

    /// The store and its secrets (with values) as of one moment: a reader between the two
    /// would otherwise see the store of before a deletion and the (cascaded) empty secrets of
    /// after it, and take "no secrets" for the store's state.
    ///
    /// # Errors
    /// As [`Store::get_store`] and [`Store::load_secrets`].
    fn store_with_secrets(&self, id: &str) -> Result<(StoreRecord, Vec<SecretRecord>), StoreError> {
        Ok((self.get_store(id)?, self.load_secrets(id)?))
    }

    /// The last state of deleted store `id` — its row and secrets as they were when it was
    /// deleted — if the backend keeps it (PostgreSQL, for the fleet's nodes that had not
    /// applied it yet: without it such a node kept an older snapshot, a revoked secret with it).
    ///
    /// # Errors
    /// Store failures; [`StoreError::Corrupt`] for a row that fails its checks.
    fn deleted_store(
        &self,
        _id: &str,
    ) -> Result<Option<(StoreRecord, Vec<SecretRecord>)>, StoreError> {
        Ok(None)
    }

    /// Creates or replaces a secret. A replace keeps `created_at`, bumps `version` and seals the
    /// value afresh (new nonce, associated data with the new version).
    ///
    /// # Errors
    /// [`StoreError::NotFound`] if the store does not exist.
    fn put_secret(
        &self,
        store_id: &str,
        name: &str,
        value: &SecretValue,
        allowed_hosts: Option<Vec<String>>,
        locations: Vec<Location>,
    ) -> Result<SecretMeta, StoreError>;

    /// The store's secrets' metadata, by name.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] if the store does not exist.
    fn list_secrets(&self, store_id: &str) -> Result<Vec<SecretMeta>, StoreError>;

    /// The store's secrets with decrypted values, by name.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] if the store does not exist; [`StoreError::Corrupt`] naming the
    /// first row that fails to open (nothing is returned then: fail closed).
    ///
    /// # Memory usage
    /// All of the store's values at once (each ≤ 64 KiB by API rule), zeroized when dropped.
    fn load_secrets(&self, store_id: &str) -> Result<Vec<SecretRecord>, StoreError>;

    /// Deletes one secret.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] naming the store or the secret.
    fn delete_secret(&self, store_id: &str, name: &str) -> Result<(), StoreError>;

    /// Persists a new sandbox session (CA key and snapshot sealed).
    ///
    /// # Errors
    /// [`StoreError::Conflict`] if the id exists.
    fn insert_sandbox(&self, row: &SandboxRow) -> Result<(), StoreError>;

    /// Replaces a sandbox's snapshot (sealed afresh).
    ///
    /// # Errors
    /// [`StoreError::NotFound`].
    fn update_sandbox_snapshot(&self, id: &str, snapshot: &SecretValue) -> Result<(), StoreError>;

    /// Replaces the snapshots of many sandboxes at once (a store change reaching its running
    /// sandboxes). Ids that no longer exist (ended meanwhile) are skipped. The default runs
    /// [`Store::update_sandbox_snapshot`] for each; a backend may do it in one round trip.
    ///
    /// # Errors
    /// The first store failure; rows written before it stay written.
    fn update_sandbox_snapshots(&self, rows: &[(String, SecretValue)]) -> Result<(), StoreError> {
        for (id, snapshot) in rows {
            match self.update_sandbox_snapshot(id, snapshot) {
                Ok(()) | Err(StoreError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Every persisted sandbox, decrypted, oldest first (expired ones included until purged).
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] naming the first sandbox id that fails to open.
    ///
    /// # Memory usage
    /// Every sandbox row at once (a CA key and a snapshot of a few KiB each), meant for startup.
    fn load_sandboxes(&self) -> Result<Vec<SandboxRow>, StoreError>;

    /// The ids of every persisted sandbox (of this node, in fleet mode), nothing decrypted:
    /// what [`crate::sandbox::Sandboxes::reconcile_rows`] compares the live ones with. The
    /// default reads whole rows; a backend overrides it with a cheaper read.
    ///
    /// # Errors
    /// Store failures.
    fn sandbox_ids(&self) -> Result<std::collections::HashSet<String>, StoreError> {
        Ok(self
            .load_sandboxes()?
            .into_iter()
            .map(|row| row.id)
            .collect())
    }

    /// Deletes a sandbox row.
    ///
    /// # Errors
    /// [`StoreError::NotFound`].
    fn delete_sandbox(&self, id: &str) -> Result<(), StoreError>;

    /// Fleet mode: the node holding live sandbox `id` when that is not this node (`None`
    /// with one host, or when no other node has it), so an admin call sent to the wrong node
    /// can say where to go.
    ///
    /// # Errors
    /// Database failures.
    fn sandbox_elsewhere(&self, id: &str) -> Result<Option<String>, StoreError> {
        let _ = id;
        Ok(None)
    }

    /// Deletes sandboxes with `expires_at <= now`; returns their ids.
    fn purge_expired_sandboxes(&self, now: OffsetDateTime) -> Result<Vec<String>, StoreError>;

    /// Readiness: a trivial query plus opening the key-check record.
    fn check(&self) -> Result<(), StoreError>;

    /// Re-seals every secret value, CA key, snapshot and the key-check record under `new_key` in
    /// one transaction; the in-memory key switches only after the commit. On error nothing
    /// changed: the store still works with the old key.
    ///
    /// The caller must make `new_key` durable where the next start reads it (key file or env)
    /// before relying on the rotated database.
    fn rotate_master_key(&self, new_key: &MasterKey) -> Result<RotationStats, StoreError>;
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;

    #[test]
    fn records_serialise_with_rfc3339_times_and_without_version() {
        let t = datetime!(2025-03-01 12:30:05.25 UTC);
        let store = StoreRecord {
            id: "id-1".into(),
            name: "prod".into(),
            egress_allowlist: None,
            created_at: t,
            updated_at: t,
        };
        assert_eq!(
            serde_json::to_value(&store).unwrap(),
            serde_json::json!({"id": "id-1", "name": "prod", "egress_allowlist": null,
                "created_at": "2025-03-01T12:30:05.25Z", "updated_at": "2025-03-01T12:30:05.25Z"})
        );
        let meta = SecretMeta {
            name: "K".into(),
            allowed_hosts: Some(vec!["a.example".into()]),
            locations: vec![Location::Header],
            version: 7,
            created_at: t,
            updated_at: t,
        };
        let json = serde_json::to_value(&meta).unwrap();
        assert_eq!(json["locations"], serde_json::json!(["header"]));
        assert!(json.get("version").is_none());
    }

    #[test]
    fn errors_do_not_quote_values() {
        let err = StoreError::Corrupt("secret 'K' of store 's': sealed data failed".into());
        assert_eq!(
            err.to_string(),
            "stored data is corrupt or was tampered with: secret 'K' of store 's': sealed data failed"
        );
    }
}
