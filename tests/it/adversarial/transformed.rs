//! Echoes in another form: an upstream that reflects a URL (percent-encoded), a JSON or form
//! body (escaped, possibly twice), or base64-encoded data holding a value at any byte offset;
//! values a rotation or deletion retired; and bodies whose syntax must decode to the value
//! (form fields, JSON strings). The sandbox must get none of these forms back.

use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use http::StatusCode;
use serde_json::Value;

use super::get_api;
use crate::proxy_explicit::{setup, Env, Spec};
use crate::support::proxy_client::{self as pc, basic, Answer};

/// Shaped like an AWS secret key: `/`, `+` and `=` change under every encoding.
const AWS: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY+x=";
/// A password holding what JSON strings and form fields must escape.
const PW: &str = "pa\"ss\\wo/rd+&=%41 é<tr>-0731";

async fn env(secrets: &[Spec<'_>]) -> Env {
    setup(Some(&["api.example.test"]), secrets).await
}

async fn post_api(e: &Env, path: &str, content_type: &str, body: String) -> Answer {
    let mut c = pc::h1(e.h.proxy, &e.sb, super::API).await;
    let req = pc::post(
        path,
        "api.example.test",
        &[("content-type", content_type)],
        body,
    );
    pc::send1(&mut c, req).await
}

/// The echo's JSON answer.
fn echoed(a: &Answer) -> Value {
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    serde_json::from_str(&a.text()).expect("the echo answers JSON")
}

/// `key=value` pairs of a form body, decoded (`+` as space, then percent-decoding).
fn form_fields(body: &str) -> Vec<(String, String)> {
    let decode = |s: &str| {
        let spaced = s.replace('+', " ");
        percent_encoding::percent_decode_str(&spaced)
            .decode_utf8_lossy()
            .into_owned()
    };
    body.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

#[tokio::test]
async fn a_query_value_echoed_percent_encoded_is_scrubbed() {
    let e = env(&[("SIG", AWS, None, Some(&["header", "query"]))]).await;
    let sig = e.sb.token("SIG");
    let a = get_api(&e, &format!("/echo?sig={sig}&n=1"), &[]).await;
    let sent = &e.echo.requests()[0].uri;
    assert!(
        sent.contains("sig=wJalrXUtnFEMI%2FK7MDENG%2FbPxRfiCYEXAMPLEKEY%2Bx%3D&n=1"),
        "the upstream got the value percent-encoded: {sent}"
    );
    let uri = echoed(&a)["uri"].as_str().unwrap().to_owned();
    assert_eq!(uri, format!("/echo?sig={sig}&n=1"), "scrubbed to the token");
    assert!(!a.text().contains("wJalrXUtnFEMI"), "{}", a.text());
}

#[tokio::test]
async fn a_json_body_gets_the_value_as_a_json_string_and_never_sees_it_echoed() {
    let e = env(&[("PW", PW, None, Some(&["body"]))]).await;
    let pw = e.sb.token("PW");
    let a = post_api(
        &e,
        "/echo",
        "application/json; charset=utf-8",
        format!(r#"{{"user":"u","password":"{pw}"}}"#),
    )
    .await;
    let sent: Value =
        serde_json::from_slice(&e.echo.requests()[0].body).expect("the upstream got valid JSON");
    assert_eq!(sent["password"], PW, "and it decodes to the value");
    // The echo puts the body, a JSON text, inside its own JSON: the value escaped twice.
    let body = echoed(&a)["body"].as_str().unwrap().to_owned();
    let inner: Value = serde_json::from_str(&body).expect("still JSON after scrubbing");
    assert_eq!(inner["password"], pw.as_str(), "{body}");
    assert!(!a.text().contains("wo/rd") && !a.text().contains(r"wo\\/rd"));
}

#[tokio::test]
async fn a_form_body_gets_the_value_form_encoded_and_never_sees_it_echoed() {
    let e = env(&[("PW", PW, None, Some(&["body"]))]).await;
    let pw = e.sb.token("PW");
    let a = post_api(
        &e,
        "/echo",
        "application/x-www-form-urlencoded",
        format!("client_secret={pw}&x=1"),
    )
    .await;
    let sent = String::from_utf8(e.echo.requests()[0].body.clone()).unwrap();
    assert_eq!(
        form_fields(&sent),
        [
            ("client_secret".to_owned(), PW.to_owned()),
            ("x".to_owned(), "1".to_owned())
        ],
        "the upstream decodes exactly the value: {sent}"
    );
    let body = echoed(&a)["body"].as_str().unwrap().to_owned();
    assert_eq!(
        form_fields(&body)[0],
        ("client_secret".to_owned(), pw),
        "{body}"
    );
}

#[tokio::test]
async fn a_value_inside_base64_is_scrubbed_at_every_byte_offset() {
    let e = env(&[("KEY", AWS, None, Some(&["header"]))]).await;
    let key = e.sb.token("KEY");
    for pad in ["", "p", "pp", "ppp"] {
        // `a-pad` sorts first in the echo's header object, shifting the value's offset.
        let a = get_api(&e, "/b64", &[("a-pad", pad), ("x-api-key", &key)]).await;
        assert_eq!(a.status, StatusCode::OK);
        let decoded = STANDARD.decode(a.text().trim()).unwrap_or_default();
        let decoded = String::from_utf8_lossy(&decoded);
        assert!(
            !decoded.contains(&AWS[1..AWS.len() - 1]),
            "offset {}: {decoded}",
            pad.len()
        );
        let direct = get_api(&e, "/echo", &[("a-pad", pad), ("x-api-key", &key)]).await;
        assert!(direct.text().contains(&key), "the raw form still scrubbed");
    }
}

#[tokio::test]
async fn a_basic_form_stored_by_the_upstream_and_replayed_later_is_scrubbed() {
    let e = env(&[("KEY", AWS, None, Some(&["header"]))]).await;
    let key = e.sb.token("KEY");
    let a = get_api(&e, "/echo", &[("authorization", &basic("alice", &key))]).await;
    assert_eq!(a.status, StatusCode::OK);
    // A later answer carries the credentials the upstream stored (the test plays that
    // upstream by sending them itself), under another user name than this request's.
    for user in ["alice", "bob", "carol"] {
        let stored = basic(user, AWS);
        let a = get_api(&e, "/reflect", &[("x-api-key", &stored)]).await;
        let stored_b64 = stored.trim_start_matches("Basic ");
        let all = format!("{:?}{}", a.headers, a.text());
        let core = &stored_b64[8..stored_b64.len() - 4];
        assert!(!all.contains(core), "{user}: {all}");
    }
}

/// Sends `token` until the upstream records `value` for it (rotation reaches running
/// sandboxes within a second).
async fn wait_for_value(e: &Env, token: &str, value: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let before = e.echo.requests().len();
        get_api(e, "/echo", &[("x-api-key", token)]).await;
        let got = e.echo.requests()[before].header("x-api-key");
        if got.as_deref() == Some(value) {
            return;
        }
        assert!(Instant::now() < deadline, "still {got:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn values_retired_by_rotation_or_deletion_stay_scrubbed() {
    const OLD: &str = "sk-adv-retired-old-0001";
    const NEW: &str = "sk-adv-retired-new-0002";
    let e = env(&[("KEY", OLD, None, Some(&["header"]))]).await;
    let key = e.sb.token("KEY");
    e.h.secret(&e.store, "KEY", NEW, None, Some(&["header"]))
        .await;
    wait_for_value(&e, &key, NEW).await;
    // An upstream that stored the old value (or still accepts it) hands it back.
    for value in [OLD, NEW] {
        let a = get_api(&e, "/reflect", &[("x-api-key", value)]).await;
        assert!(!a.text().contains(value), "{value}: {}", a.text());
        assert!(a.text().contains(&key), "{}", a.text());
    }
    assert_eq!(
        e.h.delete_secret(&e.store, "KEY").await,
        StatusCode::NO_CONTENT
    );
    wait_for_value(&e, &key, &key).await;
    for value in [OLD, NEW] {
        let a = get_api(&e, "/reflect", &[("x-api-key", value)]).await;
        assert!(
            !a.text().contains(value),
            "after deletion, {value}: {}",
            a.text()
        );
    }
}
