//! The substitution hot path against its ceilings, measured side by side in one run.
//!
//! - `body_no_token`: 1 MiB of token-free prose through the body engine in one chunk vs
//!   `memchr::memmem::find_iter` for `osb_sealed_` over the same bytes (target ≥ 0.7×).
//! - `body_100_tokens`: the same 1 MiB with 100 tokens unsealed.
//! - `stream_16k` / `stream_1b`: the engine fed 16 KiB chunks (target ≥ 0.6× memmem) and
//!   1-byte chunks (64 KiB of input: the worst case, per-call overhead only).
//! - `headers_20`: a 20-header request: token in `authorization` (Bearer) and one in a Basic
//!   header; a no-token scan and a clone-and-drop of the map as baselines (target ≤ 1 µs
//!   median; the map's setup clone is not timed).
//! - `scrub_1MiB`: the response scrubber with 20 secret values vs aho-corasick alone; with the
//!   values' transformed forms too (`echo_forms`, as a sandbox's snapshot builds it).

#[path = "support/corpus.rs"]
mod corpus;

use std::hint::black_box;
use std::sync::Arc;

use aho_corasick::{AhoCorasick, MatchKind};
use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use memchr::memmem::Finder;
use sealgate::secret::SecretValue;
use sealgate::subst::{
    echo_forms, substitute_headers, BodySubst, OnDisallowed, Report, ScrubStream, Scrubber,
    TokenLookup,
};

use corpus::{chunks, text, text_with_tokens, view20, MIB};

const PREFIX: &[u8] = b"osb_sealed_";

/// The ceiling: find every `osb_sealed_` with memchr's SIMD searcher (what the engine is built on).
fn memmem_count(finder: &Finder<'_>, hay: &[u8]) -> usize {
    finder.find_iter(hay).count()
}

/// Runs the engine over `pieces`, returning the number of output pieces.
fn engine_run(lookup: &Arc<dyn TokenLookup>, pieces: &[Bytes], out: &mut Vec<Bytes>) -> usize {
    let mut engine = BodySubst::new(lookup.clone(), OnDisallowed::Block);
    out.clear();
    for piece in pieces {
        engine.push(piece.clone(), out).expect("allowed");
    }
    engine.finish(out);
    out.len()
}

fn body(c: &mut Criterion) {
    let (view, tokens) = view20();
    let lookup: Arc<dyn TokenLookup> = view;
    let finder = Finder::new(PREFIX);
    let cases = [
        ("body_no_token", Bytes::from(text(MIB))),
        (
            "body_100_tokens",
            Bytes::from(text_with_tokens(MIB, 100, &tokens)),
        ),
    ];
    for (name, data) in cases {
        let mut g = c.benchmark_group(format!("subst/{name}"));
        g.throughput(Throughput::Bytes(data.len() as u64));
        g.bench_function("memmem_baseline", |b| {
            b.iter(|| memmem_count(&finder, black_box(&data)))
        });
        let whole = [data.clone()];
        let mut out = Vec::new();
        g.bench_function("engine_1_chunk", |b| {
            b.iter(|| engine_run(&lookup, black_box(&whole), &mut out))
        });
        g.finish();
    }
}

fn stream(c: &mut Criterion) {
    let (view, _) = view20();
    let lookup: Arc<dyn TokenLookup> = view;
    let finder = Finder::new(PREFIX);
    for (name, len, size) in [("stream_16k", MIB, 16 * 1024), ("stream_1b", 64 * 1024, 1)] {
        let data = Bytes::from(text(len));
        let pieces = chunks(&data, size);
        let mut g = c.benchmark_group(format!("subst/{name}"));
        g.throughput(Throughput::Bytes(data.len() as u64));
        g.bench_function("memmem_baseline", |b| {
            b.iter(|| memmem_count(&finder, black_box(&data)))
        });
        let mut out = Vec::with_capacity(pieces.len() + 8);
        g.bench_function("engine", |b| {
            b.iter(|| engine_run(&lookup, black_box(&pieces), &mut out))
        });
        g.finish();
    }
}

/// A typical SDK request head: 20 headers, `extra` appended in place of the last ones.
fn head(extra: &[(&'static str, String)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    let fixed: [(&str, &str); 20] = [
        ("host", "api.anthropic.com"),
        ("user-agent", "Anthropic/Python 0.40.0"),
        ("accept", "application/json"),
        ("accept-encoding", "gzip, deflate, br"),
        ("accept-language", "en-US,en;q=0.9"),
        ("content-type", "application/json"),
        ("content-length", "1834"),
        ("anthropic-version", "2023-06-01"),
        (
            "anthropic-beta",
            "prompt-caching-2024-07-31,max-tokens-3-5-sonnet-2024-07-15",
        ),
        ("x-stainless-lang", "python"),
        ("x-stainless-package-version", "0.40.0"),
        ("x-stainless-os", "Linux"),
        ("x-stainless-arch", "x64"),
        ("x-stainless-runtime", "CPython"),
        ("x-stainless-runtime-version", "3.12.7"),
        ("x-stainless-retry-count", "0"),
        ("x-request-id", "req_01HZX3J9Q5V7B8N2M4K6P0R1S3"),
        ("cache-control", "no-cache"),
        ("connection", "keep-alive"),
        (
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ),
    ];
    for (k, v) in fixed.iter().take(20 - extra.len()) {
        h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
    }
    for (k, v) in extra {
        h.append(
            HeaderName::from_static(k),
            HeaderValue::from_str(v).expect("ascii"),
        );
    }
    h
}

fn headers(c: &mut Criterion) {
    let (view, tokens) = view20();
    let bearer = format!("Bearer {}", tokens[0]);
    let basic = corpus::basic("user", tokens[1].as_bytes());
    let cases = [
        ("no_token", head(&[])),
        ("bearer", head(&[("authorization", bearer.clone())])),
        ("basic", head(&[("authorization", basic.clone())])),
        (
            "bearer_and_basic",
            head(&[("authorization", bearer), ("proxy-authorization", basic)]),
        ),
    ];
    let mut g = c.benchmark_group("subst/headers_20");
    g.throughput(Throughput::Elements(1));
    // What the proxy pays anyway to own a request head: clone + drop of the same map.
    g.bench_function("clone_and_drop_baseline", |b| {
        b.iter(|| black_box(&cases[3].1).clone())
    });
    for (name, map) in &cases {
        g.bench_function(*name, |b| {
            b.iter_batched_ref(
                || map.clone(),
                |h| {
                    let mut report = Report::default();
                    substitute_headers(h, &*view, OnDisallowed::Block, &mut report)
                        .expect("allowed");
                    report.unsealed.len()
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

fn scrub(c: &mut Criterion) {
    let values = corpus::twenty_values();
    let pairs = values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let token = corpus::token(100 + i as u64);
            (
                SecretValue::new(v.clone()),
                Bytes::copy_from_slice(token.as_bytes()),
            )
        })
        .collect();
    let scrubber = Scrubber::new(pairs).expect("values");
    let with_forms = scrubber_with_forms(&values);
    // 14 keys shaped like AWS secret keys (`/`, `+`, `=`): with their percent, URL-in-URL,
    // HTML and base64 forms, more patterns than one packed searcher takes (128).
    let aws_forms = scrubber_with_forms(&aws_values(14));
    let aws_forms_40 = scrubber_with_forms(&aws_values(40));
    let ac = AhoCorasick::builder()
        .match_kind(MatchKind::LeftmostLongest)
        .build(&values)
        .expect("automaton");
    let clean = Bytes::from(text(MIB));
    let mut echoed = text(MIB);
    for (i, v) in values.iter().enumerate() {
        let at = i * (MIB / values.len()) + 100;
        echoed[at..at + v.len()].copy_from_slice(v);
    }
    let echoed = Bytes::from(echoed);
    for (name, data) in [
        ("scrub_1MiB_clean", clean),
        ("scrub_1MiB_20_echoes", echoed),
    ] {
        let mut g = c.benchmark_group(format!("subst/{name}"));
        g.throughput(Throughput::Bytes(data.len() as u64));
        g.bench_function("aho_corasick_baseline", |b| {
            b.iter(|| ac.find_iter(black_box(&data[..])).count())
        });
        g.bench_function("scrubber_whole", |b| {
            b.iter(|| scrubber.scrub(black_box(&data)).map_or(0, |(_, n)| n))
        });
        g.bench_function("scrubber_whole_with_forms", |b| {
            b.iter(|| with_forms.scrub(black_box(&data)).map_or(0, |(_, n)| n))
        });
        g.bench_function("scrubber_whole_aws_keys_with_forms", |b| {
            b.iter(|| aws_forms.scrub(black_box(&data)).map_or(0, |(_, n)| n))
        });
        g.bench_function("scrubber_whole_40_aws_keys_with_forms", |b| {
            b.iter(|| aws_forms_40.scrub(black_box(&data)).map_or(0, |(_, n)| n))
        });
        let pieces = chunks(&data, 16 * 1024);
        let mut out = Vec::with_capacity(pieces.len() + 64);
        g.bench_function("scrub_stream_16k", |b| {
            b.iter(|| {
                let mut s = ScrubStream::new(scrubber.clone());
                out.clear();
                for p in &pieces {
                    s.push(p.clone(), &mut out);
                }
                s.finish(&mut out);
                s.replacements()
            })
        });
        g.finish();
    }
}

/// As a sandbox's snapshot builds it: every value with its transformed forms.
fn scrubber_with_forms(values: &[Vec<u8>]) -> std::sync::Arc<Scrubber> {
    let pairs = values
        .iter()
        .enumerate()
        .flat_map(|(i, v)| {
            let token = corpus::token(100 + i as u64);
            let value = SecretValue::new(v.clone());
            let forms = echo_forms(&value, token.as_bytes());
            std::iter::once((value, Bytes::copy_from_slice(token.as_bytes()))).chain(forms)
        })
        .collect();
    Scrubber::new(pairs).expect("values")
}

/// `n` values of 40 base64 characters with a `/` and a `+` in them, ending in `=`.
fn aws_values(n: usize) -> Vec<Vec<u8>> {
    const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut rng = corpus::Rng::new(7);
    (0..n)
        .map(|_| {
            let mut v: Vec<u8> = (0..39).map(|_| B64[rng.below(B64.len())]).collect();
            v[10] = b'/';
            v[25] = b'+';
            v.push(b'=');
            v
        })
        .collect()
}

criterion_group!(benches, body, stream, headers, scrub);
criterion_main!(benches);
