//! Operations (issue 8): metrics, readiness, audit rules, reload (admin API and SIGHUP),
//! graceful shutdown on SIGTERM, and master-key rotation with injected crashes.
//!
//! In-process tests use the [`Harness`]; signal and crash tests spawn the real binary on
//! 127.0.0.1 port 0 and parse the addresses it prints to stderr.

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

use crate::proxy_explicit::{setup, setup_with, Env};
use crate::support::daemon::{Harness, Opts};
use crate::support::echo::Echo;
use crate::support::pki::TestPki;
use crate::support::proxy_client::{self as pc, SandboxCreds};

const API: &str = "api.example.test:443";
const OTHER: &str = "other.example.test:443";

// ---- helpers ------------------------------------------------------------------------------------

/// The value of one exposition line (`name{labels}` exactly as rendered); 0 when absent.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name, v) = l.rsplit_once(' ')?;
            (name == series).then(|| v.parse().expect("numeric sample"))
        })
        .unwrap_or(0.0)
}

async fn scrape(h: &Harness) -> String {
    let (s, body) = h
        .raw(Method::GET, "/metrics", None, Some(&h.token.clone()))
        .await;
    assert_eq!(s, StatusCode::OK);
    String::from_utf8(body.to_vec()).unwrap()
}

/// Audit lines as JSON.
fn audit_events(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).expect("audit line is JSON"))
        .collect()
}

fn with_key(key: &str) -> [(&'static str, &str); 1] {
    [("x-api-key", key)]
}

/// GET /echo with the token in `x-api-key`; returns the answer.
async fn echo_get(
    c: &mut hyper::client::conn::http1::SendRequest<pc::ReqBody>,
    host: &str,
    key: &str,
) -> pc::Answer {
    pc::send1(c, pc::get("/echo", host, &with_key(key))).await
}

// ---- metrics ------------------------------------------------------------------------------------

/// Connections opened at once spread over the proxy workers: the kernel hands a burst to
/// whichever worker wakes first (32 of 32 on one of two workers were seen), so an accepted
/// connection moves to a worker with at least two fewer open connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_connections_is_spread_over_the_workers() {
    let e = setup(
        Some(&["api.example.test"]),
        &[(
            "KEY",
            "sk-ops-spread-0001",
            Some(&["api.example.test"]),
            Some(&["header"]),
        )],
    )
    .await;
    let conns =
        futures_util::future::join_all((0..16).map(|_| pc::h1(e.h.proxy, &e.sb, API))).await;
    let m = scrape(&e.h).await;
    let workers = sealgate::proxy::workers::count(0);
    let load: Vec<f64> = (0..workers)
        .map(|w| {
            metric(
                &m,
                &format!("sealgate_worker_connections{{worker=\"{w}\"}}"),
            )
        })
        .collect();
    assert_eq!(load.iter().sum::<f64>(), 16.0, "{m}");
    let (max, min) = (
        load.iter().cloned().fold(f64::MIN, f64::max),
        load.iter().cloned().fold(f64::MAX, f64::min),
    );
    assert!(max - min <= 2.0, "per worker: {load:?}");
    drop(conns);
}

/// A real value an upstream hands back is scrubbed where the sandbox cannot tell: the operator
/// sees it in `sealgate_values_scrubbed_total` and in one log line naming the sandbox and the
/// host — never the value (outside pass h43b: a scrubbed answer left no trace). The echo
/// answers the key in a header (counted at the head) and in its JSON body (counted when the
/// body is done).
#[tokio::test]
async fn values_scrubbed_from_answers_are_counted_and_logged_without_the_value() {
    let e = setup(
        Some(&["api.example.test"]),
        &[(
            "KEY",
            "sk-ops-scrubbed-0001",
            Some(&["api.example.test"]),
            Some(&["header"]),
        )],
    )
    .await;
    let before = e.h.metric("sealgate_values_scrubbed_total").await;
    let key = e.sb.token("KEY");
    let mut c = pc::h1(e.h.proxy, &e.sb, API).await;
    let a = echo_get(&mut c, "api.example.test", &key).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.headers["x-echo-api-key"], key.as_str());
    let body = String::from_utf8_lossy(&a.body).into_owned();
    assert!(body.contains(&key) && !body.contains("sk-ops-scrubbed-0001"));
    let a = pc::send1(&mut c, pc::get("/echo", "api.example.test", &[])).await;
    assert_eq!(a.status, StatusCode::OK, "an answer with nothing to scrub");
    let counted = e.h.metric("sealgate_values_scrubbed_total").await - before;
    assert_eq!(counted, 2.0, "one in the header, one in the body");
    let line = crate::support::daemon::logs_text()
        .lines()
        .find(|l| l.contains("were scrubbed") && l.contains(&e.sb.id))
        .map(str::to_owned)
        .expect("a log line for the scrubbed answer");
    assert!(line.contains("host=api.example.test:443"), "{line}");
    assert!(line.contains("head=1") && line.contains("body=1"), "{line}");
    e.h.assert_logs_clean();
}

/// A sandbox whose client does not trust its CA (the most common setup mistake) left no
/// trace an operator could see: no audit line (nothing was refused), a debug line without the
/// sandbox (outside pass h48a L2). Failed client handshakes are counted by reason, and the
/// debug line names the sandbox.
#[tokio::test]
async fn failed_client_handshakes_are_counted_by_reason() {
    use tokio::io::AsyncReadExt as _;
    let e = setup_with(
        Some(&["api.example.test"]),
        &[],
        Opts {
            proxy_toml: "tls_handshake_timeout_secs = 1\n".into(),
            ..Default::default()
        },
    )
    .await;
    let before = scrape(&e.h).await;
    for reason in ["client_alert", "timeout", "handshake_error", "leaf"] {
        let line = format!("sealgate_tls_handshake_failures_total{{reason=\"{reason}\"}} 0");
        assert!(
            before.contains(&line),
            "{reason} is not exported at 0: {before}"
        );
    }
    // Another sandbox's CA: the client refuses the leaf and says so with an alert.
    let other = SandboxCreds::from_answer(&e.h.sandbox("s").await);
    let tunnel = pc::connect(e.h.proxy, Some(&e.sb.proxy_auth()), API)
        .await
        .unwrap();
    let refused = pc::tls(tunnel, &other.ca_pem, "api.example.test", &[b"http/1.1"]).await;
    assert!(refused.is_err(), "another sandbox's CA was trusted");
    // A tunnel that never starts its handshake: cut at the timeout.
    let mut silent = pc::connect(e.h.proxy, Some(&e.sb.proxy_auth()), API)
        .await
        .unwrap();
    let mut buf = [0u8; 1];
    let cut = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf)).await;
    assert!(
        matches!(cut, Ok(Ok(0)) | Ok(Err(_))),
        "the silent tunnel stayed open"
    );
    let series =
        |reason: &str| format!("sealgate_tls_handshake_failures_total{{reason=\"{reason}\"}}");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let after = scrape(&e.h).await;
        let d = |reason: &str| metric(&after, &series(reason)) - metric(&before, &series(reason));
        if d("client_alert") == 1.0 && d("timeout") == 1.0 {
            break;
        }
        assert!(Instant::now() < deadline, "not counted: {after}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let logs = crate::support::daemon::logs_text();
    let named = logs
        .lines()
        .filter(|l| l.contains("TLS interception ended before serving"))
        .any(|l| l.contains("client sent the alert") && l.contains(&e.sb.id));
    assert!(named, "no debug line names the sandbox and the alert");
    let audit = e.h.audit_log();
    assert!(
        !audit.contains("\"method\":\"TLS\""),
        "a failed handshake is no refusal: {audit}"
    );
}

#[tokio::test]
async fn metrics_move_as_requests_are_allowed_unsealed_and_refused() {
    let e = setup(
        Some(&["api.example.test", "other.example.test"]),
        &[(
            "KEY",
            "sk-ops-metrics-0001",
            Some(&["api.example.test"]),
            Some(&["header"]),
        )],
    )
    .await;
    let (s, _) = e.h.raw(Method::GET, "/metrics", None, None).await;
    assert_eq!(
        s,
        StatusCode::UNAUTHORIZED,
        "/metrics needs the admin token"
    );
    let before = scrape(&e.h).await;
    assert_eq!(metric(&before, "sealgate_active_sandboxes"), 1.0);
    assert_eq!(
        metric(
            &before,
            r#"sealgate_store_operations_total{op="secret.set"}"#
        ),
        1.0
    );

    let key = e.sb.token("KEY");
    let mut c = pc::h1(e.h.proxy, &e.sb, API).await;
    let a = echo_get(&mut c, "api.example.test", &key).await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(e.echo.received_bytes_contain(b"sk-ops-metrics-0001"));
    let a = pc::send1(
        &mut c,
        pc::post("/echo", "api.example.test", &[], vec![b'u'; 5000]),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    // A second tunnel to the same host reuses the cached leaf.
    let mut c2 = pc::h1(e.h.proxy, &e.sb, API).await;
    let a = pc::send1(
        &mut c2,
        pc::get("/big?bytes=100000", "api.example.test", &[]),
    )
    .await;
    assert_eq!(a.body.len(), 100_000);
    let mid = scrape(&e.h).await;
    assert!(metric(&mid, "sealgate_active_connections") >= 2.0, "{mid}");
    // The same connections, per proxy worker: they add up, on workers that exist.
    let workers = sealgate::proxy::workers::count(0);
    let per_worker: f64 = (0..workers)
        .map(|w| {
            metric(
                &mid,
                &format!("sealgate_worker_connections{{worker=\"{w}\"}}"),
            )
        })
        .sum();
    assert_eq!(
        per_worker,
        metric(&mid, "sealgate_active_connections"),
        "{mid}"
    );

    let mut o = pc::h1(e.h.proxy, &e.sb, OTHER).await;
    let a = echo_get(&mut o, "other.example.test", &key).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    assert_eq!(a.code().as_deref(), Some("secret_host_denied"));
    let r = pc::connect(
        e.h.proxy,
        Some(&e.sb.proxy_auth()),
        "denied.example.test:443",
    )
    .await
    .unwrap_err();
    assert_eq!(r.status, 403);
    // Malformed: a bad request, never a tunnel (it was counted as one; outside pass).
    let r = pc::connect(e.h.proxy, Some(&e.sb.proxy_auth()), "a.example.test:99999")
        .await
        .unwrap_err();
    assert_eq!(r.status, 400);

    let after = scrape(&e.h).await;
    let d = |series: &str| metric(&after, series) - metric(&before, series);
    let moved = [
        (
            r#"sealgate_requests_total{decision="allow",code="ok"}"#,
            3.0,
        ),
        (
            r#"sealgate_requests_total{decision="deny",code="secret_host_denied"}"#,
            1.0,
        ),
        (
            r#"sealgate_requests_total{decision="deny",code="egress_denied"}"#,
            1.0,
        ),
        (r#"sealgate_tunnels_total{decision="allow",code="ok"}"#, 3.0),
        (
            r#"sealgate_tunnels_total{decision="deny",code="egress_denied"}"#,
            1.0,
        ),
        (
            r#"sealgate_requests_total{decision="deny",code="bad_request"}"#,
            1.0,
        ),
        (
            r#"sealgate_tunnels_total{decision="deny",code="bad_request"}"#,
            0.0,
        ),
        (
            r#"sealgate_secrets_unsealed_total{secret="KEY",host="api.example.test:443"}"#,
            1.0,
        ),
        (
            r#"sealgate_secrets_unsealed_total{secret="KEY",host="other.example.test:443"}"#,
            0.0,
        ),
    ];
    for (series, by) in moved {
        assert_eq!(d(series), by, "{series}");
    }
    // A refused CONNECT's line counts the answer it got (it said 0).
    let deadline = Instant::now() + Duration::from_secs(20);
    let refused = loop {
        let found = audit_events(&e.h.audit_log())
            .into_iter()
            .find(|v| v["method"] == "CONNECT" && v["code"] == "egress_denied");
        match found {
            Some(line) => break line,
            None if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            None => panic!("the refused CONNECT is not audited"),
        }
    };
    assert!(refused["bytes_down"].as_u64() > Some(50), "{refused}");
    assert_eq!(d("sealgate_tls_handshakes_total"), 3.0);
    assert_eq!(d("sealgate_leaf_mints_total"), 2.0, "one leaf per host");
    assert!(d("sealgate_leaf_cache_hits_total") >= 1.0, "{after}");
    assert!(metric(&after, "sealgate_leaf_cache_hit_ratio") > 0.0);
    assert_eq!(metric(&after, "sealgate_leaf_cache_entries"), 2.0);
    assert!(d("sealgate_bytes_up_total") >= 5000.0);
    assert!(d("sealgate_bytes_down_total") >= 100_000.0);
    assert_eq!(d("sealgate_upstream_latency_seconds_count"), 3.0);
    assert!(!after.contains("sk-ops-metrics-0001"));

    // The gauge falls back when the sandbox's connections close.
    drop((c, c2, o));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = scrape(&e.h).await;
        if metric(&now, "sealgate_active_connections") == 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "connections still counted: {now}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---- readiness ----------------------------------------------------------------------------------

/// `/readyz` until `done` holds of its answer (with the admin token if `token`): one store
/// check serves every probe for a second, so a change shows within about that.
async fn readyz_until(
    h: &Harness,
    token: bool,
    done: impl Fn(StatusCode, &Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (s, v) = match token {
            true => h.api(Method::GET, "/readyz", None).await,
            false => {
                let (s, body) = h.raw(Method::GET, "/readyz", None, None).await;
                (s, serde_json::from_slice(&body).unwrap_or(Value::Null))
            }
        };
        if done(s, &v) {
            return v;
        }
        assert!(Instant::now() < deadline, "/readyz still answers {s} {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn readyz_fails_while_the_database_is_unusable() {
    let h = Harness::start().await;
    let (s, _) = h.raw(Method::GET, "/readyz", None, None).await;
    assert_eq!(s, StatusCode::OK);
    let db = h.dir.path().join("data").join("sealgate.db");
    let moved = db.with_extension("db.moved");
    std::fs::rename(&db, &moved).unwrap();
    let v = readyz_until(&h, false, |s, _| s == StatusCode::SERVICE_UNAVAILABLE).await;
    assert_eq!(v["error"]["code"], "not_ready");
    let probe = v["error"]["message"].as_str().unwrap();
    assert!(probe.contains("store unusable"), "{v}");
    assert!(
        !probe.contains("sealgate.db"),
        "where the database lives: {v}"
    );
    // With the admin token, the reason.
    let (s, v) = h.api(Method::GET, "/readyz", None).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        v["error"]["message"].as_str().unwrap().contains("removed"),
        "{v}"
    );
    let (s, _) = h.raw(Method::GET, "/healthz", None, None).await;
    assert_eq!(s, StatusCode::OK, "liveness is not readiness");

    // A different file at the path is not the database this process writes to either.
    std::fs::write(&db, b"").unwrap();
    readyz_until(&h, true, |s, v| {
        s == StatusCode::SERVICE_UNAVAILABLE && v.to_string().contains("replaced")
    })
    .await;

    std::fs::rename(&moved, &db).unwrap();
    readyz_until(&h, false, |s, _| s == StatusCode::OK).await;
}

// ---- audit --------------------------------------------------------------------------------------

/// The audit line of the request to `path`, waited for (up to 20 s: some are written when
/// their body ends).
pub(crate) async fn request_line(h: &crate::support::daemon::Harness, path: &str) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let found = audit_events(&h.audit_log())
            .into_iter()
            .find(|v| v["kind"] == "request" && v["path"] == path);
        if let Some(line) = found {
            return line;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no audit line for {path}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// POSTs `chunks` over h1 to api.example.test's `path`, 20 ms apart; expects 200 and returns
/// the request's audit line.
async fn paced_upload(e: &Env, path: &str, chunks: Vec<Bytes>) -> Value {
    let a = send_paced(e, path, chunks, Duration::from_millis(20)).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    request_line(&e.h, path).await
}

/// POSTs `chunks` over h1 to api.example.test's `path`, `gap` apart; the answer. The second
/// chunk waits at least 1.2 s, so the upload streams (its head goes up while it goes on)
/// instead of being read ahead whole (`proxy::unframed`, at most a second).
async fn send_paced(e: &Env, path: &str, chunks: Vec<Bytes>, gap: Duration) -> pc::Answer {
    let second = gap.max(Duration::from_millis(1200));
    let req = http::Request::post(path)
        .header("host", "api.example.test")
        .body(pc::paced_from(chunks, second, gap))
        .unwrap();
    let mut c = pc::h1(e.h.proxy, &e.sb, API).await;
    pc::send1(&mut c, req).await
}

/// `n` pieces, each `key` quoted and then `pad` bytes.
fn token_pieces(key: &str, n: usize, pad: usize) -> Vec<Bytes> {
    (0..n)
        .map(|_| Bytes::from(format!("\"{key}\"{}", "x".repeat(pad))))
        .collect()
}

/// A daemon with one secret `KEY` of value `real`, unsealed in bodies for api.example.test.
async fn body_secret(real: &str) -> Env {
    body_secret_with(real, "").await
}

/// [`body_secret`] with `proxy_toml` in the daemon's `[proxy]`.
async fn body_secret_with(real: &str, proxy_toml: &str) -> Env {
    let secrets = [(
        "KEY",
        real,
        Some(&["api.example.test"][..]),
        Some(&["body"][..]),
    )];
    let opts = Opts {
        proxy_toml: proxy_toml.into(),
        ..Opts::default()
    };
    setup_with(Some(&["api.example.test"]), &secrets, opts).await
}

/// A streamed upload (over the held size, its length known) records what it unsealed: hyper
/// stops polling such a body when it says it is over, and the audit line said
/// `"unsealed": []` for 65,537 bytes and more while the origin got the real value (outside
/// review, with curl, Go, Java and wget).
#[tokio::test]
async fn a_streamed_upload_audits_the_secrets_it_unsealed() {
    let real = "sk-ops-audit-stream-0001";
    let e = body_secret(real).await;
    let key = e.sb.token("KEY");
    let body = format!(
        "{{\"key\":\"{key}\",\"pad\":\"{}\"}}",
        "x".repeat(100 << 10)
    );
    let mut c1 = pc::h1(e.h.proxy, &e.sb, API).await;
    let a = pc::send1(
        &mut c1,
        pc::post("/upload", "api.example.test", &[], body.clone()),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    let mut c2 = pc::h2(e.h.proxy, &e.sb, API).await;
    let a = pc::send2(
        &mut c2,
        pc::post("https://api.example.test/upload", "", &[], body),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    let seen = e.echo.requests();
    assert_eq!(seen.len(), 2);
    assert!(seen
        .iter()
        .all(|r| String::from_utf8_lossy(&r.body).contains(real)));
    let uploads: Vec<Value> = audit_events(&e.h.audit_log())
        .into_iter()
        .filter(|v| v["kind"] == "request" && v["path"] == "/upload")
        .collect();
    assert_eq!(uploads.len(), 2, "{uploads:#?}");
    for u in &uploads {
        assert_eq!(u["unsealed"], json!(["KEY"]), "{u}");
    }
}

/// An origin that answers an upload before reading it: the audit line waits for the body's
/// end, so it names the secret unsealed after the answer's head (outside re-check: 2 of 4
/// such uploads were audited `"unsealed": []` while the origin got the real value).
#[tokio::test]
async fn an_upload_answered_early_audits_what_went_up_after_the_answer() {
    let real = "sk-ops-audit-early-0001";
    let e = body_secret(real).await;
    let key = e.sb.token("KEY");
    // The token at the end of 1 MiB sent in 64 KiB pieces, 20 ms apart: the answer is out
    // long before it.
    let mut chunks: Vec<Bytes> = (0..16).map(|_| Bytes::from(vec![b'x'; 64 << 10])).collect();
    chunks.push(Bytes::from(format!("\"{key}\"")));
    let line = paced_upload(&e, "/early", chunks).await;
    assert_eq!(line["unsealed"], json!(["KEY"]), "{line}");
    assert!(line["bytes_up"].as_u64().unwrap() > 1 << 20, "{line}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let got_real = || {
        let seen = e.echo.requests();
        seen.iter()
            .any(|r| String::from_utf8_lossy(&r.body).contains(real))
    };
    while !got_real() {
        assert!(
            std::time::Instant::now() < deadline,
            "the origin never got it"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A token its secret may not carry to this host, late in an upload the origin answered
/// early: the body is cut before it, and the line says so with the refusal's code (it read
/// as a success, counted `ok`, when written after the body's end; outside re-check).
#[tokio::test]
async fn a_refused_token_after_an_early_answer_is_audited_as_refused() {
    let e = setup(
        Some(&["api.example.test", "other.example.test"]),
        &[
            (
                "KEY",
                "sk-ops-late-ok-0001",
                Some(&["api.example.test"]),
                Some(&["body"]),
            ),
            (
                "FAR",
                "sk-ops-late-far-0001",
                Some(&["other.example.test"]),
                Some(&["body"]),
            ),
        ],
    )
    .await;
    let mut chunks = vec![Bytes::from(format!("\"{}\"", e.sb.token("KEY")))];
    chunks.extend((0..4).map(|_| Bytes::from(vec![b'x'; 64 << 10])));
    chunks.push(Bytes::from(format!("\"{}\"", e.sb.token("FAR"))));
    let line = paced_upload(&e, "/early-late", chunks).await;
    assert_eq!(line["code"], "secret_host_denied", "{line}");
    assert_eq!(line["decision"], "deny", "{line}");
    assert_eq!(line["refused"], json!(["FAR"]), "{line}");
    assert!(!e.h.audit_log().contains("sk-ops-late-far-0001"));
}

/// An h2 client that gives up on an upload before its answer resets the stream, and hyper
/// drops the request's future: its line was never written, though the origin had the real
/// value (outside re-check). Now it is, with status 499, once the body ended.
#[tokio::test]
async fn an_upload_abandoned_before_its_answer_is_audited() {
    let real = "sk-ops-audit-abandoned-0001";
    let e = body_secret(real).await;
    let key = e.sb.token("KEY");
    let mut chunks = vec![Bytes::from(format!("\"{key}\""))];
    chunks.extend((0..60).map(|_| Bytes::from(vec![b'x'; 64 << 10])));
    let body = pc::paced(chunks, std::time::Duration::from_millis(50));
    let req = http::Request::post("https://api.example.test/abandoned")
        .body(body)
        .unwrap();
    let mut c = pc::h2(e.h.proxy, &e.sb, API).await;
    c.ready().await.unwrap();
    let sent = tokio::spawn(c.send_request(req));
    // Well into the upload (the token went first), long before its end (3 s).
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    sent.abort(); // the client resets the stream
    let line = request_line(&e.h, "/abandoned").await;
    assert_eq!(line["status"], 499, "{line}");
    assert!(line["bytes_up"].as_u64().unwrap() > 0, "{line}");
    assert_eq!(line["unsealed"], json!(["KEY"]), "{line}");
}

/// An answer sealgate refuses after its head came in (a 206 where answers are scrubbed), while
/// the upload is still going up: the upload stops there, and the line names what it unsealed
/// (it went on unsealing after a line that said `"unsealed": []`; review).
#[tokio::test]
async fn an_upload_whose_early_answer_is_refused_stops_and_is_audited() {
    let real = "sk-ops-audit-refused-answer-0001";
    let e = body_secret(real).await;
    let key = e.sb.token("KEY");
    // The token first, then the token again in every piece, 50 ms apart (~1.5 s in all).
    let chunks = token_pieces(&key, 30, 16 << 10);
    let a = send_paced(&e, "/early-206", chunks, Duration::from_millis(50)).await;
    assert_eq!(a.status, StatusCode::BAD_GATEWAY, "{}", a.text());
    let line = request_line(&e.h, "/early-206").await;
    assert_eq!(line["status"], 502, "{line}");
    assert_eq!(line["unsealed"], json!(["KEY"]), "{line}");
    let up = line["bytes_up"].as_u64().unwrap();
    assert!(up > 0 && up < 20 * (16 << 10), "the upload went on: {line}");
    // Whatever the origin got of the body is all there will be: nothing more goes up.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let seen = e.echo.requests();
    assert_eq!(seen.len(), 1, "the origin saw the upload end");
    let got = seen[0].body.len() as u64;
    assert!(got <= up, "the origin got {got} bytes after a line of {up}");
}

/// An upload answered early that then spends more than `max_unsealed_bytes` is cut there, and
/// its line says so (it read `allow`, and was counted, as if nothing had happened; review).
#[tokio::test]
async fn an_upload_over_its_budget_after_an_early_answer_is_audited_as_cut() {
    let e = body_secret_with("sk-ops-audit-budget-0001", "max_unsealed_bytes = 1024\n").await;
    let key = e.sb.token("KEY");
    let mut chunks = vec![Bytes::from(format!("\"{key}\"{}", "x".repeat(64 << 10)))];
    chunks.extend((0..4).map(|_| Bytes::from(format!("\"{key}\"").repeat(40))));
    let line = paced_upload(&e, "/early-budget", chunks).await;
    assert_eq!(line["code"], "request_too_large", "{line}");
    assert_ne!(line["decision"], "allow", "{line}");
    assert_eq!(line["unsealed"], json!(["KEY"]), "{line}");
    let rule = line["rule"].as_str().unwrap_or_default();
    assert!(rule.contains("proxy.max_unsealed_bytes"), "{line}");
}

/// An upload answered early whose secret is rotated while it goes up: the guard stops it at
/// the next value, and the line says why (it read `allow`; review).
#[tokio::test]
async fn an_upload_stopped_by_a_store_change_after_an_early_answer_is_audited_as_cut() {
    let real = "sk-ops-audit-rotated-0001";
    let e = body_secret(real).await;
    let key = e.sb.token("KEY");
    // 200 ms apart: the change lands while pieces are still to go (50 ms left ~2 s; h49a).
    let chunks = token_pieces(&key, 40, 16 << 10);
    let a = send_paced(&e, "/early-rotated", chunks, Duration::from_millis(200)).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    let hosts = ["api.example.test"];
    let locs = ["body"];
    e.h.secret(
        &e.store,
        "KEY",
        "sk-ops-audit-rotated-0002",
        Some(&hosts),
        Some(&locs),
    )
    .await;
    let line = request_line(&e.h, "/early-rotated").await;
    assert_eq!(line["code"], "unavailable", "{line}");
    assert_eq!(line["unsealed"], json!(["KEY"]), "{line}");
    let rule = line["rule"].as_str().unwrap_or_default();
    assert!(rule.contains("store changed"), "{line}");
}

/// A sandbox deleted while its upload, answered early, still goes up: the upload is cut and
/// its line written then, naming what left (the line waited for the client; review).
#[tokio::test]
async fn an_upload_answered_early_ends_with_its_sandbox_and_is_audited_then() {
    let real = "sk-ops-audit-deleted-0001";
    let e = body_secret(real).await;
    let mut chunks = token_pieces(&e.sb.token("KEY"), 1, 64 << 10);
    chunks.push(Bytes::from_static(b"late"));
    let a = send_paced(&e, "/early-deleted", chunks, Duration::from_secs(120)).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let path = format!("/v1/sandboxes/{}", e.sb.id);
    let (s, _) = e.h.api(Method::DELETE, &path, None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let line = request_line(&e.h, "/early-deleted").await;
    assert_eq!(line["code"], "sandbox_ended", "{line}");
    assert_eq!(line["unsealed"], json!(["KEY"]), "{line}");
    assert!(line["duration_ms"].as_u64().unwrap() < 20_000, "{line}");
}

/// An upload the origin answered early whose sandbox then sends nothing for the response
/// timeout is cut (`forward::orphan`), and its line says the sandbox stalled it (`request_timeout`):
/// its first cut lines named no code, then the upstream.
#[tokio::test]
async fn an_upload_answered_early_that_its_sandbox_stalls_is_cut_and_audited_as_such() {
    let secrets = [(
        "KEY",
        "sk-ops-audit-stalled-0001",
        Some(&["api.example.test"][..]),
        Some(&["body"][..]),
    )];
    let opts = Opts {
        upstream_toml: "response_timeout_secs = 2\n".into(),
        ..Opts::default()
    };
    let e = setup_with(Some(&["api.example.test"]), &secrets, opts).await;
    let mut chunks = token_pieces(&e.sb.token("KEY"), 1, 64 << 10);
    chunks.push(Bytes::from_static(b"late"));
    let a = send_paced(&e, "/early-stalled", chunks, Duration::from_secs(120)).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    let line = request_line(&e.h, "/early-stalled").await;
    assert_eq!(line["code"], "request_timeout", "{line}");
    assert_eq!(line["unsealed"], json!(["KEY"]), "{line}");
    let rule = line["rule"].as_str().unwrap_or_default();
    assert!(rule.contains("the sandbox sent none"), "{line}");
    assert!(line["duration_ms"].as_u64().unwrap() < 10_000, "{line}");
}

/// The daemon stops while an upload the origin answered early is still going up: the line,
/// waiting for the body's end, is in the file when the stop returns (the cut body ends it).
/// It was written by a task the stop did not wait for, so an exiting daemon lost it.
#[tokio::test]
async fn an_upload_still_going_up_at_the_stop_is_audited_before_the_stop_returns() {
    let mut e = body_secret_with("sk-ops-audit-stopped-0001", "shutdown_grace_secs = 1\n").await;
    // The token goes up first; the rest would come a minute later.
    let mut chunks = token_pieces(&e.sb.token("KEY"), 1, 64 << 10);
    chunks.push(Bytes::from_static(b"late"));
    let a = send_paced(&e, "/early-stopped", chunks, Duration::from_secs(60)).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    e.h.stop().await;
    let line = audit_events(&e.h.audit_log())
        .into_iter()
        .find(|v| v["kind"] == "request" && v["path"] == "/early-stopped");
    let line = line.expect("the upload's line is written before the stop returns");
    assert_eq!(line["unsealed"], json!(["KEY"]), "{line}");
    assert_eq!(line["status"], 200, "{line}");
}

/// h2 streams reset right after their head and first piece of a streamed body, before or
/// after their (early) answer: each gets its line at once. hyper drops such a request without
/// finishing its body, and the handle kept to take the body back kept it alive, so the
/// deferred lines waited for the daemon's stop (hostile review: 62 of 80 such requests).
#[tokio::test]
async fn streams_reset_right_after_their_head_are_audited_at_once() {
    let e = setup(
        Some(&["api.example.test"]),
        &[(
            "KEY",
            "sk-ops-audit-reset-0001",
            Some(&["api.example.test"]),
            Some(&["header", "body"]),
        )],
    )
    .await;
    let key = e.sb.token("KEY");
    let tcp = pc::connect(e.h.proxy, Some(&e.sb.proxy_auth()), API)
        .await
        .unwrap();
    let tls = pc::tls(tcp, &e.sb.ca_pem, "api.example.test", &[b"h2"])
        .await
        .unwrap();
    let (mut client, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);
    const N: usize = 40;
    for i in 0..N {
        client = client.ready().await.unwrap();
        let req = http::Request::post(format!("https://api.example.test/early-reset-{i}"))
            .header("authorization", format!("Bearer {key}"))
            .body(())
            .unwrap();
        let (answer, mut body) = client.send_request(req, false).unwrap();
        body.send_data(Bytes::from(vec![b'x'; 70_000]), false)
            .unwrap();
        tokio::time::sleep(Duration::from_millis(i as u64 % 3 * 5)).await;
        body.send_reset(h2::Reason::CANCEL);
        drop(answer);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let lines = audit_events(&e.h.audit_log())
            .into_iter()
            .filter(|v| {
                v["path"]
                    .as_str()
                    .is_some_and(|p| p.starts_with("/early-reset-"))
            })
            .count();
        if lines == N {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{lines} of {N} reset requests have a line"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What the line names as unsealed went upstream, and the metric counts exactly that: a
/// request whose upstream refused the connection names nothing (DESIGN: a failure writes zero
/// secret bytes); one whose body's only chunk holds an allowed token and then a refused one
/// sends neither; one that times out after it was sent names and counts its value (hostile
/// review: the first two named `KEY`, the last went uncounted).
#[tokio::test]
async fn the_line_and_the_metric_name_what_went_upstream() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead); // nothing listens there now: connection refused
    let opts = Opts {
        resolve: vec![("dead.example.test".into(), dead_addr)],
        upstream_toml: "response_timeout_secs = 1\n".into(),
        ..Opts::default()
    };
    let hosts = [
        "api.example.test",
        "other.example.test",
        "dead.example.test",
    ];
    let e = setup_with(
        Some(&hosts),
        &[
            (
                "KEY",
                "sk-ops-audit-truth-0001",
                Some(&["api.example.test", "dead.example.test"]),
                None,
            ),
            (
                "FAR",
                "sk-ops-audit-truth-0002",
                Some(&["other.example.test"]),
                None,
            ),
        ],
        opts,
    )
    .await;
    let (key, far) = (e.sb.token("KEY"), e.sb.token("FAR"));
    // Connection refused: nothing left.
    let mut c = pc::h1(e.h.proxy, &e.sb, "dead.example.test:443").await;
    let auth = format!("Bearer {key}");
    let a = pc::send1(
        &mut c,
        pc::get("/dead", "dead.example.test", &[("authorization", &auth)]),
    )
    .await;
    assert_eq!(a.status, StatusCode::BAD_GATEWAY, "{}", a.text());
    let line = request_line(&e.h, "/dead").await;
    assert_eq!(line["unsealed"], json!([]), "{line}");
    // One chunk: KEY's token, then FAR's (refused here): the chunk is dropped whole.
    let chunk = format!("\"{key}\" \"{far}\" {}", "x".repeat(70_000));
    let mut c = pc::h1(e.h.proxy, &e.sb, API).await;
    let req = pc::post_chunked("/mixed", "api.example.test", &[], vec![Bytes::from(chunk)]);
    let a = pc::send1(&mut c, req).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN, "{}", a.text());
    let line = request_line(&e.h, "/mixed").await;
    assert_eq!(line["unsealed"], json!([]), "{line}");
    assert_eq!(line["refused"], json!(["FAR"]), "{line}");
    let m = scrape(&e.h).await;
    assert!(!m.contains("sealgate_secrets_unsealed_total{"), "{m}");
    // Sent, then no answer in time (504): named and counted.
    let mut c = pc::h1(e.h.proxy, &e.sb, API).await;
    let a = pc::send1(
        &mut c,
        pc::get("/hang", "api.example.test", &[("authorization", &auth)]),
    )
    .await;
    assert_eq!(a.status, StatusCode::GATEWAY_TIMEOUT, "{}", a.text());
    let line = request_line(&e.h, "/hang").await;
    assert_eq!(line["unsealed"], json!(["KEY"]), "{line}");
    let m = scrape(&e.h).await;
    assert!(
        m.contains(
            r#"sealgate_secrets_unsealed_total{secret="KEY",host="api.example.test:443"} 1"#
        ),
        "{m}"
    );
}

/// An origin that reads a GET's head (the real value) and closes without answering, then is
/// gone: sealgate sends the GET again, that connection is refused, and the 502's line still
/// names the value the first attempt delivered (outside re-check: deciding from the last
/// attempt's connect error, the line said `"unsealed": []`).
#[tokio::test]
async fn a_retry_that_cannot_connect_still_names_what_the_first_attempt_delivered() {
    use tokio::io::AsyncReadExt as _;
    let pki = Arc::new(TestPki::new());
    let tls = tokio_rustls::TlsAcceptor::from(
        pki.server_config(crate::proxy_explicit::NAMES, &[b"http/1.1"]),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = listener.local_addr().unwrap();
    let heads = Arc::new(Mutex::new(Vec::<String>::new()));
    let seen = heads.clone();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        drop(listener); // the next connection is refused
        let mut s = tls.accept(tcp).await.unwrap();
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        seen.lock()
            .unwrap()
            .push(String::from_utf8_lossy(&head).into_owned());
    });
    let real = "sk-ops-audit-retried-0001";
    let secrets = [("KEY", real, Some(&["api.example.test"][..]), None)];
    let (h, sb) = crate::proxy_explicit::daemon_with_origin(pki, origin, &secrets).await;
    let auth = format!("Bearer {}", sb.token("KEY"));
    let mut c = pc::h1(h.proxy, &sb, API).await;
    let a = pc::send1(
        &mut c,
        pc::get("/retried", "api.example.test", &[("authorization", &auth)]),
    )
    .await;
    assert_eq!(a.status, StatusCode::BAD_GATEWAY, "{}", a.text());
    assert!(
        heads.lock().unwrap().iter().any(|h| h.contains(real)),
        "the origin got the value"
    );
    let line = request_line(&h, "/retried").await;
    assert_eq!(line["unsealed"], json!(["KEY"]), "{line}");
    let m = scrape(&h).await;
    assert!(
        m.contains(r#"sealgate_secrets_unsealed_total{secret="KEY""#),
        "{m}"
    );
}

/// A client that gives up while sealgate still waits for the upstream's TLS handshake: the
/// request never reached a connection, so its line names no value and nothing is counted
/// (outside re-check: it named and counted `KEY`).
#[tokio::test]
async fn a_request_abandoned_while_connecting_names_no_value() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            held.push(tcp); // accepted, never a TLS handshake
        }
    });
    let pki = Arc::new(TestPki::new());
    let secrets = [(
        "KEY",
        "sk-ops-audit-connecting-0001",
        Some(&["api.example.test"][..]),
        None,
    )];
    let (h, sb) = crate::proxy_explicit::daemon_with_origin(pki, origin, &secrets).await;
    let req = http::Request::get("https://api.example.test/connecting")
        .header("authorization", format!("Bearer {}", sb.token("KEY")))
        .body(pc::full(Bytes::new()))
        .unwrap();
    let mut c = pc::h2(h.proxy, &sb, API).await;
    c.ready().await.unwrap();
    let sent = tokio::spawn(c.send_request(req));
    tokio::time::sleep(Duration::from_millis(500)).await;
    sent.abort(); // the client resets the stream
    let line = request_line(&h, "/connecting").await;
    assert_eq!(line["status"], 499, "{line}");
    assert_eq!(line["unsealed"], json!([]), "{line}");
    let m = scrape(&h).await;
    assert!(!m.contains("sealgate_secrets_unsealed_total{"), "{m}");
}

/// A client that gives up while sealgate still collects its (held) body: the value unsealed
/// into the head never left, so the line names none and nothing is counted (it named `KEY`
/// as unsealed; review).
#[tokio::test]
async fn a_request_abandoned_before_it_was_sent_names_no_unsealed_value() {
    let e = setup(
        Some(&["api.example.test"]),
        &[(
            "KEY",
            "sk-ops-audit-unsent-0001",
            Some(&["api.example.test"]),
            Some(&["header"]),
        )],
    )
    .await;
    let key = e.sb.token("KEY");
    let body = pc::paced(
        vec![Bytes::from(vec![b'x'; 50]), Bytes::from(vec![b'y'; 50])],
        Duration::from_secs(30),
    );
    let req = http::Request::post("https://api.example.test/unsent")
        .header("authorization", format!("Bearer {key}"))
        .header("content-length", "100")
        .body(body)
        .unwrap();
    let mut c = pc::h2(e.h.proxy, &e.sb, API).await;
    c.ready().await.unwrap();
    let sent = tokio::spawn(c.send_request(req));
    tokio::time::sleep(Duration::from_millis(500)).await;
    sent.abort(); // the client resets the stream while its body is being collected
    let line = request_line(&e.h, "/unsent").await;
    // The reset reaches sealgate as a body cut short (400) or drops the request (499).
    assert!(
        [400, 499].contains(&line["status"].as_u64().unwrap()),
        "{line}"
    );
    assert_eq!(line["unsealed"], json!([]), "{line}");
    assert!(e.echo.requests().is_empty());
    let metrics = scrape(&e.h).await;
    assert!(
        !metrics.contains("sealgate_secrets_unsealed_total{"),
        "{metrics}"
    );
}

#[tokio::test]
async fn audit_log_names_the_rule_that_denied_a_request() {
    let e = setup(
        Some(&["api.example.test", "other.example.test"]),
        &[(
            "KEY",
            "sk-ops-audit-0001",
            Some(&["api.example.test"]),
            Some(&["header"]),
        )],
    )
    .await;
    let key = e.sb.token("KEY");
    let mut c = pc::h1(e.h.proxy, &e.sb, API).await;
    assert_eq!(
        echo_get(&mut c, "api.example.test", &key).await.status,
        StatusCode::OK
    );
    let mut o = pc::h1(e.h.proxy, &e.sb, OTHER).await;
    assert_eq!(
        echo_get(&mut o, "other.example.test", &key).await.status,
        StatusCode::FORBIDDEN
    );
    pc::connect(
        e.h.proxy,
        Some(&e.sb.proxy_auth()),
        "denied.example.test:443",
    )
    .await
    .unwrap_err();

    let events = audit_events(&e.h.audit_log());
    let find = |pred: &dyn Fn(&Value) -> bool| {
        events
            .iter()
            .find(|v| pred(v))
            .cloned()
            .unwrap_or_else(|| panic!("no such audit event in {events:#?}"))
    };
    let ok = find(&|v| v["kind"] == "request" && v["decision"] == "allow");
    assert_eq!(ok["unsealed"], json!(["KEY"]));
    assert_eq!(ok["host"], API);
    assert_eq!(ok["sandbox"], e.sb.id.as_str());

    let denied = find(&|v| v["code"] == "secret_host_denied");
    assert_eq!(denied["decision"], "deny");
    assert_eq!(denied["status"], 403);
    assert_eq!(denied["host"], OTHER);
    assert_eq!(denied["path"], "/echo");
    assert_eq!(
        denied["refused"],
        json!(["KEY"]),
        "the secret that got it blocked"
    );
    let rule = denied["rule"].as_str().unwrap();
    assert!(
        rule.contains(
            "secret KEY allowed_hosts [api.example.test] does not match other.example.test:443"
        ),
        "{rule}"
    );
    assert!(rule.contains("header"), "{rule}");

    let egress = find(&|v| v["code"] == "egress_denied");
    assert_eq!(egress["method"], "CONNECT");
    assert_eq!(egress["host"], "denied.example.test:443");
    assert!(
        egress["rule"]
            .as_str()
            .unwrap()
            .contains("egress_allowlist"),
        "{egress}"
    );

    // Admin changes: who, what, which secret name; never the value.
    let set = find(&|v| v["kind"] == "admin" && v["action"] == "secret.set");
    assert_eq!(set["secret"], "KEY");
    assert_eq!(set["store"], e.store.as_str());
    assert!(set["actor"]
        .as_str()
        .unwrap()
        .starts_with("admin-token@127.0.0.1:"));
    assert!(set["ts"].is_string());
    find(&|v| {
        v["kind"] == "admin" && v["action"] == "sandbox.create" && v["sandbox"] == e.sb.id.as_str()
    });
    e.h.assert_logs_clean();
}

#[tokio::test]
async fn audit_log_says_why_a_token_travelled_sealed() {
    let opts = Opts {
        proxy_toml: "on_disallowed_token = \"forward_sealed\"\n".into(),
        ..Opts::default()
    };
    let e = setup_with(
        Some(&["api.example.test", "other.example.test"]),
        &[(
            "KEY",
            "sk-ops-audit-0002",
            Some(&["api.example.test"]),
            Some(&["header"]),
        )],
        opts,
    )
    .await;
    let key = e.sb.token("KEY");
    let mut o = pc::h1(e.h.proxy, &e.sb, OTHER).await;
    assert_eq!(
        echo_get(&mut o, "other.example.test", &key).await.status,
        StatusCode::OK
    );
    assert!(
        e.echo.received_bytes_contain(key.as_bytes()),
        "forwarded sealed"
    );
    let events = audit_events(&e.h.audit_log());
    let ev = events
        .iter()
        .find(|v| v["kind"] == "request" && v["host"] == OTHER)
        .expect("request event");
    assert_eq!(ev["decision"], "allow");
    assert_eq!(ev["refused"], json!(["KEY"]));
    assert!(
        ev["rule"].as_str().unwrap().contains(
            "forwarded sealed: secret KEY allowed_hosts [api.example.test] does not match"
        ),
        "{ev}"
    );
}

// ---- reload via the admin API ----------------------------------------------------------------------

#[tokio::test]
async fn reload_applies_a_new_limit_keeps_live_tunnels_and_refuses_an_invalid_file() {
    let opts = Opts {
        proxy_toml: "max_tunnels_per_sandbox = 3\n".into(),
        ..Opts::default()
    };
    let e = setup_with(
        Some(&["api.example.test"]),
        &[("KEY", "sk-ops-reload-0001", None, Some(&["header"]))],
        opts,
    )
    .await;
    let key = e.sb.token("KEY");
    let path = e.h.dir.path().join("proxy.toml");
    let text = e.h.config_text.clone();
    let mut live = pc::h1(e.h.proxy, &e.sb, API).await;
    let _live2 = pc::h1(e.h.proxy, &e.sb, API).await;
    assert_eq!(
        echo_get(&mut live, "api.example.test", &key).await.status,
        StatusCode::OK
    );

    let lowered = text.replace("max_tunnels_per_sandbox = 3", "max_tunnels_per_sandbox = 2");
    std::fs::write(&path, &lowered).unwrap();
    let (s, v) = e.h.api(Method::POST, "/v1/admin/reload", None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["needs_restart"], json!([]));
    let r = pc::connect(e.h.proxy, Some(&e.sb.proxy_auth()), API)
        .await
        .expect_err("the new limit applies to new tunnels");
    assert_eq!(r.status, 429);
    let a = echo_get(&mut live, "api.example.test", &key).await;
    assert_eq!(a.status, StatusCode::OK, "live tunnels survive a reload");
    assert!(e.echo.received_bytes_contain(b"sk-ops-reload-0001"));

    // A key that cannot change live is applied at the next restart, and said so.
    let restart = lowered.replace(
        "max_tunnels_per_sandbox = 2",
        "max_tunnels_per_sandbox = 2\npublic_host = \"10.9.9.9\"",
    );
    std::fs::write(&path, &restart).unwrap();
    let (s, v) = e.h.api(Method::POST, "/v1/admin/reload", None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["needs_restart"], json!(["proxy.public_host"]));
    // Still pending on the next reload: the daemon runs with the old value until a restart.
    let (_, v) = e.h.api(Method::POST, "/v1/admin/reload", None).await;
    assert_eq!(v["needs_restart"], json!(["proxy.public_host"]), "{v}");
    // The file put back as the daemon runs it: nothing waits for a restart any more.
    std::fs::write(&path, &lowered).unwrap();
    let (_, v) = e.h.api(Method::POST, "/v1/admin/reload", None).await;
    assert_eq!(v["needs_restart"], json!([]), "{v}");

    // An invalid file is refused and the running configuration kept.
    let invalid = lowered.replace(
        "max_tunnels_per_sandbox = 2",
        "max_tunnels_per_sandbox = 0\nbogus_key = 1",
    );
    std::fs::write(&path, &invalid).unwrap();
    let (s, v) = e.h.api(Method::POST, "/v1/admin/reload", None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["code"], "invalid_request");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("bogus_key"), "{msg}");
    // Audited as refused (the fifth reload); the reloads that took carry no outcome.
    let reloads = || -> Vec<serde_json::Value> {
        e.h.audit_log()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .filter(|l: &serde_json::Value| l["action"] == "config.reload")
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while reloads().len() < 5 {
        assert!(Instant::now() < deadline, "{:?}", reloads());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reloads = reloads();
    assert_eq!(reloads[4]["outcome"], "refused", "{reloads:?}");
    assert!(reloads[..reloads.len() - 1]
        .iter()
        .all(|l| l.get("outcome").is_none()));
    let r = pc::connect(e.h.proxy, Some(&e.sb.proxy_auth()), API)
        .await
        .expect_err("limit 2 is still in force");
    assert_eq!(r.status, 429);
    assert_eq!(
        echo_get(&mut live, "api.example.test", &key).await.status,
        StatusCode::OK
    );

    // Raising it again admits a third tunnel.
    std::fs::write(&path, &text).unwrap();
    let (s, _) = e.h.api(Method::POST, "/v1/admin/reload", None).await;
    assert_eq!(s, StatusCode::OK);
    let mut third = pc::h1(e.h.proxy, &e.sb, API).await;
    assert_eq!(
        echo_get(&mut third, "api.example.test", &key).await.status,
        StatusCode::OK
    );
    let reloads = audit_events(&e.h.audit_log())
        .into_iter()
        .filter(|v| v["action"] == "config.reload")
        .count();
    assert_eq!(reloads, 6, "every reload request is audited");
}

// ---- the real binary -------------------------------------------------------------------------------

/// A `sealgate serve` child process on loopback port 0, killed (SIGKILL) on drop.
struct Bin {
    child: Child,
    dir: tempfile::TempDir,
    admin: String,
    proxy: SocketAddr,
    token: String,
    stderr: Arc<Mutex<String>>,
    /// Copies the child's stderr into `stderr` until the pipe's end ([`Bin::wait_exit`] waits
    /// for it, so that what the daemon wrote before exiting is there to read).
    reader: Option<std::thread::JoinHandle<()>>,
    http: Client<HttpConnector, Full<Bytes>>,
}

struct BinOpts<'a> {
    echo: SocketAddr,
    pki: &'a TestPki,
    proxy_toml: &'a str,
}

fn bin_config(dir: &Path, o: &BinOpts<'_>) -> String {
    format!(
        "data_dir = \"{d}/data\"\ncert_dir = \"{d}/certs\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [proxy]\nlisten = \"127.0.0.1:0\"\n{p}\n\n[upstream]\nca_files = [\"{ca}\"]\n\
         allow_private_cidrs = [\"127.0.0.0/8\"]\n\n[upstream.resolve]\n\"api.example.test\" = \"{echo}\"\n\n\
         [log]\nlevel = \"info\"\n\n[audit]\npath = \"{d}/audit.log\"\n",
        d = dir.display(),
        p = o.proxy_toml,
        ca = o.pki.ca_file.display(),
        echo = o.echo,
    )
}

impl Bin {
    async fn spawn(o: &BinOpts<'_>) -> Bin {
        Bin::spawn_signalled(o, &[], &[]).await
    }

    /// With signals `at_pause`, the daemon pauses for 2 s at the top of `main` (the `main` test
    /// hook) and is sent them as soon as it says so.
    async fn spawn_signalled(
        o: &BinOpts<'_>,
        at_pause: &'static [i32],
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Bin {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("proxy.toml");
        std::fs::write(&cfg, bin_config(dir.path(), o)).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sealgate"));
        cmd.arg("--config")
            .arg(&cfg)
            .arg("serve")
            .env_remove("SEALGATE_MASTER_KEY")
            .env_remove("SEALGATE_ADMIN_TOKEN")
            .env_remove("SEALGATE_CONFIG")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if !at_pause.is_empty() {
            cmd.env("SEALGATE_TEST_PAUSE_AFTER", "main");
        }
        cmd.envs(env.iter().copied());
        let mut child = cmd.spawn().expect("spawn sealgate");
        let pid = child.id() as i32;
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        let reader = std::thread::spawn(move || {
            for line in std::io::BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                if line.ends_with("(test hook)") {
                    for &sig in at_pause {
                        // SAFETY: kill(2) on our own child's pid; no memory is involved.
                        unsafe { libc::kill(pid, sig) };
                    }
                }
                let mut all = sink.lock().unwrap();
                all.push_str(&line);
                all.push('\n');
                drop(all);
                let _ = tx.send(line);
            }
        });
        let (admin, proxy) = tokio::task::spawn_blocking(move || read_addrs(&rx))
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("no addresses on stderr: {}", stderr.lock().unwrap()));
        let token = std::fs::read_to_string(dir.path().join("data/admin.token"))
            .unwrap()
            .trim()
            .to_owned();
        Bin {
            child,
            dir,
            admin,
            proxy,
            token,
            stderr,
            reader: Some(reader),
            // A connection per call, as in `support::daemon::Harness` (which says why).
            http: Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(0)
                .build(HttpConnector::new()),
        }
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("proxy.toml")
    }

    async fn api(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.admin))
            .header("authorization", format!("Bearer {}", self.token))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(
                body.map(|b| b.to_string()).unwrap_or_default(),
            )))
            .unwrap();
        let resp = self.http.request(req).await.expect("admin API reachable");
        let s = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (s, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    /// One series of the binary's `/metrics` (0 when absent).
    async fn metric(&self, series: &str) -> f64 {
        let req = Request::builder()
            .uri(format!("{}/metrics", self.admin))
            .header("authorization", format!("Bearer {}", self.token))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = self.http.request(req).await.expect("admin API reachable");
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        metric(&String::from_utf8_lossy(&bytes), series)
    }

    /// A store allowing api.example.test with one header secret, and a sandbox of it.
    async fn sandbox(&self, value: &str) -> SandboxCreds {
        let (s, v) = self
            .api(
                Method::POST,
                "/v1/stores",
                Some(json!({"name": "s", "egress_allowlist": ["api.example.test"]})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        let id = v["id"].as_str().unwrap().to_owned();
        let (s, v) = self
            .api(
                Method::PUT,
                &format!("/v1/stores/{id}/secrets/KEY"),
                Some(json!({"value": value, "locations": ["header"]})),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let (s, v) = self
            .api(
                Method::POST,
                "/v1/sandboxes",
                Some(json!({"secret_store": "s"})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        SandboxCreds::from_answer(&v)
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        let rc = unsafe { libc::kill(self.child.id() as i32, sig) };
        assert_eq!(rc, 0, "kill({sig})");
    }

    async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                // The last lines may still be in the pipe: wait for the reader to reach its end
                // (review h39a: "shutdown complete" was missing 2 times in 195 under load).
                while self.reader.as_ref().is_some_and(|r| !r.is_finished()) {
                    assert!(
                        Instant::now() < deadline,
                        "stderr still open after the exit"
                    );
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "sealgate did not exit within {limit:?}; stderr:\n{}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Fails if `value` was ever written to stderr or the audit log.
    fn assert_clean(&self, value: &str) {
        assert!(!self.stderr().contains(value), "secret value in stderr");
        let audit = std::fs::read_to_string(self.dir.path().join("audit.log")).unwrap_or_default();
        assert!(!audit.contains(value), "secret value in the audit log");
    }
}

impl Drop for Bin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads stderr lines until both the admin and the proxy address were printed.
fn read_addrs(rx: &std::sync::mpsc::Receiver<String>) -> Option<(String, SocketAddr)> {
    let (mut admin, mut proxy) = (None, None);
    let deadline = Instant::now() + Duration::from_secs(30);
    while admin.is_none() || proxy.is_none() {
        let left = deadline.checked_duration_since(Instant::now())?;
        let line = rx.recv_timeout(left).ok()?;
        let t = line.trim();
        if let Some(a) = t.strip_prefix("admin API:") {
            admin = Some(a.trim().to_owned());
        } else if let Some(p) = t.strip_prefix("proxy:") {
            proxy = p.trim().parse().ok();
        }
    }
    Some((admin?, proxy?))
}

async fn upstream() -> (Arc<TestPki>, Echo) {
    let pki = Arc::new(TestPki::new());
    let echo = Echo::start_tls(pki.server_config(&["api.example.test"], &[])).await;
    (pki, echo)
}

/// A `sealgate serve` with `proxy_toml` in its `[proxy]` section, in front of a fresh TLS
/// echo origin (kept alive by the caller, with its PKI).
async fn bin_with(proxy_toml: &str) -> (Arc<TestPki>, Echo, Bin) {
    let (pki, echo) = upstream().await;
    let o = BinOpts {
        echo: echo.addr,
        pki: &pki,
        proxy_toml,
    };
    let b = Bin::spawn(&o).await;
    (pki, echo, b)
}

/// CONNECT until the answer is `status` (a reload by signal applies asynchronously).
async fn await_connect_status(b: &Bin, sb: &SandboxCreds, status: u16) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let got = match pc::connect(b.proxy, Some(&sb.proxy_auth()), API).await {
            Ok(_) => 200,
            Err(r) => r.status,
        };
        if got == status {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "CONNECT answers {got}, expected {status}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn sighup_applies_a_new_limit_without_dropping_live_tunnels_and_refuses_an_invalid_file() {
    let (_pki, echo, mut b) = bin_with("max_tunnels_per_sandbox = 2").await;
    let sb = b.sandbox("sk-ops-sighup-0001").await;
    let key = sb.token("KEY");
    let mut live = pc::h1(b.proxy, &sb, API).await;
    assert_eq!(
        echo_get(&mut live, "api.example.test", &key).await.status,
        StatusCode::OK
    );
    // Under limit 2, a second tunnel is admitted.
    drop(
        pc::connect(b.proxy, Some(&sb.proxy_auth()), API)
            .await
            .expect("2nd tunnel"),
    );

    let text = std::fs::read_to_string(b.config_path()).unwrap();
    let lowered = text.replace("max_tunnels_per_sandbox = 2", "max_tunnels_per_sandbox = 1");
    std::fs::write(b.config_path(), &lowered).unwrap();
    b.signal(libc::SIGHUP);
    await_connect_status(&b, &sb, 429).await;
    let a = echo_get(&mut live, "api.example.test", &key).await;
    assert_eq!(a.status, StatusCode::OK, "the live tunnel survived SIGHUP");
    // Audited like a reload through the API (found from outside: it was not).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let audit = std::fs::read_to_string(b.dir.path().join("audit.log")).unwrap_or_default();
        if audit.contains(r#""action":"config.reload","store":null,"secret":null,"sandbox":null,"actor":"signal:SIGHUP""#) {
            break;
        }
        assert!(Instant::now() < deadline, "no config.reload line:\n{audit}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(echo.received_bytes_contain(b"sk-ops-sighup-0001"));

    std::fs::write(
        b.config_path(),
        "[proxy]\nmax_tunnels_per_sandbox = \"many\"\n",
    )
    .unwrap();
    b.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !b.stderr().contains("reload refused") {
        assert!(
            Instant::now() < deadline,
            "no refusal logged:\n{}",
            b.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(b.child.try_wait().unwrap().is_none(), "still running");
    await_connect_status(&b, &sb, 429).await;
    assert_eq!(
        echo_get(&mut live, "api.example.test", &key).await.status,
        StatusCode::OK
    );

    b.signal(libc::SIGTERM);
    drop(live);
    assert!(b.wait_exit(Duration::from_secs(10)).await.success());
    b.assert_clean("sk-ops-sighup-0001");
}

/// Writes `token` into the daemon's admin token file the way docs/operations.md says (a new
/// file, mode `mode`, renamed over the old one).
fn rotate_token_file(b: &Bin, token: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    let file = b.dir.path().join("data/admin.token");
    let new = b.dir.path().join("data/admin.token.new");
    std::fs::write(&new, format!("{token}\n")).unwrap();
    std::fs::set_permissions(&new, std::fs::Permissions::from_mode(mode)).unwrap();
    std::fs::rename(&new, &file).unwrap();
}

/// The status `GET /v1/stores` answers with `token`.
async fn stores_status(b: &mut Bin, token: &str) -> StatusCode {
    let running = std::mem::replace(&mut b.token, token.to_owned());
    let (s, _) = b.api(Method::GET, "/v1/stores", None).await;
    b.token = running;
    s
}

/// Found from outside: the token file was read at start only, so a rotation needed a restart
/// (an outage that ends isolated sandboxes) and a reload answered as if it had applied it.
#[tokio::test]
async fn a_rotated_admin_token_file_is_taken_by_sighup_and_by_the_reload_call() {
    let (_pki, _echo, mut b) = bin_with("").await;
    let old = b.token.clone();
    let (first, second) = ("1f".repeat(32), "2e".repeat(32));

    rotate_token_file(&b, &first, 0o600);
    b.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(5);
    while stores_status(&mut b, &first).await != StatusCode::OK {
        assert!(
            Instant::now() < deadline,
            "SIGHUP did not take the new token"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(stores_status(&mut b, &old).await, StatusCode::UNAUTHORIZED);
    b.token = first.clone();

    // A file open to others is refused, and the running token stays.
    rotate_token_file(&b, &second, 0o644);
    let (s, v) = b.api(Method::POST, "/v1/admin/reload", None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("mode 644") && msg.contains("admin.token"),
        "{msg}"
    );
    assert_eq!(
        stores_status(&mut b, &second).await,
        StatusCode::UNAUTHORIZED
    );

    rotate_token_file(&b, &second, 0o600);
    let (s, v) = b.api(Method::POST, "/v1/admin/reload", None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["admin_token"], "replaced", "{v}");
    assert_eq!(
        stores_status(&mut b, &first).await,
        StatusCode::UNAUTHORIZED
    );
    b.token = second.clone();
    let (_, v) = b.api(Method::POST, "/v1/admin/reload", None).await;
    assert_eq!(v["admin_token"], "unchanged", "{v}");

    let audit = || std::fs::read_to_string(b.dir.path().join("audit.log")).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(5);
    while audit().matches(r#""action":"admin_token.replace""#).count() < 2 {
        assert!(
            Instant::now() < deadline,
            "two admin_token.replace lines:\n{}",
            audit()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(audit().contains(r#""action":"admin_token.replace","store":null,"secret":null,"sandbox":null,"actor":"signal:SIGHUP""#));
    b.signal(libc::SIGTERM);
    assert!(b.wait_exit(Duration::from_secs(10)).await.success());
    for t in [&old, &first, &second] {
        b.assert_clean(t);
    }
}

/// Found by CI: a SIGHUP sent just after the daemon printed its addresses killed it, because
/// the reload task that installed the handler had not run yet (and SIGTERM's handler came
/// after the summary, so a stop in that window skipped the graceful drain); and from outside
/// (h39b): one sent within 3 ms of exec, before any handler, killed it too. The signals are
/// now caught from `main`'s first statement and handed to the daemon's handlers before the
/// start; the `main` hook holds the process right there. Each arrives once: the stop is one
/// graceful stop, not the second signal's exit.
#[tokio::test]
#[cfg_attr(
    not(feature = "crash-points"),
    ignore = "needs `cargo test --features crash-points` (scripts/test)"
)]
async fn signals_sent_while_the_daemon_starts_reload_it_or_stop_it_gracefully() {
    let (pki, echo) = upstream().await;
    let o = BinOpts {
        echo: echo.addr,
        pki: &pki,
        proxy_toml: "",
    };
    let mut b = Bin::spawn_signalled(&o, &[libc::SIGHUP], &[]).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !b.stderr().contains("configuration reloaded") {
        assert!(Instant::now() < deadline, "no reload: {}", b.stderr());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (s, v) = b.api(Method::GET, "/v1/stores", None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    b.signal(libc::SIGTERM);
    assert!(b.wait_exit(Duration::from_secs(10)).await.success());

    // One stop, also for SIGTERM and SIGINT sent together (re-check h39f: the second signal's
    // immediate exit, each stream holding its own).
    for signals in [&[libc::SIGTERM][..], &[libc::SIGTERM, libc::SIGINT]] {
        let mut b = Bin::spawn_signalled(&o, signals, &[]).await;
        let st = b.wait_exit(Duration::from_secs(10)).await;
        assert!(st.success(), "{st:?}: {}", b.stderr());
        assert!(b.stderr().contains("shutdown complete"), "{}", b.stderr());
        assert!(!b.stderr().contains("second signal"), "{}", b.stderr());
    }
}

/// Waits (5 s at most) until the file at `path` holds `needle`.
async fn until_file_holds(path: &Path, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !std::fs::read_to_string(path)
        .unwrap_or_default()
        .contains(needle)
    {
        assert!(
            Instant::now() < deadline,
            "{} has no {needle:?}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// SIGUSR1 reopens the audit log (the logrotate habit of other daemons) and SIGUSR2 is
/// logged; each had ended the daemon without the drain (outside pass h39b).
#[tokio::test]
async fn sigusr1_reopens_the_audit_log_and_sigusr2_changes_nothing() {
    let (_pki, _echo, mut b) = bin_with("").await;
    let wait_for = |b: &Bin, what: &str| {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !b.stderr().contains(what) {
            assert!(Instant::now() < deadline, "no {what:?}: {}", b.stderr());
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    b.signal(libc::SIGUSR2);
    wait_for(&b, "SIGUSR2 does nothing");
    let (log, rotated) = (
        b.dir.path().join("audit.log"),
        b.dir.path().join("audit.log.1"),
    );
    let (s, v) = b
        .api(Method::POST, "/v1/stores", Some(json!({"name": "before"})))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    until_file_holds(&log, "store.create").await;
    std::fs::rename(&log, &rotated).unwrap();
    b.signal(libc::SIGUSR1);
    wait_for(&b, "SIGUSR1: audit log reopened");
    let (s, v) = b
        .api(Method::POST, "/v1/stores", Some(json!({"name": "after"})))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    until_file_holds(&log, r#""store_name":"after""#).await;
    assert!(!std::fs::read_to_string(&rotated)
        .unwrap()
        .contains(r#""store_name":"after""#));
    b.signal(libc::SIGTERM);
    assert!(b.wait_exit(Duration::from_secs(10)).await.success());
}

/// `Type=notify` (packaging/sealgate.service): the daemon says `READY=1` on `NOTIFY_SOCKET`
/// once it answers — systemd then queues a `reload` behind the start instead of signalling a
/// process that could not yet take SIGHUP (outside pass h39b) — and `STOPPING=1` when a stop
/// begins.
#[tokio::test]
async fn the_service_manager_hears_ready_once_the_daemon_answers_and_stopping_at_the_stop() {
    let (pki, echo) = upstream().await;
    let o = BinOpts {
        echo: echo.addr,
        pki: &pki,
        proxy_toml: "",
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let recv = move || {
        let mut buf = [0u8; 256];
        let n = sock.recv(&mut buf).expect("a notification");
        (String::from_utf8_lossy(&buf[..n]).into_owned(), sock)
    };
    let ready = tokio::task::spawn_blocking(recv);
    let mut b = Bin::spawn_signalled(&o, &[], &[("NOTIFY_SOCKET", path.as_os_str())]).await;
    let (msg, sock) = ready.await.unwrap();
    assert!(msg.lines().any(|l| l == "READY=1"), "{msg}");
    let (s, v) = b.api(Method::GET, "/v1/stores", None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let stopping = tokio::task::spawn_blocking(move || {
        let mut buf = [0u8; 256];
        let n = sock.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    });
    b.signal(libc::SIGTERM);
    let msg = stopping.await.unwrap();
    assert!(msg.lines().any(|l| l == "STOPPING=1"), "{msg}");
    assert!(b.wait_exit(Duration::from_secs(10)).await.success());
}

/// Starts a `/slow` response, sends SIGTERM after its first chunk, and returns (bytes received,
/// time from SIGTERM to the end of the body, time from SIGTERM to exit, exit status).
async fn sigterm_during_stream(
    grace_secs: u64,
    ms: u64,
    chunks: u64,
) -> (usize, Duration, Duration, ExitStatus) {
    let (pki, echo) = upstream().await;
    let toml = format!("shutdown_grace_secs = {grace_secs}");
    let o = BinOpts {
        echo: echo.addr,
        pki: &pki,
        proxy_toml: &toml,
    };
    let mut b = Bin::spawn(&o).await;
    let sb = b.sandbox("sk-ops-sigterm-0001").await;
    let mut c = pc::h1(b.proxy, &sb, API).await;
    c.ready().await.unwrap();
    let resp = c
        .send_request(pc::get(
            &format!("/slow?ms={ms}&chunks={chunks}"),
            "api.example.test",
            &[],
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    let mut got = first.len();
    let t0 = Instant::now();
    b.signal(libc::SIGTERM);
    let proxy = b.proxy;
    let reader = tokio::spawn(async move {
        while let Some(Ok(f)) = body.frame().await {
            if let Ok(d) = f.into_data() {
                got += d.len();
            }
        }
        (got, t0.elapsed())
    });
    // The listener closes at once: new sandbox connections are refused (10 s: every worker's
    // descriptor of it must close, on a loaded machine too).
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(proxy).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "proxy still accepting after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = b.wait_exit(Duration::from_secs(grace_secs + 10)).await;
    let exited = t0.elapsed();
    let (got, body_done) = reader.await.unwrap();
    b.assert_clean("sk-ops-sigterm-0001");
    (got, body_done, exited, status)
}

#[tokio::test]
async fn sigterm_lets_a_slow_streaming_response_complete_within_the_grace_period() {
    // 8 chunks of 1 KiB, 250 ms apart: ~1.75 s of stream left when SIGTERM arrives; grace 30 s.
    let (got, body_done, exited, status) = sigterm_during_stream(30, 250, 8).await;
    assert_eq!(got, 8 * 1024, "the whole response arrived");
    assert!(status.success(), "{status:?}");
    assert!(body_done >= Duration::from_millis(1500), "{body_done:?}");
    assert!(
        exited < Duration::from_secs(20),
        "exit waited for the stream, not the full grace: {exited:?}"
    );
}

#[tokio::test]
async fn sigterm_cuts_a_stream_that_outlasts_the_grace_period() {
    // 60 chunks 300 ms apart (~18 s) against a 1 s grace: exiting well before the stream's end
    // (with slack for a loaded machine) shows the grace, not the stream, bounded the exit.
    let (got, _, exited, status) = sigterm_during_stream(1, 300, 60).await;
    assert!(got < 60 * 1024, "the stream was cut");
    assert!(status.success(), "{status:?}");
    assert!(exited < Duration::from_secs(10), "{exited:?}");
}

/// A request the stop cuts when `shutdown_grace_secs` runs out is audited as the stop's (503,
/// "cut by the daemon's stop"), not as one its client gave up on (499: outside pass).
#[tokio::test]
async fn a_request_the_stop_cuts_is_audited_as_the_stops() {
    let (_pki, _echo, mut b) = bin_with("shutdown_grace_secs = 1").await;
    let sb = b.sandbox("sk-ops-cut-0001").await;
    let mut c = pc::h1(b.proxy, &sb, API).await;
    c.ready().await.unwrap();
    // The head comes 3 s late: past the 1 s grace.
    let pending = c.send_request(pc::get("/hang", "api.example.test", &[]));
    let waiting = tokio::spawn(async move {
        let _ = pending.await;
    });
    // Time for the request to reach the daemon on a loaded machine (review h49a: at 300 ms
    // an unparsed request meant an idle connection closed, and no line); the stop at 0.8 s
    // plus the 1 s grace still cuts it before its 3 s.
    tokio::time::sleep(Duration::from_millis(800)).await;
    b.signal(libc::SIGTERM);
    assert!(b.wait_exit(Duration::from_secs(15)).await.success());
    let _ = waiting.await;
    let audit = std::fs::read_to_string(b.dir.path().join("audit.log")).unwrap();
    let line = audit
        .lines()
        .find(|l| l.contains("\"/hang\""))
        .unwrap_or_else(|| panic!("no line for the cut request:\n{audit}"));
    assert!(
        line.contains("\"status\":503") && line.contains("cut by the daemon's stop"),
        "{line}"
    );
    b.assert_clean("sk-ops-cut-0001");
}

/// An audit log that stops taking lines (its reader stopped: a FIFO nobody reads, as a hung
/// mount or a stalled log shipper): the proxy keeps answering, the daemon log says lines are
/// being dropped while it lasts, and SIGTERM still ends the process — within the grace and
/// `AUDIT_STOP_WAIT` (5 s). It waited for ever, a second signal too (outside pass).
#[tokio::test]
async fn a_stalled_audit_log_is_warned_about_and_does_not_hold_the_stop() {
    use std::os::unix::fs::OpenOptionsExt as _;
    let (_pki, _echo, mut b) = bin_with("shutdown_grace_secs = 1").await;
    let log = b.dir.path().join("audit.log");
    std::fs::rename(&log, b.dir.path().join("audit.log.1")).unwrap();
    let fifo = std::ffi::CString::new(log.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo(3) on a NUL-terminated path we own.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0, "mkfifo");
    // A reader that never reads (non-blocking open: it needs no writer yet).
    let _reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&log)
        .unwrap();
    b.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !b.stderr().contains("configuration reloaded") {
        assert!(Instant::now() < deadline, "no reopen:\n{}", b.stderr());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Refused CONNECTs, each one audit line, until the pipe (64 KiB) and the queue (8,192
    // lines) are full and the warning comes (the reopen onto the FIFO follows the reload's
    // line; a loaded machine gets as long as it needs, within the deadline).
    let proxy = b.proxy;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !b.stderr().contains("audit queue full") {
        assert!(
            Instant::now() < deadline,
            "no warning while the log is stalled:\n{}",
            b.stderr()
        );
        let floods: Vec<_> = (0..16)
            .map(|_| {
                tokio::spawn(async move {
                    for _ in 0..100 {
                        let _ = pc::connect(proxy, None, API).await;
                    }
                })
            })
            .collect();
        for f in floods {
            f.await.unwrap();
        }
    }
    let t0 = Instant::now();
    b.signal(libc::SIGTERM);
    let status = b.wait_exit(Duration::from_secs(20)).await;
    assert!(status.success(), "{status:?}");
    assert!(t0.elapsed() < Duration::from_secs(15), "{:?}", t0.elapsed());
    assert!(
        b.stderr().contains("exiting without them"),
        "{}",
        b.stderr()
    );
}

// ---- master key rotation ----------------------------------------------------------------------------

const ROT_VALUE: &str = "sk-ops-rotate-0001";
const ROT_BODY_VALUE: &str = "pw-ops-rotate-0002";

/// A data dir with a store, two secrets and a sandbox, and the daemon stopped.
struct Populated {
    pki: Arc<TestPki>,
    echo: Echo,
    root: tempfile::TempDir,
    sandbox: Value,
}

impl Populated {
    fn data_dir(&self) -> PathBuf {
        self.root.path().join("data")
    }

    fn key_file(&self) -> PathBuf {
        self.data_dir().join("master.key")
    }

    fn new_key_file(&self) -> PathBuf {
        self.root.path().join("new.key")
    }

    fn opts(&self, master_key: Option<String>) -> Opts {
        Opts {
            resolve: vec![("api.example.test".into(), self.echo.addr)],
            data_dir: Some(self.data_dir()),
            master_key,
            ..Opts::default()
        }
    }
}

async fn populate() -> Populated {
    let (pki, echo) = upstream().await;
    let root = tempfile::tempdir().unwrap();
    let mut p = Populated {
        pki,
        echo,
        root,
        sandbox: Value::Null,
    };
    let mut h = Harness::try_start(p.opts(None), Some(p.pki.clone()))
        .await
        .expect("daemon starts");
    let store = h.store("s", Some(&["api.example.test"])).await;
    h.secret(&store, "KEY", ROT_VALUE, None, Some(&["header"]))
        .await;
    h.secret(&store, "PW", ROT_BODY_VALUE, None, None).await;
    p.sandbox = h.sandbox("s").await;
    h.stop().await;
    p
}

/// Restarts on the data dir with whatever key file is there and checks that everything still
/// works: same CA bytes and tokens, both secrets unsealed.
async fn assert_usable(p: &Populated) {
    let mut h = Harness::try_start(p.opts(None), Some(p.pki.clone()))
        .await
        .expect("daemon starts on the data dir");
    h.register_secret(ROT_VALUE);
    h.register_secret(ROT_BODY_VALUE);
    let sb = SandboxCreds::from_answer(&p.sandbox);
    let id = &sb.id;
    let (s, v) = h
        .api(Method::GET, &format!("/v1/sandboxes/{id}"), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["ca_cert_pem"], p.sandbox["ca_cert_pem"], "same CA");
    assert_eq!(v["env"], p.sandbox["env"], "same tokens");
    let (s, v) = h
        .api(
            Method::GET,
            &format!(
                "/v1/stores/{}/secrets",
                p.sandbox["secret_store_id"].as_str().unwrap()
            ),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v.as_array().unwrap().len(), 2);
    p.echo.clear();
    let mut c = pc::h1(h.proxy, &sb, API).await;
    let a = pc::send1(
        &mut c,
        pc::post(
            "/echo",
            "api.example.test",
            &with_key(&sb.token("KEY")),
            format!("pw={}", sb.token("PW")),
        ),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(p.echo.received_bytes_contain(ROT_VALUE.as_bytes()));
    assert!(p.echo.received_bytes_contain(ROT_BODY_VALUE.as_bytes()));
    drop(c);
    h.stop().await;
}

fn rotate(p: &Populated, crash_after: Option<&str>) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sealgate"));
    cmd.arg("--data-dir")
        .arg(p.data_dir())
        .arg("rotate-master-key")
        .arg("--new-key-file")
        .arg(p.new_key_file())
        .env_remove("SEALGATE_MASTER_KEY")
        .env_remove("SEALGATE_CONFIG");
    #[cfg(feature = "crash-points")]
    cmd.env_remove(sealgate::crash_point::ENV);
    if let Some(step) = crash_after {
        #[cfg(feature = "crash-points")]
        cmd.env(sealgate::crash_point::ENV, step);
        #[cfg(not(feature = "crash-points"))]
        panic!("crash at {step} needs `cargo test --features crash-points` (scripts/test)");
    }
    cmd.output().expect("run rotate-master-key")
}

fn read_key(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap().trim().to_owned()
}

#[tokio::test]
async fn key_rotation_round_trips_and_restart_keeps_stores_secrets_and_sandboxes() {
    let p = populate().await;
    let old = read_key(&p.key_file());
    // What a rotation interrupted while it wrote the new key file leaves (outside pass h39b).
    let name = p
        .new_key_file()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let litter = p
        .new_key_file()
        .with_file_name(format!(".{name}.4242.3f001a.tmp"));
    std::fs::write(&litter, "never used").unwrap();
    let out = rotate(&p, None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !litter.exists(),
        "an interrupted rotation's temporary key file is left"
    );
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(
        msg.contains("re-sealed 2 secret(s) and 1 sandbox(es)"),
        "{msg}"
    );
    let new = read_key(&p.new_key_file());
    assert_ne!(old, new);
    assert_eq!(read_key(&p.key_file()), new, "master.key holds the new key");
    assert!(!sealgate::rotate::staged_key_path(&p.key_file()).exists());
    assert_usable(&p).await;
    // The retired key no longer opens the database.
    let err = Harness::try_start(p.opts(Some(old)), Some(p.pki.clone()))
        .await
        .err()
        .expect("old key refused");
    assert!(err.contains("master key does not match"), "{err}");
}

/// A rotation while a daemon serves the data dir is refused (the daemon would keep sealing with
/// the old key) and changes nothing.
#[tokio::test]
async fn key_rotation_is_refused_while_a_daemon_serves_the_data_dir() {
    let p = populate().await;
    let old = read_key(&p.key_file());
    let mut h = Harness::try_start(p.opts(None), Some(p.pki.clone()))
        .await
        .expect("daemon starts");
    let out = rotate(&p, None);
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{msg}");
    assert!(msg.contains("stop it before rotating"), "{msg}");
    assert_eq!(read_key(&p.key_file()), old, "key file untouched");
    h.stop().await;
    assert_usable(&p).await;
}

/// Aborts a rotation after `step` (as kill -9 would), then checks the data dir with the key
/// the crash left in place.
async fn crash_at(step: &str, committed: bool) {
    let p = populate().await;
    let old = read_key(&p.key_file());
    let out = rotate(&p, Some(step));
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGABRT),
        "crashed at {step}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let new = read_key(&p.new_key_file());
    let staged = sealgate::rotate::staged_key_path(&p.key_file());
    if step == "renamed" {
        assert_eq!(read_key(&p.key_file()), new);
    } else {
        assert_eq!(
            read_key(&p.key_file()),
            old,
            "master.key untouched before the rename"
        );
        assert!(staged.exists(), "the new key is staged");
    }
    assert_usable(&p).await;
    assert!(!staged.exists(), "startup cleared the staged key");
    let expected = if committed { &new } else { &old };
    assert_eq!(
        &read_key(&p.key_file()),
        expected,
        "key in force after {step}"
    );
    if !committed {
        // The interrupted rotation can simply be run again.
        let out = rotate(&p, None);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(read_key(&p.key_file()), new);
        assert_usable(&p).await;
    }
}

#[tokio::test]
#[cfg_attr(
    not(feature = "crash-points"),
    ignore = "needs `cargo test --features crash-points` (scripts/test)"
)]
async fn key_rotation_crash_after_staging_keeps_the_old_key() {
    crash_at("staged", false).await;
}

#[tokio::test]
#[cfg_attr(
    not(feature = "crash-points"),
    ignore = "needs `cargo test --features crash-points` (scripts/test)"
)]
async fn key_rotation_crash_after_resealing_secrets_keeps_the_old_key() {
    crash_at("resealed_secrets", false).await;
}

#[tokio::test]
#[cfg_attr(
    not(feature = "crash-points"),
    ignore = "needs `cargo test --features crash-points` (scripts/test)"
)]
async fn key_rotation_crash_after_resealing_sandboxes_keeps_the_old_key() {
    crash_at("resealed_sandboxes", false).await;
}

#[tokio::test]
#[cfg_attr(
    not(feature = "crash-points"),
    ignore = "needs `cargo test --features crash-points` (scripts/test)"
)]
async fn key_rotation_crash_after_the_key_check_keeps_the_old_key() {
    crash_at("wrote_key_check", false).await;
}

#[tokio::test]
#[cfg_attr(
    not(feature = "crash-points"),
    ignore = "needs `cargo test --features crash-points` (scripts/test)"
)]
async fn key_rotation_crash_after_commit_is_finished_at_startup() {
    crash_at("committed", true).await;
}

#[tokio::test]
#[cfg_attr(
    not(feature = "crash-points"),
    ignore = "needs `cargo test --features crash-points` (scripts/test)"
)]
async fn key_rotation_crash_after_the_rename_uses_the_new_key() {
    crash_at("renamed", true).await;
}

#[tokio::test]
async fn max_connections_counts_open_tunnels_not_just_connect_requests() {
    let opts = Opts {
        proxy_toml: "max_connections = 2\n".into(),
        ..Opts::default()
    };
    let e = setup_with(
        Some(&["api.example.test"]),
        &[("KEY", "sk-ops-maxconn-0001", None, Some(&["header"]))],
        opts,
    )
    .await;
    let key = e.sb.token("KEY");
    let mut one = pc::h1(e.h.proxy, &e.sb, API).await;
    let two = pc::h1(e.h.proxy, &e.sb, API).await;
    let r = pc::connect(e.h.proxy, Some(&e.sb.proxy_auth()), API)
        .await
        .expect_err("two tunnels hold both slots");
    // The uniform answer, not a bare reset (outside review).
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.head.contains("x-sealgate-error: unavailable"), "{r:?}");
    assert!(r.body.contains("proxy.max_connections"), "{r:?}");
    let logs = crate::support::daemon::logs_text();
    assert!(
        logs.contains("one sandbox can hold every connection"),
        "warned at start"
    );
    let m = scrape(&e.h).await;
    assert_eq!(metric(&m, "sealgate_active_connections"), 2.0);
    assert_eq!(
        metric(
            &m,
            r#"sealgate_tunnels_total{decision="deny",code="unavailable"}"#
        ),
        1.0
    );
    assert_eq!(
        echo_get(&mut one, "api.example.test", &key).await.status,
        StatusCode::OK
    );
    drop(two);
    let deadline = Instant::now() + Duration::from_secs(5);
    while pc::connect(e.h.proxy, Some(&e.sb.proxy_auth()), API)
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "slot not released");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `[proxy] worker_threads` sizes the daemon's runtime: the real binary with 3 says it runs 3
/// workers (not one per core, on a 2-core machine), and still serves. Without the key tokio picks one per
/// core; a reload reports a change as needing a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_threads_sizes_the_runtime() {
    let (_pki, _echo, b) = bin_with("worker_threads = 3").await;
    let workers = summary_line(&b, "workers:").await;
    assert_eq!(workers, "3 (proxy.worker_threads)", "the proxy's workers");
    // A new thread carries its parent's name until it first runs and names itself, so the
    // names are read until the runtime's threads have all started (or 5 s have passed).
    let pid = b.child.id();
    let deadline = Instant::now() + Duration::from_secs(5);
    let names = loop {
        let names = thread_names(pid);
        let proxy = names.iter().filter(|n| n.starts_with("sealgate-proxy-"));
        let tokio = names.iter().filter(|n| *n == "tokio-rt-worker");
        if (proxy.count() >= 3 && tokio.count() >= 3) || Instant::now() > deadline {
            break names;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let proxy = names.iter().filter(|n| n.starts_with("sealgate-proxy-"));
    assert_eq!(proxy.count(), 3, "proxy worker threads: {names:?}");
    // Blocking-pool threads carry the same name; the runtime's workers are at least these.
    let named = names.iter().filter(|n| *n == "tokio-rt-worker").count();
    assert!(named >= 3, "{named} tokio threads");
    let sb = b.sandbox("sk-ops-workers-0001").await;
    let key = sb.token("KEY");
    let mut c = pc::h1(b.proxy, &sb, API).await;
    assert_eq!(
        echo_get(&mut c, "api.example.test", &key).await.status,
        StatusCode::OK
    );
    let text = std::fs::read_to_string(b.config_path())
        .unwrap()
        .replace("worker_threads = 3", "worker_threads = 4");
    std::fs::write(b.config_path(), text).unwrap();
    let (s, v) = b.api(Method::POST, "/v1/admin/reload", None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        v["needs_restart"],
        serde_json::json!(["proxy.worker_threads"])
    );
}

/// The names (`comm`) of every thread of process `pid`.
fn thread_names(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|name| name.trim().to_owned())
        .collect()
}

/// The summary line starting with `key` once the binary has written it.
async fn summary_line(b: &Bin, key: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let summary = b.stderr.lock().unwrap().clone();
        if let Some(v) = summary.lines().find_map(|l| l.trim().strip_prefix(key)) {
            return v.trim().to_owned();
        }
        assert!(Instant::now() < deadline, "no {key} line in:\n{summary}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The threads of `pid` named `name`.
fn threads_named(pid: u32, name: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .filter(|comm| comm.trim() == name)
        .count()
}

/// The daemon allocates with jemalloc on its built-in options (one background thread that
/// gives freed memory back, a 1 s dirty decay) and the summary says so, read back from
/// jemalloc; `_RJEM_MALLOC_CONF` changes them and the summary shows the change. A malformed
/// value is ignored by jemalloc with a warning of its own, so the summary is where an
/// operator sees what is in effect (outside pass h40a).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_summary_names_the_allocator_options_in_effect() {
    let (pki, echo) = upstream().await;
    let o = BinOpts {
        echo: echo.addr,
        pki: &pki,
        proxy_toml: "",
    };
    let b = Bin::spawn(&o).await;
    assert_eq!(
        summary_line(&b, "allocator:").await,
        "jemalloc, background thread on, dirty_decay_ms 1000, muzzy_decay_ms 0 (built in)"
    );
    assert_eq!(threads_named(b.child.id(), "jemalloc_bg_thd"), 1);
    drop(b);

    for (conf, said) in [
        (
            "background_thread:false,dirty_decay_ms:5000",
            "jemalloc, background thread OFF (memory freed is given back only as the daemon \
             allocates), dirty_decay_ms 5000, muzzy_decay_ms 0 (built in, then _RJEM_MALLOC_CONF)",
        ),
        (
            "dirty_decay_ms:5000;background_thread:false",
            "jemalloc, background thread on, dirty_decay_ms 1000, muzzy_decay_ms 0 \
             (built in, then _RJEM_MALLOC_CONF)",
        ),
    ] {
        let env = [("_RJEM_MALLOC_CONF", std::ffi::OsStr::new(conf))];
        let b = Bin::spawn_signalled(&o, &[], &env).await;
        assert_eq!(summary_line(&b, "allocator:").await, said, "{conf}");
        let threads = usize::from(!conf.starts_with("background_thread:false"));
        assert_eq!(
            threads_named(b.child.id(), "jemalloc_bg_thd"),
            threads,
            "{conf}"
        );
    }
}

/// One thread of `pid`'s, by its (truncated) name: (voluntary context switches, user + system clock ticks).
fn thread_counters(pid: u32, name: &str) -> (u64, u64) {
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = t.unwrap().path();
        if std::fs::read_to_string(dir.join("comm"))
            .unwrap_or_default()
            .trim()
            != name
        {
            continue;
        }
        let status = std::fs::read_to_string(dir.join("status")).unwrap();
        let switches = status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let stat = std::fs::read_to_string(dir.join("stat")).unwrap();
        let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<u64> = after_comm
            .split_whitespace()
            .map(|v| v.parse().unwrap_or(0))
            .collect();
        // Fields 14 and 15 of stat (utime, stime), counted from after the command name.
        return (switches, f[11] + f[12]);
    }
    panic!("no thread {name} in {pid}");
}

/// `[proxy] busy_poll_us`: a worker whose client moved bytes moments ago polls instead of
/// sleeping, so 200 keep-alive requests one after another hardly ever put its thread to sleep
/// (voluntary context switches, from /proc), where with 0 it sleeps several times as often
/// (waiting for the origin; 339–400 times on a quiet machine, 139 while the rest of the suite
/// loaded it, since a worker that is late to run finds its events ready); and once the traffic
/// stops the worker sleeps: almost no CPU over the next second. The summary says which.
///
/// The busy case gets up to three tries, each on a fresh daemon: on a VM whose round trips
/// sometimes take over a millisecond the worker polls most of the time and the duty cycle
/// (half of every 100 ms) then rightly puts it to sleep (151–322 sleeps seen in such minutes,
/// 0–10 a minute later). One try in three showing the effect is what this asserts; a daemon
/// that never polls fails all three.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measures scheduling: scripts/test runs it alone, after the parallel suite"]
async fn busy_poll_keeps_a_worker_awake_between_requests_and_an_idle_one_asleep() {
    const REQUESTS: u64 = 200;
    let (pki, echo) = upstream().await;
    let without = sleeps_in_requests(&pki, echo.addr, 0, REQUESTS).await;
    // 4x failed once under the whole suite's load: 127 against 38 (alone: 339-400 against 0-7).
    assert!(
        without >= REQUESTS / 4,
        "{without} sleeps in {REQUESTS} requests without busy-polling"
    );
    let mut tries = Vec::new();
    for _ in 0..3 {
        let with = sleeps_in_requests(&pki, echo.addr, 1000, REQUESTS).await;
        tries.push(with);
        if with < REQUESTS / 2 && 2 * with <= without {
            return;
        }
    }
    panic!(
        "{tries:?} sleeps in {REQUESTS} requests in three tries ({without} without busy-polling)"
    );
}

/// Starts a daemon with one worker and `busy_poll_us`, checks its summary line, sends
/// `requests` keep-alive GETs after 10 warm-up ones and returns how often the worker slept
/// during them; with busy-polling, also checks the worker then idles (≤ 2 ticks in a second).
async fn sleeps_in_requests(
    pki: &TestPki,
    echo: SocketAddr,
    busy_poll_us: u32,
    requests: u64,
) -> u64 {
    let o = BinOpts {
        echo,
        pki,
        proxy_toml: &format!("worker_threads = 1\nbusy_poll_us = {busy_poll_us}"),
    };
    let b = Bin::spawn(&o).await;
    let said = if busy_poll_us > 0 {
        format!("up to {busy_poll_us} µs after bytes moved (proxy.busy_poll_us)")
    } else {
        "off (proxy.busy_poll_us)".to_string()
    };
    assert_eq!(summary_line(&b, "busy poll:").await, said);
    let sb = b.sandbox("sk-ops-busy-poll-0001").await;
    let key = sb.token("KEY");
    let mut c = pc::h1(b.proxy, &sb, API).await;
    for _ in 0..10 {
        let r = echo_get(&mut c, "api.example.test", &key).await;
        assert_eq!(r.status, StatusCode::OK);
    }
    let pid = b.child.id();
    let (before, _) = thread_counters(pid, "sealgate-proxy-");
    for _ in 0..requests {
        let r = echo_get(&mut c, "api.example.test", &key).await;
        assert_eq!(r.status, StatusCode::OK);
    }
    let (after, _) = thread_counters(pid, "sealgate-proxy-");
    let slept = after - before;
    eprintln!(
        "busy_poll_us = {busy_poll_us}: the worker slept {slept} times in {requests} requests"
    );
    if busy_poll_us > 0 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (_, t0) = thread_counters(pid, "sealgate-proxy-");
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (_, t1) = thread_counters(pid, "sealgate-proxy-");
        assert!(t1 - t0 <= 2, "{} ticks of CPU in an idle second", t1 - t0);
    }
    slept
}

/// A hostile trickle against busy-polling: a sandbox that sends its request body one byte per
/// TLS record every ~850 µs keeps its worker's 1 ms window open, and without a cap the worker
/// would poll whenever it is not working. The duty cycle holds polling to half of every
/// 100 ms: over 2 s the worker's CPU time exceeds that of the same trickle without
/// busy-polling by about half the wall time (50–52 % seen, asserted below 65 %; without the
/// cap it would be ~85 %: the worker works 12 % of the time), and it did poll (it slept far
/// less often than without). `sealgate_busy_poll_seconds_total` shows the polling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measures scheduling: scripts/test runs it alone, after the parallel suite"]
async fn a_trickle_holds_a_busy_polling_worker_to_its_duty_cycle() {
    let (pki, echo) = upstream().await;
    let mut seen = Vec::new();
    for busy_poll in [1000, 0] {
        let o = BinOpts {
            echo: echo.addr,
            pki: &pki,
            proxy_toml: &format!("worker_threads = 1\nbusy_poll_us = {busy_poll}"),
        };
        let b = Bin::spawn(&o).await;
        let (sent, slept, ticks, wall) = trickle(&b).await;
        let polled = b.metric("sealgate_busy_poll_seconds_total").await;
        // Polling half of 2 s, counted as it goes (the metric an operator reads).
        if busy_poll > 0 {
            assert!((0.3..2.1).contains(&polled), "{polled} s polled");
        } else {
            assert_eq!(polled, 0.0);
        }
        eprintln!(
            "busy_poll_us = {busy_poll}: {sent} records in {wall:.0} ticks; the worker used \
             {ticks} ticks and slept {slept} times"
        );
        assert!(sent > 1000, "the trickle sent only {sent} records");
        seen.push((slept, ticks as f64 / wall, sent));
    }
    let [(slept, busy, _), (slept_off, off, _)] = seen[..] else {
        unreachable!()
    };
    // Polling half the time, the worker sleeps on about half the records (~880 of ~2,100
    // seen, against ~2,050 without).
    assert!(
        slept < slept_off * 3 / 4,
        "the worker slept {slept} times polling and {slept_off} times without: no polling"
    );
    assert!(
        busy - off < 0.65,
        "polling took {:.0} % of the time (CPU {:.0} % against {:.0} % without)",
        (busy - off) * 100.0,
        busy * 100.0,
        off * 100.0
    );
}

/// Sends a request body one byte per TLS record, ~850 µs apart, for 2 s through `b`'s one
/// worker: (records sent, the worker's sleeps, its CPU clock ticks, the wall time in ticks).
async fn trickle(b: &Bin) -> (u64, u64, u64, f64) {
    use tokio::io::AsyncWriteExt;
    let sb = b.sandbox("sk-ops-trickle-0001").await;
    let tcp = pc::connect(b.proxy, Some(&sb.proxy_auth()), API)
        .await
        .expect("CONNECT accepted");
    let mut tls = pc::tls(tcp, &sb.ca_pem, "api.example.test", &[b"http/1.1"])
        .await
        .unwrap();
    let head = "POST /echo HTTP/1.1\r\nhost: api.example.test\r\ncontent-length: 1000000\r\n\r\n";
    tls.write_all(head.as_bytes()).await.unwrap();
    tls.flush().await.unwrap();
    let pid = b.child.id();
    let (v0, t0) = thread_counters(pid, "sealgate-proxy-");
    let started = Instant::now();
    let mut sent = 0u64;
    while started.elapsed() < Duration::from_secs(2) {
        tls.write_all(b"a").await.unwrap();
        tls.flush().await.unwrap();
        sent += 1;
        // Blocking on purpose: tokio's timers cannot sleep for less than a millisecond.
        std::thread::sleep(Duration::from_micros(800));
    }
    let (v1, t1) = thread_counters(pid, "sealgate-proxy-");
    let wall = started.elapsed().as_secs_f64() * 100.0;
    (sent, v1 - v0, t1 - t0, wall)
}

/// With `[log] format = "json"` every stderr line is JSON, the start-up summary included (as
/// the `summary` field of one line, written at any `[log] level`, here `warn`), so a log
/// shipper parsing JSON lines never chokes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_startup_summary_as_json() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("proxy.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = \"{d}/data\"\ncert_dir = \"{d}/certs\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
             [proxy]\nlisten = \"127.0.0.1:0\"\n\n[log]\nlevel = \"warn\"\nformat = \"json\"\n",
            d = dir.path().display()
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_sealgate"))
        .arg("--config")
        .arg(&cfg)
        .arg("serve")
        .env_remove("SEALGATE_MASTER_KEY")
        .env_remove("SEALGATE_ADMIN_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sealgate");
    let pipe = child.stderr.take().unwrap();
    let lines = tokio::task::spawn_blocking(move || {
        let mut seen = Vec::new();
        for line in std::io::BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            let done = line.contains("sealgate running");
            seen.push(line);
            if done {
                break;
            }
        }
        seen
    });
    let lines = tokio::time::timeout(Duration::from_secs(30), lines)
        .await
        .expect("summary within 30 s")
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(!lines.is_empty());
    for l in &lines {
        assert!(serde_json::from_str::<Value>(l).is_ok(), "not JSON: {l}");
    }
    let last: Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    let summary = last["fields"]["summary"].as_str().unwrap_or_default();
    assert!(summary.contains("admin API:"), "{last}");
}
