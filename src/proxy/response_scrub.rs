//! Response scrubbing: real values (and the Basic-auth forms this request produced) are
//! replaced with sealed tokens before the sandbox sees them, in every channel an upstream
//! controls on the way back.
//!
//! | channel | treatment |
//! |---|---|
//! | h1 reason phrase (hyper's `ReasonPhrase`) | scrubbed; dropped if it could not stay a valid phrase |
//! | header names | a field whose name contains a value (any ASCII case) is dropped |
//! | header values | scrubbed |
//! | body | every coding removed ([`codings`], [`decode`]), then scrubbed while streaming |
//! | body that carries lengths (gRPC, protobuf: [`Binary`]) | compressed gRPC messages decoded, then scrubbed at the same length; base64 gRPC-Web → 502 |
//! | trailers | kept through decoding; names and values as for headers |
//!
//! A response that has no body (to `HEAD`, 1xx, 204, 304) keeps `Content-Encoding` and
//! `Content-Length` as sent (scrubbed like every value) — except the length of a compressed
//! body ([`drop_compressed_length`]) — no decoder is built, and whatever body or trailers the
//! upstream sent anyway are dropped (an h2 server would pass them on). Any
//! other response loses `Content-Length` (replacements change it; a small one of known length
//! is read whole and gets its exact new length back, `is_whole`) and `Content-Encoding`
//! (the body is decoded); a coding sealgate cannot decode or too many stacked codings is refused
//! with 502 rather than passed unscrubbed, and so is every 206: requests here carry no `Range`,
//! because parts of a resource could carry a value in pieces. Refusal messages never repeat
//! what the upstream wrote.
//!
//! In a body whose format counts its own bytes ([`Binary`]: gRPC messages, protobuf, msgpack,
//! CBOR) a 43-byte token in place of a value would break every length around it, so such a
//! body gets same-length stand-ins ([`crate::subst::ScrubStream::same_length`]). Requests here
//! ask for uncompressed gRPC messages (`forward::head::whole_responses_only`); a message that comes
//! compressed anyway (a server may insist) is decoded whole and passed on uncompressed
//! ([`MessageFrames`], up to `upstream.max_grpc_message_bytes`), or, in a coding sealgate
//! cannot decode, ends the body before any byte of it is passed on. A gRPC-Web-text (base64)
//! answer is refused with 502.

mod codings;
pub use codings::is_coded;
mod decode;
mod scope;
mod tally;

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Extensions, Method, StatusCode};
use http_body_util::BodyExt;
use hyper::ext::ReasonPhrase;

pub use codings::{Coding, CodingError, Codings};
pub use scope::{unknowable, AnswerCut, Following, Place, Scope, ScopeGained};
pub use tally::AnswerTally;

use super::held::Held;
use super::refusal::{Code, Refusal};
use super::upstream::UpstreamSettings;
use super::{BoxError, ProxyBody, Tunnel};
use crate::config::UpstreamConfig;
use crate::sandbox::BudgetSlot;
use crate::subst::{Binary, BodyError, MessageCoding, MessageFrames, Report, ScrubBody, Scrubber};

/// What the response looks like before hop-by-hop headers are stripped.
pub struct Shape {
    /// False for answers that have no body (to `HEAD`, 1xx, 204, 304).
    pub has_body: bool,
    /// The codings on the body (only read when it has one).
    pub codings: Result<Codings, CodingError>,
    /// How the body carries its own lengths, if it does (only read when it has one).
    pub binary: Option<Binary>,
    /// For a [`Binary::Framed`] body: its messages, compressed ones to be decoded.
    frames: Option<MessageFrames>,
}

impl Shape {
    /// Reads the shape of a response to `method` with `status` and headers `h` (which must
    /// still hold `Transfer-Encoding`), within `limits` (`max_response_codings` stacked
    /// codings, compressed gRPC messages up to `max_grpc_message_bytes`, decoded ones counted
    /// in `grpc_held`, the sandbox's).
    ///
    /// An answer is read as gRPC/Connect messages only when the request was such messages
    /// too (`messages_asked`: a `POST` with a message type); otherwise one that says it is
    /// messages is scrubbed as one stream at the same length ([`Binary::Lengths`]). The
    /// scrubber finishes at every message end, so a value that a message ends inside goes out
    /// in two unrecognised parts, the second read as the next message's header: an honest
    /// object store serving a blob the sandbox stored (its token unsealed into it) under a
    /// gRPC type set in the object's metadata returned the value whole to a `GET` (outside
    /// review). No gRPC or Connect server answers messages to a request that was not messages.
    pub fn of(
        method: &Method,
        messages_asked: bool,
        status: StatusCode,
        h: &HeaderMap,
        limits: &UpstreamConfig,
        grpc_held: &Arc<AtomicUsize>,
    ) -> Shape {
        let has_body = method != Method::HEAD
            && !status.is_informational()
            && status != StatusCode::NO_CONTENT
            && status != StatusCode::NOT_MODIFIED;
        if !has_body {
            return Shape {
                has_body,
                codings: Ok(Codings::default()),
                binary: None,
                frames: None,
            };
        }
        let binary = match Binary::of(h) {
            Some(Binary::Framed) if !messages_asked => Some(Binary::Lengths),
            other => other,
        };
        let frames = (binary == Some(Binary::Framed)).then(|| {
            let max = limits.max_grpc_message_bytes;
            MessageFrames::for_sandbox(MessageCoding::of(h), max, grpc_held.clone())
        });
        Shape {
            has_body,
            codings: Codings::of(h, limits.max_response_codings),
            binary,
            frames,
        }
    }
}

/// What an answer is scrubbed with: the host's `scrubber`, followed through `scope` while the
/// body streams, and the Basic-auth forms of the request's `report`.
pub struct Scrubbing<'a> {
    /// The host's scrubber when the answer began.
    pub scrubber: Arc<Scrubber>,
    /// Where later values come from ([`Scope::rescope`]).
    pub scope: Scope,
    /// The request's report (its Basic-auth forms).
    pub report: &'a Report,
}

/// Scrubs the reason phrase and headers now and wraps the body (see the module docs).
///
/// Also says whether the answer is to be read whole (`is_whole`).
///
/// # Errors
/// A body sealgate cannot decode: the response is refused rather than passed unscrubbed.
pub fn scrub_response(
    t: &Tunnel,
    up: &UpstreamSettings,
    with: Scrubbing<'_>,
    parts: &mut http::response::Parts,
    shape: Shape,
    body: ProxyBody,
) -> Result<(ProxyBody, bool), Refusal> {
    let Scrubbing {
        scrubber,
        scope,
        report,
    } = with;
    let codings = shape.codings.map_err(|e| undecodable(t, e))?;
    if parts.status == StatusCode::PARTIAL_CONTENT {
        // sealgate sent no `Range` here (`forward::head::whole_responses_only`): a part of a
        // resource could hold part of a value, which no scrubber can recognise.
        return Err(Refusal::new(
            Code::UpstreamUnreachable,
            format!(
                "{} answered a partial (206) response, which cannot be scrubbed",
                t.dest
            ),
        ));
    }
    // This request's Basic-auth forms first (longer, more specific), then every value.
    let extras = scrubber.extras(&report.basic_forms);
    let mut in_head = 0;
    for s in extras.iter().chain(std::iter::once(&scrubber)) {
        in_head += scrub_reason(s, &mut parts.extensions);
        in_head += s.scrub_headers(&mut parts.headers);
    }
    no_ranges(&mut parts.headers);
    if !shape.has_body {
        if in_head > 0 {
            drop(AnswerTally::of(t, in_head)); // reported as it drops
        }
        // hyper's h1 server drops such a body, its h2 server would forward DATA and trailers:
        // nothing of it reaches the sandbox, scrubbed or not. A `HEAD` says what the `GET`
        // would: a coded answer's checksums go, as they do from the decoded `GET` (review).
        drop_compressed_length(&mut parts.headers);
        if codings::is_coded(&parts.headers) {
            describe_decoded(&mut parts.headers);
            parts.headers.remove(header::CONTENT_ENCODING);
        }
        drop(body);
        return Ok((super::empty_body(), false));
    }
    if shape.binary == Some(Binary::Base64Framed) {
        return Err(Refusal::new(
            Code::UpstreamUnreachable,
            format!(
                "{} answered base64-encoded gRPC-Web messages, which cannot be scrubbed",
                t.dest
            ),
        ));
    }
    let whole = is_whole(&body, &codings, shape.binary);
    if parts.headers.remove(header::CONTENT_ENCODING).is_some() && !codings.is_empty() {
        describe_decoded(&mut parts.headers);
    }
    parts.headers.remove(header::CONTENT_LENGTH);
    let body = if codings.is_empty() {
        body
    } else {
        let windows = window_slots(t, up, &codings)?;
        Held::new(decode::Decoded::new(codings, body), windows).boxed_unsync()
    };
    let (binary, mut frames) = (shape.binary.is_some(), shape.frames);
    let tally = AnswerTally::of(t, in_head);
    // The first scrubber over the body decodes compressed messages; the second sees them plain.
    let body = match extras {
        Some(x) => scrub_body(t, body, (x, &tally), binary, frames.take(), None),
        None => body,
    };
    let body = scrub_body(t, body, (scrubber, &tally), binary, frames, Some(scope));
    Ok((body, whole))
}

/// A scrubbed host's answer says it takes no ranges: sealgate sends such hosts no `Range`
/// (`forward::head::whole_responses_only`), and `Accept-Ranges: bytes` passed on made range clients
/// (resumable downloads, `read_parquet` over HTTP) choose ranged access and then fail on the
/// whole 200 (outside pass: `curl -C -` exit 33) instead of reading the whole answer up front.
fn no_ranges(h: &mut HeaderMap) {
    if h.contains_key(header::ACCEPT_RANGES) {
        h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("none"));
    }
}

/// Fields that describe the bytes of the coded representation: a checksum of them, or of the
/// representation as sent.
const CODED_BYTES_FIELDS: [HeaderName; 15] = [
    HeaderName::from_static("content-md5"),
    HeaderName::from_static("digest"),
    HeaderName::from_static("repr-digest"),
    HeaderName::from_static("content-digest"),
    HeaderName::from_static("x-goog-hash"),
    HeaderName::from_static("x-amz-checksum-crc32"),
    HeaderName::from_static("x-amz-checksum-crc32c"),
    HeaderName::from_static("x-amz-checksum-crc64nvme"),
    HeaderName::from_static("x-amz-checksum-sha1"),
    HeaderName::from_static("x-amz-checksum-sha256"),
    HeaderName::from_static("x-ms-content-crc64"),
    HeaderName::from_static("x-ms-blob-content-md5"),
    HeaderName::from_static("x-oss-hash-crc64ecma"),
    HeaderName::from_static("x-cos-hash-crc64ecma"),
    HeaderName::from_static("x-bz-content-sha1"),
];

/// An answer sent decoded is another representation: the checksums of the coded bytes go
/// (storage clients verified them against the decoded body and failed: GCS `x-goog-hash`,
/// `Content-MD5`; outside pass). The `ETag` stays as the origin sent it: it names the stored
/// object in the origin's conditional requests (`If-Match` on a write compares it strongly,
/// and a weakened copy made every such write a 412: review), and no range is asked of a
/// scrubbed host for it to mislead.
fn describe_decoded(h: &mut HeaderMap) {
    for name in &CODED_BYTES_FIELDS {
        h.remove(name);
    }
}

/// Drops the `Content-Length` of a bodiless answer (`HEAD`, 304) whose body would have come
/// compressed. That length measured the body before scrubbing and after compression: of an
/// echo holding the value beside text the sandbox chose, it is a compression oracle (a guess
/// that repeats more of the value compresses better), which recovers a value piece by piece —
/// where every other guess at a value must be whole (ARCHITECTURE "Scrubbing is itself an
/// oracle"). An uncompressed length keeps: it can tell no more than the value's length.
/// Neither hyper server puts a zero in its place.
fn drop_compressed_length(h: &mut HeaderMap) {
    if h.contains_key(header::CONTENT_ENCODING) {
        h.remove(header::CONTENT_LENGTH);
    }
}

/// The most an answer may be framed to carry to be read whole ([`is_whole`]).
pub const WHOLE_ANSWER_MAX: u64 = 64 * 1024;

/// Whether an answer is read whole before its head is sent, then sent with its exact
/// `Content-Length` (`forward::answer::read_whole`): one whose `body` is framed by its length (hyper's own framing,
/// not the header: an upstream that sent `Transfer-Encoding: chunked` beside a small
/// `Content-Length` is read chunked, without end — an outside check held 791 MB that way),
/// of at most [`WHOLE_ANSWER_MAX`], in no coding, and not carrying its own lengths.
/// Scrubbing changes lengths, so a streamed answer loses `Content-Length`; clients that
/// wanted it, or that answered an upload's early answer only once its length was known (curl
/// 7.88 over h2 waited out its 90 s timeout), get it back for the small answers APIs mostly
/// send.
fn is_whole(body: &ProxyBody, codings: &Codings, binary: Option<Binary>) -> bool {
    use http_body::Body as _;
    codings.is_empty()
        && binary.is_none()
        && body
            .size_hint()
            .exact()
            .is_some_and(|n| n <= WHOLE_ANSWER_MAX)
}

/// `body` scrubbed by `scrubber`, or by the scrubber `scope` gives it later, counting what it
/// replaced into `tally`: at the same length when its format carries lengths, after `frames`
/// decoded its compressed messages. A message `frames` cannot pass resets the stream; the
/// operator gets one log line naming the sandbox and host (the sandbox's client sees only
/// the reset).
fn scrub_body(
    t: &Tunnel,
    body: ProxyBody,
    (scrubber, tally): (Arc<Scrubber>, &Arc<AnswerTally>),
    binary: bool,
    frames: Option<MessageFrames>,
    scope: Option<Scope>,
) -> ProxyBody {
    let framed = frames.is_some();
    let body = match binary {
        true => ScrubBody::binary(body, scrubber, frames),
        false => ScrubBody::new(body, scrubber),
    };
    let body = body.with_tally(tally.for_body());
    let body = match scope {
        Some(scope) => body.with_rescope(scope.rescope()),
        None => body,
    };
    if !framed {
        return body.map_err(BoxError::from).boxed_unsync();
    }
    let (sandbox, host) = (t.sandbox.id.clone(), t.dest.to_string());
    body.map_err(move |e| {
        if let BodyError::Unscrubbable(why) = &e {
            tracing::warn!(sandbox = %sandbox, host = %host, "stream reset: {why}");
        }
        BoxError::from(e)
    })
    .boxed_unsync()
}

/// A slot per brotli or zstd layer of `codings`, of the sandbox and of the daemon, held with
/// the body: such a decoder may hold a 16 MiB (brotli) or 8 MiB (zstd) window for as long as
/// the client does not read, so how many run at once is bounded
/// (`[upstream] max_window_decoders_per_sandbox`, `max_window_decoders`). Sealgate asks the
/// hosts whose answers it scrubs for no coding (`forward::head::whole_responses_only`), so
/// only an upstream that ignores that meets the bound.
///
/// # Errors
/// A bound is full: 502, before any byte of the body.
fn window_slots(
    t: &Tunnel,
    up: &UpstreamSettings,
    codings: &Codings,
) -> Result<Vec<(BudgetSlot, BudgetSlot)>, Refusal> {
    let windows = codings
        .applied()
        .iter()
        .filter(|c| matches!(c, Coding::Brotli | Coding::Zstd))
        .count();
    let c = &up.config;
    let full = |key: &str, max: usize, whose: &str| {
        Refusal::new(
            Code::UpstreamUnreachable,
            format!(
                "{} answered with brotli or zstd while {max} such answers are being decoded \
                 {whose} (upstream.{key}); sealgate asks hosts whose answers it scrubs for gzip \
                 or deflate",
                t.dest
            ),
        )
    };
    (0..windows)
        .map(|_| {
            let (mine, max) = (&t.sandbox.decoders, c.max_window_decoders_per_sandbox);
            let mine = mine
                .take(max)
                .ok_or_else(|| full("max_window_decoders_per_sandbox", max, "for this sandbox"))?;
            let max = c.max_window_decoders;
            let all = up.counts.decoders.take(max);
            let all = all.ok_or_else(|| full("max_window_decoders", max, "by sealgate"))?;
            Ok((mine, all))
        })
        .collect()
}

fn undecodable(t: &Tunnel, e: CodingError) -> Refusal {
    Refusal::new(
        Code::UpstreamUnreachable,
        format!(
            "{} answered with {e}, so the response cannot be scrubbed",
            t.dest
        ),
    )
}

/// hyper keeps a non-standard h1 reason phrase in the response extensions and writes it to h1
/// clients; scrub it like a value (tokens are visible ASCII, so it stays valid). Returns how
/// many values it replaced.
fn scrub_reason(scrubber: &Scrubber, ext: &mut Extensions) -> usize {
    let Some(reason) = ext.get::<ReasonPhrase>() else {
        return 0;
    };
    let Some((scrubbed, n)) = scrubber.scrub(reason.as_bytes()) else {
        return 0;
    };
    match ReasonPhrase::try_from(scrubbed) {
        Ok(r) => {
            ext.insert(r);
        }
        Err(_) => {
            ext.remove::<ReasonPhrase>();
        }
    }
    n
}
