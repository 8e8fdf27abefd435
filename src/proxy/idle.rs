//! Idle tracking for intercepted connections: an I/O wrapper that stamps the last time bytes
//! moved, a watchdog that fires once a connection has been quiet for the idle timeout with
//! no request in flight, and one that fires once an HTTP/1 connection may be parked
//! ([`Activity::settled`]).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Shared activity state of one connection.
pub struct Activity {
    epoch: Instant,
    last_ms: AtomicU64,
    in_flight: AtomicUsize,
    /// Response bodies handed to the server and not yet ended or dropped.
    bodies: AtomicUsize,
    /// The last write-side call on the stream was a flush that completed: nothing the server
    /// wrote is still buffered above the socket's own buffers.
    write_settled: AtomicBool,
}

impl Activity {
    /// Fresh state, active now.
    pub fn new() -> Arc<Self> {
        Arc::new(Activity {
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            bodies: AtomicUsize::new(0),
            write_settled: AtomicBool::new(true),
        })
    }

    fn touch(&self) {
        let now = Instant::now();
        super::spin::moved(now);
        let ms = now.saturating_duration_since(self.epoch).as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Marks a request in flight until the guard drops.
    pub fn request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    /// Marks a response body open until the guard drops (see [`Activity::settled`]).
    pub fn body(self: &Arc<Self>) -> OpenBody {
        self.bodies.fetch_add(1, Ordering::AcqRel);
        OpenBody(self.clone())
    }

    fn quiet_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(last)
    }

    /// Resolves once the connection has been idle (no bytes, no request) for `limit`.
    pub async fn idle(self: Arc<Self>, limit: Duration) {
        loop {
            let quiet = self.quiet_for();
            let busy = self.in_flight.load(Ordering::Acquire) > 0;
            if !busy && quiet >= limit {
                return;
            }
            let wait = if busy { limit } else { limit - quiet };
            tokio::time::sleep(wait.max(Duration::from_millis(50))).await;
        }
    }

    /// Resolves once the connection is settled: quiet for `after`, no request in flight, no
    /// response body open, every write flushed, and `between_messages()` true (the request
    /// side ended at a message boundary). Checked at most every `after` while unsettled.
    pub async fn settled(self: Arc<Self>, after: Duration, between_messages: impl Fn() -> bool) {
        loop {
            let quiet = self.quiet_for();
            let idle = self.in_flight.load(Ordering::Acquire) == 0
                && self.bodies.load(Ordering::Acquire) == 0
                && self.write_settled.load(Ordering::Acquire);
            if idle && quiet >= after && between_messages() {
                return;
            }
            let wait = if idle && quiet < after {
                after - quiet
            } else {
                after
            };
            tokio::time::sleep(wait.max(Duration::from_millis(10))).await;
        }
    }
}

/// Decrements the open-body count on drop.
pub struct OpenBody(Arc<Activity>);

impl Drop for OpenBody {
    fn drop(&mut self) {
        self.0.touch();
        self.0.bodies.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Decrements the in-flight count on drop.
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

pin_project_lite::pin_project! {
    /// Wraps a stream and stamps [`Activity`] whenever bytes move.
    pub struct Tracked<S> {
        #[pin]
        inner: S,
        activity: Arc<Activity>,
    }
}

impl<S> Tracked<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, activity: Arc<Activity>) -> Self {
        activity.touch();
        Tracked { inner, activity }
    }

    /// The wrapped stream.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }
}

impl<S: AsyncRead> AsyncRead for Tracked<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let r = this.inner.poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.touch();
        }
        r
    }
}

impl<S: AsyncWrite> AsyncWrite for Tracked<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        this.activity.write_settled.store(false, Ordering::Relaxed);
        let r = this.inner.poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        this.activity.write_settled.store(false, Ordering::Relaxed);
        let r = this.inner.poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        r
    }

    /// Passed through, so hyper's h1 server queues body chunks for a vectored write instead of
    /// copying them into its header buffer, a `Vec` that keeps its largest size for the life
    /// of the connection.
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let r = this.inner.poll_flush(cx);
        if matches!(r, Poll::Ready(Ok(()))) {
            this.activity.write_settled.store(true, Ordering::Relaxed);
        }
        r
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;

    const AFTER: Duration = Duration::from_millis(40);

    async fn settles_within(a: &Arc<Activity>, between: bool, limit: Duration) -> bool {
        tokio::time::timeout(limit, a.clone().settled(AFTER, move || between))
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn settled_waits_for_quiet_requests_bodies_flushes_and_a_message_boundary() {
        let a = Activity::new();
        assert!(
            settles_within(&a, true, AFTER * 4).await,
            "a quiet connection"
        );
        assert!(!settles_within(&a, false, AFTER * 4).await, "mid-message");
        let req = a.request();
        assert!(
            !settles_within(&a, true, AFTER * 4).await,
            "request in flight"
        );
        drop(req);
        let body = a.body();
        assert!(!settles_within(&a, true, AFTER * 4).await, "body open");
        drop(body);
        let (client, _server) = tokio::io::duplex(4);
        let mut t = Tracked::new(client, a.clone());
        t.write_all(b"abcd").await.unwrap();
        assert!(
            !settles_within(&a, true, AFTER * 4).await,
            "write not flushed"
        );
        t.flush().await.unwrap();
        assert!(settles_within(&a, true, AFTER * 4).await, "all flushed");
    }
}
