//! Destination parsing: the CONNECT target is normalised once, strictly, before any policy
//! decision, DNS lookup, leaf mint or upstream connection.

use std::time::Duration;

use http::StatusCode;

use super::{assert_upstream_untouched, connect_status, exchange, h1_over, mints, tls_tunnel};
use crate::proxy_explicit::{setup, Spec};
use crate::support::daemon::logs_text;
use crate::support::proxy_client as pc;

/// Asserts every target is refused at CONNECT with `status` and nothing reached the upstream.
async fn refused_all(e: &crate::proxy_explicit::Env, targets: &[&str], status: u16) {
    for t in targets {
        let (got, text) = connect_status(e, t).await;
        assert_eq!(got, status, "CONNECT {t:?}: {text}");
        // The uniform answer (DESIGN §5), not hyper's bare 400 for a target that is no URI.
        let text = text.to_ascii_lowercase();
        assert!(
            text.contains("x-sealgate-error:") && text.contains("{\"error\":{\"code\":"),
            "CONNECT {t:?}: {text}"
        );
    }
    assert_upstream_untouched(e);
    assert_eq!(mints(e), 0, "a leaf was minted for a refused target");
}

#[tokio::test]
async fn case_and_trailing_dot_variants_reach_the_same_host() {
    let secrets: &[Spec] = &[("KEY", "sk-adv-case-0101", None, Some(&["header"]))];
    let e = setup(Some(&["api.example.test"]), secrets).await;
    let key = e.sb.token("KEY");
    for (target, host) in [
        ("API.EXAMPLE.TEST:443", "API.EXAMPLE.TEST"),
        ("Api.Example.Test.:443", "api.example.test."),
        ("api.example.test.:443", "Api.Example.Test:443"),
    ] {
        let tls = tls_tunnel(&e, target, "api.example.test").await;
        let mut c = h1_over(tls).await;
        let a = pc::send1(&mut c, pc::get("/echo", host, &[("x-api-key", &key)])).await;
        assert_eq!(a.status, StatusCode::OK, "{target}: {}", a.text());
    }
    let reqs = e.echo.requests();
    assert_eq!(reqs.len(), 3);
    for r in &reqs {
        assert_eq!(r.host.as_deref(), Some("api.example.test"));
        assert_eq!(r.header("x-api-key").as_deref(), Some("sk-adv-case-0101"));
    }
    assert_eq!(mints(&e), 1, "one leaf for the one normalised name");
}

#[tokio::test]
async fn lookalike_names_are_refused_at_connect() {
    let e = setup(Some(&["api.example.test", "*.wild.example.test"]), &[]).await;
    refused_all(
        &e,
        &[
            "evil-api.example.test:443",
            "api.example.test.evil.test:443",
            "apiexample.test:443",
            "xapi.example.test:443",
            "api.example.tes:443",
            "api.example.test.test:443",
            "wild.example.test:443",
            "evil-wild.example.test:443",
            "api.example.test:8443",
        ],
        403,
    )
    .await;
    assert_eq!(
        connect_status(&e, "a.b.wild.example.test:443").await.0,
        200,
        "control: a real subdomain of the *. pattern"
    );
}

#[tokio::test]
async fn userinfo_brackets_and_bad_ports_are_400() {
    // Any host is allowed: only the parser stands in the way.
    let e = setup(None, &[]).await;
    refused_all(
        &e,
        &[
            "user@api.example.test:443",
            "user:pw@api.example.test:443",
            "api.example.test@other.example.test:443",
            "api.example.test",
            "api.example.test:",
            "api.example.test:0",
            "api.example.test:+443",
            "api.example.test:-443",
            "api.example.test:0443",
            "api.example.test:65536",
            "api.example.test:4294967739",
            "api.example.test:443:443",
            "[api.example.test]:443",
            "[::1",
            "::1:443",
            "[::1]",
            "api.example.test:443/x",
            // Absolute forms: hyper parses them, sealgate used their authority (h38a).
            "https://api.example.test:443",
            "http://api.example.test:443/x?y",
            "ftp://api.example.test:443",
        ],
        400,
    )
    .await;
}

#[tokio::test]
async fn non_ascii_percent_and_zero_width_hosts_are_400() {
    let e = setup(None, &[]).await;
    refused_all(
        &e,
        &[
            "api\u{3002}example.test:443",
            "api.example.test\u{3002}:443",
            "api\u{200b}.example.test:443",
            "api.example.test\u{200b}:443",
            "\u{0430}pi.example.test:443",
            "api.ex\u{e1}mple.test:443",
            "api%2eexample.test:443",
            "api.example.test%00:443",
            "api.example.test%0d%0a:443",
            "[fe80::1%25eth0]:443",
            "api_example.test:443",
            "api..example.test:443",
            ".api.example.test:443",
            "api.example.test..:443",
            "-api.example.test:443",
            "exa%mple.test:443",
            "api.example.test:443:99",
        ],
        400,
    )
    .await;
}

#[tokio::test]
async fn non_ascii_host_header_in_tunnel_is_400() {
    let e = setup(Some(&["api.example.test"]), &[]).await;
    let mut tls = tls_tunnel(&e, super::API, "api.example.test").await;
    let req = "GET /echo HTTP/1.1\r\nHost: api.example.test\u{3002}\r\nConnection: close\r\n\r\n";
    let text = exchange(&mut tls, req.as_bytes(), Duration::from_secs(5)).await;
    assert_eq!(super::status_of(&text), 400, "{text}");
    assert_upstream_untouched(&e);
}

#[tokio::test]
async fn legacy_ipv4_spellings_never_reach_the_resolver() {
    // 127.0.0.0/8 is open (test default), so a spelling that getaddrinfo turns into 127.0.0.1
    // would reach the echo upstream on this port: refusing it at parse time is what keeps it out.
    let e = setup(None, &[]).await;
    let port = e.echo.addr.port();
    let spellings = [
        "0x7f.1",
        "127.1",
        "127.0.1",
        "2130706433",
        "0177.0.0.1",
        "0x7f000001",
        "0x7f.0.0.1",
        "127.0.0.01",
        "127.000.000.001",
        "017700000001",
        "0x7F.1",
    ];
    for s in spellings {
        let (status, text) = connect_status(&e, &format!("{s}:{port}")).await;
        assert_eq!(status, 400, "{s}: {text}");
        assert!(text.contains("bad_request"), "{s}: {text}");
    }
    assert_upstream_untouched(&e);
    let logs = logs_text();
    for s in spellings {
        assert!(
            !logs.contains(&format!("cannot resolve {s}")),
            "{s} reached the resolver"
        );
    }
    // Control: the canonical spelling of the same address does reach the upstream (once the
    // allowlist names the port: an unrestricted store reaches only 443 and 80).
    super::allow_any_host_on(&e, &[port]).await;
    let target = format!("127.0.0.1:{port}");
    let tls = tls_tunnel(&e, &target, "127.0.0.1").await;
    let mut c = h1_over(tls).await;
    let a = pc::send1(&mut c, pc::get("/echo", &target, &[])).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert_eq!(e.echo.requests().len(), 1);
}

/// A CONNECT to port 80 of a host the store allows (a pattern without a port allows 80 for
/// plain HTTP only) is the uniform 400 saying to send plain HTTP in absolute form, as plain
/// HTTP inside a tunnel gets; it was `egress_denied` "not in the store's egress_allowlist",
/// which sent operators to the allowlist (outside pass: `ws://` clients tunnel with CONNECT).
/// A host the store does not allow stays `egress_denied`.
#[tokio::test]
async fn a_connect_to_a_plain_http_port_says_how_to_send_plain_http() {
    let e = setup(Some(&["api.example.test"]), &[]).await;
    let (status, text) = connect_status(&e, "api.example.test:80").await;
    assert_eq!(status, 400, "{text}");
    assert!(
        text.contains("bad_request") && text.contains("absolute form"),
        "{text}"
    );
    let (status, text) = connect_status(&e, "other.example.test:80").await;
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("egress_denied"), "{text}");
    assert_upstream_untouched(&e);
    assert_eq!(mints(&e), 0);
}
