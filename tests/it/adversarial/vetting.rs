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

/// A namespace this test makes, standing in for a host with a public address of its own
/// (on its `lo`: nothing leaves it); processes started in it are killed, and it is deleted,
/// on drop.
struct PublicHost {
    name: String,
    procs: Vec<std::process::Child>,
}

/// The public addresses the stand-in host holds (11.0.0.0/8 is publicly routed, not
/// reserved; 2a00:1450::/32 is global unicast).
const HOST_PUBLIC: &str = "11.22.33.44";
const HOST_PUBLIC6: &str = "2a00:1450:4001::10";
/// Addresses in public ranges the stand-in host routes to its `lo` ("AnyIP": held by no
/// interface, yet every one of them is this host's).
const ANYIP: &str = "11.23.4.5";
const ANYIP6: &str = "2a00:1450:4002::7";

impl PublicHost {
    fn new() -> PublicHost {
        let name = format!("sgt-pub-{}", std::process::id());
        let ip = |args: &[&str]| crate::transparent::run_ok("ip", args).expect("ip");
        ip(&["netns", "add", &name]);
        let host = PublicHost {
            name,
            procs: Vec::new(),
        };
        let cidr = format!("{HOST_PUBLIC}/32");
        ip(&["-n", &host.name, "link", "set", "lo", "up"]);
        ip(&["-n", &host.name, "addr", "add", &cidr, "dev", "lo"]);
        let cidr6 = format!("{HOST_PUBLIC6}/128");
        ip(&[
            "-n", &host.name, "addr", "add", &cidr6, "dev", "lo", "nodad",
        ]);
        let anyip = "11.23.0.0/16";
        let anyip6 = "2a00:1450:4002::/64";
        let n = host.name.as_str();
        ip(&["-n", n, "route", "add", "local", anyip, "dev", "lo"]);
        ip(&["-n", n, "-6", "route", "add", "local", anyip6, "dev", "lo"]);
        // `ip netns exec` mounts this file over /etc/hosts: names the daemon resolves itself.
        let etc = host.etc();
        std::fs::create_dir_all(&etc).unwrap();
        let hosts = format!("{HOST_PUBLIC} own.example.test\n{ANYIP6} any6.example.test\n");
        std::fs::write(etc.join("hosts"), hosts).unwrap();
        host
    }

    /// The namespace's own `/etc` overlay (`ip netns exec` mounts the files it holds).
    fn etc(&self) -> std::path::PathBuf {
        std::path::Path::new("/etc/netns").join(&self.name)
    }

    /// `argv` run in the namespace, output captured.
    fn run(&self, argv: &[&str]) -> std::process::Output {
        std::process::Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(argv)
            .output()
            .expect("ip netns exec")
    }

    /// `argv` started in the namespace, left running until drop.
    fn start(&mut self, argv: &[&str], log: &std::path::Path) {
        let out = std::fs::File::create(log).unwrap();
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(argv)
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("spawn in the namespace");
        self.procs.push(child);
    }
}

impl Drop for PublicHost {
    fn drop(&mut self) {
        for p in &mut self.procs {
            let _ = p.kill();
            let _ = p.wait();
        }
        let _ = crate::transparent::run_ok("ip", &["netns", "del", &self.name]);
        let _ = std::fs::remove_dir_all(self.etc());
    }
}

/// A host's own *public* address (a public IPv4 on an interface, a global IPv6) passed
/// vetting, and a sandbox reached every service of the host listening on all addresses
/// through it, sealgate's own wildcard proxy listener included (outside review; the host's
/// addresses cannot be listed without I/O). A connection that lands on this host is refused.
/// The daemon, a canary web server and curl run in a namespace of the test's own whose `lo`
/// holds a public address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_public_address_of_this_host_is_refused_like_loopback() {
    if !crate::transparent::netns_ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{0}/data\"\ncert_dir = \"{0}/certs\"\n[admin]\nlisten = \"127.0.0.1:7070\"\n\
             [proxy]\nlisten = \"0.0.0.0:3128\"\n[sandbox]\nmemory_max_mib = 0\npids_max = 0\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let mut host = PublicHost::new();
    let bin = env!("CARGO_BIN_EXE_sealgate");
    let cfg = config.to_str().unwrap();
    host.start(
        &["python3", "-m", "http.server", "8080", "--bind", "::"],
        &dir.path().join("canary.log"),
    );
    host.start(
        &[bin, "--config", cfg, "serve"],
        &dir.path().join("daemon.log"),
    );
    let curl = |args: &[&str]| {
        let mut argv = vec!["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}"];
        argv.extend(args);
        String::from_utf8_lossy(&host.run(&argv).stdout).into_owned()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while curl(&["http://127.0.0.1:7070/healthz"]) != "200"
        || curl(&[&format!("http://{HOST_PUBLIC}:8080/")]) != "200"
    {
        assert!(
            std::time::Instant::now() < deadline,
            "daemon or canary not up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cli = |args: &[&str]| {
        let mut argv = vec![bin, "--config", cfg];
        argv.extend(args);
        let out = host.run(&argv);
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    cli(&[
        "store", "create", "pub", "--allow", "*:8080", "--allow", "*:8081", "--allow", "*:3128",
    ]);
    let exports = cli(&["sandbox", "create", "--store", "pub", "--export"]);
    let proxy = exports
        .lines()
        .find_map(|l| l.strip_prefix("export HTTP_PROXY="))
        .expect("HTTP_PROXY in the exports")
        .trim_matches('\'');
    // The canary on both families and on AnyIP ranges (an IPv6 one gives a connection whose
    // source is another address: only the routing table tells); the proxy's own listener
    // (IPv4 only) on its port; a closed port, which answers as an open one does (no port scan).
    let v6 = format!("[{HOST_PUBLIC6}]");
    let anyip6 = format!("[{ANYIP6}]");
    for (host, port) in [
        (HOST_PUBLIC, "8080"),
        (&v6, "8080"),
        (ANYIP, "8080"),
        (&anyip6, "8080"),
        (HOST_PUBLIC, "3128"),
        (HOST_PUBLIC, "8081"),
        (&anyip6, "8081"),
        ("own.example.test", "8080"),
        ("any6.example.test", "8081"),
    ] {
        let url = format!("http://{host}:{port}/");
        let code = curl(&["-x", proxy, &url]);
        assert_eq!(code, "403", "{url} through the proxy");
    }
    // The audit writer is a thread of its own: the last line may land after curl's answer.
    let log = dir.path().join("daemon.log");
    let audit = loop {
        let audit = std::fs::read_to_string(&log).unwrap_or_default();
        if audit.contains("any6.example.test") || std::time::Instant::now() > deadline {
            break audit;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let canary = std::fs::read_to_string(dir.path().join("canary.log")).unwrap();
    assert_eq!(
        canary.matches("GET / ").count(),
        1,
        "only the readiness probe: {canary}"
    );
    assert!(audit.contains("an address of this host"), "{audit}");
    // Names are refused after DNS, by the connector, before it dials.
    for name in ["own.example.test", "any6.example.test"] {
        let said = format!("{name}: refusing to connect to");
        assert!(audit.contains(&said), "{said}: {audit}");
    }
}
