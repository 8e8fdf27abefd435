//! Tunnel authority: the CONNECT target is the destination truth; every request inside the
//! tunnel (each pipelined h1 request, each h2 stream) must name that host and port, or it is
//! refused unsubstituted and nothing reaches any upstream.

use std::time::Duration;

use http::StatusCode;

use super::{assert_upstream_untouched, exchange, mints, status_of, tls_tunnel, API};
use crate::proxy_explicit::{setup, Env, Spec};
use crate::support::proxy_client as pc;

const VALUE: &str = "sk-adv-authority-0201";

async fn env() -> Env {
    let secrets: &[Spec] = &[("KEY", VALUE, None, None)];
    setup(Some(&["api.example.test", "other.example.test"]), secrets).await
}

/// Sends raw h1 over a fresh tunnel to `API` and returns what came back.
async fn raw_in_tunnel(e: &Env, req: &str) -> String {
    let mut tls = tls_tunnel(e, API, "api.example.test").await;
    exchange(&mut tls, req.as_bytes(), Duration::from_secs(5)).await
}

fn assert_nothing_unsealed(e: &Env) {
    assert!(!e.echo.received_bytes_contain(VALUE.as_bytes()));
    assert!(!e.h.audit_log().contains("\"unsealed\":[\"KEY\"]"));
}

#[tokio::test]
async fn host_header_naming_another_host_is_421() {
    let e = env().await;
    let key = e.sb.token("KEY");
    let text = raw_in_tunnel(
        &e,
        &format!("GET /echo HTTP/1.1\r\nHost: other.example.test\r\nx-api-key: {key}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    super::assert_uniform(&text, 421, "authority_mismatch");
    assert_upstream_untouched(&e);
    assert_nothing_unsealed(&e);
}

#[tokio::test]
async fn absolute_uri_naming_another_host_is_421() {
    let e = env().await;
    let key = e.sb.token("KEY");
    let text = raw_in_tunnel(
        &e,
        &format!("GET https://other.example.test/echo HTTP/1.1\r\nHost: api.example.test\r\nx-api-key: {key}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    super::assert_uniform(&text, 421, "authority_mismatch");
    assert_upstream_untouched(&e);
}

#[tokio::test]
async fn userinfo_in_host_or_uri_is_refused() {
    let e = env().await;
    for req in [
        "GET /echo HTTP/1.1\r\nHost: user@api.example.test\r\nConnection: close\r\n\r\n",
        "GET /echo HTTP/1.1\r\nHost: api.example.test@other.example.test\r\nConnection: close\r\n\r\n",
        "GET https://user@api.example.test/echo HTTP/1.1\r\nHost: api.example.test\r\nConnection: close\r\n\r\n",
        "GET https://api.example.test@other.example.test/echo HTTP/1.1\r\nHost: api.example.test\r\nConnection: close\r\n\r\n",
    ] {
        let text = raw_in_tunnel(&e, req).await;
        let s = status_of(&text);
        assert!(s == 400 || s == 421, "{req:?} → {text}");
    }
    assert_upstream_untouched(&e);
}

#[tokio::test]
async fn port_and_scheme_mismatches_are_421() {
    let e = env().await;
    for req in [
        "GET /echo HTTP/1.1\r\nHost: api.example.test:8443\r\nConnection: close\r\n\r\n",
        "GET /echo HTTP/1.1\r\nHost: api.example.test:80\r\nConnection: close\r\n\r\n",
        "GET https://api.example.test:444/echo HTTP/1.1\r\nHost: api.example.test\r\nConnection: close\r\n\r\n",
        "GET http://api.example.test/echo HTTP/1.1\r\nHost: api.example.test\r\nConnection: close\r\n\r\n",
    ] {
        let text = raw_in_tunnel(&e, req).await;
        assert_eq!(status_of(&text), 421, "{req:?} → {text}");
    }
    assert_upstream_untouched(&e);
}

#[tokio::test]
async fn missing_empty_and_duplicate_host_are_400() {
    let e = env().await;
    for req in [
        "GET /echo HTTP/1.1\r\nConnection: close\r\n\r\n",
        "GET /echo HTTP/1.1\r\nHost: \r\nConnection: close\r\n\r\n",
        "GET /echo HTTP/1.1\r\nHost: api.example.test\r\nHost: other.example.test\r\nConnection: close\r\n\r\n",
        "GET /echo HTTP/1.1\r\nHost: api.example.test, other.example.test\r\nConnection: close\r\n\r\n",
    ] {
        let text = raw_in_tunnel(&e, req).await;
        assert_eq!(status_of(&text), 400, "{req:?} → {text}");
    }
    assert_upstream_untouched(&e);
}

#[tokio::test]
async fn pipelined_second_request_for_another_host_is_421() {
    let e = env().await;
    let key = e.sb.token("KEY");
    let text = raw_in_tunnel(
        &e,
        &format!(
            "GET /echo HTTP/1.1\r\nHost: api.example.test\r\n\r\n\
             GET /echo HTTP/1.1\r\nHost: other.example.test\r\nx-api-key: {key}\r\n\r\n\
             GET /echo HTTP/1.1\r\nHost: api.example.test\r\nConnection: close\r\n\r\n"
        ),
    )
    .await;
    let statuses: Vec<&str> = text
        .match_indices("HTTP/1.1 ")
        .map(|(i, _)| &text[i + 9..i + 12])
        .collect();
    assert_eq!(statuses, ["200", "421", "200"], "{text}");
    let reqs = e.echo.requests();
    assert_eq!(reqs.len(), 2);
    assert!(reqs
        .iter()
        .all(|r| r.host.as_deref() == Some("api.example.test")));
    assert_nothing_unsealed(&e);
}

async fn good_h2(c: &mut hyper::client::conn::http2::SendRequest<pc::ReqBody>) -> StatusCode {
    let req = pc::get("https://api.example.test/echo", "", &[]);
    pc::send2(c, req).await.status
}

#[tokio::test]
async fn h2_stream_with_another_authority_is_421_and_siblings_are_served() {
    let e = env().await;
    let key = e.sb.token("KEY");
    let mut c = pc::h2(e.h.proxy, &e.sb, API).await;
    assert_eq!(good_h2(&mut c).await, StatusCode::OK);
    let bad = pc::get(
        "https://other.example.test/echo",
        "",
        &[("x-api-key", &key)],
    );
    let a = pc::send2(&mut c, bad).await;
    assert_eq!(a.status, StatusCode::MISDIRECTED_REQUEST);
    assert_eq!(a.code().as_deref(), Some("authority_mismatch"));
    let port = pc::get(
        "https://api.example.test:8443/echo",
        "",
        &[("x-api-key", &key)],
    );
    assert_eq!(
        pc::send2(&mut c, port).await.status,
        StatusCode::MISDIRECTED_REQUEST
    );
    assert_eq!(good_h2(&mut c).await, StatusCode::OK);
    let reqs = e.echo.requests();
    assert_eq!(reqs.len(), 2);
    assert!(reqs
        .iter()
        .all(|r| r.host.as_deref() == Some("api.example.test")));
    assert_nothing_unsealed(&e);
}

#[tokio::test]
async fn h2_host_header_disagreeing_with_authority_is_refused() {
    let e = env().await;
    let key = e.sb.token("KEY");
    let mut c = pc::h2(e.h.proxy, &e.sb, API).await;
    let req = pc::get(
        "https://api.example.test/echo",
        "other.example.test",
        &[("x-api-key", &key)],
    );
    let a = pc::send2(&mut c, req).await;
    assert!(a.status.is_client_error(), "{}", a.status);
    assert_upstream_untouched(&e);
    assert_nothing_unsealed(&e);
}

#[tokio::test]
async fn inner_connect_is_refused_and_the_connection_closed() {
    let e = env().await;
    let text = raw_in_tunnel(
        &e,
        "CONNECT other.example.test:443 HTTP/1.1\r\nHost: other.example.test:443\r\n\r\n\
         GET /echo HTTP/1.1\r\nHost: api.example.test\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&text), 405, "{text}");
    assert_eq!(
        text.matches("HTTP/1.1 ").count(),
        1,
        "nothing served after: {text}"
    );
    assert_upstream_untouched(&e);
}

#[tokio::test]
async fn refused_websocket_upgrade_closes_the_connection() {
    let e = env().await;
    let text = raw_in_tunnel(
        &e,
        "GET /echo HTTP/1.1\r\nHost: api.example.test\r\nUpgrade: SPDY/3.1\r\nConnection: Upgrade\r\n\r\n\
         GET /echo HTTP/1.1\r\nHost: api.example.test\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&text), 400, "{text}");
    assert_eq!(
        text.matches("HTTP/1.1 ").count(),
        1,
        "nothing served after: {text}"
    );
    assert_upstream_untouched(&e);
}

#[tokio::test]
async fn sni_naming_another_host_fails_the_handshake_with_no_leaf() {
    let e = env().await;
    let tcp = pc::connect(e.h.proxy, Some(&e.sb.proxy_auth()), API)
        .await
        .unwrap();
    let r = pc::tls(tcp, &e.sb.ca_pem, "other.example.test", &[b"http/1.1"]).await;
    assert!(r.is_err(), "handshake with a mismatched SNI succeeded");
    assert_eq!(mints(&e), 0, "a leaf was minted for the SNI host");
    assert_upstream_untouched(&e);
}
