//! Lingering: what a client still sends after sealgate has answered is read and dropped for a
//! while, so that the client sees the answer.
//!
//! sealgate answers some uploads before their end: a token its secret may not carry there
//! (403), an upstream that stopped reading (504), an upstream that answered early. A client
//! still writing then lost that answer (found from outside, with curl):
//!
//! - over HTTP/1, hyper closed the connection with the rest of the body unread; the kernel
//!   answers unread bytes with a reset, and curl, mid-write, showed "Send failure: Broken
//!   pipe" where sealgate had sent its 504 ([`drain`] after hyper's end, `serve::linger`);
//! - over h2, the request body was dropped first, so the answer went out with
//!   `RST_STREAM(NO_ERROR)` right behind it, and curl (7.88) ended with "Stream error in the
//!   HTTP/2 framing layer" without showing it ([`Lingering`] keeps the stream open until the
//!   client ends it).
//!
//! A streamed body is also [`Detachable`]: after a failed exchange the forwarder drops it, or
//! hyper's task writing to an upstream that stopped reading kept it unread, and a client that
//! writes its whole body before reading (Python `requests`) never saw the 504.
//!
//! Invariant: the bytes are never parsed or forwarded, and lingering is bounded: at most
//! [`Bounds`] (`[proxy] linger_timeout_secs` and `linger_max_bytes`, by default
//! [`LINGER_FOR`] and [`LINGER_BYTES`]) per stage (a request body's, then on h1 its
//! connection's), then the end as before; bounds with a zero in them linger not at all. A
//! client that reads the answer stops sending and closes, which ends it at once.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::io::{AsyncRead, AsyncReadExt};

pub use crate::config::{LingerBounds as Bounds, LINGER_BYTES, LINGER_FOR};

/// Reads and drops what `stream` still brings until it ends, within `bounds`.
pub async fn drain<S: AsyncRead + Unpin>(stream: &mut S, bounds: Bounds) {
    if bounds.off() {
        return;
    }
    let (mut rest, mut nowhere) = (stream.take(bounds.bytes), tokio::io::sink());
    let _ = tokio::time::timeout(bounds.wait, tokio::io::copy(&mut rest, &mut nowhere)).await;
}

/// A request body that, dropped before its end (the upstream or sealgate answered first),
/// reads and drops the rest in the background, within its [`Bounds`].
///
/// It yields the body's data only: request trailers are dropped here, the one wrapper every
/// request body passes through, so no path forwards them. A token in a trailer was neither
/// unsealed nor refused — the streamed paths passed trailers on untouched while a token of a
/// secret not allowed for the host in a header is refused (outside review), and a held body
/// dropped them already. No client sealgate serves sends request trailers (gRPC's are the
/// answer's), so scanning a second header block at the body's end would buy nothing.
pub struct Lingering(Option<Incoming>, Bounds, Option<ClientFailed>);

impl Lingering {
    /// Wraps a request body that lingers within `bounds`.
    pub fn new(body: Incoming, bounds: Bounds) -> Self {
        Lingering(Some(body), bounds, None)
    }

    /// From now on, records how the body breaks, if it does, in the flag returned. Only a
    /// streamed body needs one (a held body is read whole before anything is sent, and a
    /// break there is its own 400), so no other request pays for the flag.
    pub fn watch(&mut self) -> ClientFailed {
        self.2.get_or_insert_with(ClientFailed::default).clone()
    }
}

/// How a request body broke on the client's side, as the request's extension: the failed
/// exchange that follows is the client's doing, not the origin's failure — which is what an
/// h1 upload cut by its client was (502 `upstream_unreachable`; outside pass), while over h2
/// the reset drops the request and is a 499.
#[derive(Clone, Default)]
pub struct ClientFailed(Arc<AtomicU8>);

/// What [`ClientFailed`] says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyBreak {
    /// Unbroken (so far).
    None,
    /// The client's connection ended or reset mid-body: it gave up.
    Gone,
    /// The body's framing was refused mid-body (the h1 guard's `InvalidData`: a bad later
    /// chunk, a smuggling attempt) — a bad request, never to pass for a client gone (review).
    Malformed,
}

impl ClientFailed {
    /// What broke the body, if anything did.
    pub fn get(&self) -> BodyBreak {
        match self.0.load(Ordering::Acquire) {
            1 => BodyBreak::Gone,
            2 => BodyBreak::Malformed,
            _ => BodyBreak::None,
        }
    }

    /// Records the error the client's body ended with.
    fn note(&self, e: &hyper::Error) {
        let code = match BodyBreak::of(e) {
            BodyBreak::Malformed => 2,
            _ => 1,
        };
        self.0.store(code, Ordering::Release);
    }
}

impl BodyBreak {
    /// What the error a client's body ended with says: its framing was refused (the h1
    /// guard's `InvalidData`; hyper's `InvalidInput` for a bad trailer field, review h42b),
    /// or the client went.
    pub fn of(e: &hyper::Error) -> BodyBreak {
        use std::io::ErrorKind::{InvalidData, InvalidInput};
        let malformed = std::iter::successors(std::error::Error::source(e), |s| s.source())
            .filter_map(|s| s.downcast_ref::<std::io::Error>())
            .any(|io| matches!(io.kind(), InvalidData | InvalidInput))
            || e.is_parse();
        match malformed {
            true => BodyBreak::Malformed,
            false => BodyBreak::Gone,
        }
    }
}

impl Body for Lingering {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<bytes::Bytes>, hyper::Error>>> {
        loop {
            let Some(body) = self.0.as_mut() else {
                return Poll::Ready(None);
            };
            let polled = Pin::new(body).poll_frame(cx);
            if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
                self.0 = None; // ended or broken: nothing to linger for
            }
            if let (Poll::Ready(Some(Err(e))), Some(failed)) = (&polled, &self.2) {
                failed.note(e);
            }
            match polled {
                Poll::Ready(Some(Ok(frame))) if frame.is_trailers() => continue,
                other => return other,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.0.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.0.as_ref().map(Body::size_hint).unwrap_or_default()
    }
}

impl Drop for Lingering {
    fn drop(&mut self) {
        let bounds = self.1;
        let Some(body) = self
            .0
            .take()
            .filter(|b| !b.is_end_stream() && !bounds.off())
        else {
            return;
        };
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(drop_rest(body, bounds));
        }
    }
}

/// Polls `body` to its end, dropping its frames, within `bounds`.
async fn drop_rest(mut body: Incoming, bounds: Bounds) {
    let read = async {
        let mut left = bounds.bytes;
        while let Some(Ok(frame)) = body.frame().await {
            let n = frame.data_ref().map_or(0, |d| d.len() as u64);
            left = match left.checked_sub(n) {
                Some(l) => l,
                None => return,
            };
        }
    };
    let _ = tokio::time::timeout(bounds.wait, read).await;
}

/// A streamed request body the forwarder can take back from its upstream exchange
/// ([`Detach::drop_body`]): after a failed exchange (the upstream stopped reading and the
/// answer is a 504) the body would stay with hyper's task writing to that upstream, unread,
/// and a client that writes its whole body before reading never saw the answer. Dropped,
/// its [`Lingering`] drains the rest.
pub struct Detachable(Arc<Slot>);

/// The forwarder's hold on a [`Detachable`] body.
#[derive(Clone)]
pub struct Detach(Arc<Slot>);

/// What a [`Detachable`] and its [`Detach`] share.
///
/// Invariant: `taken_back` is set only by [`Detach::drop_body`] when it took the body, and
/// `reader_gone` only by the reader's drop; neither is cleared.
struct Slot {
    body: Mutex<Option<crate::proxy::ProxyBody>>,
    /// The forwarder took the body back ([`Detach::drop_body`]) before its reader was done.
    taken_back: AtomicBool,
    /// The reader (hyper's exchange) dropped the [`Detachable`]: read to its end, or given up.
    reader_gone: AtomicBool,
}

impl Detachable {
    /// Wraps `body`; the handle takes it back.
    pub fn new(body: crate::proxy::ProxyBody) -> (Detachable, Detach) {
        let slot = Arc::new(Slot {
            body: Mutex::new(Some(body)),
            taken_back: AtomicBool::new(false),
            reader_gone: AtomicBool::new(false),
        });
        (Detachable(slot.clone()), Detach(slot))
    }
}

/// Dropped by its reader (hyper gave up on the request: the client reset it, or it never got
/// a connection), the body goes with it, though the forwarder's [`Detach`] lives on: the
/// body's end is what the request's deferred audit line waits for (hostile review: kept alive
/// by the handle, such lines waited for the daemon's stop).
impl Drop for Detachable {
    fn drop(&mut self) {
        let body = self.0.body.lock().map(|mut b| b.take());
        self.0.reader_gone.store(true, Ordering::Release);
        drop(body); // outside the lock, as in `drop_body`
    }
}

impl Detach {
    /// True once the body is gone: read to its end and dropped by its reader, or taken back.
    pub fn is_taken(&self) -> bool {
        self.0.body.lock().map_or(true, |b| b.is_none())
    }

    /// True while the reader (hyper's exchange) still holds the body's wrapper: the exchange,
    /// and on HTTP/1 its connection, are not done with it. Once false, hyper has let go (an
    /// HTTP/1 connection may be back in its pool, serving another request).
    pub fn reader_holds(&self) -> bool {
        !self.0.reader_gone.load(Ordering::Acquire)
    }

    /// True once [`Detach::drop_body`] took the body from its reader: the upload did not end
    /// on its own.
    pub fn was_taken_back(&self) -> bool {
        self.0.taken_back.load(Ordering::Acquire)
    }

    /// Drops the body wherever it is; its reader then sees it end.
    pub fn drop_body(&self) {
        let body = self.0.body.lock().map(|mut b| b.take());
        if matches!(body, Ok(Some(_))) {
            self.0.taken_back.store(true, Ordering::Release);
        }
        drop(body); // outside the lock: dropping it may spawn the drain
    }
}

impl Body for Detachable {
    type Data = bytes::Bytes;
    type Error = crate::proxy::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<bytes::Bytes>, crate::proxy::BoxError>>> {
        let Ok(mut slot) = self.0.body.lock() else {
            return Poll::Ready(Some(Err("the request body's lock was poisoned".into())));
        };
        match slot.as_mut() {
            Some(body) => Pin::new(body).poll_frame(cx),
            None => Poll::Ready(Some(Err("the request body was taken back".into()))),
        }
    }

    /// Never true for a body taken back: hyper, asked between a chunk and its next poll,
    /// ended such an upload cleanly (a final chunk, `END_STREAM`), and the origin took a
    /// truncated request for a whole one (review h49d). Polled instead, it fails.
    fn is_end_stream(&self) -> bool {
        self.0
            .body
            .lock()
            .is_ok_and(|b| b.as_ref().is_some_and(Body::is_end_stream))
    }

    fn size_hint(&self) -> SizeHint {
        self.0
            .body
            .lock()
            .ok()
            .and_then(|b| b.as_ref().map(Body::size_hint))
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;

    /// An empty body that says when it is dropped.
    struct Flagged(Arc<AtomicBool>);

    impl Body for Flagged {
        type Data = bytes::Bytes;
        type Error = crate::proxy::BoxError;
        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<bytes::Bytes>, Self::Error>>> {
            Poll::Pending
        }
    }

    impl Drop for Flagged {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_detachable_dropped_by_its_reader_drops_the_body_though_the_handle_lives() {
        use http_body_util::BodyExt as _;
        let dropped = Arc::new(AtomicBool::new(false));
        let (reader, handle) = Detachable::new(Flagged(dropped.clone()).boxed_unsync());
        assert!(handle.reader_holds());
        drop(reader);
        assert!(
            dropped.load(Ordering::SeqCst),
            "the handle kept the body alive"
        );
        handle.drop_body(); // nothing left to take: no panic
        assert!(!handle.reader_holds() && !handle.was_taken_back());

        let dropped = Arc::new(AtomicBool::new(false));
        let (mut reader, handle) = Detachable::new(Flagged(dropped.clone()).boxed_unsync());
        handle.drop_body();
        assert!(dropped.load(Ordering::SeqCst));
        assert!(handle.reader_holds() && handle.was_taken_back());
        // Taken back, it does not say it is over (hyper would end the upload cleanly): it
        // fails when polled.
        assert!(!reader.is_end_stream());
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let polled = Pin::new(&mut reader).poll_frame(&mut cx);
        assert!(matches!(polled, Poll::Ready(Some(Err(_)))));
        drop(reader);
        assert!(!handle.reader_holds());
    }

    #[tokio::test]
    async fn drain_reads_to_the_end_and_stops_at_the_byte_bound() {
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        client.write_all(b"the rest of an upload").await.unwrap();
        drop(client);
        drain(&mut server, Bounds::DEFAULT).await;
        let mut left = Vec::new();
        assert_eq!(server.read_to_end(&mut left).await.unwrap(), 0);

        let (mut client, mut server) = tokio::io::duplex(1 << 20);
        let writer = tokio::spawn(async move {
            let chunk = vec![0u8; 1 << 20];
            let mut sent = 0u64;
            while client.write_all(&chunk).await.is_ok() {
                sent += chunk.len() as u64;
                if sent > 2 * LINGER_BYTES {
                    break;
                }
            }
            sent
        });
        drain(&mut server, Bounds::DEFAULT).await;
        drop(server);
        let sent = writer.await.unwrap();
        assert!(
            sent < LINGER_BYTES + (4 << 20),
            "read past the bound: {sent}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn drain_stops_at_the_time_bound() {
        let (_client, mut server) = tokio::io::duplex(1024);
        let started = tokio::time::Instant::now();
        drain(&mut server, Bounds::DEFAULT).await;
        assert_eq!(started.elapsed(), LINGER_FOR);
    }

    #[tokio::test(start_paused = true)]
    async fn drain_follows_configured_bounds_and_zero_turns_it_off() {
        let (_client, mut server) = tokio::io::duplex(1024);
        let started = tokio::time::Instant::now();
        let short = Bounds {
            wait: Duration::from_millis(300),
            bytes: 1,
        };
        drain(&mut server, short).await;
        assert_eq!(started.elapsed(), short.wait);
        for off in [
            Bounds {
                wait: Duration::ZERO,
                ..Bounds::DEFAULT
            },
            Bounds {
                bytes: 0,
                ..Bounds::DEFAULT
            },
        ] {
            let started = tokio::time::Instant::now();
            drain(&mut server, off).await;
            assert_eq!(started.elapsed(), Duration::ZERO);
        }

        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        client.write_all(&[0u8; 4096]).await.unwrap();
        drain(
            &mut server,
            Bounds {
                bytes: 1000,
                ..Bounds::DEFAULT
            },
        )
        .await;
        let mut left = [0u8; 8192];
        assert_eq!(server.read(&mut left).await.unwrap(), 4096 - 1000);
    }
}
