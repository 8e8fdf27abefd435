//! The streaming request-body engine: unseals tokens across arbitrary chunk boundaries.
//!
//! # Held-back bytes
//!
//! A token is `TOKEN_LEN` (43) bytes, so a chunk boundary can cut one anywhere. At the end of
//! each chunk the engine holds back the shortest tail that could still *start* a token and
//! emits everything before it:
//!
//! ```text
//! chunk 1: "key=osb_sea"        emit "key=",  hold "osb_sea"   (a prefix of the prefix)
//! chunk 2: "led_0123…cdef&x=1"  hold + the first 36 bytes form a token → emit the value, "&x=1"
//! chunk 1: "…osb_sealed_01ab"   hold "osb_sealed_01ab"         (prefix + hex so far)
//! chunk 1: "…hello"             hold "o"                       (could be the first byte)
//! chunk 1: "…osb_sealed_01ag"   hold nothing                   ("g" is not hex)
//! ```
//!
//! The held tail is at most `TOKEN_LEN - 1` bytes. No token can start inside it after its
//! first byte: everything after the first byte is drawn from `sb_ealed` and hex digits, none of
//! which is `o`. So when the held bytes turn out not to be a token, they are emitted unchanged
//! and scanning restarts at the new chunk.
//!
//! # Zero copy
//!
//! Output pieces are slices of the input chunks (or of the held tail) and shared [`Bytes`] of
//! the values; bytes that need no change are never copied. The only copy is when a potential
//! token spans three or more chunks (at most 42 bytes).

use std::ops::Deref;
use std::sync::Arc;

use bytes::Bytes;

use super::{
    counted, decide, push_piece, split_emit, value_bytes, Denied, OnDisallowed, Report,
    TokenLookup, FINDER,
};
use crate::secret::{Location, SecretValue};
use crate::token::{is_lower_hex, Token, PREFIX, TOKEN_LEN};

/// Streaming token substitution for one request body (Location::Body).
///
/// `L` is how the lookup is held: `Arc<dyn TokenLookup>` (the default) or any other pointer
/// to a [`TokenLookup`]. The engine is `'static + Send` whenever `L` is.
///
/// # Memory usage
/// At most `TOKEN_LEN - 1` bytes are held between calls (see the module docs); output is pushed
/// into the caller's vector.
pub struct BodySubst<L = Arc<dyn TokenLookup>> {
    lookup: L,
    mode: OnDisallowed,
    /// The tail that could start a token (empty, or a proper prefix of a token).
    held: Bytes,
    report: Report,
    changed: bool,
    /// Set once a push was denied; the engine then refuses everything.
    denied: Option<Denied>,
    /// How a value is written into this body.
    encoding: BodyEncoding,
    /// Set once a byte other than whitespace was pushed (see [`BodySubst::start`]).
    started: bool,
}

/// How a real value is written in place of its token, by the body's media type: a form field
/// or a JSON string must decode to the value, so the value is encoded as that syntax requires
/// (a `+`, `&` or `%` in a form value, a `"` or `\` in a JSON string). Any other body gets the
/// bytes as they are.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BodyEncoding {
    /// The value's bytes.
    #[default]
    Verbatim,
    /// `application/x-www-form-urlencoded`: the value form-encoded ([`super::forms::form_field`]).
    Form,
    /// `application/json` and `…+json`: the value escaped for a JSON string
    /// ([`super::forms::json_string`]).
    Json,
}

impl BodyEncoding {
    /// The encoding for a body with these headers (its `Content-Type`).
    pub fn of(headers: &http::HeaderMap) -> BodyEncoding {
        let Some(media) = headers
            .get(http::header::CONTENT_TYPE)
            .map(|v| super::binary::essence(v.as_bytes()))
        else {
            return BodyEncoding::Verbatim;
        };
        let json_suffix =
            media.len() >= 5 && media[media.len() - 5..].eq_ignore_ascii_case(b"+json");
        if media.eq_ignore_ascii_case(b"application/x-www-form-urlencoded") {
            BodyEncoding::Form
        } else if json_suffix || media.eq_ignore_ascii_case(b"application/json") {
            BodyEncoding::Json
        } else {
            BodyEncoding::Verbatim
        }
    }

    /// `value` as this encoding writes it, shared with the value itself when nothing changes.
    fn write(self, value: &SecretValue) -> Bytes {
        let encoded = match self {
            BodyEncoding::Verbatim => return value_bytes(value),
            BodyEncoding::Form => super::forms::form_field(value),
            BodyEncoding::Json => super::forms::json_string(value),
        };
        if encoded == *value {
            value_bytes(value)
        } else {
            value_bytes(&encoded)
        }
    }
}

impl<L> BodySubst<L>
where
    L: Deref,
    L::Target: TokenLookup,
{
    /// A fresh engine for one body.
    pub fn new(lookup: L, mode: OnDisallowed) -> Self {
        BodySubst {
            lookup,
            mode,
            held: Bytes::new(),
            report: Report::default(),
            changed: false,
            denied: None,
            encoding: BodyEncoding::Verbatim,
            started: false,
        }
    }

    /// Looks at the body's first bytes: a form-labelled body that opens a JSON object or array
    /// gets values as they are (`curl -d '{…}'` labels JSON `x-www-form-urlencoded` by
    /// default, and its servers read it as JSON). Later chunks never change the encoding.
    fn start(&mut self, chunk: &[u8]) {
        let Some(&first) = chunk.iter().find(|b| !b.is_ascii_whitespace()) else {
            return;
        };
        self.started = true;
        if self.encoding == BodyEncoding::Form && matches!(first, b'{' | b'[') {
            self.encoding = BodyEncoding::Verbatim;
        }
    }

    /// Writes values as `encoding` requires (see [`BodyEncoding`]).
    pub fn with_encoding(mut self, encoding: BodyEncoding) -> Self {
        self.encoding = encoding;
        self
    }

    /// Puts at most `max` bytes of real values into this body; a token past that stays sealed
    /// and the report says `over_budget` (see [`Report::max_unsealed`]).
    pub fn with_max_unsealed(mut self, max: usize) -> Self {
        self.report.max_unsealed = Some(max);
        self
    }

    /// Substitutes `chunk`, pushing the output pieces onto `out` (possibly none, if the whole
    /// chunk could be the start of a token).
    ///
    /// # Errors
    /// [`Denied`] for a disallowed token under [`OnDisallowed::Block`]. The body must then be
    /// aborted; later calls return the same error and emit nothing.
    pub fn push(&mut self, chunk: Bytes, out: &mut Vec<Bytes>) -> Result<(), Denied> {
        if let Some(denied) = &self.denied {
            return Err(denied.clone());
        }
        if !self.started {
            self.start(&chunk);
        }
        let result = self.push_inner(chunk, out);
        if let Err(denied) = &result {
            self.denied = Some(denied.clone());
        }
        result
    }

    /// Emits the held tail unchanged (it cannot be a token: the body ended).
    pub fn finish(&mut self, out: &mut Vec<Bytes>) {
        if self.denied.is_none() && !self.held.is_empty() {
            out.push(std::mem::take(&mut self.held));
        }
    }

    fn push_inner(&mut self, chunk: Bytes, out: &mut Vec<Bytes>) -> Result<(), Denied> {
        if chunk.is_empty() {
            return Ok(());
        }
        let from = if self.held.is_empty() {
            0
        } else {
            match self.resume_held(&chunk, out)? {
                Some(from) => from,
                None => return Ok(()),
            }
        };
        self.scan(chunk, from, out)
    }

    /// Continues the held candidate token into `chunk`. Returns where scanning of `chunk`
    /// resumes, or `None` if all of `chunk` joined the held tail.
    fn resume_held(&mut self, chunk: &[u8], out: &mut Vec<Bytes>) -> Result<Option<usize>, Denied> {
        let held = std::mem::take(&mut self.held);
        let need = TOKEN_LEN - held.len();
        let avail = need.min(chunk.len());
        if !continues_token(held.len(), &chunk[..avail]) {
            out.push(held);
            return Ok(Some(0));
        }
        if avail < need {
            self.held = [&held[..], chunk].concat().into();
            return Ok(None);
        }
        let mut raw = [0u8; TOKEN_LEN];
        raw[..held.len()].copy_from_slice(&held);
        raw[held.len()..].copy_from_slice(&chunk[..need]);
        if let Some(token) = Token::parse(&raw) {
            if let Some(value) = self.unseal(&token)? {
                push_piece(out, value);
                return Ok(Some(need));
            }
        }
        out.push(held);
        Ok(Some(0))
    }

    /// Scans `chunk[from..]`: replaces complete tokens, emits the rest as slices and holds back
    /// a tail that could start a token.
    fn scan(&mut self, chunk: Bytes, from: usize, out: &mut Vec<Bytes>) -> Result<(), Denied> {
        let mut cursor = from;
        let mut hold = None;
        for at in FINDER.find_iter(&chunk[from..]).map(|at| at + from) {
            let Some(raw) = chunk.get(at..at + TOKEN_LEN) else {
                if chunk[at + PREFIX.len()..].iter().all(is_lower_hex) {
                    hold = Some(at);
                    break;
                }
                continue;
            };
            let Some(token) = Token::parse(raw) else {
                continue;
            };
            if let Some(value) = self.unseal(&token)? {
                push_piece(out, chunk.slice(cursor..at));
                push_piece(out, value);
                cursor = at + TOKEN_LEN;
            }
        }
        let hold = hold.unwrap_or_else(|| partial_prefix_start(&chunk, cursor));
        self.held = split_emit(chunk, cursor, hold, out);
        Ok(())
    }

    /// The value to emit for `token`, if it is unsealed in a body.
    /// The encoded value counts against the budget: where encoding makes it longer, the extra
    /// bytes too (a token past the budget stays sealed, as in [`decide`]).
    fn unseal(&mut self, token: &Token) -> Result<Option<Bytes>, Denied> {
        let mark = self.report.unsealed_mark();
        let value = decide(
            &*self.lookup,
            token,
            Location::Body,
            self.mode,
            &mut self.report,
        )?;
        let Some(value) = value else {
            return Ok(None);
        };
        let bytes = self.encoding.write(value);
        let extra = counted(bytes.len()).saturating_sub(counted(value.len()));
        let grown = self.report.unsealed_bytes + extra;
        if self.report.max_unsealed.is_some_and(|max| grown > max) {
            self.report.rollback_unsealed(mark);
            self.report.over_budget = true;
            return Ok(None);
        }
        self.report.unsealed_bytes = grown;
        self.changed = true;
        Ok(Some(bytes))
    }
}

impl<L> BodySubst<L> {
    /// What was unsealed and refused so far.
    pub fn report(&self) -> &Report {
        &self.report
    }

    /// True once at least one token was replaced (the output differs from the input).
    pub fn changed(&self) -> bool {
        self.changed
    }

    /// True while a tail is held back (more output is due at [`BodySubst::finish`]).
    pub fn is_holding(&self) -> bool {
        !self.held.is_empty()
    }
}

/// True if `bytes`, placed at offset `offset` of a token, match what a token has there.
fn continues_token(offset: usize, bytes: &[u8]) -> bool {
    bytes
        .iter()
        .enumerate()
        .all(|(i, b)| match PREFIX.get(offset + i) {
            Some(expected) => b == expected,
            None => is_lower_hex(b),
        })
}

/// Where the tail of `chunk[cursor..]` that is a proper prefix of `osb_sealed_` starts, or
/// `chunk.len()` if there is none. Only the last `o` can start one: `o` occurs in the prefix
/// only as its first byte.
fn partial_prefix_start(chunk: &[u8], cursor: usize) -> usize {
    let from = cursor.max(chunk.len().saturating_sub(PREFIX.len() - 1));
    match memchr::memrchr(b'o', &chunk[from..]) {
        Some(i) if PREFIX.starts_with(&chunk[from + i..]) => from + i,
        _ => chunk.len(),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::subst::testutil::{as_dyn, fixture, tok, Fixture};

    /// The naive oracle: at each position, a token to unseal is replaced, any other byte is
    /// copied. Independent of the engine (its own decision code, no prefix search).
    fn oracle(f: &Fixture, input: &[u8], mode: OnDisallowed) -> Result<(Vec<u8>, Report), Denied> {
        let (mut out, mut report, mut i) = (Vec::new(), Report::default(), 0);
        while i < input.len() {
            let secret = input
                .get(i..i + TOKEN_LEN)
                .and_then(Token::parse)
                .and_then(|t| f.get(&t));
            match secret.filter(|s| s.locations.contains(Location::Body)) {
                Some(s) if s.allowed => {
                    out.extend_from_slice(s.value.expose());
                    super::super::push_unique(&mut report.unsealed, &s.name);
                    i += TOKEN_LEN;
                    continue;
                }
                Some(s) if mode == OnDisallowed::Block => {
                    return Err(Denied {
                        secret: s.name.clone(),
                        location: Location::Body,
                    });
                }
                Some(s) => super::super::push_unique(&mut report.refused, &s.name),
                None => {}
            }
            out.push(input[i]);
            i += 1;
        }
        Ok((out, report))
    }

    /// Runs the engine over `input` cut at `cuts` (sorted offsets, may repeat).
    fn stream(
        f: &Arc<Fixture>,
        input: &[u8],
        cuts: &[usize],
        mode: OnDisallowed,
    ) -> Result<(Vec<u8>, Report), Denied> {
        let mut engine = BodySubst::new(as_dyn(f), mode);
        let mut out = Vec::new();
        let mut last = 0;
        for &cut in cuts.iter().chain(std::iter::once(&input.len())) {
            let cut = cut.clamp(last, input.len());
            let before = out.len();
            engine.push(Bytes::copy_from_slice(&input[last..cut]), &mut out)?;
            assert!(
                out[before..].iter().all(|b| !b.is_empty()),
                "empty piece emitted"
            );
            assert!(engine.held.len() < TOKEN_LEN);
            last = cut;
        }
        engine.finish(&mut out);
        assert!(!engine.is_holding());
        Ok((out.concat(), engine.report().clone()))
    }

    fn assert_same(f: &Arc<Fixture>, input: &[u8], cuts: &[usize], mode: OnDisallowed) {
        let expected = oracle(f, input, mode);
        let got = stream(f, input, cuts, mode);
        match (expected, got) {
            (Ok((e, er)), Ok((g, gr))) => {
                assert_eq!(
                    String::from_utf8_lossy(&g),
                    String::from_utf8_lossy(&e),
                    "cuts {cuts:?}"
                );
                assert_eq!(gr.unsealed, er.unsealed);
                assert_eq!(gr.refused, er.refused);
                assert!(gr.basic_forms.is_empty());
            }
            (Err(e), Err(g)) => assert_eq!(g, e),
            (e, g) => panic!(
                "oracle {:?} vs engine {:?} (cuts {cuts:?})",
                e.map(|_| ()),
                g.map(|_| ())
            ),
        }
    }

    /// Every split of `input` into two and into three pieces, plus 1-byte chunks.
    fn assert_all_splits(input: &[u8], mode: OnDisallowed) {
        let f = fixture();
        for a in 0..=input.len() {
            assert_same(&f, input, &[a], mode);
            for b in a..=input.len().min(a + TOKEN_LEN + 1) {
                assert_same(&f, input, &[a, b], mode);
            }
        }
        let ones: Vec<usize> = (1..input.len()).collect();
        assert_same(&f, input, &ones, mode);
    }

    #[test]
    fn token_split_at_every_offset() {
        let f = fixture();
        assert_all_splits(
            format!("{{\"key\":\"{}\"}}", f.allowed).as_bytes(),
            OnDisallowed::Block,
        );
        let (out, _) = stream(&f, f.allowed.as_bytes(), &[17], OnDisallowed::Block).unwrap();
        assert_eq!(out, b"sk-live-ALLOWED");
    }

    #[test]
    fn token_right_after_a_held_partial_prefix() {
        let f = fixture();
        let input = format!(
            "osb_sealed_osb_sealed_{}",
            &f.allowed.as_str()[PREFIX.len()..]
        );
        assert_all_splits(input.as_bytes(), OnDisallowed::Block);
        let (out, _) = stream(&f, input.as_bytes(), &[11], OnDisallowed::Block).unwrap();
        assert_eq!(out, b"osb_sealed_sk-live-ALLOWED");
        let input = format!("osb_seal{}", f.allowed);
        assert_all_splits(input.as_bytes(), OnDisallowed::Block);
    }

    #[test]
    fn adjacent_tokens_and_near_misses() {
        let f = fixture();
        let hex = &f.allowed.as_str()[PREFIX.len()..];
        assert_ne!(hex, hex.to_uppercase());
        let input = format!(
            "{a}{b}osb_sealed_{up}|osb_sealed_{short}|{a}x",
            a = f.allowed,
            b = f.body_only,
            up = hex.to_uppercase(),
            short = &hex[..31],
        );
        assert_all_splits(input.as_bytes(), OnDisallowed::Block);
        let (out, r) = stream(&f, input.as_bytes(), &[], OnDisallowed::Block).unwrap();
        let expected = format!(
            "sk-live-ALLOWEDbody-secretosb_sealed_{}|osb_sealed_{}|sk-live-ALLOWEDx",
            hex.to_uppercase(),
            &hex[..31]
        );
        assert_eq!(String::from_utf8(out).unwrap(), expected);
        assert_eq!(
            r.unsealed,
            vec![Arc::from("ALLOWED"), Arc::from("BODY_ONLY")]
        );
    }

    #[test]
    fn value_containing_a_token_is_not_substituted_again() {
        let f = fixture();
        let input = f.nested.to_string();
        assert_all_splits(input.as_bytes(), OnDisallowed::Block);
        let (out, r) = stream(&f, input.as_bytes(), &[5], OnDisallowed::Block).unwrap();
        assert_eq!(out, format!("pre{}post", f.allowed).as_bytes());
        assert_eq!(r.unsealed, vec![Arc::from("NESTED")]);
    }

    #[test]
    fn header_only_token_in_body_travels_sealed() {
        let f = fixture();
        let input = format!("a={}&b={}", f.header_only, f.query_only);
        let (out, r) = stream(&f, input.as_bytes(), &[9], OnDisallowed::Block).unwrap();
        assert_eq!(out, input.as_bytes());
        assert!(r.is_empty());
    }

    #[test]
    fn block_vs_forward_sealed() {
        let f = fixture();
        let input = format!("{} {} {}", f.allowed, f.denied, f.denied);
        let d = stream(&f, input.as_bytes(), &[50], OnDisallowed::Block).unwrap_err();
        assert_eq!((&*d.secret, d.location), ("DENIED", Location::Body));
        let (out, r) = stream(&f, input.as_bytes(), &[50], OnDisallowed::ForwardSealed).unwrap();
        assert_eq!(out, format!("sk-live-ALLOWED {0} {0}", f.denied).as_bytes());
        assert_eq!(r.refused, vec![Arc::from("DENIED")]);
        assert_all_splits(input.as_bytes(), OnDisallowed::ForwardSealed);
        assert_all_splits(input.as_bytes(), OnDisallowed::Block);
    }

    #[test]
    fn sealed_only_lets_allowed_tokens_travel_sealed_and_still_refuses_the_others() {
        let f = fixture();
        let lookup = super::super::SealedOnly(f.clone());
        let input = format!("{} {}", f.allowed, f.body_only);
        let mut engine = BodySubst::new(&lookup, OnDisallowed::Block);
        let mut out = Vec::new();
        engine.push(Bytes::from(input.clone()), &mut out).unwrap();
        engine.finish(&mut out);
        assert_eq!(out.concat(), input.as_bytes(), "allowed tokens stay sealed");
        assert!(engine.report().unsealed.is_empty());
        let mut engine = BodySubst::new(&lookup, OnDisallowed::Block);
        let denied = engine.push(Bytes::from(f.denied.to_string()), &mut Vec::new());
        assert_eq!(&*denied.unwrap_err().secret, "DENIED");
    }

    #[test]
    fn denied_engine_stays_denied() {
        let f = fixture();
        let mut engine = BodySubst::new(as_dyn(&f), OnDisallowed::Block);
        let mut out = Vec::new();
        assert!(engine
            .push(Bytes::from(f.denied.to_string()), &mut out)
            .is_err());
        assert!(engine.push(Bytes::from_static(b"more"), &mut out).is_err());
        engine.finish(&mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn token_free_chunk_is_passed_through_as_is() {
        let f = fixture();
        let mut engine = BodySubst::new(as_dyn(&f), OnDisallowed::Block);
        let chunk = Bytes::from_static(b"plain text without tokens");
        let mut out = Vec::new();
        engine.push(chunk.clone(), &mut out).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].as_ptr(), chunk.as_ptr());
        assert!(!engine.changed());
    }

    #[test]
    fn holds_back_only_what_could_start_a_token() {
        let f = fixture();
        let mut engine = BodySubst::new(as_dyn(&f), OnDisallowed::Block);
        let mut out = Vec::new();
        for (chunk, held) in [
            ("hello", "o"),
            ("xosb_sealed_0a", "osb_sealed_0a"),
            ("g", ""),
            ("osb_sealed_0aG", ""),
        ] {
            engine.push(Bytes::from(chunk), &mut out).unwrap();
            assert_eq!(&engine.held[..], held.as_bytes(), "after {chunk}");
        }
    }

    #[test]
    fn unchanged_output_reuses_input_memory() {
        let f = fixture();
        let chunk = Bytes::from(format!("x{}y", f.allowed));
        let mut engine = BodySubst::new(as_dyn(&f), OnDisallowed::Block);
        let mut out = Vec::new();
        engine.push(chunk.clone(), &mut out).unwrap();
        assert_eq!(out.len(), 3);
        assert_eq!(out[0].as_ptr(), chunk.as_ptr());
        assert_eq!(out[2].as_ptr(), chunk[TOKEN_LEN + 1..].as_ptr());
        assert!(engine.changed());
    }

    #[test]
    fn works_with_a_concrete_arc() {
        let f = fixture();
        let mut engine = BodySubst::new(f.clone(), OnDisallowed::Block);
        let mut out = Vec::new();
        engine
            .push(Bytes::from(f.allowed.to_string()), &mut out)
            .unwrap();
        assert_eq!(out.concat(), b"sk-live-ALLOWED");
        fn assert_send_static<T: Send + 'static>(_: &T) {}
        assert_send_static(&BodySubst::new(as_dyn(&f), OnDisallowed::Block));
    }

    /// Pieces the random inputs are built from: every kind of token, near misses and noise.
    fn pieces(f: &Fixture) -> Vec<Vec<u8>> {
        let hex = &f.allowed.as_str()[PREFIX.len()..];
        let mut v: Vec<Vec<u8>> = f.tokens().iter().map(|t| t.as_bytes().to_vec()).collect();
        v.extend(
            [
                tok(0xab).to_string(),
                format!("osb_sealed_{}", hex.to_uppercase()),
                format!("osb_sealed_{}", &hex[..31]),
                format!("osb_sealed_{}G", &hex[..31]),
                "osb_seal".into(),
                "osb_sealed_".into(),
                "o".into(),
                "sb_".into(),
                hex[..7].into(),
                "x y\n".into(),
            ]
            .map(String::into_bytes),
        );
        v
    }

    fn input_and_cuts() -> impl Strategy<Value = (Vec<u8>, Vec<usize>)> {
        let n = pieces(&fixture()).len();
        let input =
            prop::collection::vec((0..n, any::<u8>(), 0u8..4), 0..24).prop_map(move |picks| {
                let all = pieces(&fixture());
                let mut buf = Vec::new();
                for (i, byte, noise) in picks {
                    buf.extend_from_slice(&all[i]);
                    if noise == 0 {
                        buf.push(byte);
                    }
                }
                buf
            });
        input.prop_flat_map(|input| {
            let len = input.len();
            let cuts = prop::collection::vec(0..=len, 0..12).prop_map(|mut c| {
                c.sort_unstable();
                c
            });
            let ones = Just((1..len).collect::<Vec<_>>());
            (Just(input), prop_oneof![4 => cuts, 1 => ones])
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn streaming_equals_oracle((input, cuts) in input_and_cuts(), block in any::<bool>()) {
            let mode = if block { OnDisallowed::Block } else { OnDisallowed::ForwardSealed };
            assert_same(&fixture(), &input, &cuts, mode);
        }

        #[test]
        fn arbitrary_bytes_pass_through(input in prop::collection::vec(any::<u8>(), 0..300), cuts in prop::collection::vec(0..300usize, 0..8)) {
            let mut cuts = cuts;
            cuts.sort_unstable();
            assert_same(&fixture(), &input, &cuts, OnDisallowed::Block);
        }
    }

    #[test]
    fn the_encoding_follows_the_media_type() {
        let of = |ct: &str| {
            let mut h = http::HeaderMap::new();
            h.insert(http::header::CONTENT_TYPE, ct.parse().unwrap());
            BodyEncoding::of(&h)
        };
        assert_eq!(of("application/x-www-form-urlencoded"), BodyEncoding::Form);
        assert_eq!(
            of("Application/X-WWW-Form-Urlencoded; charset=utf-8"),
            BodyEncoding::Form
        );
        assert_eq!(of("application/json"), BodyEncoding::Json);
        assert_eq!(
            of("application/vnd.api+json; charset=utf-8"),
            BodyEncoding::Json
        );
        assert_eq!(of("text/plain"), BodyEncoding::Verbatim);
        assert_eq!(
            of("multipart/form-data; boundary=x"),
            BodyEncoding::Verbatim
        );
        assert_eq!(of("json"), BodyEncoding::Verbatim);
        assert_eq!(
            BodyEncoding::of(&http::HeaderMap::new()),
            BodyEncoding::Verbatim
        );
    }

    #[test]
    fn values_are_written_as_the_body_syntax_requires() {
        let raw = b"a+b&c=%41 \"q\\";
        let tricky = SecretValue::new(raw.to_vec());
        for (encoding, expected) in [
            (BodyEncoding::Verbatim, &raw[..]),
            (BodyEncoding::Form, b"a%2Bb%26c%3D%2541+%22q%5C"),
            (BodyEncoding::Json, b"a+b&c=%41 \\\"q\\\\"),
        ] {
            assert_eq!(&encoding.write(&tricky)[..], expected, "{encoding:?}");
        }
        let f = super::super::testutil::with_allowed_value(raw);
        let mut engine = BodySubst::new(&f, OnDisallowed::Block).with_encoding(BodyEncoding::Form);
        let mut out = Vec::new();
        let input = format!("k={}&x=1", f.allowed);
        let (a, b) = input.split_at(10);
        for part in [a, b] {
            engine.push(Bytes::from(part.to_owned()), &mut out).unwrap();
        }
        engine.finish(&mut out);
        assert_eq!(out.concat(), b"k=a%2Bb%26c%3D%2541+%22q%5C&x=1");
    }

    #[test]
    fn a_form_labelled_json_body_gets_the_value_as_it_is() {
        let raw = b"a+b/c=";
        let f = super::super::testutil::with_allowed_value(raw);
        for (body, expected) in [
            (format!("k={}", f.allowed), &b"k=a%2Bb%2Fc%3D"[..]),
            (
                format!(" {{\"k\":\"{}\"}}", f.allowed),
                &b" {\"k\":\"a+b/c=\"}"[..],
            ),
        ] {
            let mut engine =
                BodySubst::new(&f, OnDisallowed::Block).with_encoding(BodyEncoding::Form);
            let mut out = Vec::new();
            engine.push(Bytes::from(body), &mut out).unwrap();
            engine.finish(&mut out);
            assert_eq!(out.concat(), expected);
        }
        // Only the body's first bytes decide: a later chunk opening with `{` changes nothing.
        let mut engine = BodySubst::new(&f, OnDisallowed::Block).with_encoding(BodyEncoding::Form);
        let mut out = Vec::new();
        for part in [
            " \n".to_owned(),
            "x=1&".to_owned(),
            format!("{{k={}", f.allowed),
        ] {
            engine.push(Bytes::from(part), &mut out).unwrap();
        }
        engine.finish(&mut out);
        assert_eq!(out.concat(), b" \nx=1&{k=a%2Bb%2Fc%3D");
    }

    #[test]
    fn the_budget_counts_the_encoded_value() {
        // 1,000 bytes count as one unit; form-encoded, as three.
        let raw = [b'/'; 1000];
        let f = super::super::testutil::with_allowed_value(&raw);
        let input = format!("k={}", f.allowed);
        use crate::subst::BUDGET_UNIT;
        for (max, unsealed) in [(BUDGET_UNIT, false), (3 * BUDGET_UNIT, true)] {
            let mut engine = BodySubst::new(&f, OnDisallowed::Block)
                .with_encoding(BodyEncoding::Form)
                .with_max_unsealed(max);
            let mut out = Vec::new();
            engine.push(Bytes::from(input.clone()), &mut out).unwrap();
            engine.finish(&mut out);
            assert_eq!(engine.report().over_budget, !unsealed, "max {max}");
            assert_eq!(engine.report().unsealed.is_empty(), !unsealed, "max {max}");
            if unsealed {
                assert_eq!(engine.report().unsealed_bytes, 3 * BUDGET_UNIT);
            }
        }
    }
}
