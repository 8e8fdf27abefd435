//! Row codec shared by both store backends: the pure conversions between stored columns and
//! records (times, JSON lists, versions), the policy views the MACs cover, re-sealing under a new
//! key, and how a corrupt row is reported. No I/O: each backend reads and writes its own rows.
//!
//! Invariant: an error names the row (store id, secret name), never a value.

use std::net::IpAddr;

use time::OffsetDateTime;

use super::crypto::{self, MasterKey};
use super::{SandboxRow, SecretMeta, SecretRecord, StoreError, StoreListing, StoreRecord};

pub(super) fn corrupt(row: String, e: crypto::CryptoError) -> StoreError {
    corrupt_msg(row, &e.to_string())
}

pub(super) fn corrupt_msg(row: String, why: &str) -> StoreError {
    StoreError::Corrupt(format!("{row}: {why}"))
}

pub(super) fn to_nanos(t: OffsetDateTime, what: &str) -> Result<i64, StoreError> {
    i64::try_from(t.unix_timestamp_nanos())
        .map_err(|_| StoreError::InvalidInput(format!("{what}: time outside 1677..2262")))
}

pub(super) fn from_nanos(
    nanos: i64,
    row: impl FnOnce() -> String,
) -> Result<OffsetDateTime, StoreError> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(nanos))
        .map_err(|_| corrupt_msg(row(), "time out of range"))
}

pub(super) fn to_version(version: i64, row: impl FnOnce() -> String) -> Result<u64, StoreError> {
    u64::try_from(version).map_err(|_| corrupt_msg(row(), "negative version"))
}

pub(super) fn to_json_opt(list: Option<&Vec<String>>) -> Result<Option<String>, StoreError> {
    Ok(list.map(serde_json::to_string).transpose()?)
}

pub(super) fn from_json<T: serde::de::DeserializeOwned>(
    text: &str,
    row: impl FnOnce() -> String,
) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|_| corrupt_msg(row(), "malformed JSON column"))
}

pub(super) fn from_json_opt<T: serde::de::DeserializeOwned>(
    text: Option<&str>,
    row: impl FnOnce() -> String,
) -> Result<Option<T>, StoreError> {
    text.map(|t| from_json(t, row)).transpose()
}

/// Opens `sealed` with `old` and seals the plaintext with `new` under the same `aad`.
pub(super) fn reseal(
    old: &MasterKey,
    new: &MasterKey,
    aad: &[u8],
    sealed: &[u8],
    row: impl FnOnce() -> String,
) -> Result<Vec<u8>, StoreError> {
    let plain = crypto::open(old, aad, sealed).map_err(|e| corrupt(row(), e))?;
    Ok(crypto::seal(new, aad, plain.expose()))
}

/// The metadata a put writes: version 1 and `now` as `created_at` for a new secret; for a
/// replace, the next version and the original `created_at`. `previous` is the stored row's
/// `(version, created_at)` columns, if the secret exists.
pub(super) fn next_secret_meta(
    store_id: &str,
    name: &str,
    allowed_hosts: Option<Vec<String>>,
    locations: Vec<crate::secret::Location>,
    previous: Option<(i64, i64)>,
) -> Result<SecretMeta, StoreError> {
    let now = OffsetDateTime::now_utc();
    let row = || secret_row_name(store_id, name);
    let (version, created_at) = match previous {
        Some((version, created_at)) => {
            let next = to_version(version, row)?
                .checked_add(1)
                .filter(|v| i64::try_from(*v).is_ok())
                .ok_or_else(|| corrupt_msg(row(), "version overflow"))?;
            (next, from_nanos(created_at, row)?)
        }
        None => (1, now),
    };
    Ok(SecretMeta {
        name: name.to_owned(),
        allowed_hosts,
        locations,
        version,
        created_at,
        updated_at: now,
    })
}

/// A version as its column (`BIGINT` / `INTEGER`).
pub(super) fn version_column(version: u64) -> Result<i64, StoreError> {
    i64::try_from(version).map_err(|_| StoreError::InvalidInput(format!("version {version}")))
}

pub(super) fn secret_policy<'a>(
    store_id: &'a str,
    meta: &'a SecretMeta,
) -> crypto::SecretPolicy<'a> {
    crypto::SecretPolicy {
        store_id,
        name: &meta.name,
        version: meta.version,
        allowed_hosts: meta.allowed_hosts.as_deref(),
        locations: &meta.locations,
    }
}

pub(super) fn store_policy(record: &StoreRecord) -> crypto::StorePolicy<'_> {
    crypto::StorePolicy {
        store_id: &record.id,
        egress_allowlist: record.egress_allowlist.as_deref(),
    }
}

pub(super) fn secret_row_name(store_id: &str, name: &str) -> String {
    format!("secret '{name}' of store '{store_id}'")
}

// ---- raw rows (each backend reads its own columns into these) -----------------------------------

/// A `stores` row as read, before JSON and time decoding.
pub(super) struct RawStore {
    pub(super) id: String,
    pub(super) name: String,
    pub(super) egress_allowlist: Option<String>,
    pub(super) created_at: i64,
    pub(super) updated_at: i64,
    pub(super) policy_mac: Option<Vec<u8>>,
}

impl RawStore {
    /// The record, unchecked (the migration MACs rows as they are).
    pub(super) fn decode(&self) -> Result<StoreRecord, StoreError> {
        let row = || format!("store '{}'", self.id);
        Ok(StoreRecord {
            egress_allowlist: from_json_opt(self.egress_allowlist.as_deref(), row)?,
            created_at: from_nanos(self.created_at, row)?,
            updated_at: from_nanos(self.updated_at, row)?,
            id: self.id.clone(),
            name: self.name.clone(),
        })
    }

    /// The record, if its allowlist matches its policy MAC.
    pub(super) fn into_record(self, key: &MasterKey) -> Result<StoreRecord, StoreError> {
        let record = self.decode()?;
        store_policy(&record)
            .verify(key, self.policy_mac.as_deref())
            .map_err(|e| corrupt(format!("store '{}' egress_allowlist", self.id), e))?;
        Ok(record)
    }
}

/// The listing of `raws`: each row checked on its own, those that fail named by id.
pub(super) fn listing(raws: Vec<RawStore>, key: &MasterKey) -> Result<StoreListing, StoreError> {
    let mut out = StoreListing::default();
    for raw in raws {
        let id = raw.id.clone();
        match raw.into_record(key) {
            Ok(record) => out.stores.push(record),
            Err(StoreError::Corrupt(_)) => out.corrupt.push(id),
            Err(other) => return Err(other),
        }
    }
    Ok(out)
}

/// A `secrets` row as read, before decoding and decryption.
pub(super) struct RawSecret {
    pub(super) store_id: String,
    pub(super) name: String,
    pub(super) allowed_hosts: Option<String>,
    pub(super) locations: String,
    pub(super) version: i64,
    pub(super) created_at: i64,
    pub(super) updated_at: i64,
    pub(super) policy_mac: Option<Vec<u8>>,
    pub(super) sealed: Option<Vec<u8>>,
}

impl RawSecret {
    pub(super) fn row_name(&self) -> String {
        secret_row_name(&self.store_id, &self.name)
    }

    /// The metadata; with `key`, only if it matches its policy MAC (`None`: unchecked, for
    /// the migration that computes the MACs).
    pub(super) fn decode_meta(&self, key: Option<&MasterKey>) -> Result<SecretMeta, StoreError> {
        let row = || self.row_name();
        let meta = SecretMeta {
            allowed_hosts: from_json_opt(self.allowed_hosts.as_deref(), row)?,
            locations: from_json(&self.locations, row)?,
            version: to_version(self.version, row)?,
            created_at: from_nanos(self.created_at, row)?,
            updated_at: from_nanos(self.updated_at, row)?,
            name: self.name.clone(),
        };
        if let Some(key) = key {
            secret_policy(&self.store_id, &meta)
                .verify(key, self.policy_mac.as_deref())
                .map_err(|e| corrupt(format!("{} policy", self.row_name()), e))?;
        }
        Ok(meta)
    }

    pub(super) fn into_meta(self, key: &MasterKey) -> Result<SecretMeta, StoreError> {
        self.decode_meta(Some(key))
    }

    pub(super) fn into_record(mut self, key: &MasterKey) -> Result<SecretRecord, StoreError> {
        let sealed = self.sealed.take().unwrap_or_default();
        let (row, store_id) = (self.row_name(), self.store_id.clone());
        let meta = self.into_meta(key)?;
        let aad = crypto::secret_aad(&store_id, &meta.name, meta.version);
        let value = crypto::open(key, &aad, &sealed).map_err(|e| corrupt(row, e))?;
        Ok(SecretRecord { meta, value })
    }
}

/// A `sandboxes` row as read, before decoding and decryption.
pub(super) struct RawSandbox {
    /// `node_id` in fleet mode (empty with SQLite): bound into the CA key's associated data.
    pub(super) node: String,
    pub(super) id: String,
    pub(super) store_id: String,
    pub(super) store_name: String,
    pub(super) created_at: i64,
    pub(super) expires_at: i64,
    pub(super) source_ip: Option<String>,
    pub(super) proxy_token_hash: Vec<u8>,
    pub(super) ca_cert_pem: String,
    pub(super) ca_key: Vec<u8>,
    pub(super) snapshot: Vec<u8>,
}

impl RawSandbox {
    fn columns(&self) -> crypto::SandboxColumns<'_> {
        crypto::SandboxColumns {
            id: &self.id,
            store_id: &self.store_id,
            store_name: &self.store_name,
            node: &self.node,
            created_at: self.created_at,
            expires_at: self.expires_at,
            source_ip: self.source_ip.as_deref(),
            proxy_token_hash: &self.proxy_token_hash,
            ca_cert_pem: &self.ca_cert_pem,
        }
    }

    /// The CA key sealed under `new`, bound to the row's columns as they are; opened under
    /// `old` bound the same way, or — `legacy`, the one-time migration only — to the id alone.
    ///
    /// # Errors
    /// The key does not open (tampered row, wrong key).
    pub(super) fn reseal_ca_key(
        &self,
        old: &MasterKey,
        new: &MasterKey,
        legacy: bool,
    ) -> Result<Vec<u8>, StoreError> {
        let aad = crypto::sandbox_ca_aad_v2(&self.columns());
        let opened = crypto::open(old, &aad, &self.ca_key).or_else(|e| match legacy {
            true => crypto::open(old, &crypto::sandbox_ca_aad(&self.id), &self.ca_key),
            false => Err(e),
        });
        let plain = opened.map_err(|e| corrupt(format!("sandbox '{}' CA key", self.id), e))?;
        Ok(crypto::seal(new, &aad, plain.expose()))
    }

    pub(super) fn into_row(self, key: &MasterKey) -> Result<SandboxRow, StoreError> {
        let aad = crypto::sandbox_ca_aad_v2(&self.columns());
        let id = self.id;
        let row = || format!("sandbox '{id}'");
        let ca_key = crypto::open(key, &aad, &self.ca_key).map_err(|e| {
            corrupt(
                format!("sandbox '{id}' CA key (or a column bound to it: store, node, times, source_ip, proxy token, certificate)"),
                e,
            )
        })?;
        let snapshot = crypto::open(key, &crypto::snapshot_aad(&id), &self.snapshot)
            .map_err(|e| corrupt(format!("sandbox '{id}' snapshot"), e))?;
        let source_ip = self
            .source_ip
            .map(|ip| ip.parse::<IpAddr>())
            .transpose()
            .map_err(|_| corrupt_msg(row(), "unparsable source_ip"))?;
        Ok(SandboxRow {
            created_at: from_nanos(self.created_at, row)?,
            expires_at: from_nanos(self.expires_at, row)?,
            id,
            store_id: self.store_id,
            store_name: self.store_name,
            source_ip,
            proxy_token_hash: self.proxy_token_hash,
            ca_cert_pem: self.ca_cert_pem,
            ca_key,
            snapshot,
        })
    }
}

/// The sealed CA key of a new `sandboxes` row: bound to the columns the row is written with
/// (`node`: its `node_id` in fleet mode, empty with SQLite).
///
/// # Errors
/// A time outside what the columns hold.
pub(super) fn seal_ca_key(
    key: &MasterKey,
    row: &SandboxRow,
    node: &str,
) -> Result<Vec<u8>, StoreError> {
    let ip = row.source_ip.map(|ip| ip.to_string());
    let columns = crypto::SandboxColumns {
        id: &row.id,
        store_id: &row.store_id,
        store_name: &row.store_name,
        node,
        created_at: to_nanos(row.created_at, "sandbox created_at")?,
        expires_at: to_nanos(row.expires_at, "sandbox expires_at")?,
        source_ip: ip.as_deref(),
        proxy_token_hash: &row.proxy_token_hash,
        ca_cert_pem: &row.ca_cert_pem,
    };
    Ok(crypto::seal(
        key,
        &crypto::sandbox_ca_aad_v2(&columns),
        row.ca_key.expose(),
    ))
}
