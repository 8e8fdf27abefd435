//! Address vetting: the proxy never dials loopback, private, link-local/metadata, CGNAT, ULA,
//! unspecified, multicast addresses or their IPv6-embedded forms, nor its own listeners —
//! whatever the store's allowlist says. These daemons run without the test default
//! `allow_private_cidrs = ["127.0.0.0/8"]`; `[upstream] resolve` overrides still reach the echo.

use std::time::Duration;

use http::StatusCode;

use super::{
    assert_uniform, assert_upstream_untouched, connect_status, exchange, get_api, h1_over, mints,
    raw_proxy, tls_tunnel,
};
use crate::proxy_explicit::{setup, setup_with, Env};
use crate::support::daemon::Opts;
use crate::support::proxy_client as pc;

fn strict() -> Opts {
    Opts {
        strict_vetting: true,
        ..Default::default()
    }
}

/// Every `host:443` CONNECT is refused 403 `egress_denied` by address vetting, before any
/// leaf or upstream connection.
async fn assert_vetted(e: &Env, hosts: &[&str]) {
    for host in hosts {
        let (status, text) = connect_status(e, &format!("{host}:443")).await;
        assert_eq!(status, 403, "{host}: {text}");
        assert!(text.contains("egress_denied"), "{host}: {text}");
        assert!(text.contains("address vetting"), "{host}: {text}");
    }
    assert_upstream_untouched(e);
    assert_eq!(mints(e), 0, "a leaf was minted for a vetted-out address");
}

async fn any_host() -> Env {
    setup_with(None, &[], strict()).await
}

#[tokio::test]
async fn loopback_literals_are_refused_at_connect() {
    let e = any_host().await;
    assert_vetted(&e, &["127.0.0.1", "127.255.255.254", "[::1]"]).await;
    // The echo's own port: refused although something listens there.
    let (status, _) = connect_status(&e, &format!("127.0.0.1:{}", e.echo.addr.port())).await;
    assert_eq!(status, 403);
    assert_upstream_untouched(&e);
}

#[tokio::test]
async fn rfc1918_literals_are_refused_at_connect() {
    let e = any_host().await;
    assert_vetted(
        &e,
        &["10.0.0.1", "172.16.0.1", "172.31.255.255", "192.168.1.1"],
    )
    .await;
}

#[tokio::test]
async fn metadata_and_link_local_literals_are_refused_at_connect() {
    let e = any_host().await;
    assert_vetted(
        &e,
        &[
            "169.254.169.254",
            "169.254.0.1",
            "[fd00:ec2::254]",
            "100.100.100.200",
            "[fe80::1]",
        ],
    )
    .await;
}

#[tokio::test]
async fn cgnat_ula_unspecified_and_multicast_literals_are_refused_at_connect() {
    let e = any_host().await;
    assert_vetted(
        &e,
        &[
            "100.64.0.1",
            "100.127.255.254",
            "[fc00::1]",
            "[fdff::1]",
            "0.0.0.0",
            "0.1.2.3",
            "[::]",
            "224.0.0.1",
            "255.255.255.255",
            "[ff02::1]",
            "198.18.0.1",
        ],
    )
    .await;
}

#[tokio::test]
async fn ipv6_embedded_forms_of_private_addresses_are_refused_at_connect() {
    let e = any_host().await;
    assert_vetted(
        &e,
        &[
            "[::ffff:127.0.0.1]",
            "[::ffff:7f00:1]",
            "[::ffff:169.254.169.254]",
            "[::ffff:10.0.0.1]",
            "[::127.0.0.1]",
            "[::a9fe:a9fe]",
            "[64:ff9b::a9fe:a9fe]",
            "[64:ff9b::7f00:1]",
            "[64:ff9b:1::a00:1]",
            "[2002:a9fe:a9fe::]",
            "[2002:7f00:1::1]",
        ],
    )
    .await;
}

#[tokio::test]
async fn allowlist_star_does_not_open_private_addresses() {
    let e = setup_with(Some(&["*"]), &[], strict()).await;
    assert_vetted(&e, &["127.0.0.1", "10.1.2.3", "169.254.169.254", "[::1]"]).await;
}

#[tokio::test]
async fn plain_http_to_a_private_literal_is_refused() {
    let e = any_host().await;
    let req = format!(
        "GET http://169.254.169.254/latest/meta-data/ HTTP/1.1\r\nHost: 169.254.169.254\r\nProxy-Authorization: {}\r\nConnection: close\r\n\r\n",
        e.sb.proxy_auth()
    );
    let text = raw_proxy(e.h.proxy, req.as_bytes()).await;
    assert_uniform(&text, 403, "egress_denied");
    assert_upstream_untouched(&e);
}

#[tokio::test]
async fn names_resolving_to_loopback_are_refused_after_dns() {
    // `localhost` resolves (from /etc/hosts, no network) to loopback only.
    let e = any_host().await;
    super::allow_any_host_on(&e, &[e.echo.addr.port()]).await;
    let target = format!("localhost:{}", e.echo.addr.port());
    let tls = tls_tunnel(&e, &target, "localhost").await;
    let mut c = h1_over(tls).await;
    let a = pc::send1(&mut c, pc::get("/echo", &target, &[])).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN, "{}", a.text());
    assert_eq!(a.code().as_deref(), Some("egress_denied"));
    assert!(a.text().contains("loopback"), "{}", a.text());
    assert_upstream_untouched(&e);
}

#[tokio::test]
async fn resolve_override_is_trusted_as_written() {
    // api.example.test → 127.0.0.1:<echo> is an operator-written override: vetting trusts it.
    let e = setup_with(Some(&["api.example.test"]), &[], strict()).await;
    let a = get_api(&e, "/echo", &[]).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert_eq!(e.echo.requests().len(), 1);
}

#[tokio::test]
async fn connect_to_own_listeners_is_refused_even_when_loopback_is_open() {
    // Test default: 127.0.0.0/8 allowed, and the allowlist names both ports (an unrestricted
    // store only reaches 443/80): vetting alone keeps the proxy's and admin API's ports out.
    let e = setup(None, &[]).await;
    let admin: std::net::SocketAddr = e.h.admin_url.trim_start_matches("http://").parse().unwrap();
    super::allow_any_host_on(&e, &[admin.port(), e.h.proxy.port()]).await;
    for target in [
        format!("127.0.0.1:{}", admin.port()),
        format!("127.0.0.1:{}", e.h.proxy.port()),
        format!("[::ffff:127.0.0.1]:{}", admin.port()),
    ] {
        let (status, text) = connect_status(&e, &target).await;
        assert_eq!(status, 403, "{target}: {text}");
        assert!(text.contains("own listeners"), "{target}: {text}");
    }
    // By name: the CONNECT passes (names are vetted once resolved), the request does not.
    let target = format!("localhost:{}", admin.port());
    let mut tls = tls_tunnel(&e, &target, "localhost").await;
    let req = format!(
        "GET /v1/stores HTTP/1.1\r\nHost: {target}\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
        e.h.token
    );
    let text = exchange(&mut tls, req.as_bytes(), Duration::from_secs(5)).await;
    assert_uniform(&text, 403, "egress_denied");
    assert!(!text.contains("\"name\""), "admin answered: {text}");
}
