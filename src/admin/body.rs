//! A token holder's request body, read whole before the router sees it.
//!
//! Invariants: a body that declares more than [`MAX_BODY_BYTES`] is refused from its head,
//! before anything polls it (hyper answers `Expect: 100-continue` when a body is first
//! polled); any other body is read to its end within `[admin] body_read_timeout_secs` and
//! [`MAX_BODY_BYTES`], or refused (408, 413). Admin connections that sent the token are never
//! evicted to make room (`super::serve`), so without these bounds a client that declared or
//! trickled a body held its slot for as long as it liked (an outside review: 400 s). Bodies
//! of requests without the token are never read: the router answers them 401.

use std::time::Duration;

use axum::body::Body;
use http::{header, HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt as _, Limited};
use hyper::body::Incoming;

use super::error::ApiError;
use super::routes::MAX_BODY_BYTES;

/// `req` with its body read whole within `wait` and [`MAX_BODY_BYTES`] (see the module docs).
///
/// # Errors
/// 413 `request_too_large` (declared or read past the limit), 408 `request_timeout`, or 400
/// for a body that broke off.
pub async fn read_whole(req: Request<Incoming>, wait: Duration) -> Result<Request<Body>, ApiError> {
    if declared_too_large(req.headers()) {
        return Err(ApiError::too_large());
    }
    let (parts, body) = req.into_parts();
    let read = tokio::time::timeout(wait, Limited::new(body, MAX_BODY_BYTES).collect()).await;
    match read {
        Ok(Ok(whole)) => Ok(Request::from_parts(parts, Body::from(whole.to_bytes()))),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::too_large()),
        Ok(Err(_)) => Err(ApiError::bad_request("the request body broke off")),
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!(
                "the request body did not arrive within {} s ([admin] body_read_timeout_secs)",
                wait.as_secs()
            ),
        )),
    }
}

/// Whether `headers` declare a body over [`MAX_BODY_BYTES`].
fn declared_too_large(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .is_some_and(|n| n > MAX_BODY_BYTES as u64)
}
