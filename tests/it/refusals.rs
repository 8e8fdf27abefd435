//! Every refusal code of DESIGN.md §5, in both modes, leaves exactly one audit line and one
//! `sealgate_requests_total` increment (issue 15: "one refusal-audit function").
//!
//! | code | explicit | transparent |
//! |---|---|---|
//! | `proxy_auth_required` | CONNECT without credentials, or with two (407) | a source IP no sandbox owns: closed |
//! | `egress_denied` | CONNECT off the allowlist; a metadata IP literal; plain `http://` off the allowlist | SNI off the allowlist; no SNI (IP literal); plain `Host` off the allowlist |
//! | `secret_host_denied` | a token whose secret may not go to the tunnel's host | same, inside a transparent TLS connection |
//! | `authority_mismatch` | `Host` naming another host; SNI naming another host than CONNECT | `Host` naming another host; plain `Host` naming another port. (An SNI mismatch cannot occur: the SNI *is* the destination.) |
//! | `bad_request` | bad CONNECT target; neither CONNECT nor absolute form; `https://` in plain form; bad plain URI; CL+TE on the proxy connection; an `Upgrade` other than WebSocket (`SPDY/3.1`) in a tunnel; plain HTTP inside a tunnel | an SNI that is not a host name; duplicate plain `Host`; a plain `Host` that is not a host; `Upgrade: SPDY/3.1` |
//! | `request_too_large` | more header fields than `proxy.max_header_fields`, on the proxy connection and in a tunnel | the same, in a TLS connection and on a plain head |
//! | `upstream_tls_error` | an upstream whose certificate does not name it | same |
//! | `upstream_unreachable` | a closed upstream port (tunnel and plain `http://`) | same (TLS) |
//! | `upstream_timeout` | an upstream that never answers the TLS handshake | same |
//!
//! Explicit cases run one at a time, each checked on its own. Transparent cases run inside one
//! `sealgate sandbox exec` (a namespace per exec is expensive): each case names a distinct
//! host, path or rule, so the test finds exactly one line per case, and the totals (audit
//! lines, metric increments per code and overall) must equal the number of cases.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode};
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::adversarial::{assert_uniform, exchange, raw_proxy, status_of};
use crate::support::daemon::{Harness, Opts};
use crate::support::echo::Echo;
use crate::support::pki::TestPki;
use crate::support::proxy_client::{self as pc, SandboxCreds};
use crate::support::raw::RawListener;
use crate::transparent;

const KEY: &str = "sk-refusals-real-0001";
const KEY2: &str = "sk-refusals-real-0002";
/// The allowlist: the echo, three broken upstreams, the plain echo, a metadata literal.
const ALLOW: &[&str] = &[
    "api.example.test",
    "badtls.example.test",
    "down.example.test",
    "slow.example.test",
    "plain.example.test",
    "169.254.169.254",
];
/// `proxy.max_header_fields` here; [`many_fields`] sends more.
const MAX_FIELDS: usize = 20;

/// The upstreams; kept alive with the daemon.
struct World {
    h: Harness,
    echo: Echo,
    plain: Echo,
    _slow: RawListener,
}

/// `api` → the TLS echo; `badtls` → the same echo (its certificate does not name `badtls`);
/// `down` → a closed port; `slow` → a listener that never speaks; `plain` → a plain echo.
async fn world(proxy_toml: &str) -> World {
    let pki = Arc::new(TestPki::new());
    let echo = Echo::start_tls(pki.server_config(&["api.example.test"], &[])).await;
    let plain = Echo::start_plain().await;
    let slow = RawListener::start("127.0.0.1".parse().unwrap()).await;
    let down = std::net::SocketAddr::from(([127, 0, 0, 1], crate::support::ports::free_port()));
    let mut opts = Opts {
        proxy_toml: format!("max_header_fields = {MAX_FIELDS}\n{proxy_toml}"),
        upstream_toml: "connect_timeout_secs = 2\n".into(),
        sandbox_toml: "run_as = \"nobody\"\n".into(),
        ..Opts::default()
    };
    let resolve: [(&str, SocketAddr); 5] = [
        ("api.example.test", echo.addr),
        ("badtls.example.test", echo.addr),
        ("down.example.test", down),
        ("slow.example.test", slow.addr),
        ("plain.example.test", plain.addr),
    ];
    for (n, a) in resolve {
        opts.resolve.push((n.into(), a));
    }
    let h = Harness::try_start(opts, Some(pki))
        .await
        .expect("daemon starts");
    let store = h.store("s", Some(ALLOW)).await;
    h.secret(&store, "KEY", KEY, None, Some(&["header"])).await;
    let nowhere = ["nowhere.example.test"];
    h.secret(&store, "KEY2", KEY2, Some(&nowhere), Some(&["header"]))
        .await;
    World {
        h,
        echo,
        plain,
        _slow: slow,
    }
}

// ---- counting -------------------------------------------------------------------------------

/// The audit log's request lines.
fn audit_lines(h: &Harness) -> Vec<Value> {
    h.audit_log()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("audit line is JSON"))
        .filter(|v| v["kind"] == "request")
        .collect()
}

/// `sealgate_requests_total` by `code` label.
async fn requests_by_code(h: &Harness) -> BTreeMap<String, f64> {
    let (s, body) = h
        .raw(Method::GET, "/metrics", None, Some(&h.token.clone()))
        .await;
    assert_eq!(s, StatusCode::OK);
    let text = String::from_utf8(body.to_vec()).unwrap();
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("sealgate_requests_total{") else {
            continue;
        };
        let code = rest
            .split("code=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        let v: f64 = line.rsplit_once(' ').unwrap().1.parse().unwrap();
        *out.entry(code.to_owned()).or_default() += v;
    }
    out
}

fn delta(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    let mut d = BTreeMap::new();
    for (k, v) in after {
        let x = v - before.get(k).copied().unwrap_or(0.0);
        if x != 0.0 {
            d.insert(k.clone(), x);
        }
    }
    d
}

/// Runs one explicit case and checks: exactly one new audit line, with `code` and mode
/// `explicit`, and exactly one new `requests_total` sample, with `code`.
async fn one_refusal<F: std::future::Future<Output = ()>>(w: &World, code: &str, case: F) {
    let lines = audit_lines(&w.h).len();
    let before = requests_by_code(&w.h).await;
    case.await;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while audit_lines(&w.h).len() == lines {
        assert!(
            std::time::Instant::now() < deadline,
            "{code}: no audit line"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let new = audit_lines(&w.h).split_off(lines);
    assert_eq!(new.len(), 1, "{code}: audit lines {new:#?}");
    assert_eq!(new[0]["code"], code, "{:#?}", new[0]);
    assert_eq!(new[0]["mode"], "explicit", "{:#?}", new[0]);
    let d = delta(&before, &requests_by_code(&w.h).await);
    assert_eq!(
        d,
        BTreeMap::from([(code.to_owned(), 1.0)]),
        "{code}: metrics"
    );
}

/// A request head with more header fields than `proxy.max_header_fields`.
fn many_fields(lines: &str) -> String {
    let extra: String = (0..MAX_FIELDS + 5)
        .map(|i| format!("x-f{i}: 1\r\n"))
        .collect();
    format!("{lines}{extra}\r\n")
}

// ---- explicit -------------------------------------------------------------------------------

/// One GET inside a fresh tunnel to `target`; the answer's status and code.
async fn tunnel_get(
    w: &World,
    sb: &SandboxCreds,
    target: &str,
    req: http::Request<pc::ReqBody>,
) -> pc::Answer {
    let mut c = pc::h1(w.h.proxy, sb, target).await;
    pc::send1(&mut c, req).await
}

/// Raw bytes to the explicit listener with the sandbox's credentials inserted after the
/// request line; the uniform refusal must come back.
async fn raw_refused(w: &World, sb: &SandboxCreds, line: &str, status: u16, code: &str) {
    let req = format!(
        "{line}\r\nProxy-Authorization: {}\r\nConnection: close\r\n\r\n",
        sb.proxy_auth()
    );
    assert_uniform(&raw_proxy(w.h.proxy, req.as_bytes()).await, status, code);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_explicit_refusal_is_audited_and_counted_once() {
    let w = world("").await;
    let sb = SandboxCreds::from_answer(&w.h.sandbox("s").await);
    let key2 = sb.token("KEY2");
    let api = "api.example.test";

    one_refusal(&w, "proxy_auth_required", async {
        let r = pc::connect(w.h.proxy, None, "api.example.test:443").await;
        assert_eq!(r.unwrap_err().status, 407);
    })
    .await;
    one_refusal(&w, "proxy_auth_required", async {
        // Two credentials name no sandbox, even when both are right.
        let line = format!(
            "CONNECT {api}:443 HTTP/1.1\r\nHost: {api}:443\r\nProxy-Authorization: {}",
            sb.proxy_auth()
        );
        raw_refused(&w, &sb, &line, 407, "proxy_auth_required").await;
    })
    .await;
    one_refusal(&w, "bad_request", async {
        // Plain HTTP inside a tunnel (`curl --proxytunnel http://…`): a 400 it can read.
        let req = format!(
            "CONNECT {api}:443 HTTP/1.1\r\nHost: {api}:443\r\nProxy-Authorization: {}\r\n\r\n\
             GET /plain HTTP/1.1\r\nHost: {api}\r\nConnection: close\r\n\r\n",
            sb.proxy_auth()
        );
        let text = raw_proxy(w.h.proxy, req.as_bytes()).await;
        let (connect, inner) = text.split_once("\r\n\r\n").expect("two answers");
        assert_eq!(status_of(connect), 200, "{text}");
        assert_uniform(inner, 400, "bad_request");
        assert!(inner.contains("absolute form"), "{inner}");
    })
    .await;
    for target in ["denied.example.test:443", "169.254.169.254:443"] {
        one_refusal(&w, "egress_denied", async {
            let r = pc::connect(w.h.proxy, Some(&sb.proxy_auth()), target).await;
            assert_eq!(r.unwrap_err().status, 403, "{target}");
        })
        .await;
    }
    one_refusal(&w, "egress_denied", async {
        let line = "GET http://denied.example.test/ HTTP/1.1\r\nHost: denied.example.test";
        raw_refused(&w, &sb, line, 403, "egress_denied").await;
    })
    .await;
    one_refusal(&w, "secret_host_denied", async {
        let req = pc::get("/t-secret", api, &[("x-api-key", &key2)]);
        let a = tunnel_get(&w, &sb, "api.example.test:443", req).await;
        assert_eq!(a.code().as_deref(), Some("secret_host_denied"));
    })
    .await;
    one_refusal(&w, "authority_mismatch", async {
        let req = pc::get("/t-authority", "other.example.test", &[]);
        let a = tunnel_get(&w, &sb, "api.example.test:443", req).await;
        assert_eq!(a.status, StatusCode::MISDIRECTED_REQUEST);
    })
    .await;
    one_refusal(&w, "authority_mismatch", async {
        let tcp = pc::connect(w.h.proxy, Some(&sb.proxy_auth()), "api.example.test:443")
            .await
            .expect("CONNECT accepted");
        let tls = pc::tls(tcp, &sb.ca_pem, "other.example.test", &[b"http/1.1"]).await;
        assert!(tls.is_err(), "no handshake for another SNI");
    })
    .await;
    explicit_bad_requests(&w, &sb).await;
    one_refusal(&w, "request_too_large", async {
        let line =
            many_fields("GET http://plain.example.test/ HTTP/1.1\r\nHost: plain.example.test\r\n");
        assert_eq!(status_of(&raw_proxy(w.h.proxy, line.as_bytes()).await), 431);
    })
    .await;
    one_refusal(&w, "request_too_large", async {
        let tcp = pc::connect(w.h.proxy, Some(&sb.proxy_auth()), "api.example.test:443")
            .await
            .unwrap();
        let mut tls = pc::tls(tcp, &sb.ca_pem, api, &[b"http/1.1"]).await.unwrap();
        let head = many_fields("GET /t-large HTTP/1.1\r\nHost: api.example.test\r\n");
        let text = exchange(&mut tls, head.as_bytes(), Duration::from_secs(5)).await;
        assert_eq!(status_of(&text), 431, "{text}");
    })
    .await;
    for (host, code, status) in [
        ("badtls.example.test", "upstream_tls_error", 502),
        ("down.example.test", "upstream_unreachable", 502),
        ("slow.example.test", "upstream_timeout", 504),
    ] {
        one_refusal(&w, code, async {
            let target = format!("{host}:443");
            let a = tunnel_get(&w, &sb, &target, pc::get("/t-up", host, &[])).await;
            assert_eq!(a.status.as_u16(), status, "{host}");
        })
        .await;
    }
    one_refusal(&w, "upstream_unreachable", async {
        let line = "GET http://down.example.test/ HTTP/1.1\r\nHost: down.example.test";
        raw_refused(&w, &sb, line, 502, "upstream_unreachable").await;
    })
    .await;
    assert_eq!(
        w.echo.requests().len(),
        0,
        "no refused request reached the echo"
    );
    assert!(w.plain.requests().is_empty());
}

/// Every `bad_request` the explicit listener can give, before and inside a tunnel.
async fn explicit_bad_requests(w: &World, sb: &SandboxCreds) {
    let lines = [
        "CONNECT 0x7f.1:443 HTTP/1.1\r\nHost: 0x7f.1:443",
        "GET /relative HTTP/1.1\r\nHost: api.example.test",
        "GET https://api.example.test/ HTTP/1.1\r\nHost: api.example.test",
        "GET http://0x7f.1/ HTTP/1.1\r\nHost: 0x7f.1",
        "POST http://plain.example.test/ HTTP/1.1\r\nHost: plain.example.test\r\n\
         Content-Length: 3\r\nTransfer-Encoding: chunked",
    ];
    for line in lines {
        one_refusal(
            w,
            "bad_request",
            raw_refused(w, sb, line, 400, "bad_request"),
        )
        .await;
    }
    one_refusal(w, "bad_request", async {
        let req = pc::get("/t-upgrade", "api.example.test", &[("upgrade", "SPDY/3.1")]);
        let a = tunnel_get(w, sb, "api.example.test:443", req).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST);
    })
    .await;
}

// ---- transparent ----------------------------------------------------------------------------

/// One transparent case: the audit line it must leave (code, host — `GW` stands for the
/// namespace's gateway —, and a path or rule fragment that tells it from the others).
struct Case {
    name: &'static str,
    code: &'static str,
    host: &'static str,
    path: &'static str,
    rule: &'static str,
}

const fn case(
    name: &'static str,
    code: &'static str,
    host: &'static str,
    path: &'static str,
    rule: &'static str,
) -> Case {
    Case {
        name,
        code,
        host,
        path,
        rule,
    }
}

/// Everything the script inside the namespace does, in order (`name` is what it prints).
const CASES: &[Case] = &[
    case(
        "sni-denied",
        "egress_denied",
        "other.example.test:443",
        "",
        "egress_allowlist",
    ),
    case("no-sni", "egress_denied", "GW:443", "", "egress_allowlist"),
    case("bad-sni", "bad_request", "GW:443", "", "bad SNI"),
    case(
        "secret",
        "secret_host_denied",
        "api.example.test:443",
        "/t-secret",
        "",
    ),
    case(
        "authority",
        "authority_mismatch",
        "api.example.test:443",
        "/t-authority",
        "",
    ),
    case(
        "upgrade",
        "bad_request",
        "api.example.test:443",
        "/t-upgrade",
        "",
    ),
    case(
        "large",
        "request_too_large",
        "api.example.test:443",
        "",
        "max_header_fields",
    ),
    case(
        "tls",
        "upstream_tls_error",
        "badtls.example.test:443",
        "/t-up",
        "",
    ),
    case(
        "down",
        "upstream_unreachable",
        "down.example.test:443",
        "/t-up",
        "",
    ),
    case(
        "slow",
        "upstream_timeout",
        "slow.example.test:443",
        "/t-up",
        "",
    ),
    case(
        "plain-denied",
        "egress_denied",
        "other.example.test:80",
        "",
        "egress_allowlist",
    ),
    case("plain-dup", "bad_request", "GW:80", "", "exactly one Host"),
    case("plain-bad", "bad_request", "GW:80", "", "Host header:"),
    // hyper, given this head, answered a bare 400 of its own (outside re-check).
    case(
        "plain-malformed",
        "bad_request",
        "GW:80",
        "",
        "malformed HTTP request",
    ),
    case(
        "plain-port",
        "authority_mismatch",
        "GW:80",
        "",
        "names port 8080",
    ),
    case(
        "plain-large",
        "request_too_large",
        "GW:80",
        "",
        "max_header_fields",
    ),
];

/// The script: each case prints `name status` (0: closed without an answer).
const SCRIPT: &str = r#"
import os, socket, ssl
gw = [l.split()[1] for l in open('/etc/resolv.conf') if l.startswith('nameserver')][0]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
def status(data):
    # -1: an answer without the uniform x-sealgate-error field (hyper's own bare 400 had that)
    try:
        code = int(data.split(b' ')[1])
    except Exception:
        return 0
    return code if b'x-sealgate-error:' in data.lower() else -1
def talk(s, payload):
    s.settimeout(20)
    try:
        if payload:
            s.sendall(payload)
        data = b''
        while b'\r\n\r\n' not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        return status(data)
    except Exception:
        return 0
def tls(sni, payload=b''):
    s = socket.create_connection((gw, 443), timeout=20)
    try:
        s = ctx.wrap_socket(s, server_hostname=sni)
    except Exception:
        return 0
    return talk(s, payload)
def plain(payload):
    return talk(socket.create_connection((gw, 80), timeout=20), payload)
def get(path, host, extra=''):
    return ('GET %s HTTP/1.1\r\nHost: %s\r\n%sConnection: close\r\n\r\n' % (path, host, extra)).encode()
many = ''.join('x-f%d: 1\r\n' % i for i in range(MAX_FIELDS + 5))
api = 'api.example.test'
print('sni-denied', tls('other.example.test'))
print('no-sni', tls(None))
print('bad-sni', tls('bad_sni.example.test'))
print('secret', tls(api, get('/t-secret', api, 'x-api-key: %s\r\n' % os.environ['KEY2'])))
print('authority', tls(api, get('/t-authority', 'other.example.test')))
print('upgrade', tls(api, get('/t-upgrade', api, 'Upgrade: SPDY/3.1\r\nConnection: upgrade\r\n')))
print('large', tls(api, get('/t-large', api, many)))
for name, host in [('tls', 'badtls'), ('down', 'down'), ('slow', 'slow')]:
    print(name, tls(host + '.example.test', get('/t-up', host + '.example.test')))
print('plain-denied', plain(get('/', 'other.example.test')))
print('plain-dup', plain(get('/', 'plain.example.test', 'Host: x\r\n')))
print('plain-bad', plain(get('/', '0x7f.1')))
print('plain-malformed', plain(b'GET /a b HTTP/1.1\r\nHost: plain.example.test\r\n\r\n'))
print('plain-port', plain(get('/', 'plain.example.test:8080')))
print('plain-large', plain(get('/', 'plain.example.test', many)))
"#;

/// What each case answers: the TLS-level refusals close the connection (0).
fn expected_status(name: &str) -> u16 {
    match name {
        "sni-denied" | "no-sni" | "bad-sni" => 0,
        "secret" => 403,
        "authority" | "plain-port" => 421,
        "upgrade" | "plain-dup" | "plain-bad" | "plain-malformed" => 400,
        "large" | "plain-large" => 431,
        "tls" | "down" => 502,
        "slow" => 504,
        "plain-denied" => 403,
        other => panic!("unknown case {other}"),
    }
}

/// The one audit line of `c` among `lines` (panics unless exactly one matches).
fn line_of<'a>(c: &Case, gw: &str, lines: &'a [Value]) -> &'a Value {
    let host = c.host.replace("GW", gw);
    let found: Vec<&Value> = lines
        .iter()
        .filter(|v| v["code"] == c.code && v["host"] == host.as_str())
        .filter(|v| c.path.is_empty() || v["path"] == c.path)
        .filter(|v| v["rule"].as_str().unwrap_or("").contains(c.rule))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "case {}: {found:#?}\nall: {lines:#?}",
        c.name
    );
    found[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_transparent_refusal_is_audited_and_counted_once() {
    if !transparent::netns_ready() {
        return;
    }
    let w = world("transparent_listen = \"0.0.0.0:0\"\n").await;
    let transparent_port =
        w.h.daemon
            .as_ref()
            .and_then(|d| d.transparent_addr)
            .expect("transparent listener bound")
            .port();
    let lines = audit_lines(&w.h).len();
    let before = requests_by_code(&w.h).await;

    // proxy_auth_required: a source IP no sandbox owns (the host's loopback) is closed.
    let mut tcp = TcpStream::connect(("127.0.0.1", transparent_port))
        .await
        .unwrap();
    let _ = tcp
        .write_all(b"GET / HTTP/1.1\r\nHost: api.example.test\r\n\r\n")
        .await;
    assert_eq!(
        status_of(&exchange(&mut tcp, b"", Duration::from_secs(5)).await),
        0
    );
    let unknown = audit_lines(&w.h).split_off(lines);
    assert_eq!(unknown.len(), 1, "{unknown:#?}");
    assert_eq!(unknown[0]["code"], "proxy_auth_required");
    assert_eq!(unknown[0]["mode"], "transparent");
    assert_eq!(unknown[0]["sandbox"], Value::Null);

    let script = SCRIPT.replace("MAX_FIELDS", &MAX_FIELDS.to_string());
    let env = transparent::Env {
        h: w.h,
        echo: w.echo,
        plain: w.plain,
        transparent_port,
    };
    let r = transparent::exec(&env, &[transparent::SANDBOX_PYTHON, "-c", &script]).await;
    assert_eq!(r.code, 0, "stdout:\n{}\nstderr:\n{}", r.stdout, r.stderr);
    let printed: BTreeMap<&str, u16> = r
        .stdout
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(n, s)| (n, s.trim().parse().unwrap()))
        .collect();
    for c in CASES {
        assert_eq!(
            printed.get(c.name),
            Some(&expected_status(c.name)),
            "{}",
            r.stdout
        );
    }

    let new = audit_lines(&env.h).split_off(lines + 1);
    let gw = gateway(&new);
    for c in CASES {
        let line = line_of(c, &gw, &new);
        assert_eq!(line["mode"], "transparent", "{line:#?}");
        assert!(line["sandbox"].is_string(), "{line:#?}");
    }
    assert_eq!(
        new.len(),
        CASES.len(),
        "one line per case, no more: {new:#?}"
    );
    let mut want: BTreeMap<String, f64> = BTreeMap::new();
    for code in CASES.iter().map(|c| c.code).chain(["proxy_auth_required"]) {
        *want.entry(code.to_owned()).or_default() += 1.0;
    }
    assert_eq!(
        delta(&before, &requests_by_code(&env.h).await),
        want,
        "metrics"
    );
    assert!(env.echo.requests().is_empty() && env.plain.requests().is_empty());
    transparent::assert_gone(&env, &transparent::names(&r.stderr)).await;
}

/// The namespace gateway, as the SNI-less case's line names it (`<gw>:443`).
fn gateway(lines: &[Value]) -> String {
    lines
        .iter()
        .filter(|v| v["code"] == "egress_denied")
        .filter_map(|v| v["host"].as_str())
        .find_map(|h| {
            h.strip_suffix(":443")
                .filter(|ip| ip.parse::<std::net::IpAddr>().is_ok())
        })
        .expect("the SNI-less case names the gateway")
        .to_owned()
}
