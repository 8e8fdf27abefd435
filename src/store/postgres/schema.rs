//! Versioned migrations and the key-check record, applied once at start under a session-level
//! advisory lock, so two daemons starting against one new database do not race.
//!
//! Invariants: migrations are append-only (never edit one); `schema_migrations` holds one row per
//! migration applied, in the same transaction as the migration itself; a database with a
//! version newer than this build refuses to open; the key-check record is written only into a
//! database that holds no sealed rows (writing one would bless whatever key was passed in).
//! A v1 key-check record means the rows predate policy MACs: the first node to start with the
//! key computes every MAC and writes the v2 record in one transaction, under the advisory lock,
//! so it happens once (after that a missing MAC is tampering, not age).

use tokio_postgres::Client;

use super::{ops, pg_err, Db, KeyCheck};
use crate::store::crypto::MasterKey;
use crate::store::StoreError;

/// `pg_advisory_lock` key held while migrating and checking the key ("sealgate" in ASCII).
const MIGRATION_LOCK: i64 = 0x7365_616c_6761_7465;

/// Schema migrations, version = index + 1. Append only.
///
/// Times are Unix nanoseconds (BIGINT) as in SQLite, so values round-trip exactly and both
/// backends order identically. `seq` columns keep insertion order for equal times.
/// `stores.generation` moves (from one sequence) on every change that running sandboxes must
/// see; nodes compare it with what they applied (the periodic generation check).
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value BYTEA NOT NULL                -- key_check: sealed KEY_CHECK_PLAINTEXT
);
CREATE SEQUENCE store_generation;
CREATE TABLE stores (
    id               TEXT PRIMARY KEY,  -- UUID v4
    name             TEXT NOT NULL UNIQUE,
    egress_allowlist TEXT,              -- JSON array of patterns; NULL = any public host
    created_at       BIGINT NOT NULL,   -- Unix nanoseconds, UTC
    updated_at       BIGINT NOT NULL,
    generation       BIGINT NOT NULL DEFAULT nextval('store_generation'),
    seq              BIGSERIAL
);
CREATE TABLE secrets (
    store_id      TEXT NOT NULL REFERENCES stores(id) ON DELETE CASCADE,
    name          TEXT NOT NULL,
    allowed_hosts TEXT,                 -- JSON array; NULL = no restriction of its own
    locations     TEXT NOT NULL,        -- JSON array of "header" | "query" | "body"
    version       BIGINT NOT NULL,      -- bound into the value's associated data
    value         BYTEA NOT NULL,       -- sealed, AAD secret_aad(store_id, name, version)
    created_at    BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL,
    PRIMARY KEY (store_id, name)
);
CREATE TABLE sandboxes (
    id               TEXT PRIMARY KEY,
    node_id          TEXT NOT NULL,     -- the node that owns it (its CA, IPs, namespaces)
    store_id         TEXT NOT NULL,     -- no foreign key: sandboxes outlive their store
    store_name       TEXT NOT NULL,
    created_at       BIGINT NOT NULL,
    expires_at       BIGINT NOT NULL,
    source_ip        TEXT,
    proxy_token_hash BYTEA NOT NULL,
    ca_cert_pem      TEXT NOT NULL,
    ca_key           BYTEA NOT NULL,    -- sealed, AAD sandbox_ca_aad(id); v3 key check: _v2(columns)
    snapshot         BYTEA NOT NULL,    -- sealed, AAD snapshot_aad(id)
    seq              BIGSERIAL
);
CREATE INDEX sandboxes_by_node_expiry ON sandboxes (node_id, expires_at);
"#,
    r#"
ALTER TABLE stores ADD COLUMN policy_mac BYTEA;   -- crypto::StorePolicy MAC of egress_allowlist
ALTER TABLE secrets ADD COLUMN policy_mac BYTEA;  -- crypto::SecretPolicy MAC of allowed_hosts, locations
"#,
    // A deleted store's last state, for nodes that had not applied it yet (ops::delete_store).
    r#"
CREATE TABLE deleted_stores (
    id               TEXT PRIMARY KEY,
    name             TEXT NOT NULL,
    egress_allowlist TEXT,
    created_at       BIGINT NOT NULL,
    updated_at       BIGINT NOT NULL,
    policy_mac       BYTEA,
    deleted_at       BIGINT NOT NULL    -- Unix nanoseconds
);                                      -- kept while sandboxes of it remain
CREATE INDEX sandboxes_by_store ON sandboxes (store_id);
CREATE TABLE deleted_secrets (
    store_id      TEXT NOT NULL REFERENCES deleted_stores(id) ON DELETE CASCADE,
    name          TEXT NOT NULL,
    allowed_hosts TEXT,
    locations     TEXT NOT NULL,
    version       BIGINT NOT NULL,
    created_at    BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL,
    policy_mac    BYTEA,
    value         BYTEA NOT NULL,       -- sealed as it was, AAD secret_aad(store_id, name, version)
    PRIMARY KEY (store_id, name)
);
"#,
    // No DDL (a role without CREATE applies it): a marker that keeps older builds, which
    // ignore `data_dir/pending-deletions`, from starting on this database (see SQLite's).
    crate::store::sqlite::DATA_DIR_STATE_MARKER,
];

/// The newest schema version this build knows.
pub(super) fn supported() -> i64 {
    MIGRATIONS.len() as i64
}

/// Takes the advisory lock, migrates, verifies or writes the key-check record, unlocks.
pub(super) async fn prepare(db: &Db, key: &MasterKey) -> Result<(), StoreError> {
    let mut client = db.client().await?;
    let client: &mut Client = &mut client;
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(pg_err)?;
    let result = async {
        migrate(client).await?;
        init_key_check(client, db, key).await
    }
    .await;
    let unlocked = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    result?;
    unlocked.map_err(pg_err)?;
    Ok(())
}

async fn migrate(client: &mut Client) -> Result<(), StoreError> {
    // No DDL once the table is there: a role granted only the documented table and sequence
    // privileges (no CREATE on the schema) starts a node of a migrated database.
    let exists: bool = client
        .query_one("SELECT to_regclass('schema_migrations') IS NOT NULL", &[])
        .await
        .map_err(pg_err)?
        .get(0);
    if !exists {
        client
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (\
                     version INTEGER PRIMARY KEY, applied_at BIGINT NOT NULL)",
            )
            .await
            .map_err(pg_err)?;
    }
    let version = current_version(client).await?;
    if version > supported() {
        return Err(StoreError::SchemaTooNew {
            found: version,
            supported: supported(),
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = client.transaction().await.map_err(pg_err)?;
        tx.batch_execute(sql).await.map_err(pg_err)?;
        let now = super::now_nanos();
        tx.execute(
            "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)",
            &[&(i as i32 + 1), &now],
        )
        .await
        .map_err(pg_err)?;
        tx.commit().await.map_err(pg_err)?;
    }
    Ok(())
}

/// The highest migration applied (0 for a new database).
pub(super) async fn current_version(client: &Client) -> Result<i64, StoreError> {
    let row = client
        .query_one(
            "SELECT COALESCE(MAX(version), 0)::BIGINT FROM schema_migrations",
            &[],
        )
        .await
        .map_err(pg_err)?;
    Ok(row.get(0))
}

async fn init_key_check(client: &mut Client, db: &Db, key: &MasterKey) -> Result<(), StoreError> {
    let tx = client.transaction().await.map_err(pg_err)?;
    if let Some(sealed) = super::read_key_check(&tx, false).await? {
        let state = super::verify_key_check(&sealed, key, db)?;
        if state == KeyCheck::BoundSandboxes {
            return Ok(());
        }
        if state == KeyCheck::Legacy {
            let rows = ops::mac_all_policies(&tx, key).await?;
            tracing::info!(
                rows,
                "computed the policy MACs of rows written before policy MACs existed (one-time migration)"
            );
        }
        let sandboxes = ops::reseal_sandboxes(&tx, key, key, true).await?;
        super::write_key_check(&tx, key).await?;
        tx.commit().await.map_err(pg_err)?;
        tracing::info!(
            sandboxes,
            "bound the sandbox rows written before binding to their columns (one-time migration)"
        );
        return Ok(());
    }
    let row = tx
        .query_one(
            "SELECT (SELECT count(*) FROM secrets) + (SELECT count(*) FROM sandboxes)",
            &[],
        )
        .await
        .map_err(pg_err)?;
    let sealed_rows: i64 = row.get(0);
    if sealed_rows > 0 {
        return Err(StoreError::Corrupt(format!(
            "the key-check record is missing from {}, which holds sealed rows",
            db.url
        )));
    }
    super::write_key_check(&tx, key).await?;
    tx.commit().await.map_err(pg_err)?;
    Ok(())
}
