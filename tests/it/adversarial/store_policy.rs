//! The store's own integrity (issue 12): policy columns altered by someone who can write the
//! database but lacks the master key fail closed; a missing `master.key` beside an existing
//! database is refused without writing a new key; secret values that could never be unsealed
//! into a header are refused at write time; an unrestricted store (`egress_allowlist = null`)
//! reaches any public host on the default ports only.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use http::{Method, StatusCode};
use serde_json::json;

use super::{connect_status, API};
use crate::proxy_explicit::setup;
use crate::support::daemon::{logs_text, Harness, Opts};
use crate::support::pki::TestPki;
use crate::support::proxy_client as pc;

fn db_path(h: &Harness) -> PathBuf {
    h.daemon.as_ref().unwrap().db_path.clone()
}

fn sql(db: &Path, statement: &str) {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .unwrap();
    assert!(conn.execute(statement, []).unwrap() > 0, "{statement}");
}

/// A daemon with store `s` (allowlist `api.example.test`) holding `KEY` for that host only.
async fn populated(value: &str) -> Harness {
    let h = Harness::start().await;
    let store = h.store("s", Some(&["api.example.test"])).await;
    h.secret(
        &store,
        "KEY",
        value,
        Some(&["api.example.test"]),
        Some(&["header"]),
    )
    .await;
    h
}

/// Sandbox creation from `s` fails closed: 500, no token issued, no sandbox left.
async fn assert_sandbox_refused(h: &Harness) {
    let (s, v) = h
        .api(
            Method::POST,
            "/v1/sandboxes",
            Some(json!({"secret_store": "s"})),
        )
        .await;
    assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR, "{v}");
    assert!(
        !v.to_string().contains("osb_sealed_"),
        "a token was issued: {v}"
    );
    let (_, list) = h.api(Method::GET, "/v1/sandboxes", None).await;
    assert_eq!(list.as_array().map(Vec::len), Some(0), "{list}");
    assert!(logs_text().contains("policy failed to authenticate"));
}

/// ... and the admin API names the row (`store_corrupt`, never a value) and repairs it the way
/// docs/operations.md says: delete the secret, set it again (it had answered a bare 500
/// `internal`, with no way named; found from outside).
#[tokio::test]
async fn a_secret_pointed_at_another_host_in_the_database_fails_closed() {
    let h = populated("sk-adv-policy-0611").await;
    sql(
        &db_path(&h),
        "UPDATE secrets SET allowed_hosts = '[\"evil.example.test\"]'",
    );
    assert_sandbox_refused(&h).await;
    let (_, stores) = h.api(Method::GET, "/v1/stores", None).await;
    let id = stores[0]["id"].as_str().unwrap().to_owned();
    let secrets = format!("/v1/stores/{id}/secrets");
    let (s, v) = h.api(Method::GET, &secrets, None).await;
    assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR, "{v}");
    assert_eq!(v["error"]["code"], "store_corrupt", "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("secret 'KEY'"), "{message}");
    assert!(message.contains("A row that fails its checks"), "{message}");
    let (s, v) = h.api(Method::DELETE, &format!("{secrets}/KEY"), None).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    h.register_secret("sk-adv-policy-0611-again");
    let (s, v) = h
        .api(
            Method::PUT,
            &format!("{secrets}/KEY"),
            Some(
                json!({"value": "sk-adv-policy-0611-again", "allowed_hosts": ["api.example.test"]}),
            ),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    h.sandbox("s").await; // repaired: created (201)
}

#[tokio::test]
async fn widened_locations_in_the_database_fail_closed() {
    let h = populated("sk-adv-policy-0612").await;
    sql(
        &db_path(&h),
        "UPDATE secrets SET locations = '[\"header\",\"query\",\"body\"]'",
    );
    assert_sandbox_refused(&h).await;
}

#[tokio::test]
async fn an_opened_store_allowlist_in_the_database_fails_closed() {
    let h = populated("sk-adv-policy-0613").await;
    sql(&db_path(&h), "UPDATE stores SET egress_allowlist = NULL");
    assert_sandbox_refused(&h).await;
    // The listing leaves the tampered row out, names it, and still shows the sound stores.
    let sound = h.store("t", None).await;
    // A junk row whose id no header may carry (CR/LF) once made the daemon drop the header,
    // hiding the tampered store with it; it is named percent-encoded instead.
    sql(
        &db_path(&h),
        "INSERT INTO stores (id, name, egress_allowlist, created_at, updated_at) \
         VALUES ('evil' || char(13, 10) || 'x: 1', 'junk', NULL, 0, 0)",
    );
    let token = h.token.clone();
    let (s, headers, body) = h
        .exchange(Method::GET, "/v1/stores", None, Some(&token))
        .await;
    assert_eq!(s, StatusCode::OK, "{body:?}");
    let listed: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let ids: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        vec![sound.as_str()],
        "a tampered store is not listed as valid"
    );
    let named = headers["x-sealgate-corrupt-stores"].to_str().unwrap();
    let (named, junk) = named.split_once(',').expect("both rows named");
    let (named, junk) = if junk.starts_with("evil") {
        (named, junk)
    } else {
        (junk, named)
    };
    assert_eq!(junk, "evil%0D%0Ax%3A%201");
    let (s, v) = h
        .api(Method::GET, &format!("/v1/stores/{named}"), None)
        .await;
    assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR, "{v}");
    let logs = logs_text();
    assert!(logs.contains("left out of GET /v1/stores"), "{logs}");
    assert!(
        logs.contains(&format!("store '{named}' egress_allowlist")),
        "{logs}"
    );
}

/// The CLI reaches a store whose row fails its checks the way the API does: `store list`
/// names it on stderr, `store get <id>` shows `store_corrupt`, and `store delete <id>` — the
/// repair operations.md gives — deletes it. The CLI looked ids up in the listing, which
/// leaves such a store out, and answered "not found" to all three (found from outside).
#[tokio::test]
async fn the_cli_names_gets_and_deletes_a_tampered_store() {
    let h = populated("sk-adv-policy-0614").await;
    let (_, stores) = h.api(Method::GET, "/v1/stores", None).await;
    let id = stores[0]["id"].as_str().unwrap().to_owned();
    sql(&db_path(&h), "UPDATE stores SET egress_allowlist = NULL");
    // Async: the daemon answering the CLI runs on this test's runtime.
    let cli = |args: &[&str]| {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_sealgate"))
            .args(["--admin-url", &h.admin_url, "--admin-token", &h.token])
            .args(args)
            .env_remove("SEALGATE_CONFIG")
            .output()
    };
    let list = cli(&["store", "list"]).await.unwrap();
    let stderr = String::from_utf8_lossy(&list.stderr);
    assert!(list.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("store {id} is left out")),
        "{stderr}"
    );
    let get = cli(&["store", "get", &id.to_uppercase()]).await.unwrap();
    let stderr = String::from_utf8_lossy(&get.stderr);
    assert!(!get.status.success());
    assert!(
        stderr.contains("egress_allowlist") && !stderr.contains("not found"),
        "{stderr}"
    );
    let delete = cli(&["store", "delete", &id]).await.unwrap();
    let stderr = String::from_utf8_lossy(&delete.stderr);
    assert!(delete.status.success(), "{stderr}");
    let (s, _) = h.api(Method::GET, &format!("/v1/stores/{id}"), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "repaired: gone");
}

#[tokio::test]
async fn a_missing_master_key_beside_a_database_is_refused_without_creating_one() {
    let pki = Arc::new(TestPki::new());
    let mut h = Harness::try_start(Opts::default(), Some(pki.clone()))
        .await
        .unwrap();
    h.store("s", None).await;
    let db = db_path(&h);
    let data_dir = db.parent().unwrap().to_path_buf();
    h.stop().await;
    let key_file = data_dir.join("master.key");
    std::fs::remove_file(&key_file).unwrap();
    let before: Vec<_> = std::fs::read_dir(&data_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let opts = Opts {
        data_dir: Some(data_dir.clone()),
        ..Default::default()
    };
    let err = match Harness::try_start(opts, Some(pki)).await {
        Ok(_) => panic!("daemon started without its master key"),
        Err(e) => e,
    };
    assert!(
        err.contains("master.key") && err.contains("missing"),
        "{err}"
    );
    assert!(err.contains("no new key was written"), "{err}");
    assert!(!key_file.exists(), "a new key file was written");
    let after: Vec<_> = std::fs::read_dir(&data_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(before, after, "nothing was created in the data directory");
}

#[tokio::test]
async fn secret_values_with_control_characters_are_refused_and_tab_is_unsealed() {
    let e = setup(Some(&["api.example.test"]), &[]).await;
    for bad in [
        "sk-\u{1}x",
        "sk-\u{1b}[31m",
        "sk-\u{7f}",
        "sk-\u{1f}",
        "a\r\nb",
        "\0",
    ] {
        let (s, v) =
            e.h.api(
                Method::PUT,
                &format!("/v1/stores/{}/secrets/K", e.store),
                Some(json!({"value": bad, "locations": ["header"]})),
            )
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad:?}: {v}");
        assert_eq!(v["error"]["code"], "invalid_secret_value", "{bad:?}: {v}");
    }
    // Tab is allowed in header values (RFC 9110) and is unsealed there.
    let value = "sk-tab\tinside-0614";
    e.h.secret(&e.store, "TAB", value, None, Some(&["header"]))
        .await;
    let sb = pc::SandboxCreds::from_answer(&e.h.sandbox("s").await);
    let token = sb.token("TAB");
    let mut c = pc::h1(e.h.proxy, &sb, API).await;
    let a = pc::send1(
        &mut c,
        pc::get("/echo", "api.example.test", &[("x-api-key", &token)]),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    let got = e.echo.requests().last().unwrap().header("x-api-key");
    assert_eq!(got.as_deref(), Some(value));
}

#[tokio::test]
async fn an_unrestricted_store_reaches_default_ports_only() {
    let e = setup(None, &[]).await;
    let (status, _) = connect_status(&e, API).await;
    assert_eq!(status, 200, "port 443 of any public host");
    for target in ["api.example.test:8443", "api.example.test:22"] {
        let (status, text) = connect_status(&e, target).await;
        assert_eq!(status, 403, "{target}: {text}");
        assert!(text.contains("egress_denied"), "{target}: {text}");
    }
    // Port 80 is allowed for plain HTTP only: a tunnel to it is told how to send that.
    let (status, text) = connect_status(&e, "api.example.test:80").await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("absolute form"), "{text}");
    let plain = super::raw_proxy(
        e.h.proxy,
        format!(
            "GET http://api.example.test:8080/ HTTP/1.1\r\nHost: api.example.test:8080\r\n\
             Proxy-Authorization: {}\r\nConnection: close\r\n\r\n",
            e.sb.proxy_auth()
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(super::status_of(&plain), 403, "{plain}");
    assert_eq!(e.echo.connections(), 0);
}

/// An outside review: with a running sandbox and one tampered secret row in its store, a
/// write to that store was committed but answered 500 and left out of the audit log (the
/// refresh of the running sandboxes failed after the commit). Now the write answers as it
/// should and is audited; the store is quarantined (its sandboxes unseal nothing, `/readyz`
/// names it) instead of its sandboxes going on with the snapshot from before the write, until
/// its last sandbox is gone (`/readyz` named it until a restart).
#[tokio::test]
async fn a_committed_write_beside_a_tampered_row_is_answered_audited_and_quarantines() {
    let h = populated("sk-committed-write-7001").await;
    let (_, list) = h.api(Method::GET, "/v1/stores", None).await;
    let store = list[0]["id"].as_str().expect("store s").to_owned();
    let sandbox = h.sandbox("s").await;
    h.secret(
        &store,
        "OTHER",
        "sk-committed-other-7002",
        Some(&["api.example.test"]),
        None,
    )
    .await;
    sql(
        &db_path(&h),
        "UPDATE secrets SET allowed_hosts = '[\"evil.example.test\"]' WHERE name = 'KEY'",
    );
    let path = format!("/v1/stores/{store}/secrets/OTHER");
    let (s, v) = h.api(Method::DELETE, &path, None).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    let (s, v) = h.api(Method::DELETE, &path, None).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "it was deleted: {v}");
    assert!(h.audit_log().contains("secret.delete"), "{}", h.audit_log());
    let (s, v) = h.raw(Method::GET, "/readyz", None, None).await;
    let probe = String::from_utf8_lossy(&v);
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{probe}");
    assert!(
        !probe.contains(&store),
        "a probe without the token: {probe}"
    );
    let (s, v) = h.api(Method::GET, "/readyz", None).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert!(v.to_string().contains(&store), "{v}");
    // Its last sandbox gone, the quarantine is over: `/readyz` stops naming the store.
    let path = format!("/v1/sandboxes/{}", sandbox["id"].as_str().unwrap());
    let (s, v) = h.api(Method::DELETE, &path, None).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    let (s, v) = h.raw(Method::GET, "/readyz", None, None).await;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&v));
}

/// A sandbox id comes from the database: one rewritten there as a path ("../victim") must not
/// make the daemon (root) remove or write a file outside `cert_dir` when it purges or restores
/// the row (review: the start-up purge removed `cert_dir/<id>.pem` for every id it returned).
#[tokio::test]
async fn a_sandbox_id_rewritten_as_a_path_in_the_database_touches_no_file() {
    let pki = Arc::new(TestPki::new());
    let mut h = Harness::try_start(Opts::default(), Some(pki.clone()))
        .await
        .unwrap();
    h.store("s", None).await;
    h.sandbox("s").await;
    let db = db_path(&h);
    let data_dir = db.parent().unwrap().to_path_buf();
    let certs = h.dir.path().join("certs");
    let victim = h.dir.path().join("victim.pem");
    std::fs::write(&victim, b"keep me").unwrap();
    h.stop().await;
    sql(&db, "UPDATE sandboxes SET id = '../victim', expires_at = 1");
    let opts = Opts {
        data_dir: Some(data_dir),
        cert_dir: Some(certs),
        ..Default::default()
    };
    let h2 = Harness::try_start(opts, Some(pki)).await.unwrap();
    assert_eq!(std::fs::read(&victim).unwrap(), b"keep me");
    drop(h2);
}

/// A sandbox's row holds the snapshot it was last given, sealed under its id only: one put
/// back from a backup (or a stale `-wal`) opened, and a start served it as it was — a rotated
/// value and a deleted secret unsealed again, invisibly (outside pass h38b). A start
/// re-applies each store's current rows: the old value is only scrubbed, the deleted secret's
/// token unseals nothing.
#[tokio::test]
async fn a_sandbox_snapshot_put_back_from_a_backup_is_brought_up_to_date_at_start() {
    use crate::support::echo::Echo;
    use crate::support::proxy_client::SandboxCreds;

    let pki = Arc::new(TestPki::new());
    let echo = Echo::start_tls(pki.server_config(&["api.example.test"], &[])).await;
    let opts = || Opts {
        resolve: vec![("api.example.test".into(), echo.addr)],
        ..Default::default()
    };
    let mut h = Harness::try_start(opts(), Some(pki.clone())).await.unwrap();
    let store = h.store("s", Some(&["api.example.test"])).await;
    let api = Some(&["api.example.test"][..]);
    h.secret(
        &store,
        "KEY",
        "sk-rollback-old-0001",
        api,
        Some(&["header"]),
    )
    .await;
    h.secret(
        &store,
        "GONE",
        "sk-rollback-gone-0002",
        api,
        Some(&["header"]),
    )
    .await;
    let sb = SandboxCreds::from_answer(&h.sandbox("s").await);
    let db = db_path(&h);
    let old: Vec<u8> = rusqlite::Connection::open(&db)
        .unwrap()
        .query_row("SELECT snapshot FROM sandboxes", [], |r| r.get(0))
        .unwrap();
    h.secret(
        &store,
        "KEY",
        "sk-rollback-new-0003",
        api,
        Some(&["header"]),
    )
    .await;
    let (s, _) = h
        .api(
            Method::DELETE,
            &format!("/v1/stores/{store}/secrets/GONE"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    h.stop().await;
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute("UPDATE sandboxes SET snapshot = ?1", [&old])
        .unwrap();
    drop(conn);
    let again = Opts {
        data_dir: Some(db.parent().unwrap().to_path_buf()),
        cert_dir: Some(h.dir.path().join("certs")),
        ..opts()
    };
    let h2 = Harness::try_start(again, Some(pki)).await.unwrap();
    let mut c = pc::h1(h2.proxy, &sb, API).await;
    for name in ["KEY", "GONE"] {
        let token = sb.token(name);
        let a = pc::send1(
            &mut c,
            pc::get("/echo", "api.example.test", &[("x-api-key", &token)]),
        )
        .await;
        assert!(!a.text().contains("sk-rollback-"), "{name}: {}", a.text());
    }
    let sent: Vec<String> = echo
        .requests()
        .iter()
        .filter_map(|r| r.header("x-api-key"))
        .collect();
    // The deleted secret's token travels sealed, as after any deletion.
    assert_eq!(sent, ["sk-rollback-new-0003".to_owned(), sb.token("GONE")]);
    assert!(
        logs_text().contains("snapshot behind their store's rows"),
        "said at start"
    );
    drop(h2);
}

/// A quarantined store's sandboxes unseal nothing, and its hosts are refused: their answers
/// could carry a value the node cannot know (in fleet mode, rotated through another node), and
/// an outside review had a value an origin stored come back in clear once a tampered sibling
/// row locked the store (the locked copy had turned scrubbing off). An answer already
/// streaming from such a host ends; new requests there get 503 `unavailable`.
#[tokio::test]
async fn a_quarantined_store_refuses_its_hosts_and_ends_their_open_answers() {
    use http_body_util::BodyExt;
    let value = "sk-quarantine-scrub-7101";
    let e = setup(
        Some(&["api.example.test"]),
        &[
            ("KEY", value, Some(&["api.example.test"]), Some(&["header"])),
            ("OTHER", "sk-quarantine-other-7102", None, None),
        ],
    )
    .await;
    let mut open = pc::h1(e.h.proxy, &e.sb, API).await;
    open.ready().await.unwrap();
    let req = pc::get("/slow?ms=200&chunks=25", "api.example.test", &[]);
    let resp = open.send_request(req).await.unwrap();
    let mut body = resp.into_body();
    assert!(body.frame().await.unwrap().unwrap().is_data());
    sql(
        &db_path(&e.h),
        "UPDATE secrets SET allowed_hosts = '[\"evil.example.test\"]' WHERE name = 'OTHER'",
    );
    let (s, v) =
        e.h.api(
            Method::PATCH,
            &format!("/v1/stores/{}", e.store),
            Some(json!({"egress_allowlist": ["api.example.test", "other.example.test"]})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = e.h.api(Method::GET, "/readyz", None).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "quarantined: {v}");
    let ended = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        loop {
            match body.frame().await {
                Some(Ok(_)) => continue,
                Some(Err(_)) => return true,
                None => return false,
            }
        }
    })
    .await;
    assert_eq!(ended, Ok(true), "the open answer ended in an error");
    let mut c = pc::h1(e.h.proxy, &e.sb, API).await;
    for headers in [
        vec![("x-stored", value)],
        vec![("x-api-key", &*e.sb.token("KEY"))],
    ] {
        let a = pc::send1(&mut c, pc::get("/echo", "api.example.test", &headers)).await;
        assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{}", a.text());
        assert!(!a.text().contains(value), "{}", a.text());
        assert!(
            a.text().contains("cannot read the sandbox's store"),
            "{}",
            a.text()
        );
    }
    assert!(
        e.echo.requests().iter().all(|r| r.uri.starts_with("/slow")),
        "nothing else reached the upstream"
    );
}
