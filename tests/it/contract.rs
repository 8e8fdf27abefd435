//! Outside-in contract checks (DESIGN.md §4, §4a): admin body limits, content type, store
//! names, and the CLI client finding the daemon through `--config` alone.

use std::time::Duration;

use http::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::daemon::Harness;

/// Sends one raw HTTP/1.1 request (with `connection: close`) and returns the whole answer.
async fn raw_http(addr: &str, req: &str) -> String {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

fn error_code(body: &[u8]) -> String {
    let v: Value = serde_json::from_slice(body).expect("JSON error body");
    v["error"]["code"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn admin_bodies_over_one_mib_get_413_json() {
    let h = Harness::start().await;
    let patterns: Vec<String> = (0..120_000).map(|i| format!("h{i}.example.test")).collect();
    let big = json!({"name": "big", "egress_allowlist": patterns}).to_string();
    assert!(big.len() > 1024 * 1024);
    let (s, b) = h
        .raw(Method::POST, "/v1/stores", Some(&big), Some(&h.token))
        .await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(error_code(&b), "request_too_large");
    let (_, list) = h.api(Method::GET, "/v1/stores", None).await;
    assert_eq!(list, json!([]), "nothing was created");

    let id = h.store("s", None).await;
    let (s, b) = h
        .raw(
            Method::PUT,
            &format!("/v1/stores/{id}/secrets/BIG"),
            Some(&big),
            Some(&h.token),
        )
        .await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(error_code(&b), "request_too_large");

    // A 64 KiB value, even fully escaped, stays well inside the limit.
    let v = "\\u0041".repeat(64 * 1024);
    let body = format!("{{\"value\":\"{v}\",\"allowed_hosts\":[\"a.test\"]}}");
    let (s, b) = h
        .raw(
            Method::PUT,
            &format!("/v1/stores/{id}/secrets/ESCAPED"),
            Some(&body),
            Some(&h.token),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
}

#[tokio::test]
async fn admin_body_without_json_content_type_gets_415_json() {
    let h = Harness::start().await;
    let addr = h.admin_url.trim_start_matches("http://");
    let body = r#"{"name":"x"}"#;
    let req = format!(
        "POST /v1/stores HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {}\r\n\
         content-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        h.token,
        body.len()
    );
    let text = raw_http(addr, &req).await;
    assert!(text.starts_with("HTTP/1.1 415"), "{text}");
    assert!(text.contains("application/json"), "{text}");
    let (_, body) = text.split_once("\r\n\r\n").unwrap();
    assert_eq!(error_code(body.as_bytes()), "unsupported_media_type");
}

#[tokio::test]
async fn store_names_reject_control_and_bidi_characters() {
    let h = Harness::start().await;
    for name in [
        "a\u{0}b",
        "a\nb",
        "a\u{7f}b",
        "a\u{202e}b",
        "a\u{2067}b",
        "a\u{200f}",
    ] {
        let (s, v) = h
            .api(Method::POST, "/v1/stores", Some(json!({"name": name})))
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{name:?}: {v}");
        assert_eq!(v["error"]["code"], "invalid_request");
    }
    let (s, _) = h
        .api(
            Method::POST,
            "/v1/stores",
            Some(json!({"name": "prod – eu"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
}

/// `sealgate --config FILE store list` talks to FILE's `[admin] listen` with the token in FILE's
/// data_dir — no --admin-url needed when the daemon is not on the default port.
#[tokio::test]
async fn cli_finds_the_daemon_through_config_alone() {
    let h = Harness::start().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("admin.token"), format!("{}\n", h.token)).unwrap();
    let listen = h.admin_url.trim_start_matches("http://");
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = \"{}\"\n[admin]\nlisten = \"{listen}\"\n",
            data.display()
        ),
    )
    .unwrap();
    h.store("via-config", None).await;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_sealgate"))
        .arg("--config")
        .arg(&cfg)
        .args(["--json", "store", "list"])
        .env_remove("SEALGATE_ADMIN_URL")
        .env_remove("SEALGATE_ADMIN_TOKEN")
        .env_remove("SEALGATE_CONFIG")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["name"], "via-config");
}

#[tokio::test]
async fn cli_errors_do_not_repeat_their_cause() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_sealgate"))
        .args(["--config", "/nonexistent/sealgate-contract.toml", "serve"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("sealgate-contract.toml"), "{stderr}");
    assert_eq!(stderr.matches("No such file").count(), 1, "{stderr}");
}

#[tokio::test]
async fn bearer_scheme_is_case_insensitive_but_token_is_exact() {
    let h = Harness::start().await;
    for (header, want) in [
        (format!("bearer {}", h.token), StatusCode::OK),
        (format!("BEARER {}", h.token), StatusCode::OK),
        (format!("Bearer {}x", h.token), StatusCode::UNAUTHORIZED),
        (format!("Basic {}", h.token), StatusCode::UNAUTHORIZED),
        (h.token.clone(), StatusCode::UNAUTHORIZED),
    ] {
        let addr = h.admin_url.trim_start_matches("http://");
        let req = format!(
            "GET /v1/stores HTTP/1.1\r\nhost: {addr}\r\nauthorization: {header}\r\nconnection: close\r\n\r\n"
        );
        let text = raw_http(addr, &req).await;
        let status = format!("HTTP/1.1 {}", want.as_u16());
        assert!(text.starts_with(&status), "{header:?}: {text}");
    }
}
