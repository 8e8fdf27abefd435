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

/// A head that declares more than the limit is refused from the head: no `100 Continue`, no
/// wait for a body (an outside review's connection waited 400 s for one it would refuse).
#[tokio::test]
async fn an_admin_body_declared_over_the_limit_is_refused_before_it_is_sent() {
    let h = Harness::start().await;
    let addr = h.admin_url.trim_start_matches("http://");
    for expect in ["expect: 100-continue\r\n", ""] {
        let req = format!(
            "POST /v1/stores HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {}\r\n\
             content-type: application/json\r\ncontent-length: 999999999\r\n{expect}\
             connection: close\r\n\r\n",
            h.token
        );
        let text = raw_http(addr, &req).await;
        assert!(text.starts_with("HTTP/1.1 413 "), "{expect:?}: {text}");
        assert!(text.contains("request_too_large"), "{text}");
    }
    // curl, which waits for `100 Continue` before a large body: 413 at once, body unsent.
    let big = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(big.path(), vec![b' '; 2 << 20]).unwrap();
    let started = std::time::Instant::now();
    let out = tokio::process::Command::new("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{size_upload}",
            "-m",
            "20",
        ])
        .args([
            "-H",
            "content-type: application/json",
            "-H",
            "expect: 100-continue",
        ])
        .args(["-H", &format!("authorization: Bearer {}", h.token)])
        .arg("--data-binary")
        .arg(format!("@{}", big.path().display()))
        .arg(format!("{}/v1/stores", h.admin_url))
        .output()
        .await
        .expect("curl is installed (scripts/test installs it)");
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        said,
        "413 0",
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // A client that does not wait for `100 Continue` (httpx, the SDK's) is still writing when
    // the 413 comes: the rest is read and dropped, so it reads the answer, not a reset. So
    // does one whose chunked body grows past the limit.
    // 8 MiB: more than the sockets' buffers hold, less than the lingering reads (16 MiB).
    let big_body = vec![b' '; 8 << 20];
    for chunked in [false, true] {
        let framing = match chunked {
            true => "transfer-encoding: chunked".to_owned(),
            false => format!("content-length: {}", big_body.len()),
        };
        let head = format!(
            "POST /v1/stores HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {}\r\n\
             content-type: application/json\r\n{framing}\r\nconnection: close\r\n\r\n",
            h.token
        );
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(head.as_bytes()).await.unwrap();
        let body: Vec<u8> = match chunked {
            true => [
                format!("{:x}\r\n", big_body.len()).as_bytes(),
                &big_body,
                b"\r\n0\r\n\r\n",
            ]
            .concat(),
            false => big_body.clone(),
        };
        tcp.write_all(&body).await.expect("the whole body is taken");
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut out))
            .await
            .expect("answered")
            .unwrap_or_else(|e| panic!("chunked {chunked}: the answer was lost: {e}"));
        let text = String::from_utf8_lossy(&out);
        assert!(
            text.starts_with("HTTP/1.1 413 "),
            "chunked {chunked}: {text}"
        );
    }
    // Without the token it is still 401 first: the length says nothing to a stranger.
    let req = format!(
        "POST /v1/stores HTTP/1.1\r\nhost: {addr}\r\ncontent-length: 999999999\r\n\
         connection: close\r\n\r\n"
    );
    assert!(raw_http(addr, &req).await.starts_with("HTTP/1.1 401 "));
}

/// `[admin] body_read_timeout_secs`: a token holder whose body stalls gets 408 and the
/// connection closes (such connections are never evicted to make room, so a stalled body held
/// its slot for good); a body that comes in time is served.
#[tokio::test]
async fn a_stalled_admin_body_times_out_with_408() {
    let h = Harness::start_with(crate::support::daemon::Opts {
        admin_toml: "body_read_timeout_secs = 1\n".into(),
        ..Default::default()
    })
    .await;
    let addr = h.admin_url.trim_start_matches("http://");
    let head = format!(
        "POST /v1/stores HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {}\r\n\
         content-type: application/json\r\ncontent-length: 40\r\n\r\n{{\"name\":",
        h.token
    );
    let started = std::time::Instant::now();
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut out))
        .await
        .expect("the stalled connection is answered and closed")
        .unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 408 "), "{text}");
    assert!(text.contains("request_timeout"), "{text}");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    let (_, list) = h.api(Method::GET, "/v1/stores", None).await;
    assert_eq!(list, json!([]), "nothing was created");
    // A body that arrives in time, in pieces, is read whole and served.
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = r#"{"name":"slow"}"#;
    let head = format!(
        "POST /v1/stores HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        h.token,
        body.len()
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    for piece in [&body[..5], &body[5..]] {
        tokio::time::sleep(Duration::from_millis(200)).await;
        tcp.write_all(piece.as_bytes()).await.unwrap();
    }
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 201 "), "{text}");
}

/// A sandbox's `timeout` is whole seconds however JSON writes them: `60.0` (Python's
/// `json.dumps` of a float) and `1e3` are 60 and 1000; a fraction or a negative is a 400.
#[tokio::test]
async fn a_sandbox_timeout_written_as_a_float_is_whole_seconds() {
    let h = Harness::start().await;
    h.store("s", Some(&["a.test"])).await;
    for (timeout, want) in [("60.0", 60), ("1e3", 1000), ("7", 7)] {
        let body = format!("{{\"secret_store\":\"s\",\"timeout\":{timeout}}}");
        let (s, b) = h
            .raw(Method::POST, "/v1/sandboxes", Some(&body), Some(&h.token))
            .await;
        assert_eq!(
            s,
            StatusCode::CREATED,
            "{timeout}: {}",
            String::from_utf8_lossy(&b)
        );
        let sb: Value = serde_json::from_slice(&b).unwrap();
        let ends = time::OffsetDateTime::parse(
            sb["expires_at"].as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap();
        let left = (ends - time::OffsetDateTime::now_utc()).whole_seconds();
        assert!(
            (want - 5..=want).contains(&left),
            "{timeout}: {left} s left: {sb}"
        );
    }
    for timeout in ["60.5", "-1", "1e30"] {
        let body = format!("{{\"secret_store\":\"s\",\"timeout\":{timeout}}}");
        let (s, b) = h
            .raw(Method::POST, "/v1/sandboxes", Some(&body), Some(&h.token))
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{timeout}");
        assert!(
            String::from_utf8_lossy(&b).contains("whole seconds"),
            "{timeout}: {}",
            String::from_utf8_lossy(&b)
        );
    }
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
