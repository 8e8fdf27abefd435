//! The SQL of each store operation, async, on one pooled connection or transaction.
//!
//! Mirrors `store/sqlite.rs` statement for statement where the engines agree; the differences
//! are `$n` parameters, `BYTEA`, `seq` for insertion order, row locks (`FOR UPDATE` /
//! `FOR SHARE`) and the generation + `NOTIFY` that announce a change to every node.

use time::OffsetDateTime;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, GenericClient, Row, Transaction};

use super::{
    commit, pg_err, read_key_check, seal_secret, verify_key_check, write_sent, Db, CHANNEL,
};
use crate::secret::{Location, SecretValue};
use crate::store::crypto::{self, MasterKey};
pub(super) use crate::store::rows::to_nanos;
use crate::store::rows::{
    self as rows, next_secret_meta, reseal, seal_ca_key, secret_policy, store_policy, to_json_opt,
    version_column, RawSandbox, RawSecret, RawStore,
};
use crate::store::{
    Missing, RotationStats, SandboxRow, SecretMeta, SecretRecord, StoreError, StoreListing,
    StoreRecord,
};

const STORE_COLUMNS: &str = "id, name, egress_allowlist, created_at, updated_at, policy_mac";
const SECRET_META_COLUMNS: &str =
    "store_id, name, allowed_hosts, locations, version, created_at, updated_at, policy_mac";
const SANDBOX_COLUMNS: &str = "id, store_id, store_name, created_at, expires_at, source_ip, \
                               proxy_token_hash, ca_cert_pem, ca_key, snapshot";

// ---- stores -------------------------------------------------------------------------------------

/// Inserts a store row with its policy MAC, under the checked key (see [`checked_key`]).
pub(super) async fn insert_store(
    db: &Db,
    client: &mut Client,
    rec: &StoreRecord,
) -> Result<(), StoreError> {
    let tx = client.transaction().await.map_err(pg_err)?;
    let key = checked_key(db, &tx).await?;
    let allow = to_json_opt(rec.egress_allowlist.as_ref())?;
    tx.execute(
        &format!("INSERT INTO stores ({STORE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6)"),
        &[
            &rec.id,
            &rec.name,
            &allow,
            &to_nanos(rec.created_at, "created_at")?,
            &to_nanos(rec.updated_at, "updated_at")?,
            &store_policy(rec).mac(&key),
        ],
    )
    .await
    .map_err(|e| name_conflict(e, &rec.name))?;
    commit(tx).await
}

/// Stores matching `clause`, each checked against its policy MAC under `key`.
pub(super) async fn select_stores(
    client: &impl GenericClient,
    key: &MasterKey,
    clause: &str,
    param: Option<&str>,
) -> Result<Vec<StoreRecord>, StoreError> {
    select_raw_stores(client, clause, param)
        .await?
        .into_iter()
        .map(|raw| raw.into_record(key))
        .collect()
}

/// Every store, oldest first, each row checked on its own ([`StoreListing`]).
pub(super) async fn list_stores(
    client: &impl GenericClient,
    key: &MasterKey,
) -> Result<StoreListing, StoreError> {
    let raws = select_raw_stores(client, "ORDER BY created_at, seq", None).await?;
    rows::listing(raws, key)
}

async fn select_raw_stores(
    client: &impl GenericClient,
    clause: &str,
    param: Option<&str>,
) -> Result<Vec<RawStore>, StoreError> {
    let sql = format!("SELECT {STORE_COLUMNS} FROM stores {clause}");
    let rows = match param {
        Some(p) => client.query(&sql, &[&p]).await,
        None => client.query(&sql, &[]).await,
    }
    .map_err(pg_err)?;
    Ok(rows.iter().map(RawStore::from_pg).collect())
}

pub(super) async fn store_by_id(
    client: &impl GenericClient,
    key: &MasterKey,
    id: &str,
) -> Result<StoreRecord, StoreError> {
    select_stores(client, key, "WHERE id = $1", Some(id))
        .await?
        .pop()
        .ok_or_else(|| StoreError::NotFound(Missing::store(id)))
}

pub(super) async fn find_store(
    client: &Client,
    key: &MasterKey,
    id_or_name: &str,
) -> Result<StoreRecord, StoreError> {
    match store_by_id(client, key, id_or_name).await {
        Err(StoreError::NotFound(_)) => {
            select_stores(client, key, "WHERE name = $1", Some(id_or_name))
                .await?
                .pop()
                .ok_or_else(|| StoreError::NotFound(Missing::store(id_or_name)))
        }
        found => found,
    }
}

pub(super) async fn require_store(client: &impl GenericClient, id: &str) -> Result<(), StoreError> {
    let row = client
        .query_opt("SELECT 1 FROM stores WHERE id = $1", &[&id])
        .await
        .map_err(pg_err)?;
    row.map(drop)
        .ok_or_else(|| StoreError::NotFound(Missing::store(id)))
}

pub(super) async fn update_store(
    db: &Db,
    client: &mut Client,
    id: &str,
    name: Option<String>,
    egress_allowlist: Option<Option<Vec<String>>>,
) -> Result<StoreRecord, StoreError> {
    let tx = client.transaction().await.map_err(pg_err)?;
    lock_store(&tx, id, "FOR UPDATE").await?;
    let key = checked_key(db, &tx).await?;
    let mut record = store_by_id(&tx, &key, id).await?;
    if name.is_none() && egress_allowlist.is_none() {
        return Ok(record);
    }
    let allowlist_changed = egress_allowlist.is_some();
    if let Some(name) = name {
        record.name = name;
    }
    if let Some(allowlist) = egress_allowlist {
        record.egress_allowlist = allowlist;
    }
    record.updated_at = OffsetDateTime::now_utc();
    tx.execute(
        "UPDATE stores SET name = $2, egress_allowlist = $3, updated_at = $4, policy_mac = $5 \
         WHERE id = $1",
        &[
            &record.id,
            &record.name,
            &to_json_opt(record.egress_allowlist.as_ref())?,
            &to_nanos(record.updated_at, "updated_at")?,
            &store_policy(&record).mac(&key),
        ],
    )
    .await
    .map_err(|e| name_conflict(e, &record.name))?;
    if allowlist_changed {
        announce(&tx, id).await?;
    }
    commit(tx).await?;
    Ok(record)
}

/// Deletes the store, keeping its last state (row and sealed secrets, as they were) in
/// `deleted_stores` / `deleted_secrets` while sandboxes of it remain, for the nodes that had
/// not applied it yet: a node that missed a change (cut off, restarting, or reading after the
/// delete) would otherwise keep serving an older snapshot — a deleted or rotated secret
/// revived — for the rest of its sandboxes' lives ([`deleted_store`]). A store without
/// sandboxes keeps nothing; a kept state goes with the last sandbox row of its store
/// ([`prune_deleted_stores`]).
pub(super) async fn delete_store(client: &mut Client, id: &str) -> Result<(), StoreError> {
    let tx = client.transaction().await.map_err(pg_err)?;
    lock_store(&tx, id, "FOR UPDATE").await?;
    let now = to_nanos(OffsetDateTime::now_utc(), "deleted_at")?;
    tx.execute(
        &format!(
            "INSERT INTO deleted_stores ({STORE_COLUMNS}, deleted_at) \
             SELECT {STORE_COLUMNS}, $2 FROM stores WHERE id = $1 \
             AND EXISTS (SELECT 1 FROM sandboxes WHERE store_id = $1)"
        ),
        &[&id, &now],
    )
    .await
    .map_err(pg_err)?;
    tx.execute(
        &format!(
            "INSERT INTO deleted_secrets ({SECRET_META_COLUMNS}, value) \
             SELECT {SECRET_META_COLUMNS}, value FROM secrets WHERE store_id = $1 \
             AND EXISTS (SELECT 1 FROM deleted_stores WHERE id = $1)"
        ),
        &[&id],
    )
    .await
    .map_err(pg_err)?;
    let n = tx
        .execute("DELETE FROM stores WHERE id = $1", &[&id])
        .await
        .map_err(pg_err)?;
    expect_one_row(n, || Missing::store(id))?;
    notify(&tx, id).await?;
    commit(tx).await
}

/// Locks store `id`'s row for the rest of the transaction (`FOR UPDATE` serialises writers of
/// one store; `FOR SHARE` only keeps it from being deleted), or answers `NotFound` when it is
/// gone. A sandbox insert and a store delete on two nodes meet
/// here: the delete goes first, and the insert is refused (it was answered 201 with a sandbox
/// whose store had left no kept state, so it could never unseal — outside pass, 5 of 8
/// races); or the insert goes first, and the delete, whose later statements then see the
/// committed sandbox row, keeps the store's last state for it.
async fn lock_store(tx: &Transaction<'_>, id: &str, mode: &str) -> Result<(), StoreError> {
    let sql = format!("SELECT 1 FROM stores WHERE id = $1 {mode}");
    match tx.query_opt(&sql, &[&id]).await.map_err(pg_err)? {
        Some(_) => Ok(()),
        None => Err(StoreError::NotFound(Missing::store(id))),
    }
}

/// Drops the kept states of deleted stores that no sandbox row refers to any more (run where
/// sandbox rows go: their sealed values stay in the database no longer than needed).
async fn prune_deleted_stores(client: &impl GenericClient) -> Result<(), StoreError> {
    client
        .execute(
            "DELETE FROM deleted_stores d \
             WHERE NOT EXISTS (SELECT 1 FROM sandboxes s WHERE s.store_id = d.id)",
            &[],
        )
        .await
        .map_err(pg_err)?;
    Ok(())
}

/// The last state of deleted store `id` (see [`delete_store`]), each row checked as a live one
/// is (policy MACs, sealed values under their AAD); `None` if none is kept.
pub(super) async fn deleted_store(
    client: &impl GenericClient,
    key: &MasterKey,
    id: &str,
) -> Result<Option<(StoreRecord, Vec<SecretRecord>)>, StoreError> {
    let sql = format!("SELECT {STORE_COLUMNS} FROM deleted_stores WHERE id = $1");
    let Some(row) = client.query_opt(&sql, &[&id]).await.map_err(pg_err)? else {
        return Ok(None);
    };
    let store = RawStore::from_pg(&row).into_record(key)?;
    let sql = format!(
        "SELECT {SECRET_META_COLUMNS}, value FROM deleted_secrets WHERE store_id = $1 \
         ORDER BY name COLLATE \"C\""
    );
    let rows = client.query(&sql, &[&id]).await.map_err(pg_err)?;
    let secrets = rows
        .iter()
        .map(|r| RawSecret::from_pg(r).into_record(key))
        .collect::<Result<_, _>>()?;
    Ok(Some((store, secrets)))
}

/// Moves the store's generation and notifies every node, inside the caller's transaction.
async fn announce(tx: &Transaction<'_>, store_id: &str) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE stores SET generation = nextval('store_generation') WHERE id = $1",
        &[&store_id],
    )
    .await
    .map_err(pg_err)?;
    notify(tx, store_id).await
}

/// `NOTIFY` with the store id as payload (delivered at commit; ids only, never values).
async fn notify(tx: &Transaction<'_>, store_id: &str) -> Result<(), StoreError> {
    tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &store_id])
        .await
        .map_err(pg_err)?;
    Ok(())
}

/// `(id, generation)` of the stores in `ids` that exist.
pub(super) async fn generations(
    client: &Client,
    ids: &[String],
) -> Result<Vec<(String, i64)>, StoreError> {
    let rows = client
        .query(
            "SELECT id, generation FROM stores WHERE id = ANY($1)",
            &[&ids],
        )
        .await
        .map_err(pg_err)?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

impl RawStore {
    fn from_pg(row: &Row) -> Self {
        RawStore {
            id: row.get(0),
            name: row.get(1),
            egress_allowlist: row.get(2),
            created_at: row.get(3),
            updated_at: row.get(4),
            policy_mac: row.get(5),
        }
    }
}

/// Maps the UNIQUE violation on `stores.name` to [`StoreError::Conflict`].
fn name_conflict(e: tokio_postgres::Error, name: &str) -> StoreError {
    if e.code() == Some(&SqlState::UNIQUE_VIOLATION) {
        StoreError::Conflict(format!("store name '{name}' is already taken"))
    } else {
        pg_err(e)
    }
}

// ---- secrets ------------------------------------------------------------------------------------

/// A secret to create or replace.
pub(super) struct Put<'a> {
    pub store_id: &'a str,
    pub name: &'a str,
    pub value: &'a SecretValue,
    pub allowed_hosts: Option<Vec<String>>,
    pub locations: Vec<Location>,
}

pub(super) async fn put_secret(
    db: &Db,
    client: &mut Client,
    put: Put<'_>,
) -> Result<SecretMeta, StoreError> {
    let tx = client.transaction().await.map_err(pg_err)?;
    lock_store(&tx, put.store_id, "FOR UPDATE").await?;
    let key = checked_key(db, &tx).await?;
    let meta = next_meta(&tx, &put).await?;
    let sealed = seal_secret(&key, put.store_id, &meta, put.value.expose());
    let mac = secret_policy(put.store_id, &meta).mac(&key);
    upsert_secret(&tx, put.store_id, &meta, &sealed, &mac).await?;
    announce(&tx, put.store_id).await?;
    commit(tx).await?;
    Ok(meta)
}

/// The current key, after checking (under `FOR SHARE`, held to commit) that it is still the
/// database's key: a node left on a rotated-away key fails here instead of writing.
async fn checked_key(
    db: &Db,
    tx: &Transaction<'_>,
) -> Result<std::sync::Arc<MasterKey>, StoreError> {
    let key = db.key();
    let sealed = read_key_check(tx, true)
        .await?
        .ok_or_else(|| db.wrong_key())?;
    verify_key_check(&sealed, &key, db)?;
    Ok(key)
}

/// The metadata a put writes (see [`next_secret_meta`]), from the row as stored.
async fn next_meta(tx: &Transaction<'_>, put: &Put<'_>) -> Result<SecretMeta, StoreError> {
    let previous = tx
        .query_opt(
            "SELECT version, created_at FROM secrets WHERE store_id = $1 AND name = $2",
            &[&put.store_id, &put.name],
        )
        .await
        .map_err(pg_err)?
        .map(|r| (r.get(0), r.get(1)));
    next_secret_meta(
        put.store_id,
        put.name,
        put.allowed_hosts.clone(),
        put.locations.clone(),
        previous,
    )
}

async fn upsert_secret(
    tx: &Transaction<'_>,
    store_id: &str,
    meta: &SecretMeta,
    sealed: &[u8],
    mac: &[u8],
) -> Result<(), StoreError> {
    let version = version_column(meta.version)?;
    let params: [&(dyn ToSql + Sync); 9] = [
        &store_id,
        &meta.name,
        &to_json_opt(meta.allowed_hosts.as_ref())?,
        &serde_json::to_string(&meta.locations)?,
        &version,
        &sealed,
        &to_nanos(meta.created_at, "created_at")?,
        &to_nanos(meta.updated_at, "updated_at")?,
        &mac,
    ];
    tx.execute(
        "INSERT INTO secrets (store_id, name, allowed_hosts, locations, version, value, \
                              created_at, updated_at, policy_mac) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
         ON CONFLICT (store_id, name) DO UPDATE SET \
             allowed_hosts = excluded.allowed_hosts, locations = excluded.locations, \
             version = excluded.version, value = excluded.value, updated_at = excluded.updated_at, \
             policy_mac = excluded.policy_mac",
        &params,
    )
    .await
    .map_err(pg_err)?;
    Ok(())
}

pub(super) async fn delete_secret(
    client: &mut Client,
    store_id: &str,
    name: &str,
) -> Result<(), StoreError> {
    let tx = client.transaction().await.map_err(pg_err)?;
    lock_store(&tx, store_id, "FOR UPDATE").await?;
    let n = tx
        .execute(
            "DELETE FROM secrets WHERE store_id = $1 AND name = $2",
            &[&store_id, &name],
        )
        .await
        .map_err(pg_err)?;
    expect_one_row(n, || Missing::secret(name, store_id))?;
    announce(&tx, store_id).await?;
    commit(tx).await
}

/// The store's secrets by name; with `with_values`, their sealed values too.
pub(super) async fn select_secrets(
    client: &impl GenericClient,
    store_id: &str,
    with_values: bool,
) -> Result<Vec<RawSecret>, StoreError> {
    let value_column = if with_values { "value" } else { "NULL::BYTEA" };
    let sql = format!(
        "SELECT {SECRET_META_COLUMNS}, {value_column} FROM secrets WHERE store_id = $1 \
         ORDER BY name COLLATE \"C\""
    );
    let rows = client.query(&sql, &[&store_id]).await.map_err(pg_err)?;
    Ok(rows.iter().map(RawSecret::from_pg).collect())
}

impl RawSecret {
    fn from_pg(row: &Row) -> Self {
        RawSecret {
            store_id: row.get(0),
            name: row.get(1),
            allowed_hosts: row.get(2),
            locations: row.get(3),
            version: row.get(4),
            created_at: row.get(5),
            updated_at: row.get(6),
            policy_mac: row.get(7),
            sealed: row.get(8),
        }
    }
}

// ---- sandboxes ----------------------------------------------------------------------------------

pub(super) async fn insert_sandbox(
    db: &Db,
    client: &mut Client,
    row: &SandboxRow,
) -> Result<(), StoreError> {
    let tx = client.transaction().await.map_err(pg_err)?;
    let key = checked_key(db, &tx).await?;
    lock_store(&tx, &row.store_id, "FOR SHARE").await?;
    let ca_key = seal_ca_key(&key, row, &db.node_id)?;
    let snapshot = crypto::seal(&key, &crypto::snapshot_aad(&row.id), row.snapshot.expose());
    let params: [&(dyn ToSql + Sync); 11] = [
        &row.id,
        &db.node_id,
        &row.store_id,
        &row.store_name,
        &to_nanos(row.created_at, "sandbox created_at")?,
        &to_nanos(row.expires_at, "sandbox expires_at")?,
        &row.source_ip.map(|ip| ip.to_string()),
        &row.proxy_token_hash,
        &row.ca_cert_pem,
        &ca_key,
        &snapshot,
    ];
    tx.execute(
        &format!(
            "INSERT INTO sandboxes (node_id, {SANDBOX_COLUMNS}) \
             VALUES ($2, $1, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
        ),
        &params,
    )
    .await
    .map_err(|e| {
        if e.code() == Some(&SqlState::UNIQUE_VIOLATION) {
            StoreError::Conflict(format!("sandbox '{}' already exists", row.id))
        } else {
            pg_err(e)
        }
    })?;
    commit(tx).await
}

pub(super) async fn update_snapshot(
    db: &Db,
    client: &mut Client,
    id: &str,
    snapshot: &SecretValue,
) -> Result<(), StoreError> {
    let tx = client.transaction().await.map_err(pg_err)?;
    let key = checked_key(db, &tx).await?;
    let sealed = crypto::seal(&key, &crypto::snapshot_aad(id), snapshot.expose());
    let n = tx
        .execute(
            "UPDATE sandboxes SET snapshot = $2 WHERE id = $1",
            &[&id, &sealed],
        )
        .await
        .map_err(pg_err)?;
    expect_one_row(n, || Missing::sandbox(id))?;
    commit(tx).await
}

/// Re-seals and writes many snapshots in one statement (missing ids are skipped).
pub(super) async fn update_snapshots(
    db: &Db,
    client: &mut Client,
    rows: &[(String, SecretValue)],
) -> Result<(), StoreError> {
    let tx = client.transaction().await.map_err(pg_err)?;
    let key = checked_key(db, &tx).await?;
    let ids: Vec<&str> = rows.iter().map(|(id, _)| id.as_str()).collect();
    let sealed: Vec<Vec<u8>> = rows
        .iter()
        .map(|(id, snap)| crypto::seal(&key, &crypto::snapshot_aad(id), snap.expose()))
        .collect();
    tx.execute(
        "UPDATE sandboxes AS s SET snapshot = u.snapshot \
         FROM unnest($1::text[], $2::bytea[]) AS u(id, snapshot) WHERE s.id = u.id",
        &[&ids, &sealed],
    )
    .await
    .map_err(pg_err)?;
    commit(tx).await
}

pub(super) async fn select_sandboxes(
    client: &Client,
    node_id: &str,
) -> Result<Vec<RawSandbox>, StoreError> {
    let sql = format!(
        "SELECT {SANDBOX_COLUMNS}, node_id FROM sandboxes WHERE node_id = $1 \
         ORDER BY created_at, seq"
    );
    let rows = client.query(&sql, &[&node_id]).await.map_err(pg_err)?;
    Ok(rows.iter().map(RawSandbox::from_pg).collect())
}

/// The ids of this node's sandbox rows (nothing decoded: a row that fails its checks is
/// still a row).
pub(super) async fn select_sandbox_ids(
    client: &Client,
    node_id: &str,
) -> Result<std::collections::HashSet<String>, StoreError> {
    let rows = client
        .query("SELECT id FROM sandboxes WHERE node_id = $1", &[&node_id])
        .await
        .map_err(pg_err)?;
    rows.iter().map(|r| r.try_get(0).map_err(pg_err)).collect()
}

/// Deletes this node's sandbox row `id`: a node never deletes another node's row (its
/// pending-deletion record, copied with a cloned host, must not end that node's sandboxes).
pub(super) async fn delete_sandbox(
    client: &Client,
    id: &str,
    node_id: &str,
) -> Result<(), StoreError> {
    write_sent();
    let n = client
        .execute(
            "DELETE FROM sandboxes WHERE id = $1 AND node_id = $2",
            &[&id, &node_id],
        )
        .await
        .map_err(pg_err)?;
    expect_one_row(n, || Missing::sandbox(id))?;
    prune_deleted_stores(client).await
}

/// The node holding live sandbox `id`, if it is another than `node_id`.
pub(super) async fn other_node_of(
    client: &Client,
    id: &str,
    node_id: &str,
    now: i64,
) -> Result<Option<String>, StoreError> {
    let row = client
        .query_opt(
            "SELECT node_id FROM sandboxes WHERE id = $1 AND node_id <> $2 AND expires_at > $3",
            &[&id, &node_id, &now],
        )
        .await
        .map_err(pg_err)?;
    Ok(row.and_then(|r| r.try_get(0).ok()))
}

pub(super) async fn purge_expired(
    client: &Client,
    node_id: &str,
    now: i64,
) -> Result<Vec<String>, StoreError> {
    write_sent();
    let rows = client
        .query(
            "DELETE FROM sandboxes WHERE node_id = $1 AND expires_at <= $2 RETURNING id",
            &[&node_id, &now],
        )
        .await
        .map_err(pg_err)?;
    if !rows.is_empty() {
        prune_deleted_stores(client).await?;
    }
    rows.iter()
        .map(|r| r.try_get::<_, String>(0).map_err(pg_err))
        .collect()
}

impl RawSandbox {
    fn from_pg(row: &Row) -> Self {
        RawSandbox {
            node: row.get(10),
            id: row.get(0),
            store_id: row.get(1),
            store_name: row.get(2),
            created_at: row.get(3),
            expires_at: row.get(4),
            source_ip: row.get(5),
            proxy_token_hash: row.get(6),
            ca_cert_pem: row.get(7),
            ca_key: row.get(8),
            snapshot: row.get(9),
        }
    }
}

// ---- rotation -----------------------------------------------------------------------------------

/// Re-seals every secret, every node's sandbox rows and the key-check record under `new`, in one
/// transaction that first locks the key-check row `FOR UPDATE` (so no write under the old key
/// can interleave) and verifies the old key.
pub(super) async fn reseal_all(
    db: &Db,
    client: &mut Client,
    new: &MasterKey,
) -> Result<RotationStats, StoreError> {
    let old = db.key();
    let tx = client.transaction().await.map_err(pg_err)?;
    let sealed = tx
        .query_opt(
            "SELECT value FROM meta WHERE key = $1 FOR UPDATE",
            &[&super::KEY_CHECK_ROW],
        )
        .await
        .map_err(pg_err)?
        .map(|r| r.get::<_, Vec<u8>>(0))
        .ok_or_else(|| db.wrong_key())?;
    let state = verify_key_check(&sealed, &old, db)?;
    let secrets = reseal_secrets(&tx, "secrets", &old, new).await?;
    remac_stores(&tx, "stores", &old, new).await?;
    // Deleted stores' last states too: a node that has not applied one still needs it after
    // the rotation (dropped, it would keep an older snapshot — a revoked value revived).
    reseal_secrets(&tx, "deleted_secrets", &old, new).await?;
    remac_stores(&tx, "deleted_stores", &old, new).await?;
    let legacy = state != super::KeyCheck::BoundSandboxes;
    let sandboxes = reseal_sandboxes(&tx, &old, new, legacy).await?;
    super::write_key_check(&tx, new).await?;
    db.injected_rotation_failure()?;
    commit(tx).await?;
    Ok(RotationStats { secrets, sandboxes })
}

/// Re-seals every row of `table` (`secrets` or `deleted_secrets`) from `old` to `new`, each
/// checked under `old` first (a rotation never blesses a tampered row).
async fn reseal_secrets(
    tx: &Transaction<'_>,
    table: &str,
    old: &MasterKey,
    new: &MasterKey,
) -> Result<usize, StoreError> {
    let rows = tx
        .query(
            &format!("SELECT {SECRET_META_COLUMNS}, value FROM {table} FOR UPDATE"),
            &[],
        )
        .await
        .map_err(pg_err)?;
    for row in &rows {
        let raw = RawSecret::from_pg(row);
        let store_id = raw.store_id.clone();
        let rec = raw.into_record(old)?;
        let resealed = seal_secret(new, &store_id, &rec.meta, rec.value.expose());
        let mac = secret_policy(&store_id, &rec.meta).mac(new);
        tx.execute(
            &format!(
                "UPDATE {table} SET value = $3, policy_mac = $4 WHERE store_id = $1 AND name = $2"
            ),
            &[&store_id, &rec.meta.name, &resealed, &mac],
        )
        .await
        .map_err(pg_err)?;
    }
    Ok(rows.len())
}

/// Re-computes the policy MAC of every row of `table` (`stores` or `deleted_stores`) under
/// `new`, after checking it under `old` (a rotation never blesses a tampered allowlist).
async fn remac_stores(
    tx: &Transaction<'_>,
    table: &str,
    old: &MasterKey,
    new: &MasterKey,
) -> Result<(), StoreError> {
    let sql = format!("SELECT {STORE_COLUMNS} FROM {table} FOR UPDATE");
    for row in tx.query(&sql, &[]).await.map_err(pg_err)? {
        let record = RawStore::from_pg(&row).into_record(old)?;
        tx.execute(
            &format!("UPDATE {table} SET policy_mac = $2 WHERE id = $1"),
            &[&record.id, &store_policy(&record).mac(new)],
        )
        .await
        .map_err(pg_err)?;
    }
    Ok(())
}

/// The one-time migration: MACs every store and secret row as it is now. Runs only while the
/// key-check record is still v1, i.e. the rows were written by a build that had no MACs (see
/// the schema module).
pub(super) async fn mac_all_policies(
    tx: &Transaction<'_>,
    key: &MasterKey,
) -> Result<usize, StoreError> {
    let stores = select_raw_stores(tx, "FOR UPDATE", None).await?;
    for raw in &stores {
        let record = raw.decode()?;
        tx.execute(
            "UPDATE stores SET policy_mac = $2 WHERE id = $1",
            &[&record.id, &store_policy(&record).mac(key)],
        )
        .await
        .map_err(pg_err)?;
    }
    let rows = tx
        .query(
            &format!("SELECT {SECRET_META_COLUMNS}, NULL::BYTEA FROM secrets FOR UPDATE"),
            &[],
        )
        .await
        .map_err(pg_err)?;
    for row in &rows {
        let raw = RawSecret::from_pg(row);
        let meta = raw.decode_meta(None)?;
        let mac = secret_policy(&raw.store_id, &meta).mac(key);
        tx.execute(
            "UPDATE secrets SET policy_mac = $3 WHERE store_id = $1 AND name = $2",
            &[&raw.store_id, &raw.name, &mac],
        )
        .await
        .map_err(pg_err)?;
    }
    Ok(stores.len() + rows.len())
}

/// Re-seals every sandbox row (of every node) from `old` to `new`, the CA key bound to the
/// row's columns; `legacy` also opens CA keys bound to the id alone (the one-time migration,
/// with `old` = `new`). Same as SQLite's.
pub(super) async fn reseal_sandboxes(
    tx: &Transaction<'_>,
    old: &MasterKey,
    new: &MasterKey,
    legacy: bool,
) -> Result<usize, StoreError> {
    let rows = tx
        .query(
            &format!("SELECT {SANDBOX_COLUMNS}, node_id FROM sandboxes FOR UPDATE"),
            &[],
        )
        .await
        .map_err(pg_err)?;
    for raw in rows.iter().map(RawSandbox::from_pg) {
        let id = raw.id.clone();
        let ca_key = raw.reseal_ca_key(old, new, legacy)?;
        let snapshot = reseal(old, new, &crypto::snapshot_aad(&id), &raw.snapshot, || {
            format!("sandbox '{id}' snapshot")
        })?;
        tx.execute(
            "UPDATE sandboxes SET ca_key = $2, snapshot = $3 WHERE id = $1",
            &[&id, &ca_key, &snapshot],
        )
        .await
        .map_err(pg_err)?;
    }
    Ok(rows.len())
}

// ---- small helpers ------------------------------------------------------------------------------

fn expect_one_row(changed: u64, what: impl FnOnce() -> Missing) -> Result<(), StoreError> {
    if changed == 0 {
        return Err(StoreError::NotFound(what()));
    }
    Ok(())
}
