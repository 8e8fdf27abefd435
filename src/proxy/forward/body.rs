//! The request body on its way upstream: held whole and substituted (it keeps an exact
//! `Content-Length` and can be sent again), or streamed through the substitution engine.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::Request;
use http_body::Body;
use http_body_util::{BodyExt, Limited};

use super::checks::still_current;
use super::head::{body_budget, denied, within_budget};
use super::{Outcome, ReqBody, BUFFER_BODY_MAX, WHOLE_BODY_MAX};
use crate::proxy::linger::{BodyBreak, ClientFailed, Detach, Detachable, Lingering};
use crate::proxy::progress::{Progress, Tracked};
use crate::proxy::refusal::{Code, Refusal};
use crate::proxy::whole_bodies::Reserved;
use crate::proxy::{BoxError, LiveSettings, ProxyBody, Tunnel};
use crate::sandbox::{HostView, Snapshot};
use crate::subst::{
    self, Binary, BodyEncoding, BodySubst, SealedOnly, SubstBody, SubstOutcome, TokenLookup,
};

/// A request body as it goes upstream: held in full (it can be sent again) or streamed.
pub(super) enum UpBody {
    /// Every byte, already substituted where that applies.
    Held(Bytes),
    /// Streams through (and is consumed by) the first attempt.
    Streamed(ProxyBody),
}

impl UpBody {
    /// A streamed body reporting to a new [`Progress`], that the forwarder can take back
    /// ([`Detach`]); a held one as it is.
    pub(super) fn tracked(self) -> (UpBody, Option<(Arc<Progress>, Detach)>) {
        match self {
            UpBody::Streamed(b) => {
                let progress = Progress::new();
                let b = Tracked::new(b, progress.clone()).boxed_unsync();
                let (b, detach) = Detachable::new(b);
                (UpBody::Streamed(b.boxed_unsync()), Some((progress, detach)))
            }
            held => (held, None),
        }
    }
}

/// Chooses the body path: held in full when its length is known and at most [`BUFFER_BODY_MAX`],
/// or, where body secrets apply, at most [`WHOLE_BODY_MAX`] within the budget of
/// [`crate::proxy::whole_bodies::BUDGET`] (substituted whole where body secrets apply; an exact
/// `Content-Length` is kept, and the request can be retried), else streamed — through the engine
/// when body secrets apply (`Content-Length` dropped; HTTP/1.1 upstreams get chunked encoding),
/// untouched otherwise (no body-located secret, or a compressed body). In a body that counts its
/// own bytes (gRPC, protobuf: [`Binary`]) a value in place of its 43-byte token would break the
/// message, so there the engine only refuses ([`SealedOnly`]): allowed tokens travel sealed.
pub(super) async fn prepare_body(
    t: &Tunnel,
    rt: &LiveSettings,
    snapshot: &Arc<Snapshot>,
    view: &Arc<HostView>,
    req: &mut Request<()>,
    mut body: ReqBody,
    o: &mut Outcome,
) -> Result<(UpBody, Option<SubstOutcome>), Refusal> {
    let scan =
        view.any_body && !view.is_empty() && !compressed(req.headers()) && !body.is_end_stream();
    if !scan {
        if let Some(reserved) = held_whole(t, &mut body, BUFFER_BODY_MAX) {
            let read_ahead = body.is_whole();
            let whole = reserved.holding(collect_small(t, rt, body).await?);
            o.bytes_up = whole.len() as u64;
            if read_ahead {
                req.headers_mut()
                    .insert(header::CONTENT_LENGTH, HeaderValue::from(whole.len()));
            }
            return Ok((UpBody::Held(whole), None));
        }
        o.bytes_up = body.size_hint().exact().unwrap_or(0);
        req.extensions_mut().insert(watch(&mut body));
        return Ok((
            UpBody::Streamed(body.map_err(BoxError::from).boxed_unsync()),
            None,
        ));
    }
    let lookup: Arc<dyn TokenLookup> = match Binary::of(req.headers()) {
        Some(_) => Arc::new(SealedOnly(view.clone())),
        None => view.clone(),
    };
    let mode = rt.proxy.on_disallowed_token;
    let budget = body_budget(rt, o);
    if let Some(reserved) = held_whole(t, &mut body, WHOLE_BODY_MAX) {
        let whole = substitute_whole(t, rt, lookup, mode, req, body, o).await?;
        return Ok((UpBody::Held(reserved.holding(whole)), None));
    }
    req.headers_mut().remove(header::CONTENT_LENGTH);
    req.extensions_mut().insert(watch(&mut body));
    let engine = BodySubst::new(lookup, mode)
        .with_max_unsealed(budget)
        .with_encoding(BodyEncoding::of(req.headers()));
    let sb = SubstBody::new(body, engine).with_guard(still_current(t, snapshot.clone()));
    let outcome = sb.outcome();
    Ok((
        UpBody::Streamed(sb.map_err(BoxError::from).boxed_unsync()),
        Some(outcome),
    ))
}

/// Whether `body` is read whole, with the budget's hold on it (which lasts as long as the held
/// bytes): one read ahead to its end always (its reservation, if it needed one, moves here), one of
/// announced length `n` if `n` is at most [`BUFFER_BODY_MAX`], or at most `max` when
/// [`crate::proxy::whole_bodies::BUDGET`] and the sandbox's share of it have room for it.
fn held_whole(t: &Tunnel, body: &mut ReqBody, max: u64) -> Option<Reserved> {
    if body.is_whole() {
        return Some(body.take_reserved());
    }
    match body.size_hint().exact()? {
        n if n <= BUFFER_BODY_MAX => Some(Reserved::none()),
        n if n <= max => Reserved::take(n, &t.sandbox.bodies_held),
        _ => None,
    }
}

/// Whether an HTTP/1.1 request's body is chunked: it has one, of no announced length.
pub(super) fn unframed(body: &Lingering) -> bool {
    body.size_hint().exact().is_none() && !body.is_end_stream()
}

/// The flag recording how a streamed body breaks (a body read ahead to its end cannot).
fn watch(body: &mut ReqBody) -> ClientFailed {
    body.rest_mut().map(Lingering::watch).unwrap_or_default()
}

/// Reads a body [`held_whole`] without substitution into one buffer.
async fn collect_small(t: &Tunnel, rt: &LiveSettings, body: ReqBody) -> Result<Bytes, Refusal> {
    Ok(joined(collect_frames(t, rt, body).await?))
}

/// The data of a body [`held_whole`] (at most [`WHOLE_BODY_MAX`]), in
/// [`crate::proxy::pieces::Pieces`]: frames of 16 KiB or more as received, smaller ones copied
/// together (an h2 client's one-byte DATA frames cost their bytes, not a `Bytes` each);
/// trailers are dropped.
///
/// # Errors
/// 400 when the body breaks off; 408 when no byte of it came for `response_timeout_secs`,
/// as for a streamed body (a held one that stalled waited for as long as its client kept the
/// connection, holding its request slot and its share of [`crate::proxy::whole_bodies::BUDGET`]).
async fn collect_frames(
    t: &Tunnel,
    rt: &LiveSettings,
    body: ReqBody,
) -> Result<Vec<Bytes>, Refusal> {
    let stall = rt.upstream.config.response_timeout;
    let mut body = Limited::new(body, WHOLE_BODY_MAX as usize);
    let mut frames = crate::proxy::pieces::Pieces::default();
    loop {
        let Ok(frame) = tokio::time::timeout(stall, body.frame()).await else {
            return Err(body_stalled(t));
        };
        let Some(frame) = frame else { break };
        let frame = frame.map_err(|_| {
            Refusal::new(
                Code::BadRequest,
                "request body ended early or exceeded its Content-Length",
            )
        })?;
        if let Ok(data) = frame.into_data() {
            frames.push(data);
        }
    }
    Ok(frames.into_vec())
}

/// `pieces` as one buffer: the piece itself when there is only one, else one copy.
fn joined(mut pieces: Vec<Bytes>) -> Bytes {
    if pieces.len() <= 1 {
        return pieces.pop().unwrap_or_default();
    }
    pieces.concat().into()
}

/// Substitutes a held body frame by frame (the engine carries a token split across frames)
/// and joins the result once: one copy of the body, not one to join the frames and another
/// to join the substituted pieces.
async fn substitute_whole(
    t: &Tunnel,
    rt: &LiveSettings,
    lookup: Arc<dyn TokenLookup>,
    mode: subst::OnDisallowed,
    req: &mut Request<()>,
    body: ReqBody,
    o: &mut Outcome,
) -> Result<Bytes, Refusal> {
    let frames = collect_frames(t, rt, body).await?;
    let mut engine = BodySubst::new(lookup, mode)
        .with_max_unsealed(body_budget(rt, o))
        .with_encoding(BodyEncoding::of(req.headers()));
    let mut out = Vec::new();
    for frame in frames {
        engine.push(frame, &mut out).map_err(|d| denied(t, d, o))?;
        if engine.report().over_budget {
            break;
        }
    }
    engine.finish(&mut out);
    o.report.merge(engine.report());
    within_budget(rt, &o.report)?;
    let whole = joined(out);
    o.bytes_up = whole.len() as u64;
    req.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(whole.len()));
    Ok(whole)
}

/// A body in a content coding is not unsealed (DESIGN.md §3 "Where": "not inside compressed
/// encodings"): every `Content-Encoding` field counts (outside review: `identity` then
/// `gzip` had the value written into a gzip member).
fn compressed(h: &HeaderMap) -> bool {
    crate::proxy::response_scrub::is_coded(h)
}

/// The refusal of a wait for the answer that timed out: the sandbox's if its own streamed
/// body was what the request waited on (a stalled upload answered 504 and blamed the origin;
/// outside review), else the upstream's. An upstream that stops reading does not have the
/// body polled, so its stall stays a 504.
pub(super) fn timed_out(t: &Tunnel, progress: Option<&Progress>) -> Refusal {
    if progress.is_some_and(Progress::waiting_on_body) {
        return body_stalled(t);
    }
    Refusal::new(
        Code::UpstreamTimeout,
        format!(
            "{} did not answer in time (upstream.response_timeout_secs, counted from the \
             request's last byte)",
            t.dest
        ),
    )
}

/// The refusal of a request whose body broke on the client's side (`b` is not
/// [`BodyBreak::None`]).
pub(super) fn broken(b: BodyBreak) -> Refusal {
    match b {
        BodyBreak::Malformed => Refusal::new(
            Code::BadRequest,
            "the request body's framing broke off mid-body",
        ),
        _ => Refusal::new(
            Code::ClientGone,
            "the client gave up before the answer (its connection ended mid-body)",
        ),
    }
}

/// The sandbox's own upload stopped: 408 (held or streamed alike).
fn body_stalled(t: &Tunnel) -> Refusal {
    Refusal::new(
        Code::RequestTimeout,
        format!(
            "the request body to {} stopped: no byte for upstream.response_timeout_secs",
            t.dest
        ),
    )
}
