//! `http_body::Body` adapters that drive the body engines over hyper bodies.
//!
//! Each input data frame is pushed through the engine and the resulting pieces are yielded as
//! separate frames, in order, before the inner body is polled again; nothing is delayed beyond
//! what the engine holds back. At the end of the inner body (or at its trailers) the held tail
//! is flushed. Neither adapter buffers to keep a `Content-Length`: the proxy drops that header
//! whenever an adapter is in the path.

use std::error::Error as StdError;
use std::ops::Deref;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

use super::{
    BodySubst, Denied, FrameError, MessageFrames, Piece, Report, ScrubStream, Scrubber, TokenLookup,
};

/// Why an adapted body stopped.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// A token whose secret may not go to this destination was found in the request body.
    #[error(transparent)]
    Denied(Denied),
    /// The guard ([`SubstBody::with_guard`]) said the decisions are no longer current (the
    /// sandbox ended or its store changed); nothing more was unsealed.
    #[error("the request body's policy changed while it streamed")]
    Stopped,
    /// The request body would carry more real-value bytes than its budget
    /// ([`super::Report::max_unsealed`]); the token past it was not unsealed.
    #[error("the request body would carry more bytes of real values than allowed")]
    OverBudget,
    /// A response body that cannot be scrubbed (a compressed gRPC message) or that ended inside
    /// a message; nothing of a held message was passed on.
    #[error(transparent)]
    Unscrubbable(FrameError),
    /// A response body whose sandbox's values can no longer be known ([`Rescoped::End`]).
    #[error(
        "this node cannot read the sandbox's store now (cut off from the database, or the store \
         quarantined): values changed meanwhile cannot be scrubbed from this answer"
    )]
    ScopeLost,
    /// The wrapped body failed (the sandbox for a request, the upstream for a response).
    #[error("wrapped body failed: {0}")]
    Upstream(#[source] Box<dyn StdError + Send + Sync>),
}

/// What a [`SubstBody`] saw, readable by the proxy while and after the body streams.
#[derive(Clone, Default, Debug)]
pub struct SubstOutcome {
    denied: Arc<Mutex<Option<Denied>>>,
    report: Arc<Mutex<Report>>,
    stopped: Arc<std::sync::atomic::AtomicBool>,
    over: Arc<Over>,
}

/// Set once the body ended, failed or was dropped; its report is final from then on.
#[derive(Default, Debug)]
struct Over {
    done: std::sync::atomic::AtomicBool,
    notify: tokio::sync::Notify,
}

impl SubstOutcome {
    /// True once the body ended, failed or was dropped ([`SubstOutcome::report`] is final).
    pub fn is_over(&self) -> bool {
        self.over.done.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Waits until [`SubstOutcome::is_over`].
    pub async fn over(&self) {
        let notified = self.over.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if !self.is_over() {
            notified.await;
        }
    }

    fn finish(&self) {
        self.over
            .done
            .store(true, std::sync::atomic::Ordering::Release);
        self.over.notify.notify_waiters();
    }

    /// The denial that stopped the body, if any.
    pub fn denied(&self) -> Option<Denied> {
        self.denied
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The body's report; final once the body ended, failed or was dropped.
    pub fn report(&self) -> Report {
        self.report
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// True if the guard stopped the body (see [`BodyError::Stopped`]).
    pub fn stopped(&self) -> bool {
        self.stopped.load(std::sync::atomic::Ordering::Acquire)
    }

    fn set_denied(&self, denied: Denied) {
        *self.denied.lock().unwrap_or_else(PoisonError::into_inner) = Some(denied);
    }

    fn set_report(&self, report: &Report) {
        self.report
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone_from(report);
    }
}

/// One body engine as the adapters drive it.
trait Engine {
    /// Processes one data chunk into `out`.
    fn data(&mut self, chunk: Bytes, out: &mut Vec<Bytes>) -> Result<(), BodyError>;
    /// Flushes the held tail into `out` (end of data, or trailers).
    ///
    /// # Errors
    /// The data ended where it must not (inside a gRPC message); the body fails.
    fn flush(&mut self, out: &mut Vec<Bytes>) -> Result<(), BodyError>;
    /// The trailers to pass on.
    fn trailers(&mut self, trailers: HeaderMap) -> HeaderMap;
    /// True while a tail is held back.
    fn holding(&self) -> bool;
    /// The body is over (ended, failed or denied).
    fn ended(&mut self);
}

/// The state shared by both adapters: the engine, its output waiting to be yielded (then
/// optional trailers), and whether the inner body is over.
struct Driver<E> {
    engine: E,
    pieces: Vec<Bytes>,
    next: usize,
    trailers: Option<HeaderMap>,
    done: bool,
}

impl<E: Engine> Driver<E> {
    fn new(engine: E) -> Self {
        Driver {
            engine,
            pieces: Vec::new(),
            next: 0,
            trailers: None,
            done: false,
        }
    }

    fn poll<B>(
        &mut self,
        mut body: Pin<&mut B>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>>
    where
        B: Body,
        B::Error: Into<Box<dyn StdError + Send + Sync>>,
    {
        loop {
            if let Some(frame) = self.pop() {
                return Poll::Ready(Some(Ok(frame)));
            }
            if self.done {
                return Poll::Ready(None);
            }
            if let Err(err) = self.absorb(ready!(body.as_mut().poll_frame(cx))) {
                return Poll::Ready(Some(Err(err)));
            }
            // A body that knows its length says it is over without a last `None`, and hyper
            // then stops polling: the end is taken here, or the engine never learnt it (a
            // streamed upload's unsealed names never reached the audit line; outside review).
            if !self.done && body.is_end_stream() {
                if let Err(err) = self.engine.flush(&mut self.pieces) {
                    return Poll::Ready(Some(Err(self.fail(err))));
                }
                self.end();
            }
        }
    }

    /// Feeds one poll result of the inner body into the engine.
    fn absorb<D, Err>(&mut self, polled: Option<Result<Frame<D>, Err>>) -> Result<(), BodyError>
    where
        D: Buf,
        Err: Into<Box<dyn StdError + Send + Sync>>,
    {
        let frame = match polled {
            None => {
                if let Err(err) = self.engine.flush(&mut self.pieces) {
                    return Err(self.fail(err));
                }
                self.end();
                return Ok(());
            }
            Some(Err(err)) => return Err(self.fail(BodyError::Upstream(err.into()))),
            Some(Ok(frame)) => frame,
        };
        match frame.into_data() {
            Ok(mut data) => {
                let chunk = data.copy_to_bytes(data.remaining());
                self.engine
                    .data(chunk, &mut self.pieces)
                    .map_err(|err| self.fail(err))
            }
            Err(frame) => {
                self.engine
                    .flush(&mut self.pieces)
                    .map_err(|err| self.fail(err))?;
                self.trailers = frame.into_trailers().ok().map(|t| self.engine.trailers(t));
                Ok(())
            }
        }
    }

    fn end(&mut self) {
        self.done = true;
        self.engine.ended();
    }

    /// Drops pending output and ends the body with `err`.
    fn fail(&mut self, err: BodyError) -> BodyError {
        self.pieces.clear();
        self.next = 0;
        self.trailers = None;
        self.end();
        err
    }

    fn pop(&mut self) -> Option<Frame<Bytes>> {
        if let Some(piece) = self.pieces.get_mut(self.next) {
            self.next += 1;
            return Some(Frame::data(std::mem::take(piece)));
        }
        self.pieces.clear();
        self.next = 0;
        self.trailers.take().map(Frame::trailers)
    }

    fn is_end_stream(&self, inner_ended: bool) -> bool {
        let nothing_pending = self.next >= self.pieces.len() && self.trailers.is_none();
        nothing_pending && (self.done || (inner_ended && !self.engine.holding()))
    }

    /// Exact (zero) only once nothing is left; otherwise unknown: the engines change lengths.
    fn size_hint(&self, inner_ended: bool) -> SizeHint {
        if self.is_end_stream(inner_ended) {
            SizeHint::with_exact(0)
        } else {
            SizeHint::default()
        }
    }
}

pin_project_lite::pin_project! {
    /// A request body with its tokens unsealed ([`BodySubst`]). On a denial it yields
    /// `Err(BodyError::Denied)` and records it in its [`SubstOutcome`].
    pub struct SubstBody<B, L = Arc<dyn TokenLookup>> {
        #[pin]
        body: B,
        driver: Driver<SubstEngine<L>>,
    }
}

/// Asked for each chunk before its output is passed on: are the decisions still current? The
/// argument says whether the chunk unsealed a value (only then does a changed policy matter).
pub type Guard = Box<dyn FnMut(bool) -> bool + Send>;

struct SubstEngine<L> {
    subst: BodySubst<L>,
    outcome: SubstOutcome,
    ended: bool,
    guard: Option<Guard>,
    /// Set when a chunk's output was thrown away (denied, stopped, over budget): how many
    /// unsealed names the report had before it. Names the chunk added never left, so the
    /// published report leaves them out (they were audited as unsealed; hostile review).
    kept_names: Option<usize>,
}

impl<B, L> SubstBody<B, L>
where
    L: Deref,
    L::Target: TokenLookup,
{
    /// Wraps `body`; `engine` is fresh for this request.
    pub fn new(body: B, engine: BodySubst<L>) -> Self {
        let engine = SubstEngine {
            subst: engine,
            outcome: SubstOutcome::default(),
            kept_names: None,
            ended: false,
            guard: None,
        };
        SubstBody {
            body,
            driver: Driver::new(engine),
        }
    }

    /// After each chunk is substituted and before its output is passed on, `guard` must say
    /// the decisions are still current; when it does not, the chunk's output is dropped and
    /// the body fails with [`BodyError::Stopped`] (a long upload must not outlive its sandbox,
    /// nor unseal under a policy that has changed).
    pub fn with_guard(mut self, guard: Guard) -> Self {
        self.driver.engine.guard = Some(guard);
        self
    }
}

impl<B, L> SubstBody<B, L> {
    /// A handle on the denial and report, to keep after the body is handed to hyper.
    pub fn outcome(&self) -> SubstOutcome {
        self.driver.engine.outcome.clone()
    }
}

impl<L> Engine for SubstEngine<L>
where
    L: Deref,
    L::Target: TokenLookup,
{
    fn data(&mut self, chunk: Bytes, out: &mut Vec<Bytes>) -> Result<(), BodyError> {
        let report = self.subst.report();
        let (before, names, mark) = (report.unsealed_bytes, report.unsealed.len(), out.len());
        let refused = report.refused.len();
        if let Err(denied) = self.subst.push(chunk, out) {
            self.kept_names = Some(names);
            self.outcome.set_denied(denied.clone());
            return Err(BodyError::Denied(denied));
        }
        let unsealed = self.subst.report().unsealed_bytes > before;
        if self
            .guard
            .as_mut()
            .is_some_and(|current| !current(unsealed))
        {
            out.truncate(mark); // nothing of this chunk is passed on
            self.kept_names = Some(names);
            self.outcome
                .stopped
                .store(true, std::sync::atomic::Ordering::Release);
            self.publish();
            return Err(BodyError::Stopped);
        }
        if self.subst.report().over_budget {
            self.kept_names = Some(names); // the driver drops the chunk's output
            self.publish();
            return Err(BodyError::OverBudget);
        }
        let report = self.subst.report();
        if report.unsealed.len() > names || report.refused.len() > refused {
            // A value (or a token sent sealed) is on its way: the report names it now, not
            // only at the body's end or drop (a stop that drops the audit line's task first
            // wrote `"unsealed": []` for uploads whose values had gone up: outside pass h49b).
            self.publish();
        }
        Ok(())
    }

    fn flush(&mut self, out: &mut Vec<Bytes>) -> Result<(), BodyError> {
        self.subst.finish(out);
        Ok(())
    }

    /// Request trailers never reach this engine in the proxy (`proxy::linger::Lingering` drops
    /// them); any given here are passed on as they are.
    fn trailers(&mut self, trailers: HeaderMap) -> HeaderMap {
        trailers
    }

    fn holding(&self) -> bool {
        self.subst.is_holding()
    }

    fn ended(&mut self) {
        self.ended = true;
        self.publish();
        self.outcome.finish();
    }
}

impl<L> SubstEngine<L> {
    /// Publishes the report, without the names of a chunk whose output was thrown away.
    fn publish(&self) {
        match self.kept_names {
            None => self.outcome.set_report(self.subst.report()),
            Some(n) => {
                let mut report = self.subst.report().clone();
                report.unsealed.truncate(n);
                self.outcome.set_report(&report);
            }
        }
    }
}

/// A body dropped before its end (hyper gave up on it) still publishes what it unsealed.
impl<L> Drop for SubstEngine<L> {
    fn drop(&mut self) {
        if !self.ended {
            self.publish();
            self.outcome.finish();
        }
    }
}

impl<B, L> Body for SubstBody<B, L>
where
    B: Body,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
    L: Deref,
    L::Target: TokenLookup,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.project();
        this.driver.poll(this.body, cx)
    }

    fn is_end_stream(&self) -> bool {
        self.driver.is_end_stream(self.body.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.driver.size_hint(self.body.is_end_stream())
    }
}

pin_project_lite::pin_project! {
    /// A response body with real values replaced by sealed tokens ([`ScrubStream`]). Data flows
    /// through at line ends and beyond the stream's hold-back window; trailers are scrubbed too
    /// and pass through.
    pub struct ScrubBody<B> {
        #[pin]
        body: B,
        driver: Driver<ScrubEngine>,
    }
}

/// Told, once, how many values a scrubbed body replaced (in its data and its trailers), when
/// the body is dropped — ended, failed or cut off: only then is the count known
/// ([`ScrubBody::with_tally`]).
pub type Tally = Box<dyn FnOnce(usize) + Send>;

/// Asked before each chunk of a scrubbed body: `Some` once the sandbox's values changed
/// ([`ScrubBody::with_rescope`]).
pub type Rescope = Box<dyn FnMut() -> Option<Rescoped> + Send>;

/// What a scrubbed answer goes on with after the sandbox's values changed.
pub enum Rescoped {
    /// This scrubber.
    Use(Arc<Scrubber>),
    /// Nothing: the values it would have to scrub cannot be known (the node's copy of the
    /// store is locked: cut off from the shared database, or the store quarantined); the
    /// answer ends.
    End,
}

struct ScrubEngine {
    stream: ScrubStream,
    scrubber: Arc<Scrubber>,
    rescope: Option<Rescope>,
    /// For length-prefixed messages: their framing, compressed ones decoded before scrubbing.
    frames: Option<MessageFrames>,
    /// What `frames` passed on, waiting for the scrubber.
    plain: Vec<Piece>,
    /// Values replaced in the trailers (the data's are the stream's).
    in_trailers: usize,
    /// Told the total when the engine is dropped.
    tally: Option<Tally>,
}

impl Drop for ScrubEngine {
    fn drop(&mut self) {
        if let Some(tally) = self.tally.take() {
            tally(self.stream.replacements() + self.in_trailers);
        }
    }
}

impl<B> ScrubBody<B> {
    /// Wraps `body`: each value becomes its token.
    pub fn new(body: B, scrubber: Arc<Scrubber>) -> Self {
        Self::with(body, ScrubStream::new(scrubber.clone()), scrubber, None)
    }

    /// Wraps a body that carries its own lengths ([`super::Binary`]): each value becomes a
    /// stand-in of its own length ([`ScrubStream::same_length`]). With `frames` (the first
    /// scrubber over a [`super::Binary::Framed`] body) compressed messages are decoded first,
    /// and the body fails at one that cannot be, before any byte of it is passed on.
    pub fn binary(body: B, scrubber: Arc<Scrubber>, frames: Option<MessageFrames>) -> Self {
        Self::with(
            body,
            ScrubStream::same_length(scrubber.clone()),
            scrubber,
            frames,
        )
    }

    fn with(
        body: B,
        stream: ScrubStream,
        scrubber: Arc<Scrubber>,
        frames: Option<MessageFrames>,
    ) -> Self {
        let engine = ScrubEngine {
            stream,
            scrubber,
            rescope: None,
            frames,
            plain: Vec::new(),
            in_trailers: 0,
            tally: None,
        };
        ScrubBody {
            body,
            driver: Driver::new(engine),
        }
    }
}

impl<B> ScrubBody<B> {
    /// Asks `rescope` before each chunk and goes on with the scrubber it returns (trailers
    /// included): an answer that streams for long — events, a long poll — must scrub values
    /// unsealed after it began (an upstream that echoes requests onto an open stream).
    pub fn with_rescope(mut self, rescope: Rescope) -> Self {
        self.driver.engine.rescope = Some(rescope);
        self
    }

    /// Tells `tally` how many values were replaced, once, when the body is dropped.
    pub fn with_tally(mut self, tally: Tally) -> Self {
        self.driver.engine.tally = Some(tally);
        self
    }
}

impl ScrubEngine {
    /// Takes up a changed scope; an error once the answer cannot be scrubbed any more.
    fn follow_scope(&mut self) -> Result<(), BodyError> {
        let Some(rescope) = &mut self.rescope else {
            return Ok(());
        };
        match rescope() {
            None => Ok(()),
            Some(Rescoped::Use(now)) => {
                if !Arc::ptr_eq(&now, &self.scrubber) {
                    self.stream.rescope(now.clone());
                    self.scrubber = now;
                }
                Ok(())
            }
            Some(Rescoped::End) => Err(BodyError::ScopeLost),
        }
    }
}

impl Engine for ScrubEngine {
    fn data(&mut self, chunk: Bytes, out: &mut Vec<Bytes>) -> Result<(), BodyError> {
        self.follow_scope()?;
        let Some(frames) = &mut self.frames else {
            self.stream.push(chunk, out);
            return Ok(());
        };
        frames
            .push(chunk, &mut self.plain)
            .map_err(BodyError::Unscrubbable)?;
        for piece in self.plain.drain(..) {
            match piece {
                Piece::Data(bytes) => self.stream.push(bytes, out),
                // Finished at each message end, so a message is not held until the next one
                // comes. An upstream that ends a message inside a value, its next 5 bytes read
                // as a header, passes the value (accepted: ARCHITECTURE "gRPC framing").
                Piece::End => self.stream.finish(out),
            }
        }
        Ok(())
    }

    fn flush(&mut self, out: &mut Vec<Bytes>) -> Result<(), BodyError> {
        self.follow_scope()?;
        if let Some(frames) = &self.frames {
            frames.finish().map_err(BodyError::Unscrubbable)?;
        }
        self.stream.finish(out);
        Ok(())
    }

    fn trailers(&mut self, mut trailers: HeaderMap) -> HeaderMap {
        // An end here is taken at the next data or flush; trailers follow a flush.
        let _ = self.follow_scope();
        self.in_trailers += self.scrubber.scrub_headers(&mut trailers);
        trailers
    }

    /// Inside a message counts: the end of the inner body must still be polled, to fail.
    fn holding(&self) -> bool {
        self.stream.is_holding() || self.frames.as_ref().is_some_and(MessageFrames::in_message)
    }

    fn ended(&mut self) {}
}

impl<B> Body for ScrubBody<B>
where
    B: Body,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.project();
        this.driver.poll(this.body, cx)
    }

    fn is_end_stream(&self) -> bool {
        self.driver.is_end_stream(self.body.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.driver.size_hint(self.body.is_end_stream())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::task::Waker;

    use http_body_util::BodyExt;

    use super::*;
    use crate::secret::{Location, SecretValue};
    use crate::subst::testutil::{as_dyn, fixture, grpc_message, gzip};
    use crate::subst::OnDisallowed;

    /// A scripted body: frames (or errors) in order, `None` = pending forever.
    struct Script {
        items: VecDeque<Option<Result<Frame<Bytes>, std::io::Error>>>,
    }

    impl Script {
        fn data(chunks: &[&[u8]]) -> Self {
            let items = chunks
                .iter()
                .map(|c| Some(Ok(Frame::data(Bytes::copy_from_slice(c)))))
                .collect();
            Script { items }
        }

        fn then(mut self, item: Option<Result<Frame<Bytes>, std::io::Error>>) -> Self {
            self.items.push_back(item);
            self
        }
    }

    impl Body for Script {
        type Data = Bytes;
        type Error = std::io::Error;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
            match self.items.pop_front() {
                None => Poll::Ready(None),
                Some(None) => {
                    self.items.push_front(None);
                    Poll::Pending
                }
                Some(Some(item)) => Poll::Ready(Some(item)),
            }
        }

        fn is_end_stream(&self) -> bool {
            self.items.is_empty()
        }
    }

    fn trailers() -> HeaderMap {
        let mut t = HeaderMap::new();
        t.insert("x-trailer", "sk-live-ALLOWED".parse().unwrap());
        t
    }

    /// Polls until the body is pending or ended; returns the data seen.
    fn drain_ready<B: Body<Data = Bytes> + Unpin>(body: &mut B) -> (Vec<u8>, bool) {
        let mut cx = Context::from_waker(Waker::noop());
        let mut data = Vec::new();
        loop {
            match Pin::new(&mut *body).poll_frame(&mut cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    data.extend_from_slice(frame.data_ref().map_or(&[][..], |d| &d[..]))
                }
                Poll::Ready(Some(Err(_))) => panic!("unexpected error"),
                Poll::Ready(None) => return (data, true),
                Poll::Pending => return (data, false),
            }
        }
    }

    #[tokio::test]
    async fn subst_body_unseals_across_frames_and_reports() {
        let f = fixture();
        let tok = f.allowed.to_string();
        let (a, b) = tok.as_bytes().split_at(20);
        let script =
            Script::data(&[b"{\"k\":\"", a, b, b"\"}"]).then(Some(Ok(Frame::trailers(trailers()))));
        let body = SubstBody::new(script, BodySubst::new(as_dyn(&f), OnDisallowed::Block));
        let outcome = body.outcome();
        let collected = body.collect().await.unwrap();
        assert_eq!(
            collected.trailers().unwrap()["x-trailer"],
            "sk-live-ALLOWED"
        );
        assert_eq!(collected.to_bytes(), &b"{\"k\":\"sk-live-ALLOWED\"}"[..]);
        assert_eq!(outcome.report().unsealed, vec![Arc::from("ALLOWED")]);
        assert!(outcome.denied().is_none());
    }

    /// hyper stops polling a request body once it says it is over (`is_end_stream`), without
    /// the last `None`: what it unsealed is reported by then all the same (before, a body of
    /// known length over the held limit sent its real values with `"unsealed": []` audited).
    #[tokio::test]
    async fn a_body_polled_only_until_it_says_it_is_over_reports_what_it_unsealed() {
        let f = fixture();
        let whole = format!("{{\"k\":\"{}\"}}", f.allowed);
        let inner = http_body_util::Full::new(Bytes::from(whole));
        let mut body = SubstBody::new(inner, BodySubst::new(as_dyn(&f), OnDisallowed::Block));
        let outcome = body.outcome();
        let mut cx = Context::from_waker(Waker::noop());
        let mut data = Vec::new();
        while !body.is_end_stream() {
            match Pin::new(&mut body).poll_frame(&mut cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    data.extend_from_slice(frame.data_ref().map_or(&[][..], |d| &d[..]))
                }
                other => panic!("unexpected {:?}", other.map(|o| o.map(|r| r.is_ok()))),
            }
        }
        assert_eq!(data, b"{\"k\":\"sk-live-ALLOWED\"}");
        assert_eq!(outcome.report().unsealed, vec![Arc::from("ALLOWED")]);
        drop(body);
    }

    #[tokio::test]
    async fn subst_body_flushes_held_tail_at_end() {
        let f = fixture();
        let body = SubstBody::new(
            Script::data(&[b"abc osb_sealed_12"]),
            BodySubst::new(as_dyn(&f), OnDisallowed::Block),
        );
        assert_eq!(
            body.collect().await.unwrap().to_bytes(),
            &b"abc osb_sealed_12"[..]
        );
    }

    #[tokio::test]
    async fn subst_body_denied_is_an_error_and_recorded() {
        let f = fixture();
        let input = format!("x={}", f.denied);
        let body = SubstBody::new(
            Script::data(&[input.as_bytes()]),
            BodySubst::new(as_dyn(&f), OnDisallowed::Block),
        );
        let outcome = body.outcome();
        let err = body.collect().await.unwrap_err();
        assert!(
            matches!(&err, BodyError::Denied(d) if &*d.secret == "DENIED" && d.location == Location::Body)
        );
        assert_eq!(
            err.to_string(),
            "secret DENIED may not be sent to this host"
        );
        assert_eq!(outcome.denied().unwrap().secret.as_ref(), "DENIED");
    }

    #[tokio::test]
    async fn subst_body_upstream_error_is_wrapped() {
        let f = fixture();
        let script = Script::data(&[b"abc"]).then(Some(Err(std::io::Error::other("reset"))));
        let body = SubstBody::new(script, BodySubst::new(as_dyn(&f), OnDisallowed::Block));
        let err = body.collect().await.unwrap_err();
        assert!(matches!(err, BodyError::Upstream(_)));
        assert!(StdError::source(&err).is_some());
    }

    #[test]
    fn subst_body_end_stream_and_size_hint() {
        let f = fixture();
        let empty = SubstBody::new(
            Script::data(&[]),
            BodySubst::new(as_dyn(&f), OnDisallowed::Block),
        );
        assert!(empty.is_end_stream());
        assert_eq!(empty.size_hint().exact(), Some(0));
        let mut body = SubstBody::new(
            Script::data(&[b"abc o"]),
            BodySubst::new(as_dyn(&f), OnDisallowed::Block),
        );
        assert!(!body.is_end_stream());
        assert_eq!(body.size_hint().exact(), None);
        let mut cx = Context::from_waker(Waker::noop());
        let first = Pin::new(&mut body).poll_frame(&mut cx);
        assert!(matches!(first, Poll::Ready(Some(Ok(_)))));
        assert!(!body.is_end_stream(), "the held \"o\" is still due");
        let (rest, ended) = drain_ready(&mut body);
        assert_eq!((rest.as_slice(), ended), (&b"o"[..], true));
        assert!(body.is_end_stream());
    }

    /// The report names a value as soon as its chunk's output is passed on, while the body is
    /// still going (read by an audit line written before the body ends or is dropped).
    #[test]
    fn a_value_passed_on_is_reported_before_the_body_ends() {
        let f = fixture();
        let input = f.allowed.to_string();
        let mut body = SubstBody::new(
            Script::data(&[input.as_bytes(), b" and more"]).then(None),
            BodySubst::new(as_dyn(&f), OnDisallowed::Block),
        );
        let outcome = body.outcome();
        let (data, ended) = drain_ready(&mut body);
        assert!(data.starts_with(b"sk-live-ALLOWED"), "{data:?}");
        assert!(!ended);
        assert_eq!(outcome.report().unsealed, vec![Arc::from("ALLOWED")]);
        drop(body);
    }

    /// So is a token sent sealed (`forward_sealed`): the line names it as refused.
    #[test]
    fn a_token_sent_sealed_is_reported_before_the_body_ends() {
        let f = fixture();
        let input = format!("x={} and more", f.denied);
        let mut body = SubstBody::new(
            Script::data(&[input.as_bytes()]).then(None),
            BodySubst::new(as_dyn(&f), OnDisallowed::ForwardSealed),
        );
        let outcome = body.outcome();
        let (_, ended) = drain_ready(&mut body);
        assert!(!ended);
        assert_eq!(outcome.report().refused.len(), 1);
        drop(body);
    }

    #[test]
    fn subst_body_report_published_on_drop() {
        let f = fixture();
        let input = f.allowed.to_string();
        let mut body = SubstBody::new(
            Script::data(&[input.as_bytes()]).then(None),
            BodySubst::new(as_dyn(&f), OnDisallowed::Block),
        );
        let outcome = body.outcome();
        let (data, ended) = drain_ready(&mut body);
        assert_eq!((data.as_slice(), ended), (&b"sk-live-ALLOWED"[..], false));
        drop(body);
        assert_eq!(outcome.report().unsealed, vec![Arc::from("ALLOWED")]);
    }

    fn scrubber() -> Arc<Scrubber> {
        let pairs = vec![(
            SecretValue::new(b"sk-live-ALLOWED".to_vec()),
            Bytes::from_static(b"osb_sealed_T"),
        )];
        Scrubber::new(pairs).unwrap()
    }

    #[test]
    fn scrub_body_forwards_sse_events_without_waiting() {
        let script =
            Script::data(&[b"data: {\"k\":\"sk-live-ALLOWED\"}\n\n", b"data: sk-live"]).then(None);
        let mut body = ScrubBody::new(script, scrubber());
        let (data, ended) = drain_ready(&mut body);
        assert!(!ended);
        assert_eq!(data, b"data: {\"k\":\"osb_sealed_T\"}\n\n");
    }

    #[tokio::test]
    async fn scrub_body_flushes_at_end_and_scrubs_trailers() {
        let script = Script::data(&[b"a sk-live-ALLOW", b"ED b sk-live"])
            .then(Some(Ok(Frame::trailers(trailers()))));
        let body = ScrubBody::new(script, scrubber());
        let collected = body.collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["x-trailer"], "osb_sealed_T");
        assert_eq!(collected.to_bytes(), &b"a osb_sealed_T b sk-live"[..]);
    }

    /// A tally that keeps what it is told.
    fn told() -> (Tally, Arc<std::sync::Mutex<Vec<usize>>>) {
        let told = Arc::new(std::sync::Mutex::new(Vec::new()));
        let to = told.clone();
        (Box::new(move |n| to.lock().unwrap().push(n)), told)
    }

    #[tokio::test]
    async fn the_tally_is_told_once_what_data_and_trailers_replaced() {
        let script = Script::data(&[b"a sk-live-ALLOW", b"ED b sk-live-ALLOWED"])
            .then(Some(Ok(Frame::trailers(trailers()))));
        let (tally, told) = told();
        let body = ScrubBody::new(script, scrubber()).with_tally(tally);
        body.collect().await.unwrap();
        assert_eq!(*told.lock().unwrap(), [3]);
    }

    #[test]
    fn a_body_cut_off_tells_what_it_had_replaced() {
        let script = Script::data(&[b"x sk-live-ALLOWED\n", b"sk-live"]).then(None);
        let (tally, told) = told();
        let mut body = ScrubBody::new(script, scrubber()).with_tally(tally);
        drain_ready(&mut body);
        assert!(told.lock().unwrap().is_empty(), "told only when dropped");
        drop(body);
        assert_eq!(*told.lock().unwrap(), [1]);
    }

    fn frames() -> Option<MessageFrames> {
        Some(MessageFrames::new(super::super::MessageCoding::Gzip, 1024))
    }

    #[tokio::test]
    async fn binary_bodies_are_scrubbed_at_the_same_length_across_splits() {
        // "sk-live-ALLOWED" (15 bytes) becomes the token "osb_sealed_T" (12 bytes) padded with
        // `_` to 15; a compressed message comes out decoded. Every length prefix stays right.
        let value = b"{\"k\":\"sk-live-ALLOWED\"}";
        let scrubbed = grpc_message(0, b"{\"k\":\"osb_sealed_T___\"}");
        let trailer_frame = grpc_message(0x80, b"grpc-status: 0\r\n");
        let stream = [
            grpc_message(0, value),
            grpc_message(1, &gzip(value)),
            trailer_frame.clone(),
        ]
        .concat();
        let want = [scrubbed.clone(), scrubbed, trailer_frame].concat();
        for cut in 0..=stream.len() {
            let script = Script::data(&[&stream[..cut], &stream[cut..]])
                .then(Some(Ok(Frame::trailers(trailers()))));
            let body = ScrubBody::binary(script, scrubber(), frames());
            let collected = body.collect().await.unwrap();
            assert_eq!(collected.trailers().unwrap()["x-trailer"], "osb_sealed_T");
            assert_eq!(collected.to_bytes(), want, "cut {cut}");
        }
    }

    #[tokio::test]
    async fn a_message_ending_like_the_start_of_a_value_is_not_held_for_the_next_one() {
        // "...sk-" could start "sk-live-ALLOWED", but the message ends there: a streaming call
        // must get it whole now, not when the next message arrives (here: never).
        let m = grpc_message(0, b"ends with sk-");
        let script = Script::data(&[&m[..4], &m[4..]]).then(None);
        let mut body = ScrubBody::binary(script, scrubber(), frames());
        let mut got = Vec::new();
        while got.len() < m.len() {
            let next = tokio::time::timeout(std::time::Duration::from_secs(2), body.frame());
            let frame = next
                .await
                .expect("the whole message without waiting for more");
            got.extend_from_slice(&frame.unwrap().unwrap().into_data().unwrap());
        }
        assert_eq!(got, m);
    }

    #[tokio::test]
    async fn an_unreadable_compressed_message_ends_the_body_before_any_of_it_passes() {
        let plain = grpc_message(0, b"ok");
        let packed = grpc_message(1, b"not gzip ... sk-live-ALLOWED");
        let script = Script::data(&[&plain, &packed[..3], &packed[3..]]);
        let mut body = ScrubBody::binary(script, scrubber(), frames());
        let mut seen = Vec::new();
        let err = loop {
            match body.frame().await {
                Some(Ok(f)) => seen.extend_from_slice(&f.into_data().unwrap()),
                Some(Err(e)) => break e,
                None => panic!("the body ended without an error"),
            }
        };
        assert!(
            matches!(err, BodyError::Unscrubbable(FrameError::Undecodable)),
            "{err}"
        );
        assert_eq!(
            seen, plain,
            "nothing of the compressed message, not even its header"
        );
        assert!(body.frame().await.is_none());
    }

    #[tokio::test]
    async fn a_body_that_ends_inside_a_compressed_message_fails_instead_of_ending_cleanly() {
        let plain = grpc_message(0, b"ok");
        let packed = grpc_message(1, &gzip(b"sk-live-ALLOWED"));
        let cut = &packed[..packed.len() - 2];
        let with_trailers =
            Script::data(&[&plain, cut]).then(Some(Ok(Frame::trailers(trailers()))));
        for script in [Script::data(&[&plain, cut]), with_trailers] {
            let mut body = ScrubBody::binary(script, scrubber(), frames());
            let mut seen = Vec::new();
            let err = loop {
                // hyper stops polling a body that says it is over: it must not say so early.
                assert!(!body.is_end_stream(), "ended with a message held");
                match body.frame().await {
                    Some(Ok(f)) => {
                        let trailers = f.is_trailers();
                        assert!(!trailers, "trailers after a lost message");
                        seen.extend_from_slice(&f.into_data().unwrap());
                    }
                    Some(Err(e)) => break e,
                    None => panic!("the body ended without an error"),
                }
            };
            assert!(
                matches!(err, BodyError::Unscrubbable(FrameError::Truncated)),
                "{err}"
            );
            assert_eq!(seen, plain);
        }
    }

    #[tokio::test]
    async fn length_carrying_bodies_without_framing_are_not_read_as_messages() {
        let script = Script::data(&[b"\x01\x00\x00\x00\x01 sk-live-ALLOWED"]);
        let out = ScrubBody::binary(script, scrubber(), None)
            .collect()
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(&out[..], b"\x01\x00\x00\x00\x01 osb_sealed_T___");
    }

    #[tokio::test]
    async fn scrub_body_upstream_error() {
        let script = Script::data(&[b"abc"]).then(Some(Err(std::io::Error::other("reset"))));
        let err = ScrubBody::new(script, scrubber())
            .collect()
            .await
            .unwrap_err();
        assert!(matches!(err, BodyError::Upstream(_)));
    }

    #[test]
    fn bodies_are_send_and_static() {
        fn assert_send_static<T: Send + 'static>() {}
        assert_send_static::<SubstBody<Script>>();
        assert_send_static::<ScrubBody<Script>>();
    }
}
