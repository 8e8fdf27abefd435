//! Fuzz target bodies. Each takes raw bytes and panics when an invariant breaks.
//!
//! Shared by the cargo-fuzz binaries (`fuzz/fuzz_targets/*.rs`, coverage-guided, nightly) and by
//! the stable smoke run inside the integration tests (`tests/it/adversarial/fuzz_smoke.rs`,
//! which includes this file with `#[path]`), so CI exercises the same oracles on any toolchain.
//!
//! | target | what it drives | oracle |
//! |---|---|---|
//! | [`subst_chunked`] | `BodySubst` fed in chunks | a naive per-position substitution of the whole buffer |
//! | [`scrub_chunked`] | `ScrubStream` fed in chunks, `Scrubber::scrub` | a naive leftmost-longest replacement |
//! | [`host_parse`] | `parse_authority`, `normalise_host`, `parse_pattern`, `HostMatcher` | round trips, grammar invariants, `inet_aton`, a naive matcher |
//! | [`config_parse`] | `Config::parse` | never panics; errors carry a message |
//! | [`h1_framing`] | the h1 guard's `Framing` | chunking never changes the verdict; nothing invented |
//! | [`grpc_frames`] | `MessageFrames` (gRPC messages, gzip ones decoded) fed in chunks | chunking never changes the output, the message ends or the verdict; no compressed message passes |
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use sealgate::policy::{self, Dest, Host, HostMatcher, Scheme};
use sealgate::proxy::h1_guard::Framing;
use sealgate::secret::{Location, Locations, SecretValue};
use sealgate::subst::{
    BodySubst, FrameError, MessageCoding, MessageFrames, OnDisallowed, Piece, ScrubStream,
    Scrubber, SecretRef, TokenLookup,
};
use sealgate::token::{Token, TOKEN_LEN};

// ---------------------------------------------------------------------------------------------
// Input decoding

/// Splits `data` into (cut offsets, rest): `data[0] & 15` cut bytes follow, each a gap.
fn cuts_and_rest(data: &[u8]) -> (Vec<usize>, &[u8]) {
    let Some((&first, data)) = data.split_first() else {
        return (Vec::new(), data);
    };
    let n = usize::from(first & 15).min(data.len());
    let (gaps, rest) = data.split_at(n);
    let mut at = 0;
    let cuts = gaps
        .iter()
        .map(|g| {
            at += usize::from(*g);
            at
        })
        .collect();
    (cuts, rest)
}

/// `input` cut at `cuts` (clamped, may repeat).
fn pieces<'a>(input: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut last = 0;
    for &c in cuts.iter().chain(std::iter::once(&input.len())) {
        let c = c.clamp(last, input.len());
        out.push(&input[last..c]);
        last = c;
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Substitution

/// The tokens the fuzz lookup knows (also in `fuzz/dicts/subst.dict`).
pub const TOKENS: [&str; 6] = [
    "osb_sealed_0123456789abcdef0123456789abcdef",
    "osb_sealed_00000000000000000000000000000001",
    "osb_sealed_ffffffffffffffffffffffffffffffff",
    "osb_sealed_deadbeefdeadbeefdeadbeefdeadbeef",
    "osb_sealed_0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f",
    "osb_sealed_a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0",
];

struct Lookup(HashMap<Token, SecretRef>);

impl TokenLookup for Lookup {
    fn get(&self, token: &Token) -> Option<&SecretRef> {
        self.0.get(token)
    }
}

fn lookup() -> Arc<Lookup> {
    use Location::{Body, Header, Query};
    let rows: [(&str, Vec<u8>, &[Location], bool); 6] = [
        (
            "ALLOWED",
            b"sk-live-ALLOWED".to_vec(),
            &[Header, Body],
            true,
        ),
        ("BODY", b"body-secret".to_vec(), &[Body], true),
        ("HEADER", b"header-only".to_vec(), &[Header], true),
        ("DENIED", b"denied-value".to_vec(), &[Header, Body], false),
        (
            "NESTED",
            format!("pre{}post", TOKENS[0]).into_bytes(),
            &[Header, Query, Body],
            true,
        ),
        ("EMPTY", Vec::new(), &[Body], true),
    ];
    let map = rows
        .into_iter()
        .zip(TOKENS)
        .map(|((name, value, locs, allowed), tok)| {
            let token = Token::parse(tok.as_bytes()).expect("well-formed fuzz token");
            let secret = SecretRef {
                name: Arc::from(name),
                value: SecretValue::new(value),
                locations: Locations::from_slice(locs),
                allowed,
            };
            (token, secret)
        })
        .collect();
    Arc::new(Lookup(map))
}

type Outcome = Result<(Vec<u8>, Vec<String>, Vec<String>), String>;

/// The naive oracle: at each position, a body token to unseal is replaced, any other byte copied.
fn subst_oracle(l: &Lookup, input: &[u8], mode: OnDisallowed) -> Outcome {
    let (mut out, mut unsealed, mut refused) = (Vec::new(), Vec::new(), Vec::new());
    let mut i = 0;
    while i < input.len() {
        let secret = input
            .get(i..i + TOKEN_LEN)
            .and_then(Token::parse)
            .and_then(|t| l.get(&t))
            .filter(|s| s.locations.contains(Location::Body));
        match secret {
            Some(s) if s.allowed => {
                out.extend_from_slice(s.value.expose());
                push_unique(&mut unsealed, &s.name);
                i += TOKEN_LEN;
                continue;
            }
            Some(s) if mode == OnDisallowed::Block => return Err(s.name.to_string()),
            Some(s) => push_unique(&mut refused, &s.name),
            None => {}
        }
        out.push(input[i]);
        i += 1;
    }
    Ok((out, unsealed, refused))
}

fn push_unique(v: &mut Vec<String>, name: &str) {
    if !v.iter().any(|n| n == name) {
        v.push(name.to_owned());
    }
}

/// `BodySubst` over arbitrary chunks equals the naive whole-buffer oracle.
pub fn subst_chunked(data: &[u8]) {
    let mode = if data.first().is_some_and(|b| b & 16 != 0) {
        OnDisallowed::ForwardSealed
    } else {
        OnDisallowed::Block
    };
    let (cuts, input) = cuts_and_rest(data);
    let l = lookup();
    let expected = subst_oracle(&l, input, mode);
    let mut engine = BodySubst::new(l as Arc<dyn TokenLookup>, mode);
    let mut out = Vec::new();
    let mut got: Outcome = Ok(Default::default());
    for piece in pieces(input, &cuts) {
        let before = out.len();
        if let Err(d) = engine.push(Bytes::copy_from_slice(piece), &mut out) {
            got = Err(d.secret.to_string());
            break;
        }
        assert!(out[before..].iter().all(|p| !p.is_empty()), "empty piece");
    }
    if got.is_ok() {
        engine.finish(&mut out);
        assert!(!engine.is_holding());
        let r = engine.report();
        let names = |v: &[Arc<str>]| v.iter().map(|n| n.to_string()).collect();
        got = Ok((out.concat(), names(&r.unsealed), names(&r.refused)));
    }
    assert_eq!(got, expected, "cuts {cuts:?}");
}

// ---------------------------------------------------------------------------------------------
// Scrubbing

/// A decoded scrub input: values, cut offsets, haystack.
type ScrubInput<'a> = (Vec<Vec<u8>>, Vec<usize>, &'a [u8]);

/// Decodes `n` (1–4) values, each `len (≤ 24), bytes`, then cuts, then the haystack.
fn scrub_input(data: &[u8]) -> Option<ScrubInput<'_>> {
    let (&n, mut rest) = data.split_first()?;
    let mut values = Vec::new();
    for _ in 0..(n % 4) + 1 {
        let (&len, r) = rest.split_first()?;
        let len = usize::from(len % 25).min(r.len());
        values.push(r[..len].to_vec());
        rest = &r[len..];
    }
    let (cuts, hay) = cuts_and_rest(rest);
    Some((values, cuts, hay))
}

/// Naive leftmost-longest, non-overlapping replacement (first pair wins, empties skipped).
fn scrub_oracle(pairs: &[(Vec<u8>, Vec<u8>)], hay: &[u8]) -> Vec<u8> {
    let mut uniq: Vec<&(Vec<u8>, Vec<u8>)> = Vec::new();
    for p in pairs {
        if !p.0.is_empty() && !uniq.iter().any(|q| q.0 == p.0) {
            uniq.push(p);
        }
    }
    let (mut out, mut i) = (Vec::new(), 0);
    while i < hay.len() {
        let best = uniq
            .iter()
            .filter(|(v, _)| hay[i..].starts_with(v))
            .max_by_key(|(v, _)| v.len());
        match best {
            Some((v, t)) => {
                out.extend_from_slice(t);
                i += v.len();
            }
            None => {
                out.push(hay[i]);
                i += 1;
            }
        }
    }
    out
}

/// `ScrubStream` over arbitrary chunks and `Scrubber::scrub` equal the naive oracle.
pub fn scrub_chunked(data: &[u8]) {
    let Some((values, cuts, hay)) = scrub_input(data) else {
        return;
    };
    let pairs: Vec<(Vec<u8>, Vec<u8>)> = values
        .iter()
        .enumerate()
        .map(|(i, v)| (v.clone(), format!("<{i}>").into_bytes()))
        .collect();
    let expected = scrub_oracle(&pairs, hay);
    let secrets = pairs
        .iter()
        .map(|(v, t)| (SecretValue::new(v.clone()), Bytes::from(t.clone())))
        .collect();
    let Some(scrubber) = Scrubber::new(secrets) else {
        assert!(
            values.iter().all(Vec::is_empty),
            "no scrubber for real values"
        );
        return;
    };
    let whole = scrubber.scrub(hay).map_or_else(|| hay.to_vec(), |(b, _)| b);
    assert_eq!(whole, expected, "whole buffer");
    let mut stream = ScrubStream::new(scrubber.clone());
    let mut out = Vec::new();
    for piece in pieces(hay, &cuts) {
        stream.push(Bytes::copy_from_slice(piece), &mut out);
    }
    stream.finish(&mut out);
    assert_eq!(out.concat(), expected, "cuts {cuts:?}");
}

// ---------------------------------------------------------------------------------------------
// gRPC message framing

/// What one `MessageFrames` passed on for `pieces`: plain bytes, the offset of every message
/// end, and the error that ended it, if any.
type FramesRun = (Vec<u8>, Vec<usize>, Option<FrameError>);

fn frames_run(pieces: &[&[u8]]) -> FramesRun {
    let mut f = MessageFrames::new(MessageCoding::Gzip, 4096);
    let (mut out, mut err) = (Vec::new(), None);
    for p in pieces {
        if let Err(e) = f.push(Bytes::copy_from_slice(p), &mut out) {
            err = Some(e);
            break;
        }
    }
    if err.is_none() {
        err = f.finish().err();
    }
    let (mut bytes, mut ends) = (Vec::new(), Vec::new());
    for p in out {
        match p {
            Piece::Data(b) => bytes.extend_from_slice(&b),
            Piece::End => ends.push(bytes.len()),
        }
    }
    (bytes, ends, err)
}

/// gRPC framing: chunking never changes what is passed on, where messages end, or the
/// verdict; what is passed on is plain messages (compressed flag clear), each end marked
/// exactly where a message ends; a stream that ends cleanly ends at a message end.
pub fn grpc_frames(data: &[u8]) {
    let (cuts, input) = cuts_and_rest(data);
    let whole = frames_run(&[input]);
    assert_eq!(frames_run(&pieces(input, &cuts)), whole, "cuts {cuts:?}");
    let (bytes, ends, err) = whole;
    if err.is_none() {
        assert_eq!(
            ends.last().copied().unwrap_or(0),
            bytes.len(),
            "a clean end mid-message"
        );
    }
    let (mut at, mut boundaries) = (0, Vec::new());
    while bytes.len() - at >= 5 {
        assert_eq!(bytes[at] & 1, 0, "a compressed message passed at {at}");
        let len = u32::from_be_bytes([bytes[at + 1], bytes[at + 2], bytes[at + 3], bytes[at + 4]]);
        let Some(end) = (at + 5)
            .checked_add(len as usize)
            .filter(|e| *e <= bytes.len())
        else {
            break;
        };
        at = end;
        boundaries.push(at);
    }
    assert_eq!(ends, boundaries, "message ends");
}

// ---------------------------------------------------------------------------------------------
// Hosts, authorities, patterns

extern "C" {
    /// glibc's `inet_aton(3)` (the `libc` crate does not bind it): the legacy parser behind
    /// getaddrinfo's numeric-host path.
    fn inet_aton(cp: *const libc::c_char, inp: *mut libc::in_addr) -> libc::c_int;
}

/// True if the C library would read `name` as an IPv4 address (`127.1`, `0x7f.1`, …).
fn inet_aton_accepts(name: &str) -> bool {
    let Ok(c) = std::ffi::CString::new(name) else {
        return false;
    };
    let mut addr = libc::in_addr { s_addr: 0 };
    // SAFETY: `c` is a valid NUL-terminated string and `addr` a valid out-parameter.
    unsafe { inet_aton(c.as_ptr(), &mut addr) != 0 }
}

fn check_host(input: &str, h: &Host) {
    assert!(input.is_ascii(), "non-ASCII input accepted: {input:?}");
    let Host::Name(n) = h else {
        return;
    };
    assert!(!n.is_empty() && n.len() <= 253, "{n:?}");
    assert!(!n.ends_with('.'), "{n:?}");
    assert!(
        n.bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.')),
        "{n:?}"
    );
    assert!(
        n.parse::<std::net::IpAddr>().is_err(),
        "IP text as a name: {n:?}"
    );
    assert!(
        !inet_aton_accepts(n),
        "legacy IPv4 spelling accepted as a name: {n:?}"
    );
    for label in n.split('.') {
        assert!(!label.is_empty() && label.len() <= 63, "{n:?}");
        assert!(!label.starts_with('-') && !label.ends_with('-'), "{n:?}");
    }
}

fn check_authority(input: &str, default: Option<u16>) {
    let Ok(d) = policy::parse_authority(input, default) else {
        return;
    };
    check_host(input, &d.host);
    assert_ne!(d.port, 0, "{input:?}");
    let a = d.authority();
    assert!(!a.contains('@') && !a.contains('%'), "{a:?}");
    assert_eq!(
        policy::parse_authority(&a, None).as_ref(),
        Ok(&d),
        "round trip of {input:?}"
    );
    assert_eq!(
        policy::normalise_host(&d.host.as_str_for_sni()).as_ref(),
        Ok(&d.host),
        "SNI form of {input:?}"
    );
}

/// The canonical pattern `c` (from `HostPattern`'s `Display`) decides `dest` naively.
fn naive_match(c: &str, dest: &Dest, scheme: Scheme) -> bool {
    let (host, port) = if let Some(rest) = c.strip_prefix('[') {
        let (inside, after) = rest.split_once(']').expect("bracketed pattern");
        (format!("[{inside}]"), after.strip_prefix(':'))
    } else {
        match c.rsplit_once(':') {
            Some((h, p)) => (h.to_owned(), Some(p)),
            None => (c.to_owned(), None),
        }
    };
    let port_ok = match port {
        Some(p) => p.parse::<u16>().ok() == Some(dest.port),
        None => dest.port == 443 || (dest.port == 80 && scheme == Scheme::Http),
    };
    let host_ok = if host == "*" {
        true
    } else if let Some(suffix) = host.strip_prefix("*.") {
        matches!(&dest.host, Host::Name(n) if n.ends_with(&format!(".{suffix}")))
    } else {
        dest.host.to_string() == host
    };
    port_ok && host_ok
}

/// Parsers never panic, accept only the documented grammar, and round-trip; the compiled
/// matcher agrees with a naive matcher on the canonical pattern.
pub fn host_parse(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let (first, second) = s.split_once('\n').unwrap_or((s, s));
    for input in [first, second] {
        check_authority(input, None);
        check_authority(input, Some(443));
        if let Ok(h) = policy::normalise_host(input) {
            check_host(input, &h);
            assert_eq!(policy::normalise_host(&h.as_str_for_sni()).as_ref(), Ok(&h));
        }
        if let Ok(p) = policy::parse_pattern(input) {
            let c = p.to_string();
            assert_eq!(
                policy::parse_pattern(&c).as_ref(),
                Ok(&p),
                "pattern {input:?}"
            );
        }
    }
    let (Ok(p), Ok(d)) = (
        policy::parse_pattern(first),
        policy::parse_authority(second, Some(443)),
    ) else {
        return;
    };
    let c = p.to_string();
    let m = HostMatcher::compile(std::slice::from_ref(&c)).expect("canonical pattern compiles");
    for scheme in [Scheme::Https, Scheme::Http] {
        assert_eq!(
            m.matches(&d, scheme),
            naive_match(&c, &d, scheme),
            "pattern {c:?} vs {d} ({scheme:?})"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Config

/// `Config::parse` never panics; every error says something.
pub fn config_parse(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = sealgate::config::Config::parse(text, "fuzz.toml") {
        assert!(!e.to_string().is_empty());
    }
}

// ---------------------------------------------------------------------------------------------
// h1 framing

fn frame_all(input: &[u8], cuts: &[usize]) -> (Vec<u8>, Option<String>) {
    let mut f = Framing::new(1024);
    let mut out = BytesMut::new();
    for piece in pieces(input, cuts) {
        if let Err(r) = f.feed(piece, &mut out) {
            return (out.to_vec(), Some(format!("{r:?}")));
        }
    }
    (out.to_vec(), None)
}

/// The h1 guard's verdict and released bytes do not depend on how reads are cut, and what it
/// releases is always a prefix of what it received.
pub fn h1_framing(data: &[u8]) {
    let (cuts, input) = cuts_and_rest(data);
    let whole = frame_all(input, &[]);
    let split = frame_all(input, &cuts);
    assert_eq!(whole, split, "cuts {cuts:?}");
    assert!(
        input.starts_with(&whole.0),
        "released bytes are not a prefix of the input"
    );
}
