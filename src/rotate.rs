//! `sealgate rotate-master-key`: re-seal every secret, CA key and snapshot under a new master
//! key in one SQLite transaction, and the startup recovery that finishes an interrupted one.
//!
//! Crash safety, step by step (the key came from `data_dir/master.key`):
//! 1. the new key is staged in `data_dir/master.key.new` (0600, fsynced);
//! 2. one transaction re-seals every row and the key-check record; until it commits the
//!    database is entirely under the old key, and `master.key` still holds the old key;
//! 3. the commit (with `synchronous = FULL`) switches the database to the new key;
//! 4. `master.key.new` is renamed over `master.key` (and the directory fsynced).
//!
//! A kill -9 before 3 leaves the old key working; the next start deletes the stale staged
//! key. A kill -9 between 3 and 4 leaves the old key file with a database under the new key:
//! the next start (or rotation) sees the old key fail the key check, finds the staged key
//! opening the database, and finishes step 4 itself ([`open_store`]).
//!
//! With `SEALGATE_MASTER_KEY` there is no file to swap: after the commit the operator must
//! start the daemon with the new key (the contents of `--new-key-file`).
//!
//! Fleet mode (PostgreSQL) is the same transaction over the shared database, run once from any
//! node: every secret and every node's sandbox rows are re-sealed and the key-check record is
//! replaced in one commit. Each other node must then be given the new key; until it is, it
//! refuses to start (key check) and — if still running — cannot write (each sealing write
//! re-checks the key in its transaction). See docs/operations.md, "Fleet mode".

use std::path::{Path, PathBuf};

use crate::config::{Backend, Config};
use crate::store::crypto::{KeySource, MasterKey};
use crate::store::postgres::{DatabaseUrl, PgStore};
use crate::store::sqlite::SqliteStore;
use crate::store::{Store, StoreError};

/// The staged new key next to `key_file` (`master.key` → `master.key.new`).
pub fn staged_key_path(key_file: &Path) -> PathBuf {
    let mut name = key_file.as_os_str().to_owned();
    name.push(".new");
    PathBuf::from(name)
}

/// Loads the master key and opens the store, finishing an interrupted rotation if one is
/// found (see the module docs). Used by `serve` and `rotate-master-key`. A key file is created
/// only when there is no database yet: beside an existing database a missing key file is an
/// error and nothing is written ([`MasterKey::load_existing`]).
///
/// # Errors
/// A wrong or unreadable key (with no staged key that opens the database), or any store error.
pub fn open_store(
    data_dir: &Path,
    env_key: Option<&str>,
) -> Result<(SqliteStore, KeySource), StoreError> {
    let db = data_dir.join(crate::store::sqlite::DB_FILE_NAME);
    open_with(
        data_dir,
        env_key,
        db.exists().then_some(db.as_path()),
        |key| SqliteStore::open(data_dir, key),
    )
}

/// [`open_store`] for fleet mode: the shared PostgreSQL database at `url`, as node `node`. The
/// key comes from `SEALGATE_MASTER_KEY` or this node's `data_dir/master.key`; a key file is
/// created only when the database holds no key-check record yet.
///
/// # Errors
/// As [`open_store`]; [`StoreError::Unavailable`] if the database cannot be reached.
pub fn open_pg_store(
    data_dir: &Path,
    env_key: Option<&str>,
    url: &DatabaseUrl,
    node: &str,
) -> Result<(PgStore, KeySource), StoreError> {
    // A node without a key file must not create one for a database already sealed under a key.
    let key_file = data_dir.join(crate::store::crypto::KEY_FILE_NAME);
    let initialised = env_key.is_none() && !key_file.exists() && PgStore::is_initialised(url)?;
    let database = PathBuf::from(url.redacted());
    open_with(
        data_dir,
        env_key,
        initialised.then_some(database.as_path()),
        |key| PgStore::open(url, node, key),
    )
}

/// Loads the master key (creating it only when `existing_db` is None: a key file must never be
/// made up beside a database that was sealed under another key), then opens the store with it.
fn open_with<S>(
    data_dir: &Path,
    env_key: Option<&str>,
    existing_db: Option<&Path>,
    open: impl Fn(MasterKey) -> Result<S, StoreError>,
) -> Result<(S, KeySource), StoreError> {
    let (key, source) = match existing_db {
        Some(db) => MasterKey::load_existing(data_dir, env_key, db)?,
        None => MasterKey::load_or_create(data_dir, env_key)?,
    };
    let KeySource::Loaded(key_file) = &source else {
        let store = open(key).map_err(crate::store::sqlite::naming_the_wal)?;
        return Ok((store, source));
    };
    let staged = staged_key_path(key_file);
    match open(key) {
        Ok(store) => {
            discard_stale(&staged);
            Ok((store, source))
        }
        Err(StoreError::WrongMasterKey(p)) => match finish_interrupted(key_file, &open)? {
            Some(store) => Ok((store, source)),
            None => Err(crate::store::sqlite::naming_the_wal(
                StoreError::WrongMasterKey(p),
            )),
        },
        Err(e) => Err(e),
    }
}

/// A staged key left by a rotation that never committed is not in use: remove it.
fn discard_stale(staged: &Path) {
    if staged.exists() {
        tracing::warn!(staged = %staged.display(), "removing the staged key of a master-key rotation that did not commit");
        let _ = std::fs::remove_file(staged);
    }
}

/// The database is under another key: if the staged key opens it, the rotation committed and
/// only the rename is missing.
fn finish_interrupted<S>(
    key_file: &Path,
    open: impl Fn(MasterKey) -> Result<S, StoreError>,
) -> Result<Option<S>, StoreError> {
    let staged = staged_key_path(key_file);
    if !staged.exists() {
        return Ok(None);
    }
    let (new_key, _) = MasterKey::load_or_create_file(&staged)?;
    match open(new_key) {
        Ok(store) => {
            install_staged(&staged, key_file)?;
            tracing::warn!(key_file = %key_file.display(), "finished an interrupted master-key rotation: the new key is now in place");
            Ok(Some(store))
        }
        Err(StoreError::WrongMasterKey(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Renames the staged key over the key file and makes the rename durable.
fn install_staged(staged: &Path, key_file: &Path) -> std::io::Result<()> {
    std::fs::rename(staged, key_file)?;
    crate::fsutil::sync_parent(key_file)
}

/// Writes `key` to `path` (0600, replacing a stale file) and fsyncs file and directory.
fn stage_key(path: &Path, key: &MasterKey) -> anyhow::Result<()> {
    let mut text = key.to_base64();
    text.push('\n');
    // Whole or not at all: a full disk left an empty staged key (outside pass).
    crate::fsutil::replace_private_file_synced(path, text.as_bytes())
        .map_err(|e| anyhow::anyhow!("staging the new key in {}: {e}", path.display()))
}

/// Runs the rotation. The daemon must be stopped: a running daemon keeps the old key in
/// memory and would seal new rows with it. So the rotation takes the daemon's `data_dir` lock
/// ([`crate::data_dir_lock`]) for its whole run: it refuses to start while a daemon serves this
/// `data_dir`, and a daemon cannot start while it runs.
///
/// # Errors
/// A daemon holds the `data_dir`; wrong old key, unreadable new key, or a failed transaction
/// (nothing changed then).
pub fn rotate_cli(
    data_dir: &Path,
    env_key: Option<&str>,
    new_key_file: &Path,
) -> anyhow::Result<()> {
    if !data_dir.join(crate::store::sqlite::DB_FILE_NAME).exists() {
        anyhow::bail!("no database in {}; nothing to rotate", data_dir.display());
    }
    let _lock = lock_for_rotation(data_dir)?;
    let (store, source) = open_store(data_dir, env_key)?;
    rotate_opened(&store, &source, new_key_file)
}

/// `sealgate rotate-master-key` for the configured backend: SQLite as [`rotate_cli`]; fleet
/// mode re-seals the shared database once (run it on one node, then give every node the new
/// key before it starts again).
///
/// # Errors
/// As [`rotate_cli`]; a missing database URL; an unreachable database.
pub fn rotate_configured(
    cfg: &Config,
    env_key: Option<&str>,
    env_url: Option<&str>,
    new_key_file: &Path,
) -> anyhow::Result<()> {
    if cfg.store.backend == Backend::Sqlite {
        return rotate_cli(&cfg.data_dir, env_key, new_key_file);
    }
    let url = cfg
        .store
        .database_url(env_url)
        .map_err(|e| anyhow::anyhow!(e))?;
    let node = cfg
        .node_id
        .clone()
        .unwrap_or_else(crate::store::postgres::default_node_id);
    // This node's daemon must be stopped (it holds the key file); the others are the
    // operator's to stop, as the message below says.
    let _lock = match cfg.data_dir.is_dir() {
        true => Some(lock_for_rotation(&cfg.data_dir)?),
        false => None,
    };
    let (store, source) = open_pg_store(&cfg.data_dir, env_key, &url, &node)?;
    rotate_opened(&store, &source, new_key_file)?;
    eprintln!("every other node must now get the new key (it refuses to start with the old one)");
    Ok(())
}

/// The daemon's `data_dir` lock, with a message that says to stop the daemon.
fn lock_for_rotation(data_dir: &Path) -> anyhow::Result<crate::data_dir_lock::DataDirLock> {
    crate::data_dir_lock::lock(data_dir).map_err(|e| match e {
        crate::data_dir_lock::LockError::Held { holder, .. } => anyhow::anyhow!(
            "a sealgate daemon (pid {holder}) is serving {}: stop it before rotating the \
             master key (it keeps the old key in memory and would seal new rows with it)",
            data_dir.display()
        ),
        other => other.into(),
    })
}

/// Stages the new key (key-file setups), rotates, installs the new key file.
fn rotate_opened(store: &dyn Store, source: &KeySource, new_key_file: &Path) -> anyhow::Result<()> {
    // A rotation interrupted while it wrote the new key file left its temporary copy, a key
    // never used, beside it (outside pass h39b); this run holds the data_dir lock.
    let stale = crate::fsutil::remove_stale_temps(new_key_file);
    if stale > 0 {
        eprintln!("removed {stale} temporary key file(s) an interrupted rotation left");
    }
    let (new, _) = MasterKey::load_or_create_file(new_key_file)?;
    let staged = match source {
        KeySource::Loaded(key_file) => {
            let staged = staged_key_path(key_file);
            stage_key(&staged, &new)?;
            crate::crash_point::hit("staged");
            Some((staged, key_file.clone()))
        }
        _ => None,
    };
    let stats = match store.rotate_master_key(&new) {
        Ok(s) => s,
        Err(e) => {
            if let Some((staged, _)) = &staged {
                let _ = std::fs::remove_file(staged);
            }
            return Err(e.into());
        }
    };
    eprintln!(
        "re-sealed {} secret(s) and {} sandbox(es) under the new key",
        stats.secrets, stats.sandboxes
    );
    match staged {
        Some((staged, key_file)) => {
            install_staged(&staged, &key_file)?;
            crate::crash_point::hit("renamed");
            eprintln!("{} now holds the new key", key_file.display());
        }
        None => eprintln!(
            "set SEALGATE_MASTER_KEY to the contents of {} before restarting",
            new_key_file.display()
        ),
    }
    Ok(())
}
