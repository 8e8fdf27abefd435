//! Classifies upstream failures (connector, TLS, h2 resets, timeouts) into the sandbox-facing
//! codes of DESIGN.md §5, and says which failed requests may be sent again.

use std::error::Error as _;

use super::refusal::{Code, Refusal};
use super::upstream::ConnectError;
use super::Tunnel;
use crate::subst::BodyError;

/// Maps a hyper-util client error to a refusal, looking through its source chain for our own
/// connector and body errors. `method` is the request's: a request of a method that may not go
/// again, whose connection closed before an answer, is told why it was not sent again.
pub fn classify(
    t: &Tunnel,
    e: &hyper_util::client::legacy::Error,
    method: &http::Method,
) -> Refusal {
    for s in sources(e) {
        if let Some(c) = s.downcast_ref::<ConnectError>() {
            return from_connect(t, c);
        }
        if let Some(BodyError::Denied(d)) = s.downcast_ref::<BodyError>() {
            return Refusal::new(
                Code::SecretHostDenied,
                format!("secret {} may not be sent to {} (secret allowed_hosts / store egress_allowlist)", d.secret, t.dest),
            );
        }
    }
    tracing::debug!(dest = %t.dest, error = %chain(e), "upstream exchange failed");
    if head_too_large(e) {
        return Refusal::new(
            Code::UpstreamUnreachable,
            format!(
                "{}'s response head is too large (more fields than \
                 upstream.max_response_header_fields, or more bytes than \
                 upstream.max_response_header_bytes)",
                t.dest
            ),
        );
    }
    if h2_answer_refused(e) {
        return Refusal::new(
            Code::UpstreamUnreachable,
            format!(
                "{}'s HTTP/2 answer could not be taken: a response head over \
                 upstream.max_response_header_bytes, a malformed one, or none",
                t.dest
            ),
        );
    }
    if !idempotent(method) && (closed_unanswered(e) || closed_before_answer(e)) {
        return unsent(t, method);
    }
    Refusal::new(
        Code::UpstreamUnreachable,
        format!("{} failed the exchange", t.dest),
    )
}

/// The refusal of a request whose upstream connection ended before an answer came, when its
/// method is not idempotent: the origin may have processed it, so sealgate did not send it
/// again (RFC 9110 §9.2.2: "A proxy MUST NOT automatically retry non-idempotent requests").
/// The commonest cause is an HTTP/1.1 origin closing a kept-alive connection at its idle
/// timeout as the request went out (Apache's `KeepAliveTimeout`, when it did not announce it:
/// [`super::upstream::keep_alive`]); the client, which knows whether the request may go
/// twice, can decide. The wording names no side: a reset, or an h2 connection's end, reads
/// the same.
fn unsent(t: &Tunnel, method: &http::Method) -> Refusal {
    Refusal::new(
        Code::UpstreamUnreachable,
        format!(
            "the connection to {} ended before an answer came; a {method} request is not \
             sent again by a proxy, since the origin may have processed it",
            t.dest
        ),
    )
}

/// True when hyper refused the upstream's response head as too large (too many fields, or
/// more bytes than its read buffer takes).
fn head_too_large(e: &hyper_util::client::legacy::Error) -> bool {
    sources(e)
        .find_map(|s| s.downcast_ref::<hyper::Error>())
        .is_some_and(hyper::Error::is_parse_too_large)
}

/// True when an h2 answer ended before a head sealgate could take: its own h2 client reset
/// the stream with `PROTOCOL_ERROR` (a "detected" stream error; h2 0.4.20 does that to a
/// head that decodes to more than the advertised header-list limit,
/// `max_response_header_bytes`, and to a malformed one, and cannot tell which), or the
/// origin reset it with `NO_ERROR` and no head had been taken — what nginx sends after
/// answering a request before reading its body, so the sandbox's refused head shows up as
/// that reset. Nothing of the answer reached the sandbox. Neither is retried
/// ([`not_processed`] wants a received `REFUSED_STREAM`): the origin processed the request.
fn h2_answer_refused(e: &hyper_util::client::legacy::Error) -> bool {
    sources(e)
        .find_map(|s| s.downcast_ref::<h2::Error>())
        .is_some_and(|h2| {
            let (detected, received) = (
                h2.is_reset() && !h2.is_remote(),
                h2.is_reset() && h2.is_remote(),
            );
            (detected && h2.reason() == Some(h2::Reason::PROTOCOL_ERROR))
                || (received && h2.reason() == Some(h2::Reason::NO_ERROR))
        })
}

fn from_connect(t: &Tunnel, c: &ConnectError) -> Refusal {
    match c {
        ConnectError::Denied(m) => {
            Refusal::new(Code::EgressDenied, format!("address vetting: {m}"))
        }
        ConnectError::Timeout => Refusal::new(
            Code::UpstreamTimeout,
            format!("connecting to {} timed out", t.dest),
        ),
        ConnectError::Tls(m) => Refusal::new(
            Code::UpstreamTlsError,
            format!("TLS to {} failed: {m}", t.dest),
        ),
        ConnectError::Unreachable(m) => Refusal::new(
            Code::UpstreamUnreachable,
            format!("{} unreachable: {m}", t.dest),
        ),
        ConnectError::NotH2 => Refusal::new(
            Code::UpstreamUnreachable,
            format!("{} stopped offering h2", t.dest),
        ),
        ConnectError::TooMany(max) => Refusal::new(
            Code::TooManyUpstreamConnections,
            format!(
                "sandbox holds {max} upstream connections \
                 (upstream.max_connections_per_sandbox), in use or held by its requests \
                 still in flight"
            ),
        ),
        ConnectError::DaemonFull(max) => Refusal::new(
            Code::Unavailable,
            format!(
                "sealgate holds {max} upstream connections for all sandboxes together \
                 (upstream.max_connections), all in use"
            ),
        ),
    }
}

/// Which upstream cap a request met ([`ConnectError::TooMany`], [`ConnectError::DaemonFull`]),
/// if any: nothing was dialled or sent.
pub fn upstream_cap(e: &hyper_util::client::legacy::Error) -> Option<UpstreamCap> {
    sources(e).find_map(|s| match s.downcast_ref::<ConnectError>() {
        Some(ConnectError::TooMany(_)) => Some(UpstreamCap::Sandbox),
        Some(ConnectError::DaemonFull(_)) => Some(UpstreamCap::Daemon),
        _ => None,
    })
}

/// The upstream cap a request met.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamCap {
    /// `[upstream] max_connections_per_sandbox`.
    Sandbox,
    /// `[upstream] max_connections`.
    Daemon,
}

/// True when an h2-only client's handshake did not choose h2 ([`ConnectError::NotH2`]):
/// nothing was sent, so the request may go again on a client that also speaks HTTP/1.1.
pub fn not_h2(e: &hyper_util::client::legacy::Error) -> bool {
    sources(e).any(|s| matches!(s.downcast_ref::<ConnectError>(), Some(ConnectError::NotH2)))
}

/// Whether `e` came from an HTTP/2 connection: an h2 error, or one of the two ways hyper and
/// its pool drop a request waiting for an h2 connection or stream ([`dispatch_gone`],
/// `waited_on_an_abandoned_dial`). hyper's HTTP/1 client reports none of them (a canceled
/// HTTP/1 request never written is sent again by the pooled client itself). A retry after
/// any other failure — an HTTP/1.1 connection closed under the request — skips the h2-only
/// retry client, whose handshake an HTTP/1.1 origin could only refuse.
pub fn over_h2(e: &hyper_util::client::legacy::Error) -> bool {
    dispatch_gone(e) || waited_on_an_abandoned_dial(e) || sources(e).any(|s| s.is::<h2::Error>())
}

/// Whether a request that failed with `e` may be sent again (its body held in full): when the
/// upstream provably did not process it ([`not_processed`]), or when the outcome is unknown
/// but its method is idempotent (`dispatch_gone`, `closed_unanswered`,
/// `closed_before_answer`, `idempotent`).
pub fn may_send_again(e: &hyper_util::client::legacy::Error, method: &http::Method) -> bool {
    not_processed(e)
        || (idempotent(method)
            && (dispatch_gone(e) || closed_unanswered(e) || closed_before_answer(e)))
}

/// True when the upstream provably did not process the request, so it may be sent again:
/// the server refused the stream (a received `REFUSED_STREAM`, RFC 9113 §8.7, also what
/// [`super::upstream::RefuseAfterGoaway`] reports for streams opened after a GOAWAY; h2 up
/// to 0.4.18 reset an answered stream with a *detected* one when its head was too large, so
/// only a received one counts), or the
/// stream was above a graceful GOAWAY's last-stream-id (h2 reports those, and only those, as
/// a remote GOAWAY with `NO_ERROR`; a GOAWAY with an error code may also end processed
/// streams and is not retried), or the request never left: it was waiting for an HTTP/2
/// connection another request was dialing, and that dial was abandoned
/// (`waited_on_an_abandoned_dial`).
pub fn not_processed(e: &hyper_util::client::legacy::Error) -> bool {
    if waited_on_an_abandoned_dial(e) {
        return true;
    }
    sources(e)
        .find_map(|s| s.downcast_ref::<h2::Error>())
        .is_some_and(|h2| {
            let reason = h2.reason();
            (h2.is_reset() && h2.is_remote() && reason == Some(h2::Reason::REFUSED_STREAM))
                || (h2.is_go_away() && h2.is_remote() && reason == Some(h2::Reason::NO_ERROR))
        })
}

/// True when hyper dropped the request inside its connection task: its h2 client keeps a
/// request that waits for a stream slot (the origin's `max_concurrent_streams` in use) in
/// that task, and when a GOAWAY arrives the task ends and drops it — "dispatch task is gone"
/// up to hyper 1.12 (`hyper::Error` has no accessor for it, so its text is the handle), a
/// cancellation "connection closed" since 1.13 (`is_canceled`; also what a request still
/// queued for a closing connection gets). Pinned by
/// `a_get_queued_for_a_stream_slot_survives_the_origins_goaway`, which failed one run in
/// three after the update. The request may have been opened by then, below the GOAWAY's
/// last-stream-id: whether the origin processed it is unknown, so only an idempotent request
/// may go again ([`idempotent`]).
fn dispatch_gone(e: &hyper_util::client::legacy::Error) -> bool {
    sources(e)
        .find_map(|s| s.downcast_ref::<hyper::Error>())
        .is_some_and(|h| h.is_canceled() || h.to_string() == "dispatch task is gone")
}

/// True when the upstream connection ended (the server closed it) while the request still
/// waited for its answer: h2 reports that as an I/O `BrokenPipe` ("stream closed because of a
/// broken pipe"), which hyper passes on as its own I/O error. nginx 1.22 does it to the
/// stream that reached `keepalive_requests`: it names that stream as its GOAWAY's
/// last-stream-id — "might have been processed" (RFC 9113 §6.8) — and closes without
/// answering it. The outcome is unknown, so only an idempotent request may go again (pinned
/// by `tests/it/adversarial/exhaustion.rs`,
/// `a_get_whose_connection_closes_unanswered_is_sent_again`).
///
/// An HTTP/1.1 upstream that closes a kept-alive connection, unannounced, as a request is
/// written shows up the same way, as the I/O error of the read that found the end: TLS
/// without `close_notify` is `UnexpectedEof`, a closed socket may be `ConnectionReset`.
/// Reaching [`may_send_again`] means no response head arrived (a failure after it ends the
/// response body instead), so each of these is "closed before answering".
fn closed_unanswered(e: &hyper_util::client::legacy::Error) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionReset, UnexpectedEof};
    sources(e)
        .find_map(|s| s.downcast_ref::<std::io::Error>())
        .is_some_and(|io| matches!(io.kind(), BrokenPipe | UnexpectedEof | ConnectionReset))
}

/// True when an HTTP/1.1 upstream closed the connection after the request went out and
/// before any byte of an answer (hyper: "connection closed before message completed"): a
/// kept-alive connection its origin closed, unannounced, as the request was written — a
/// thread-per-connection origin that answers once without `Connection: close` did it to every
/// second request on a reused connection (outside test). Whether it processed the request is
/// unknown, so only an idempotent request may go again.
fn closed_before_answer(e: &hyper_util::client::legacy::Error) -> bool {
    sources(e)
        .find_map(|s| s.downcast_ref::<hyper::Error>())
        .is_some_and(hyper::Error::is_incomplete_message)
}

/// Methods a proxy may send again after a failure that may have reached the origin
/// (RFC 9110 §9.2.2: idempotent), as nginx's `proxy_next_upstream` does by default.
fn idempotent(m: &http::Method) -> bool {
    use http::Method as M;
    [M::GET, M::HEAD, M::OPTIONS, M::TRACE, M::PUT, M::DELETE].contains(m)
}

/// hyper-util (0.1.21) dials one HTTP/2 connection per origin at a time; the requests that
/// arrive meanwhile wait for it in the pool. When the dialing request is dropped — its
/// sandbox client hung up (another request of the same sandbox: each has its own client sets) — or its dial fails, the waiters' checkouts end
/// with the pool's private `CheckoutNoLongerWanted` error, surfaced as a connect error whose
/// source reads "request was canceled", and hyper-util does not try them again (it only
/// retries a checkout that yielded a closed connection). Nothing of such a request was sent,
/// so it is safe to send it again. The pool's error type is private: its text is the only
/// handle, pinned by `tests/it/adversarial/exhaustion.rs`
/// (`a_request_hanging_up_mid_dial_does_not_fail_the_request_parked_on_it`).
fn waited_on_an_abandoned_dial(e: &hyper_util::client::legacy::Error) -> bool {
    e.is_connect()
        && e.source()
            .is_some_and(|s| s.source().is_none() && s.to_string() == "request was canceled")
}

/// The sources of `e`, outermost first (not `e` itself).
fn sources<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(e.source(), |s| (*s).source())
}

/// The error and its sources, `: `-joined, for logs. An h2 error is written without its
/// `Display`, which appends a GOAWAY's debug data — bytes the upstream chose, possibly a real
/// value it holds; the kind and reason are kept.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = String::new();
    for (i, s) in std::iter::once(e).chain(sources(e)).enumerate() {
        if i > 0 {
            out.push_str(": ");
        }
        match s.downcast_ref::<h2::Error>() {
            Some(h2) => out.push_str(&h2_summary(h2)),
            None => out.push_str(&s.to_string()),
        }
    }
    out
}

/// What an h2 error says, without any bytes of the peer's.
fn h2_summary(e: &h2::Error) -> String {
    if let Some(io) = e.get_io() {
        return format!("h2 I/O error: {io}");
    }
    let reason = e
        .reason()
        .map_or_else(|| "no reason".to_owned(), |r| format!("{r:?}"));
    let kind = if e.is_go_away() {
        "connection error"
    } else if e.is_reset() {
        "stream error"
    } else {
        "error"
    };
    let who = if e.is_remote() {
        "received"
    } else {
        "detected"
    };
    format!("h2 {kind} {who}: {reason}")
}

#[cfg(test)]
mod tests {
    use super::idempotent;

    /// A GOAWAY's debug data is the upstream's to choose; it never reaches a log line.
    #[tokio::test]
    async fn h2_errors_are_logged_without_the_peers_debug_data() {
        use tokio::io::AsyncWriteExt;
        let (client_io, mut server) = tokio::io::duplex(1 << 16);
        let (mut send, conn) = h2::client::handshake(client_io).await.unwrap();
        let conn = tokio::spawn(conn);
        let req = http::Request::get("https://o.test/").body(()).unwrap();
        let (response, _) = send.send_request(req, true).unwrap();
        let debug = b"sk-debug-data-0000";
        let mut frames = vec![0, 0, 0, 4, 0, 0, 0, 0, 0]; // SETTINGS
        frames.extend_from_slice(&[0, 0, (8 + debug.len()) as u8, 7, 0, 0, 0, 0, 0]);
        frames.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 2]); // last stream 0, INTERNAL_ERROR
        frames.extend_from_slice(debug);
        server.write_all(&frames).await.unwrap();
        let err = response.await.expect_err("the server went away");
        assert!(
            err.to_string().contains("sk-debug-data"),
            "h2's own Display: {err}"
        );
        let logged = super::chain(&err);
        assert!(!logged.contains("sk-debug-data"), "{logged}");
        assert!(logged.contains("INTERNAL_ERROR"), "{logged}");
        drop(server);
        let _ = conn.await;
    }
    use http::Method;

    #[test]
    fn only_idempotent_methods_may_go_again_after_an_unknown_outcome() {
        for m in ["GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"] {
            assert!(
                idempotent(&Method::from_bytes(m.as_bytes()).unwrap()),
                "{m}"
            );
        }
        for m in ["POST", "PATCH", "CONNECT", "PROPFIND"] {
            assert!(
                !idempotent(&Method::from_bytes(m.as_bytes()).unwrap()),
                "{m}"
            );
        }
    }
}
