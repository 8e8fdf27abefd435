//! The SQLite [`Store`]: one WAL database file, `data_dir/sealgate.db`, with every value sealed.
//!
//! Invariants:
//! - One mutex guards the connection *and* the master key together ([`Db`]), so every access
//!   from this process is serialised and no read or write can see one key with the other's
//!   rows: a rotation holds the lock from its first read to the key swap after commit.
//! - Times are stored as Unix nanoseconds (UTC) so `ORDER BY created_at` is chronological.
//! - `secure_delete` is on, so a deleted or re-sealed ciphertext is overwritten in the database
//!   file instead of lingering in free pages; after a rotation the WAL is checkpointed and
//!   truncated so ciphertexts under the retired key do not linger there either.
//! - The database and its `-wal`/`-shm` files have mode 0600 (SQLite gives the side files the
//!   database file's mode).
//! - Every `stores` and `secrets` row carries `policy_mac` ([`crypto::StorePolicy`],
//!   [`crypto::SecretPolicy`]); a row whose policy does not match it is refused like an
//!   altered ciphertext. Databases from before policy MACs have a v1 key-check record: the
//!   first open with the key computes every MAC and writes the v2 record in one transaction
//!   (after that a missing MAC is tampering, not age).

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use rusqlite::config::DbConfig;
use rusqlite::types::Type;
use rusqlite::{
    params, Connection, OptionalExtension, Params, Row, Transaction, TransactionBehavior,
};
use time::OffsetDateTime;

use super::crypto::{self, MasterKey};
use super::rows::{
    self, next_secret_meta, reseal, seal_ca_key, secret_policy, store_policy, to_json_opt,
    to_nanos, to_version, version_column, RawSandbox, RawSecret, RawStore,
};
use super::{
    Missing, RotationStats, SandboxRow, SecretMeta, SecretRecord, Store, StoreError, StoreListing,
    StoreRecord,
};
use crate::secret::{Location, SecretValue};

/// File name of the database inside `data_dir`.
pub const DB_FILE_NAME: &str = "sealgate.db";

/// How long a statement waits for a lock held by another connection.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Plaintext of the key-check record of a database whose rows predate policy MACs.
const KEY_CHECK_PLAINTEXT: &[u8] = b"sealgate key check";

/// Plaintext of the key-check record once every row carries its policy MAC.
const KEY_CHECK_PLAINTEXT_V2: &[u8] = b"sealgate key check v2: policy MACs";

/// Plaintext of the key-check record once, also, every sandbox row's CA key is bound to its
/// columns ([`crypto::sandbox_ca_aad_v2`]).
const KEY_CHECK_PLAINTEXT_V3: &[u8] = b"sealgate key check v3: policy MACs, bound sandbox rows";

/// `meta.key` of the key-check record.
const KEY_CHECK_ROW: &str = "key_check";

/// Schema migrations; `PRAGMA user_version` is the number applied. Append only, never edit.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value BLOB NOT NULL                 -- key_check: sealed KEY_CHECK_PLAINTEXT
) STRICT;
CREATE TABLE stores (
    id               TEXT PRIMARY KEY,  -- UUID v4
    name             TEXT NOT NULL UNIQUE,
    egress_allowlist TEXT,              -- JSON array of patterns; NULL = any public host
    created_at       INTEGER NOT NULL,  -- Unix nanoseconds, UTC
    updated_at       INTEGER NOT NULL
) STRICT;
CREATE TABLE secrets (
    store_id      TEXT NOT NULL REFERENCES stores(id) ON DELETE CASCADE,
    name          TEXT NOT NULL,
    allowed_hosts TEXT,                 -- JSON array; NULL = no restriction of its own
    locations     TEXT NOT NULL,        -- JSON array of "header" | "query" | "body"
    version       INTEGER NOT NULL,     -- bound into the value's associated data
    value         BLOB NOT NULL,        -- sealed, AAD secret_aad(store_id, name, version)
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL,
    PRIMARY KEY (store_id, name)
) STRICT;
CREATE TABLE sandboxes (
    id               TEXT PRIMARY KEY,
    store_id         TEXT NOT NULL,     -- no foreign key: sandboxes outlive their store
    store_name       TEXT NOT NULL,
    created_at       INTEGER NOT NULL,
    expires_at       INTEGER NOT NULL,
    source_ip        TEXT,
    proxy_token_hash BLOB NOT NULL,
    ca_cert_pem      TEXT NOT NULL,
    ca_key           BLOB NOT NULL,     -- sealed, AAD sandbox_ca_aad(id); v3 key check: _v2(columns)
    snapshot         BLOB NOT NULL      -- sealed, AAD snapshot_aad(id)
) STRICT;
CREATE INDEX sandboxes_by_expiry ON sandboxes (expires_at);
"#,
    r#"
ALTER TABLE stores ADD COLUMN policy_mac BLOB;   -- crypto::StorePolicy MAC of egress_allowlist
ALTER TABLE secrets ADD COLUMN policy_mac BLOB;  -- crypto::SecretPolicy MAC of allowed_hosts, locations
"#,
    // No change to the tables: a marker. This build keeps state beside the database that the
    // builds before it ignore (`data_dir/pending-deletions`, `isolated-sandboxes`); one of them
    // started on this database served again a sandbox deleted while the database refused
    // writes (an outside upgrade pass). Past this version they refuse to start instead
    // ("schema … newer than this build").
    DATA_DIR_STATE_MARKER,
];

/// See the last of [`MIGRATIONS`] (shared with the PostgreSQL schema).
pub(crate) const DATA_DIR_STATE_MARKER: &str =
    "SELECT 'sealgate keeps deletions pending in data_dir'";

const STORE_COLUMNS: &str = "id, name, egress_allowlist, created_at, updated_at, policy_mac";
const SECRET_META_COLUMNS: &str =
    "store_id, name, allowed_hosts, locations, version, created_at, updated_at, policy_mac";
const SANDBOX_COLUMNS: &str = "id, store_id, store_name, created_at, expires_at, source_ip, \
                               proxy_token_hash, ca_cert_pem, ca_key, snapshot";

/// The SQLite-backed [`Store`].
///
/// # Memory usage
/// One SQLite connection (page cache up to SQLite's default ~2 MiB) plus, per call, the rows it
/// returns. A rotation holds every sealed blob of the database in memory at once (the database
/// is small: values ≤ 64 KiB each, a few KiB per sandbox).
pub struct SqliteStore {
    db_path: PathBuf,
    /// The connection and the key its rows are sealed under, behind one lock.
    db: Mutex<Db>,
    /// Device and inode of the file opened, so [`Store::check`] notices the path being removed
    /// or replaced under the open connection (SQLite would keep using the unlinked file).
    file_id: (u64, u64),
    /// This open initialised the database ([`SqliteStore::is_fresh`]).
    fresh: bool,
    /// Test hook: make the next rotation fail after re-sealing everything, before commit.
    #[cfg(test)]
    fail_rotation_before_commit: std::sync::atomic::AtomicBool,
}

impl SqliteStore {
    /// Opens or creates `data_dir/sealgate.db`: WAL, `foreign_keys` on, a busy timeout,
    /// `synchronous = FULL` ([`configure`]), file mode 0600; runs pending migrations
    /// (`PRAGMA user_version`); writes the key-check record on first open and verifies it on
    /// every later one.
    ///
    /// # Errors
    /// [`StoreError::WrongMasterKey`] if `key` is not the key this database was sealed with;
    /// [`StoreError::SchemaTooNew`] for a database from a newer build; I/O and SQLite errors.
    pub fn open(data_dir: &Path, key: MasterKey) -> Result<Self, StoreError> {
        crypto::ensure_private_dir(data_dir)?;
        let db_path = data_dir.join(DB_FILE_NAME);
        prepare_files(&db_path)?;
        let mut conn = Connection::open(&db_path).map_err(|e| at_open(e.into(), None, &db_path))?;
        // Until the key opens the file, closing it must not checkpoint: a `-wal` of another
        // database, replayed on open, went into the file when a refused start closed it, and
        // the original was lost (outside pass h38b).
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)?;
        let fresh = configure(&conn)
            .and_then(|()| migrate(&mut conn))
            .and_then(|()| init_key_check(&mut conn, &key, &db_path))
            .map_err(|e| at_open(e, Some(&conn), &db_path))?;
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, false)?;
        let file_id = file_id(&fs::metadata(&db_path)?);
        Ok(SqliteStore {
            db_path,
            file_id,
            fresh,
            db: Mutex::new(Db { conn, key }),
            #[cfg(test)]
            fail_rotation_before_commit: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Whether this open initialised the database (it held no key-check record).
    pub fn is_fresh(&self) -> bool {
        self.fresh
    }

    /// The database file.
    pub fn db_path(&self) -> &Path {
        &self.db_path
    }

    /// Runs `f` with the connection locked and the current master key — once the path still
    /// names the file this store opened: a removed or replaced file kept answering, and every
    /// write acknowledged went into the unlinked one, lost at the next start (outside pass:
    /// `/readyz` said the file was removed while creates answered 201).
    fn with_conn<T>(
        &self,
        f: impl FnOnce(&mut Connection, &MasterKey) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.check_file().map_err(|e| {
            StoreError::Unavailable(format!(
                "{e}: what is written to it now would be lost (put the file back, or restore \
                 a backup and restart sealgate)"
            ))
        })?;
        let mut db = self.lock();
        let Db { conn, key } = &mut *db;
        f(conn, key)
    }

    /// The connection and key. A panic while locked cannot leave a half-written transaction
    /// (`Transaction` rolls back on drop), so a poisoned lock is safe to reuse.
    fn lock(&self) -> std::sync::MutexGuard<'_, Db> {
        self.db.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Fails when the path no longer names the file this store opened (removed or replaced).
    fn check_file(&self) -> Result<(), StoreError> {
        let gone = |why: &str| {
            StoreError::Io(io::Error::other(format!(
                "database file {} {why}",
                self.db_path.display()
            )))
        };
        match fs::metadata(&self.db_path) {
            Ok(m) if file_id(&m) == self.file_id => Ok(()),
            Ok(_) => Err(gone("was replaced after it was opened")),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(gone("was removed")),
            Err(e) => Err(e.into()),
        }
    }

    #[cfg(test)]
    fn injected_rotation_failure(&self) -> Result<(), StoreError> {
        use std::sync::atomic::Ordering;
        if self
            .fail_rotation_before_commit
            .swap(false, Ordering::SeqCst)
        {
            return Err(StoreError::Io(io::Error::other(
                "injected rotation failure",
            )));
        }
        Ok(())
    }

    #[cfg(not(test))]
    fn injected_rotation_failure(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

impl Store for SqliteStore {
    fn create_store(
        &self,
        name: &str,
        egress_allowlist: Option<Vec<String>>,
    ) -> Result<StoreRecord, StoreError> {
        let record = StoreRecord::new(name, egress_allowlist);
        self.with_conn(|conn, key| insert_store(conn, key, &record))?;
        Ok(record)
    }

    fn list_stores(&self) -> Result<StoreListing, StoreError> {
        self.with_conn(|conn, key| {
            let sql = format!("SELECT {STORE_COLUMNS} FROM stores ORDER BY created_at, rowid");
            let mut stmt = conn.prepare_cached(&sql)?;
            let (mut raws, mut bad) = (Vec::new(), Vec::new());
            for read in stmt.query_map([], RawStore::from_sqlite)? {
                match read {
                    Ok(raw) => raws.push(raw),
                    // One damaged row does not hide the others (`StoreListing`).
                    Err(e) => match BadColumn::of(&e) {
                        Some(b) => bad.push(b.id.clone().unwrap_or_else(|| "(not text)".into())),
                        None => return Err(e.into()),
                    },
                }
            }
            let mut listing = rows::listing(raws, key)?;
            listing.corrupt.extend(bad);
            Ok(listing)
        })
    }

    fn get_store(&self, id: &str) -> Result<StoreRecord, StoreError> {
        self.with_conn(|conn, key| store_by_id(conn, key, id))
    }

    fn find_store(&self, id_or_name: &str) -> Result<StoreRecord, StoreError> {
        self.with_conn(|conn, key| match store_by_id(conn, key, id_or_name) {
            Err(StoreError::NotFound(_)) => {
                select_stores(conn, key, "WHERE name = ?1", [id_or_name])?
                    .pop()
                    .ok_or_else(|| StoreError::NotFound(Missing::store(id_or_name)))
            }
            found => found,
        })
    }

    fn update_store(
        &self,
        id: &str,
        name: Option<&str>,
        egress_allowlist: Option<Option<Vec<String>>>,
    ) -> Result<StoreRecord, StoreError> {
        self.with_conn(|conn, key| {
            let tx = write_tx(conn)?;
            let mut record = store_by_id(&tx, key, id)?;
            if name.is_none() && egress_allowlist.is_none() {
                return Ok(record);
            }
            if let Some(name) = name {
                record.name = name.to_owned();
            }
            if let Some(allowlist) = egress_allowlist {
                record.egress_allowlist = allowlist;
            }
            record.updated_at = OffsetDateTime::now_utc();
            rewrite_store(&tx, key, &record)?;
            tx.commit()?;
            Ok(record)
        })
    }

    fn delete_store(&self, id: &str) -> Result<(), StoreError> {
        self.with_conn(|conn, _| {
            // Secrets go by ON DELETE CASCADE; sandboxes have no foreign key and stay.
            let n = conn.execute("DELETE FROM stores WHERE id = ?1", [id])?;
            expect_one_row(n, || Missing::store(id))
        })
    }

    fn put_secret(
        &self,
        store_id: &str,
        name: &str,
        value: &SecretValue,
        allowed_hosts: Option<Vec<String>>,
        locations: Vec<Location>,
    ) -> Result<SecretMeta, StoreError> {
        self.with_conn(|conn, key| {
            let tx = write_tx(conn)?;
            require_store(&tx, store_id)?;
            let meta = next_meta(&tx, store_id, name, allowed_hosts, locations)?;
            let aad = crypto::secret_aad(store_id, name, meta.version);
            let sealed = crypto::seal(key, &aad, value.expose());
            let mac = secret_policy(store_id, &meta).mac(key);
            upsert_secret(&tx, store_id, &meta, &sealed, &mac)?;
            tx.commit()?;
            Ok(meta)
        })
    }

    fn list_secrets(&self, store_id: &str) -> Result<Vec<SecretMeta>, StoreError> {
        self.with_conn(|conn, key| {
            require_store(conn, store_id)?;
            select_secrets(conn, store_id, false)?
                .into_iter()
                .map(|raw| raw.into_meta(key))
                .collect()
        })
    }

    fn load_secrets(&self, store_id: &str) -> Result<Vec<SecretRecord>, StoreError> {
        self.with_conn(|conn, key| {
            require_store(conn, store_id)?;
            select_secrets(conn, store_id, true)?
                .into_iter()
                .map(|raw| raw.into_record(key))
                .collect()
        })
    }

    fn delete_secret(&self, store_id: &str, name: &str) -> Result<(), StoreError> {
        self.with_conn(|conn, _| {
            let tx = write_tx(conn)?;
            require_store(&tx, store_id)?;
            let n = tx.execute(
                "DELETE FROM secrets WHERE store_id = ?1 AND name = ?2",
                [store_id, name],
            )?;
            expect_one_row(n, || Missing::secret(name, store_id))?;
            tx.commit()?;
            Ok(())
        })
    }

    fn insert_sandbox(&self, row: &SandboxRow) -> Result<(), StoreError> {
        self.with_conn(|conn, key| insert_sandbox_row(conn, key, row))
    }

    fn update_sandbox_snapshot(&self, id: &str, snapshot: &SecretValue) -> Result<(), StoreError> {
        self.with_conn(|conn, key| {
            let sealed = crypto::seal(key, &crypto::snapshot_aad(id), snapshot.expose());
            let n = conn.execute(
                "UPDATE sandboxes SET snapshot = ?2 WHERE id = ?1",
                params![id, sealed],
            )?;
            expect_one_row(n, || Missing::sandbox(id))
        })
    }

    fn load_sandboxes(&self) -> Result<Vec<SandboxRow>, StoreError> {
        self.with_conn(|conn, key| {
            let sql = format!("SELECT {SANDBOX_COLUMNS} FROM sandboxes ORDER BY created_at, rowid");
            let mut stmt = conn.prepare_cached(&sql)?;
            let raws = stmt
                .query_map([], RawSandbox::from_sqlite)?
                .collect::<Result<Vec<_>, _>>()?;
            raws.into_iter().map(|raw| raw.into_row(key)).collect()
        })
    }

    fn delete_sandbox(&self, id: &str) -> Result<(), StoreError> {
        self.with_conn(|conn, _| {
            let n = conn.execute("DELETE FROM sandboxes WHERE id = ?1", [id])?;
            expect_one_row(n, || Missing::sandbox(id))
        })
    }

    fn purge_expired_sandboxes(&self, now: OffsetDateTime) -> Result<Vec<String>, StoreError> {
        let now = to_nanos(now, "purge time")?;
        self.with_conn(|conn, _| {
            let mut stmt =
                conn.prepare("DELETE FROM sandboxes WHERE expires_at <= ?1 RETURNING id")?;
            let ids = stmt
                .query_map([now], |r| r.get::<_, String>(0))?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(ids)
        })
    }

    fn check(&self) -> Result<(), StoreError> {
        self.check_file()?;
        self.with_conn(|conn, key| {
            conn.query_row("SELECT 1", [], |_| Ok(()))?;
            verify_key_check(conn, key, &self.db_path).map(|_| ())
        })
    }

    fn rotate_master_key(&self, new_key: &MasterKey) -> Result<RotationStats, StoreError> {
        let mut db = self.lock();
        let Db { conn, key } = &mut *db;
        // The commit reaches the disk before the caller moves the new key file into place:
        // `synchronous = FULL` ([`configure`]).
        let stats = self.reseal_all(conn, key, new_key)?;
        *key = new_key.duplicate();
        // Best effort: the rotation is committed whatever this returns. It moves the new pages
        // into the database file (where secure_delete already overwrote the old ciphertexts) and
        // truncates the WAL, which still holds old page images. It cannot finish while another
        // connection reads, and a failure must not be reported as a failed rotation.
        let _ = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
        Ok(stats)
    }
}

impl SqliteStore {
    /// The rotation transaction. Until `commit` the file is entirely under the old key; each
    /// `test_crash_point` marks a step the crash tests abort at.
    fn reseal_all(
        &self,
        conn: &mut Connection,
        old_key: &MasterKey,
        new_key: &MasterKey,
    ) -> Result<RotationStats, StoreError> {
        use crate::crash_point::hit as test_crash_point;
        let tx = write_tx(conn)?;
        let state = verify_key_check(&tx, old_key, &self.db_path)?;
        let secrets = reseal_secrets(&tx, old_key, new_key)?;
        remac_stores(&tx, old_key, new_key)?;
        test_crash_point("resealed_secrets");
        let legacy = state != KeyCheck::BoundSandboxes;
        let sandboxes = reseal_sandboxes(&tx, old_key, new_key, legacy)?;
        test_crash_point("resealed_sandboxes");
        write_key_check(&tx, new_key)?;
        test_crash_point("wrote_key_check");
        self.injected_rotation_failure()?;
        tx.commit()?;
        test_crash_point("committed");
        Ok(RotationStats { secrets, sandboxes })
    }
}

/// What the store's one lock guards: the connection and the key its rows are sealed under.
struct Db {
    conn: Connection,
    key: MasterKey,
}

// ---- opening ----------------------------------------------------------------------------------

fn file_id(m: &fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (m.dev(), m.ino())
}

/// Creates the database file with mode 0600 if missing, and tightens the mode of an existing
/// database or side file that group or others could read.
fn prepare_files(db_path: &Path) -> Result<(), StoreError> {
    crate::fsutil::private_file()
        .write(true)
        .create(true)
        .truncate(false)
        .open(db_path)
        .map_err(naming("opening", "for writing", db_path))?;
    for suffix in ["", "-wal", "-shm"] {
        let mut name = db_path.as_os_str().to_owned();
        name.push(suffix);
        restrict_mode(Path::new(&name))?;
    }
    Ok(())
}

/// Puts the operation and the file into an I/O error's message (its kind kept): "data
/// directory: Permission denied" alone names neither.
fn naming<'a>(
    verb: &'a str,
    rest: &'a str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> io::Error + 'a {
    move |e| {
        let sep = if rest.is_empty() { "" } else { " " };
        io::Error::new(
            e.kind(),
            format!("{verb} {}{sep}{rest}: {e}", path.display()),
        )
    }
}

/// Sets mode 0600 on `path` if it exists with group or other bits.
fn restrict_mode(path: &Path) -> Result<(), StoreError> {
    match fs::metadata(path) {
        Ok(meta) if meta.permissions().mode() & 0o077 != 0 => {
            fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(naming(
                "setting mode 0600 on",
                "",
                path,
            ))?;
            Ok(())
        }
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(naming("reading the metadata of", "", path)(e).into()),
    }
}

/// Connection settings, applied on every open.
///
/// `synchronous = FULL`: every commit is on the disk before the call that made it returns, so
/// an admin API answer of 200/201/204 survives a power loss. `NORMAL` (WAL's usual setting)
/// may lose the last commits: an outside pass cut the power 1–15 s after writes and found a
/// deleted sandbox serving again with its old credentials, a rotated secret back at its old
/// value and a created store gone. The cost is an fsync per admin write; the proxy's
/// requests never write to the database.
fn configure(conn: &Connection) -> Result<(), StoreError> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get::<_, String>(0))?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", true)?;
    conn.pragma_update(None, "secure_delete", true)?;
    Ok(())
}

/// Applies pending migrations, one transaction each. The version is re-read inside each
/// transaction so two processes opening a new database at once do not both migrate.
fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let supported = MIGRATIONS.len() as i64;
    loop {
        let tx = write_tx(conn)?;
        let version: i64 = tx.pragma_query_value(None, "user_version", |row| row.get(0))?;
        if version > supported {
            return Err(StoreError::SchemaTooNew {
                found: version,
                supported,
            });
        }
        let Some(sql) = usize::try_from(version)
            .ok()
            .and_then(|v| MIGRATIONS.get(v))
        else {
            return Ok(());
        };
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", version + 1)?;
        tx.commit()?;
    }
}

/// Verifies the key-check record, or writes it into a database that has none yet (then
/// `true`: the database was new).
/// What a failed open of the database at `path` says to the operator: a damaged file is named
/// as damaged, with the way out (a backup), and not as a wrong master key — the key-check
/// record of a file with damaged pages does not open either, and the operator was sent to
/// look for another key (outside pass); a full or failing disk says so. `conn` is the open
/// connection, if any, for SQLite's own integrity check.
fn at_open(e: StoreError, conn: Option<&Connection>, path: &Path) -> StoreError {
    use rusqlite::ErrorCode::{DatabaseCorrupt, DiskFull, NotADatabase, SystemIoFailure};
    let code = match &e {
        StoreError::Database(rusqlite::Error::SqliteFailure(f, _)) => Some(f.code),
        _ => None,
    };
    let damaged = |why: String| {
        StoreError::Corrupt(format!(
            "the database file {} is damaged ({why}): restore it from a backup \
             (docs/operations.md, Backups)",
            path.display()
        ))
    };
    match code {
        Some(DatabaseCorrupt | NotADatabase) => return damaged(e.to_string()),
        Some(DiskFull | SystemIoFailure) => {
            return StoreError::Io(std::io::Error::other(format!(
                "cannot open {} ({e}): the disk holding data_dir is full or failing (free \
                 space, or check it)",
                path.display()
            )))
        }
        _ => {}
    }
    if let (StoreError::WrongMasterKey(_), Some(conn)) = (&e, conn) {
        match integrity(conn) {
            Ok(()) => {}
            Err(why) => return damaged(why),
        }
    }
    e
}

/// The `-wal` file SQLite keeps beside `db`.
fn wal_of(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push("-wal");
    PathBuf::from(name)
}

/// The final refusal of a start whose every key was wrong ([`crate::rotate`] tries a staged
/// key first, on [`StoreError::WrongMasterKey`]), for a database with a non-empty `-wal`
/// beside it: [`StoreError::WrongMasterKeyBesideWal`], which says to keep a `-wal` the
/// database's own daemon or rotation left and to move only another copy's — sealgate cannot
/// tell them apart (nothing was written to the file: see [`SqliteStore::open`]). Anything
/// else (another backend's URL: no such file) is returned as it is.
pub fn naming_the_wal(e: StoreError) -> StoreError {
    let StoreError::WrongMasterKey(db) = e else {
        return e;
    };
    let wal = wal_of(&db);
    match fs::metadata(&wal).is_ok_and(|m| m.is_file() && m.len() > 0) {
        true => StoreError::WrongMasterKeyBesideWal { db, wal },
        false => StoreError::WrongMasterKey(db),
    }
}

/// `PRAGMA quick_check`: Ok when SQLite finds the file sound, else its first complaint.
fn integrity(conn: &Connection) -> Result<(), String> {
    let first: Result<String, _> = conn.query_row("PRAGMA quick_check", [], |row| row.get(0));
    match first {
        Ok(ok) if ok == "ok" => Ok(()),
        Ok(complaint) => Err(format!("SQLite's integrity check: {complaint}")),
        Err(e) => Err(format!("SQLite's integrity check failed: {e}")),
    }
}

fn init_key_check(
    conn: &mut Connection,
    key: &MasterKey,
    db_path: &Path,
) -> Result<bool, StoreError> {
    let tx = write_tx(conn)?;
    if read_key_check(&tx)?.is_some() {
        let state = verify_key_check(&tx, key, db_path)?;
        if state == KeyCheck::BoundSandboxes {
            return Ok(false);
        }
        if state == KeyCheck::Legacy {
            let rows = mac_all_policies(&tx, key)?;
            tracing::info!(
                rows,
                "computed the policy MACs of rows written before policy MACs existed (one-time migration)"
            );
        }
        let sandboxes = reseal_sandboxes(&tx, key, key, true)?;
        write_key_check(&tx, key)?;
        tx.commit()?;
        tracing::info!(
            sandboxes,
            "bound the sandbox rows written before binding to their columns (one-time migration)"
        );
        return Ok(false);
    }
    let sealed_rows: i64 = tx.query_row(
        "SELECT (SELECT count(*) FROM secrets) + (SELECT count(*) FROM sandboxes)",
        [],
        |row| row.get(0),
    )?;
    if sealed_rows > 0 {
        // Writing a fresh record would bless whatever key was passed in.
        return Err(StoreError::Corrupt(format!(
            "the key-check record is missing from {}, which holds sealed rows",
            db_path.display()
        )));
    }
    write_key_check(&tx, key)?;
    tx.commit()?;
    Ok(true)
}

// ---- key check and rotation ---------------------------------------------------------------------

fn read_key_check(conn: &Connection) -> Result<Option<Vec<u8>>, StoreError> {
    Ok(conn
        .query_row(
            "SELECT value FROM meta WHERE key = ?1",
            [KEY_CHECK_ROW],
            |row| row.get(0),
        )
        .optional()?)
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

/// `Ok` iff the key-check record exists and opens with `key`.
fn verify_key_check(
    conn: &Connection,
    key: &MasterKey,
    db_path: &Path,
) -> Result<KeyCheck, StoreError> {
    let wrong_key = || StoreError::WrongMasterKey(db_path.to_owned());
    let sealed = read_key_check(conn)?.ok_or_else(wrong_key)?;
    match crypto::open(key, crypto::key_check_aad(), &sealed) {
        Ok(plain) if plain.expose() == KEY_CHECK_PLAINTEXT_V3 => Ok(KeyCheck::BoundSandboxes),
        Ok(plain) if plain.expose() == KEY_CHECK_PLAINTEXT_V2 => Ok(KeyCheck::PolicyMacs),
        Ok(plain) if plain.expose() == KEY_CHECK_PLAINTEXT => Ok(KeyCheck::Legacy),
        _ => Err(wrong_key()),
    }
}

/// Writes the (v3) key-check record: call only once every row carries its policy MAC and every
/// sandbox row's CA key is bound to its columns.
fn write_key_check(conn: &Connection, key: &MasterKey) -> Result<(), StoreError> {
    let sealed = crypto::seal(key, crypto::key_check_aad(), KEY_CHECK_PLAINTEXT_V3);
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?1, ?2) \
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        params![KEY_CHECK_ROW, sealed],
    )?;
    Ok(())
}

fn reseal_secrets(
    tx: &Transaction<'_>,
    old: &MasterKey,
    new: &MasterKey,
) -> Result<usize, StoreError> {
    let rows = select_secrets_of(tx, "", [], true)?;
    for raw in &rows {
        let row = || raw.row_name();
        let aad = crypto::secret_aad(&raw.store_id, &raw.name, to_version(raw.version, row)?);
        let sealed = raw.sealed.as_deref().unwrap_or_default();
        let resealed = reseal(old, new, &aad, sealed, row)?;
        let meta = raw.decode_meta(Some(old))?;
        let mac = secret_policy(&raw.store_id, &meta).mac(new);
        tx.execute(
            "UPDATE secrets SET value = ?3, policy_mac = ?4 WHERE store_id = ?1 AND name = ?2",
            params![raw.store_id, raw.name, resealed, mac],
        )?;
    }
    Ok(rows.len())
}

/// Re-computes every store's policy MAC under `new`, after checking it under `old` (a
/// rotation never blesses a tampered allowlist).
fn remac_stores(tx: &Transaction<'_>, old: &MasterKey, new: &MasterKey) -> Result<(), StoreError> {
    for record in select_stores(tx, old, "", [])? {
        let mac = store_policy(&record).mac(new);
        tx.execute(
            "UPDATE stores SET policy_mac = ?2 WHERE id = ?1",
            params![record.id, mac],
        )?;
    }
    Ok(())
}

/// The one-time migration: MACs every store and secret row as it is now. Runs only while
/// the key-check record is still v1, i.e. the rows were written by a build that had no MACs
/// (see the module invariants).
fn mac_all_policies(tx: &Transaction<'_>, key: &MasterKey) -> Result<usize, StoreError> {
    let stores = {
        let mut stmt = tx.prepare(&format!("SELECT {STORE_COLUMNS} FROM stores"))?;
        let rows = stmt.query_map([], RawStore::from_sqlite)?;
        rows.collect::<Result<Vec<_>, _>>()?
    };
    for raw in &stores {
        let record = raw.decode()?;
        tx.execute(
            "UPDATE stores SET policy_mac = ?2 WHERE id = ?1",
            params![record.id, store_policy(&record).mac(key)],
        )?;
    }
    let secrets = select_secrets_of(tx, "", [], false)?;
    for raw in &secrets {
        let meta = raw.decode_meta(None)?;
        tx.execute(
            "UPDATE secrets SET policy_mac = ?3 WHERE store_id = ?1 AND name = ?2",
            params![
                raw.store_id,
                raw.name,
                secret_policy(&raw.store_id, &meta).mac(key)
            ],
        )?;
    }
    Ok(stores.len() + secrets.len())
}

/// Re-seals every sandbox row's CA key and snapshot from `old` to `new` (the same key for the
/// one-time binding migration), the CA key bound to the row's columns; `legacy` also opens CA
/// keys bound to the id alone (rows from before the binding).
fn reseal_sandboxes(
    tx: &Transaction<'_>,
    old: &MasterKey,
    new: &MasterKey,
    legacy: bool,
) -> Result<usize, StoreError> {
    let rows = {
        let mut stmt = tx.prepare(&format!("SELECT {SANDBOX_COLUMNS} FROM sandboxes"))?;
        let rows = stmt.query_map([], RawSandbox::from_sqlite)?;
        rows.collect::<Result<Vec<_>, _>>()?
    };
    for raw in &rows {
        let id = &raw.id;
        let ca_key = raw.reseal_ca_key(old, new, legacy)?;
        let snapshot = reseal(old, new, &crypto::snapshot_aad(id), &raw.snapshot, || {
            format!("sandbox '{id}' snapshot")
        })?;
        tx.execute(
            "UPDATE sandboxes SET ca_key = ?2, snapshot = ?3 WHERE id = ?1",
            params![id, ca_key, snapshot],
        )?;
    }
    Ok(rows.len())
}

// ---- stores -------------------------------------------------------------------------------------

fn insert_store(
    conn: &Connection,
    key: &MasterKey,
    record: &StoreRecord,
) -> Result<(), StoreError> {
    conn.execute(
        &format!("INSERT INTO stores ({STORE_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6)"),
        params![
            record.id,
            record.name,
            to_json_opt(record.egress_allowlist.as_ref())?,
            to_nanos(record.created_at, "created_at")?,
            to_nanos(record.updated_at, "updated_at")?,
            store_policy(record).mac(key),
        ],
    )
    .map_err(|e| name_conflict(e, &record.name))?;
    Ok(())
}

fn rewrite_store(
    conn: &Connection,
    key: &MasterKey,
    record: &StoreRecord,
) -> Result<(), StoreError> {
    conn.execute(
        "UPDATE stores SET name = ?2, egress_allowlist = ?3, updated_at = ?4, policy_mac = ?5 \
         WHERE id = ?1",
        params![
            record.id,
            record.name,
            to_json_opt(record.egress_allowlist.as_ref())?,
            to_nanos(record.updated_at, "updated_at")?,
            store_policy(record).mac(key),
        ],
    )
    .map_err(|e| name_conflict(e, &record.name))?;
    Ok(())
}

/// Maps a UNIQUE violation (only `stores.name` has one) to [`StoreError::Conflict`].
fn name_conflict(e: rusqlite::Error, name: &str) -> StoreError {
    if is_constraint(&e, rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE) {
        StoreError::Conflict(format!("store name '{name}' is already taken"))
    } else {
        e.into()
    }
}

fn is_constraint(e: &rusqlite::Error, extended_code: std::os::raw::c_int) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.extended_code == extended_code)
}

/// Stores matching `clause`, each checked against its policy MAC under `key`.
fn select_stores(
    conn: &Connection,
    key: &MasterKey,
    clause: &str,
    params: impl Params,
) -> Result<Vec<StoreRecord>, StoreError> {
    select_raw_stores(conn, clause, params)?
        .into_iter()
        .map(|raw| raw.into_record(key))
        .collect()
}

fn select_raw_stores(
    conn: &Connection,
    clause: &str,
    params: impl Params,
) -> Result<Vec<RawStore>, StoreError> {
    let mut stmt = conn.prepare_cached(&format!("SELECT {STORE_COLUMNS} FROM stores {clause}"))?;
    let raws = stmt
        .query_map(params, RawStore::from_sqlite)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(raws)
}

fn store_by_id(conn: &Connection, key: &MasterKey, id: &str) -> Result<StoreRecord, StoreError> {
    select_stores(conn, key, "WHERE id = ?1", [id])?
        .pop()
        .ok_or_else(|| StoreError::NotFound(Missing::store(id)))
}

fn require_store(conn: &Connection, id: &str) -> Result<(), StoreError> {
    let exists = conn
        .prepare_cached("SELECT 1 FROM stores WHERE id = ?1")?
        .exists([id])?;
    exists
        .then_some(())
        .ok_or_else(|| StoreError::NotFound(Missing::store(id)))
}

impl RawStore {
    fn from_sqlite(row: &Row<'_>) -> rusqlite::Result<Self> {
        checked(row, RowKind::Store, |row| {
            Ok(RawStore {
                id: row.get(0)?,
                name: row.get(1)?,
                egress_allowlist: row.get(2)?,
                created_at: row.get(3)?,
                updated_at: row.get(4)?,
                policy_mac: row.get(5)?,
            })
        })
    }
}

// ---- secrets ------------------------------------------------------------------------------------

/// The metadata a put writes (see [`next_secret_meta`]), from the row as stored.
fn next_meta(
    conn: &Connection,
    store_id: &str,
    name: &str,
    allowed_hosts: Option<Vec<String>>,
    locations: Vec<Location>,
) -> Result<SecretMeta, StoreError> {
    let previous: Option<(i64, i64)> = conn
        .query_row(
            "SELECT version, created_at FROM secrets WHERE store_id = ?1 AND name = ?2",
            [store_id, name],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    next_secret_meta(store_id, name, allowed_hosts, locations, previous)
}

fn upsert_secret(
    conn: &Connection,
    store_id: &str,
    meta: &SecretMeta,
    sealed: &[u8],
    mac: &[u8],
) -> Result<(), StoreError> {
    let version = version_column(meta.version)?;
    conn.execute(
        "INSERT INTO secrets (store_id, name, allowed_hosts, locations, version, value, \
                              created_at, updated_at, policy_mac) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) \
         ON CONFLICT (store_id, name) DO UPDATE SET \
             allowed_hosts = excluded.allowed_hosts, locations = excluded.locations, \
             version = excluded.version, value = excluded.value, updated_at = excluded.updated_at, \
             policy_mac = excluded.policy_mac",
        params![
            store_id,
            meta.name,
            to_json_opt(meta.allowed_hosts.as_ref())?,
            serde_json::to_string(&meta.locations)?,
            version,
            sealed,
            to_nanos(meta.created_at, "created_at")?,
            to_nanos(meta.updated_at, "updated_at")?,
            mac,
        ],
    )?;
    Ok(())
}

/// The store's secrets by name; with `with_values`, their sealed values too.
fn select_secrets(
    conn: &Connection,
    store_id: &str,
    with_values: bool,
) -> Result<Vec<RawSecret>, StoreError> {
    select_secrets_of(
        conn,
        "WHERE store_id = ?1 ORDER BY name",
        [store_id],
        with_values,
    )
}

fn select_secrets_of(
    conn: &Connection,
    clause: &str,
    params: impl Params,
    with_values: bool,
) -> Result<Vec<RawSecret>, StoreError> {
    let value_column = if with_values { "value" } else { "NULL" };
    let sql = format!("SELECT {SECRET_META_COLUMNS}, {value_column} FROM secrets {clause}");
    let mut stmt = conn.prepare_cached(&sql)?;
    let raws = stmt
        .query_map(params, RawSecret::from_sqlite)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(raws)
}

impl RawSecret {
    fn from_sqlite(row: &Row<'_>) -> rusqlite::Result<Self> {
        checked(row, RowKind::Secret, |row| {
            Ok(RawSecret {
                store_id: row.get(0)?,
                name: row.get(1)?,
                allowed_hosts: row.get(2)?,
                locations: row.get(3)?,
                version: row.get(4)?,
                created_at: row.get(5)?,
                updated_at: row.get(6)?,
                policy_mac: row.get(7)?,
                sealed: row.get(8)?,
            })
        })
    }
}

// ---- sandboxes ----------------------------------------------------------------------------------

fn insert_sandbox_row(
    conn: &Connection,
    key: &MasterKey,
    row: &SandboxRow,
) -> Result<(), StoreError> {
    let ca_key = seal_ca_key(key, row, "")?;
    let snapshot = crypto::seal(key, &crypto::snapshot_aad(&row.id), row.snapshot.expose());
    conn.execute(
        &format!(
            "INSERT INTO sandboxes ({SANDBOX_COLUMNS}) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"
        ),
        params![
            row.id,
            row.store_id,
            row.store_name,
            to_nanos(row.created_at, "sandbox created_at")?,
            to_nanos(row.expires_at, "sandbox expires_at")?,
            row.source_ip.map(|ip| ip.to_string()),
            row.proxy_token_hash,
            row.ca_cert_pem,
            ca_key,
            snapshot,
        ],
    )
    .map_err(|e| {
        if is_constraint(&e, rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY) {
            StoreError::Conflict(format!("sandbox '{}' already exists", row.id))
        } else {
            e.into()
        }
    })?;
    Ok(())
}

impl RawSandbox {
    fn from_sqlite(row: &Row<'_>) -> rusqlite::Result<Self> {
        checked(row, RowKind::Sandbox, |row| {
            Ok(RawSandbox {
                node: String::new(),
                id: row.get(0)?,
                store_id: row.get(1)?,
                store_name: row.get(2)?,
                created_at: row.get(3)?,
                expires_at: row.get(4)?,
                source_ip: row.get(5)?,
                proxy_token_hash: row.get(6)?,
                ca_cert_pem: row.get(7)?,
                ca_key: row.get(8)?,
                snapshot: row.get(9)?,
            })
        })
    }
}

// ---- rows of the wrong kind ---------------------------------------------------------------------

/// One column of a row that is not of its kind — NULL where a value must be, text that is not
/// UTF-8, a number out of range — written past the schema's checks (by someone who can write
/// the database). Carried out of a row mapper inside rusqlite's error
/// ([`rusqlite::Error::FromSqlConversionFailure`]) and read back as [`StoreError::Corrupt`] naming the
/// row and the column, so the documented repair can be followed (outside pass h38b: such rows
/// answered 500 `internal` naming neither, and one `stores` row failed the whole listing).
/// Never holds a column's value: only the row's id and name columns, cut and escaped.
#[derive(Debug)]
pub struct BadColumn {
    /// `store 'id'`, `secret 'NAME' of store 'id'`, `sandbox 'id'`.
    row: String,
    /// The row's id, when it is text.
    id: Option<String>,
    /// The column's name.
    column: String,
}

impl BadColumn {
    /// The [`BadColumn`] inside `e`, if a row mapper put one there.
    pub fn of(e: &rusqlite::Error) -> Option<&BadColumn> {
        match e {
            rusqlite::Error::FromSqlConversionFailure(_, _, inner) => inner.downcast_ref(),
            _ => None,
        }
    }
}

impl std::fmt::Display for BadColumn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: column {} is not of its kind (NULL, text that is not UTF-8, or a number out of \
             range)",
            self.row, self.column
        )
    }
}

impl std::error::Error for BadColumn {}

/// Which table a row mapper reads (how [`checked`] names the row).
#[derive(Clone, Copy)]
enum RowKind {
    Store,
    Secret,
    Sandbox,
}

/// `map(row)`, with a conversion error of one of its columns made a [`BadColumn`] naming the
/// row. Column 0 is the row's id (a secret's store id), column 1 a secret's name.
fn checked<T>(
    row: &Row<'_>,
    kind: RowKind,
    map: impl FnOnce(&Row<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    map(row).map_err(|e| {
        let at = match &e {
            rusqlite::Error::InvalidColumnType(i, ..)
            | rusqlite::Error::FromSqlConversionFailure(i, ..)
            | rusqlite::Error::IntegralValueOutOfRange(i, _) => *i,
            _ => return e,
        };
        let column = row
            .as_ref()
            .column_name(at)
            .map_or_else(|_| at.to_string(), str::to_owned);
        let text = |i: usize| match row.get_ref(i) {
            Ok(rusqlite::types::ValueRef::Text(t)) => std::str::from_utf8(t).ok().map(cut_name),
            _ => None,
        };
        let quoted =
            |t: Option<String>| t.map_or_else(|| "(not text)".into(), |t| format!("'{t}'"));
        let id = text(0);
        let row_name = match kind {
            RowKind::Store => format!("store {}", quoted(id.clone())),
            RowKind::Sandbox => format!("sandbox {}", quoted(id.clone())),
            RowKind::Secret => {
                format!("secret {} of store {}", quoted(text(1)), quoted(id.clone()))
            }
        };
        let kind = row.get_ref(at).map_or(Type::Null, |v| v.data_type());
        let bad = BadColumn {
            row: row_name,
            id,
            column,
        };
        rusqlite::Error::FromSqlConversionFailure(at, kind, Box::new(bad))
    })
}

/// An id or name read from a damaged row, escaped and cut to 100 characters.
fn cut_name(text: &str) -> String {
    text.chars()
        .take(100)
        .flat_map(char::escape_default)
        .collect()
}

// ---- small helpers ------------------------------------------------------------------------------

/// An immediate (write-locking) transaction, so a read-then-write never fails to upgrade.
fn write_tx(conn: &mut Connection) -> rusqlite::Result<Transaction<'_>> {
    conn.transaction_with_behavior(TransactionBehavior::Immediate)
}

fn expect_one_row(changed: usize, what: impl FnOnce() -> Missing) -> Result<(), StoreError> {
    if changed == 0 {
        return Err(StoreError::NotFound(what()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::store::suite::{
        self, assert_corrupt, hosts, populate, value, Harness, CA_KEY, SECRET, SNAPSHOT,
    };

    struct Fixture {
        dir: tempfile::TempDir,
        key_b64: String,
    }

    impl Fixture {
        fn raw(&self) -> Connection {
            let conn = Connection::open(self.dir.path().join(DB_FILE_NAME)).unwrap();
            conn.busy_timeout(BUSY_TIMEOUT).unwrap();
            conn
        }
    }

    impl Harness for Fixture {
        type S = SqliteStore;

        fn new() -> Self {
            let key_b64 = MasterKey::generate().to_base64().to_string();
            Fixture {
                dir: tempfile::tempdir().unwrap(),
                key_b64,
            }
        }

        fn key(&self) -> MasterKey {
            MasterKey::from_base64(&self.key_b64).unwrap()
        }

        fn open_with(&self, key: MasterKey) -> Result<SqliteStore, StoreError> {
            SqliteStore::open(self.dir.path(), key)
        }

        fn raw_secret(&self, store_id: &str, name: &str) -> Vec<u8> {
            self.raw()
                .query_row(
                    "SELECT value FROM secrets WHERE store_id = ?1 AND name = ?2",
                    [store_id, name],
                    |r| r.get(0),
                )
                .unwrap()
        }

        fn set_raw_secret(&self, store_id: &str, name: &str, sealed: &[u8]) {
            self.raw()
                .execute(
                    "UPDATE secrets SET value = ?3 WHERE store_id = ?1 AND name = ?2",
                    params![store_id, name, sealed],
                )
                .unwrap();
        }

        fn bump_versions(&self) {
            self.raw()
                .execute("UPDATE secrets SET version = version + 1", [])
                .unwrap();
        }

        fn raw_ca_key(&self, id: &str) -> Vec<u8> {
            self.raw()
                .query_row("SELECT ca_key FROM sandboxes WHERE id = ?1", [id], |r| {
                    r.get(0)
                })
                .unwrap()
        }

        fn set_raw_ca_key(&self, id: &str, sealed: &[u8]) {
            self.raw()
                .execute(
                    "UPDATE sandboxes SET ca_key = ?2 WHERE id = ?1",
                    params![id, sealed],
                )
                .unwrap();
        }

        fn set_raw_snapshot(&self, id: &str, sealed: &[u8]) {
            self.raw()
                .execute(
                    "UPDATE sandboxes SET snapshot = ?2 WHERE id = ?1",
                    params![id, sealed],
                )
                .unwrap();
        }

        fn delete_key_check(&self) {
            self.raw().execute("DELETE FROM meta", []).unwrap();
        }

        fn count_secrets(&self) -> i64 {
            self.raw()
                .query_row("SELECT count(*) FROM secrets", [], |r| r.get(0))
                .unwrap()
        }

        fn set_schema_version(&self, version: i64) {
            self.raw()
                .pragma_update(None, "user_version", version)
                .unwrap();
        }

        fn fail_next_rotation(store: &SqliteStore) {
            store
                .fail_rotation_before_commit
                .store(true, Ordering::SeqCst);
        }

        fn tamper(&self, sql: &str) {
            self.raw().execute(sql, []).unwrap();
        }
    }

    suite::store_suite!(Fixture);

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    /// Panics if any file in `dir` contains one of the distinctive plaintexts; returns the names
    /// of the files inspected.
    fn assert_no_plaintext_in(dir: &Path) -> Vec<String> {
        let mut seen = Vec::new();
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let bytes = fs::read(&path).unwrap();
            for needle in [SECRET, CA_KEY, SNAPSHOT] {
                assert!(
                    !contains(&bytes, needle),
                    "{} holds a plaintext",
                    path.display()
                );
            }
            seen.push(path.file_name().unwrap().to_string_lossy().into_owned());
        }
        seen
    }

    /// A column of the wrong kind (text that is not UTF-8, which a STRICT TEXT column keeps)
    /// is its row being corrupt, named with the column: the listing names the store beside
    /// the sound ones, and reads of a secret or the sandboxes name theirs (outside pass h38b:
    /// 500 `internal` naming nothing, and the whole listing failed).
    #[test]
    fn a_column_of_the_wrong_kind_is_a_named_corrupt_row() {
        let fx = <Fixture as Harness>::new();
        let store = fx.open();
        let rec = populate(&store);
        let sound = store.create_store("sound", None).unwrap();
        let not_utf8 = "CAST(x'ff' AS TEXT)";
        fx.tamper(&format!(
            "UPDATE stores SET name = {not_utf8} WHERE id = '{}'",
            rec.id
        ));
        let listing = store.list_stores().unwrap();
        assert_eq!(
            (listing.corrupt, listing.stores),
            (vec![rec.id.clone()], vec![sound])
        );
        let why = format!("store '{}': column name", rec.id);
        assert_corrupt(store.get_store(&rec.id).unwrap_err(), &why);
        fx.tamper(&format!(
            "UPDATE stores SET name = 'prod' WHERE id = '{}'",
            rec.id
        ));
        fx.tamper(&format!("UPDATE secrets SET locations = {not_utf8}"));
        let why = format!("secret 'API_KEY' of store '{}': column locations", rec.id);
        assert_corrupt(store.load_secrets(&rec.id).unwrap_err(), &why);
        fx.tamper(&format!("UPDATE sandboxes SET ca_cert_pem = {not_utf8}"));
        assert_corrupt(
            store.load_sandboxes().unwrap_err(),
            "sandbox 'sbx_1': column ca_cert_pem",
        );
        fx.tamper(&format!("UPDATE sandboxes SET id = {not_utf8}"));
        assert_corrupt(
            store.load_sandboxes().unwrap_err(),
            "sandbox (not text): column",
        );
    }

    #[test]
    fn values_never_reach_the_disk_in_plaintext() {
        let fx = <Fixture as Harness>::new();
        let store = fx.open();
        let rec = populate(&store);
        store
            .update_sandbox_snapshot("sbx_1", &value(SNAPSHOT))
            .unwrap();
        store
            .put_secret(
                &rec.id,
                "API_KEY",
                &value(SECRET),
                None,
                vec![Location::Header],
            )
            .unwrap();

        // Uncheckpointed: the new pages sit in the WAL.
        let files = assert_no_plaintext_in(fx.dir.path());
        assert!(files.iter().any(|f| f == "sealgate.db-wal"), "{files:?}");
        assert!(contains(
            &fs::read(fx.dir.path().join("sealgate.db-wal")).unwrap(),
            b"API_KEY"
        ));

        fx.raw()
            .query_row("PRAGMA wal_checkpoint(FULL)", [], |_| Ok(()))
            .unwrap();
        assert_no_plaintext_in(fx.dir.path());
        drop(store); // the last connection checkpoints and removes the WAL
        let files = assert_no_plaintext_in(fx.dir.path());
        assert!(files.iter().any(|f| f == DB_FILE_NAME), "{files:?}");
        assert!(contains(
            &fs::read(fx.dir.path().join(DB_FILE_NAME)).unwrap(),
            b"API_KEY"
        ));
    }

    #[test]
    fn database_files_are_private() {
        let fx = <Fixture as Harness>::new();
        let store = fx.open();
        populate(&store);
        for name in [DB_FILE_NAME, "sealgate.db-wal", "sealgate.db-shm"] {
            let mode = fs::metadata(fx.dir.path().join(name))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{name}");
        }
        drop(store);
        let db = fx.dir.path().join(DB_FILE_NAME);
        fs::set_permissions(&db, fs::Permissions::from_mode(0o644)).unwrap();
        fx.open();
        assert_eq!(
            fs::metadata(&db).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn pragmas_are_set() {
        let fx = <Fixture as Harness>::new();
        let store = fx.open();
        let db = store.lock();
        let conn = &db.conn;
        let get =
            |name: &str| -> i64 { conn.pragma_query_value(None, name, |r| r.get(0)).unwrap() };
        assert_eq!(get("foreign_keys"), 1);
        assert_eq!(get("synchronous"), 2); // FULL
        assert_eq!(get("secure_delete"), 1);
        assert_eq!(get("user_version"), MIGRATIONS.len() as i64);
        // Past version 2, the last known to builds that ignore `data_dir/pending-deletions`:
        // they refuse this database (an outside upgrade pass downgraded to one and it served
        // a deleted sandbox again).
        assert!(get("user_version") > 2);
        let mode: String = conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
    }

    #[test]
    fn wrong_key_message_names_the_file() {
        let fx = <Fixture as Harness>::new();
        populate(&fx.open());
        let err = SqliteStore::open(fx.dir.path(), MasterKey::generate())
            .err()
            .unwrap();
        assert!(err.to_string().contains("sealgate.db"), "{err}");
    }

    /// A file with damaged pages (a bad sector, a torn write) is named as damaged, with the
    /// way out, not as a wrong master key (its key-check record does not open either: the
    /// operator was sent to look for another key). A wrong key on a sound file still says so.
    /// A `-wal` of another database beside the file: the start is refused naming the `-wal`,
    /// and the file is left as it was — once the `-wal` is moved away the right key opens it
    /// with everything in it (outside pass h38b: the refused start had checkpointed the
    /// foreign pages into the file and blamed the key).
    #[test]
    fn a_foreign_wal_is_named_and_leaves_the_file_as_it_was() {
        let ours = <Fixture as Harness>::new();
        let rec = populate(&ours.open());
        let other = <Fixture as Harness>::new();
        let theirs = other.open();
        theirs.create_store("theirs", None).unwrap();
        let wal = wal_of(&ours.dir.path().join(DB_FILE_NAME));
        fs::copy(wal_of(&other.dir.path().join(DB_FILE_NAME)), &wal).unwrap();
        let refused = match ours.open_with(ours.key()) {
            Ok(_) => panic!("opened with a foreign -wal"),
            Err(e) => {
                assert!(
                    matches!(e, StoreError::WrongMasterKey(_)),
                    "a staged key is tried on it"
                );
                naming_the_wal(e).to_string()
            }
        };
        assert!(
            refused.contains("-wal") && refused.contains("move it away"),
            "{refused}"
        );
        fs::remove_file(&wal).unwrap();
        let again = ours.open();
        assert_eq!(again.get_store(&rec.id).unwrap().name, rec.name);
        drop(theirs);
    }

    #[test]
    fn a_damaged_file_is_not_called_a_wrong_key() {
        let fx = <Fixture as Harness>::new();
        populate(&fx.open());
        let wrong = SqliteStore::open(fx.dir.path(), MasterKey::generate())
            .err()
            .unwrap();
        assert!(matches!(wrong, StoreError::WrongMasterKey(_)), "{wrong}");
        let db = fx.dir.path().join(DB_FILE_NAME);
        let mut bytes = fs::read(&db).unwrap();
        for page in 1..bytes.len() / 4096 {
            for b in &mut bytes[page * 4096 + 4040..page * 4096 + 4060] {
                *b ^= 0x5a;
            }
        }
        fs::write(&db, &bytes).unwrap();
        let err = fx.open_with(fx.key()).err().expect("a damaged file");
        let said = err.to_string();
        assert!(
            said.contains("is damaged") && said.contains("backup"),
            "{said}"
        );
        assert!(!said.contains("master key"), "{said}");
        fs::write(&db, b"not a database at all, just some bytes of text").unwrap();
        let said = fx.open_with(fx.key()).err().expect("garbage").to_string();
        assert!(
            said.contains("is damaged") && said.contains("sealgate.db"),
            "{said}"
        );
    }

    // ---- policy MACs ------------------------------------------------------------------------

    /// Turns the database at `fx` back into what a build without policy MACs wrote: schema 1,
    /// no MAC columns, a v1 key-check record.
    /// A sandbox row as a build before the binding wrote it: its CA key bound to the id alone,
    /// under a v2 key-check record. It loads after the one-time migration, and from then on the
    /// old binding is tampering, not age.
    #[test]
    fn sandbox_rows_from_before_the_binding_are_migrated_once() {
        let fx = <Fixture as Harness>::new();
        let store = fx.open();
        let rec = store.create_store("s", None).unwrap();
        store
            .insert_sandbox(&suite::sandbox("sbx_old", &rec, suite::later()))
            .unwrap();
        drop(store);
        let v1 = crypto::seal(&fx.key(), &crypto::sandbox_ca_aad("sbx_old"), CA_KEY);
        fx.set_raw_ca_key("sbx_old", &v1);
        let v2_check = crypto::seal(&fx.key(), crypto::key_check_aad(), KEY_CHECK_PLAINTEXT_V2);
        fx.raw()
            .execute(
                "UPDATE meta SET value = ?1 WHERE key = ?2",
                params![v2_check, KEY_CHECK_ROW],
            )
            .unwrap();
        let rows = fx.open().load_sandboxes().unwrap();
        assert_eq!(rows[0].ca_key.expose(), CA_KEY);
        fx.set_raw_ca_key("sbx_old", &v1);
        assert_corrupt(fx.open().load_sandboxes().unwrap_err(), "sbx_old");
    }

    fn downgrade_to_v1(fx: &Fixture) {
        let conn = fx.raw();
        conn.execute_batch(
            "ALTER TABLE stores DROP COLUMN policy_mac; ALTER TABLE secrets DROP COLUMN policy_mac; \
             PRAGMA user_version = 1;",
        )
        .unwrap();
        let sealed = crypto::seal(&fx.key(), crypto::key_check_aad(), KEY_CHECK_PLAINTEXT);
        conn.execute(
            "UPDATE meta SET value = ?1 WHERE key = ?2",
            params![sealed, KEY_CHECK_ROW],
        )
        .unwrap();
    }

    #[test]
    fn rows_from_before_policy_macs_are_migrated_once() {
        let fx = <Fixture as Harness>::new();
        let rec = populate(&fx.open());
        downgrade_to_v1(&fx);
        let store = fx.open();
        assert_eq!(
            store.load_secrets(&rec.id).unwrap()[0].value.expose(),
            SECRET
        );
        assert_eq!(
            store.get_store(&rec.id).unwrap().egress_allowlist,
            hosts(&["api.example.com"])
        );
        drop(store);
        // Migrated: from now on a missing or wrong MAC is tampering, not age.
        fx.raw()
            .execute(
                "UPDATE secrets SET allowed_hosts = '[\"evil.example\"]'",
                [],
            )
            .unwrap();
        assert_corrupt(fx.open().load_secrets(&rec.id).unwrap_err(), "API_KEY");
    }
}
