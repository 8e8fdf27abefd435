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
//! | trailers | kept through decoding; names and values as for headers |
//!
//! A response that has no body (to `HEAD`, 1xx, 204, 304) keeps `Content-Length` and
//! `Content-Encoding` as sent (scrubbed like every value), no decoder is built, and whatever
//! body or trailers the upstream sent anyway are dropped (an h2 server would pass them on). Any
//! other response loses `Content-Length` (replacements change it) and `Content-Encoding` (the
//! body is decoded); a coding sealgate cannot decode or too many stacked codings is refused
//! with 502 rather than passed unscrubbed, and so is every 206: requests here carry no `Range`,
//! because parts of a resource could carry a value in pieces. Refusal messages never repeat
//! what the upstream wrote.

mod codings;
mod decode;

use std::sync::Arc;

use http::header::{self, HeaderMap};
use http::{Extensions, Method, StatusCode};
use http_body_util::BodyExt;
use hyper::ext::ReasonPhrase;

pub use codings::{CodingError, Codings};

use super::refusal::{Code, Refusal};
use super::{BoxError, ProxyBody, Tunnel};
use crate::subst::{Report, ScrubBody, Scrubber};

/// What the response looks like before hop-by-hop headers are stripped.
pub struct Shape {
    /// False for answers that have no body (to `HEAD`, 1xx, 204, 304).
    pub has_body: bool,
    /// The codings on the body (only read when it has one).
    pub codings: Result<Codings, CodingError>,
}

impl Shape {
    /// Reads the shape of a response to `method` with `status` and headers `h` (which must
    /// still hold `Transfer-Encoding`); at most `max_codings` stacked codings are accepted.
    pub fn of(method: &Method, status: StatusCode, h: &HeaderMap, max_codings: usize) -> Shape {
        let has_body = method != Method::HEAD
            && !status.is_informational()
            && status != StatusCode::NO_CONTENT
            && status != StatusCode::NOT_MODIFIED;
        let codings = if has_body {
            Codings::of(h, max_codings)
        } else {
            Ok(Codings::default())
        };
        Shape { has_body, codings }
    }
}

/// Scrubs the reason phrase and headers now and wraps the body (see the module docs).
///
/// # Errors
/// A body sealgate cannot decode: the response is refused rather than passed unscrubbed.
pub fn scrub_response(
    t: &Tunnel,
    scrubber: Arc<Scrubber>,
    report: &Report,
    parts: &mut http::response::Parts,
    shape: Shape,
    body: ProxyBody,
) -> Result<ProxyBody, Refusal> {
    let codings = shape.codings.map_err(|e| undecodable(t, e))?;
    if parts.status == StatusCode::PARTIAL_CONTENT {
        // sealgate sent no `Range` here (`forward::whole_responses_only`): a part of a
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
    for s in extras.iter().chain(std::iter::once(&scrubber)) {
        scrub_reason(s, &mut parts.extensions);
        s.scrub_headers(&mut parts.headers);
    }
    if !shape.has_body {
        // hyper's h1 server drops such a body, its h2 server would forward DATA and trailers:
        // nothing of it reaches the sandbox, scrubbed or not.
        drop(body);
        return Ok(http_body_util::Empty::new()
            .map_err(|never| match never {})
            .boxed_unsync());
    }
    parts.headers.remove(header::CONTENT_ENCODING);
    parts.headers.remove(header::CONTENT_LENGTH);
    let body = if codings.is_empty() {
        body
    } else {
        decode::Decoded::new(codings, body).boxed_unsync()
    };
    let body = match extras {
        Some(x) => ScrubBody::new(body, x)
            .map_err(BoxError::from)
            .boxed_unsync(),
        None => body,
    };
    Ok(ScrubBody::new(body, scrubber)
        .map_err(BoxError::from)
        .boxed_unsync())
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
/// clients; scrub it like a value (tokens are visible ASCII, so it stays valid).
fn scrub_reason(scrubber: &Scrubber, ext: &mut Extensions) {
    let Some(reason) = ext.get::<ReasonPhrase>() else {
        return;
    };
    let Some((scrubbed, _)) = scrubber.scrub(reason.as_bytes()) else {
        return;
    };
    match ReasonPhrase::try_from(scrubbed) {
        Ok(r) => {
            ext.insert(r);
        }
        Err(_) => {
            ext.remove::<ReasonPhrase>();
        }
    }
}
