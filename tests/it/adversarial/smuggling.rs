//! Smuggling and framing: any head whose body framing two parsers could read differently is
//! refused with the uniform 400 (by the h1 guard, before hyper sees it) and nothing at all
//! reaches the upstream — neither the request nor the request smuggled after it.

use std::time::Duration;

use super::{assert_uniform, assert_upstream_untouched, exchange, raw_proxy, tls_tunnel, API};
use crate::proxy_explicit::{setup, setup_with, Env, Spec};
use crate::support::daemon::Opts;
use crate::support::echo::Echo;

const VALUE: &str = "sk-adv-smuggle-0301";
const SMUGGLED: &str = "GET /smuggled HTTP/1.1\r\nHost: api.example.test\r\n\r\n";

async fn env() -> Env {
    let secrets: &[Spec] = &[("KEY", VALUE, None, None)];
    setup(Some(&["api.example.test"]), secrets).await
}

/// Sends `start\r\nHost…\r\n{headers}\r\n\r\n{body}` + a smuggled GET through a tunnel and
/// asserts one uniform 400, then nothing, and an untouched upstream.
async fn refused(start: &str, headers: &str, body: &str) {
    let e = env().await;
    let req = format!("{start}\r\nHost: api.example.test\r\n{headers}\r\n\r\n{body}{SMUGGLED}");
    let mut tls = tls_tunnel(&e, API, "api.example.test").await;
    let text = exchange(&mut tls, req.as_bytes(), Duration::from_secs(5)).await;
    assert_uniform(&text, 400, "bad_request");
    assert_eq!(text.matches("HTTP/1.1 ").count(), 1, "served after: {text}");
    assert_upstream_untouched(&e);
    assert!(e.h.audit_log().contains("request framing refused"));
}

macro_rules! smuggle {
    ($($name:ident: $headers:expr, $body:expr;)*) => {$(
        #[tokio::test]
        async fn $name() {
            refused("POST /echo HTTP/1.1", $headers, $body).await;
        }
    )*};
}

smuggle! {
    cl_te_is_400: "Content-Length: 6\r\nTransfer-Encoding: chunked", "0\r\n\r\n";
    te_cl_is_400: "Transfer-Encoding: chunked\r\nContent-Length: 6", "0\r\n\r\n";
    cl_te_mixed_case_is_400: "content-length: 6\r\ntransfer-encoding: CHUNKED", "0\r\n\r\n";
    cl_zero_te_is_400: "Content-Length: 0\r\nTransfer-Encoding: chunked", "0\r\n\r\n";
    duplicate_differing_content_length_is_400: "Content-Length: 5\r\nContent-Length: 6", "hello!";
    duplicate_equal_content_length_is_400: "Content-Length: 5\r\nContent-Length: 5", "hello";
    content_length_list_is_400: "Content-Length: 5, 5", "hello";
    content_length_plus_is_400: "Content-Length: +5", "hello";
    content_length_negative_is_400: "Content-Length: -1", "";
    content_length_hex_is_400: "Content-Length: 0x5", "hello";
    content_length_overflow_is_400: "Content-Length: 18446744073709551621", "hello";
    te_xchunked_is_400: "Transfer-Encoding: xchunked", "0\r\n\r\n";
    te_space_before_colon_is_400: "Transfer-Encoding : chunked", "0\r\n\r\n";
    te_chunked_identity_list_is_400: "Transfer-Encoding: chunked, identity", "0\r\n\r\n";
    te_gzip_chunked_is_400: "Transfer-Encoding: gzip, chunked", "0\r\n\r\n";
    te_duplicate_fields_is_400: "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity", "0\r\n\r\n";
    te_vertical_tab_is_400: "Transfer-Encoding:\x0bchunked", "0\r\n\r\n";
    te_quoted_is_400: "Transfer-Encoding: \"chunked\"", "0\r\n\r\n";
    te_identity_is_400: "Transfer-Encoding: identity", "";
    obs_fold_is_400: "X-Note: a\r\n Transfer-Encoding: chunked", "0\r\n\r\n";
    obs_fold_tab_is_400: "X-Note: a\r\n\tb", "";
    bare_lf_between_fields_is_400: "X-A: 1\nTransfer-Encoding: chunked", "0\r\n\r\n";
    bare_cr_in_value_is_400: "X-A: a\rb", "";
    nul_in_value_is_400: "X-A: a\0b", "";
    nul_in_name_is_400: "X-\0A: b", "";
    huge_first_chunk_size_is_400: "Transfer-Encoding: chunked", "fffffffffffffffff1\r\nhello\r\n0\r\n\r\n";
    first_chunk_size_above_i64_is_400: "Transfer-Encoding: chunked", "8000000000000000\r\nhello\r\n0\r\n\r\n";
    negative_chunk_size_is_400: "Transfer-Encoding: chunked", "-5\r\nhello\r\n0\r\n\r\n";
    chunk_size_with_junk_is_400: "Transfer-Encoding: chunked", "5 x\r\nhello\r\n0\r\n\r\n";
    chunk_line_bare_lf_is_400: "Transfer-Encoding: chunked", "5\nhello\r\n0\r\n\r\n";
}

#[tokio::test]
async fn te_on_http10_is_400() {
    refused(
        "POST /echo HTTP/1.0",
        "Transfer-Encoding: chunked",
        "0\r\n\r\n",
    )
    .await;
}

#[tokio::test]
async fn bare_lf_request_line_is_400() {
    refused("POST /echo HTTP/1.1\n", "Content-Length: 0", "").await;
}

#[tokio::test]
async fn bad_later_chunk_closes_without_a_second_request() {
    let e = env().await;
    let req = format!(
        "POST /echo HTTP/1.1\r\nHost: api.example.test\r\nTransfer-Encoding: chunked\r\n\r\n\
         5\r\nhello\r\nfffffffffffffffffff\r\n{SMUGGLED}"
    );
    let mut tls = tls_tunnel(&e, API, "api.example.test").await;
    let text = exchange(&mut tls, req.as_bytes(), Duration::from_secs(5)).await;
    assert!(!text.contains("HTTP/1.1 200"), "served: {text}");
    // The first request may have started upstream (its head was valid); it never completes and
    // no second request follows it.
    let reqs = e.echo.requests();
    assert!(
        reqs.iter().all(|r| r.uri != "/smuggled"),
        "smuggled request arrived"
    );
    assert!(reqs.len() <= 1);
}

#[tokio::test]
async fn smuggled_request_inside_a_valid_body_stays_body() {
    let e = env().await;
    let inner =
        "GET /inner HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
    let req = format!(
        "POST /echo HTTP/1.1\r\nHost: api.example.test\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{inner}",
        inner.len()
    );
    let mut tls = tls_tunnel(&e, API, "api.example.test").await;
    let text = exchange(&mut tls, req.as_bytes(), Duration::from_secs(5)).await;
    assert_eq!(super::status_of(&text), 200, "{text}");
    let reqs = e.echo.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].body, inner.as_bytes());
}

#[tokio::test]
async fn valid_chunked_bodies_with_extensions_and_trailers_pass() {
    let e = env().await;
    let tok = e.sb.token("KEY");
    let (a, b) = tok.split_at(20);
    let req = format!(
        "POST /echo HTTP/1.1\r\nHost: api.example.test\r\nTransfer-Encoding: chunked\r\n\r\n\
         {:x};name=value\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\nX-Trailer: 1\r\n\r\n\
         POST /echo HTTP/1.1\r\nHost: api.example.test\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
        a.len(),
        b.len()
    );
    let mut tls = tls_tunnel(&e, API, "api.example.test").await;
    let text = exchange(&mut tls, req.as_bytes(), Duration::from_secs(5)).await;
    assert_eq!(text.matches("HTTP/1.1 200").count(), 2, "{text}");
    let reqs = e.echo.requests();
    assert_eq!(
        reqs[0].body,
        VALUE.as_bytes(),
        "token split across chunks unsealed"
    );
    assert_eq!(reqs[1].body, b"abc");
}

#[tokio::test]
async fn expect_continue_chunked_upload_still_works() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let e = env().await;
    let mut tls = tls_tunnel(&e, API, "api.example.test").await;
    tls.write_all(
        b"POST /echo HTTP/1.1\r\nHost: api.example.test\r\nExpect: 100-continue\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf))
        .await
        .expect("100 Continue arrives before the body is sent")
        .unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 100"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    let text = exchange(&mut tls, b"3\r\nabc\r\n0\r\n\r\n", Duration::from_secs(5)).await;
    assert_eq!(super::status_of(&text), 200, "{text}");
    assert_eq!(e.echo.requests()[0].body, b"abc");
}

#[tokio::test]
async fn plain_http_cl_te_is_refused_on_the_proxy_listener() {
    let plain = Echo::start_plain().await;
    let opts = Opts {
        resolve: vec![("plain.example.test".into(), plain.addr)],
        ..Default::default()
    };
    let e = setup_with(Some(&["plain.example.test"]), &[], opts).await;
    let req = format!(
        "POST http://plain.example.test/echo HTTP/1.1\r\nHost: plain.example.test\r\nProxy-Authorization: {}\r\n\
         Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET http://plain.example.test/smuggled HTTP/1.1\r\nHost: plain.example.test\r\n\r\n",
        e.sb.proxy_auth()
    );
    let text = raw_proxy(e.h.proxy, req.as_bytes()).await;
    assert_uniform(&text, 400, "bad_request");
    assert_eq!(text.matches("HTTP/1.1 ").count(), 1, "{text}");
    assert_eq!(plain.connections(), 0);
    assert!(plain.requests().is_empty());
}

#[tokio::test]
async fn connect_with_cl_te_is_refused_before_any_tunnel() {
    let e = env().await;
    let req = format!(
        "CONNECT {API} HTTP/1.1\r\nHost: {API}\r\nProxy-Authorization: {}\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        e.sb.proxy_auth()
    );
    let text = raw_proxy(e.h.proxy, req.as_bytes()).await;
    assert_uniform(&text, 400, "bad_request");
    assert_upstream_untouched(&e);
    assert_eq!(super::mints(&e), 0);
}
