//! The upstream's answer on its way to the sandbox: scrubbed, its framing bounded, a small
//! one read whole.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response};
use http_body::Frame;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

use super::checks::{check_live, unknowable};
use super::head::strip_hop_by_hop;
use super::orphan::AnswerSlot;
use crate::metrics::Counted;
use crate::policy::Scheme;
use crate::proxy::held::Held;
use crate::proxy::refusal::{Code, Refusal};
use crate::proxy::response_scrub::{scrub_response, Following, Scope, Scrubbing, Shape};
use crate::proxy::{BoxError, LiveSettings, ProxyBody, Tunnel};
use crate::subst::{BodyError, Report, Scrubber};

/// What a request asked for, as its answer's shape depends on it.
pub(super) struct Asked<'a> {
    /// A `HEAD`'s answer has no body.
    pub(super) method: &'a Method,
    /// It was gRPC or Connect messages: only then is the answer read as messages
    /// ([`Shape::of`]).
    pub(super) messages: bool,
}

/// Upstream response → what the sandbox gets: hop-by-hop headers and any `x-sealgate-error` of
/// the upstream's own stripped (only sealgate's refusals carry it), `Trailer` kept (it is
/// end-to-end, and hyper's h1 server sends only the trailers it lists), then scrubbed by
/// `scrubber` (none: not at all) following `scope`, with the Basic-auth forms of `report`; the
/// request's `slot` goes with the body. Also says whether the answer is to be read whole
/// ([`read_whole`]).
pub(super) fn finish_response(
    t: &Tunnel,
    rt: &LiveSettings,
    (scrubber, scope): (Option<Arc<Scrubber>>, Scope),
    report: &Report,
    asked: Asked<'_>,
    resp: Response<Incoming>,
    slot: AnswerSlot,
) -> Result<(Response<ProxyBody>, bool), Refusal> {
    let upgrade = resp.status() == http::StatusCode::SWITCHING_PROTOCOLS;
    let (mut parts, body) = resp.into_parts();
    let shape = scrubber.as_ref().map(|_| {
        let held = &t.sandbox.grpc_held;
        Shape::of(
            asked.method,
            asked.messages,
            parts.status,
            &parts.headers,
            &rt.upstream.config,
            held,
        )
    });
    let trailer = take_all(&mut parts.headers, header::TRAILER);
    strip_hop_by_hop(&mut parts.headers, upgrade);
    parts.headers.remove(crate::proxy::refusal::ERROR_HEADER);
    for value in trailer {
        parts.headers.append(header::TRAILER, value);
    }
    let body = framing_bounded(&parts, body);
    let unscrubbed = scrubber.is_none();
    let (body, whole) = match scrubber.zip(shape) {
        Some((s, shape)) => {
            let scrubbing = Scrubbing {
                scrubber: s,
                scope: scope.clone(),
                report,
            };
            scrub_response(t, &rt.upstream, scrubbing, &mut parts, shape, body)?
        }
        None => (body, false),
    };
    // Plain HTTP never unseals; an upgrade's answer has no body (its relay follows).
    let unscrubbed = unscrubbed && t.scheme == Scheme::Https && !upgrade;
    let body = Held::new(Following::new(body, scope, unscrubbed), slot);
    let body = Counted::new(body, t.state.metrics.bytes_down.clone()).boxed_unsync();
    Ok((Response::from_parts(parts, body), whole))
}

/// The answer's body, counting its data into its HTTP/1 connection's framing allowance
/// ([`crate::proxy::upstream::OverheadOf`]; h2 answers carry none), which starts now.
fn framing_bounded(
    parts: &http::response::Parts,
    body: Incoming,
) -> http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError> {
    let Some(crate::proxy::upstream::OverheadOf(overhead)) = parts.extensions.get().cloned() else {
        return body.map_err(BoxError::from).boxed_unsync();
    };
    if parts.status == http::StatusCode::SWITCHING_PROTOCOLS {
        overhead.upgraded(); // a WebSocket relay's frames follow
    }
    crate::proxy::upstream::DataCounted::new(body, overhead)
        .map_err(BoxError::from)
        .boxed_unsync()
}

/// A small scrubbed answer of known length (`response_scrub::is_whole`) is read to its end,
/// then sent with its exact `Content-Length`. Reading it frees the
/// request's slot and upstream connection before the sandbox has read it. One that has not
/// ended within [`WHOLE_ANSWER_WAIT`], or grew past [`WHOLE_ANSWER_HELD`] scrubbed (values
/// replaced by longer tokens), streams on from where it is, without a length, as before:
/// its client sees the head at once, not after an origin's slow trickle (an outside check:
/// Python `requests`' 3 s read timeout fired on a 64 KiB answer sent over 6 s).
///
/// # Errors
/// The answer failed before its end: 502, or 503 if the node lost sight of the sandbox's
/// values meanwhile ([`unknowable`]); streamed, such an answer had been cut short instead.
pub(super) async fn read_whole(
    t: &Tunnel,
    resp: Response<ProxyBody>,
) -> Result<Response<ProxyBody>, Refusal> {
    let (parts, mut body) = resp.into_parts();
    let deadline = tokio::time::Instant::now() + WHOLE_ANSWER_WAIT;
    let (mut read, mut held) = (Vec::new(), 0);
    let mut trailers = None;
    while held <= WHOLE_ANSWER_HELD {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => break,
            Ok(None) => return Ok(whole(parts, read, trailers)),
            Ok(Some(frame)) => frame.map_err(|e| cut_before_its_end(t, &e))?,
        };
        match frame.into_data() {
            Ok(data) => {
                held += data.len();
                read.push(data);
            }
            Err(frame) => trailers = frame.into_trailers().ok(),
        }
    }
    // Slow or grown: streamed on, what was read first (trailers, if they came, end it).
    let first = read
        .into_iter()
        .map(Frame::data)
        .chain(trailers.map(Frame::trailers))
        .map(Ok);
    let first = futures_util::stream::iter(first);
    let rest = http_body_util::BodyStream::new(body);
    let body = http_body_util::StreamBody::new(futures_util::StreamExt::chain(first, rest));
    Ok(Response::from_parts(parts, body.boxed_unsync()))
}

/// How long [`read_whole`] waits for a small answer's end before it streams it.
const WHOLE_ANSWER_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// The most [`read_whole`] holds of a scrubbed answer before it streams it: four times the
/// most it reads whole, for values replaced by longer tokens.
const WHOLE_ANSWER_HELD: usize = 4 * crate::proxy::response_scrub::WHOLE_ANSWER_MAX as usize;

/// The answer of `parts` with body `read` (and `trailers`, which have no place beside a
/// `Content-Length`: such an answer goes without one).
fn whole(
    mut parts: http::response::Parts,
    read: Vec<Bytes>,
    trailers: Option<HeaderMap>,
) -> Response<ProxyBody> {
    let bytes = match read.len() {
        0 => Bytes::new(),
        1 => read.into_iter().next().unwrap_or_default(),
        _ => Bytes::from(read.concat()),
    };
    if let Some(trailers) = trailers {
        let frames = [Frame::data(bytes), Frame::trailers(trailers)];
        let frames = futures_util::stream::iter(frames.map(Ok::<_, BoxError>));
        let body = http_body_util::StreamBody::new(frames);
        return Response::from_parts(parts, body.boxed_unsync());
    }
    parts
        .headers
        .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    let body = Full::new(bytes).map_err(|never| match never {});
    Response::from_parts(parts, body.boxed_unsync())
}

/// The refusal of a whole-read answer that failed before its end (its error names no byte the
/// upstream wrote): the sandbox's end when it ended meanwhile — its answer is cut at the next
/// chunk, and blaming the origin (502 `upstream_unreachable`) fed the operator's upstream
/// alert (outside fleet pass).
fn cut_before_its_end(t: &Tunnel, e: &BoxError) -> Refusal {
    if let Err(ended) = check_live(t) {
        return ended;
    }
    let lost = std::iter::successors(Some(&**e as &(dyn std::error::Error + 'static)), |e| {
        e.source()
    })
    .any(|e| matches!(e.downcast_ref::<BodyError>(), Some(BodyError::ScopeLost)));
    if lost {
        return unknowable(t);
    }
    Refusal::new(
        Code::UpstreamUnreachable,
        format!("{} failed part way through its answer", t.dest),
    )
}

/// Removes every field `name`, returning the values (allocates only if there were any).
fn take_all(h: &mut HeaderMap, name: HeaderName) -> Vec<HeaderValue> {
    match h.entry(name) {
        header::Entry::Occupied(e) => e.remove_entry_mult().1.collect(),
        header::Entry::Vacant(_) => Vec::new(),
    }
}
