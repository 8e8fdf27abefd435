//! How far a streamed request body has gone.
//!
//! `upstream.response_timeout_secs` bounds the wait for the answer's head, counted from the
//! request's last byte: an origin cannot answer an upload before it has read it, and an upload
//! that took longer than the timeout to send was cut with 504 "did not answer in time" while
//! the origin was still reading it (found from outside: a 330 s upload, the direct path fine).
//! A body that stops moving for the whole timeout still ends the wait. What went out is also
//! what the audit line's `bytes_up` reports for a streamed body (it said 0).
//!
//! Invariant: [`Progress::last`] never moves back, and is the creation time until a byte moves.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::metrics::{Counted, Tally};

/// Shared between a [`Tracked`] body and whoever waits on its request.
pub struct Progress {
    epoch: Instant,
    /// Milliseconds after `epoch` of the last data frame.
    last_ms: AtomicU64,
    bytes: AtomicU64,
    /// The last poll of the body found nothing ready: its writer (the sandbox) is what the
    /// request waits on, not the upstream (which, not reading, would not have it polled).
    waiting: AtomicBool,
    /// Why the orphan watch cut the body after its answer, if it did ([`Stall`] as u8, 0 for
    /// none).
    cut: AtomicU8,
}

/// Which side stopped a body the orphan watch cut after its answer (`forward::orphan`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stall {
    /// Nothing more could be written upstream: it was not polled.
    Upstream = 1,
    /// The sandbox sent none of it: it was polled and had nothing.
    Sandbox = 2,
}

impl Progress {
    /// Starts counting now.
    pub fn new() -> Arc<Progress> {
        Arc::new(Progress {
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            waiting: AtomicBool::new(false),
            cut: AtomicU8::new(0),
        })
    }

    /// When the body last moved (its creation, before any byte did).
    pub fn last(&self) -> Instant {
        self.epoch + Duration::from_millis(self.last_ms.load(Ordering::Acquire))
    }

    /// True while the body, last polled, had nothing ready: a wait that times out now is the
    /// sandbox's stalled upload, not a slow upstream.
    pub fn waiting_on_body(&self) -> bool {
        self.waiting.load(Ordering::Acquire)
    }

    /// Data bytes taken from the body so far.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Acquire)
    }

    /// Marks the body cut for not moving, and returns which side stalled it (the one its
    /// last poll points at: [`Progress::waiting_on_body`]).
    pub fn mark_cut(&self) -> Stall {
        let stall = if self.waiting_on_body() {
            Stall::Sandbox
        } else {
            Stall::Upstream
        };
        self.cut.store(stall as u8, Ordering::Release);
        stall
    }

    /// Why [`Progress::mark_cut`] cut the body, once it did: the request's audit line says so.
    pub fn cut(&self) -> Option<Stall> {
        match self.cut.load(Ordering::Acquire) {
            1 => Some(Stall::Upstream),
            2 => Some(Stall::Sandbox),
            _ => None,
        }
    }

    fn moved(&self, n: usize) {
        self.bytes.fetch_add(n as u64, Ordering::AcqRel);
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.fetch_max(ms, Ordering::AcqRel);
    }
}

impl Tally for Arc<Progress> {
    fn add(&self, n: usize) {
        self.moved(n);
    }

    fn polled(&self, pending: bool) {
        self.waiting.store(pending, Ordering::Release);
    }
}

/// A body that reports its data frames to a [`Progress`].
pub type Tracked<B> = Counted<B, Arc<Progress>>;

/// When a wait that began at `started` for an answer to a request whose body is tracked by
/// `progress` (if streamed) times out: `timeout` after the later of the two.
pub fn deadline(started: Instant, progress: Option<&Progress>, timeout: Duration) -> Instant {
    progress.map_or(started, |p| p.last().max(started)) + timeout
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body::Frame;
    use http_body_util::{BodyExt, StreamBody};

    #[tokio::test]
    async fn the_deadline_moves_with_the_body_and_bytes_are_counted() {
        let progress = Progress::new();
        let started = Instant::now();
        let timeout = Duration::from_millis(200);
        let first = deadline(started, Some(&progress), timeout);
        let frames = futures_util::stream::iter(vec![
            Ok::<_, std::io::Error>(Frame::data(Bytes::from_static(b"abc"))),
            Ok(Frame::data(Bytes::from_static(b"de"))),
        ]);
        let mut body = Tracked::new(StreamBody::new(frames), progress.clone());
        tokio::time::sleep(Duration::from_millis(30)).await;
        while body.frame().await.is_some() {}
        assert_eq!(progress.bytes(), 5);
        let later = deadline(started, Some(&progress), timeout);
        assert!(later >= first + Duration::from_millis(20), "it moved");
        assert_eq!(deadline(started, None, timeout), started + timeout);
    }
}
