//! A token holder's request body, read whole before the router sees it.
//!
//! Invariants: a body that declares more than [`MAX_BODY_BYTES`] is refused from its head,
//! before anything polls it (hyper answers `Expect: 100-continue` when a body is first
//! polled); any other body is read to its end within `[admin] body_read_timeout_secs` and
//! [`MAX_BODY_BYTES`], or refused (408, 413). A refused body that the client is still
//! sending is read and dropped in the background (`proxy::linger` bounds) so that it reads the
//! answer; one that waits for `100 Continue` is never polled. Admin connections that sent the token are never
//! evicted to make room (`super::serve`), so without these bounds a client that declared or
//! trickled a body held its slot for as long as it liked (an outside review: 400 s). Bodies
//! of requests without the token are never read: the router answers them 401.

use std::time::Duration;

use axum::body::Body;
use http::{header, HeaderMap, Request, StatusCode};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use zeroize::Zeroize as _;

use super::error::ApiError;
use super::routes::MAX_BODY_BYTES;

/// `req` with its body read whole within `wait` and [`MAX_BODY_BYTES`] (see the module docs).
///
/// # Errors
/// 413 `request_too_large` (declared or read past the limit), 408 `request_timeout`, or 400
/// for a body that broke off.
pub async fn read_whole(req: Request<Incoming>, wait: Duration) -> Result<Request<Body>, ApiError> {
    let (parts, mut body) = req.into_parts();
    if declared_too_large(&parts.headers) {
        // A client that asked first sends nothing more; polling would answer it `100
        // Continue`. One that did not is still writing.
        if !asks_to_continue(&parts.headers) {
            linger(body);
        }
        return Err(ApiError::too_large());
    }
    let room = declared(&parts.headers).unwrap_or(0);
    match tokio::time::timeout(wait, read_at_most(&mut body, room, MAX_BODY_BYTES)).await {
        Ok(Ok(whole)) if is_json(&parts.headers) && !is_json_object(&whole) => Err(
            ApiError::bad_request("the request body must be a JSON object ({…})"),
        ),
        Ok(Ok(whole)) => Ok(Request::from_parts(parts, Body::from(whole))),
        Ok(Err(Unread::TooLarge)) => {
            linger(body);
            Err(ApiError::too_large())
        }
        Ok(Err(Unread::BrokeOff)) => Err(ApiError::bad_request("the request body broke off")),
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

/// Whether `body` is empty or a JSON object (by its first byte; the router parses the rest).
/// Every body of the API is an object, but serde reads a struct from an array too, by
/// position: `["name", [...]]` made a store, and `[]`, a string or `null` answered with the
/// struct's internal name (outside review).
fn is_json_object(body: &[u8]) -> bool {
    matches!(
        body.iter().find(|b| !b.is_ascii_whitespace()),
        None | Some(b'{')
    )
}

/// Whether the request says its body is JSON (`application/json` or `…/…+json`, as the
/// router's extractor; others get its 415).
fn is_json(headers: &HeaderMap) -> bool {
    let Some(essence) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
    else {
        return false;
    };
    let essence = essence.trim().to_ascii_lowercase();
    essence == "application/json" || (essence.contains('/') && essence.ends_with("+json"))
}

/// Why a body was not read whole.
enum Unread {
    /// It grew past the limit (the rest is still unread).
    TooLarge,
    /// It broke off.
    BrokeOff,
}

/// The data of `body` to its end, if that is at most `max` bytes, in a buffer made with room
/// for `room` (the declared length, at most `max`). A body may hold a real value (`PUT
/// …/secrets/{name}`): a buffer outgrown is wiped before it is freed ([`append_wiping`]).
async fn read_at_most(body: &mut Incoming, room: usize, max: usize) -> Result<Vec<u8>, Unread> {
    let mut whole = Vec::with_capacity(room.min(max));
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            whole.zeroize();
            return Err(Unread::BrokeOff);
        };
        if let Some(data) = frame.data_ref() {
            if whole.len() + data.len() > max {
                whole.zeroize();
                return Err(Unread::TooLarge);
            }
            append_wiping(&mut whole, data);
        }
    }
    Ok(whole)
}

/// Appends `data` to `whole`; when that needs a larger buffer, the old one is wiped before it
/// is freed (a growing `Vec` would free it as it is).
fn append_wiping(whole: &mut Vec<u8>, data: &[u8]) {
    if whole.capacity() - whole.len() < data.len() {
        let need = whole.len() + data.len();
        let mut bigger = Vec::with_capacity(need.max(whole.capacity() * 2));
        bigger.extend_from_slice(whole);
        whole.zeroize();
        *whole = bigger;
    }
    whole.extend_from_slice(data);
}

/// The body length the head declares, if it does.
fn declared(headers: &HeaderMap) -> Option<usize> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<usize>().ok())
}

/// Reads and drops the rest of a refused body in the background, within the proxy's default
/// lingering bounds (the admin API serves token holders; `[proxy] linger_*` bound what
/// sandboxes can make the proxy read), so that a client still writing it reads the 413
/// instead of a reset (an outside re-check: the Python SDK saw "ReadError" 10 times in 10, the
/// CLI "SendRequest").
fn linger(body: Incoming) {
    use crate::proxy::linger::{Bounds, Lingering};
    drop(Lingering::new(body, Bounds::DEFAULT));
}

/// Whether the request waits for `100 Continue` before it sends its body.
fn asks_to_continue(headers: &HeaderMap) -> bool {
    headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// Whether `headers` declare a body over [`MAX_BODY_BYTES`].
fn declared_too_large(headers: &HeaderMap) -> bool {
    declared(headers).is_some_and(|n| n > MAX_BODY_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appending_past_the_room_keeps_every_byte_in_order() {
        let mut whole = Vec::with_capacity(3);
        let mut want = Vec::new();
        for chunk in [&b"ab"[..], b"cde", b"", b"fghijklmnop", b"q"] {
            append_wiping(&mut whole, chunk);
            want.extend_from_slice(chunk);
            assert_eq!(whole, want);
        }
        assert!(whole.capacity() >= whole.len());
    }
}
