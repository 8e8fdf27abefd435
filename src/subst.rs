//! The hot path: unseals tokens in requests and scrubs real values from responses, with no I/O.
//!
//! # What lives where
//!
//! - [`substitute_headers`] / [`substitute_query`] (in `subst/headers.rs`): whole values, including
//!   `Authorization: Basic` (decoded, substituted, re-encoded).
//! - [`BodySubst`] (in `subst/body.rs`): the streaming request-body engine.
//! - [`Scrubber`] / [`ScrubStream`] (in `subst/scrubber.rs`): the response scrubber.
//! - [`Binary`] (in `subst/binary.rs`): bodies that count their own bytes (gRPC, protobuf),
//!   scrubbed at the same length and never unsealed ([`SealedOnly`]); [`MessageFrames`] (in
//!   `subst/framing.rs`): gRPC messages one by one, compressed ones decoded.
//! - [`SubstBody`] / [`ScrubBody`] (in `subst/adapter.rs`): thin `http_body::Body` adapters, the
//!   only code here that touches a stream.
//!
//! # The rules (DESIGN.md §3 "Where")
//!
//! For each well-formed token (`osb_sealed_` + 32 lowercase hex) found at location `L`:
//!
//! | the token is …                                   | result                                        |
//! |--------------------------------------------------|-----------------------------------------------|
//! | unknown to this sandbox                          | untouched (ordinary bytes)                    |
//! | known, but `L` is not in its secret's locations  | untouched (travels sealed), nothing reported  |
//! | known and allowed for this destination           | replaced by the value, name in `unsealed`     |
//! | known, not allowed, [`OnDisallowed::Block`]      | `Err(Denied)`                                 |
//! | known, not allowed, [`OnDisallowed::ForwardSealed`] | untouched, name in `refused`               |
//!
//! Substitution is a single left-to-right pass over the *input*: a value that itself contains a
//! token is never looked at again. Tokens are recognised wherever they occur (no word boundaries);
//! two occurrences of the prefix can never overlap because `osb_sealed_` has no border and its
//! letters `o`, `s`, `_` are not hex digits.
//!
//! # Content-Length
//!
//! The body engines do not buffer a body to keep an exact `Content-Length`: they stream. The
//! proxy removes `Content-Length` (the body goes out chunked on h1, or without a length on h2)
//! whenever a body engine is in the path. Their `size_hint` is exact only once nothing can
//! change any more.
//!
//! # Memory usage
//!
//! Besides the chunk being processed, [`BodySubst`] holds back at most `TOKEN_LEN - 1` (42) bytes,
//! and only when the tail of what it has seen could still start a token; [`ScrubStream`] holds
//! back less than twice [`Scrubber::window`] bytes, whatever they are (where real values could
//! start must not show in what is held). Nothing else is ever buffered.

mod adapter;
mod binary;
mod body;
mod forms;
mod framing;
mod headers;
mod scrubber;
#[cfg(test)]
pub(crate) mod testutil;

use std::fmt;
use std::sync::{Arc, LazyLock};

use bytes::{Buf, Bytes};
use memchr::memmem::Finder;

use crate::secret::{Location, Locations, SecretValue};
use crate::token::{Token, PREFIX, TOKEN_LEN};

pub use adapter::{BodyError, Guard, Rescope, Rescoped, ScrubBody, SubstBody, SubstOutcome, Tally};
pub use binary::Binary;
pub use body::{BodyEncoding, BodySubst};
pub use forms::echo_forms;
pub use framing::{FrameError, MessageCoding, MessageFrames, Piece};
pub use headers::{substitute_headers, substitute_query, MAX_BASIC_CREDENTIALS, MAX_BASIC_FORMS};
pub use scrubber::{ScrubStream, Scrubber};

/// What the registry knows about one token, for the destination of the current request.
/// (`Debug` is safe: the value prints as `[redacted]`.)
#[derive(Clone, Debug)]
pub struct SecretRef {
    /// The secret's name (safe to log).
    pub name: Arc<str>,
    /// The real value.
    pub value: SecretValue,
    /// Where the token may be unsealed.
    pub locations: Locations,
    /// Whether the value may be sent to this request's destination.
    pub allowed: bool,
}

/// Token → secret lookup for one request (implemented by the proxy over the sandbox snapshot).
pub trait TokenLookup: Send + Sync {
    /// The secret behind `token`, or `None` for an unknown token (ordinary bytes).
    fn get(&self, token: &Token) -> Option<&SecretRef>;
}

/// A lookup that knows only the tokens whose secrets may *not* go to this destination: in a
/// body that counts its own bytes ([`Binary`]) a value cannot take its token's place, so there
/// the tokens of allowed secrets travel sealed (ordinary bytes), while a token of a secret
/// that may not go here is still refused or noted, as anywhere else.
pub struct SealedOnly<L>(pub L);

impl<L> TokenLookup for SealedOnly<L>
where
    L: std::ops::Deref + Send + Sync,
    L::Target: TokenLookup,
{
    fn get(&self, token: &Token) -> Option<&SecretRef> {
        self.0.get(token).filter(|s| !s.allowed)
    }
}

/// What to do with a known token whose secret may not go to this destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnDisallowed {
    /// Refuse the request (403 `secret_host_denied`).
    Block,
    /// Forward the token still sealed and note it in [`Report::refused`].
    ForwardSealed,
}

/// A token whose secret may not be sent to this destination was found (only under
/// [`OnDisallowed::Block`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("secret {secret} may not be sent to this host")]
pub struct Denied {
    /// The secret's name.
    pub secret: Arc<str>,
    /// Where its token was found.
    pub location: Location,
}

/// What happened during one request: secret names only, each listed once, in order of first
/// occurrence.
#[derive(Default, Clone)]
pub struct Report {
    /// Secrets whose tokens were replaced by their values.
    pub unsealed: Vec<Arc<str>>,
    /// Secrets refused for the destination: forwarded sealed (`forward_sealed`), or the secret
    /// that got the request blocked (`block`; the audit line's `decision` tells which).
    pub refused: Vec<Arc<str>>,
    /// `(base64 of the real credentials, base64 of the sealed credentials)` for every
    /// `Authorization: Basic` header that was unsealed; the scrubber needs them. The first
    /// element is a real secret: [`Report`]'s `Debug` only prints how many there are.
    pub basic_forms: Vec<(Bytes, Bytes)>,
    /// Bytes of real values put into the request so far, each value rounded up to whole
    /// [`BUDGET_UNIT`]s ([`counted`]).
    pub unsealed_bytes: usize,
    /// At most this many bytes of real values may be put in (None: no limit). A token that
    /// would pass it stays sealed and `over_budget` is set: a request full of tokens of a large
    /// secret would otherwise grow a thousandfold (a 64 KiB value per 43-byte token).
    pub max_unsealed: Option<usize>,
    /// A token was left sealed because of `max_unsealed`: the request must be refused.
    pub over_budget: bool,
}

impl Report {
    /// True when nothing was unsealed or refused.
    pub fn is_empty(&self) -> bool {
        self.unsealed.is_empty() && self.refused.is_empty() && self.basic_forms.is_empty()
    }

    /// Adds everything `other` saw (e.g. the body's report to the headers' one).
    pub fn merge(&mut self, other: &Report) {
        other
            .unsealed
            .iter()
            .for_each(|n| push_unique(&mut self.unsealed, n));
        other
            .refused
            .iter()
            .for_each(|n| push_unique(&mut self.refused, n));
        for (real, sealed) in &other.basic_forms {
            self.note_basic_form(real.clone(), sealed.clone());
        }
        self.unsealed_bytes += other.unsealed_bytes;
        self.over_budget |= other.over_budget;
    }

    /// Whether `real` is already noted or one more form fits [`headers::MAX_BASIC_FORMS`].
    fn may_note_basic_form(&self, real: &[u8]) -> bool {
        self.basic_forms.len() < headers::MAX_BASIC_FORMS
            || self.basic_forms.iter().any(|(r, _)| r == real)
    }

    fn note_basic_form(&mut self, real: Bytes, sealed: Bytes) {
        if !self.basic_forms.iter().any(|(r, _)| *r == real) {
            self.basic_forms.push((real, sealed));
        }
    }

    /// A point [`Report::rollback_unsealed`] can return to when a substituted value turns out
    /// to be unusable (and therefore travels sealed after all).
    fn unsealed_mark(&self) -> (usize, usize) {
        (self.unsealed.len(), self.unsealed_bytes)
    }

    /// Back to `mark`: the names and the bytes counted against the budget since.
    fn rollback_unsealed(&mut self, mark: (usize, usize)) {
        self.unsealed.truncate(mark.0);
        self.unsealed_bytes = mark.1;
    }
}

impl fmt::Debug for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Report")
            .field("unsealed", &self.unsealed)
            .field("refused", &self.refused)
            .field(
                "basic_forms",
                &format_args!("[{} redacted]", self.basic_forms.len()),
            )
            .finish()
    }
}

fn push_unique(names: &mut Vec<Arc<str>>, name: &Arc<str>) {
    if !names.iter().any(|n| n == name) {
        names.push(name.clone());
    }
}

/// The prefix searcher, built once for the process.
static FINDER: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(PREFIX));

/// True if `bytes` contains `osb_sealed_` (a token may be present; cheap pre-check).
pub fn contains_token_prefix(bytes: &[u8]) -> bool {
    FINDER.find(bytes).is_some()
}

/// Applies the rules of the module docs to one token found at `loc`: `Some(value)` means
/// "replace the token by `value`". Updates `report`.
///
/// # Errors
/// [`Denied`] for a known, not allowed token under [`OnDisallowed::Block`].
/// The unit real values are counted in against [`Report::max_unsealed`]: each value counts as
/// its length rounded up to whole units, so where a request's 413 starts says at most how many
/// units a value spans, not its length (an outside review read a key's exact length off the
/// token count at which the 413 began).
pub const BUDGET_UNIT: usize = 1024;

/// `len` bytes of real value as counted against the budget ([`BUDGET_UNIT`]).
pub fn counted(len: usize) -> usize {
    len.div_ceil(BUDGET_UNIT).saturating_mul(BUDGET_UNIT)
}

fn decide<'a, L: TokenLookup + ?Sized>(
    lookup: &'a L,
    token: &Token,
    loc: Location,
    mode: OnDisallowed,
    report: &mut Report,
) -> Result<Option<&'a SecretValue>, Denied> {
    let Some(secret) = lookup.get(token) else {
        return Ok(None);
    };
    if !secret.locations.contains(loc) {
        return Ok(None);
    }
    if secret.allowed {
        let grown = report.unsealed_bytes + counted(secret.value.len());
        if report.max_unsealed.is_some_and(|max| grown > max) {
            report.over_budget = true;
            return Ok(None);
        }
        report.unsealed_bytes = grown;
        push_unique(&mut report.unsealed, &secret.name);
        return Ok(Some(&secret.value));
    }
    match mode {
        OnDisallowed::Block => Err(Denied {
            secret: secret.name.clone(),
            location: loc,
        }),
        OnDisallowed::ForwardSealed => {
            push_unique(&mut report.refused, &secret.name);
            Ok(None)
        }
    }
}

/// Whole-buffer substitution for headers and the query: returns the new bytes, or `None` when
/// nothing was replaced (the caller keeps its original, no copy made). `encode` writes a value
/// in the form the location needs (verbatim, percent-encoded).
///
/// # Errors
/// [`Denied`], as [`decide`].
fn substitute_slice<L: TokenLookup + ?Sized>(
    input: &[u8],
    loc: Location,
    lookup: &L,
    mode: OnDisallowed,
    report: &mut Report,
    encode: impl Fn(&[u8], &mut Vec<u8>),
) -> Result<Option<Vec<u8>>, Denied> {
    let mut out: Option<Vec<u8>> = None;
    let mut cursor = 0;
    for at in FINDER.find_iter(input) {
        let Some(token) = token_at(input, at) else {
            continue;
        };
        let Some(value) = decide(lookup, &token, loc, mode, report)? else {
            continue;
        };
        // Exact for the usual single token, so `Bytes::from(buf)` needs no second allocation.
        let exact = input.len() - TOKEN_LEN + value.len();
        let buf = out.get_or_insert_with(|| Vec::with_capacity(exact));
        buf.extend_from_slice(&input[cursor..at]);
        encode(value.expose(), buf);
        cursor = at + TOKEN_LEN;
    }
    Ok(out.map(|mut buf| {
        buf.extend_from_slice(&input[cursor..]);
        buf
    }))
}

/// The token starting at `at` (where the prefix was found), if the 32 bytes after the prefix
/// are lowercase hex.
fn token_at(hay: &[u8], at: usize) -> Option<Token> {
    hay.get(at..at + TOKEN_LEN).and_then(Token::parse)
}

/// A real value as [`Bytes`] without copying it: the bytes stay inside the zeroizing
/// [`SecretValue`] and are wiped when the last piece of output referring to them is dropped.
fn value_bytes(value: &SecretValue) -> Bytes {
    Bytes::from_owner(Exposed(value.clone()))
}

/// Pushes `piece` unless it is empty (consumers never see empty data frames).
fn push_piece(out: &mut Vec<Bytes>, piece: Bytes) {
    if !piece.is_empty() {
        out.push(piece);
    }
}

/// Pushes `buf[cursor..hold]` onto `out` and returns `buf[hold..]` (the tail to hold back),
/// without copying and, when nothing is held, without touching the reference count.
fn split_emit(mut buf: Bytes, cursor: usize, hold: usize, out: &mut Vec<Bytes>) -> Bytes {
    let held = if hold < buf.len() {
        buf.split_off(hold)
    } else {
        Bytes::new()
    };
    buf.advance(cursor);
    push_piece(out, buf);
    held
}

/// Lends a [`SecretValue`]'s bytes to [`Bytes::from_owner`]; never formatted.
struct Exposed(SecretValue);

impl AsRef<[u8]> for Exposed {
    fn as_ref(&self) -> &[u8] {
        self.0.expose()
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::{fixture, tok};
    use super::*;

    #[test]
    fn prefix_check() {
        assert!(contains_token_prefix(b"x osb_sealed_"));
        assert!(!contains_token_prefix(b"osb_seale"));
    }

    #[test]
    fn report_debug_hides_basic_forms() {
        let mut r = Report::default();
        r.note_basic_form(
            Bytes::from_static(b"cmVhbA=="),
            Bytes::from_static(b"c2VhbGVk"),
        );
        let s = format!("{r:?}");
        assert!(!s.contains("cmVhbA"), "{s}");
        assert!(s.contains("1 redacted"), "{s}");
    }

    #[test]
    fn a_token_past_the_budget_stays_sealed_and_is_reported() {
        let f = fixture();
        let value_len = counted(f.get(&f.allowed).unwrap().value.len());
        let mut r = Report {
            max_unsealed: Some(2 * value_len),
            ..Report::default()
        };
        let hdr = Location::Header;
        let block = OnDisallowed::Block;
        for _ in 0..2 {
            assert!(decide(&*f, &f.allowed, hdr, block, &mut r)
                .unwrap()
                .is_some());
        }
        assert!(!r.over_budget);
        assert!(decide(&*f, &f.allowed, hdr, block, &mut r)
            .unwrap()
            .is_none());
        assert!(r.over_budget);
        assert_eq!(r.unsealed_bytes, 2 * value_len);
        let mut merged = Report::default();
        merged.merge(&r);
        assert!(merged.over_budget && merged.unsealed_bytes == 2 * value_len);
    }

    #[test]
    fn values_count_in_whole_units() {
        assert_eq!(counted(0), 0);
        assert_eq!(counted(1), BUDGET_UNIT);
        assert_eq!(counted(40), counted(BUDGET_UNIT));
        assert_eq!(counted(BUDGET_UNIT + 1), 2 * BUDGET_UNIT);
        assert_eq!(
            counted(usize::MAX),
            usize::MAX,
            "never less than the length"
        );
    }

    #[test]
    fn decide_follows_the_table() {
        let f = fixture();
        let mut r = Report::default();
        let hdr = Location::Header;
        let block = OnDisallowed::Block;
        assert!(decide(&*f, &tok(0xee), hdr, block, &mut r)
            .unwrap()
            .is_none());
        assert!(decide(&*f, &f.allowed, hdr, block, &mut r)
            .unwrap()
            .is_some());
        assert!(decide(&*f, &f.body_only, hdr, block, &mut r)
            .unwrap()
            .is_none());
        let denied = decide(&*f, &f.denied, hdr, block, &mut r).unwrap_err();
        assert_eq!(&*denied.secret, "DENIED");
        let fwd = OnDisallowed::ForwardSealed;
        assert!(decide(&*f, &f.denied, hdr, fwd, &mut r).unwrap().is_none());
        assert_eq!(r.unsealed, vec![Arc::from("ALLOWED")]);
        assert_eq!(r.refused, vec![Arc::from("DENIED")]);
    }
}
