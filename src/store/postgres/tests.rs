//! The shared store suite on PostgreSQL, plus what only fleet mode has: nodes, concurrent
//! starts, generations, unreachable databases, a node left on a rotated-away key.

use std::sync::atomic::Ordering;

use super::*;
use crate::store::suite::{self, later, populate, sandbox, value, Harness, SECRET};

#[path = "../../../tests/it/support/pg.rs"]
mod pg_cluster;

struct Fixture {
    db: String,
    key_b64: String,
}

impl Fixture {
    fn url(&self) -> DatabaseUrl {
        DatabaseUrl::parse(pg_cluster::shared().url(&self.db)).unwrap()
    }

    fn node(&self, node: &str, key: MasterKey) -> PgStore {
        PgStore::open(&self.url(), node, key).unwrap()
    }

    fn sql(&self, sql: &str) -> String {
        pg_cluster::shared().psql(&self.db, sql)
    }

    fn bytes(&self, sql: &str) -> Vec<u8> {
        let hex = self.sql(sql);
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Harness for Fixture {
    type S = PgStore;

    fn new() -> Self {
        Fixture {
            db: pg_cluster::shared().create_database(),
            key_b64: MasterKey::generate().to_base64().to_string(),
        }
    }

    fn key(&self) -> MasterKey {
        MasterKey::from_base64(&self.key_b64).unwrap()
    }

    fn open_with(&self, key: MasterKey) -> Result<PgStore, StoreError> {
        PgStore::open(&self.url(), "node-a", key)
    }

    fn raw_secret(&self, store_id: &str, name: &str) -> Vec<u8> {
        self.bytes(&format!(
            "SELECT encode(value, 'hex') FROM secrets WHERE store_id = '{store_id}' AND name = '{name}'"
        ))
    }

    fn set_raw_secret(&self, store_id: &str, name: &str, sealed: &[u8]) {
        self.sql(&format!(
            "UPDATE secrets SET value = decode('{}', 'hex') WHERE store_id = '{store_id}' AND name = '{name}'",
            hex(sealed)
        ));
    }

    fn bump_versions(&self) {
        self.sql("UPDATE secrets SET version = version + 1");
    }

    fn raw_ca_key(&self, id: &str) -> Vec<u8> {
        self.bytes(&format!(
            "SELECT encode(ca_key, 'hex') FROM sandboxes WHERE id = '{id}'"
        ))
    }

    fn set_raw_ca_key(&self, id: &str, sealed: &[u8]) {
        self.sql(&format!(
            "UPDATE sandboxes SET ca_key = decode('{}', 'hex') WHERE id = '{id}'",
            hex(sealed)
        ));
    }

    fn set_raw_snapshot(&self, id: &str, sealed: &[u8]) {
        self.sql(&format!(
            "UPDATE sandboxes SET snapshot = decode('{}', 'hex') WHERE id = '{id}'",
            hex(sealed)
        ));
    }

    fn delete_key_check(&self) {
        self.sql("DELETE FROM meta");
    }

    fn count_secrets(&self) -> i64 {
        self.sql("SELECT count(*) FROM secrets").parse().unwrap()
    }

    fn set_schema_version(&self, version: i64) {
        self.sql(&format!(
            "INSERT INTO schema_migrations (version, applied_at) VALUES ({version}, 0)"
        ));
    }

    fn fail_next_rotation(store: &PgStore) {
        store
            .db
            .fail_rotation_before_commit
            .store(true, Ordering::SeqCst);
    }

    fn tamper(&self, sql: &str) {
        self.sql(sql);
    }
}

suite::store_suite!(Fixture);

#[test]
fn nodes_starting_together_migrate_once() {
    let fx = <Fixture as Harness>::new();
    let opened: Vec<_> = (0..4)
        .map(|i| {
            let (url, key) = (fx.url(), fx.key());
            std::thread::spawn(move || PgStore::open(&url, &format!("node-{i}"), key).map(drop))
        })
        .collect();
    for t in opened {
        t.join().unwrap().unwrap();
    }
    let migrations = schema::supported().to_string();
    assert_eq!(fx.sql("SELECT count(*) FROM schema_migrations"), migrations);
    assert_eq!(fx.sql("SELECT count(*) FROM meta"), "1");
}

#[test]
fn sandboxes_belong_to_their_node() {
    let fx = <Fixture as Harness>::new();
    let a = fx.node("node-a", fx.key());
    let b = fx.node("node-b", fx.key());
    let rec = a.create_store("shared", None).unwrap();
    assert_eq!(b.get_store(&rec.id).unwrap(), rec, "stores are shared");
    a.insert_sandbox(&sandbox("sbx_a", &rec, later())).unwrap();
    let past = OffsetDateTime::now_utc() - time::Duration::SECOND;
    b.insert_sandbox(&sandbox("sbx_b", &rec, past)).unwrap();
    let ids = |s: &PgStore| -> Vec<String> {
        s.load_sandboxes()
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect()
    };
    assert_eq!(ids(&a), ["sbx_a"]);
    assert_eq!(ids(&b), ["sbx_b"]);
    assert!(a
        .purge_expired_sandboxes(OffsetDateTime::now_utc())
        .unwrap()
        .is_empty());
    assert_eq!(
        b.purge_expired_sandboxes(OffsetDateTime::now_utc())
            .unwrap()
            .len(),
        1
    );
    assert_eq!(fx.sql("SELECT node_id FROM sandboxes"), "node-a");
    // Nor can a node delete another's row (a pending-deletion record copied with a cloned
    // host must not end the other node's sandboxes).
    assert!(matches!(
        b.delete_sandbox("sbx_a"),
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(fx.sql("SELECT count(*) FROM sandboxes"), "1");
    // A row moved to another node in the database is refused there (node_id is bound).
    fx.sql("UPDATE sandboxes SET node_id = 'node-b' WHERE id = 'sbx_a'");
    suite::assert_corrupt(b.load_sandboxes().unwrap_err(), "sbx_a");
    assert!(a.load_sandboxes().unwrap().is_empty());
}

#[test]
fn changes_move_the_generation() {
    let fx = <Fixture as Harness>::new();
    let store = fx.open();
    let rec = store.create_store("s", None).unwrap();
    let generation = |s: &PgStore| s.generations(vec![rec.id.clone()]).unwrap()[0].1;
    let g0 = generation(&store);
    store
        .put_secret(&rec.id, "K", &value(b"v"), None, vec![])
        .unwrap();
    let g1 = generation(&store);
    store.update_store(&rec.id, Some("renamed"), None).unwrap();
    assert_eq!(generation(&store), g1, "a rename reaches no sandbox");
    store.update_store(&rec.id, None, Some(None)).unwrap();
    let g2 = generation(&store);
    store.delete_secret(&rec.id, "K").unwrap();
    let g3 = generation(&store);
    assert!(g0 < g1 && g1 < g2 && g2 < g3, "{g0} {g1} {g2} {g3}");
    store.delete_store(&rec.id).unwrap();
    assert!(store.generations(vec![rec.id.clone()]).unwrap().is_empty());
}

#[test]
fn values_are_sealed_as_in_sqlite_and_bound_to_their_database() {
    let fx = <Fixture as Harness>::new();
    let store = fx.open();
    let rec = populate(&store);
    let sealed = fx.raw_secret(&rec.id, "API_KEY");
    // The same function and AAD the SQLite store uses opens it.
    let opened = crypto::open(
        &fx.key(),
        &crypto::secret_aad(&rec.id, "API_KEY", 1),
        &sealed,
    );
    assert_eq!(opened.unwrap().expose(), SECRET);
    // Copied into another database (another key, same store id and name): fails closed.
    let other = <Fixture as Harness>::new();
    let there = other.open();
    let id = there.create_store("prod", None).unwrap().id;
    other.sql(&format!(
        "UPDATE stores SET id = '{}' WHERE id = '{id}'",
        rec.id
    ));
    there
        .put_secret(&rec.id, "API_KEY", &value(b"x"), None, vec![])
        .unwrap();
    other.set_raw_secret(&rec.id, "API_KEY", &sealed);
    suite::assert_corrupt(there.load_secrets(&rec.id).unwrap_err(), "secret 'API_KEY'");
}

#[test]
fn a_node_left_on_the_old_key_never_writes_with_it() {
    let fx = <Fixture as Harness>::new();
    let a = fx.node("node-a", fx.key());
    let b = fx.node("node-b", fx.key());
    let rec = populate(&a);
    let new_key = MasterKey::generate();
    a.rotate_master_key(&new_key).unwrap();
    let before = fx.raw_secret(&rec.id, "API_KEY");
    let err = b
        .put_secret(&rec.id, "API_KEY", &value(b"old-key-write"), None, vec![])
        .unwrap_err();
    assert!(matches!(err, StoreError::WrongMasterKey(_)), "{err:?}");
    assert_eq!(fx.raw_secret(&rec.id, "API_KEY"), before);
    assert!(matches!(b.check(), Err(StoreError::WrongMasterKey(_))));
    // Its reads fail their checks as a tampered row would; the message says what is likelier.
    let err = b.load_secrets(&rec.id).unwrap_err();
    let shown = err.to_string();
    assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
    assert!(
        shown.contains("no longer opens the database's key check"),
        "{shown}"
    );
    let sound = fx.node("node-c", new_key.duplicate());
    fx.tamper(&format!(
        "UPDATE secrets SET allowed_hosts = '[\"x.test\"]' WHERE store_id = '{}'",
        rec.id
    ));
    let tampered = sound.load_secrets(&rec.id).unwrap_err().to_string();
    assert!(
        !tampered.contains("key check"),
        "a sound key gets no hint: {tampered}"
    );
    drop(sound);
    let err = PgStore::open(&fx.url(), "node-b", fx.key()).err().unwrap();
    assert!(matches!(err, StoreError::WrongMasterKey(_)), "{err:?}");
    let shown = err.to_string();
    assert!(shown.contains("refuses to start"), "{shown}");
    fx.node("node-b", new_key);
    // A deleted key check is an edit by hand, not a rotation: no hint.
    fx.delete_key_check();
    let err = b.load_secrets(&rec.id).unwrap_err().to_string();
    assert!(!err.contains("key check"), "{err}");
}

#[test]
fn an_unreachable_database_is_unavailable_then_recovers() {
    let cluster = pg_cluster::Cluster::owned();
    let db = cluster.create_database();
    let url = DatabaseUrl::parse(cluster.url(&db)).unwrap();
    let store = PgStore::open(&url, "node-a", MasterKey::generate()).unwrap();
    let rec = store.create_store("s", None).unwrap();
    cluster.stop();
    let err = store.list_stores().unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(err.to_string().contains("store unavailable"), "{err}");
    assert!(matches!(store.check(), Err(StoreError::Unavailable(_))));
    cluster.start();
    assert_eq!(store.list_stores().unwrap().stores, vec![rec]);
    store.check().unwrap();
}

#[test]
fn errors_never_show_the_password() {
    let url = DatabaseUrl::parse(
        "host=/nonexistent-sealgate-dir port=1 user=sg password=pw-DISTINCTIVE dbname=x".into(),
    )
    .unwrap();
    let err = PgStore::open(&url, "n", MasterKey::generate())
        .err()
        .unwrap();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    let shown = format!("{err} {err:?}");
    assert!(!shown.contains("pw-DISTINCTIVE"), "{shown}");
}

/// Turns the database back into what a build without policy MACs wrote: schema 1, no MAC
/// columns, a v1 key-check record.
fn downgrade_to_v1(fx: &Fixture) {
    let v1 = crypto::seal(&fx.key(), crypto::key_check_aad(), KEY_CHECK_PLAINTEXT);
    fx.sql(&format!(
        "ALTER TABLE stores DROP COLUMN policy_mac; ALTER TABLE secrets DROP COLUMN policy_mac; \
         DROP TABLE deleted_secrets; DROP TABLE deleted_stores; DROP INDEX sandboxes_by_store; \
         DELETE FROM schema_migrations WHERE version > 1; \
         UPDATE meta SET value = decode('{}', 'hex') WHERE key = '{KEY_CHECK_ROW}'",
        hex(&v1)
    ));
}

#[test]
fn rows_from_before_policy_macs_are_migrated_once() {
    let fx = <Fixture as Harness>::new();
    let rec = populate(&fx.open());
    downgrade_to_v1(&fx);
    // Two nodes start together: one migrates, under the advisory lock.
    let opened: Vec<_> = (0..2)
        .map(|i| {
            let (url, key) = (fx.url(), fx.key());
            std::thread::spawn(move || PgStore::open(&url, &format!("node-{i}"), key).unwrap())
        })
        .collect();
    let stores: Vec<PgStore> = opened.into_iter().map(|t| t.join().unwrap()).collect();
    for store in &stores {
        assert_eq!(
            store.load_secrets(&rec.id).unwrap()[0].value.expose(),
            SECRET
        );
        assert_eq!(
            store.get_store(&rec.id).unwrap().egress_allowlist,
            suite::hosts(&["api.example.com"])
        );
    }
    let migrations = schema::supported().to_string();
    assert_eq!(fx.sql("SELECT count(*) FROM schema_migrations"), migrations);
    drop(stores);
    // Migrated: from now on a missing or wrong MAC is tampering, not age.
    fx.sql("UPDATE secrets SET allowed_hosts = '[\"evil.example\"]'");
    suite::assert_corrupt(fx.open().load_secrets(&rec.id).unwrap_err(), "API_KEY");
    fx.sql("UPDATE secrets SET allowed_hosts = NULL, policy_mac = NULL");
    suite::assert_corrupt(fx.open().load_secrets(&rec.id).unwrap_err(), "API_KEY");
}

#[test]
fn a_node_without_key_file_refuses_an_initialised_database_and_creates_nothing() {
    let fx = <Fixture as Harness>::new();
    let (first, second) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // A new database: the first node creates its key file.
    let (store, _) = crate::rotate::open_pg_store(first.path(), None, &fx.url(), "node-a").unwrap();
    populate(&store);
    assert!(first.path().join(crypto::KEY_FILE_NAME).exists());
    // The database is initialised now: a second node without a key file refuses.
    let err = crate::rotate::open_pg_store(second.path(), None, &fx.url(), "node-b")
        .err()
        .unwrap();
    assert!(!matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(err.to_string().contains(crypto::KEY_FILE_NAME), "{err}");
    assert_eq!(std::fs::read_dir(second.path()).unwrap().count(), 0);
    // With the key (file or environment) it joins.
    let key = std::fs::read_to_string(first.path().join(crypto::KEY_FILE_NAME)).unwrap();
    crate::rotate::open_pg_store(second.path(), Some(key.trim()), &fx.url(), "node-b").unwrap();
}

/// A deleted store's last state is kept only while sandbox rows of it remain: its sealed
/// values stay no longer than a node could need them.
/// A sandbox created through one node while another deletes its store: the create is told
/// (not found) instead of answered 201 with a sandbox that could never unseal (outside pass:
/// the insert did not look at the store, and the delete had kept no state for it).
#[test]
fn a_sandbox_of_a_store_deleted_meanwhile_is_refused() {
    let fx = <Fixture as Harness>::new();
    let a = fx.node("node-a", fx.key());
    let b = fx.node("node-b", fx.key());
    let rec = a.create_store("gone", None).unwrap();
    let late = sandbox("sbx_late", &rec, later());
    a.delete_store(&rec.id).unwrap();
    let err = b.insert_sandbox(&late).unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err}");
    assert_eq!(fx.sql("SELECT count(*) FROM sandboxes"), "0");
}

#[test]
fn a_deleted_stores_last_state_is_kept_while_its_sandboxes_remain() {
    let fx = <Fixture as Harness>::new();
    let store = fx.open();
    let rec = populate(&store);
    store.delete_store(&rec.id).unwrap();
    let (kept, secrets) = store
        .deleted_store(&rec.id)
        .unwrap()
        .expect("a sandbox remains");
    assert_eq!(kept.egress_allowlist, suite::hosts(&["api.example.com"]));
    assert_eq!(secrets[0].value.expose(), SECRET);
    store.delete_sandbox("sbx_1").unwrap();
    assert!(
        store.deleted_store(&rec.id).unwrap().is_none(),
        "gone with it"
    );
    assert_eq!(fx.sql("SELECT count(*) FROM deleted_secrets"), "0");
    let bare = store.create_store("bare", None).unwrap();
    store.delete_store(&bare.id).unwrap();
    assert!(
        store.deleted_store(&bare.id).unwrap().is_none(),
        "no sandbox: nothing kept"
    );
}

/// A key rotation reseals a kept last state with everything else: a node that has not
/// applied it yet still finds it, under the new key, after the rotation.
#[test]
fn a_kept_last_state_survives_a_key_rotation() {
    let fx = <Fixture as Harness>::new();
    let store = fx.open();
    let rec = populate(&store);
    store.delete_store(&rec.id).unwrap();
    let new_key = MasterKey::generate();
    store.rotate_master_key(&new_key).unwrap();
    let reopened = PgStore::open(&fx.url(), "node-a", new_key).unwrap();
    let (kept, secrets) = reopened
        .deleted_store(&rec.id)
        .unwrap()
        .expect("kept through the rotation");
    assert_eq!(kept.egress_allowlist, suite::hosts(&["api.example.com"]));
    assert_eq!(secrets[0].value.expose(), SECRET);
}

/// The default node id is the host name, read without `/proc/sys` (hidden under the shipped
/// unit's `ProcSubset=pid`).
#[test]
fn the_default_node_id_is_the_host_name() {
    let want: String = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        .take(64)
        .collect();
    assert_eq!(super::default_node_id(), want);
    assert_ne!(super::default_node_id(), "");
}
