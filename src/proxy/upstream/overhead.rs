//! What an HTTP/1 origin may send besides its answers' data: bounded per answer.
//!
//! hyper's HTTP/1 client bounds a response head (`upstream.max_response_header_bytes`), chunk
//! extensions and trailers, but not a chunk's size line: an origin that answers `200` and then
//! sends `0000…` (or spaces) for ever in place of a chunk size has the client parse at full
//! speed while it produces no byte the sandbox reads, so no back-pressure ever slows it. 200
//! such answers of one sandbox took another sandbox's p99 from 13 ms to 4.9 s (outside pass,
//! 2026-12-06). Endless `1xx` heads before an answer are the same kind of bytes.
//!
//! Invariant: on one connection, the plaintext read since an answer's head arrived, beyond the
//! data that answer delivered, stays within [`FREE`] plus [`PER_DATA_BYTE`] times that data,
//! and what is read between an answer's end and the next head within [`FREE`] alone (a big
//! answer's allowance bought a 3.4 GB flood of `100` heads before the next one on a reused
//! connection: re-check); the read past it fails, which ends the answer in an error and the
//! connection with it. A
//! legitimate chunked answer costs a few bytes per chunk (`a\r\n…\r\n`): one-byte chunks are
//! five bytes of framing per byte of data, under the ratio.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes an answer may bring besides its data, whatever its data: the next head (at most
/// twice `max_response_header_bytes`), chunk lines, a final chunk and trailers.
pub const FREE: u64 = 1 << 20;
/// Framing bytes allowed per byte of data on top of [`FREE`].
pub const PER_DATA_BYTE: u64 = 8;

/// One connection's counts, shared by its reader ([`Counted`]) and its answers' bodies.
#[derive(Default, Debug)]
pub struct Overhead {
    read: AtomicU64,
    data: AtomicU64,
    read_mark: AtomicU64,
    data_mark: AtomicU64,
    /// The connection was upgraded (WebSocket): what follows is the relay's, not HTTP.
    upgraded: AtomicBool,
    /// The origin, `host:port`, for the warning when the bound is met.
    origin: Box<str>,
    /// When the connection is to be retired ([`super::keep_alive`]).
    pub keep_alive: super::keep_alive::Idle,
    /// Ends the connection from outside ([`super::cut`]): checked by its [`Counted`] stream.
    pub cut: super::cut::Cut,
}

impl Overhead {
    /// The counts of a new connection to `origin` (`host:port`).
    pub fn to(origin: String) -> Arc<Overhead> {
        Arc::new(Overhead {
            origin: origin.into_boxed_str(),
            ..Overhead::default()
        })
    }

    /// An answer's head arrived, or its body ended: what follows is counted afresh.
    pub fn answer_began(&self) {
        self.data_mark
            .store(self.data.load(Ordering::Acquire), Ordering::Release);
        self.read_mark
            .store(self.read.load(Ordering::Acquire), Ordering::Release);
    }

    /// The answer was `101 Switching Protocols`: the connection's bytes are no longer HTTP
    /// framing, and are never refused here.
    pub fn upgraded(&self) {
        self.upgraded.store(true, Ordering::Release);
    }

    /// The answer delivered `n` bytes of data.
    pub fn delivered(&self, n: usize) {
        self.data.fetch_add(n as u64, Ordering::AcqRel);
    }

    /// `n` more plaintext bytes were read.
    ///
    /// # Errors
    /// `InvalidData` once the answer's framing is past its allowance.
    fn read(&self, n: usize) -> io::Result<()> {
        if self.upgraded.load(Ordering::Acquire) {
            return Ok(());
        }
        let read = self.read.fetch_add(n as u64, Ordering::AcqRel) + n as u64;
        let read = read.saturating_sub(self.read_mark.load(Ordering::Acquire));
        let data = (self.data.load(Ordering::Acquire))
            .saturating_sub(self.data_mark.load(Ordering::Acquire));
        let allowed = FREE.saturating_add(data.saturating_mul(PER_DATA_BYTE));
        if read.saturating_sub(data) <= allowed {
            return Ok(());
        }
        // The answer's audit line went with its head; this says why it was cut.
        tracing::warn!(
            origin = %self.origin,
            framing = read.saturating_sub(data),
            data,
            "an HTTP/1 upstream sent framing without data past its allowance (a chunk size \
             without end, interim heads for ever): its answer and connection were cut"
        );
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "the upstream sent {} bytes besides {data} bytes of answer data (chunk lines \
                 without end?): connection closed",
                read.saturating_sub(data)
            ),
        ))
    }
}

/// A stream whose reads count into an [`Overhead`].
pub struct Counted<S> {
    inner: S,
    overhead: Arc<Overhead>,
}

impl<S> Counted<S> {
    /// Counts what `inner` reads into `overhead`.
    pub fn new(inner: S, overhead: Arc<Overhead>) -> Counted<S> {
        Counted { inner, overhead }
    }

    /// The counts (for the connection's answers).
    pub fn overhead(&self) -> Arc<Overhead> {
        self.overhead.clone()
    }

    /// The stream it wraps.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.overhead.cut.check()?;
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            self.overhead.read(buf.filled().len() - before)?;
        }
        self.overhead.cut.park(cx, polled)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.overhead.cut.check()?;
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.overhead.cut.park(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.overhead.cut.check()?;
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.overhead.cut.park(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.overhead.cut.check()?;
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.overhead.cut.park(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// What a connection puts in each of its answers' extensions (hyper-util's `Connected::extra`).
#[derive(Clone, Debug)]
pub struct OverheadOf(pub Arc<Overhead>);

impl OverheadOf {
    /// Ends the answer's connection ([`super::cut`]): its next I/O call fails.
    pub fn cut_connection(&self) {
        self.0.cut.cut();
    }
}

/// An answer's body counting its data into its connection's [`Overhead`]; its size hint and
/// end are the inner body's (an exact length stays exact: `map_frame` dropped it, and answers
/// of known length lost their `Content-Length`).
pub struct DataCounted<B> {
    inner: B,
    overhead: Arc<Overhead>,
}

impl<B> DataCounted<B> {
    /// Counts `inner`'s data into `overhead`, whose allowance starts now.
    pub fn new(inner: B, overhead: Arc<Overhead>) -> DataCounted<B> {
        overhead.answer_began();
        DataCounted { inner, overhead }
    }
}

impl<B> http_body::Body for DataCounted<B>
where
    B: http_body::Body<Data = bytes::Bytes> + Unpin,
{
    type Data = bytes::Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.overhead.delivered(data.len());
            }
        }
        // The next answer's interim heads get no credit from this one's data. Its end is seen
        // by `is_end_stream` (a reader that knows the length never polls for the `None`).
        let ended = matches!(polled, Poll::Ready(None)) || self.inner.is_end_stream();
        if ended && polled.is_ready() {
            self.overhead.answer_began();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_is_allowed_in_proportion_to_data_and_no_more() {
        let o = Overhead::default();
        o.read(4096).unwrap(); // a head
        o.answer_began();
        // One-byte chunks: `1\r\nX\r\n`, 6 bytes read per byte delivered.
        for _ in 0..100_000 {
            o.read(6).unwrap();
            o.delivered(1);
        }
        // Then size lines without end.
        let mut refused = None;
        for i in 0..10_000u64 {
            if let Err(e) = o.read(4096) {
                refused = Some((i, e));
                break;
            }
        }
        let (i, e) = refused.expect("refused");
        // 100 KB of data earned 800 KB besides the free MiB; 500 KB were used.
        assert!((300..=340).contains(&i), "{i}");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("chunk lines without end"), "{e}");
    }

    #[test]
    fn each_answer_starts_afresh() {
        let o = Overhead::default();
        o.answer_began();
        o.read(FREE as usize).unwrap();
        o.answer_began();
        o.read(FREE as usize).unwrap();
        assert!(o.read(1).is_err(), "the second answer's allowance is spent");
        o.upgraded();
        o.read(FREE as usize * 4).unwrap();
    }

    /// A big answer's allowance ends with its body: the `1xx` heads before the next answer on
    /// the same connection have the free allowance only.
    #[tokio::test]
    async fn a_big_answer_buys_nothing_for_the_next() {
        use http_body_util::BodyExt as _;
        let o = Arc::new(Overhead::default());
        let chunk = bytes::Bytes::from(vec![b'x'; 64 << 10]);
        let frames = (0..64)
            .map(move |_| Ok::<_, std::convert::Infallible>(http_body::Frame::data(chunk.clone())));
        let big = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
        let mut body = DataCounted::new(big, o.clone());
        // As hyper does: a piece read, then delivered, then the next.
        for _ in 0..64 {
            o.read((64 << 10) + 8).unwrap();
            assert!(body.frame().await.is_some());
        }
        assert!(body.frame().await.is_none());
        o.read(FREE as usize).unwrap();
        assert!(
            o.read(4096).is_err(),
            "a flood before the next head is cut at FREE"
        );
    }
}
