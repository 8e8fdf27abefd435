//! Sandbox registry with 10,000 live sandboxes × 20 secrets (200,000 tokens), built through the
//! public API (`Snapshot::build`, `Sandbox::new`, `Registry::insert`; one shared CA).
//!
//! - `registry/identify`: `Registry::get(id)` + `check_proxy_token` (once per CONNECT).
//! - `registry/token`: the per-request path: `get(id)` → `snapshot()` → `view(dest)` (cached)
//!   → `TokenLookup::get(token)`, vs a plain `HashMap<Token, usize>` probe over the same
//!   200,000 tokens.
//!
//! Each iteration looks up 64 (sandbox, token) pairs spread over the whole registry.

#[path = "support/corpus.rs"]
mod corpus;

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sealgate::ca::SandboxCa;
use sealgate::sandbox::{Registry, Sandbox, SandboxParts};
use sealgate::subst::TokenLookup;
use sealgate::token::Token;
use time::{Duration, OffsetDateTime};

const SANDBOXES: usize = 10_000;
const SECRETS: usize = 20;
const PROXY_PASSWORD: &str = "bench-proxy-password";

fn sandbox_id(i: usize) -> String {
    format!(
        "sbx_{:024x}",
        (i as u128).wrapping_mul(0x9e37_79b9_7f4a_7c15)
    )
}

struct World {
    registry: Registry,
    flat: HashMap<Token, usize>,
    /// (sandbox id, token) pairs to look up.
    queries: Vec<(String, Token)>,
}

fn world() -> World {
    let ca = Arc::new(SandboxCa::generate("sbx_bench").expect("ca"));
    let hash = ring::digest::digest(&ring::digest::SHA256, PROXY_PASSWORD.as_bytes());
    let registry = Registry::default();
    let mut flat = HashMap::new();
    let now = OffsetDateTime::now_utc();
    for i in 0..SANDBOXES {
        let snapshot = corpus::snapshot(SECRETS, (i * SECRETS) as u64);
        for e in snapshot.secrets() {
            flat.insert(e.token, i);
        }
        let parts = SandboxParts {
            id: sandbox_id(i),
            store_id: "store".to_owned(),
            created_at: now,
            expires_at: now + Duration::hours(1),
            source_ip: None,
            proxy_token_hash: hash.as_ref().try_into().expect("32 bytes"),
            ca: ca.clone(),
        };
        registry
            .insert(Arc::new(Sandbox::new(parts, snapshot)))
            .expect("insert");
    }
    let mut rng = corpus::Rng::new(99);
    let queries = (0..64)
        .map(|_| {
            let (i, s) = (rng.below(SANDBOXES), rng.below(SECRETS));
            (sandbox_id(i), corpus::token((i * SECRETS + s) as u64))
        })
        .collect();
    World {
        registry,
        flat,
        queries,
    }
}

fn lookups(c: &mut Criterion) {
    let w = world();
    let dest = corpus::dest();
    // Warm the per-destination views, as the first request of each tunnel does.
    for (id, _) in &w.queries {
        w.registry.get(id).expect("live").snapshot().view(&dest);
    }
    let n = w.queries.len() as u64;

    let mut g = c.benchmark_group("registry/identify");
    g.throughput(Throughput::Elements(n));
    g.bench_function("get_id", |b| {
        b.iter(|| {
            black_box(&w.queries)
                .iter()
                .filter_map(|(id, _)| w.registry.get(id))
                .count()
        })
    });
    g.bench_function("get_id_and_check_proxy_token", |b| {
        b.iter(|| {
            black_box(&w.queries)
                .iter()
                .filter_map(|(id, _)| w.registry.get(id))
                .filter(|sb| sb.check_proxy_token(PROXY_PASSWORD))
                .count()
        })
    });
    g.finish();

    let mut g = c.benchmark_group("registry/token");
    g.throughput(Throughput::Elements(n));
    g.bench_function("flat_hashmap_baseline", |b| {
        b.iter(|| {
            black_box(&w.queries)
                .iter()
                .filter_map(|(_, t)| w.flat.get(t))
                .count()
        })
    });
    g.bench_function("view_lookup", |b| {
        let views: Vec<_> = w
            .queries
            .iter()
            .map(|(id, _)| w.registry.get(id).expect("live").snapshot().view(&dest))
            .collect();
        b.iter(|| {
            black_box(&w.queries)
                .iter()
                .zip(&views)
                .filter(|((_, t), v)| v.get(t).is_some_and(|r| r.allowed))
                .count()
        })
    });
    g.bench_function("sandbox_snapshot_view_lookup", |b| {
        b.iter(|| {
            black_box(&w.queries)
                .iter()
                .filter(|(id, t)| {
                    let sb = w.registry.get(id).expect("live");
                    let view = sb.snapshot().view(&dest);
                    view.get(t).is_some_and(|r| r.allowed)
                })
                .count()
        })
    });
    g.finish();
}

criterion_group!(benches, lookups);
criterion_main!(benches);
