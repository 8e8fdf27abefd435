//! A read-ahead layer under TLS: one `recv` for a whole TLS record instead of one per 4 KiB.
//!
//! rustls asks its transport for at most 4 KiB at a time (`READ_SIZE` in its deframer), so a
//! 16 KiB record — what a client sends for any larger body — cost five `recv` calls and five
//! passes of the TLS layer's read loop (strace, 16 KiB POST bench: 4.95 `recvfrom` per answer
//! against 1.1 for a GET). [`ReadAhead`] reads the caller's buffer directly until such a read
//! fills it; the next read then takes up to a record's worth in one call, hands the caller
//! what fits and keeps the rest.
//!
//! Invariants:
//! - Bytes come out in the order they arrived, each exactly once; EOF and errors pass through
//!   once the held bytes are out.
//! - Only bytes already received are held, at most [`BURST`] per connection, and the buffer is
//!   released as soon as it is drained: an idle connection holds none. A drained buffer is
//!   kept as this thread's one spare, so a busy connection does not allocate per record.
//! - Writes pass straight through.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// One maximal TLS record on the wire (16 KiB of payload, 256 of AEAD expansion, 5 of header),
/// rounded up.
pub const BURST: usize = 17 * 1024;

thread_local! {
    /// A drained burst buffer, kept for the next burst read on this thread.
    static SPARE: RefCell<Option<Box<[u8]>>> = const { RefCell::new(None) };
}

fn take_buffer() -> Box<[u8]> {
    SPARE
        .with(|s| s.borrow_mut().take())
        .unwrap_or_else(|| vec![0; BURST].into_boxed_slice())
}

fn give_back(buf: Box<[u8]>) {
    SPARE.with(|s| {
        let mut spare = s.borrow_mut();
        if spare.is_none() {
            *spare = Some(buf);
        }
    });
}

/// `S` with read-ahead (see the module docs).
pub struct ReadAhead<S> {
    inner: S,
    /// Received bytes not yet handed out: `buf[pos..end]`.
    held: Option<(Box<[u8]>, usize, usize)>,
    /// The last direct read filled the caller's whole buffer: more is probably waiting.
    more_waiting: bool,
}

impl<S> ReadAhead<S> {
    /// Wraps `inner`; nothing is allocated until a read fills the caller's buffer.
    pub fn new(inner: S) -> Self {
        ReadAhead {
            inner,
            held: None,
            more_waiting: false,
        }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Hands out held bytes; true if there were any.
    fn drain_into(&mut self, dst: &mut ReadBuf<'_>) -> bool {
        let Some((buf, pos, end)) = self.held.as_mut() else {
            return false;
        };
        let n = (*end - *pos).min(dst.remaining());
        dst.put_slice(&buf[*pos..*pos + n]);
        *pos += n;
        if *pos == *end {
            if let Some((buf, _, _)) = self.held.take() {
                give_back(buf);
            }
        }
        true
    }
}

impl<S: AsyncRead + Unpin> ReadAhead<S> {
    /// Reads straight into the caller's buffer, noting whether the read filled it.
    fn read_direct(&mut self, cx: &mut Context<'_>, dst: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let (before, room) = (dst.filled().len(), dst.remaining());
        ready!(Pin::new(&mut self.inner).poll_read(cx, dst))?;
        let got = dst.filled().len() - before;
        self.more_waiting = got > 0 && got == room;
        Poll::Ready(Ok(()))
    }

    /// Reads up to [`BURST`] bytes into `held`, which must be empty: the count, 0 at EOF.
    fn fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let mut buf = take_buffer();
        let mut rb = ReadBuf::new(&mut buf);
        let polled = Pin::new(&mut self.inner).poll_read(cx, &mut rb);
        let got = rb.filled().len();
        match polled {
            Poll::Ready(Ok(())) if got > 0 => {
                self.more_waiting = got == BURST;
                self.held = Some((buf, 0, got));
                Poll::Ready(Ok(got))
            }
            other => {
                give_back(buf);
                self.more_waiting = false;
                other.map(|r| r.map(|()| 0))
            }
        }
    }

    /// Reads up to [`BURST`] bytes, hands out what fits and holds the rest.
    fn read_burst(&mut self, cx: &mut Context<'_>, dst: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        ready!(self.fill(cx))?;
        self.drain_into(dst);
        Poll::Ready(Ok(()))
    }

    /// The next byte, without consuming it: waits for one to arrive (`None` at EOF). What that
    /// read brought (one burst at most) is held until it is read.
    pub async fn peek(&mut self) -> io::Result<Option<u8>> {
        std::future::poll_fn(|cx| {
            if let Some((buf, pos, _)) = &self.held {
                return Poll::Ready(Ok(Some(buf[*pos])));
            }
            let got = ready!(self.fill(cx))?;
            Poll::Ready(Ok(self
                .held
                .as_ref()
                .filter(|_| got > 0)
                .map(|(b, _, _)| b[0])))
        })
        .await
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        dst: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if dst.remaining() == 0 || this.drain_into(dst) {
            return Poll::Ready(Ok(()));
        }
        if this.more_waiting && dst.remaining() < BURST {
            this.read_burst(cx, dst)
        } else {
            this.read_direct(cx, dst)
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadAhead<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Reads everything through a `ReadAhead` in pieces of `step` bytes, as rustls would.
    async fn read_all_in_steps(data: Vec<u8>, step: usize) -> (Vec<u8>, bool) {
        let (mut tx, rx) = tokio::io::duplex(64 * 1024);
        let writer = tokio::spawn(async move {
            tx.write_all(&data).await.expect("write");
        });
        let mut ra = ReadAhead::new(rx);
        let mut out = Vec::new();
        let mut piece = vec![0; step];
        loop {
            let n = ra.read(&mut piece).await.expect("read");
            if n == 0 {
                break;
            }
            out.extend_from_slice(&piece[..n]);
        }
        writer.await.expect("writer");
        (out, ra.held.is_none())
    }

    fn bytes(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[tokio::test]
    async fn records_read_in_4k_pieces_come_out_whole_and_in_order() {
        let data = bytes(5 * BURST + 123);
        let (out, released) = read_all_in_steps(data.clone(), 4096).await;
        assert_eq!(out, data);
        assert!(released, "nothing is held once everything was read");
    }

    #[tokio::test]
    async fn peeking_consumes_nothing_and_sees_eof() {
        let (mut tx, rx) = tokio::io::duplex(1024);
        tx.write_all(b"\x16\x03\x01hello").await.expect("write");
        drop(tx);
        let mut ra = ReadAhead::new(rx);
        assert_eq!(ra.peek().await.expect("peek"), Some(0x16));
        assert_eq!(ra.peek().await.expect("peek"), Some(0x16), "still there");
        let mut all = Vec::new();
        ra.read_to_end(&mut all).await.expect("read");
        assert_eq!(all, b"\x16\x03\x01hello");
        assert!(ra.held.is_none());
        assert_eq!(ra.peek().await.expect("peek at EOF"), None);
        assert!(ra.held.is_none(), "nothing held at EOF");
    }

    #[tokio::test]
    async fn a_small_message_is_read_directly_without_a_buffer() {
        let (tx_side, rx) = tokio::io::duplex(1024);
        let mut tx_side = tx_side;
        tx_side
            .write_all(b"GET / HTTP/1.1\r\n\r\n")
            .await
            .expect("write");
        let mut ra = ReadAhead::new(rx);
        let mut piece = [0u8; 4096];
        let n = ra.read(&mut piece).await.expect("read");
        assert_eq!(&piece[..n], b"GET / HTTP/1.1\r\n\r\n");
        assert!(ra.held.is_none() && !ra.more_waiting);
    }

    #[tokio::test]
    async fn a_full_read_makes_the_next_one_a_burst_and_the_rest_is_held() {
        let data = bytes(16 * 1024 + 29);
        let (mut tx, rx) = tokio::io::duplex(64 * 1024);
        tx.write_all(&data).await.expect("write");
        let mut ra = ReadAhead::new(rx);
        let mut piece = [0u8; 4096];
        assert_eq!(ra.read(&mut piece).await.expect("read"), 4096);
        assert!(ra.more_waiting);
        assert_eq!(ra.read(&mut piece).await.expect("read"), 4096);
        let (_, pos, end) = ra.held.as_ref().expect("the burst's rest is held");
        assert_eq!(end - pos, data.len() - 2 * 4096);
        drop(tx);
        let mut rest = Vec::new();
        ra.read_to_end(&mut rest).await.expect("rest");
        assert_eq!(rest, data[2 * 4096..]);
        assert!(ra.held.is_none());
    }

    #[tokio::test]
    async fn errors_and_eof_pass_through_after_the_held_bytes() {
        let (mut tx, rx) = tokio::io::duplex(64 * 1024);
        tx.write_all(&bytes(9000)).await.expect("write");
        drop(tx);
        let mut ra = ReadAhead::new(rx);
        let mut piece = [0u8; 4096];
        let mut total = 0;
        loop {
            match ra.read(&mut piece).await.expect("read") {
                0 => break,
                n => total += n,
            }
        }
        assert_eq!(total, 9000);
        assert_eq!(ra.read(&mut piece).await.expect("eof again"), 0);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn any_stream_read_in_any_steps_is_unchanged(len in 0usize..40_000, step in 1usize..20_000) {
            let rt = tokio::runtime::Builder::new_current_thread().build().expect("rt");
            let data = bytes(len);
            let (out, released) = rt.block_on(read_all_in_steps(data.clone(), step));
            prop_assert_eq!(out, data);
            prop_assert!(released);
        }
    }
}
