//! One request inside a tunnel: authority check, substitution, upstream exchange, scrubbing.
//!
//! Order matters and is the security argument: (1) the request must name the tunnel's host, or
//! it is refused unsubstituted; (2) headers and query are substituted before anything is sent,
//! so a `secret_host_denied` refusal sends nothing upstream; (3) the body is substituted while
//! streaming — a denied token there aborts the upstream request before the token's bytes are
//! written; (4) the response is scrubbed before the sandbox sees it.
//!
//! The steps live in one module each, in that order: [`checks`] (1), [`head`] (2), [`body`] (3),
//! [`send`] (the upstream clients and their retries), [`answer`] (4) and [`upgrade`] (a WebSocket
//! relay, scrubbed too). This module runs them ([`exchange`]) and writes each request's audit
//! line, once, whatever became of it.

mod answer;
mod body;
mod checks;
mod head;
mod orphan;
mod send;
mod upgrade;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use http::{Method, Request, Response, Version};
use http_body::Body;
use hyper::body::Incoming;

use super::linger::{BodyBreak, Detach, Lingering};
use super::progress::{Progress, Stall};
use super::refusal::{Code, Refusal};
use super::response_scrub::{Place, Scope};
use super::unframed::Ahead;
use super::{LiveSettings, ProxyBody, Tunnel};
use crate::audit::RequestEvent;
use crate::policy::Scheme;
use crate::sandbox::HostView;
use crate::subst::{Binary, Report, Scrubber, SubstOutcome};
use answer::{finish_response, read_whole, Asked};
use body::{broken, prepare_body, unframed};
use checks::{
    check_authority, check_egress, check_framing, check_h2_head, check_knowable, check_live,
    check_media_type, check_method, check_upgrade, start_request, still_decided, store_changed,
    unknowable,
};
use head::{
    build_upstream_head, denied, over_budget, unseal_head, whole_responses_only, within_budget,
};
use send::send;
use upgrade::relay_upgrade;

/// Bodies up to this size with a known length (announced, or found by reading an HTTP/1.1
/// chunked body ahead: [`super::unframed`]) are substituted whole, keeping an exact
/// `Content-Length`; larger or slower bodies stream (and are sent chunked).
pub const BUFFER_BODY_MAX: u64 = 64 * 1024;

/// A body a secret may be unsealed into, with a known length up to this, is also read whole
/// (past [`BUFFER_BODY_MAX`], while [`super::whole_bodies::BUDGET`] has room), so it keeps
/// an exact `Content-Length`: streamed, it went without one, and an origin that needs one
/// refused it (lighttpd's CGI over h2: 411; outside interop pass). Larger ones stream.
pub const WHOLE_BODY_MAX: u64 = 1024 * 1024;

/// A request body as the forwarder takes it: what an HTTP/1.1 client sent chunked may have
/// been read ahead ([`super::unframed`]).
type ReqBody = Ahead<Lingering>;

/// What an HTTP/1.1 client's chunked body may be read ahead ([`super::unframed`]): held
/// whole within the bounds any body of known length is.
const READ_AHEAD: super::unframed::Bounds = super::unframed::Bounds {
    free: BUFFER_BODY_MAX,
    max: WHOLE_BODY_MAX,
};

/// Outcome bookkeeping for the audit event.
#[derive(Default)]
struct Outcome {
    report: Report,
    rule: Option<String>,
    bytes_up: u64,
    /// Set once hyper's client took the request to write its head on a connection (values in
    /// it may have left); shared with every attempt's body (`send::attach`).
    handed: Handed,
    /// A streamed request body that may carry secrets: when it is still going up at the
    /// answer (the origin answered early) or when the client left, the line waits for its
    /// end, so that it names every secret unsealed; a refused exchange stops it first.
    pending: Option<Pending>,
}

/// A streamed request body in flight, as the audit line needs it.
struct Pending {
    /// What the substitution saw (final once the body is over).
    body: SubstOutcome,
    /// Its byte count.
    progress: Arc<Progress>,
    /// Takes the body back from the upstream request: stops the upload.
    detach: Detach,
    /// `proxy.max_unsealed_bytes` of the request's settings (for a cut's rule).
    max_unsealed_bytes: usize,
}

/// Serves one request of `tunnel` with the runtime `rt` the caller took for this request
/// (one view of the settings for the whole request, even across a reload). Never fails:
/// refusals become responses. Every request is recorded once ([`super::outcome::record`]),
/// also one whose client gave up before its answer (an h2 stream reset drops this future).
pub async fn handle(
    tunnel: Arc<Tunnel>,
    rt: Arc<LiveSettings>,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let mut line = Line {
        tunnel,
        method: req.method().clone(),
        path: req.uri().path().to_owned(),
        started: Instant::now(),
        outcome: Some(Outcome::default()),
    };
    let linger = rt.proxy.linger;
    let req = req.map(|body| Lingering::new(body, linger));
    // Dropped during the exchange, `line` writes what the exchange had recorded so far.
    let o = line.outcome.as_mut().expect("set above");
    let result = exchange(&line.tunnel, &rt, &line.method, req, o).await;
    let mut outcome = line.outcome.take().unwrap_or_default();
    let (resp, code) = match result {
        Ok(resp) => (resp, None),
        // Audited as a request whose client reset it (`Line`'s drop: 499, no code). A client
        // that only closed its sending side still reads: it gets the uniform 400 for a body
        // that ended before its end (it got a 499 `client_gone` answer: outside re-check).
        Err(refusal) if refusal.code == Code::ClientGone => {
            outcome.rule.get_or_insert_with(|| refusal.message.clone());
            let gone = http::StatusCode::from_u16(499).expect("499 is a status");
            line.finish(outcome, (gone, 0), None);
            let short = "the request body ended before its declared end";
            return Refusal::new(Code::BadRequest, short).into_response();
        }
        Err(refusal) => {
            outcome.rule.get_or_insert_with(|| refusal.message.clone());
            let code = refusal.code;
            (refusal.into_response(), Some(code))
        }
    };
    let answer = (resp.status(), resp.body().size_hint().exact().unwrap_or(0));
    line.finish(outcome, answer, code);
    resp
}

/// What a request's audit line needs besides its outcome. Dropped with an outcome still in
/// it (the request's future was dropped: its client went away before the answer), it writes
/// the line itself, with status 499 — or 503 when the daemon's stop cut it, past its grace.
struct Line {
    tunnel: Arc<Tunnel>,
    method: Method,
    path: String,
    started: Instant,
    outcome: Option<Outcome>,
}

impl Drop for Line {
    fn drop(&mut self) {
        if let Some(mut o) = self.outcome.take() {
            if self.tunnel.state.grace_ran_out() {
                let why = "cut by the daemon's stop: [proxy] shutdown_grace_secs ran out before the answer";
                o.rule.get_or_insert_with(|| why.to_owned());
                self.finish(o, (http::StatusCode::SERVICE_UNAVAILABLE, 0), None);
                return;
            }
            let why = match o.sent() {
                true => "the client gave up before the answer",
                false => "the client gave up before the request was sent",
            };
            o.rule.get_or_insert_with(|| why.to_owned());
            let abandoned = http::StatusCode::from_u16(499).expect("499 is a status");
            self.finish(o, (abandoned, 0), None);
        }
    }
}

impl Line {
    /// Writes the line now, or, when a streamed body that may carry secrets is still going up
    /// (the origin answered early, or the client left), once that body ends: then it names
    /// every secret unsealed.
    fn finish(
        &mut self,
        mut outcome: Outcome,
        answer: (http::StatusCode, u64),
        code: Option<Code>,
    ) {
        let (t, method, path, started) = (
            self.tunnel.clone(),
            self.method.clone(),
            std::mem::take(&mut self.path),
            self.started,
        );
        if !outcome.sent() {
            // Values put into the head or a held body of a request never sent went nowhere:
            // the line names none (a refused or abandoned request named them; review).
            outcome.report.unsealed.clear();
        }
        let Some(pending) = outcome.pending.take() else {
            return record(&t, &method, &path, answer, code, &outcome, started);
        };
        let mut line = Deferred {
            t,
            method,
            path,
            answer,
            code,
            started,
            outcome,
            pending,
            written: false,
        };
        if code.is_some() {
            // A refused exchange (a refused answer, too) sends nothing more: the upload went
            // on unsealing after its line was written `"unsealed": []` (review). Taking the
            // body back drops it at once, so its report is final.
            line.pending.detach.drop_body();
            return line.write();
        }
        let rt = tokio::runtime::Handle::try_current();
        let (Ok(rt), false) = (rt, line.pending.body.is_over()) else {
            return line.write();
        };
        // Tracked: a stop waits for the line (the cut ends the body) before the last flush.
        let state = line.t.state.clone();
        rt.spawn(state.tracked(async move {
            tokio::select! {
                // First: the orphan watch cuts such an upload on the same news (its body is
                // then over too), and the line must name the sandbox's end, not a plain end
                // (CI, stop 59: the line had no code about half the time).
                biased;
                // The sandbox's own upload outlives it no more (it held the line back; review).
                // One that ended on its own just before is not called cut (review h49c).
                () = line.t.sandbox.ended() => {
                    let d = &line.pending.detach;
                    if d.reader_holds() || d.was_taken_back() {
                        line.sandbox_ended();
                    }
                }
                () = line.pending.body.over() => {}
            }
            line.write();
        }));
    }
}

/// A line that waits for its streamed body's end. Dropped unwritten (its task was dropped: the
/// runtime went away after the stop's backstop ran out), it writes what it has, saying so.
struct Deferred {
    t: Arc<Tunnel>,
    method: Method,
    path: String,
    answer: (http::StatusCode, u64),
    /// The exchange's refusal, if any: it stands over a cut found in the body.
    code: Option<Code>,
    started: Instant,
    outcome: Outcome,
    pending: Pending,
    written: bool,
}

impl Deferred {
    /// The sandbox ended while its upload went on: the upload stops, and the line says so.
    fn sandbox_ended(&mut self) {
        self.pending.detach.drop_body();
        let ended = Refusal::new(
            Code::SandboxEnded,
            "the sandbox ended while the upload went on; it was cut there",
        );
        self.outcome.rule.get_or_insert(ended.message);
        self.code = self.code.or(Some(ended.code));
    }

    /// Settles the body's report into the outcome and writes the line (once).
    fn write(&mut self) {
        self.written = true;
        let cut = settle(&self.t, &self.pending, &mut self.outcome);
        let code = self.code.or(cut);
        let (t, o) = (&self.t, &self.outcome);
        record(
            t,
            &self.method,
            &self.path,
            self.answer,
            code,
            o,
            self.started,
        );
    }
}

impl Drop for Deferred {
    fn drop(&mut self) {
        if !self.written {
            self.outcome
                .rule
                .get_or_insert_with(|| "the daemon stopped before the upload's end".to_owned());
            self.write();
        }
    }
}

/// Takes a streamed body's final report and byte count into `o`; when the body was cut after
/// the answer began (or after the client left), the code of the cut, with its rule in `o`: a
/// token it may not carry here, the unsealing budget spent, the sandbox ended or its store
/// changed (the guard stopped it), or the upstream stopped taking it ([`orphan`]).
fn settle(t: &Tunnel, p: &Pending, o: &mut Outcome) -> Option<Code> {
    o.report.merge(&p.body.report());
    o.bytes_up = p.progress.bytes();
    if let Some(d) = p.body.denied() {
        return Some(denied(t, d, o).code);
    }
    let cut = if o.report.over_budget {
        over_budget(p.max_unsealed_bytes)
    } else if p.body.stopped() {
        check_live(t).err().unwrap_or_else(store_changed)
    } else if let Some(stall) = p.progress.cut() {
        stalled_after_answer(stall)
    } else {
        return None;
    };
    o.rule.get_or_insert(cut.message);
    Some(cut.code)
}

/// The cut of an upload that did not move for `upstream.response_timeout_secs` after its answer.
fn stalled_after_answer(stall: Stall) -> Refusal {
    match stall {
        Stall::Upstream => Refusal::new(
            Code::UpstreamTimeout,
            "nothing more of the upload could be written to the upstream for upstream.response_timeout_secs after it answered; the rest was cut",
        ),
        Stall::Sandbox => Refusal::new(
            Code::RequestTimeout,
            "the sandbox sent none of the upload for upstream.response_timeout_secs after its answer; the rest was cut",
        ),
    }
}

/// Writes the request's audit line and counts what it unsealed; `answer` is the response's
/// status and, when known, its length.
fn record(
    t: &Tunnel,
    method: &Method,
    path: &str,
    answer: (http::StatusCode, u64),
    code: Option<Code>,
    o: &Outcome,
    started: Instant,
) {
    let rule = o.rule.clone().or_else(|| sealed_rule(t, &o.report));
    let m = &t.state.metrics;
    // The line and the metric agree: what the line names as unsealed went upstream, whatever
    // became of the exchange after (a 504, an answer refused, a body cut after the answer);
    // a request never sent names nothing. (Refused requests went uncounted, though values
    // had left in these; hostile review.)
    for name in &o.report.unsealed {
        m.count_unseal(name, &t.authority);
    }
    let event = RequestEvent {
        sandbox: Some(&t.sandbox.id),
        mode: t.listener.as_str(),
        host: &t.authority,
        method: method.as_str(),
        path,
        rule,
        unsealed: o.report.unsealed.iter().map(|s| &**s).collect(),
        refused: o.report.refused.iter().map(|s| &**s).collect(),
        status: answer.0.as_u16(),
        bytes_up: o.bytes_up,
        bytes_down: answer.1,
        duration_ms: started.elapsed().as_millis() as u64,
        ..Default::default()
    };
    super::outcome::record(&t.state, code, event);
}

/// With `on_disallowed_token = "forward_sealed"`, why each refused secret travelled sealed.
fn sealed_rule(t: &Tunnel, report: &Report) -> Option<String> {
    if report.refused.is_empty() {
        return None;
    }
    let snap = t.sandbox.snapshot();
    let why: Vec<String> = report
        .refused
        .iter()
        .map(|n| snap.denial_rule(n, &t.dest, t.scheme))
        .collect();
    Some(format!("forwarded sealed: {}", why.join("; ")))
}

async fn exchange(
    t: &Arc<Tunnel>,
    rt: &LiveSettings,
    method: &Method,
    mut req: Request<Lingering>,
    o: &mut Outcome,
) -> Result<Response<ProxyBody>, Refusal> {
    check_live(t)?;
    let (generation, snapshot) = t.sandbox.snapshot_at();
    check_egress(t, &snapshot)?;
    if let Some(super::h1_guard::FramingRefused(r)) = req.extensions_mut().remove() {
        return Err(r);
    }
    check_method(&req)?;
    check_h2_head(&rt.proxy, &req)?;
    check_authority(t, &req)?;
    check_framing(req.headers())?;
    check_media_type(req.headers())?;
    let websocket = check_upgrade(&mut req)?;
    let chunked_h1 = req.version() < Version::HTTP_2 && !websocket && unframed(req.body());
    // gRPC, gRPC-Web and Connect streaming are POSTs: a GET naming a gRPC type (the re-check
    // sent one to an object store) reads a stored blob, framed however it was stored.
    let asks_messages = req.method() == Method::POST && Binary::asks_for_messages(req.headers());
    let slot = start_request(t, rt)?;
    let client_upgrade = websocket.then(|| hyper::upgrade::on(&mut req));
    let view = match t.scheme {
        Scheme::Https => snapshot.view(&t.dest),
        Scheme::Http => snapshot.plain_view(&t.dest),
    };
    check_knowable(t, &snapshot, &view)?;
    let (parts, body) = req.into_parts();
    let mut up = build_upstream_head(t, parts)?;
    unseal_head(t, rt, &view, &mut up, o)?;
    if view.scrubber.is_some() {
        whole_responses_only(up.headers_mut());
    }
    let mut body = Ahead::new(body);
    if chunked_h1 {
        let read = body.read_ahead(READ_AHEAD, &t.sandbox.bodies_held).await;
        read.map_err(|e| broken(BodyBreak::of(&e)))?;
    }
    let (body, streamed) = prepare_body(t, rt, &snapshot, &view, &mut up, body, o).await?;
    still_decided(t, &snapshot, o)?;
    let (body, streaming) = body.tracked();
    if let (Some(outcome), Some((p, detach))) = (&streamed, &streaming) {
        o.pending = Some(Pending {
            body: outcome.clone(),
            progress: p.clone(),
            detach: detach.clone(),
            max_unsealed_bytes: rt.proxy.max_unsealed_bytes,
        });
    }
    let progress = streaming.as_ref().map(|(p, _)| &**p);
    up.extensions_mut().insert(o.handed.clone());
    let sent = send(t, rt, up, body, progress, websocket).await;
    if let Some((p, detach)) = &streaming {
        o.bytes_up = p.bytes();
        if sent.is_err() {
            detach.drop_body(); // not left with a task stuck on the upstream: drained
        }
    }
    if let Some(outcome) = &streamed {
        o.report.merge(&outcome.report());
        if let Some(d) = outcome.denied() {
            return Err(denied(t, d, o));
        }
        within_budget(rt, &o.report)?;
        if outcome.stopped() {
            check_live(t)?;
            return Err(store_changed());
        }
    }
    let resp = sent?;
    let slot = orphan::watch(t, rt, slot, streaming, resp.extensions());
    let mut scope = Scope::since(t, generation);
    let scrubber = answer_scrubber(t, &view, &mut scope)?;
    let scrubbing = (scrubber.clone(), scope.clone());
    let asked = Asked {
        method,
        messages: asks_messages,
    };
    let (resp, whole) = finish_response(t, rt, scrubbing, &o.report, asked, resp, slot)?;
    let resp = match whole {
        true => read_whole(t, resp).await?,
        false => resp,
    };
    match client_upgrade {
        Some(on) if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS => {
            let extras = scrubber
                .as_ref()
                .and_then(|s| s.extras(&o.report.basic_forms));
            Ok(relay_upgrade(t, on, resp, (scrubber, extras), scope))
        }
        _ => Ok(resp),
    }
}

/// The scrubber of the answer: the host's in the request's snapshot, or in the current one
/// if the store changed while the request was out (values unsealed meanwhile are scrubbed
/// from the headers too). A change after which nothing can be unsealed for the host keeps
/// the request's; one after which the node's copy is locked refuses the answer
/// ([`Place::Unknowable`]).
fn answer_scrubber(
    t: &Tunnel,
    view: &HostView,
    scope: &mut Scope,
) -> Result<Option<Arc<Scrubber>>, Refusal> {
    match scope.changed() {
        None | Some(Place::Clear) => Ok(view.scrubber.clone()),
        Some(Place::Scrubbed(s)) => Ok(Some(s)),
        Some(Place::Unknowable) => Err(unknowable(t)),
    }
}

/// Whether a request reached a connection: hyper's client asks the body whether it is empty
/// (`is_end_stream`, `size_hint`) right before it writes the head — h1's dispatcher and h2's
/// client task alike, after checkout, never before — and polls it only after. Not set: the
/// request never left (it waited for a connection, or connecting failed), so its line names
/// no value (DESIGN: a failure writes zero secret bytes). Set by any attempt, so a retry that
/// fails to connect after an attempt that wrote the head still names it (outside re-check).
#[derive(Clone, Default)]
struct Handed(Arc<AtomicBool>);

impl Handed {
    fn mark(&self) {
        self.0.store(true, Ordering::Release);
    }
}

impl Outcome {
    /// True once hyper took the request to a connection ([`Handed`]).
    fn sent(&self) -> bool {
        self.handed.0.load(Ordering::Acquire)
    }
}
