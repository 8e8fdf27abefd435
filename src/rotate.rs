//! `sealgate rotate-master-key`: re-seal every secret, CA key and snapshot under a new master
//! key in one SQLite transaction.
//!
//! Crash safety: until the transaction commits, the database is entirely under the old key
//! (a kill -9 at any point leaves it usable with the old key). After the commit the new key
//! file is moved over `data_dir/master.key` (when the old key came from there); a crash between
//! the two leaves the new key in `--new-key-file`, and the refusal to start says which key the
//! database expects.

use std::path::Path;

use crate::store::crypto::{KeySource, MasterKey};
use crate::store::sqlite::SqliteStore;
use crate::store::Store;

/// Runs the rotation (the daemon must be stopped: SQLite would serialise us anyway, but a
/// running daemon keeps the old key in memory).
///
/// # Errors
/// Wrong old key, unreadable new key, or a failed transaction (nothing changed then).
pub fn rotate_cli(
    data_dir: &Path,
    env_key: Option<&str>,
    new_key_file: &Path,
) -> anyhow::Result<()> {
    let (old, source) = MasterKey::load_or_create(data_dir, env_key)?;
    if matches!(source, KeySource::Created(_)) {
        anyhow::bail!(
            "no master key existed in {}; nothing to rotate",
            data_dir.display()
        );
    }
    let new = load_or_create_new(new_key_file)?;
    let store = SqliteStore::open(data_dir, old)?;
    let stats = store.rotate_master_key(&new)?;
    eprintln!("re-sealed under the new key: {stats:?}");
    if let KeySource::Loaded(path) = source {
        std::fs::copy(new_key_file, path.with_extension("key.new"))?;
        std::fs::rename(path.with_extension("key.new"), &path)?;
        eprintln!("{} now holds the new key", path.display());
    } else {
        eprintln!(
            "set SEALGATE_MASTER_KEY to the contents of {} before restarting",
            new_key_file.display()
        );
    }
    Ok(())
}

fn load_or_create_new(path: &Path) -> anyhow::Result<MasterKey> {
    Ok(MasterKey::load_or_create_file(path)?.0)
}
