//! Row codec shared by both store backends: the pure conversions between stored columns and
//! records (times, JSON lists, versions), the policy views the MACs cover, re-sealing under a new
//! key, and how a corrupt row is reported. No I/O: each backend reads and writes its own rows.
//!
//! Invariant: an error names the row (store id, secret name), never a value.

use time::OffsetDateTime;

use super::crypto::{self, MasterKey};
use super::{SecretMeta, StoreError, StoreRecord};

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
