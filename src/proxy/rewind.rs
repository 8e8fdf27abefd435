//! A stream that first replays bytes already read from it, then reads on.
//!
//! Invariant: the replayed bytes are released as soon as they have all been read (a consumed
//! `Bytes` would otherwise keep its whole allocation — a head buffer — for the connection's
//! life).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Yields `prefix`, then reads from `inner`; writes go straight to `inner`.
pub struct Rewind<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Rewind<S> {
    /// Replays `prefix` before `inner`'s own bytes.
    pub fn new(prefix: Bytes, inner: S) -> Self {
        Rewind { prefix, inner }
    }

    /// The bytes not replayed yet.
    pub fn prefix(&self) -> &[u8] {
        &self.prefix
    }

    /// The bytes not replayed yet, and the stream.
    pub fn into_parts(self) -> (Bytes, S) {
        (self.prefix, self.inner)
    }

    /// The stream, read past the replay (for bytes read before the replay is set).
    pub fn inner_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Replays `prefix` next; whatever was left to replay must have been read.
    pub fn replay(&mut self, prefix: Bytes) {
        debug_assert!(self.prefix.is_empty(), "replay over unread bytes");
        self.prefix = prefix;
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(out.remaining());
            out.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            if self.prefix.is_empty() {
                self.prefix = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, out)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn rewind_replays_the_prefix_then_the_stream() {
        let (mut a, b) = tokio::io::duplex(64);
        let mut r = Rewind::new(Bytes::from_static(b"head"), b);
        tokio::io::AsyncWriteExt::write_all(&mut a, b"-tail")
            .await
            .unwrap();
        drop(a);
        let mut out = Vec::new();
        r.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, b"head-tail");
    }

    #[tokio::test]
    async fn the_prefix_allocation_is_released_once_replayed() {
        let prefix = Bytes::from(vec![7u8; 4096]);
        let mut r = Rewind::new(prefix.slice(..), tokio::io::empty());
        let mut buf = [0u8; 1024];
        for _ in 0..4 {
            assert_eq!(r.read(&mut buf).await.unwrap(), 1024);
        }
        assert!(
            prefix.is_unique(),
            "Rewind still holds the replayed allocation"
        );
        assert_eq!(r.read(&mut buf).await.unwrap(), 0);
    }
}
