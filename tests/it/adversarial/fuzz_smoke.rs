//! Stable fuzz smoke: the cargo-fuzz target bodies (`fuzz/src/targets.rs`, included here as is)
//! run on their seed corpus and on random mutations of it (bit flips, dictionary words,
//! splices, truncations) for a bounded time per target, on any toolchain. No coverage
//! guidance: this keeps the oracles honest in every `cargo test`; `scripts/fuzz-smoke` runs the
//! coverage-guided libFuzzer targets where nightly and cargo-fuzz exist (see fuzz/README.md).
//!
//! `SEALGATE_FUZZ_SMOKE_MS` sets the time per target (default 1500 ms); `SEALGATE_FUZZ_SEED`
//! the RNG seed (default fixed, so a run is reproducible). A failing input is written to
//! `target/fuzz-smoke-<target>.bin` and can be replayed with `cargo fuzz run <target> <file>`.

#[path = "../../../fuzz/src/targets.rs"]
mod targets;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// xorshift64*: deterministic, dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

/// Reads a libFuzzer dictionary (`name="…"` lines with `\xNN`, `\\`, `\"` escapes).
fn dictionary(path: &Path) -> Vec<Vec<u8>> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let start = l.find('"')?;
            let body = l[start + 1..].strip_suffix('"')?;
            Some(unescape(body))
        })
        .collect()
}

fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let (mut out, mut i) = (Vec::new(), 0);
    while i < b.len() {
        match (b[i], b.get(i + 1)) {
            (b'\\', Some(b'x')) if i + 3 < b.len() + 1 => {
                let hex = std::str::from_utf8(&b[i + 2..(i + 4).min(b.len())]).unwrap_or("");
                out.push(u8::from_str_radix(hex, 16).unwrap_or(b'?'));
                i += 4;
            }
            (b'\\', Some(&c)) => {
                out.push(c);
                i += 2;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

fn seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = root().join("fuzz/seeds").join(target);
    let mut v: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .map(|d| {
            d.filter_map(|e| std::fs::read(e.ok()?.path()).ok())
                .collect()
        })
        .unwrap_or_default();
    v.push(Vec::new());
    v
}

fn mutate(rng: &mut Rng, input: &mut Vec<u8>, dict: &[Vec<u8>], pool: &[Vec<u8>]) {
    for _ in 0..=rng.below(4) {
        let at = rng.below(input.len() + 1);
        match rng.below(8) {
            0 if !input.is_empty() => {
                let i = rng.below(input.len());
                input[i] ^= 1 << rng.below(8);
            }
            1 => input.insert(at, rng.next() as u8),
            2 if !input.is_empty() => {
                let end = (at + 1 + rng.below(8)).min(input.len());
                input.drain(at.min(end)..end);
            }
            3 | 4 if !dict.is_empty() => {
                let w = &dict[rng.below(dict.len())];
                input.splice(at..at, w.iter().copied());
            }
            5 if !pool.is_empty() => {
                let other = &pool[rng.below(pool.len())];
                let from = rng.below(other.len() + 1);
                input.truncate(at);
                input.extend_from_slice(&other[from..]);
            }
            6 if !input.is_empty() => {
                let from = rng.below(input.len());
                let end = (from + 1 + rng.below(16)).min(input.len());
                let piece = input[from..end].to_vec();
                input.splice(at..at, piece);
            }
            _ => input.truncate(at),
        }
    }
    input.truncate(4096);
}

fn run(target: &str, dict: &str, f: fn(&[u8])) {
    let budget = std::env::var("SEALGATE_FUZZ_SMOKE_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1500);
    let seed = std::env::var("SEALGATE_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5ea1_9a7e_u64);
    let dict = dictionary(&root().join("fuzz/dicts").join(format!("{dict}.dict")));
    let mut pool = seeds(target);
    let mut rng = Rng(seed | 1);
    let start = Instant::now();
    let mut execs = 0u64;
    let check = |input: &[u8]| {
        let owned = input.to_vec();
        if std::panic::catch_unwind(|| f(&owned)).is_err() {
            let path = root().join(format!("target/fuzz-smoke-{target}.bin"));
            let _ = std::fs::write(&path, input);
            panic!(
                "{target}: invariant broken; input saved to {}",
                path.display()
            );
        }
    };
    for s in pool.clone() {
        check(&s);
    }
    while start.elapsed() < Duration::from_millis(budget) {
        let mut input = pool[rng.below(pool.len())].clone();
        mutate(&mut rng, &mut input, &dict, &pool);
        check(&input);
        execs += 1;
        if execs % 64 == 0 && pool.len() < 256 {
            pool.push(input);
        }
    }
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "fuzz smoke {target}: {execs} execs in {secs:.1} s ({:.0}/s, seed {seed})",
        execs as f64 / secs
    );
}

#[test]
fn fuzz_smoke_subst_chunked() {
    run("subst_chunked", "subst", targets::subst_chunked);
}

#[test]
fn fuzz_smoke_scrub_chunked() {
    run("scrub_chunked", "subst", targets::scrub_chunked);
}

#[test]
fn fuzz_smoke_grpc_frames() {
    run("grpc_frames", "grpc", targets::grpc_frames);
}

#[test]
fn fuzz_smoke_host_parse() {
    run("host_parse", "host", targets::host_parse);
}

#[test]
fn fuzz_smoke_config_parse() {
    run("config_parse", "config", targets::config_parse);
}

#[test]
fn fuzz_smoke_h1_framing() {
    run("h1_framing", "h1", targets::h1_framing);
}
