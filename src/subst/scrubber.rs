//! The response scrubber: replaces real values (and their Basic-auth forms) by sealed tokens.
//!
//! # Matching
//!
//! Leftmost-longest, non-overlapping, one pass (aho-corasick `MatchKind::LeftmostLongest`): at
//! the earliest position where any value starts, the longest value starting there wins, and
//! scanning resumes after it. With values `abc` and `abcdef`, `abcdef` becomes the second
//! token, `abcdeX` the first token followed by `deX`. Values are de-duplicated (the first pair
//! wins) and empty values are skipped.
//!
//! # Streaming: what is held back
//!
//! [`ScrubStream`] holds back the last [`Scrubber::window`] bytes of what it has (the longest
//! value's length less one, rounded up to [`WINDOW_UNIT`]) and emits everything before them:
//! any match starting there lies entirely in what we have. No value (nor any of its forms)
//! holds a *cut byte* — CR, LF, NUL or any other C0 control but HTAB, or DEL
//! ([`crate::secret::refused_in_value`]: the API refuses them) — so nothing is held across the
//! last of those (a scrubber built from values that do hold one keeps the whole window).
//! Line-framed text releases at its line ends; binary framing at its control bytes (git's
//! keep-alive packets, `0005\x01`, were held until the pack came, and a client with a
//! low-speed limit gave up: outside pass, 2026-12-07):
//!
//! ```text
//! values: "sk-abc"      pending: "data: {\"k\":\"sk-ab"      everything held (no line end yet)
//!                       pending: "…\"sk-abc\"}\n\ndata: done\n\n"   emit all, hold nothing (SSE flows)
//! ```
//!
//! What is held depends only on the byte count and where lines end, never on the values. It
//! used to start at the first *open* position (where the rest could still grow into a value),
//! which made the emitted chunks' boundaries a prefix oracle: a sandbox that could store
//! content on any scrubbed host and read it back learned, one guessed byte at a time, every
//! value in its snapshot — those never allowed on that host included (an outside review
//! recovered two keys in 1,084 requests). Whole matches are still decided as soon as they lie
//! in what we have; a match needs the whole value, which a guess cannot supply.
//!
//! Short chunks are gathered without a search until they release something: a line end, or
//! twice the window held (then all but the last window goes). So what is held is less than
//! twice the window, and a stream of one-byte chunks costs a search over twice the window once
//! per window of bytes, not one per chunk. Whether a chunk is short (no longer than the
//! window) is itself a comparison with the window only, so the exact longest length stays
//! hidden to the rounding unit. A long chunk is searched in place; only the held bytes and the
//! chunk's first window bytes are copied, to decide the matches that start in the held part.
//!
//! # Header names
//!
//! A header *name* cannot be scrubbed into a token (names are case-folded on the way in, and a
//! name that changes is another field), so a field whose name contains a value is dropped.
//! Names are matched ASCII case-insensitively: hyper lowercases h1 names and h2 names are
//! lowercase on the wire, so `X-SK-ABC: 1` from the upstream reaches us as `x-sk-abc`, and a
//! lowercased value is still the value for most secrets.

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, OnceLock};

use aho_corasick::{packed, AhoCorasick, AhoCorasickKind, Input, Match, MatchKind, Span};
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use base64::Engine as _;
use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue};

use super::headers::MAX_BASIC_CREDENTIALS;
use super::push_piece;
use crate::secret::{refused_in_value, SecretValue};

/// Values totalling more bytes than this get aho-corasick's contiguous NFA instead of a DFA:
/// a DFA takes about a kilobyte per pattern byte (a 64 KiB value: ~67 MiB), the NFA tens of
/// bytes; below this the DFA's speed costs little memory.
const DFA_MAX_PATTERN_BYTES: usize = 4096;

/// The most patterns one packed (Teddy) searcher takes: aho-corasick's own limit (1.1.5,
/// `packed::api::PATTERN_LIMIT`); its heuristic stops at 64. A value with its transformed forms
/// ([`super::forms`]) is up to 7 patterns with its base64 forms alone, and more for a value
/// with URL-reserved characters (an outside review: 14 AWS-style keys made 145 patterns, past
/// one searcher, and the automaton scrubbed at 2.6 ms per MiB against Teddy's 0.45).
const PACKED_PATTERN_LIMIT: usize = 128;

/// The most patterns searched with packed searchers ([`Search::PackedMany`] past
/// [`PACKED_PATTERN_LIMIT`]: one pass over the text per searcher, each far faster than the
/// automaton); past this the automaton. An AWS-style key (`/`, `+`, `=`) is about 24 patterns
/// with its forms: 512 covered 21 such keys (outside re-check); 16 searchers cover about 85,
/// and even then scan faster than the automaton (`benches/records/2026-12-06-session35-ab.md`).
const MAX_PACKED_PATTERNS: usize = 16 * PACKED_PATTERN_LIMIT;

/// The unit a stream's hold-back window is rounded up to ([`Scrubber::window`]).
pub const WINDOW_UNIT: usize = 256;
/// A stream's held buffer grows by at least this much at a time ([`ScrubStream`]).
const HELD_ROOM: usize = 4096;

/// The window of every per-request extras scrubber: that of the longest Basic form ever
/// unsealed (base64 of [`MAX_BASIC_CREDENTIALS`] bytes), whatever this request's is. The user
/// name before the token is the sandbox's to choose, so a window sized to the form would tell
/// the value's exact length where a longer name tips it into the next unit (a review).
const EXTRAS_WINDOW: usize =
    (4 * MAX_BASIC_CREDENTIALS.div_ceil(3) - 1).div_ceil(WINDOW_UNIT) * WINDOW_UNIT;

/// Per-request scrubbers (with Basic-auth forms) kept per scrubber before the cache is cleared.
const MAX_EXTRAS: usize = 32;

/// Per-request extras scrubbers by their `(real, sealed)` pairs (see `Scrubber::extras`).
type ExtrasCache = dashmap::DashMap<Box<[(Bytes, Bytes)]>, Arc<Scrubber>>;

/// Replaces every real value of one sandbox with its sealed token.
///
/// Built once per sandbox snapshot; cheap to clone and share.
#[derive(Clone)]
pub struct Scrubber {
    /// The leftmost-longest searcher over all values.
    search: Search,
    /// The same values, ASCII case-insensitive: does a header name contain one?
    names: Names,
    /// The values, kept to rebuild with per-request extras.
    values: Arc<[SecretValue]>,
    /// `tokens[i]` replaces `values[i]`.
    tokens: Arc<[Bytes]>,
    /// `masks[i]` replaces `values[i]` at its own length (see [`mask`]); built on first use.
    masks: Arc<OnceLock<Box<[Bytes]>>>,
    max_len: usize,
    /// Bytes a stream holds back at most ([`Scrubber::window`]).
    window: usize,
    /// No value holds a cut byte ([`crate::secret::refused_in_value`]), so a stream releases
    /// everything up to the last of them (always so for values the API accepted; the scrubber
    /// itself takes any bytes).
    cuts_release: bool,
    /// Scrubbers of per-request extras, keyed by the `(real, sealed)` pairs themselves: the
    /// real form of one sealed header differs by host (a token unsealed for one host travels
    /// sealed to another), so a key of the sealed forms alone could hand one host's response
    /// the scrubber of another's. The scrubbers hold the real forms anyway.
    extras: Arc<ExtrasCache>,
}

/// Where a scan stops emitting.
#[derive(Clone, Copy)]
enum Stop {
    /// Before the held tail ([`Scrubber::hold_from`]; more input follows).
    Hold,
    /// Nowhere: the input is complete.
    Flush,
    /// At a fixed offset (the end of the held part of a stitched buffer).
    At(usize),
}

/// The result of one scan: `buf[cursor..hold]` is still to be emitted, `buf[hold..]` held.
struct Scanned {
    cursor: usize,
    hold: usize,
    count: usize,
}

impl Scrubber {
    /// A scrubber replacing each value with its token (`(real value, sealed token)` pairs).
    /// Returns `None` when there is nothing to scrub (no pairs, or only empty values), or in
    /// the unreachable case that the automaton does not fit aho-corasick's state-id space.
    ///
    /// # Memory usage
    /// Two automata over the values (the leftmost-longest searcher and, for header names, a
    /// case-insensitive one).
    pub fn new(pairs: Vec<(SecretValue, Bytes)>) -> Option<Arc<Scrubber>> {
        Self::build(pairs, false).map(Arc::new)
    }

    /// A scrubber of per-request pairs only (`(real base64, sealed base64)` Basic-auth forms
    /// from [`super::Report::basic_forms`]), to run *before* this one (the longer, more specific
    /// forms first). `None` when `extra` is empty.
    ///
    /// Only the extras are compiled, never this scrubber's values again: rebuilding every
    /// value per distinct `Authorization` header cost ~50 ms with a 64 KiB secret, which a
    /// sandbox could repeat with a new user name each time.
    ///
    /// Its window is [`EXTRAS_WINDOW`], never sized to these forms.
    ///
    /// # Memory usage
    /// Built once per distinct set of extras and cached (at most [`MAX_EXTRAS`]; then the
    /// cache starts over), so repeated requests do not rebuild the automata. A stream through
    /// it holds back less than twice [`EXTRAS_WINDOW`] (11 KiB).
    pub fn extras(&self, extra: &[(Bytes, Bytes)]) -> Option<Arc<Scrubber>> {
        if extra.is_empty() {
            return None;
        }
        let key: Box<[(Bytes, Bytes)]> = extra.into();
        if let Some(hit) = self.extras.get(&key) {
            return Some(hit.clone());
        }
        // A form inside a longer value is left to this scrubber, which replaces the value
        // whole; run first, the extras would cut the value so that this one missed it.
        let pairs = extra
            .iter()
            .filter(|(real, _)| !self.contains_in_a_value(real))
            .map(|(real, sealed)| (SecretValue::new(real.to_vec()), sealed.clone()))
            .collect();
        let mut built = Self::build(pairs, true)?;
        built.window = built.window.max(EXTRAS_WINDOW);
        let built = Arc::new(built);
        if self.extras.len() >= MAX_EXTRAS {
            self.extras.clear();
        }
        self.extras.insert(key, built.clone());
        Some(built)
    }

    /// True if `form` occurs inside one of this scrubber's values.
    fn contains_in_a_value(&self, form: &[u8]) -> bool {
        self.values
            .iter()
            .any(|v| v.len() > form.len() && memchr::memmem::find(v.expose(), form).is_some())
    }

    /// The length of the longest value (or form of one).
    pub fn max_pattern_len(&self) -> usize {
        self.max_len
    }

    /// Drops every field whose name contains a value (any ASCII case, see the module docs),
    /// then scrubs every header value (including `set-cookie` and `location`); returns how many
    /// values were replaced or fields dropped. Changed values are marked sensitive.
    ///
    /// # Memory usage
    /// Allocates only when something matched.
    pub fn scrub_headers(&self, headers: &mut HeaderMap) -> usize {
        let mut count = self.drop_named(headers);
        for (name, value) in headers.iter_mut() {
            let decoded = match name.as_str() {
                n if n.ends_with("-bin") => self.scrub_binary_field(value.as_bytes()),
                "grpc-message" => self.scrub_grpc_message(value.as_bytes()),
                _ => None,
            };
            if let Some((field, n)) = decoded {
                *value = scrubbed_header(field);
                count += n;
            }
            if let Some((buf, n)) = self.scrub(value.as_bytes()) {
                *value = scrubbed_header(buf);
                count += n;
            }
        }
        count
    }

    /// True if `name` contains a value, in any ASCII case.
    pub fn names_a_value(&self, name: &[u8]) -> bool {
        self.names.is_match(name)
    }

    /// Removes the fields whose name contains a value; returns how many fields went.
    fn drop_named(&self, headers: &mut HeaderMap) -> usize {
        let doomed: Vec<HeaderName> = headers
            .keys()
            .filter(|n| self.names_a_value(n.as_str().as_bytes()))
            .cloned()
            .collect();
        let fields = doomed
            .iter()
            .map(|n| headers.get_all(n).iter().count())
            .sum();
        for n in &doomed {
            headers.remove(n);
        }
        fields
    }

    /// A gRPC binary metadata field (`…-bin`, such as `grpc-status-details-bin`) holds base64
    /// of bytes — usually protobuf, padded or not, several values joined with `,` — which a
    /// server echoing a key into error details fills with the value: each part is decoded,
    /// scrubbed at the same length (protobuf counts its bytes) and re-encoded as it came.
    /// `None` when a part is not base64 or nothing matched.
    fn scrub_binary_field(&self, value: &[u8]) -> Option<(Vec<u8>, usize)> {
        let mut parts = Vec::new();
        for part in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
            let decoded = super::headers::LENIENT.decode(part).ok()?;
            parts.push((part, self.scrub_with(&decoded, true)));
        }
        let count: usize = parts
            .iter()
            .filter_map(|(_, s)| s.as_ref())
            .map(|s| s.1)
            .sum();
        if count == 0 {
            return None;
        }
        let encoded: Vec<String> = parts
            .into_iter()
            .map(|(part, scrubbed)| match scrubbed {
                Some((bytes, _)) if part.ends_with(b"=") => STANDARD.encode(bytes),
                Some((bytes, _)) => STANDARD_NO_PAD.encode(bytes),
                None => String::from_utf8_lossy(part).into_owned(),
            })
            .collect();
        Some((encoded.join(",").into_bytes(), count))
    }

    /// gRPC's status message (`grpc-message`) is percent-encoded (every byte outside visible
    /// ASCII and space, and `%` itself), and clients decode it: a value holding `%` or non-ASCII
    /// bytes travels in a form the plain scan misses. Decoded, scrubbed, encoded again.
    fn scrub_grpc_message(&self, value: &[u8]) -> Option<(Vec<u8>, usize)> {
        if !value.contains(&b'%') {
            return None;
        }
        let decoded: Vec<u8> = percent_encoding::percent_decode(value).collect();
        let (scrubbed, n) = self.scrub(&decoded)?;
        let encoded = percent_encoding::percent_encode(&scrubbed, GRPC_MESSAGE).to_string();
        Some((encoded.into_bytes(), n))
    }

    /// Scrubs a complete buffer: `Some((output, replacements))`, or `None` if nothing matched.
    pub fn scrub(&self, hay: &[u8]) -> Option<(Vec<u8>, usize)> {
        self.scrub_with(hay, false)
    }

    /// [`Scrubber::scrub`], with each value replaced by its token or, with `same_length`, by a
    /// stand-in of the value's length.
    fn scrub_with(&self, hay: &[u8], same_length: bool) -> Option<(Vec<u8>, usize)> {
        let mut out: Option<Vec<u8>> = None;
        let (mut cursor, mut count) = (0, 0);
        for m in self.search.find_iter(hay, 0) {
            let buf = out.get_or_insert_with(|| Vec::with_capacity(hay.len()));
            buf.extend_from_slice(&hay[cursor..m.start()]);
            buf.extend_from_slice(&self.replacement(m.pattern().as_usize(), same_length));
            cursor = m.end();
            count += 1;
        }
        out.map(|mut buf| {
            buf.extend_from_slice(&hay[cursor..]);
            (buf, count)
        })
    }

    /// The scrubber of `pairs`. `per_request` (the extras of one request's Basic headers,
    /// whose user name the sandbox chooses afresh each time) builds no automaton at all where
    /// it can: one form is found with `memmem`, header names with one `memmem` per form, and
    /// only past what Teddy takes does it fall back to aho-corasick's NFA. A DFA over a
    /// 3000-byte user name took ~5 ms to build, the case-insensitive NFA for names ~1 ms
    /// (dev profile), `memmem` ~30 µs — on the worker that serves other sandboxes'
    /// connections too (outside review: 340 such requests a second raised another
    /// sandbox's median latency from 5 to 84 ms).
    fn build(pairs: Vec<(SecretValue, Bytes)>, per_request: bool) -> Option<Scrubber> {
        let (values, tokens): (Vec<_>, Vec<_>) = distinct_values(pairs).into_iter().unzip();
        let max_len = values.iter().map(SecretValue::len).max()?;
        let total: usize = values.iter().map(SecretValue::len).sum();
        let kind = (per_request || total > DFA_MAX_PATTERN_BYTES)
            .then_some(AhoCorasickKind::ContiguousNFA);
        let patterns = || values.iter().map(SecretValue::expose);
        let search = if per_request {
            Search::each(patterns)
        } else {
            Search::new(patterns, kind)?
        };
        let cuts_release = values
            .iter()
            .all(|v| !v.expose().iter().copied().any(refused_in_value));
        let names = Names::new(patterns, kind, per_request)?;
        Some(Scrubber {
            search,
            names,
            values: values.into(),
            tokens: tokens.into(),
            masks: Arc::default(),
            max_len,
            window: (max_len - 1).div_ceil(WINDOW_UNIT) * WINDOW_UNIT,
            cuts_release,
            extras: Arc::default(),
        })
    }

    /// What replaces `values[pattern]`: its token, or with `same_length` its mask.
    fn replacement(&self, pattern: usize, same_length: bool) -> Bytes {
        if !same_length {
            return self.tokens[pattern].clone();
        }
        let masks = self.masks.get_or_init(|| {
            self.values
                .iter()
                .zip(self.tokens.iter())
                .map(|(v, t)| mask(t, v.len()))
                .collect()
        });
        masks[pattern].clone()
    }

    /// Scans `buf[from..]`, pushing final pieces and replacements onto `out`, up to where
    /// `stop` says; the caller emits `buf[cursor..hold]` and keeps the rest.
    fn scan(
        &self,
        buf: &Bytes,
        from: usize,
        stop: Stop,
        same_length: bool,
        out: &mut Vec<Bytes>,
    ) -> Scanned {
        let mut s = Scanned {
            cursor: from,
            hold: self.stop_point(buf, from, stop),
            count: 0,
        };
        if s.hold == from {
            return s; // all held: no match could start before the hold (a small body's case)
        }
        for m in self.search.find_iter(buf, from) {
            if m.start() >= s.hold {
                break;
            }
            push_piece(out, buf.slice(s.cursor..m.start()));
            out.push(self.replacement(m.pattern().as_usize(), same_length));
            s.count += 1;
            s.cursor = m.end();
            if s.cursor > s.hold {
                s.hold = self.stop_point(buf, s.cursor, stop);
            }
        }
        s
    }

    fn stop_point(&self, buf: &[u8], cursor: usize, stop: Stop) -> usize {
        match stop {
            Stop::Hold => self.hold_from(buf, cursor),
            Stop::Flush => buf.len(),
            Stop::At(at) => at.max(cursor),
        }
    }

    /// Where a stream's held tail starts (see the module docs): the last [`Scrubber::window`]
    /// bytes, less what precedes the last cut byte in them; never before `cursor`. A
    /// function of the byte count and the cut bytes only, never of the values.
    fn hold_from(&self, buf: &[u8], cursor: usize) -> usize {
        let start = cursor.max(buf.len().saturating_sub(self.window));
        if !self.cuts_release {
            return start;
        }
        match last_cut(&buf[start..]) {
            Some(i) => start + i + 1,
            None => start,
        }
    }

    /// Bytes a stream holds back at most: the longest value's length less one (so a match
    /// that starts before them lies in what the stream has), rounded up to [`WINDOW_UNIT`] so
    /// that where held tails start tells the longest length only to that unit.
    pub fn window(&self) -> usize {
        self.window
    }
}

impl fmt::Debug for Scrubber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scrubber")
            .field("values", &self.values.len())
            .field("max_pattern_len", &self.max_len)
            .finish_non_exhaustive()
    }
}

/// The leftmost-longest searcher. aho-corasick picks a prefilter from the first and rarest
/// bytes of the values; with two or three values starting with common letters (`sk-…`, `ghp_…`)
/// it picks a start-byte scan that stops at every `s` and `g` (~0.4 GiB/s on English text),
/// whereas its packed (Teddy) searcher matches on several bytes at once (~17 GiB/s). So Teddy
/// is used whenever it is available for two to [`MAX_PACKED_PATTERNS`] patterns; one value is
/// found with `memmem` (what aho-corasick's prefilter would run, without building an automaton).
///
/// Per-request extras (Basic-auth forms) are never searched with Teddy or an automaton: their
/// user names are the sandbox's to choose, and Teddy verifies every pattern sharing a
/// candidate's first bytes at every candidate with a plain comparison. Forms whose user names
/// share a 5,000-byte prefix (base64 `AAAA…` of NUL bytes), against an answer of `A`s, made
/// each answer byte cost every form's whole prefix: a MiB of echo took 17 s of a worker that
/// serves other sandboxes too (outside review). One `memmem` per form is linear in the text
/// whatever the forms, and a request has at most [`super::headers::MAX_BASIC_FORMS`] of them.
#[derive(Clone)]
enum Search {
    /// One pattern: `memmem` (a prefilter as fast as aho-corasick's, built in microseconds).
    One(memchr::memmem::Finder<'static>),
    /// Per-request extras: one `memmem` per pattern (pattern `i` is `finders[i]`), each
    /// scanning the text about once (see [`Search::find_iter`]).
    Each(Box<[memchr::memmem::Finder<'static>]>),
    Packed(packed::Searcher),
    /// More patterns than one packed searcher takes: consecutive slices of them, each with the
    /// index of its first pattern. The leftmost (then longest) of their matches wins.
    PackedMany(Vec<(packed::Searcher, usize)>),
    Automaton(AhoCorasick),
}

/// Whether a header name contains a value, in any ASCII case: an automaton over the values,
/// or (per-request extras: built per distinct Basic header, so it must be cheap to build)
/// one `memmem` per lowercased pattern.
#[derive(Clone)]
enum Names {
    Automaton(AhoCorasick),
    Finders(Box<[memchr::memmem::Finder<'static>]>),
}

impl Names {
    fn new<'a, I>(
        patterns: impl Fn() -> I,
        kind: Option<AhoCorasickKind>,
        per_request: bool,
    ) -> Option<Names>
    where
        I: Iterator<Item = &'a [u8]>,
    {
        if per_request {
            let lower =
                |p: &[u8]| memchr::memmem::Finder::new(&p.to_ascii_lowercase()).into_owned();
            return Some(Names::Finders(patterns().map(lower).collect()));
        }
        let ac = AhoCorasick::builder()
            .ascii_case_insensitive(true)
            .kind(kind)
            .build(patterns());
        ac.ok().map(Names::Automaton)
    }

    fn is_match(&self, name: &[u8]) -> bool {
        match self {
            Names::Automaton(ac) => ac.is_match(name),
            Names::Finders(finders) => {
                let name = name.to_ascii_lowercase();
                finders.iter().any(|f| f.find(&name).is_some())
            }
        }
    }
}

impl Search {
    /// The searcher of per-request extras: [`Search::One`] or [`Search::Each`], never an
    /// automaton nor Teddy (see the type's docs).
    fn each<'a, I>(patterns: impl Fn() -> I) -> Search
    where
        I: Iterator<Item = &'a [u8]>,
    {
        let mut finders: Vec<_> = patterns()
            .map(|p| memchr::memmem::Finder::new(p).into_owned())
            .collect();
        match finders.len() {
            1 => Search::One(finders.remove(0)),
            _ => Search::Each(finders.into()),
        }
    }

    fn new<'a, I>(patterns: impl Fn() -> I, kind: Option<AhoCorasickKind>) -> Option<Search>
    where
        I: Iterator<Item = &'a [u8]>,
    {
        let count = patterns().count();
        if count == 1 {
            let one = patterns().next()?;
            return Some(Search::One(memchr::memmem::Finder::new(one).into_owned()));
        }
        // Past 64 patterns only when none is shorter than 3 bytes: Teddy fingerprints the first
        // bytes, and a 1-byte value among many would make it verify at every byte.
        let relaxed = patterns().all(|p| p.len() >= 3);
        if (2..=PACKED_PATTERN_LIMIT).contains(&count) {
            if let Some(packed) = packed_over(patterns(), !relaxed) {
                return Some(Search::Packed(packed));
            }
        } else if relaxed && count <= MAX_PACKED_PATTERNS {
            let all: Vec<&[u8]> = patterns().collect();
            let many: Option<Vec<_>> = all
                .chunks(PACKED_PATTERN_LIMIT)
                .enumerate()
                .map(|(i, part)| {
                    packed_over(part.iter().copied(), false).map(|s| (s, i * PACKED_PATTERN_LIMIT))
                })
                .collect();
            if let Some(many) = many {
                return Some(Search::PackedMany(many));
            }
        }
        let ac = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .kind(kind)
            .build(patterns());
        ac.ok().map(Search::Automaton)
    }

    /// Leftmost-longest non-overlapping matches in `hay[from..]`.
    fn find_iter<'h>(&'h self, hay: &'h [u8], from: usize) -> impl Iterator<Item = Match> + 'h {
        let mut at = from;
        // PackedMany and Each: each searcher's next match at or after `at`, kept until `at`
        // passes its start (no match of that searcher starts before it), so each searcher
        // scans the text about once.
        let mut ahead: Vec<Option<Option<Match>>> = vec![None; self.searchers()];
        std::iter::from_fn(move || {
            let m = match self {
                Search::PackedMany(_) | Search::Each(_) => self.first_of(hay, at, &mut ahead)?,
                _ => self.find_at(hay, at)?,
            };
            at = m.end();
            Some(m)
        })
    }

    fn find_at(&self, hay: &[u8], at: usize) -> Option<Match> {
        let span = Span::from(at..hay.len());
        match self {
            Search::One(f) => {
                let start = at + f.find(hay.get(at..)?)?;
                Some(Match::must(0, start..start + f.needle().len()))
            }
            Search::Packed(s) => s.find_in(hay, span),
            Search::PackedMany(_) | Search::Each(_) => {
                self.first_of(hay, at, &mut vec![None; self.searchers()])
            }
            Search::Automaton(ac) => ac.find(Input::new(hay).span(span)),
        }
    }

    /// How many searchers [`Search::first_of`] combines (0 for the others).
    fn searchers(&self) -> usize {
        match self {
            Search::PackedMany(all) => all.len(),
            Search::Each(finders) => finders.len(),
            _ => 0,
        }
    }

    /// Searcher `i`'s first match at or after `at`, its pattern id made global.
    fn next_of(&self, i: usize, hay: &[u8], at: usize) -> Option<Match> {
        match self {
            Search::PackedMany(all) => {
                let (searcher, first) = &all[i];
                searcher
                    .find_in(hay, Span::from(at..hay.len()))
                    .map(|m| Match::must(m.pattern().as_usize() + first, m.span()))
            }
            Search::Each(finders) => {
                let f = &finders[i];
                let start = at + f.find(hay.get(at..)?)?;
                Some(Match::must(i, start..start + f.needle().len()))
            }
            _ => None,
        }
    }

    /// The leftmost match at or after `at` of any of the searchers (the longest of those
    /// starting there); `ahead` caches each searcher's next match (see [`Search::find_iter`]).
    fn first_of(
        &self,
        hay: &[u8],
        at: usize,
        ahead: &mut [Option<Option<Match>>],
    ) -> Option<Match> {
        let mut best: Option<Match> = None;
        for (i, next) in ahead.iter_mut().enumerate() {
            let stale = match next {
                None => true,
                Some(Some(m)) => m.start() < at,
                Some(None) => false,
            };
            if stale {
                *next = Some(self.next_of(i, hay, at));
            }
            if let Some(Some(m)) = *next {
                let better = best.is_none_or(|b| {
                    m.start() < b.start() || (m.start() == b.start() && m.end() > b.end())
                });
                if better {
                    best = Some(m);
                }
            }
        }
        best
    }
}

/// A leftmost-longest packed searcher over `patterns` (ids from 0), if Teddy is available here
/// for them.
fn packed_over<'a>(
    patterns: impl Iterator<Item = &'a [u8]>,
    heuristic_limits: bool,
) -> Option<packed::Searcher> {
    packed::Config::new()
        .match_kind(packed::MatchKind::LeftmostLongest)
        .heuristic_pattern_limits(heuristic_limits)
        .builder()
        .extend(patterns)
        .build()
}

/// The same-length stand-in for a value of `len` bytes: its token cut to `len`, or the token
/// followed by `_` up to `len`. Used where a length elsewhere in the body counts the value's
/// bytes (gRPC messages, protobuf fields): the sandbox gets a well-formed body without the
/// value, at the cost of learning the value's length.
fn mask(token: &[u8], len: usize) -> Bytes {
    let mut m = token[..len.min(token.len())].to_vec();
    m.resize(len, b'_');
    Bytes::from(m)
}

/// gRPC's percent-encoding of a status message: bytes outside `0x20..=0x7E`, and `%`
/// (`percent-encoding` always encodes non-ASCII bytes).
const GRPC_MESSAGE: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS.add(b'%');

/// Non-empty values, first occurrence of each.
fn distinct_values(pairs: Vec<(SecretValue, Bytes)>) -> Vec<(SecretValue, Bytes)> {
    let keep: Vec<bool> = {
        let mut seen = HashSet::new();
        pairs
            .iter()
            .map(|(v, _)| !v.is_empty() && seen.insert(v.expose()))
            .collect()
    };
    pairs
        .into_iter()
        .zip(keep)
        .filter_map(|(pair, keep)| keep.then_some(pair))
        .collect()
}

/// The position of the last cut byte in `buf` ([`crate::secret::refused_in_value`]), found
/// a lane at a time from the end: a lane is tested without branching (the compiler
/// vectorises it), and only a lane that holds one is searched byte by byte.
fn last_cut(buf: &[u8]) -> Option<usize> {
    const LANE: usize = 32;
    let mut end = buf.len();
    while end > 0 {
        let start = end.saturating_sub(LANE);
        let lane = &buf[start..end];
        if lane.iter().fold(false, |any, &b| any | refused_in_value(b)) {
            return lane
                .iter()
                .rposition(|&b| refused_in_value(b))
                .map(|i| start + i);
        }
        end = start;
    }
    None
}

/// A scrubbed header value. Tokens and base64 are visible ASCII, so replacing bytes of a valid
/// value keeps it valid; should that ever fail, the value is emptied rather than kept.
fn scrubbed_header(buf: Vec<u8>) -> HeaderValue {
    let mut value =
        HeaderValue::from_maybe_shared(Bytes::from(buf)).unwrap_or(HeaderValue::from_static(""));
    value.set_sensitive(true);
    value
}

/// Streaming scrubber for one response body; output equals [`Scrubber::scrub`] of the whole
/// body for any chunk split.
///
/// # What is held
/// Less than twice [`Scrubber::window`] bytes. A chunk no longer than the window is appended
/// to the held bytes and scanned only when it releases something worth a scan: when it holds
/// a cut byte (everything before the last one goes), or when what is held reaches twice
/// the window (all but the last window goes). A longer chunk is always scanned, and leaves at
/// most the window held. Every one of these choices is a function of byte counts and line
/// ends, never of the values (see the module docs).
///
/// # Cost
/// Amortised over a stream, each byte is searched at most three times and copied at most
/// twice (into the held buffer, and as part of a held tail): a chunk of one byte costs a copy
/// of one byte, and a search over twice the window once per window of such chunks. A chunk
/// longer than the window is searched in place; only the held bytes and the chunk's first
/// window bytes are copied, to decide the matches that start in the held part. Those copies
/// are cut from the held buffer's spare room, so a stream of long chunks allocates once per
/// few chunks, not twice per chunk (criterion `scrub_stream_16k`: 0.96× and 0.98× of the
/// per-chunk allocations, session 28).
pub struct ScrubStream {
    scrubber: Arc<Scrubber>,
    held: BytesMut,
    replacements: usize,
    /// Replace values by their masks, not their tokens ([`ScrubStream::same_length`]).
    same_length: bool,
}

impl ScrubStream {
    /// A fresh stream that replaces each value with its token.
    pub fn new(scrubber: Arc<Scrubber>) -> Self {
        ScrubStream {
            scrubber,
            held: BytesMut::new(),
            replacements: 0,
            same_length: false,
        }
    }

    /// A fresh stream that replaces each value with a stand-in of the value's own length (its
    /// token cut or padded with `_`), so that the body's byte count never changes: for bodies
    /// whose own length fields count the value ([`super::Binary`]).
    pub fn same_length(scrubber: Arc<Scrubber>) -> Self {
        ScrubStream {
            same_length: true,
            ..ScrubStream::new(scrubber)
        }
    }

    /// Scrubs `chunk`, pushing what is final onto `out`.
    pub fn push(&mut self, chunk: Bytes, out: &mut Vec<Bytes>) {
        if chunk.is_empty() {
            return;
        }
        if chunk.len() > self.scrubber.window {
            return self.push_long(chunk, out);
        }
        let due = self.due(&chunk);
        if self.held.is_empty() && due {
            return self.scan_chunk(chunk, 0, Stop::Hold, out);
        }
        self.room(chunk.len());
        self.held.extend_from_slice(&chunk);
        if due {
            let buf = self.held.split().freeze();
            self.scan_chunk(buf, 0, Stop::Hold, out);
        }
    }

    /// Whether a chunk of at most the window releases enough to be worth a scan: it holds a
    /// line end that releases, or the held bytes with it reach twice the window.
    fn due(&self, chunk: &[u8]) -> bool {
        let s = &self.scrubber;
        self.held.len() + chunk.len() >= 2 * s.window
            || (s.cuts_release && last_cut(chunk).is_some())
    }

    /// A chunk longer than the window: everything held is released (the last window of the
    /// stream lies in `chunk`), so the matches that start in the held part are decided on the
    /// held bytes and the chunk's first window bytes (enough: the window is at least the
    /// longest value less one), and the rest is searched in `chunk` itself.
    fn push_long(&mut self, chunk: Bytes, out: &mut Vec<Bytes>) {
        if self.held.is_empty() {
            return self.scan_chunk(chunk, 0, Stop::Hold, out);
        }
        let (held, window) = (self.held.len(), self.scrubber.window);
        self.room(window);
        self.held.extend_from_slice(&chunk[..window]);
        let stitched = self.held.split().freeze();
        let s = self
            .scrubber
            .scan(&stitched, 0, Stop::At(held), self.same_length, out);
        self.replacements += s.count;
        push_piece(out, stitched.slice(s.cursor..s.hold));
        self.scan_chunk(chunk, s.hold - held, Stop::Hold, out);
    }

    /// Emits the held tail, scrubbed (the body ended).
    pub fn finish(&mut self, out: &mut Vec<Bytes>) {
        if !self.held.is_empty() {
            let held = self.held.split().freeze();
            self.scan_chunk(held, 0, Stop::Flush, out);
        }
    }

    /// Goes on with `scrubber` (the sandbox's values changed while the body streamed): what
    /// is held has not been emitted, so it is scanned with the new values too. Bytes already
    /// emitted are not scanned again — none can hold a value the upstream got only after
    /// the change.
    pub fn rescope(&mut self, scrubber: Arc<Scrubber>) {
        self.scrubber = scrubber;
    }

    /// How many values were replaced so far.
    pub fn replacements(&self) -> usize {
        self.replacements
    }

    /// True while a tail is held back (more output is due at [`ScrubStream::finish`]).
    pub fn is_holding(&self) -> bool {
        !self.held.is_empty()
    }

    /// Scans `buf` from `from` (the held buffer is empty: its bytes are in `buf`), emits what
    /// is final and copies the tail to hold into the held buffer, so that a held tail never
    /// keeps a whole chunk's allocation alive.
    fn scan_chunk(&mut self, mut buf: Bytes, from: usize, stop: Stop, out: &mut Vec<Bytes>) {
        debug_assert!(self.held.is_empty());
        let s = self.scrubber.scan(&buf, from, stop, self.same_length, out);
        self.replacements += s.count;
        let tail = &buf[s.hold..];
        self.room(tail.len());
        self.held.extend_from_slice(tail);
        buf.truncate(s.hold);
        buf.advance(s.cursor);
        push_piece(out, buf);
    }

    /// Makes room for `n` more held bytes. Held tails and stitches are cut from the held
    /// buffer's allocation, which is taken [`HELD_ROOM`] at a time (or reused in place once
    /// every chunk cut from it is gone): a stream of long chunks does not allocate per chunk.
    fn room(&mut self, n: usize) {
        if self.held.capacity() - self.held.len() < n {
            self.held.reserve(n.max(HELD_ROOM));
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn scrubber(pairs: &[(&str, &str)]) -> Arc<Scrubber> {
        let pairs = pairs.iter().map(|(v, t)| {
            (
                SecretValue::new(v.as_bytes().to_vec()),
                Bytes::copy_from_slice(t.as_bytes()),
            )
        });
        Scrubber::new(pairs.collect()).expect("patterns")
    }

    /// The naive oracle: at each position the longest value starting there (the first listed
    /// among equals) is replaced, otherwise the byte is copied.
    fn oracle(pairs: &[(Vec<u8>, Vec<u8>)], hay: &[u8]) -> (Vec<u8>, usize) {
        let (mut out, mut count, mut i) = (Vec::new(), 0, 0);
        while i < hay.len() {
            let best = pairs
                .iter()
                .filter(|(v, _)| !v.is_empty() && hay[i..].starts_with(v))
                .fold(None::<&(Vec<u8>, Vec<u8>)>, |best, c| match best {
                    Some(b) if b.0.len() >= c.0.len() => Some(b),
                    _ => Some(c),
                });
            match best {
                Some((v, t)) => {
                    out.extend_from_slice(t);
                    (i, count) = (i + v.len(), count + 1);
                }
                None => {
                    out.push(hay[i]);
                    i += 1;
                }
            }
        }
        (out, count)
    }

    fn stream(s: &Arc<Scrubber>, hay: &[u8], cuts: &[usize]) -> (Vec<u8>, usize) {
        let mut st = ScrubStream::new(s.clone());
        let (mut out, mut last) = (Vec::new(), 0);
        for &cut in cuts.iter().chain(std::iter::once(&hay.len())) {
            let cut = cut.clamp(last, hay.len());
            let before = out.len();
            st.push(Bytes::copy_from_slice(&hay[last..cut]), &mut out);
            assert!(
                out[before..].iter().all(|b| !b.is_empty()),
                "empty piece emitted"
            );
            assert!(st.held.len() < 2 * s.window().max(1));
            last = cut;
        }
        st.finish(&mut out);
        assert!(!st.is_holding());
        (out.concat(), st.replacements())
    }

    fn assert_same(pairs: &[(Vec<u8>, Vec<u8>)], hay: &[u8], cuts: &[usize]) {
        let owned = pairs
            .iter()
            .map(|(v, t)| (SecretValue::new(v.clone()), Bytes::from(t.clone())));
        let Some(s) = Scrubber::new(owned.collect()) else {
            return;
        };
        let expected = oracle(pairs, hay);
        assert_eq!(s.scrub(hay).unwrap_or_else(|| (hay.to_vec(), 0)), expected);
        let got = stream(&s, hay, cuts);
        assert_eq!(
            String::from_utf8_lossy(&got.0),
            String::from_utf8_lossy(&expected.0),
            "cuts {cuts:?}"
        );
        assert_eq!(got.1, expected.1);
    }

    fn assert_all_splits(pairs: &[(&str, &str)], hay: &str) {
        let pairs: Vec<_> = pairs
            .iter()
            .map(|(v, t)| (v.as_bytes().to_vec(), t.as_bytes().to_vec()))
            .collect();
        let hay = hay.as_bytes();
        for a in 0..=hay.len() {
            for b in a..=hay.len() {
                assert_same(&pairs, hay, &[a, b]);
            }
        }
        assert_same(&pairs, hay, &(1..hay.len()).collect::<Vec<_>>());
    }

    /// A body that goes on with another scrubber (the sandbox's values changed) scans what it
    /// held with the new values: a value that began before the change is found whole.
    #[test]
    fn a_rescoped_stream_scans_its_held_tail_with_the_new_values() {
        let old = scrubber(&[("sk-old-value-1", "<1>")]);
        let new = scrubber(&[("sk-old-value-1", "<1>"), ("sk-new-value-2", "<2>")]);
        let mut st = ScrubStream::new(old);
        let mut out = Vec::new();
        st.push(Bytes::from_static(b"data: sk-"), &mut out);
        st.rescope(new);
        st.push(
            Bytes::from_static(b"new-value-2 and sk-old-value-1\n"),
            &mut out,
        );
        st.finish(&mut out);
        assert_eq!(out.concat(), b"data: <2> and <1>\n");
        assert_eq!(st.replacements(), 2);
    }

    #[test]
    fn none_without_patterns() {
        assert!(Scrubber::new(vec![]).is_none());
        assert!(
            Scrubber::new(vec![(SecretValue::new(vec![]), Bytes::from_static(b"T"))]).is_none()
        );
    }

    #[test]
    fn overlapping_values_leftmost_longest() {
        let pairs = [("abc", "<1>"), ("abcdef", "<2>"), ("cde", "<3>")];
        let s = scrubber(&pairs);
        assert_eq!(s.scrub(b"xabcdefx").unwrap().0, b"x<2>x");
        assert_eq!(s.scrub(b"xabcdeX").unwrap().0, b"x<1>deX");
        assert_eq!(s.scrub(b"xbcdeX").unwrap().0, b"xb<3>X");
        for hay in [
            "xabcdefx",
            "xabcdeX",
            "abcabcdefabcde",
            "ababcdabcdef",
            "cdeabc",
        ] {
            assert_all_splits(&pairs, hay);
        }
    }

    #[test]
    fn duplicate_values_first_pair_wins() {
        let s = scrubber(&[("v", "<1>"), ("v", "<2>")]);
        assert_eq!(s.scrub(b"v").unwrap().0, b"<1>");
    }

    #[test]
    fn grpc_binary_metadata_is_decoded_and_scrubbed_at_the_same_length() {
        use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
        use base64::Engine as _;
        let s = scrubber(&[("sk-live-1", "osb_sealed_T")]);
        // A protobuf-ish detail: a length byte, then the value; odd offsets on purpose.
        let detail = b"\x0a\x0dkey sk-live-1!";
        let masked = b"\x0a\x0dkey osb_seale!";
        let mut h = HeaderMap::new();
        let padded = STANDARD.encode(detail);
        let unpadded = STANDARD_NO_PAD.encode(&detail[1..]);
        let list = format!("{}, {}", STANDARD.encode(b"x"), STANDARD.encode(detail));
        h.append("grpc-status-details-bin", padded.parse().unwrap());
        h.append("x-echo-bin", unpadded.parse().unwrap());
        h.append("x-list-bin", list.parse().unwrap());
        h.append(
            "x-junk-bin",
            HeaderValue::from_static("not base64 sk-live-1"),
        );
        assert_eq!(s.scrub_headers(&mut h), 4);
        assert_eq!(
            h["grpc-status-details-bin"],
            STANDARD.encode(masked).as_str()
        );
        assert_eq!(
            h["x-echo-bin"],
            STANDARD_NO_PAD.encode(&masked[1..]).as_str()
        );
        let want = format!("{},{}", STANDARD.encode(b"x"), STANDARD.encode(masked));
        assert_eq!(h["x-list-bin"], want.as_str());
        assert_eq!(h["x-junk-bin"], "not base64 osb_sealed_T");
    }

    #[test]
    fn a_percent_encoded_grpc_message_is_decoded_and_scrubbed() {
        let s = scrubber(&[("pass%word \u{e9}", "osb_sealed_T")]);
        let mut h = HeaderMap::new();
        let wire = "wrong password pass%25word %C3%A9 (100%25 sure)";
        h.append("grpc-message", HeaderValue::from_static(wire));
        h.append("x-other", HeaderValue::from_static("pass%25word %C3%A9"));
        assert_eq!(s.scrub_headers(&mut h), 1);
        assert_eq!(
            h["grpc-message"],
            "wrong password osb_sealed_T (100%25 sure)"
        );
        assert_eq!(
            h["x-other"], "pass%25word %C3%A9",
            "only gRPC's own field is decoded"
        );
    }

    #[test]
    fn headers_are_scrubbed_everywhere() {
        let s = scrubber(&[("sk-live-1", "osb_sealed_T")]);
        let mut h = HeaderMap::new();
        h.append(
            "set-cookie",
            HeaderValue::from_static("k=sk-live-1; Path=/"),
        );
        h.append(
            "location",
            HeaderValue::from_static("https://x.test/?k=sk-live-1&j=sk-live-1"),
        );
        h.append("x-plain", HeaderValue::from_static("nothing"));
        assert_eq!(s.scrub_headers(&mut h), 3);
        assert_eq!(h["set-cookie"], "k=osb_sealed_T; Path=/");
        assert_eq!(
            h["location"],
            "https://x.test/?k=osb_sealed_T&j=osb_sealed_T"
        );
        assert!(h["location"].is_sensitive());
        assert_eq!(h["x-plain"], "nothing");
    }

    #[test]
    fn fields_named_after_a_value_are_dropped_in_any_case() {
        let s = scrubber(&[("sk-Live-1", "T"), ("ghp_AB", "U")]);
        let mut h = HeaderMap::new();
        for (n, v) in [
            ("x-sk-live-1", "a"),
            ("x-sk-live-1", "b"),
            ("ghp_ab", "c"),
            ("x-plain", "sk-Live-1"),
            ("x-near", "sk-live-1"),
        ] {
            h.append(HeaderName::from_static(n), HeaderValue::from_static(v));
        }
        assert_eq!(s.scrub_headers(&mut h), 4, "3 fields dropped, 1 value");
        assert!(!h.contains_key("x-sk-live-1") && !h.contains_key("ghp_ab"));
        assert_eq!(h["x-plain"], "T");
        assert_eq!(h["x-near"], "sk-live-1", "values stay case-sensitive");
        assert!(s.names_a_value(b"SK-LIVE-1"));
        assert!(!s.names_a_value(b"sk-live-"));
    }

    #[test]
    fn extras_scrub_basic_forms_before_the_values() {
        let s = scrubber(&[("sk-live-1", "T1")]);
        let extra = [(
            Bytes::from_static(b"dTpzay1saXZlLTE="),
            Bytes::from_static(b"dTpvc2Jfc2VhbGVk"),
        )];
        let x = s.extras(&extra).expect("a Basic form");
        let once = x.scrub(b"Basic dTpzay1saXZlLTE= sk-live-1").unwrap().0;
        assert_eq!(s.scrub(&once).unwrap().0, b"Basic dTpvc2Jfc2VhbGVk T1");
        assert_eq!(x.max_pattern_len(), 16);
        assert!(
            s.scrub(b"dTpzay1saXZlLTE=").is_none(),
            "the snapshot's scrubber is unchanged"
        );
        assert!(s.extras(&[]).is_none());
    }

    #[test]
    fn a_form_inside_a_value_is_left_to_the_value() {
        let s = scrubber(&[("stored:Basic dTpzay1saXZlLTE=;end", "TV")]);
        let inside = [(
            Bytes::from_static(b"dTpzay1saXZlLTE="),
            Bytes::from_static(b"dTpvc2Jfc2VhbGVk"),
        )];
        let text = b"x stored:Basic dTpzay1saXZlLTE=;end y";
        let once = s.extras(&inside).map_or(text.to_vec(), |x| {
            x.scrub(text).map_or(text.to_vec(), |r| r.0)
        });
        assert_eq!(
            s.scrub(&once).unwrap().0,
            b"x TV y",
            "the value is replaced whole"
        );
    }

    /// A sandbox picks a new Basic user name per request, so each request's extras are built
    /// anew: with no automaton (a DFA over a 3000-byte name took ~5 ms; outside review), yet
    /// scrubbing the form in bodies and header values and dropping a field named by it, in
    /// any case, as the automata did.
    #[test]
    fn extras_for_a_long_user_name_build_no_automaton_and_still_scrub() {
        let s = scrubber(&[("sk-live-1", "T1")]);
        let user = "u".repeat(3000);
        let real = STANDARD.encode(format!("{user}:sk-live-1"));
        let sealed = STANDARD.encode(format!("{user}:T1"));
        let pair = [(Bytes::from(real.clone()), Bytes::from(sealed.clone()))];
        let x = s.extras(&pair).unwrap();
        assert!(matches!(x.search, Search::One(_)), "memmem for one form");
        assert!(matches!(x.names, Names::Finders(_)), "memmem for names");
        let body = format!("echo: Basic {real}!");
        let (out, n) = x.scrub(body.as_bytes()).unwrap();
        assert_eq!((out, n), (format!("echo: Basic {sealed}!").into_bytes(), 1));
        let name = format!("x-{}", real[..200].to_ascii_uppercase());
        assert!(!x.names_a_value(name.as_bytes()), "a part is no match");
        let whole = format!("x-{}-y", real.to_ascii_uppercase());
        assert!(x.names_a_value(whole.as_bytes()), "any case");
        assert!(!x.names_a_value(b"x-other"));
    }

    #[test]
    fn several_extras_are_searched_with_one_memmem_each_like_the_oracle() {
        let s = scrubber(&[("sk-live-1", "T1")]);
        let forms: Vec<(Vec<u8>, Vec<u8>)> = [("abcd", "W"), ("abcdef", "X"), ("cdefgh", "Y")]
            .iter()
            .map(|(r, t)| (r.as_bytes().to_vec(), t.as_bytes().to_vec()))
            .collect();
        let pairs: Vec<_> = forms
            .iter()
            .map(|(r, t)| (Bytes::from(r.clone()), Bytes::from(t.clone())))
            .collect();
        let x = s.extras(&pairs).unwrap();
        assert!(matches!(&x.search, Search::Each(f) if f.len() == 3));
        for hay in [
            &b"abcdefgh abcdgh xcdefghabcd abcdef"[..],
            b"abcabcdefabcdefghcdefgh",
            b"no match here",
        ] {
            assert_eq!(
                x.scrub_with(hay, false)
                    .unwrap_or_else(|| (hay.to_vec(), 0)),
                oracle(&forms, hay)
            );
            for cut in 0..hay.len() {
                assert_eq!(stream(&x, hay, &[cut]), oracle(&forms, hay), "cut at {cut}");
            }
        }
    }

    #[test]
    fn extras_sharing_a_long_chosen_prefix_scrub_in_linear_time() {
        // The sandbox chooses the user names: base64 of 4,000 NUL bytes is 5,333 `A`s, and an
        // answer of `A`s then has a candidate at every byte (Teddy took ~6 s per MiB with four
        // such forms: each candidate compared every form's whole prefix).
        let s = scrubber(&[("sk-live-1", "T1")]);
        let forms: Vec<_> = (0..super::super::MAX_BASIC_FORMS as u8)
            .map(|i| {
                let mut user = vec![0u8; 4000];
                user.push(b'A' + i);
                user.extend_from_slice(b":sk-live-1");
                let sealed = format!("sealed-{i}");
                (Bytes::from(STANDARD.encode(&user)), Bytes::from(sealed))
            })
            .collect();
        let x = s.extras(&forms).unwrap();
        let answer = Bytes::from(vec![b'A'; 1 << 20]);
        let started = std::time::Instant::now();
        let mut stream = ScrubStream::new(x);
        let mut out = Vec::new();
        for chunk in answer.chunks(16 * 1024) {
            stream.push(Bytes::copy_from_slice(chunk), &mut out);
        }
        stream.finish(&mut out);
        let elapsed = started.elapsed();
        assert_eq!(out.iter().map(Bytes::len).sum::<usize>(), 1 << 20);
        assert!(elapsed.as_secs_f64() < 2.0, "{elapsed:?} for a MiB");
    }

    #[test]
    fn extras_are_built_once_per_set() {
        let s = scrubber(&[("sk-live-1", "T1")]);
        let form = |real: &'static [u8], sealed: &'static [u8]| {
            [(Bytes::from_static(real), Bytes::from_static(sealed))]
        };
        let a = s
            .extras(&form(b"dTpzay1saXZlLTE=", b"dTpvc2Jfc2VhbGVk"))
            .unwrap();
        let again = s
            .extras(&form(b"dTpzay1saXZlLTE=", b"dTpvc2Jfc2VhbGVk"))
            .unwrap();
        assert!(
            Arc::ptr_eq(&a, &again),
            "the same header reuses its scrubber"
        );
        let other = s
            .extras(&form(b"djpzay1saXZlLTE=", b"djpvc2Jfc2VhbGVk"))
            .unwrap();
        assert!(!Arc::ptr_eq(&a, &other));
        // The same sealed header unsealed differently (another host): another scrubber.
        let elsewhere = s
            .extras(&form(b"dTpPVEhFUi1WQUxVRQ==", b"dTpvc2Jfc2VhbGVk"))
            .unwrap();
        assert!(!Arc::ptr_eq(&a, &elsewhere));
        assert_eq!(
            elsewhere.scrub(b"dTpPVEhFUi1WQUxVRQ==").unwrap().0,
            b"dTpvc2Jfc2VhbGVk"
        );
        for i in 0..MAX_EXTRAS * 2 {
            let sealed = Bytes::from(format!("sealed-{i}"));
            s.extras(&[(Bytes::from(format!("real-{i}")), sealed)]);
        }
        assert!(s.extras.len() <= MAX_EXTRAS, "bounded");
    }

    /// Values too large for a DFA (64 KiB, as the API allows) use the contiguous NFA and
    /// scrub exactly as the oracle says, whole and streamed at awkward cuts.
    #[test]
    fn values_of_64_kib_scrub_like_the_oracle() {
        let big = |seed: u8| -> Vec<u8> {
            (0..64 * 1024u32)
                .map(|i| b'a' + ((i.wrapping_mul(2_654_435_761) >> 13) as u8 ^ seed) % 26)
                .collect()
        };
        let (v1, v2) = (big(1), big(7));
        let mut hay = b"head ".to_vec();
        hay.extend_from_slice(&v1);
        hay.extend_from_slice(b" mid ");
        hay.extend_from_slice(&v2[..1000]); // a prefix only: not a value
        hay.extend_from_slice(&v2);
        hay.extend_from_slice(b" tail");
        for pairs in [
            vec![(v1.clone(), b"T1".to_vec())],
            vec![(v1.clone(), b"T1".to_vec()), (v2.clone(), b"T2".to_vec())],
        ] {
            let n = hay.len();
            assert_same(&pairs, &hay, &[3, 70_000, n - 2]);
            assert_same(&pairs, &hay, &(1..n).step_by(4093).collect::<Vec<_>>());
        }
        let s = Scrubber::new(vec![(SecretValue::new(v1.clone()), Bytes::from("T1"))]).unwrap();
        let mut h = HeaderMap::new();
        h.insert("x-echo", HeaderValue::from_bytes(&v1).unwrap());
        assert_eq!(s.scrub_headers(&mut h), 1);
        assert_eq!(h["x-echo"], "T1");
    }

    #[test]
    fn sse_events_are_not_held() {
        let s = scrubber(&[("sk-abc", "T")]);
        let mut st = ScrubStream::new(s);
        let mut out = Vec::new();
        st.push(Bytes::from_static(b"data: {\"k\":\"sk-ab"), &mut out);
        assert!(
            out.is_empty(),
            "no line end yet: all within the window is held"
        );
        st.push(Bytes::from_static(b"c\"}\n\ndata: done\n\n"), &mut out);
        assert_eq!(out.concat(), b"data: {\"k\":\"T\"}\n\ndata: done\n\n");
        assert!(!st.is_holding());
    }

    /// Binary framing releases at its control bytes as text does at line ends: git's
    /// keep-alive packets (`0005\x01`, one a second while a pack is prepared) pass one by one,
    /// where they were held until the pack came (outside pass, 2026-12-07). HTAB, which a value
    /// may hold, releases nothing.
    #[test]
    fn control_bytes_release_like_line_ends_and_a_tab_does_not() {
        let s = scrubber(&[("sk-abc", "T")]);
        let mut st = ScrubStream::new(s.clone());
        let mut out = Vec::new();
        for n in 1..=3 {
            st.push(Bytes::from_static(b"0005\x01"), &mut out);
            assert_eq!(out.concat(), b"0005\x01".repeat(n), "keep-alive {n} passed");
            assert!(!st.is_holding());
        }
        for cut in [0x01u8, 0x02, 0x1b, 0x1f, 0x7f] {
            let mut st = ScrubStream::new(s.clone());
            let mut out = Vec::new();
            st.push(Bytes::from(vec![b'x', cut, b'y']), &mut out);
            assert_eq!(
                out.concat(),
                [b'x', cut],
                "{cut:#x} releases what precedes it"
            );
        }
        let mut st = ScrubStream::new(s);
        let mut out = Vec::new();
        st.push(Bytes::from_static(b"a\tb"), &mut out);
        assert!(out.is_empty(), "a tab releases nothing");
    }

    /// The scrubber takes any bytes: with a value that holds a cut byte (a line end, NUL, any
    /// other control but HTAB), it releases nothing, and the value split there is still found
    /// (the fuzzer's find). A value holding HTAB, which the API takes, is found across it too.
    #[test]
    fn a_value_holding_a_line_end_is_found_across_it() {
        for value in [
            "ab\ncd-value",
            "ab\rcd-value",
            "ab\0cd-value",
            "ab\x01cd-value",
            "ab\x7fcd-value",
            "ab\tcd-value",
        ] {
            let s = scrubber(&[(value, "T")]);
            let mut st = ScrubStream::new(s);
            let mut out = Vec::new();
            st.push(Bytes::copy_from_slice(&value.as_bytes()[..3]), &mut out);
            st.push(Bytes::copy_from_slice(&value.as_bytes()[3..]), &mut out);
            st.finish(&mut out);
            assert_eq!(out.concat(), b"T", "{value:?}");
        }
    }

    /// What a stream emits before the end depends on the byte count and the line ends, never
    /// on the values: a prefix of a value is held exactly as long as any other bytes (the
    /// boundaries of emitted chunks were a prefix oracle; outside review, 2026-12-04).
    #[test]
    fn what_is_held_never_depends_on_the_values() {
        let value = "sk-live-prefix-oracle-0123456789";
        let s = scrubber(&[(value, "T")]);
        assert_eq!(s.window(), WINDOW_UNIT);
        let emitted = |tail: &str| {
            let mut st = ScrubStream::new(s.clone());
            let mut out = Vec::new();
            let body = format!("{}{tail}", "x".repeat(1000));
            st.push(Bytes::from(body), &mut out);
            (out.concat().len(), st.held.len())
        };
        let probes = [
            "sk-live-prefix-oracle-01",
            "sk-live-prefix-oracle-0X",
            "zzzzzzzzzzzzzzzzzzzzzzzz",
        ];
        let seen: Vec<_> = probes.iter().map(|p| emitted(p)).collect();
        assert!(seen.iter().all(|e| *e == seen[0]), "{seen:?}");
        assert_eq!(seen[0], (1024 - WINDOW_UNIT, WINDOW_UNIT));
        // A line end cuts the hold short, wherever the values are.
        assert_eq!(emitted("\nsk-live-pre"), (1001, 11));
    }

    /// Emitted byte counts after each push, and the replacements, of `hay` cut at `cuts`.
    fn releases(s: &Arc<Scrubber>, hay: &[u8], cuts: &[usize]) -> (Vec<usize>, usize) {
        let mut st = ScrubStream::new(s.clone());
        let (mut out, mut last, mut seen) = (Vec::new(), 0, Vec::new());
        for &cut in cuts.iter().chain(std::iter::once(&hay.len())) {
            st.push(Bytes::copy_from_slice(&hay[last..cut]), &mut out);
            seen.push(out.iter().map(Bytes::len).sum());
            assert!(
                st.held.len() < 2 * s.window().max(1),
                "held {}",
                st.held.len()
            );
            last = cut;
        }
        (seen, st.replacements())
    }

    /// A chunk between the longest value's length and the window releases exactly what any
    /// other chunk of its size would: whether held bytes go is decided against the window,
    /// never against the exact longest length (which stitching on `max_len` once told).
    #[test]
    fn chunk_sizes_never_tell_the_longest_length() {
        let filler = [b'x'; 10];
        let s30 = scrubber(&[(&"k".repeat(30), "T")]);
        let s200 = scrubber(&[(&"k".repeat(200), "T")]);
        assert_eq!((s30.window(), s200.window()), (WINDOW_UNIT, WINDOW_UNIT));
        for c in [1, 29, 30, 31, 199, 200, 201, 246, 256, 257, 600] {
            let hay: Vec<u8> = filler.iter().copied().chain(vec![b'y'; c]).collect();
            assert_eq!(
                releases(&s30, &hay, &[10]),
                releases(&s200, &hay, &[10]),
                "a next chunk of {c} bytes"
            );
        }
    }

    /// An extras scrubber's window is the same whatever the user name in front of the token:
    /// a name the sandbox grows must not show where the form crosses a unit (a review).
    #[test]
    fn extras_windows_never_tell_the_values_length() {
        let s = scrubber(&[("sk-live-basic-0123456789", "osb_sealed_x")]);
        let windows: Vec<usize> = [1, 150, 170, 180, 400, 3000]
            .iter()
            .map(|n| {
                let user = "u".repeat(*n);
                let real = STANDARD.encode(format!("{user}:sk-live-basic-0123456789"));
                let sealed = STANDARD.encode(format!("{user}:osb_sealed_x"));
                s.extras(&[(Bytes::from(real), Bytes::from(sealed))])
                    .expect("extras")
                    .window()
            })
            .collect();
        assert!(windows.iter().all(|w| *w == EXTRAS_WINDOW), "{windows:?}");
        assert_eq!(EXTRAS_WINDOW, 5632);
    }

    /// One-byte chunks against a 64 KiB value: gathered, searched once per window of them
    /// (each used to copy and search the whole window), and held below twice the window.
    #[test]
    fn one_byte_chunks_are_gathered_not_searched_one_by_one() {
        let value = "v".repeat(64 * 1024);
        let s = scrubber(&[(&value, "T")]);
        let window = s.window();
        assert_eq!(window, 64 * 1024);
        let hay = vec![b'x'; 5 * window];
        let cuts: Vec<usize> = (1..hay.len()).collect();
        let started = std::time::Instant::now();
        let (seen, replaced) = releases(&s, &hay, &cuts);
        assert_eq!(replaced, 0);
        let first = seen.iter().position(|n| *n > 0).expect("released");
        assert_eq!((first + 1, seen[first]), (2 * window, window));
        assert_eq!(
            *seen.last().unwrap(),
            hay.len() - window,
            "the last window waits"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(20));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Streams over long values and line ends (every path of `push`: gathered, stitched,
        /// long) equal the oracle; and what they release before the end is the same for values
        /// of another content with the same window, when no value occurs.
        #[test]
        fn long_values_and_line_ends_stream_like_the_oracle(
            values in prop::collection::vec(
                prop::collection::vec(prop::sample::select(b"abc".to_vec()), 1..300), 1..4),
            (hay, cuts) in prop::collection::vec(prop::sample::select(b"abcx\n".to_vec()), 0..2000)
                .prop_flat_map(|h| { let n = h.len(); (Just(h), cuts(n)) }),
        ) {
            let pairs: Vec<_> = values.iter().enumerate().map(|(i, v)| (v.clone(), format!("<{i}>").into_bytes())).collect();
            assert_same(&pairs, &hay, &cuts);
            let s = Scrubber::new(pairs.iter().map(|(v, t)| (SecretValue::new(v.clone()), Bytes::from(t.clone()))).collect()).unwrap();
            let (seen, replaced) = releases(&s, &hay, &cuts);
            if replaced == 0 {
                let longest = values.iter().map(Vec::len).max().unwrap();
                let other = scrubber(&[(&"z".repeat(longest), "Z")]);
                prop_assert_eq!(other.window(), s.window());
                prop_assert_eq!(releases(&other, &hay, &cuts), (seen, 0));
            }
        }
    }

    #[test]
    fn token_free_chunk_is_passed_through_as_is() {
        let s = scrubber(&[("sk-abc", "T")]);
        let mut st = ScrubStream::new(s);
        let chunk = Bytes::from_static(b"nothing to see here\n");
        let mut out = Vec::new();
        st.push(chunk.clone(), &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].as_ptr(), chunk.as_ptr());
    }

    #[test]
    fn long_value_split_across_many_chunks() {
        let value = "0123456789".repeat(20);
        let hay = format!("a{value}b{}c", &value[..150]);
        let pairs = [(value.as_str(), "<V>")];
        let owned: Vec<_> = pairs
            .iter()
            .map(|(v, t)| (v.as_bytes().to_vec(), t.as_bytes().to_vec()))
            .collect();
        for step in [1, 2, 7, 64, 199, 200, 201] {
            let cuts: Vec<usize> = (step..hay.len()).step_by(step).collect();
            assert_same(&owned, hay.as_bytes(), &cuts);
        }
    }

    fn alphabet_string(max: usize) -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(prop::sample::select(b"abcx".to_vec()), 0..max)
    }

    /// Past one packed searcher's 128 patterns, several: the leftmost-longest match among
    /// them, whichever searcher holds it (matches dense: 4 letters).
    #[test]
    fn more_patterns_than_one_packed_searcher_takes_use_several() {
        let values: Vec<Vec<u8>> = (0..300u32)
            .map(|i| format!("v{i:03}-{}", "abcd".repeat(1 + i as usize % 3)).into_bytes())
            .collect();
        let pairs: Vec<_> = values
            .iter()
            .enumerate()
            .map(|(i, v)| (v.clone(), format!("<{i}>").into_bytes()))
            .collect();
        let s = Scrubber::new(
            pairs
                .iter()
                .map(|(v, t)| (SecretValue::new(v.clone()), Bytes::from(t.clone())))
                .collect(),
        )
        .unwrap();
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("ssse3") {
            assert!(
                matches!(s.search, Search::PackedMany(_)),
                "Teddy, three of them"
            );
        }
        let hay: Vec<u8> = values
            .iter()
            .rev()
            .flat_map(|v| [v.as_slice(), b" x "].concat())
            .collect();
        assert_eq!(s.scrub(&hay).unwrap(), oracle(&pairs, &hay));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Several packed searchers (over 128 patterns) scrub like the oracle, streamed too.
        #[test]
        fn several_packed_searchers_scrub_like_the_oracle(
            values in prop::collection::vec(
                prop::collection::vec(prop::sample::select(b"abcd".to_vec()), 3..9), 129..400),
            (hay, cuts) in prop::collection::vec(prop::sample::select(b"abcdx".to_vec()), 0..3000)
                .prop_flat_map(|h| { let n = h.len(); (Just(h), cuts(n)) }),
        ) {
            let pairs: Vec<_> = values.iter().enumerate().map(|(i, v)| (v.clone(), format!("<{i}>").into_bytes())).collect();
            assert_same(&pairs, &hay, &cuts);
        }
    }

    fn cuts(len: usize) -> impl Strategy<Value = Vec<usize>> {
        let random = prop::collection::vec(0..=len, 0..12).prop_map(|mut c| {
            c.sort_unstable();
            c
        });
        prop_oneof![4 => random, 1 => Just((1..len).collect::<Vec<_>>())]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        #[test]
        fn streaming_equals_oracle(
            values in prop::collection::vec(alphabet_string(7), 1..6),
            (hay, cuts) in alphabet_string(120).prop_flat_map(|h| { let n = h.len(); (Just(h), cuts(n)) }),
        ) {
            let pairs: Vec<_> = values.iter().enumerate().map(|(i, v)| (v.clone(), format!("<{i}>").into_bytes())).collect();
            assert_same(&pairs, &hay, &cuts);
        }
    }
}
