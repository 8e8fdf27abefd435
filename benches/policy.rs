//! Destination policy: host decisions against 1, 100 and 10,000 patterns (target ≤ 200 ns at
//! 100 patterns) and resolved-address vetting, each beside a naive baseline in the same run.
//!
//! Each iteration decides a fixed mix of 64 destinations (exact hits, wildcard hits, misses,
//! deep names, IP literals), so the throughput is decisions/s; ns per decision is
//! 1 / that.

#[path = "support/corpus.rs"]
mod corpus;

use std::collections::HashSet;
use std::hint::black_box;
use std::net::{IpAddr, SocketAddr};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sealgate::policy::{
    classify, egress_allowed, parse_authority, AddressPolicy, Dest, HostMatcher, Scheme,
};

/// `n` patterns: a third exact names, a third `*.suffix`, a third exact with a port.
fn patterns(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| match i % 3 {
            0 => format!("api{i}.service{}.example.com", i % 50),
            1 => format!("*.tenant{i}.example.net"),
            _ => format!("svc{i}.internal.example.org:8443"),
        })
        .collect()
}

/// 64 authorities: for `n` patterns, hits on each kind plus misses of every shape.
fn queries(n: usize) -> Vec<String> {
    let mut rng = corpus::Rng::new(7);
    (0..64)
        .map(|k| {
            let i = rng.below(n);
            match k % 8 {
                0 => format!(
                    "api{}.service{}.example.com:443",
                    i - i % 3,
                    (i - i % 3) % 50
                ),
                1 => format!("a.b.c.tenant{}.example.net:443", i - i % 3 + 1),
                2 => format!("svc{i}.internal.example.org:8443"),
                3 => "evil-example.com:443".to_owned(),
                4 => format!("tenant{i}.example.net:443"),
                5 => "x.y.z.w.v.u.t.s.r.q.p.o.deep.example.io:443".to_owned(),
                6 => "203.0.113.7:443".to_owned(),
                _ => "api.anthropic.com:443".to_owned(),
            }
        })
        .collect()
}

fn decision(c: &mut Criterion) {
    for n in [1usize, 100, 10_000] {
        let matcher = HostMatcher::compile(&patterns(n)).expect("valid patterns");
        let raw = queries(n);
        let dests: Vec<Dest> = raw
            .iter()
            .map(|q| parse_authority(q, None).expect("valid"))
            .collect();
        // Baseline: an exact-name hash set probed with the host string (no wildcards, no ports).
        let exact: HashSet<String> = patterns(n).into_iter().collect();
        let hosts: Vec<String> = dests.iter().map(|d| d.host.to_string()).collect();
        let mut g = c.benchmark_group(format!("policy/decision_{n}"));
        g.throughput(Throughput::Elements(dests.len() as u64));
        g.bench_function("hashset_exact_baseline", |b| {
            b.iter(|| hosts.iter().filter(|h| exact.contains(h.as_str())).count())
        });
        g.bench_function("egress_allowed", |b| {
            b.iter(|| {
                black_box(&dests)
                    .iter()
                    .filter(|d| egress_allowed(Some(&matcher), d, Scheme::Https))
                    .count()
            })
        });
        g.bench_function("parse_and_decide", |b| {
            b.iter(|| {
                black_box(&raw)
                    .iter()
                    .filter(|q| {
                        let d = parse_authority(q, None).expect("valid");
                        egress_allowed(Some(&matcher), &d, Scheme::Https)
                    })
                    .count()
            })
        });
        g.finish();
    }
}

/// 64 addresses: public v4/v6, every non-public class, embedded and mapped forms.
fn addresses() -> Vec<SocketAddr> {
    let ips = [
        "93.184.216.34",
        "1.1.1.1",
        "8.8.8.8",
        "140.82.112.3",
        "2606:4700::6810:85e5",
        "2a00:1450:4001:82b::200e",
        "127.0.0.1",
        "10.1.2.3",
        "172.16.5.4",
        "192.168.1.1",
        "169.254.169.254",
        "100.100.100.200",
        "0.0.0.0",
        "224.0.0.1",
        "::1",
        "fd00::1",
        "fe80::1",
        "::ffff:10.0.0.1",
        "64:ff9b::a00:1",
        "::127.0.0.1",
        "198.18.0.1",
        "255.255.255.255",
        "2001:db8::1",
        "203.0.113.9",
    ];
    (0..64)
        .map(|i| {
            let ip: IpAddr = ips[i % ips.len()].parse().expect("ip");
            SocketAddr::new(ip, if i % 5 == 0 { 3128 } else { 443 })
        })
        .collect()
}

fn naive_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_multicast()
                || v4.is_broadcast()
        }
        IpAddr::V6(v6) => v6.is_loopback() || v6.is_unspecified() || v6.is_multicast(),
    }
}

fn vetting(c: &mut Criterion) {
    let addrs = addresses();
    let policy = AddressPolicy::new(
        vec!["127.0.0.0/8".parse().expect("cidr")],
        vec![
            "127.0.0.1:3128".parse().expect("addr"),
            "127.0.0.1:7070".parse().expect("addr"),
        ],
    );
    let mut g = c.benchmark_group("policy/vet");
    g.throughput(Throughput::Elements(addrs.len() as u64));
    g.bench_function("std_is_private_baseline", |b| {
        b.iter(|| {
            black_box(&addrs)
                .iter()
                .filter(|a| naive_private(a.ip()))
                .count()
        })
    });
    g.bench_function("classify", |b| {
        b.iter(|| {
            black_box(&addrs)
                .iter()
                .filter(|a| classify(a.ip()).is_some())
                .count()
        })
    });
    g.bench_function("address_policy_vet", |b| {
        b.iter(|| {
            black_box(&addrs)
                .iter()
                .filter(|a| policy.vet(**a).is_ok())
                .count()
        })
    });
    g.finish();
}

criterion_group!(benches, decision, vetting);
criterion_main!(benches);
