//! Certificates: CA generation, cold leaf mint (P-256) and the cached leaf lookup, each beside
//! its floor in the same run (targets: cold mint ≤ 300 µs, cached lookup ≤ 200 ns).
//!
//! - `ca/generate`: [`SandboxCa::generate`] vs a bare P-256 key generation.
//! - `ca/leaf_cold`: `mint_leaf` + [`Leaf::new`] (key, signature, rustls `ServerConfig`) and the
//!   same through [`LeafCache::get_or_mint`] with a new host each time, vs key generation.
//! - `ca/leaf_cached`: [`LeafCache::get_or_mint`] hit vs a `HashMap` get + `Arc` clone.
//! - `ca/session_resume`: one TLS 1.3 resumption's cache work (take the newest ticket, put
//!   the handshake's new one: the leaves send one) in a full 4,096-session cache: [`SessionCache`] vs rustls's
//!   `ServerSessionMemoryCache`, which it replaced (the baseline).

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use futures_util::FutureExt;
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls::server::{ServerSessionMemoryCache, StoresServerSessions};
use sealgate::ca::{Leaf, LeafCache, LeafName, SandboxCa, SessionCache};

const SANDBOX: &str = "sbx_0123456789abcdef01234567";

fn keygen() -> KeyPair {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("keygen")
}

fn generate(c: &mut Criterion) {
    let mut g = c.benchmark_group("ca/generate");
    g.throughput(Throughput::Elements(1));
    g.bench_function("p256_keygen_baseline", |b| b.iter(keygen));
    g.bench_function("sandbox_ca", |b| {
        b.iter(|| SandboxCa::generate(black_box(SANDBOX)).expect("ca"))
    });
    g.finish();
}

fn leaf_cold(c: &mut Criterion) {
    let ca = Arc::new(SandboxCa::generate(SANDBOX).expect("ca"));
    let name = LeafName::Dns("api.anthropic.com".to_owned());
    let mut g = c.benchmark_group("ca/leaf_cold");
    g.throughput(Throughput::Elements(1));
    g.bench_function("p256_keygen_baseline", |b| b.iter(keygen));
    g.bench_function("mint_leaf", |b| {
        b.iter(|| ca.mint_leaf(black_box(&name)).expect("leaf"))
    });
    g.bench_function("mint_leaf_and_server_config", |b| {
        b.iter(|| Leaf::new(ca.mint_leaf(black_box(&name)).expect("leaf")).expect("config"))
    });
    // Through the cache: a fresh host each time (the cache evicts beyond 4,096 leaves).
    let cache = LeafCache::new(4096);
    let mut n = 0u64;
    g.bench_function("cache_miss", |b| {
        b.iter(|| {
            n += 1;
            let host = LeafName::Dns(format!("h{n}.example.com"));
            cache
                .get_or_mint(SANDBOX, &ca, &host)
                .now_or_never()
                .expect("a miss mints inline")
                .expect("leaf")
        })
    });
    g.finish();
}

fn leaf_cached(c: &mut Criterion) {
    let ca = Arc::new(SandboxCa::generate(SANDBOX).expect("ca"));
    let cache = LeafCache::new(4096);
    let names: Vec<LeafName> = (0..64)
        .map(|i| LeafName::Dns(format!("api{i}.example.com")))
        .collect();
    let mut map = HashMap::new();
    for name in &names {
        let leaf = cache
            .get_or_mint(SANDBOX, &ca, name)
            .now_or_never()
            .expect("inline");
        map.insert(name.clone(), leaf.expect("leaf"));
    }
    // Other sandboxes' entries, so the outer map is not trivially small.
    for s in 0..100 {
        let id = format!("sbx_other_{s}");
        let leaf = cache
            .get_or_mint(&id, &ca, &names[0])
            .now_or_never()
            .expect("inline");
        leaf.expect("leaf");
    }
    let mut g = c.benchmark_group("ca/leaf_cached");
    g.throughput(Throughput::Elements(names.len() as u64));
    g.bench_function("hashmap_get_clone_baseline", |b| {
        b.iter(|| {
            black_box(&names)
                .iter()
                .map(|n| Arc::clone(&map[n]))
                .filter(|l| Arc::strong_count(l) > 0)
                .count()
        })
    });
    g.bench_function("leaf_cache_hit", |b| {
        b.iter(|| {
            black_box(&names)
                .iter()
                .map(|n| {
                    cache
                        .get_or_mint(SANDBOX, &ca, n)
                        .now_or_never()
                        .expect("hit")
                })
                .filter(Result::is_ok)
                .count()
        })
    });
    g.finish();
}

/// Session ids as rustls makes them (32 random-looking bytes), numbered.
fn session_id(n: u64) -> Vec<u8> {
    let mut id = vec![0x5a; 32];
    id[..8].copy_from_slice(&n.to_le_bytes());
    id
}

/// Fills `cache` with 4,096 sessions, then per iteration takes the newest (a client that
/// reconnects at once resumes with the ticket it got last, the far end of rustls's scan) and
/// puts the new ticket of that handshake.
fn resume_cycles(b: &mut criterion::Bencher<'_>, cache: &dyn StoresServerSessions) {
    const HELD: u64 = 4096;
    let value = vec![7u8; 200];
    for n in 0..HELD {
        cache.put(session_id(n), value.clone());
    }
    let mut next = HELD;
    b.iter(|| {
        let taken = cache.take(&session_id(next - 1));
        cache.put(session_id(next), value.clone());
        next += 1;
        assert!(taken.is_some(), "the newest id is held");
    });
}

fn session_resume(c: &mut Criterion) {
    let mut g = c.benchmark_group("ca/session_resume");
    g.throughput(Throughput::Elements(1));
    g.bench_function("rustls_memory_cache_baseline", |b| {
        resume_cycles(b, &*ServerSessionMemoryCache::new(4096))
    });
    g.bench_function("session_cache", |b| {
        resume_cycles(b, &SessionCache::new(4096, Duration::from_secs(86_400)))
    });
    g.finish();
}

criterion_group!(benches, generate, leaf_cold, leaf_cached, session_resume);
criterion_main!(benches);
