//! Makes an HTTP/2 server's GOAWAY visible per request: streams opened after it are refused.
//!
//! Why: after a server sends GOAWAY (nginx does after `keepalive_requests`, 1,000 by default),
//! RFC 9113 §6.8 says the client must open no new stream there, and the server ignores any
//! stream above the frame's last-stream-id. The h2 crate (0.4) still opens streams on such a
//! connection (hyper#2500), and hyper's pool still hands it out until it closes. Those
//! requests were never processed, but they fail only when the server closes the connection,
//! as a "broken pipe" that cannot be told apart from a request cut off mid-way — so under
//! load through nginx about 1 % of requests came back 502 (see ARCHITECTURE.md).
//!
//! How: this wrapper sits between TLS and h2 on every upstream connection that negotiated
//! h2. It follows frame boundaries in both directions (9-byte frame headers, the client's
//! 24-byte preface). When the server's GOAWAY arrives it remembers the last-stream-id; every
//! stream the client opens afterwards above that id gets a synthetic
//! `RST_STREAM(REFUSED_STREAM)` inserted into what h2 reads, at the next frame boundary
//! (never inside a header block). REFUSED_STREAM is h2's "not processed, safe to retry"
//! signal, which [`crate::proxy::forward`] retries once on a fresh connection. Streams that
//! were already open above the id are failed by h2 itself (a remote GOAWAY error).
//!
//! A write that fails because the server closed (a server that closes with our bytes unread
//! sends a reset) is reported to h2 as done, and later writes are dropped: h2 reads on, sees
//! the GOAWAY first and fails only the streams above its id, as not processed. Failing the
//! write instead made h2 fail every stream with an I/O error that does not say "unprocessed".
//!
//! Retiring a connection (see [`super::limits`]): once an origin's per-connection stream limit
//! is known, the wrapper retires the connection a quarter below it by handing h2 a synthetic
//! `GOAWAY(NO_ERROR)` whose last-stream-id is the largest possible. h2 then opens no new
//! stream there (hyper sends the next request to another connection, unsent), fails none of
//! the streams already opened — the server has not gone away, so they all finish — and closes
//! the connection once they have. The real server's graceful GOAWAYs are what the limits are
//! learned from.
//!
//! Rules: bytes are passed through unchanged in both directions; only whole synthetic frames
//! are added on the read side: refusals only for streams the server has said it will not
//! process, and the retiring GOAWAY only before any GOAWAY of the server reached h2 (a later
//! GOAWAY may not raise the id, RFC 9113 §6.8); writes are dropped only after the server reset
//! or closed the connection.
//!
//! # Memory usage
//! A fixed-size state per connection plus one 4-byte stream id per refused stream while it
//! waits for a boundary; reads are never buffered (a read is only shortened to end at a
//! frame boundary while a synthetic frame waits).

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::limits::StreamLimits;

const PREFACE_LEN: usize = 24;
const HEAD_LEN: usize = 9;
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const END_STREAM: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const PUSH_PROMISE: u8 = 0x5;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;
const REFUSED_STREAM: u32 = 0x7;
const NO_ERROR: u32 = 0x0;
/// The largest stream id: a GOAWAY naming it refuses no stream.
const MAX_STREAM: u32 = 0x7fff_ffff;

/// A frame header seen by [`Frames`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Head {
    kind: u8,
    flags: u8,
    stream: u32,
}

/// Follows frame boundaries in one direction. Pure: fed bytes, it reports frame heads and
/// the first 4 payload bytes of GOAWAY frames (the last-stream-id).
#[derive(Debug)]
struct Frames {
    /// Bytes of the client preface still to skip (write side only).
    preface_left: usize,
    head: [u8; HEAD_LEN],
    head_len: usize,
    payload_left: usize,
    current: Option<Head>,
    /// Inside a header block (HEADERS/PUSH_PROMISE without END_HEADERS, then CONTINUATIONs):
    /// no other frame may be inserted here.
    in_header_block: bool,
    goaway: [u8; 8],
    goaway_len: usize,
}

/// What [`Frames::feed`] saw.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Frame(Head),
    GoAway { last_stream: u32, code: u32 },
}

impl Frames {
    fn new(preface: bool) -> Frames {
        Frames {
            preface_left: if preface { PREFACE_LEN } else { 0 },
            head: [0; HEAD_LEN],
            head_len: 0,
            payload_left: 0,
            current: None,
            in_header_block: false,
            goaway: [0; 8],
            goaway_len: 0,
        }
    }

    /// True between two frames and outside a header block: a whole frame may be inserted.
    fn at_boundary(&self) -> bool {
        self.preface_left == 0
            && self.head_len == 0
            && self.payload_left == 0
            && !self.in_header_block
    }

    /// How many bytes may be read without passing a possible insertion point: the rest of
    /// the frame header being read, else the rest of the current payload, else (between two
    /// frames of a header block) the next frame's header. Never 0.
    fn until_boundary(&self) -> usize {
        if self.head_len > 0 {
            HEAD_LEN - self.head_len
        } else if self.preface_left + self.payload_left > 0 {
            self.preface_left + self.payload_left
        } else {
            HEAD_LEN
        }
    }

    fn feed(&mut self, mut bytes: &[u8], seen: &mut Vec<Seen>) {
        while !bytes.is_empty() {
            if self.preface_left > 0 {
                let n = self.preface_left.min(bytes.len());
                self.preface_left -= n;
                bytes = &bytes[n..];
            } else if self.payload_left > 0 {
                let n = self.payload_left.min(bytes.len());
                self.payload(&bytes[..n], seen);
                self.payload_left -= n;
                bytes = &bytes[n..];
            } else {
                let n = (HEAD_LEN - self.head_len).min(bytes.len());
                self.head[self.head_len..self.head_len + n].copy_from_slice(&bytes[..n]);
                self.head_len += n;
                bytes = &bytes[n..];
                if self.head_len == HEAD_LEN {
                    self.head_done(seen);
                }
            }
        }
    }

    fn head_done(&mut self, seen: &mut Vec<Seen>) {
        let h = &self.head;
        let len = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
        let head = Head {
            kind: h[3],
            flags: h[4],
            stream: u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff,
        };
        self.head_len = 0;
        self.payload_left = len;
        self.current = Some(head);
        self.goaway_len = 0;
        match head.kind {
            HEADERS | PUSH_PROMISE | CONTINUATION => {
                self.in_header_block = head.flags & END_HEADERS == 0;
            }
            _ => {}
        }
        seen.push(Seen::Frame(head));
    }

    /// Collects a GOAWAY's last-stream-id and error code (its first 8 payload bytes).
    fn payload(&mut self, bytes: &[u8], seen: &mut Vec<Seen>) {
        if self.current.map(|h| h.kind) != Some(GOAWAY) || self.goaway_len == 8 {
            return;
        }
        let n = (8 - self.goaway_len).min(bytes.len());
        self.goaway[self.goaway_len..self.goaway_len + n].copy_from_slice(&bytes[..n]);
        self.goaway_len += n;
        if self.goaway_len == 8 {
            let [a, b, c, d, e, f, g, h] = self.goaway;
            let last_stream = u32::from_be_bytes([a, b, c, d]) & 0x7fff_ffff;
            let code = u32::from_be_bytes([e, f, g, h]);
            seen.push(Seen::GoAway { last_stream, code });
        }
    }
}

/// The synthetic `RST_STREAM(REFUSED_STREAM)` frame for `stream`.
fn refused_frame(stream: u32) -> [u8; 13] {
    let mut f = [0u8; 13];
    f[2] = 4; // payload length
    f[3] = RST_STREAM;
    f[5..9].copy_from_slice(&stream.to_be_bytes());
    f[9..13].copy_from_slice(&REFUSED_STREAM.to_be_bytes());
    f
}

/// The synthetic `GOAWAY(MAX_STREAM, NO_ERROR)` that retires a connection.
fn retiring_frame() -> [u8; 17] {
    let mut f = [0u8; 17];
    f[2] = 8; // payload length
    f[3] = GOAWAY;
    f[9..13].copy_from_slice(&MAX_STREAM.to_be_bytes());
    f[13..17].copy_from_slice(&NO_ERROR.to_be_bytes());
    f
}

/// A synthetic frame being handed to h2, and how much of it is out.
#[derive(Debug)]
struct Synthetic {
    bytes: [u8; 17],
    len: usize,
    pos: usize,
}

impl Synthetic {
    fn new(frame: &[u8]) -> Synthetic {
        let mut bytes = [0u8; 17];
        bytes[..frame.len()].copy_from_slice(frame);
        Synthetic {
            bytes,
            len: frame.len(),
            pos: 0,
        }
    }
}

/// Where the connection stands on retiring (see [`super::limits`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retiring {
    /// Not decided (or no limit known for the origin).
    No,
    /// The limit is reached: the retiring GOAWAY waits for a frame boundary.
    Due,
    /// Handed to h2, or given up because the server's own GOAWAY came first.
    Done,
}

/// The origin's learned limits, and this connection's key in them.
#[derive(Debug)]
struct Learner {
    limits: Arc<StreamLimits>,
    origin: Box<str>,
    /// Retire after this many streams (a limit is known).
    retire_after: Option<u32>,
}

/// The connection-side state: what was opened, what the server said, what to refuse.
#[derive(Debug)]
struct Refusals {
    reads: Frames,
    writes: Frames,
    /// The last-stream-id of the server's GOAWAY, once one arrived.
    last_stream: Option<u32>,
    /// Highest stream id the client opened so far (new streams have increasing ids).
    highest_opened: u32,
    /// Streams to refuse, oldest first.
    queue: VecDeque<u32>,
    /// The synthetic frame being handed to h2.
    out: Option<Synthetic>,
    /// Learns the origin's per-connection limit and retires the connection below it.
    learner: Option<Learner>,
    /// The server's count was reported (once per connection).
    learned: bool,
    /// The highest stream id the server ended (END_STREAM on HEADERS or DATA, or RST_STREAM):
    /// a GOAWAY naming a stream above it came while that stream still waited for its answer.
    ended_max: u32,
    /// A frame of the server's has been read (its SETTINGS come first): nothing synthetic is
    /// handed to h2 before that.
    server_spoke: bool,
    retiring: Retiring,
    /// The reader to wake when a refusal is queued while no server bytes arrive.
    read_waker: Option<Waker>,
    scratch: Vec<Seen>,
    /// The server closed the connection: writes are dropped, reads go on (see `swallow`).
    write_closed: bool,
    /// Diagnostics, kept only while debug logging is on: streams opened whose response head
    /// (or reset) has not arrived, named when the server closes the connection.
    awaiting: Option<Vec<u32>>,
    /// Counts the connection as usable for its client ([`super::live_h2`]) until it is not:
    /// dropped at the server's GOAWAY, at retiring, when the server closed or reset it.
    live: Option<super::live_h2::LiveMark>,
}

impl Refusals {
    fn new() -> Refusals {
        Refusals {
            reads: Frames::new(false),
            writes: Frames::new(true),
            last_stream: None,
            highest_opened: 0,
            queue: VecDeque::new(),
            out: None,
            learner: None,
            learned: false,
            ended_max: 0,
            server_spoke: false,
            retiring: Retiring::No,
            read_waker: None,
            scratch: Vec::new(),
            write_closed: false,
            awaiting: tracing::enabled!(tracing::Level::DEBUG).then(Vec::new),
            live: None,
        }
    }

    fn on_read(&mut self, bytes: &[u8]) {
        let mut seen = std::mem::take(&mut self.scratch);
        self.reads.feed(bytes, &mut seen);
        for s in seen.drain(..) {
            if let Seen::Frame(h) = &s {
                self.server_spoke = true;
                let end_stream = (h.kind == HEADERS || h.kind == DATA) && h.flags & END_STREAM != 0;
                if end_stream || h.kind == RST_STREAM {
                    self.ended_max = self.ended_max.max(h.stream);
                }
            }
            if let (Seen::Frame(h), Some(awaiting)) = (&s, &mut self.awaiting) {
                if h.kind == HEADERS || h.kind == RST_STREAM {
                    awaiting.retain(|&id| id != h.stream);
                }
            }
            if let Seen::GoAway { last_stream, code } = s {
                self.live = None;
                tracing::debug!(
                    last_stream,
                    code,
                    "upstream h2 GOAWAY: later streams are refused"
                );
                if code == NO_ERROR {
                    self.learn(last_stream);
                }
                // A later GOAWAY may only lower the id (RFC 9113 §6.8).
                self.last_stream =
                    Some(self.last_stream.map_or(last_stream, |l| l.min(last_stream)));
                if self.retiring == Retiring::Due {
                    // Not handed out yet: h2 would take a higher id as a protocol error.
                    self.retiring = Retiring::Done;
                }
            }
        }
        self.scratch = seen;
    }

    fn on_write(&mut self, bytes: &[u8]) {
        let mut seen = std::mem::take(&mut self.scratch);
        self.writes.feed(bytes, &mut seen);
        for s in seen.drain(..) {
            let Seen::Frame(h) = s else { continue };
            if h.kind != HEADERS || h.stream <= self.highest_opened {
                continue;
            }
            self.highest_opened = h.stream;
            if let Some(live) = &self.live {
                live.opened();
            }
            if let Some(awaiting) = &mut self.awaiting {
                awaiting.push(h.stream);
            }
            if self.last_stream.is_some_and(|l| h.stream > l) {
                self.queue.push_back(h.stream);
                self.wake_reader();
            }
            self.retire_if_due(h.stream);
        }
        self.scratch = seen;
    }

    /// A graceful GOAWAY of the server named `last_stream`. It tells the server's
    /// per-connection limit only when it names a stream we opened that still waits for its
    /// answer: nginx sends it as the stream that reaches `keepalive_requests` arrives, while
    /// an idle timeout or a reload names a stream long answered. One naming a higher id (a
    /// two-step graceful shutdown starts with the largest id) tells nothing yet.
    fn learn(&mut self, last_stream: u32) {
        let unanswered = last_stream > self.ended_max;
        if self.learned || last_stream == 0 || last_stream > self.highest_opened || !unanswered {
            return;
        }
        self.learned = true;
        if let Some(l) = &self.learner {
            l.limits.graceful_goaway(&l.origin, last_stream.div_ceil(2));
        }
    }

    /// Stream `opened` was just opened: retire the connection if that reached the limit.
    fn retire_if_due(&mut self, opened: u32) {
        let Some((after, origin)) = self
            .learner
            .as_ref()
            .and_then(|l| Some((l.retire_after?, &l.origin)))
        else {
            return;
        };
        if self.retiring != Retiring::No || self.last_stream.is_some() || opened.div_ceil(2) < after
        {
            return;
        }
        tracing::debug!(
            origin = &**origin,
            streams = opened.div_ceil(2),
            "upstream h2: retiring the connection below the origin's limit"
        );
        self.retiring = Retiring::Due;
        self.live = None;
        self.wake_reader();
    }

    fn wake_reader(&mut self) {
        if let Some(w) = self.read_waker.take() {
            w.wake();
        }
    }

    /// A synthetic frame waits to be handed to h2.
    fn pending(&self) -> bool {
        !self.queue.is_empty() || self.retiring == Retiring::Due
    }

    /// A synthetic frame can go out now: one is started, or one waits, the server has spoken
    /// (its SETTINGS must be the first frame h2 reads, RFC 9113 §3.4) and the read side is
    /// between frames.
    fn ready_to_inject(&self) -> bool {
        self.out.is_some() || (self.pending() && self.server_spoke && self.reads.at_boundary())
    }

    fn inject(&mut self, buf: &mut ReadBuf<'_>) {
        if self.out.is_none() {
            if self.retiring == Retiring::Due {
                self.retiring = Retiring::Done;
                self.out = Some(Synthetic::new(&retiring_frame()));
            } else if let Some(stream) = self.queue.pop_front() {
                self.out = Some(Synthetic::new(&refused_frame(stream)));
            }
        }
        if let Some(s) = &mut self.out {
            let n = (s.len - s.pos).min(buf.remaining());
            buf.put_slice(&s.bytes[s.pos..s.pos + n]);
            s.pos += n;
            if s.pos == s.len {
                self.out = None;
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// An upstream h2 transport that refuses streams opened after the server's GOAWAY.
    pub struct RefuseAfterGoaway<S> {
        #[pin]
        inner: S,
        state: Refusals,
    }
}

impl<S> RefuseAfterGoaway<S> {
    /// Wraps the transport of a connection that negotiated h2 (before any byte moved).
    pub fn new(inner: S) -> Self {
        RefuseAfterGoaway {
            inner,
            state: Refusals::new(),
        }
    }

    /// Also learns `origin`'s per-connection stream limit from its graceful GOAWAYs, and
    /// retires this connection below the limit once it is known (see [`super::limits`]).
    pub fn learning(mut self, limits: Arc<StreamLimits>, origin: Box<str>) -> Self {
        let retire_after = limits.retire_after(&origin);
        self.state.learner = Some(Learner {
            limits,
            origin,
            retire_after,
        });
        self
    }

    /// Also counts the connection as usable in its client's [`super::live_h2::LiveH2`] while
    /// it is (see that module).
    pub fn marking(mut self, mark: super::live_h2::LiveMark) -> Self {
        self.state.live = Some(mark);
        self
    }

    /// The wrapped transport.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead> AsyncRead for RefuseAfterGoaway<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let st = this.state;
        let before = buf.filled().len();
        if st.ready_to_inject() {
            st.inject(buf);
            return Poll::Ready(Ok(()));
        }
        let poll = if !st.pending() {
            let poll = this.inner.poll_read(cx, buf);
            if let Poll::Ready(Ok(())) = poll {
                st.on_read(&buf.filled()[before..]);
            }
            poll
        } else {
            // A synthetic frame waits for the current frame to end: read no further than that.
            let mut tmp = [0u8; 4096];
            let want = st
                .reads
                .until_boundary()
                .min(tmp.len())
                .min(buf.remaining());
            let mut small = ReadBuf::new(&mut tmp[..want]);
            let poll = this.inner.poll_read(cx, &mut small);
            if let Poll::Ready(Ok(())) = poll {
                let got = small.filled();
                buf.put_slice(got);
                st.on_read(got);
            }
            poll
        };
        match poll {
            Poll::Pending => {
                st.read_waker = Some(cx.waker().clone());
                Poll::Pending
            }
            Poll::Ready(Ok(())) if buf.filled().len() == before && st.ready_to_inject() => {
                // The server closed the connection: refusals still go out first.
                st.inject(buf);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Ok(())) if buf.filled().len() == before && buf.remaining() > 0 => {
                st.live = None;
                tracing::debug!(
                    last_stream = st.last_stream,
                    highest_opened = st.highest_opened,
                    awaiting_response = ?st.awaiting,
                    "upstream h2: the server closed the connection"
                );
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => {
                st.live = None;
                Poll::Ready(Err(e))
            }
            other => other,
        }
    }
}

/// The server is gone for writing: it reset the connection (or closed it with our bytes
/// unread, which TCP turns into a reset). What it sent before stays readable.
fn peer_closed(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
    )
}

impl<S> RefuseAfterGoaway<S> {
    /// Turns a write error meaning "the server closed" into "written, and from now on every
    /// write is dropped", so that h2 goes on to read what the server sent before closing.
    ///
    /// Why: nginx sends GOAWAY, finishes the streams up to its last-stream-id and closes.
    /// When h2 writes a new stream's frames before it has read that GOAWAY, the write fails
    /// and h2 fails every stream with "broken pipe" — also those the GOAWAY says were never
    /// processed, which could then not be retried. Reading on instead, h2 sees the GOAWAY
    /// and the answers before it, then the end of the connection: each stream ends the way
    /// the server decided. Safe because a reset socket still yields its queued bytes and then
    /// the end, so the read side always finishes (and the response timeout bounds it anyway).
    fn swallow(
        state: &mut Refusals,
        bufs: &[io::IoSlice<'_>],
        e: io::Error,
    ) -> Poll<io::Result<usize>> {
        state.live = None;
        if !peer_closed(&e) {
            return Poll::Ready(Err(e));
        }
        if !state.write_closed {
            tracing::debug!(
                error = %e,
                "upstream h2: the server closed; reading what it sent before the write fails"
            );
            state.write_closed = true;
        }
        Poll::Ready(Ok(Self::written(state, bufs, usize::MAX)))
    }

    /// Feeds the first `n` bytes of `bufs` (all of them for `usize::MAX`), in order, to the
    /// tracker of written frames; returns how many that was.
    fn written(state: &mut Refusals, bufs: &[io::IoSlice<'_>], mut n: usize) -> usize {
        let mut total = 0;
        for b in bufs {
            if n == 0 {
                break;
            }
            let take = b.len().min(n);
            state.on_write(&b[..take]);
            n -= take;
            total += take;
        }
        total
    }
}

impl<S: AsyncWrite> AsyncWrite for RefuseAfterGoaway<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
    }

    /// Vectored when the stream below is (TLS is): h2 hands over a frame's header and its
    /// payload as two slices, which then go out as one TLS write instead of two records and
    /// two syscalls.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        if this.state.write_closed {
            return Poll::Ready(Ok(Self::written(this.state, bufs, usize::MAX)));
        }
        match this.inner.poll_write_vectored(cx, bufs) {
            Poll::Ready(Ok(n)) => Poll::Ready(Ok(Self::written(this.state, bufs, n))),
            Poll::Ready(Err(e)) => Self::swallow(this.state, bufs, e),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        if this.state.write_closed {
            return Poll::Ready(Ok(()));
        }
        match this.inner.poll_flush(cx) {
            Poll::Ready(Err(e)) => Self::swallow(this.state, &[], e).map_ok(|_| ()),
            other => other,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        if this.state.write_closed {
            return Poll::Ready(Ok(()));
        }
        this.inner.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = (payload.len() as u32).to_be_bytes();
        let mut f = vec![len[1], len[2], len[3], kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn goaway(last: u32) -> Vec<u8> {
        let mut p = last.to_be_bytes().to_vec();
        p.extend_from_slice(&0u32.to_be_bytes());
        frame(GOAWAY, 0, 0, &p)
    }

    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    #[test]
    fn frames_follow_boundaries_across_any_split() {
        let mut bytes = frame(0x4, 0, 0, &[0; 6]);
        bytes.extend(goaway(7));
        bytes.extend(frame(0x0, 1, 5, b"hello"));
        for split in 0..bytes.len() {
            let mut f = Frames::new(false);
            let mut seen = Vec::new();
            f.feed(&bytes[..split], &mut seen);
            f.feed(&bytes[split..], &mut seen);
            assert!(f.at_boundary(), "split {split}");
            assert!(
                seen.contains(&Seen::GoAway {
                    last_stream: 7,
                    code: 0
                }),
                "split {split}"
            );
            assert_eq!(
                seen.iter().filter(|s| matches!(s, Seen::Frame(_))).count(),
                3
            );
        }
    }

    #[test]
    fn header_blocks_are_not_boundaries() {
        let mut f = Frames::new(false);
        let mut seen = Vec::new();
        f.feed(&frame(HEADERS, 0, 1, b"abc"), &mut seen);
        assert!(!f.at_boundary(), "HEADERS without END_HEADERS");
        f.feed(&frame(CONTINUATION, END_HEADERS, 1, b"d"), &mut seen);
        assert!(f.at_boundary());
    }

    #[test]
    fn only_streams_opened_after_goaway_above_its_id_are_refused() {
        let mut r = Refusals::new();
        let mut w = PREFACE.to_vec();
        w.extend(frame(HEADERS, END_HEADERS, 1, b"h"));
        w.extend(frame(HEADERS, END_HEADERS, 3, b"h"));
        r.on_write(&w);
        r.on_read(&goaway(1)); // stream 3 is failed by h2 itself (already open)
        r.on_write(&frame(HEADERS, END_HEADERS | 0x1, 3, b"trailers")); // not a new stream
        r.on_write(&frame(HEADERS, END_HEADERS, 5, b"h"));
        r.on_write(&frame(0x0, 0x1, 5, b"body"));
        r.on_write(&frame(HEADERS, END_HEADERS, 7, b"h"));
        assert_eq!(r.queue, [5, 7]);
    }

    /// A vectored write may stop anywhere, even inside a frame header: only what was written
    /// is tracked, and the frame counts once the rest follows.
    #[test]
    fn a_vectored_write_is_tracked_up_to_what_was_written() {
        type R = RefuseAfterGoaway<tokio::io::DuplexStream>;
        let mut r = Refusals::new();
        r.on_write(PREFACE);
        r.on_read(&goaway(1));
        let late = frame(HEADERS, END_HEADERS, 3, b"h");
        let (head, rest) = late.split_at(4);
        let bufs = [
            io::IoSlice::new(head),
            io::IoSlice::new(&[]),
            io::IoSlice::new(rest),
        ];
        assert_eq!(
            R::written(&mut r, &bufs, 6),
            6,
            "stops inside the frame header"
        );
        assert!(r.queue.is_empty());
        let tail = [io::IoSlice::new(&rest[2..])];
        assert_eq!(R::written(&mut r, &tail, usize::MAX), rest.len() - 2);
        assert_eq!(r.queue, [3]);
    }

    /// End to end over an in-memory pipe: the reader gets the server's bytes unchanged and a
    /// RST_STREAM(REFUSED_STREAM) for the late stream, between two server frames.
    #[tokio::test]
    async fn refusal_is_inserted_between_server_frames() {
        let (client_io, mut server) = tokio::io::duplex(1 << 16);
        let mut c = RefuseAfterGoaway::new(client_io);
        let data = frame(0x0, 0, 1, &[7u8; 100]);
        server.write_all(&goaway(1)).await.unwrap();
        server.write_all(&data[..50]).await.unwrap();
        let mut got = vec![0u8; 17 + 50];
        c.read_exact(&mut got).await.unwrap();
        let mut w = PREFACE.to_vec();
        w.extend(frame(HEADERS, END_HEADERS, 3, b"h"));
        c.write_all(&w).await.unwrap();
        server.write_all(&data[50..]).await.unwrap();
        drop(server);
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).await.unwrap();
        let mut want = data[50..].to_vec();
        want.extend(refused_frame(3));
        assert_eq!(rest, want);
    }

    /// The server closes without sending anything more: the refusal still reaches h2 before
    /// the end of the stream.
    #[tokio::test]
    async fn refusal_is_delivered_before_eof() {
        let (client_io, mut server) = tokio::io::duplex(1 << 16);
        let mut c = RefuseAfterGoaway::new(client_io);
        server.write_all(&goaway(0)).await.unwrap();
        let mut got = vec![0u8; 17];
        c.read_exact(&mut got).await.unwrap();
        let mut w = PREFACE.to_vec();
        w.extend(frame(HEADERS, END_HEADERS, 1, b"h"));
        c.write_all(&w).await.unwrap();
        drop(server);
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, refused_frame(1));
    }

    /// The race behind the last 502s through nginx: h2 still has a stream's frames to write
    /// when the server, having sent GOAWAY(0), closes. The write fails; h2 must still read
    /// the GOAWAY and fail the stream as "not processed" (retryable), not as a broken pipe.
    /// A 64-byte pipe makes the order certain: the request's DATA waits in h2's write buffer
    /// until the server is gone.
    #[tokio::test]
    async fn a_write_after_the_server_closed_still_reads_its_goaway() {
        let (client_io, mut server) = tokio::io::duplex(64);
        let (mut send, conn) = h2::client::handshake(RefuseAfterGoaway::new(client_io))
            .await
            .unwrap();
        let conn = tokio::spawn(conn);
        let req = http::Request::post("https://origin.test/")
            .body(())
            .unwrap();
        let (response, mut body) = send.send_request(req, false).unwrap();
        body.send_data(bytes::Bytes::from(vec![b'x'; 4096]), true)
            .unwrap();
        // Let h2 fill the pipe and wait on it.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        server.write_all(&frame(0x4, 0, 0, &[])).await.unwrap(); // SETTINGS
        server.write_all(&goaway(0)).await.unwrap();
        drop(server);
        let err = response.await.expect_err("the server processed nothing");
        assert!(
            err.is_go_away() && err.is_remote() && err.reason() == Some(h2::Reason::NO_ERROR),
            "want the server's graceful GOAWAY, got {err:?}"
        );
        let _ = conn.await;
    }

    /// A wrapper state that learns for origin `o:443`, whose limit is `limit` when given.
    fn learning(limit: Option<u32>) -> (Refusals, Arc<StreamLimits>) {
        let limits = Arc::new(StreamLimits::default());
        if let Some(n) = limit {
            limits.graceful_goaway("o:443", n);
            limits.graceful_goaway("o:443", n);
        }
        (learning_with(&limits), limits)
    }

    /// A new connection's wrapper state learning into `limits` for origin `o:443`.
    fn learning_with(limits: &Arc<StreamLimits>) -> Refusals {
        let mut r = Refusals::new();
        r.learner = Some(Learner {
            limits: limits.clone(),
            origin: "o:443".into(),
            retire_after: limits.retire_after("o:443"),
        });
        r
    }

    /// Opens client streams `from..=to` (odd ids), after the preface when `from` is 1.
    fn open(r: &mut Refusals, from: u32, to: u32) {
        let mut w = if from == 1 {
            PREFACE.to_vec()
        } else {
            Vec::new()
        };
        for id in (from..=to).step_by(2) {
            w.extend(frame(HEADERS, END_HEADERS, id, b"h"));
        }
        r.on_write(&w);
    }

    #[test]
    fn a_connection_retires_below_the_limit_at_a_frame_boundary() {
        let (mut r, _) = learning(Some(8)); // retire after 6 streams
        open(&mut r, 1, 9);
        assert_eq!(r.retiring, Retiring::No, "5 streams");
        let data = frame(0x0, 0, 1, &[7u8; 20]);
        r.on_read(&data[..10]);
        open(&mut r, 11, 11);
        assert_eq!(r.retiring, Retiring::Due);
        assert!(!r.ready_to_inject(), "never inside a server frame");
        r.on_read(&data[10..]);
        assert!(r.ready_to_inject());
        let mut out = [0u8; 32];
        let mut buf = ReadBuf::new(&mut out);
        r.inject(&mut buf);
        assert_eq!(buf.filled(), retiring_frame());
        assert_eq!(r.retiring, Retiring::Done);
        open(&mut r, 13, 15);
        assert!(!r.ready_to_inject(), "retired once");
    }

    #[test]
    fn an_idle_close_naming_an_answered_stream_teaches_nothing() {
        for _ in 0..2 {
            let (mut r, limits) = learning(None);
            open(&mut r, 1, 19);
            r.on_read(&frame(HEADERS, END_HEADERS, 19, b"h")); // answer head
            r.on_read(&frame(DATA, END_STREAM, 19, b"done")); // answered in full
            r.on_read(&goaway(19)); // later: the idle timeout
            assert_eq!(limits.retire_after("o:443"), None);
            assert!(limits.is_empty(), "not even a candidate");
        }
    }

    /// The connection counts as usable for its client until the server's GOAWAY, this side
    /// retiring it, or the server closing it (`super::live_h2`).
    #[tokio::test]
    async fn a_connection_stops_counting_as_usable_at_goaway_retiring_or_close() {
        use super::super::live_h2::LiveH2;
        const IDLE: std::time::Duration = std::time::Duration::from_secs(90);
        let live = Arc::new(LiveH2::default());
        let mut r = Refusals::new();
        r.live = Some(live.mark("o"));
        r.on_read(&frame(0x4, 0, 0, &[]));
        assert!(live.holds("o", IDLE), "SETTINGS change nothing");
        r.on_read(&goaway(0));
        assert!(!live.holds("o", IDLE), "the server's GOAWAY");

        let (mut r, _) = learning(Some(8)); // retire after 6 streams
        r.live = Some(live.mark("o"));
        open(&mut r, 1, 9);
        assert!(live.holds("o", IDLE));
        open(&mut r, 11, 11);
        assert_eq!(r.retiring, Retiring::Due);
        assert!(!live.holds("o", IDLE), "retiring");

        let (client_io, server) = tokio::io::duplex(1 << 10);
        let mut c = RefuseAfterGoaway::new(client_io).marking(live.mark("o"));
        assert!(live.holds("o", IDLE));
        drop(server);
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).await.unwrap();
        assert!(!live.holds("o", IDLE), "the server closed");
        let (client_io, _server) = tokio::io::duplex(1 << 10);
        let c = RefuseAfterGoaway::new(client_io).marking(live.mark("o"));
        drop(c);
        assert!(!live.holds("o", IDLE), "the connection ended");
    }

    #[test]
    fn nothing_synthetic_before_the_servers_first_frame() {
        let (mut r, _) = learning(Some(8)); // retire after 6 streams
        open(&mut r, 1, 11);
        assert_eq!(r.retiring, Retiring::Due);
        assert!(
            !r.ready_to_inject(),
            "h2 must read the server's SETTINGS first"
        );
        r.on_read(&frame(0x4, 0, 0, &[])); // SETTINGS
        assert!(r.ready_to_inject());
    }

    #[test]
    fn the_servers_own_goaway_first_cancels_retiring() {
        let (mut r, _) = learning(Some(8));
        open(&mut r, 1, 11);
        assert_eq!(r.retiring, Retiring::Due);
        r.on_read(&goaway(11));
        assert!(
            !r.ready_to_inject(),
            "a GOAWAY above the server's id would be a protocol error"
        );
        assert_eq!(r.retiring, Retiring::Done);
    }

    #[test]
    fn no_limit_known_means_no_retiring() {
        let (mut r, _) = learning(None);
        open(&mut r, 1, 2001);
        assert_eq!(r.retiring, Retiring::No);
        let mut plain = Refusals::new();
        open(&mut plain, 1, 2001);
        assert_eq!(plain.retiring, Retiring::No);
    }

    #[test]
    fn the_limit_is_learned_from_the_goaway_naming_our_last_stream() {
        let limits = {
            let (mut r, limits) = learning(None);
            open(&mut r, 1, 19);
            r.on_read(&goaway(MAX_STREAM)); // a two-step shutdown's first GOAWAY: no count
            r.on_read(&goaway(19));
            limits
        };
        assert_eq!(limits.retire_after("o:443"), None, "one connection");
        let mut r = learning_with(&limits);
        open(&mut r, 1, 21);
        let mut away = goaway(19);
        away[16] = 2; // INTERNAL_ERROR: not graceful, not a count
        r.on_read(&away);
        assert_eq!(limits.retire_after("o:443"), None);
        let mut r = learning_with(&limits);
        open(&mut r, 1, 21);
        r.on_read(&goaway(19));
        assert_eq!(
            limits.retire_after("o:443"),
            Some(8),
            "10 streams twice: limit 10"
        );
    }

    /// Against the h2 crate on both ends: once retired, the connection finishes the stream it
    /// has, refuses nothing, takes no new stream (`ready` fails with a graceful GOAWAY, which
    /// hyper answers by sending the request elsewhere, unsent) and closes when idle.
    #[tokio::test]
    async fn a_retired_connection_finishes_its_streams_and_closes() {
        let (client_io, server_io) = tokio::io::duplex(1 << 16);
        let served = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counted = served.clone();
        let server = tokio::spawn(async move {
            let mut conn = h2::server::handshake(server_io).await.unwrap();
            while let Some(Ok((_req, mut respond))) = conn.accept().await {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let answer = http::Response::builder().status(200).body(()).unwrap();
                let mut body = respond.send_response(answer, false).unwrap();
                body.send_data(bytes::Bytes::from_static(b"ok"), true)
                    .unwrap();
            }
        });
        let limits = Arc::new(StreamLimits::default());
        limits.graceful_goaway("o:443", 8);
        limits.graceful_goaway("o:443", 8);
        let io = RefuseAfterGoaway::new(client_io).learning(limits, "o:443".into());
        let (mut send, conn) = h2::client::handshake(io).await.unwrap();
        let conn = tokio::spawn(conn);
        for i in 1..=6 {
            send = send.ready().await.expect("open before the limit");
            let req = http::Request::get("https://o.test/").body(()).unwrap();
            let (response, _) = send.send_request(req, true).unwrap();
            let response = response.await.unwrap_or_else(|e| panic!("stream {i}: {e}"));
            assert_eq!(response.status(), 200);
        }
        let err = send.ready().await.expect_err("retired after 6 streams");
        assert!(
            err.is_go_away() && err.reason() == Some(h2::Reason::NO_ERROR),
            "{err:?}"
        );
        tokio::time::timeout(std::time::Duration::from_secs(5), conn)
            .await
            .expect("the idle retired connection closes")
            .unwrap()
            .unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), server)
            .await
            .expect("the server sees the close")
            .unwrap();
        assert_eq!(served.load(std::sync::atomic::Ordering::SeqCst), 6);
    }

    /// What `swallow` relies on, pinned against the kernel: once the server resets the
    /// connection, writing fails, yet the bytes it sent before the reset can still be read,
    /// followed by the end of the stream (or the reset itself).
    #[tokio::test]
    async fn a_reset_connection_still_yields_what_arrived_before_the_reset() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        server.write_all(b"goaway").await.unwrap();
        client.write_all(b"never read").await.unwrap(); // unread: close becomes a reset
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        drop(server); // with bytes unread: the kernel sends a reset, not a FIN
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let err = client
            .write_all(b"late")
            .await
            .expect_err("the peer is gone");
        assert!(peer_closed(&err), "{err:?}");
        let mut got = [0u8; 6];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"goaway");
        let mut rest = [0u8; 1];
        match client.read(&mut rest).await {
            Ok(n) => assert_eq!(n, 0),
            Err(e) => assert!(peer_closed(&e), "{e:?}"),
        }
    }
}
