//! Key material: tampered ciphertexts fail closed with a clear error; the admin API cannot be
//! reached through the proxy nor with a sandbox's credentials; no leaf is minted for a host the
//! sandbox may not reach.

use std::path::Path;
use std::sync::Arc;

use http::{Method, StatusCode};

use super::{assert_upstream_untouched, connect_status, mints, raw_proxy, tls_tunnel, API};
use crate::proxy_explicit::{setup, Spec};
use crate::support::daemon::{logs_text, Harness, Opts};
use crate::support::pki::TestPki;
use crate::support::proxy_client::{self as pc, SandboxCreds};

/// Flips one bit in the middle of `column` of every row of `table`.
fn flip_bit(db: &Path, table: &str, column: &str) {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .unwrap();
    let rows: Vec<(i64, Vec<u8>)> = conn
        .prepare(&format!("SELECT rowid, {column} FROM {table}"))
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(!rows.is_empty(), "no {table} rows to tamper with");
    for (rowid, mut blob) in rows {
        let mid = blob.len() / 2;
        blob[mid] ^= 0x10;
        conn.execute(
            &format!("UPDATE {table} SET {column} = ?1 WHERE rowid = ?2"),
            rusqlite::params![blob, rowid],
        )
        .unwrap();
    }
}

fn db_path(h: &Harness) -> std::path::PathBuf {
    h.daemon.as_ref().unwrap().db_path.clone()
}

#[tokio::test]
async fn flipped_bit_in_a_sealed_secret_fails_closed() {
    let h = Harness::start().await;
    let store = h.store("s", Some(&["api.example.test"])).await;
    h.secret(&store, "KEY_TAMPER_0601", "sk-adv-tamper-0601", None, None)
        .await;
    flip_bit(&db_path(&h), "secrets", "value");
    let (s, v) = h
        .api(
            Method::POST,
            "/v1/sandboxes",
            Some(serde_json::json!({"secret_store": "s"})),
        )
        .await;
    assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR, "{v}");
    assert!(
        !v.to_string().contains("osb_sealed_"),
        "a token was issued: {v}"
    );
    let (_, list) = h.api(Method::GET, "/v1/sandboxes", None).await;
    assert_eq!(list.as_array().map(Vec::len), Some(0), "{list}");
    // The log buffer is shared by every in-process test: look for this test's own secret and
    // store id on the corruption line, not for the message alone.
    let ours = format!("secret 'KEY_TAMPER_0601' of store '{store}'");
    let logs = logs_text();
    assert!(
        logs.lines().any(
            |l| l.contains("stored data is corrupt or was tampered with") && l.contains(&ours)
        ),
        "no corruption log line for {ours}"
    );
}

#[tokio::test]
async fn flipped_bit_in_a_sandbox_ca_key_refuses_restart() {
    restart_after_tamper("ca_key").await;
}

#[tokio::test]
async fn flipped_bit_in_a_sandbox_snapshot_refuses_restart() {
    restart_after_tamper("snapshot").await;
}

async fn restart_after_tamper(column: &str) {
    let pki = Arc::new(TestPki::new());
    let mut h = Harness::try_start(Opts::default(), Some(pki.clone()))
        .await
        .unwrap();
    let store = h.store("s", Some(&["api.example.test"])).await;
    h.secret(&store, "KEY", "sk-adv-restart-0602", None, None)
        .await;
    h.sandbox("s").await;
    let db = db_path(&h);
    let data_dir = db.parent().unwrap().to_path_buf();
    h.stop().await;
    flip_bit(&db, "sandboxes", column);
    let opts = Opts {
        data_dir: Some(data_dir),
        ..Default::default()
    };
    let err = match Harness::try_start(opts, Some(pki)).await {
        Ok(_) => panic!("daemon started with a tampered sandboxes.{column}"),
        Err(e) => e,
    };
    assert!(err.contains("restoring sandboxes"), "{err}");
    assert!(err.contains("corrupt or was tampered with"), "{err}");
}

#[tokio::test]
async fn admin_api_is_unreachable_through_the_proxy() {
    let secrets: &[Spec] = &[("KEY", "sk-adv-admin-0603", None, None)];
    let e = setup(None, secrets).await;
    let admin = e.h.admin_url.trim_start_matches("http://").to_owned();
    let (status, text) = connect_status(&e, &admin).await;
    assert_eq!(status, 403, "{text}");
    let req = format!(
        "GET http://{admin}/v1/stores HTTP/1.1\r\nHost: {admin}\r\nProxy-Authorization: {}\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
        e.sb.proxy_auth(),
        e.h.token
    );
    let text = raw_proxy(e.h.proxy, req.as_bytes()).await;
    super::assert_uniform(&text, 403, "egress_denied");
    assert!(
        !text.contains("\"egress_allowlist\""),
        "admin answered: {text}"
    );
}

#[tokio::test]
async fn sandbox_credentials_do_not_open_the_admin_api() {
    let secrets: &[Spec] = &[("KEY", "sk-adv-admin-0604", None, None)];
    let e = setup(None, secrets).await;
    for bearer in [e.sb.proxy_token.clone(), e.sb.token("KEY"), e.sb.id.clone()] {
        let (s, _) =
            e.h.raw(Method::GET, "/v1/stores", None, Some(&bearer))
                .await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
    }
}

#[tokio::test]
async fn no_leaf_is_minted_for_a_host_the_sandbox_may_not_reach() {
    let e = setup(Some(&["api.example.test"]), &[]).await;
    assert_eq!(connect_status(&e, "other.example.test:443").await.0, 403);
    assert_eq!(connect_status(&e, "10.0.0.1:443").await.0, 403);
    let tcp = pc::connect(e.h.proxy, Some(&e.sb.proxy_auth()), API)
        .await
        .unwrap();
    assert!(
        pc::tls(tcp, &e.sb.ca_pem, "other.example.test", &[b"http/1.1"])
            .await
            .is_err()
    );
    assert_eq!(mints(&e), 0);
    // A deleted sandbox's credentials mint nothing either.
    let other = SandboxCreds::from_answer(&e.h.sandbox("s").await);
    e.h.api(Method::DELETE, &format!("/v1/sandboxes/{}", other.id), None)
        .await;
    assert!(pc::connect(e.h.proxy, Some(&other.proxy_auth()), API)
        .await
        .is_err());
    assert_eq!(mints(&e), 0);
    assert_upstream_untouched(&e);
    let _tls = tls_tunnel(&e, API, "api.example.test").await;
    assert_eq!(mints(&e), 1, "control: an allowed host gets its leaf");
}
