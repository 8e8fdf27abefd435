//! DNS answers, end to end, through a resolver the test controls (`[upstream] nameservers`):
//! a name answering a private address is refused, a rebinding name (public first, private
//! later) is never dialled at its private address, and mixed public/private answers never
//! reach the private one.
//!
//! Reachable "public" and unreachable "private" addresses on one loopback: the daemon runs
//! with strict vetting and `allow_private_cidrs = ["127.0.0.2/32"]` only, so 127.0.0.2 passes
//! vetting like a public address would, while 127.0.0.3 and ::1 are loopback (non-public) as
//! for any deployment. The echo origin listens on 127.0.0.2:P and a decoy that only counts
//! connections on 127.0.0.3:P, the same port: were a private answer ever dialled, the decoy
//! would see it. No `[upstream] resolve` override is used, so every name goes through DNS.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;

use crate::support::daemon::{Harness, Opts};
use crate::support::dns::{DnsServer, A, AAAA};
use crate::support::echo::Echo;
use crate::support::pki::TestPki;
use crate::support::proxy_client::{self as pc, SandboxCreds};
use crate::support::raw::RawListener;

const VALUE: &str = "sk-dns-real-value-0811";
const NAMES: &[&str] = &[
    "private.dns.test",
    "rebind.dns.test",
    "mixed.dns.test",
    "mixed6.dns.test",
];
const PUBLIC: [u8; 4] = [127, 0, 0, 2];
const PRIVATE: [u8; 4] = [127, 0, 0, 3];

struct DnsEnv {
    h: Harness,
    echo: Echo,
    decoy: RawListener,
    dns: DnsServer,
    sb: SandboxCreds,
    port: u16,
}

/// The answers every test uses (see the module docs).
fn answers(name: &str, qtype: u16, nth: usize) -> Vec<IpAddr> {
    let (public, private) = (IpAddr::from(PUBLIC), IpAddr::from(PRIVATE));
    match (name, qtype) {
        ("private.dns.test", A) => vec![private],
        ("rebind.dns.test", A) if nth == 0 => vec![public],
        ("rebind.dns.test", A) => vec![private],
        ("mixed.dns.test", A) => vec![public, private],
        ("mixed6.dns.test", A) => vec![public],
        ("mixed6.dns.test", AAAA) => vec![IpAddr::from([0, 0, 0, 0, 0, 0, 0, 1u16])],
        _ => vec![],
    }
}

async fn dns_env(upstream_toml: &str) -> DnsEnv {
    let pki = Arc::new(TestPki::new());
    let decoy = RawListener::start(PRIVATE.into()).await;
    let port = decoy.addr.port();
    let echo = Echo::start_tls_at((PUBLIC, port).into(), pki.server_config(NAMES, &[])).await;
    let dns = DnsServer::start(answers).await;
    let opts = Opts {
        strict_vetting: true,
        private_cidrs: vec!["127.0.0.2/32".into()],
        upstream_toml: format!("nameservers = [\"{}\"]\n{upstream_toml}", dns.addr),
        ..Default::default()
    };
    let h = Harness::try_start(opts, Some(pki))
        .await
        .expect("daemon starts");
    let allow: Vec<String> = NAMES.iter().map(|n| format!("{n}:{port}")).collect();
    let allow: Vec<&str> = allow.iter().map(String::as_str).collect();
    let store = h.store("dns", Some(&allow)).await;
    h.secret(&store, "KEY", VALUE, None, Some(&["header"]))
        .await;
    let sb = SandboxCreds::from_answer(&h.sandbox("dns").await);
    DnsEnv {
        h,
        echo,
        decoy,
        dns,
        sb,
        port,
    }
}

impl DnsEnv {
    /// One GET with the sealed key through a fresh tunnel to `name`.
    async fn get(&self, name: &str) -> pc::Answer {
        let key = self.sb.token("KEY");
        let target = format!("{name}:{}", self.port);
        let mut c = pc::h1(self.h.proxy, &self.sb, &target).await;
        let host = target.clone();
        pc::send1(&mut c, pc::get("/echo", &host, &[("x-api-key", &key)])).await
    }

    fn assert_private_never_dialled(&self) {
        assert_eq!(self.decoy.connections(), 0, "a private answer was dialled");
    }
}

fn assert_vetted_out(a: &pc::Answer, name: &str) {
    assert_eq!(a.status, StatusCode::FORBIDDEN, "{name}: {}", a.text());
    assert_eq!(a.code().as_deref(), Some("egress_denied"), "{name}");
    assert!(a.text().contains("address vetting"), "{name}: {}", a.text());
}

#[tokio::test]
async fn a_name_answering_a_private_address_is_refused() {
    let e = dns_env("").await;
    let a = e.get("private.dns.test").await;
    assert_vetted_out(&a, "private.dns.test");
    assert!(
        e.dns.asked("private.dns.test", A) >= 1,
        "the resolver was asked"
    );
    e.assert_private_never_dialled();
    assert_eq!(e.echo.connections(), 0);
}

#[tokio::test]
async fn a_rebinding_answer_is_never_dialled() {
    // Idle upstream connections are dropped after 1 s, so the second request needs a new
    // connection and therefore a new lookup — which now answers the private address.
    let e = dns_env("pool_idle_timeout_secs = 1").await;
    let first = e.get("rebind.dns.test").await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text());
    assert!(
        e.echo.received_bytes_contain(VALUE.as_bytes()),
        "unsealed at the vetted address"
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let second = e.get("rebind.dns.test").await;
    assert!(
        e.dns.asked("rebind.dns.test", A) >= 2,
        "a second lookup happened"
    );
    // The connection goes to the address that was vetted, or the name is refused; never to
    // the rebound private address.
    if second.status != StatusCode::OK {
        assert_vetted_out(&second, "rebind.dns.test");
    }
    e.assert_private_never_dialled();
}

#[tokio::test]
async fn mixed_public_and_private_answers_refuse_the_whole_name() {
    let e = dns_env("").await;
    for name in ["mixed.dns.test", "mixed6.dns.test"] {
        let a = e.get(name).await;
        assert_vetted_out(&a, name);
    }
    e.assert_private_never_dialled();
    assert_eq!(
        e.echo.connections(),
        0,
        "not even the public answer is dialled"
    );
}
