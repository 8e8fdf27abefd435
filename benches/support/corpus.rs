//! Deterministic inputs shared by the criterion benches: realistic request text, tokens,
//! secret records and sandbox snapshots. No I/O, no randomness from the OS: every run measures
//! the same bytes.

#![allow(dead_code)] // each bench uses a different subset

use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use sealgate::policy::{parse_authority, Dest};
use sealgate::sandbox::{HostView, Snapshot};
use sealgate::secret::{Location, SecretValue};
use sealgate::store::{SecretMeta, SecretRecord};
use sealgate::token::Token;

pub const MIB: usize = 1024 * 1024;

/// xorshift64*: small, fast, deterministic.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

const WORDS: &[&str] = &[
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "you",
    "that",
    "it",
    "for",
    "on",
    "are",
    "with",
    "as",
    "this",
    "be",
    "at",
    "or",
    "from",
    "one",
    "have",
    "by",
    "not",
    "what",
    "all",
    "were",
    "we",
    "when",
    "your",
    "can",
    "said",
    "there",
    "use",
    "an",
    "each",
    "which",
    "she",
    "do",
    "how",
    "their",
    "if",
    "will",
    "up",
    "other",
    "about",
    "out",
    "many",
    "then",
    "them",
    "these",
    "so",
    "some",
    "her",
    "would",
    "make",
    "like",
    "him",
    "into",
    "time",
    "has",
    "look",
    "two",
    "more",
    "write",
    "go",
    "see",
    "number",
    "no",
    "way",
    "could",
    "people",
    "my",
    "than",
    "first",
    "water",
    "been",
    "call",
    "who",
    "oil",
    "its",
    "now",
    "find",
    "long",
    "down",
    "day",
    "did",
    "get",
    "come",
    "made",
    "may",
    "part",
    "sandbox",
    "request",
    "token",
    "secret",
    "response",
    "function",
    "return",
    "value",
    "error",
    "string",
    "object",
    "observe",
    "sealed",
    "session",
    "bsod",
    "obsolete",
    "osborne",
    "jobs_sealed",
    "sb_",
    "os_b",
    "model",
    "prompt",
    "content",
];

/// `len` bytes of an LLM-style JSON request body: chat messages made of English-like words,
/// with the letters of `osb_sealed_` (and near misses such as `obsolete`, `jobs_sealed`)
/// occurring as often as in real prose. Contains no `osb_sealed_`.
pub fn text(len: usize) -> Vec<u8> {
    let mut rng = Rng::new(0x5ea1_9a7e);
    let mut out = Vec::with_capacity(len + 256);
    out.extend_from_slice(b"{\"model\":\"claude-sonnet\",\"messages\":[");
    while out.len() < len {
        out.extend_from_slice(b"{\"role\":\"user\",\"content\":\"");
        for i in 0..40 + rng.below(80) {
            if i > 0 {
                out.push(if rng.below(12) == 0 { b'\n' } else { b' ' });
            }
            out.extend_from_slice(WORDS[rng.below(WORDS.len())].as_bytes());
        }
        out.extend_from_slice(b".\"},");
    }
    out.truncate(len);
    assert!(memchr::memmem::find(&out, b"osb_sealed_").is_none());
    out
}

/// `text(len)` with `n` copies of `tokens` (round robin) written over it at even spacing.
pub fn text_with_tokens(len: usize, n: usize, tokens: &[Token]) -> Vec<u8> {
    let mut out = text(len);
    let step = len / n;
    for i in 0..n {
        let at = i * step + step / 2;
        out[at..at + 43].copy_from_slice(tokens[i % tokens.len()].as_bytes());
    }
    out
}

/// A deterministic well-formed token: `seed` picks the 128 bits.
pub fn token(seed: u64) -> Token {
    let hi = u128::from(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let lo = u128::from(seed ^ 0xf39c_c060_5ced_c835);
    let s = format!("osb_sealed_{:032x}", (hi << 64) | lo);
    Token::parse(s.as_bytes()).expect("well-formed token")
}

/// A realistic API-key-shaped value: `prefix` + `len` base62 characters.
pub fn key_value(rng: &mut Rng, prefix: &str, len: usize) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut v = prefix.as_bytes().to_vec();
    v.extend((0..len).map(|_| ALPHABET[rng.below(ALPHABET.len())]));
    v
}

/// 20 distinct key-shaped values with the prefixes real providers use.
pub fn twenty_values() -> Vec<Vec<u8>> {
    const PREFIXES: [&str; 10] = [
        "sk-ant-api03-",
        "sk-proj-",
        "ghp_",
        "github_pat_",
        "xoxb-",
        "AKIA",
        "glpat-",
        "hf_",
        "sk_live_",
        "SG.",
    ];
    let mut rng = Rng::new(42);
    (0..20)
        .map(|i| key_value(&mut rng, PREFIXES[i % PREFIXES.len()], 32 + i))
        .collect()
}

/// A secret record as the store would hand it to [`Snapshot::build`].
pub fn record(
    name: &str,
    value: Vec<u8>,
    hosts: Option<Vec<String>>,
    locs: &[Location],
) -> SecretRecord {
    let now = time::OffsetDateTime::now_utc();
    SecretRecord {
        meta: SecretMeta {
            name: name.to_owned(),
            allowed_hosts: hosts,
            locations: locs.to_vec(),
            version: 1,
            created_at: now,
            updated_at: now,
        },
        value: SecretValue::new(value),
    }
}

/// The destination every bench request goes to.
pub fn dest() -> Dest {
    parse_authority("api.anthropic.com:443", None).expect("valid authority")
}

/// A snapshot with `n` secrets (`SECRET_0`…), all allowed for [`dest`] in header and body;
/// secret `i` has token `token(seed + i)` and value `values[i % values.len()]` + `i`.
pub fn snapshot(n: usize, seed: u64) -> Snapshot {
    let values = twenty_values();
    let secrets = (0..n)
        .map(|i| {
            let mut value = values[i % values.len()].clone();
            value.extend_from_slice(i.to_string().as_bytes());
            let rec = record(
                &format!("SECRET_{i}"),
                value,
                Some(vec!["api.anthropic.com".to_owned()]),
                &[Location::Header, Location::Body],
            );
            (rec, token(seed + i as u64))
        })
        .collect();
    Snapshot::build("bench".to_owned(), None, secrets).expect("valid snapshot")
}

/// The view a request to [`dest`] gets from a 20-secret snapshot, and its tokens.
pub fn view20() -> (Arc<HostView>, Vec<Token>) {
    let snap = snapshot(20, 1);
    let tokens = snap.secrets().iter().map(|e| e.token).collect();
    (snap.view(&dest()), tokens)
}

/// `Basic base64(user:pass)`.
pub fn basic(user: &str, pass: &[u8]) -> String {
    let mut raw = user.as_bytes().to_vec();
    raw.push(b':');
    raw.extend_from_slice(pass);
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

/// Splits `data` into `Bytes` chunks of `size` (the last may be shorter), sharing one buffer.
pub fn chunks(data: &Bytes, size: usize) -> Vec<Bytes> {
    (0..data.len())
        .step_by(size)
        .map(|at| data.slice(at..(at + size).min(data.len())))
        .collect()
}
