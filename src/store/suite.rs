//! The store test-suite: one set of tests, run unchanged against every [`Store`] implementation.
//!
//! Each backend provides a [`Harness`] (how to open its store and how to reach under it to
//! tamper with raw rows) and instantiates every test with `store_suite!(TheHarness)`. Tests
//! that only make sense for one engine (SQLite files and pragmas; PostgreSQL nodes, locks and
//! notifications) live beside that backend.

use std::sync::Arc;

use time::macros::datetime;
use time::OffsetDateTime;

use super::crypto::MasterKey;
use super::{RotationStats, SandboxRow, Store, StoreError, StoreRecord};
use crate::secret::{Location, SecretValue};

pub(crate) const SECRET: &[u8] = b"sk-live-DISTINCTIVE-7f3a9c1e5b";
pub(crate) const CA_KEY: &[u8] = b"-----BEGIN PRIVATE KEY-----CAKEY-DISTINCTIVE-42d8e6";
pub(crate) const SNAPSHOT: &[u8] = b"{\"snapshot\":\"SNAPSHOT-DISTINCTIVE-91bb07\"}";

/// A backend under test: a fresh empty database per value, with its key.
pub(crate) trait Harness {
    /// The store type.
    type S: Store + 'static;
    /// A fresh database and key.
    fn new() -> Self;
    /// The fixture's key (a fresh copy).
    fn key(&self) -> MasterKey;
    /// Opens the store with `key`.
    fn open_with(&self, key: MasterKey) -> Result<Self::S, StoreError>;
    /// Opens the store with the fixture's key.
    fn open(&self) -> Self::S {
        self.open_with(self.key()).unwrap()
    }
    /// The sealed bytes of a secret, read around the store.
    fn raw_secret(&self, store_id: &str, name: &str) -> Vec<u8>;
    /// Overwrites the sealed bytes of a secret around the store.
    fn set_raw_secret(&self, store_id: &str, name: &str, sealed: &[u8]);
    /// Adds one to every secret's version, around the store.
    fn bump_versions(&self);
    /// The sealed CA key of a sandbox.
    fn raw_ca_key(&self, id: &str) -> Vec<u8>;
    /// Overwrites a sandbox's sealed CA key.
    fn set_raw_ca_key(&self, id: &str, sealed: &[u8]);
    /// Overwrites a sandbox's sealed snapshot.
    fn set_raw_snapshot(&self, id: &str, sealed: &[u8]);
    /// Deletes the key-check record.
    fn delete_key_check(&self);
    /// Counts secret rows of every store.
    fn count_secrets(&self) -> i64;
    /// Pretends a newer build migrated the database to `version`.
    fn set_schema_version(&self, version: i64);
    /// Makes the next rotation of `store` fail after re-sealing everything, before commit.
    fn fail_next_rotation(store: &Self::S);
    /// Runs one statement around the store, to tamper with policy columns. Tests pass only
    /// SQL both engines accept (plain `UPDATE`, row-value subqueries, text literals, `NULL`).
    fn tamper(&self, sql: &str);
}

/// Instantiates every suite test for one harness type.
macro_rules! store_suite {
    ($h:ty) => {
        $crate::store::suite::store_suite!(@ $h;
            store_is_send_sync_and_object_safe, store_crud, find_store_prefers_id_over_name,
            duplicate_name_conflicts, rename_to_taken_name_conflicts, update_is_partial,
            put_secret_replace_keeps_created_at_and_bumps_version,
            secrets_are_listed_by_name_and_deleted, secret_calls_on_missing_store_are_not_found,
            delete_store_cascades_secrets_but_not_sandboxes, sandbox_rows_round_trip,
            purge_removes_only_expired_sandboxes, snapshots_update_in_a_batch,
            reopen_with_same_key_reads_everything,
            reopen_with_another_key_is_refused, empty_database_still_checks_the_key,
            missing_key_check_on_a_populated_database_is_refused,
            ciphertext_copied_to_another_secret_fails_closed,
            ciphertext_copied_across_stores_fails_closed, changed_version_fails_closed,
            flipped_bit_fails_closed, swapped_sandbox_ca_key_fails_closed,
            rotation_reseals_everything, rotation_failing_before_commit_changes_nothing,
            rotation_stopped_by_a_corrupt_row_changes_nothing,
            schema_from_a_newer_build_is_refused,
            tampered_allowed_hosts_or_locations_fail_closed, tampered_egress_allowlist_fails_closed,
            policy_copied_from_another_row_fails_closed, legitimate_changes_keep_verifying,
            rotation_re_macs_policies_and_refuses_tampered_ones,
            tampered_sandbox_columns_fail_closed);
    };
    (@ $h:ty; $($name:ident),* $(,)?) => {
        mod shared_suite {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[test]
                fn $name() {
                    $crate::store::suite::$name::<$h>();
                }
            )*
        }
    };
}
pub(crate) use store_suite;

pub(crate) fn value(bytes: &[u8]) -> SecretValue {
    SecretValue::new(bytes.to_vec())
}

pub(crate) fn hosts(list: &[&str]) -> Option<Vec<String>> {
    Some(list.iter().map(|s| s.to_string()).collect())
}

pub(crate) fn sandbox(id: &str, store: &StoreRecord, expires_at: OffsetDateTime) -> SandboxRow {
    SandboxRow {
        id: id.to_owned(),
        store_id: store.id.clone(),
        store_name: store.name.clone(),
        created_at: OffsetDateTime::now_utc(),
        expires_at,
        source_ip: Some("10.0.0.7".parse().unwrap()),
        proxy_token_hash: vec![1, 2, 3],
        ca_cert_pem: "-----BEGIN CERTIFICATE-----".to_owned(),
        ca_key: value(CA_KEY),
        snapshot: value(SNAPSHOT),
    }
}

pub(crate) fn later() -> OffsetDateTime {
    OffsetDateTime::now_utc() + time::Duration::hours(1)
}

/// A store with one secret and one sandbox, all holding the distinctive values.
pub(crate) fn populate(store: &dyn Store) -> StoreRecord {
    let rec = store
        .create_store("prod", hosts(&["api.example.com"]))
        .unwrap();
    store
        .put_secret(
            &rec.id,
            "API_KEY",
            &value(SECRET),
            hosts(&["*.example.com"]),
            vec![Location::Header],
        )
        .unwrap();
    store
        .insert_sandbox(&sandbox("sbx_1", &rec, later()))
        .unwrap();
    rec
}

pub(crate) fn assert_corrupt(err: StoreError, needle: &str) {
    match err {
        StoreError::Corrupt(msg) => {
            assert!(msg.contains(needle), "{msg:?} should name {needle:?}")
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

fn open_err<H: Harness>(h: &H, key: MasterKey) -> StoreError {
    match h.open_with(key) {
        Ok(_) => panic!("opening should have failed"),
        Err(e) => e,
    }
}

pub(crate) fn store_is_send_sync_and_object_safe<H: Harness>() {
    let h = H::new();
    let store: Arc<dyn Store> = Arc::new(h.open());
    store.check().unwrap();
}

pub(crate) fn store_crud<H: Harness>() {
    let h = H::new();
    let store = h.open();
    let a = store.create_store("alpha", None).unwrap();
    let b = store.create_store("beta", hosts(&[])).unwrap();
    assert!(uuid::Uuid::parse_str(&a.id).is_ok());
    assert_eq!(a.created_at, a.updated_at);

    assert_eq!(store.get_store(&a.id).unwrap(), a);
    assert_eq!(
        store.list_stores().unwrap().stores,
        vec![a.clone(), b.clone()]
    );
    assert_eq!(store.find_store(&b.id).unwrap(), b);
    assert_eq!(store.find_store("beta").unwrap(), b);
    assert!(matches!(
        store.find_store("gamma"),
        Err(StoreError::NotFound(_))
    ));

    let renamed = store.update_store(&a.id, Some("alpha2"), None).unwrap();
    assert_eq!(renamed.name, "alpha2");
    assert_eq!(store.get_store(&a.id).unwrap(), renamed);

    store.delete_store(&a.id).unwrap();
    assert!(
        matches!(store.get_store(&a.id), Err(StoreError::NotFound(m)) if m.to_string().contains(&a.id))
    );
    assert!(matches!(
        store.delete_store(&a.id),
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store.update_store(&a.id, Some("x"), None),
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(store.list_stores().unwrap().stores, vec![b]);
}

pub(crate) fn find_store_prefers_id_over_name<H: Harness>() {
    let h = H::new();
    let store = h.open();
    let a = store.create_store("first", None).unwrap();
    // A store named like another store's id: the id wins.
    store.create_store(&a.id, None).unwrap();
    assert_eq!(store.find_store(&a.id).unwrap().id, a.id);
}

pub(crate) fn duplicate_name_conflicts<H: Harness>() {
    let h = H::new();
    let store = h.open();
    store.create_store("prod", None).unwrap();
    let err = store.create_store("prod", None).unwrap_err();
    assert!(matches!(&err, StoreError::Conflict(_)), "{err:?}");
    assert_eq!(err.to_string(), "store name 'prod' is already taken");
    assert_eq!(store.list_stores().unwrap().stores.len(), 1);
}

pub(crate) fn rename_to_taken_name_conflicts<H: Harness>() {
    let h = H::new();
    let store = h.open();
    store.create_store("prod", None).unwrap();
    let dev = store.create_store("dev", None).unwrap();
    let err = store.update_store(&dev.id, Some("prod"), None).unwrap_err();
    assert_eq!(err.to_string(), "store name 'prod' is already taken");
    assert_eq!(store.get_store(&dev.id).unwrap(), dev);
    // Renaming to its own name is not a conflict.
    store.update_store(&dev.id, Some("dev"), None).unwrap();
}

pub(crate) fn update_is_partial<H: Harness>() {
    let h = H::new();
    let store = h.open();
    let rec = store.create_store("s", hosts(&["a.example"])).unwrap();

    let same = store.update_store(&rec.id, None, None).unwrap();
    assert_eq!(
        same, rec,
        "no field given: nothing changes, not even updated_at"
    );

    let renamed = store.update_store(&rec.id, Some("t"), None).unwrap();
    assert_eq!(renamed.egress_allowlist, hosts(&["a.example"]));
    assert!(renamed.updated_at >= rec.updated_at);
    assert_eq!(renamed.created_at, rec.created_at);

    let cleared = store.update_store(&rec.id, None, Some(None)).unwrap();
    assert_eq!(
        (cleared.name.as_str(), cleared.egress_allowlist.clone()),
        ("t", None)
    );
    assert_eq!(store.get_store(&rec.id).unwrap().egress_allowlist, None);

    let empty = store
        .update_store(&rec.id, None, Some(Some(vec![])))
        .unwrap();
    assert_eq!(empty.egress_allowlist, Some(vec![]));
    assert_eq!(
        store.get_store(&rec.id).unwrap().egress_allowlist,
        Some(vec![])
    );
}

pub(crate) fn put_secret_replace_keeps_created_at_and_bumps_version<H: Harness>() {
    let h = H::new();
    let store = h.open();
    let rec = store.create_store("s", None).unwrap();
    let first = store
        .put_secret(
            &rec.id,
            "K",
            &value(b"v1"),
            None,
            Location::DEFAULT.to_vec(),
        )
        .unwrap();
    assert_eq!(first.version, 1);
    let sealed_v1 = h.raw_secret(&rec.id, "K");

    let second = store
        .put_secret(
            &rec.id,
            "K",
            &value(b"v2"),
            hosts(&["x.example"]),
            vec![Location::Query],
        )
        .unwrap();
    assert_eq!(second.version, 2);
    assert_eq!(second.created_at, first.created_at);
    assert!(second.updated_at >= first.updated_at);
    let sealed_v2 = h.raw_secret(&rec.id, "K");
    assert_ne!(
        sealed_v1[1..13],
        sealed_v2[1..13],
        "a replace uses a new nonce"
    );

    let loaded = store.load_secrets(&rec.id).unwrap();
    assert_eq!(loaded.len(), 1);
    assert_eq!(loaded[0].meta, second);
    assert_eq!(loaded[0].value.expose(), b"v2");
    assert_eq!(store.list_secrets(&rec.id).unwrap(), vec![second]);
}

pub(crate) fn secrets_are_listed_by_name_and_deleted<H: Harness>() {
    let h = H::new();
    let store = h.open();
    let rec = store.create_store("s", None).unwrap();
    for name in ["ZED", "ALPHA", "MID", "alpha_lower"] {
        store
            .put_secret(&rec.id, name, &value(name.as_bytes()), None, vec![])
            .unwrap();
    }
    let names: Vec<_> = store
        .list_secrets(&rec.id)
        .unwrap()
        .into_iter()
        .map(|m| m.name)
        .collect();
    assert_eq!(
        names,
        ["ALPHA", "MID", "ZED", "alpha_lower"],
        "bytewise order"
    );

    store.delete_secret(&rec.id, "MID").unwrap();
    let err = store.delete_secret(&rec.id, "MID").unwrap_err();
    assert!(
        matches!(&err, StoreError::NotFound(m) if m.to_string().contains("secret 'MID'")),
        "{err:?}"
    );
    let values: Vec<_> = store
        .load_secrets(&rec.id)
        .unwrap()
        .into_iter()
        .map(|r| r.value.expose().to_vec())
        .collect();
    assert_eq!(
        values,
        [b"ALPHA".to_vec(), b"ZED".to_vec(), b"alpha_lower".to_vec()]
    );
}

pub(crate) fn secret_calls_on_missing_store_are_not_found<H: Harness>() {
    let h = H::new();
    let store = h.open();
    let missing = "no-such-store";
    let is_store_not_found = |r: Result<(), StoreError>| matches!(r, Err(StoreError::NotFound(m)) if m.to_string() == "store 'no-such-store'");
    assert!(is_store_not_found(
        store
            .put_secret(missing, "K", &value(b"v"), None, vec![])
            .map(drop)
    ));
    assert!(is_store_not_found(store.list_secrets(missing).map(drop)));
    assert!(is_store_not_found(store.load_secrets(missing).map(drop)));
    assert!(is_store_not_found(store.delete_secret(missing, "K")));
}

pub(crate) fn delete_store_cascades_secrets_but_not_sandboxes<H: Harness>() {
    let h = H::new();
    let store = h.open();
    let rec = populate(&store);
    store.delete_store(&rec.id).unwrap();

    assert_eq!(h.count_secrets(), 0);
    assert!(matches!(
        store.list_secrets(&rec.id),
        Err(StoreError::NotFound(_))
    ));
    let sandboxes = store.load_sandboxes().unwrap();
    assert_eq!(sandboxes.len(), 1);
    assert_eq!(sandboxes[0].store_id, rec.id);
    assert_eq!(sandboxes[0].snapshot.expose(), SNAPSHOT);
}

pub(crate) fn sandbox_rows_round_trip<H: Harness>() {
    let h = H::new();
    let store = h.open();
    let rec = store.create_store("s", None).unwrap();
    let mut v6 = sandbox("sbx_v6", &rec, later());
    v6.source_ip = Some("fd00::7".parse().unwrap());
    let mut none = sandbox("sbx_none", &rec, later());
    none.source_ip = None;
    store.insert_sandbox(&v6).unwrap();
    store.insert_sandbox(&none).unwrap();
    let err = store.insert_sandbox(&none).unwrap_err();
    assert!(
        matches!(&err, StoreError::Conflict(m) if m.contains("sbx_none")),
        "{err:?}"
    );

    store
        .update_sandbox_snapshot("sbx_v6", &value(b"{\"v\":2}"))
        .unwrap();
    assert!(matches!(
        store.update_sandbox_snapshot("sbx_gone", &value(b"{}")),
        Err(StoreError::NotFound(_))
    ));

    let rows = store.load_sandboxes().unwrap();
    assert_eq!(rows.len(), 2);
    let (a, b) = (&rows[0], &rows[1]);
    assert_eq!((a.id.as_str(), a.source_ip), ("sbx_v6", v6.source_ip));
    assert_eq!(a.snapshot.expose(), b"{\"v\":2}");
    assert_eq!(a.ca_key.expose(), CA_KEY);
    assert_eq!((a.created_at, a.expires_at), (v6.created_at, v6.expires_at));
    assert_eq!(
        (a.proxy_token_hash.as_slice(), a.ca_cert_pem.as_str()),
        (&[1u8, 2, 3][..], "-----BEGIN CERTIFICATE-----")
    );
    assert_eq!(
        (b.id.as_str(), b.source_ip, b.store_name.as_str()),
        ("sbx_none", None, "s")
    );

    store.delete_sandbox("sbx_v6").unwrap();
    assert!(matches!(
        store.delete_sandbox("sbx_v6"),
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(store.load_sandboxes().unwrap().len(), 1);
}

pub(crate) fn purge_removes_only_expired_sandboxes<H: Harness>() {
    let h = H::new();
    let store = h.open();
    let rec = store.create_store("s", None).unwrap();
    let now = datetime!(2030-01-01 12:00 UTC);
    store
        .insert_sandbox(&sandbox("sbx_past", &rec, now - time::Duration::SECOND))
        .unwrap();
    store
        .insert_sandbox(&sandbox("sbx_now", &rec, now))
        .unwrap();
    store
        .insert_sandbox(&sandbox("sbx_future", &rec, now + time::Duration::SECOND))
        .unwrap();
    let mut purged = store.purge_expired_sandboxes(now).unwrap();
    purged.sort();
    assert_eq!(purged, ["sbx_now", "sbx_past"]);
    let ids: Vec<_> = store
        .load_sandboxes()
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(ids, ["sbx_future"]);
}

pub(crate) fn snapshots_update_in_a_batch<H: Harness>() {
    let h = H::new();
    let store = h.open();
    let rec = populate(&store);
    store
        .insert_sandbox(&sandbox("sbx_2", &rec, later()))
        .unwrap();
    let rows = [
        ("sbx_1".to_owned(), value(b"{\"n\":1}")),
        ("sbx_gone".to_owned(), value(b"{}")),
        ("sbx_2".to_owned(), value(b"{\"n\":2}")),
    ];
    store.update_sandbox_snapshots(&rows).unwrap();
    let snaps: Vec<_> = store
        .load_sandboxes()
        .unwrap()
        .into_iter()
        .map(|r| r.snapshot.expose().to_vec())
        .collect();
    assert_eq!(snaps, [b"{\"n\":1}".to_vec(), b"{\"n\":2}".to_vec()]);
}

pub(crate) fn reopen_with_same_key_reads_everything<H: Harness>() {
    let h = H::new();
    let (rec, secrets, sandboxes) = {
        let store = h.open();
        let rec = populate(&store);
        (
            rec.clone(),
            store.list_secrets(&rec.id).unwrap(),
            store.load_sandboxes().unwrap(),
        )
    };
    let store = h.open();
    store.check().unwrap();
    assert_eq!(store.list_stores().unwrap().stores, vec![rec.clone()]);
    let loaded = store.load_secrets(&rec.id).unwrap();
    assert_eq!(loaded[0].meta, secrets[0]);
    assert_eq!(loaded[0].value.expose(), SECRET);
    let rows = store.load_sandboxes().unwrap();
    assert_eq!(rows[0].id, sandboxes[0].id);
    assert_eq!(rows[0].ca_key.expose(), CA_KEY);
    assert_eq!(rows[0].created_at, sandboxes[0].created_at);
}

pub(crate) fn reopen_with_another_key_is_refused<H: Harness>() {
    let h = H::new();
    populate(&h.open());
    let err = open_err(&h, MasterKey::generate());
    assert!(matches!(&err, StoreError::WrongMasterKey(_)), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("does not match") && msg.contains("refuses to start"),
        "{msg}"
    );
}

pub(crate) fn empty_database_still_checks_the_key<H: Harness>() {
    let h = H::new();
    drop(h.open());
    let err = open_err(&h, MasterKey::generate());
    assert!(matches!(err, StoreError::WrongMasterKey(_)), "{err:?}");
}

pub(crate) fn missing_key_check_on_a_populated_database_is_refused<H: Harness>() {
    let h = H::new();
    populate(&h.open());
    h.delete_key_check();
    assert_corrupt(open_err(&h, h.key()), "key-check");
}

pub(crate) fn ciphertext_copied_to_another_secret_fails_closed<H: Harness>() {
    let h = H::new();
    let store = h.open();
    let rec = store.create_store("s", None).unwrap();
    store
        .put_secret(&rec.id, "A", &value(b"value-a"), None, vec![])
        .unwrap();
    store
        .put_secret(&rec.id, "B", &value(b"value-b"), None, vec![])
        .unwrap();
    h.set_raw_secret(&rec.id, "B", &h.raw_secret(&rec.id, "A"));
    let err = store.load_secrets(&rec.id).unwrap_err();
    assert!(!err.to_string().contains("value-a"));
    assert_corrupt(err, "secret 'B'");
    // Metadata stays listable so the operator can see and replace the row.
    assert_eq!(store.list_secrets(&rec.id).unwrap().len(), 2);
    store
        .put_secret(&rec.id, "B", &value(b"value-b"), None, vec![])
        .unwrap();
    assert_eq!(store.load_secrets(&rec.id).unwrap().len(), 2);
}

pub(crate) fn ciphertext_copied_across_stores_fails_closed<H: Harness>() {
    let h = H::new();
    let store = h.open();
    let s1 = store.create_store("one", None).unwrap();
    let s2 = store.create_store("two", None).unwrap();
    store
        .put_secret(&s1.id, "K", &value(b"one"), None, vec![])
        .unwrap();
    store
        .put_secret(&s2.id, "K", &value(b"two"), None, vec![])
        .unwrap();
    h.set_raw_secret(&s2.id, "K", &h.raw_secret(&s1.id, "K"));
    assert_corrupt(store.load_secrets(&s2.id).unwrap_err(), &s2.id);
}

pub(crate) fn changed_version_fails_closed<H: Harness>() {
    let h = H::new();
    let store = h.open();
    let rec = store.create_store("s", None).unwrap();
    store
        .put_secret(&rec.id, "K", &value(b"v"), None, vec![])
        .unwrap();
    h.bump_versions();
    assert_corrupt(store.load_secrets(&rec.id).unwrap_err(), "secret 'K'");
}

pub(crate) fn flipped_bit_fails_closed<H: Harness>() {
    let h = H::new();
    let store = h.open();
    let rec = populate(&store);
    let mut sealed = h.raw_secret(&rec.id, "API_KEY");
    let middle = sealed.len() / 2;
    sealed[middle] ^= 0x04;
    h.set_raw_secret(&rec.id, "API_KEY", &sealed);
    assert_corrupt(store.load_secrets(&rec.id).unwrap_err(), "secret 'API_KEY'");
}

pub(crate) fn swapped_sandbox_ca_key_fails_closed<H: Harness>() {
    let h = H::new();
    let store = h.open();
    let rec = populate(&store);
    store
        .insert_sandbox(&sandbox("sbx_2", &rec, later()))
        .unwrap();
    h.set_raw_ca_key("sbx_2", &h.raw_ca_key("sbx_1"));
    assert_corrupt(
        store.load_sandboxes().unwrap_err(),
        "sandbox 'sbx_2' CA key",
    );
}

pub(crate) fn rotation_reseals_everything<H: Harness>() {
    let h = H::new();
    let new_key = MasterKey::generate();
    let rec = {
        let store = h.open();
        let rec = populate(&store);
        store
            .put_secret(&rec.id, "OTHER", &value(b"other"), None, vec![])
            .unwrap();
        let before = h.raw_ca_key("sbx_1");

        let stats = store.rotate_master_key(&new_key).unwrap();
        assert_eq!(
            stats,
            RotationStats {
                secrets: 2,
                sandboxes: 1
            }
        );
        assert_ne!(before, h.raw_ca_key("sbx_1"));
        // The running store switched keys.
        store.check().unwrap();
        assert_eq!(
            store.load_secrets(&rec.id).unwrap()[0].value.expose(),
            SECRET
        );
        rec
    };

    let reopened = h.open_with(new_key.duplicate()).unwrap();
    assert_eq!(reopened.load_secrets(&rec.id).unwrap().len(), 2);
    assert_eq!(
        reopened.load_sandboxes().unwrap()[0].snapshot.expose(),
        SNAPSHOT
    );
    drop(reopened);
    let err = open_err(&h, h.key());
    assert!(matches!(err, StoreError::WrongMasterKey(_)), "{err:?}");
}

/// Asserts the store is fully readable with the old key, in process and reopened, and refuses
/// `new_key`.
fn assert_still_on_old_key<H: Harness>(h: &H, store: H::S, rec: &StoreRecord, new_key: &MasterKey) {
    store.check().unwrap();
    assert_eq!(
        store.load_secrets(&rec.id).unwrap()[0].value.expose(),
        SECRET
    );
    drop(store);
    let err = open_err(h, new_key.duplicate());
    assert!(matches!(err, StoreError::WrongMasterKey(_)), "{err:?}");
    let reopened = h.open();
    assert_eq!(
        reopened.load_secrets(&rec.id).unwrap()[0].value.expose(),
        SECRET
    );
}

pub(crate) fn rotation_failing_before_commit_changes_nothing<H: Harness>() {
    let h = H::new();
    let store = h.open();
    let rec = populate(&store);
    let new_key = MasterKey::generate();
    H::fail_next_rotation(&store);
    let err = store.rotate_master_key(&new_key).unwrap_err();
    assert!(err.to_string().contains("injected"), "{err}");
    assert_eq!(store.load_sandboxes().unwrap()[0].ca_key.expose(), CA_KEY);
    assert_still_on_old_key(&h, store, &rec, &new_key);
}

pub(crate) fn rotation_stopped_by_a_corrupt_row_changes_nothing<H: Harness>() {
    let h = H::new();
    let store = h.open();
    let rec = populate(&store);
    store
        .insert_sandbox(&sandbox("sbx_bad", &rec, later()))
        .unwrap();
    // Secrets are re-sealed first, then sandboxes: this row fails half way through.
    h.set_raw_snapshot("sbx_bad", &[0]);
    let new_key = MasterKey::generate();
    assert_corrupt(
        store.rotate_master_key(&new_key).unwrap_err(),
        "sandbox 'sbx_bad' snapshot",
    );
    store.delete_sandbox("sbx_bad").unwrap();
    assert_still_on_old_key(&h, store, &rec, &new_key);
}

pub(crate) fn schema_from_a_newer_build_is_refused<H: Harness>() {
    let h = H::new();
    drop(h.open());
    h.set_schema_version(99);
    let err = open_err(&h, h.key());
    assert!(
        matches!(
            err,
            StoreError::SchemaTooNew {
                found: 99,
                supported: 2..=98
            }
        ),
        "{err:?}"
    );
}

// ---- policy MACs ----------------------------------------------------------------------------

pub(crate) fn tampered_allowed_hosts_or_locations_fail_closed<H: Harness>() {
    for (column, evil) in [
        ("allowed_hosts", "'[\"evil.example\"]'"),
        ("allowed_hosts", "NULL"),
        ("locations", "'[\"header\",\"query\",\"body\"]'"),
        ("policy_mac", "NULL"),
    ] {
        let h = H::new();
        let store = h.open();
        let rec = populate(&store);
        h.tamper(&format!("UPDATE secrets SET {column} = {evil}"));
        assert_corrupt(store.load_secrets(&rec.id).unwrap_err(), "secret 'API_KEY'");
        assert_corrupt(store.list_secrets(&rec.id).unwrap_err(), "policy");
        drop(store);
        // A restart does not bless it either.
        assert_corrupt(h.open().load_secrets(&rec.id).unwrap_err(), "API_KEY");
    }
}

pub(crate) fn tampered_egress_allowlist_fails_closed<H: Harness>() {
    for evil in ["NULL", "'[\"evil.example\"]'", "'[]'"] {
        let h = H::new();
        let store = h.open();
        let rec = populate(&store);
        h.tamper(&format!("UPDATE stores SET egress_allowlist = {evil}"));
        assert_corrupt(store.get_store(&rec.id).unwrap_err(), "egress_allowlist");
        assert_corrupt(store.find_store("prod").unwrap_err(), "egress_allowlist");
        // One damaged row neither fails the listing nor hides a sound one.
        let sound = store.create_store("sound", None).unwrap();
        let listing = store.list_stores().unwrap();
        assert_eq!(listing.corrupt, vec![rec.id.clone()], "{evil}");
        assert_eq!(listing.stores, vec![sound], "{evil}");
        assert!(store.update_store(&rec.id, Some("renamed"), None).is_err());
    }
}

pub(crate) fn policy_copied_from_another_row_fails_closed<H: Harness>() {
    let h = H::new();
    let store = h.open();
    let rec = populate(&store);
    store
        .put_secret(
            &rec.id,
            "OPEN",
            &value(b"v"),
            hosts(&["evil.example"]),
            vec![Location::Header],
        )
        .unwrap();
    // Copy OPEN's allowed_hosts *and* its MAC onto API_KEY: the MAC names its own row.
    h.tamper(
        "UPDATE secrets SET (allowed_hosts, policy_mac) = \
         (SELECT allowed_hosts, policy_mac FROM secrets WHERE name = 'OPEN') \
         WHERE name = 'API_KEY'",
    );
    assert_corrupt(store.load_secrets(&rec.id).unwrap_err(), "API_KEY");
    let other = store.create_store("other", None).unwrap();
    h.tamper(
        "UPDATE stores SET (egress_allowlist, policy_mac) = \
         (SELECT egress_allowlist, policy_mac FROM stores WHERE name = 'other') \
         WHERE name = 'prod'",
    );
    assert_corrupt(store.get_store(&rec.id).unwrap_err(), "egress_allowlist");
    assert!(store.get_store(&other.id).is_ok());
}

pub(crate) fn legitimate_changes_keep_verifying<H: Harness>() {
    let h = H::new();
    let store = h.open();
    let rec = populate(&store);
    store
        .update_store(&rec.id, Some("renamed"), Some(None))
        .unwrap();
    store
        .put_secret(
            &rec.id,
            "API_KEY",
            &value(b"v2"),
            None,
            vec![Location::Body],
        )
        .unwrap();
    drop(store);
    let store = h.open();
    assert_eq!(store.get_store(&rec.id).unwrap().egress_allowlist, None);
    assert_eq!(store.find_store("renamed").unwrap().id, rec.id);
    let loaded = store.load_secrets(&rec.id).unwrap();
    assert_eq!(loaded[0].meta.locations, vec![Location::Body]);
    assert_eq!(store.list_secrets(&rec.id).unwrap()[0].version, 2);
}

pub(crate) fn rotation_re_macs_policies_and_refuses_tampered_ones<H: Harness>() {
    let h = H::new();
    let new_key = MasterKey::generate();
    let rec = {
        let store = h.open();
        let rec = populate(&store);
        store.rotate_master_key(&new_key).unwrap();
        rec
    };
    let reopened = h.open_with(new_key.duplicate()).unwrap();
    assert!(reopened.get_store(&rec.id).is_ok());
    assert_eq!(reopened.load_secrets(&rec.id).unwrap().len(), 1);

    h.tamper("UPDATE secrets SET allowed_hosts = '[\"evil.example\"]'");
    let err = reopened
        .rotate_master_key(&MasterKey::generate())
        .unwrap_err();
    assert_corrupt(err, "API_KEY");
    reopened.check().unwrap();
}

/// Each column that decides what a sandbox is — its store (whose secrets it gets), lifetime,
/// source address, proxy credential, certificate — is bound to the row's CA key: changed in the
/// database, the row no longer loads (a restart does not bless it), and a rotation refuses it.
pub(crate) fn tampered_sandbox_columns_fail_closed<H: Harness>() {
    for (column, evil) in [
        ("store_id", "(SELECT id FROM stores WHERE name = 'victim')"),
        ("store_name", "'victim'"),
        ("expires_at", "expires_at + 1"),
        ("created_at", "created_at - 1"),
        ("source_ip", "'10.9.9.9'"),
        ("source_ip", "NULL"),
        (
            "proxy_token_hash",
            "(SELECT proxy_token_hash FROM sandboxes WHERE id = 'sbx_victim')",
        ),
        ("ca_cert_pem", "'-----BEGIN CERTIFICATE----- other'"),
    ] {
        let h = H::new();
        let store = h.open();
        let rec = store.create_store("attacker", None).unwrap();
        let victim = store.create_store("victim", None).unwrap();
        let mut row = sandbox("sbx_attacker", &rec, later());
        row.source_ip = Some("10.1.1.1".parse().unwrap());
        store.insert_sandbox(&row).unwrap();
        let mut other = sandbox("sbx_victim", &victim, later());
        other.proxy_token_hash = vec![9, 9, 9];
        store.insert_sandbox(&other).unwrap();
        assert_eq!(store.load_sandboxes().unwrap().len(), 2, "{column}");
        h.tamper(&format!(
            "UPDATE sandboxes SET {column} = {evil} WHERE id = 'sbx_attacker'"
        ));
        assert_corrupt(store.load_sandboxes().unwrap_err(), "sbx_attacker");
        drop(store);
        let store = h.open();
        assert_corrupt(store.load_sandboxes().unwrap_err(), "sbx_attacker");
        assert!(
            store.rotate_master_key(&MasterKey::generate()).is_err(),
            "{column}"
        );
    }
}
