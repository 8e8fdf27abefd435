//! Reflection: an upstream that echoes a real value back (in a header, a cookie, a compressed
//! body, a stream split across flushes) never hands it to the sandbox; redirects are passed to
//! the sandbox, never followed by the proxy.

use std::time::Duration;

use http::StatusCode;

use super::get_api;
use crate::proxy_explicit::{setup, Env, Spec};
use crate::support::proxy_client::{basic, Answer};

const VALUE: &str = "sk-adv-reflect-0501";

async fn env() -> Env {
    let secrets: &[Spec] = &[("KEY", VALUE, None, Some(&["header"]))];
    setup(Some(&["api.example.test"]), secrets).await
}

/// Neither headers nor body of `a` contain the real value.
fn assert_clean(a: &Answer) {
    for (n, v) in &a.headers {
        let v = String::from_utf8_lossy(v.as_bytes());
        assert!(!v.contains(VALUE), "real value in header {n}: {v}");
    }
    assert!(
        !a.text().contains(VALUE),
        "real value in body: {}",
        a.text()
    );
}

#[tokio::test]
async fn secret_echoed_in_a_response_header_is_scrubbed() {
    let e = env().await;
    let key = e.sb.token("KEY");
    let a = get_api(&e, "/reflect", &[("x-api-key", &key)]).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(
        e.echo.requests()[0].header("x-api-key").unwrap(),
        VALUE,
        "upstream got it"
    );
    assert_clean(&a);
    assert_eq!(a.headers.get("x-reflect").unwrap(), key.as_str());
    assert_eq!(a.text().matches(&key).count(), 3, "{}", a.text());
}

#[tokio::test]
async fn secret_echoed_in_set_cookie_is_scrubbed() {
    let e = env().await;
    let key = e.sb.token("KEY");
    let a = get_api(&e, "/reflect", &[("x-api-key", &key)]).await;
    assert_clean(&a);
    let cookie = a.headers.get("set-cookie").unwrap().to_str().unwrap();
    assert_eq!(cookie, format!("session={key}; Path=/"));
}

#[tokio::test]
async fn secret_echoed_in_gzip_and_brotli_bodies_is_scrubbed() {
    let e = env().await;
    let key = e.sb.token("KEY");
    for path in ["/gzip", "/br"] {
        let a = get_api(
            &e,
            path,
            &[("x-api-key", &key), ("accept-encoding", "gzip, br")],
        )
        .await;
        assert_eq!(a.status, StatusCode::OK, "{path}");
        assert!(
            a.headers.get("content-encoding").is_none(),
            "{path}: decoded to be scrubbed"
        );
        assert_clean(&a);
        assert!(a.text().contains(&key), "{path}: {}", a.text());
    }
}

#[tokio::test]
async fn secret_in_sse_split_across_flushes_is_scrubbed() {
    let e = env().await;
    let key = e.sb.token("KEY");
    let bearer = format!("Bearer {key}");
    let a = get_api(&e, "/sse", &[("authorization", &bearer)]).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_clean(&a);
    assert_eq!(a.text().matches(&key).count(), 5, "{}", a.text());
}

#[tokio::test]
async fn basic_auth_form_echoed_is_scrubbed() {
    let e = env().await;
    let key = e.sb.token("KEY");
    let auth = basic("user", &key);
    let a = get_api(&e, "/reflect", &[("authorization", &auth)]).await;
    assert_eq!(a.status, StatusCode::OK);
    let real = basic("user", VALUE);
    assert_eq!(e.echo.requests()[0].header("authorization").unwrap(), real);
    let real_b64 = real.trim_start_matches("Basic ");
    let all = format!("{:?}{}", a.headers, a.text());
    assert!(
        !all.contains(real_b64),
        "base64 form of the real credentials leaked: {all}"
    );
    assert_clean(&a);
}

#[tokio::test]
async fn redirect_to_another_host_is_passed_not_followed() {
    let e = env().await;
    let key = e.sb.token("KEY");
    let a = get_api(&e, "/redirect", &[("x-api-key", &key)]).await;
    assert_eq!(a.status, StatusCode::FOUND);
    assert_eq!(
        a.headers.get("location").unwrap(),
        "https://other.example.test/landing"
    );
    let reqs = e.echo.requests();
    assert_eq!(reqs.len(), 1, "the proxy followed the redirect");
    assert_eq!(reqs[0].host.as_deref(), Some("api.example.test"));
    assert_eq!(e.echo.connections(), 1);
}

/// A brotli or zstd decoder may hold a 16 / 8 MiB window while its client does not read (an
/// outside review held 500 MiB with 30 stalled brotli answers of one sandbox). Hosts whose
/// answers are scrubbed are asked for gzip and deflate only; upstreams that send brotli
/// anyway meet a bound per sandbox and one for the daemon (502 before any byte of the
/// body), which another sandbox's stalled answers cannot use up alone.
#[tokio::test]
async fn brotli_answers_being_decoded_are_bounded_per_sandbox_and_daemon_wide() {
    use crate::proxy_explicit::setup_with;
    use crate::support::daemon::Opts;
    use crate::support::proxy_client::{self as pc, SandboxCreds};
    let secrets: &[Spec] = &[("KEY", VALUE, None, Some(&["header"]))];
    let opts = Opts {
        upstream_toml: "max_window_decoders_per_sandbox = 1\nmax_window_decoders = 2".into(),
        ..Default::default()
    };
    let e = setup_with(Some(&["api.example.test"]), secrets, opts).await;
    let (b, c) = (e.h.sandbox("s").await, e.h.sandbox("s").await);
    let (b, c) = (SandboxCreds::from_answer(&b), SandboxCreds::from_answer(&c));
    let proxy = e.h.proxy;
    let get = |sb: &SandboxCreds, path: &'static str| {
        let sb = sb.clone();
        async move {
            let mut conn = pc::h2(proxy, &sb, super::API).await;
            let ae = [("accept-encoding", "gzip, br;q=1, zstd")];
            pc::send2(&mut conn, pc::get(path, "api.example.test", &ae)).await
        }
    };
    let slow_a = tokio::spawn(get(&e.sb, "/br-slow?ms=1500"));
    super::eventually(Duration::from_secs(5), "a's answer is decoding", || {
        e.echo.requests().len() == 1
    })
    .await;
    let asked = e.echo.requests()[0].header("accept-encoding");
    assert_eq!(
        asked.as_deref(),
        Some("identity"),
        "no coding asked for where answers are scrubbed"
    );
    let refused_naming = |a: Answer, key: &str| {
        assert_eq!(a.status, StatusCode::BAD_GATEWAY, "{}", a.text());
        assert!(a.text().contains(key), "{}", a.text());
    };
    refused_naming(
        get(&e.sb, "/br").await,
        "(upstream.max_window_decoders_per_sandbox)",
    );
    let slow_b = tokio::spawn(get(&b, "/br-slow?ms=1500"));
    super::eventually(Duration::from_secs(5), "b's answer is decoding", || {
        e.echo.requests().len() == 3
    })
    .await;
    refused_naming(get(&c, "/br").await, "(upstream.max_window_decoders)");
    for slow in [slow_a, slow_b] {
        let a = slow.await.unwrap();
        assert_eq!(a.status, StatusCode::OK, "{}", a.text());
        assert_clean(&a);
    }
    for sb in [&e.sb, &c] {
        let a = get(sb, "/br").await;
        assert_eq!(a.status, StatusCode::OK, "slots given back: {}", a.text());
        assert_clean(&a);
    }
}
