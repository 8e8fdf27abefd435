//! Request bodies an HTTP/1.1 client sent chunked (no announced length), read ahead so that
//! the origin gets an exact `Content-Length` when the body is small and prompt.
//!
//! Why (2026-12-07, outside interop pass h41a): sealgate speaks h2 to an origin that offers
//! it, and a chunked HTTP/1.1 upload then reached it without a length; lighttpd's CGI answered
//! 411 to every such upload, which worked direct (lighttpd de-chunks HTTP/1.1 itself, and
//! nginx as a reverse proxy reads whole request bodies by default for the same reason).
//!
//! Invariants:
//! - Bytes come out in the order they arrived, each exactly once, then the rest of the body.
//! - At most [`Bounds::max`] bytes (and one frame) are read ahead, for at most [`WAIT`] from
//!   the first poll. Once more than [`Bounds::free`] are held, all of them are reserved in
//!   [`super::whole_bodies::BUDGET`] and the sandbox's share of it (in steps of [`STEP`], as
//!   they come), for as long as they are held; when either has no room the read stops there,
//!   holding at most `free` and one frame unreserved (the budget decides framing, it never
//!   refuses a body). A body that did not end within those bounds streams on from where it
//!   is, without a length, as every such body did before.
//! - What is held is its data in [`Pieces`], not one buffer per frame: a body sent in
//!   one-byte chunks costs its bytes, not 32 bytes of bookkeeping per byte (review h42b).
//! - A body read to its end reports its exact length ([`Body::size_hint`]), so hyper's
//!   client sends it with a `Content-Length` on either protocol.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;

use super::pieces::Pieces;
use super::whole_bodies::{Reserved, Share};

/// The longest a body is read ahead before its head goes upstream: the same second a small
/// answer is waited for (`forward::answer::WHOLE_ANSWER_WAIT`). A client that sends the rest later
/// (a slow link, a long-lived upload) has its request sent after this, streamed.
pub const WAIT: Duration = Duration::from_secs(1);

/// The steps in which what is read past [`Bounds::free`] is reserved.
pub const STEP: u64 = 64 * 1024;

/// How much of a body is read ahead.
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    /// Read without a reservation (bodies this small are held whole anyway).
    pub free: u64,
    /// The most read ahead (and one frame).
    pub max: u64,
}

/// A request body with what was read of it ahead.
pub struct Ahead<B> {
    /// Data read ahead, not yet handed on.
    read: Pieces,
    /// The body's unread part; `None` once its end was read.
    rest: Option<B>,
    /// The budget's hold on `read` (none within `free`), until it is handed on.
    reserved: Reserved,
}

impl<B> Ahead<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    /// `body`, with nothing read ahead.
    pub fn new(body: B) -> Self {
        Ahead {
            read: Pieces::default(),
            rest: Some(body),
            reserved: Reserved::none(),
        }
    }

    /// Reads ahead until the body ends, more than `bounds.max` bytes are in, [`WAIT`] has
    /// passed or the budget (or the sandbox's `share` of it) has no room, whichever comes
    /// first. Trailers are dropped.
    ///
    /// # Errors
    /// The body's own error (it broke off); what was read is then dropped.
    pub async fn read_ahead(&mut self, bounds: Bounds, share: &Share) -> Result<(), B::Error> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if self.read.len() > bounds.max || !self.reserve(bounds, share) {
                break;
            }
            let Some(rest) = self.rest.as_mut() else {
                break; // its end was read
            };
            match tokio::time::timeout_at(deadline, rest.frame()).await {
                Err(_) => break,
                Ok(None) => self.rest = None,
                Ok(Some(frame)) => {
                    if let Ok(data) = frame?.into_data() {
                        self.read.push(data);
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether the budget holds what is read: all of it, in steps of [`STEP`], once more
    /// than `bounds.free` is.
    fn reserve(&mut self, bounds: Bounds, share: &Share) -> bool {
        let held = self.read.len();
        held <= bounds.free || self.reserved.grow_to(held.next_multiple_of(STEP), share)
    }

    /// Whether the body's end was read: every byte of it not yet handed on is in memory.
    pub fn is_whole(&self) -> bool {
        self.rest.is_none()
    }

    /// The budget's hold on the bytes read, for whoever keeps them (see
    /// [`Reserved::holding`]; none if they needed none).
    pub fn take_reserved(&mut self) -> Reserved {
        std::mem::replace(&mut self.reserved, Reserved::none())
    }

    /// The unread part, if the body's end was not read yet.
    pub fn rest_mut(&mut self) -> Option<&mut B> {
        self.rest.as_mut()
    }
}

impl<B> Body for Ahead<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        if let Some(data) = self.read.pop_front() {
            if self.read.is_empty() {
                self.take_reserved(); // handed on: the reservation ends with the held bytes
            }
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        match self.rest.as_mut() {
            Some(rest) => Pin::new(rest).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.read.is_empty() && self.rest.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let Some(rest) = self.rest.as_ref() else {
            return SizeHint::with_exact(self.read.len());
        };
        let rest = rest.size_hint();
        let mut hint = SizeHint::new();
        let held = self.read.len();
        hint.set_lower(rest.lower().saturating_add(held));
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper.saturating_add(held));
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    type Frames = Vec<Result<Frame<Bytes>, std::io::Error>>;

    /// sealgate's own bounds (`forward::BUFFER_BODY_MAX`, `forward::WHOLE_BODY_MAX`).
    const BOUNDS: Bounds = Bounds {
        free: 64 * 1024,
        max: 1024 * 1024,
    };
    const WHOLE_BODY_MAX: u64 = BOUNDS.max;

    fn stream(frames: Frames) -> impl Body<Data = Bytes, Error = std::io::Error> + Unpin {
        StreamBody::new(futures_util::stream::iter(frames))
    }

    fn data(n: usize, b: u8) -> Result<Frame<Bytes>, std::io::Error> {
        Ok(Frame::data(Bytes::from(vec![b; n])))
    }

    /// A prompt body of unknown length is read to its end and then reports its exact length;
    /// its bytes come out once, in order, without the trailers.
    #[tokio::test]
    async fn a_prompt_body_is_read_whole_and_knows_its_length() {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-t", http::HeaderValue::from_static("1"));
        let frames = vec![
            data(3, b'a'),
            data(0, b'-'),
            data(4, b'b'),
            Ok(Frame::trailers(trailers)),
        ];
        let mut ahead = Ahead::new(stream(frames));
        assert_eq!(ahead.size_hint().exact(), None);
        ahead.read_ahead(BOUNDS, &Share::default()).await.unwrap();
        assert!(ahead.is_whole());
        assert_eq!(ahead.size_hint().exact(), Some(7));
        assert_eq!(
            ahead.take_reserved().bytes(),
            0,
            "small bodies take no budget"
        );
        let got = ahead.collect().await.unwrap().to_bytes();
        assert_eq!(&got[..], b"aaabbbb");
    }

    /// Past `WHOLE_BODY_MAX` the read stops and the body streams on: every byte once, in
    /// order, and no length is claimed.
    #[tokio::test]
    async fn a_large_body_streams_on_from_where_the_read_stopped() {
        let _serial = super::super::whole_bodies::SERIAL.lock().await;
        let frames: Frames = (0..20u8).map(|i| data(100_000, i)).collect();
        let mut ahead = Ahead::new(stream(frames));
        ahead.read_ahead(BOUNDS, &Share::default()).await.unwrap();
        assert!(!ahead.is_whole());
        assert_eq!(ahead.size_hint().exact(), None);
        assert!(ahead.size_hint().lower() > WHOLE_BODY_MAX);
        let got = ahead.collect().await.unwrap().to_bytes();
        assert_eq!(got.len(), 2_000_000);
        assert!(got
            .chunks(100_000)
            .enumerate()
            .all(|(i, c)| c.iter().all(|b| *b == i as u8)));
    }

    /// A body that pauses past [`WAIT`] streams from where it is (the read does not wait for
    /// its end), and its error, met while reading ahead, is the read's.
    #[tokio::test(start_paused = true)]
    async fn a_slow_body_streams_after_the_wait_and_a_broken_one_fails_the_read() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
        let rx = futures_util::stream::unfold(rx, |mut rx| async { Some((rx.recv().await?, rx)) });
        let mut ahead = Ahead::new(StreamBody::new(Box::pin(rx)));
        tx.try_send(data(5, b'a')).unwrap();
        ahead.read_ahead(BOUNDS, &Share::default()).await.unwrap();
        assert!(!ahead.is_whole());
        assert!(!ahead.is_end_stream());
        tx.try_send(data(2, b'b')).unwrap();
        drop(tx);
        let got = ahead.collect().await.unwrap().to_bytes();
        assert_eq!(&got[..], b"aaaaabb");

        let broken = vec![data(5, b'a'), Err(std::io::Error::other("cut"))];
        let mut ahead = Ahead::new(stream(broken));
        assert!(ahead.read_ahead(BOUNDS, &Share::default()).await.is_err());
    }

    /// A body in one-byte chunks is held as its bytes in a few pieces, not one buffer per
    /// chunk (review h42b: 65,537 such chunks held 4 MiB of bookkeeping for 64 KiB of data).
    #[tokio::test]
    async fn one_byte_chunks_are_held_as_their_bytes() {
        let frames: Frames = (0..60_000).map(|i| data(1, (i % 251) as u8)).collect();
        let mut ahead = Ahead::new(stream(frames));
        ahead.read_ahead(BOUNDS, &Share::default()).await.unwrap();
        assert_eq!(ahead.size_hint().exact(), Some(60_000));
        let pieces = std::mem::take(&mut ahead.read).into_vec();
        assert!(pieces.len() <= 4, "{} pieces", pieces.len());
        let all = pieces.concat();
        assert!(all.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8));
    }

    /// Past `BUFFER_BODY_MAX` the read holds a reservation of the budget, which goes back when
    /// the bytes are handed on (or with whoever took it).
    #[tokio::test]
    async fn the_budget_holds_what_is_read_past_64_kib_until_it_is_handed_on() {
        use super::super::whole_bodies::{reserved, SERIAL};
        let _serial = SERIAL.lock().await;
        let start = reserved();
        let frames: Frames = (0..4u8).map(|i| data(50_000, i)).collect();
        let mut ahead = Ahead::new(stream(frames));
        ahead.read_ahead(BOUNDS, &Share::default()).await.unwrap();
        assert!(ahead.is_whole());
        assert_eq!(
            reserved(),
            start + 256 * 1024,
            "200,000 bytes, in steps of 64 KiB"
        );
        let got = ahead.collect().await.unwrap().to_bytes();
        assert_eq!(got.len(), 200_000);
        assert_eq!(reserved(), start, "handed on");

        let frames: Frames = (0..4u8).map(|i| data(50_000, i)).collect();
        let mut ahead = Ahead::new(stream(frames));
        ahead.read_ahead(BOUNDS, &Share::default()).await.unwrap();
        let taken = ahead.take_reserved();
        drop(ahead);
        assert_eq!(reserved(), start + 256 * 1024, "with whoever took it");
        drop(taken);
        assert_eq!(reserved(), start);
    }
}
