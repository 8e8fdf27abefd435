//! One request inside a tunnel: authority check, substitution, upstream exchange, scrubbing.
//!
//! Order matters and is the security argument: (1) the request must name the tunnel's host, or
//! it is refused unsubstituted; (2) headers and query are substituted before anything is sent,
//! so a `secret_host_denied` refusal sends nothing upstream; (3) the body is substituted while
//! streaming — a denied token there aborts the upstream request before the token's bytes are
//! written; (4) the response is scrubbed before the sandbox sees it.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, Uri, Version};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;

use super::failure::UpstreamCap;
use super::held::Held;
use super::linger::{BodyBreak, ClientFailed, Detach, Detachable, Lingering};
use super::progress::{Progress, Tracked};
use super::refusal::{Code, Refusal};
use super::response_scrub::{
    scrub_response, AnswerTally, Following, Place, Scope, ScopeGained, Scrubbing, Shape,
};
use super::unframed::Ahead;
use super::whole_bodies::Reserved;
use super::{BoxError, LiveSettings, ProxyBody, Tunnel};
use crate::audit::RequestEvent;
use crate::metrics::Counted;
use crate::policy::{self, Scheme};
use crate::sandbox::{HostView, Registry, Sandbox, SlotGuard, Snapshot};
use crate::subst::{
    self, Binary, BodyEncoding, BodyError, BodySubst, Denied, Report, Scrubber, SealedOnly,
    SubstBody, SubstOutcome, TokenLookup,
};

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
    /// it may have left); shared with every attempt's body ([`attach`]).
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
                () = line.pending.body.over() => {}
                // The sandbox's own upload outlives it no more (it held the line back; review).
                () = line.t.sandbox.ended() => line.sandbox_ended(),
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
/// token it may not carry here, the unsealing budget spent, or the sandbox ended or its store
/// changed (the guard stopped it).
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
    } else {
        return None;
    };
    o.rule.get_or_insert(cut.message);
    Some(cut.code)
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

/// The refusal of a request (or its answer) to a host where the store's values may go, while
/// the node's copy of the store is locked: values changed elsewhere meanwhile — rotated
/// through another node — are unknown here, so answers from the host cannot be scrubbed of
/// them (found from outside). Fail closed, as unsealing does.
fn unknowable(t: &Tunnel) -> Refusal {
    Refusal::new(
        Code::Unavailable,
        format!(
            "this node cannot read the sandbox's store now (cut off from the database, or the \
             store quarantined): requests to {}, where its secrets may go, are refused until it \
             can, since their answers could not be scrubbed of values changed meanwhile",
            t.dest
        ),
    )
}

/// Refuses a request to a host where the store's values may go (its `view` scrubs) while
/// the node's copy of the store is locked ([`unknowable`]).
fn check_knowable(t: &Tunnel, snapshot: &Snapshot, view: &HostView) -> Result<(), Refusal> {
    if super::response_scrub::unknowable(snapshot, view) {
        return Err(unknowable(t));
    }
    Ok(())
}

/// One of the sandbox's in-flight request slots (`proxy.max_requests_per_sandbox`), held
/// from before the body is read until the response body is dropped: each request may hold an
/// upstream connection that long, and a sandbox must not spend the daemon's file descriptors.
fn start_request(t: &Tunnel, rt: &LiveSettings) -> Result<SlotGuard, Refusal> {
    let max = rt.proxy.max_requests_per_sandbox;
    t.sandbox.try_start_request(max).ok_or_else(|| {
        Refusal::new(
            Code::TooManyRequests,
            format!("sandbox has {max} requests in flight (proxy.max_requests_per_sandbox)"),
        )
    })
}

/// Before anything is sent: reading the body may have taken long (a held body of up to 64 KiB
/// arrives at the sandbox's pace), so the decisions made with `start`, the request's snapshot,
/// must still hold — the sandbox live, and, if anything was unsealed, its store unchanged.
fn still_decided(t: &Tunnel, start: &Arc<Snapshot>, o: &Outcome) -> Result<(), Refusal> {
    check_live(t)?;
    if o.report.unsealed.is_empty() || Arc::ptr_eq(&t.sandbox.snapshot(), start) {
        return Ok(());
    }
    Err(store_changed())
}

fn store_changed() -> Refusal {
    Refusal::new(
        Code::Unavailable,
        "the sandbox's store changed while the request was being sent; nothing more was \
         unsealed, send the request again",
    )
}

/// The guard of a streamed body ([`SubstBody::with_guard`]): its decisions were made with the
/// sandbox and snapshot of the request's start. Once the sandbox ended (deleted, expired) no
/// further chunk goes out; once its store changed (a secret narrowed, rotated or deleted, the
/// allowlist changed) no chunk that unsealed a value goes out — a body without tokens goes on.
/// Costs a registry lookup per chunk, and a snapshot load per chunk that unsealed.
fn still_current(t: &Tunnel, start: Arc<Snapshot>) -> subst::Guard {
    let (registry, sandbox) = (t.state.registry.clone(), t.sandbox.clone());
    Box::new(move |unsealed| {
        is_live(&registry, &sandbox) && (!unsealed || Arc::ptr_eq(&sandbox.snapshot(), &start))
    })
}

/// A connection opened before its sandbox was deleted or expired must stop working at once:
/// every request re-checks that this exact sandbox is still registered and unexpired.
fn check_live(t: &Tunnel) -> Result<(), Refusal> {
    if is_live(&t.state.registry, &t.sandbox) {
        return Ok(());
    }
    Err(Refusal::new(Code::SandboxEnded, "this sandbox has ended"))
}

/// True while this exact sandbox is registered and unexpired (not a later one of the same id).
fn is_live(registry: &Registry, sandbox: &Arc<Sandbox>) -> bool {
    registry
        .get(&sandbox.id)
        .is_some_and(|live| Arc::ptr_eq(&live, sandbox))
}

/// The store's allowlist is read per request, not only when the tunnel opened: a host removed
/// from `egress_allowlist` gets no further request through a tunnel that is already open (a
/// keep-alive connection could otherwise outlive the change indefinitely).
fn check_egress(t: &Tunnel, snapshot: &Snapshot) -> Result<(), Refusal> {
    if snapshot.egress_allowed(&t.dest, t.scheme) {
        return Ok(());
    }
    Err(Refusal::new(
        Code::EgressDenied,
        format!("{} is no longer in the store's egress_allowlist", t.dest),
    ))
}

fn check_method<B>(req: &Request<B>) -> Result<(), Refusal> {
    if req.method() == Method::CONNECT {
        return Err(Refusal::new(
            Code::MethodNotAllowed,
            "CONNECT is not allowed inside a tunnel",
        ));
    }
    Ok(())
}

/// Every request must name exactly the tunnel's host and port (DESIGN.md §3 "Destination truth").
fn check_authority<B>(t: &Tunnel, req: &Request<B>) -> Result<(), Refusal> {
    let default_port = t.scheme.default_port();
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(Refusal::new(Code::BadRequest, "duplicate Host header"));
    }
    if req.version() <= Version::HTTP_11 && host.is_none() {
        return Err(Refusal::new(Code::BadRequest, "missing Host header"));
    }
    if let Some(h) = host {
        let h = h
            .to_str()
            .map_err(|_| Refusal::new(Code::BadRequest, "Host header is not ASCII"))?;
        same_dest(t, h, default_port, "Host")?;
    }
    if let Some(a) = req.uri().authority() {
        if let Some(s) = req.uri().scheme_str() {
            if !s.eq_ignore_ascii_case(scheme_str(t.scheme)) {
                return Err(Refusal::new(
                    Code::AuthorityMismatch,
                    format!("scheme {s} does not match the tunnel"),
                ));
            }
        }
        same_dest(t, a.as_str(), default_port, "request URI")?;
    } else if host.is_none() {
        return Err(Refusal::new(Code::BadRequest, "request names no host"));
    }
    Ok(())
}

fn scheme_str(s: Scheme) -> &'static str {
    match s {
        Scheme::Https => "https",
        Scheme::Http => "http",
    }
}

fn same_dest(t: &Tunnel, raw: &str, default_port: u16, what: &str) -> Result<(), Refusal> {
    if names_exactly(&t.dest, raw, default_port) {
        return Ok(());
    }
    let d = policy::parse_authority(raw, Some(default_port))
        .map_err(|e| Refusal::new(Code::BadRequest, format!("{what}: {e}")))?;
    if d != t.dest {
        return Err(Refusal::new(
            Code::AuthorityMismatch,
            format!("{what} names {d} but this connection is for {}", t.dest),
        ));
    }
    Ok(())
}

/// True if `raw` is `dest`'s own text — its name, when `dest.port` is `default_port`, or
/// `name:port` with the port as written by [`policy::Dest`] — which parses to `dest` itself
/// (a parsed name is its own canonical form): the parse, ~1,500 instructions, is skipped for
/// the `Host` nearly every client sends. Anything else (case, a trailing dot, an IP literal,
/// leading zeros) takes the parse.
fn names_exactly(dest: &policy::Dest, raw: &str, default_port: u16) -> bool {
    let policy::Host::Name(name) = &dest.host else {
        return false;
    };
    match raw.strip_prefix(name.as_str()) {
        Some("") => dest.port == default_port,
        Some(rest) => rest.strip_prefix(':').is_some_and(|port| {
            !port.starts_with('0')
                && port.len() <= 5
                && port.bytes().all(|b| b.is_ascii_digit())
                && port.parse::<u16>() == Ok(dest.port)
        }),
        None => false,
    }
}

/// hyper accepts CL+TE (and drops CL) and repeated CLs; a proxy must not. On h1 the bytes were
/// already judged by [`super::h1_guard`] (hyper hides CL+TE from this header map); this check
/// stays as the second line for h2 and anything that reaches it.
fn check_framing(h: &HeaderMap) -> Result<(), Refusal> {
    let mut cls = h.get_all(header::CONTENT_LENGTH).iter();
    let Some(cl) = cls.next() else {
        return Ok(());
    };
    if cls.next().is_some() {
        return Err(Refusal::new(
            Code::BadRequest,
            "multiple Content-Length headers",
        ));
    }
    if h.contains_key(header::TRANSFER_ENCODING) {
        return Err(Refusal::new(
            Code::BadRequest,
            "both Content-Length and Transfer-Encoding",
        ));
    }
    let ok = cl
        .to_str()
        .ok()
        .is_some_and(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()));
    if !ok {
        return Err(Refusal::new(Code::BadRequest, "malformed Content-Length"));
    }
    Ok(())
}

/// A body has one media type (RFC 9110 §8.3: `Content-Type` is a singleton field). The first
/// field decides how a value is written into the body (form-encoded, JSON-escaped, or not at
/// all inside gRPC messages), so two fields would let the sandbox have sealgate write it for
/// one type while the origin reads another (outside review). Repeats of one value are
/// harmless and pass.
fn check_media_type(h: &HeaderMap) -> Result<(), Refusal> {
    let mut types = h.get_all(header::CONTENT_TYPE).iter();
    let first = types.next();
    if types.any(|t| Some(t) != first) {
        return Err(Refusal::new(
            Code::BadRequest,
            "Content-Type headers that disagree (a body has one media type)",
        ));
    }
    Ok(())
}

/// An h2 request head over `proxy.max_header_bytes` (counted as RFC 9113 §6.5.2 does: name,
/// value and 32 bytes per field, pseudo-header fields included) or with more than
/// `proxy.max_header_fields` fields gets the same 431 an h1 head gets from the
/// [`super::h1_guard`]. The h2 server's own limit is set above this one
/// ([`super::serve`]), so that a client sees sealgate's answer, not a reset stream or a
/// connection error it would retry.
fn check_h2_head<B>(p: &crate::config::ProxyConfig, req: &Request<B>) -> Result<(), Refusal> {
    if req.version() != Version::HTTP_2 {
        return Ok(());
    }
    let h = req.headers();
    if h.len() > p.max_header_fields {
        return Err(Refusal::new(
            Code::HeadersTooLarge,
            "more header fields than proxy.max_header_fields",
        ));
    }
    const PSEUDO: usize = ":method:scheme:authority:path".len() + 4 * 32;
    let uri = req.uri();
    let pseudo = PSEUDO
        + req.method().as_str().len()
        + uri.scheme_str().map_or(0, str::len)
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path_and_query().map_or(0, |pq| pq.as_str().len());
    let fields: usize = h.iter().map(|(n, v)| n.as_str().len() + v.len() + 32).sum();
    if pseudo + fields > p.max_header_bytes {
        return Err(Refusal::new(
            Code::HeadersTooLarge,
            "request header section is larger than proxy.max_header_bytes",
        ));
    }
    Ok(())
}

/// Only WebSocket upgrades on HTTP/1.1 GET are relayed. An offer of `h2c` alone is ignored,
/// as RFC 9110 §7.8 lets a server do: its fields go and the request is served over HTTP/1.1
/// (curl offers it on every `http://` URL with `--http2`, and was refused: outside pass).
/// Others are refused.
fn check_upgrade<B>(req: &mut Request<B>) -> Result<bool, Refusal> {
    let Some(up) = req.headers().get(header::UPGRADE) else {
        return Ok(false);
    };
    if up.as_bytes().trim_ascii().eq_ignore_ascii_case(b"h2c") {
        req.headers_mut().remove(header::UPGRADE);
        req.headers_mut().remove("http2-settings");
        return Ok(false);
    }
    let ws = up.as_bytes().eq_ignore_ascii_case(b"websocket");
    if !ws || req.method() != Method::GET || req.version() != Version::HTTP_11 {
        return Err(Refusal::new(
            Code::BadRequest,
            "only WebSocket upgrades are supported",
        ));
    }
    Ok(true)
}

/// `Keep-Alive`, which `http` has no constant for.
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");

/// Hop-by-hop headers never cross the proxy (RFC 9110 §7.6.1), nor do `Proxy-*` headers.
/// `Trailer` is end-to-end (RFC 9110 §6.6.2) and stays: hyper's HTTP/1 side only sends the
/// trailer fields it announces. On every request's path: no name is parsed from a string and
/// nothing is allocated unless a `Connection` or `Proxy-*` field is there.
fn strip_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool) {
    if h.contains_key(header::CONNECTION) {
        let listed: Vec<HeaderName> = h
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .collect();
        for n in listed {
            if !(keep_upgrade && n == header::UPGRADE) {
                h.remove(n);
            }
        }
        h.remove(header::CONNECTION);
    }
    for n in [KEEP_ALIVE, header::TE, header::TRANSFER_ENCODING] {
        h.remove(n);
    }
    // Proxy-Connection, Proxy-Authorization, Proxy-Authenticate and any other Proxy-*.
    if h.keys().any(|k| k.as_str().starts_with("proxy-")) {
        let proxy_headers: Vec<HeaderName> = h
            .keys()
            .filter(|k| k.as_str().starts_with("proxy-"))
            .cloned()
            .collect();
        for n in proxy_headers {
            h.remove(n);
        }
    }
    if keep_upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        h.remove(header::UPGRADE);
    }
}

/// The head sent upstream: origin-form path and query under the tunnel's one authority
/// ([`Tunnel::origin`]), hop-by-hop headers removed, and **no** `Host` of the client's: the
/// pooled client writes the authority exactly once — `:authority` on HTTP/2, `Host` on
/// HTTP/1 — so a server never sees two (nginx < 1.25 answers 400 to `Host` beside
/// `:authority`). `TE: trailers` is the one `TE` value kept (gRPC requires it).
fn build_upstream_head(t: &Tunnel, parts: http::request::Parts) -> Result<Request<()>, Refusal> {
    let websocket = parts.headers.contains_key(header::UPGRADE);
    let pq = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    let uri = Uri::builder()
        .scheme(scheme_str(t.scheme))
        .authority(t.origin.clone())
        .path_and_query(pq)
        .build()
        .map_err(|_| Refusal::new(Code::BadRequest, "request target is not a valid URI"))?;
    let mut req = Request::from_parts(parts, ());
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_11;
    let trailers = accepts_trailers(req.headers());
    strip_hop_by_hop(req.headers_mut(), websocket);
    one_cookie_field(req.headers_mut());
    req.headers_mut().remove(header::HOST);
    // Request trailers are never forwarded (`linger::Lingering` drops them): nor their notice.
    req.headers_mut().remove(header::TRAILER);
    if trailers {
        req.headers_mut()
            .insert(header::TE, HeaderValue::from_static("trailers"));
    }
    Ok(req)
}

/// Joins several `Cookie` fields into one, with `; ` (RFC 9113 §8.2.3: h2 clients send each
/// cookie as its own field, and they "MUST be concatenated" before an HTTP/1.1 hop; RFC 6265
/// §5.4: one field). The upstream may be either; one field is right for both (outside pass
/// h38a: nginx and Node join crumbs themselves, servers that keep one field lose the rest).
fn one_cookie_field(h: &mut HeaderMap) {
    let mut cookies = h.get_all(header::COOKIE).iter();
    if cookies.next().is_none() || cookies.next().is_none() {
        return;
    }
    let crumbs = h.get_all(header::COOKIE);
    let mut joined = Vec::with_capacity(crumbs.iter().map(|c| c.len() + 2).sum());
    for c in crumbs {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(c.as_bytes());
    }
    // Valid field values joined by "; " are a valid field value.
    if let Ok(one) = HeaderValue::from_maybe_shared(Bytes::from(joined)) {
        h.insert(header::COOKIE, one);
    }
}

/// True if any `TE` field lists `trailers` (RFC 9110 §10.1.4; case-insensitive token).
fn accepts_trailers(h: &HeaderMap) -> bool {
    h.get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            t.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case("trailers")
        })
}

fn unseal_head(
    t: &Tunnel,
    rt: &LiveSettings,
    view: &HostView,
    req: &mut Request<()>,
    o: &mut Outcome,
) -> Result<(), Refusal> {
    if view.is_empty() {
        return Ok(());
    }
    let mode = rt.proxy.on_disallowed_token;
    o.report.max_unsealed = Some(rt.proxy.max_unsealed_bytes);
    subst::substitute_headers(req.headers_mut(), view, mode, &mut o.report)
        .map_err(|d| denied(t, d, o))?;
    if view.any_query {
        if let Some(uri) = subst::substitute_query(req.uri(), view, mode, &mut o.report)
            .map_err(|d| denied(t, d, o))?
        {
            *req.uri_mut() = uri;
        }
    }
    within_budget(rt, &o.report)
}

/// A request that would carry more than `proxy.max_unsealed_bytes` of real values (tokens of a
/// large secret, many times over) is refused: the token past the budget was never unsealed
/// ([`subst::Report::max_unsealed`]); nothing was sent for a budget passed in the head or a
/// held body, and a streamed body is cut off where it passed.
fn within_budget(rt: &LiveSettings, report: &subst::Report) -> Result<(), Refusal> {
    if !report.over_budget {
        return Ok(());
    }
    Err(over_budget(rt.proxy.max_unsealed_bytes))
}

/// The refusal of a request over its unsealing budget of `max` bytes.
fn over_budget(max: usize) -> Refusal {
    Refusal::new(
        Code::PayloadTooLarge,
        format!(
            "the request would carry more than {max} bytes of real secret values \
             (proxy.max_unsealed_bytes), Basic credentials over {} bytes, or more than {} \
             distinct Basic credentials",
            subst::MAX_BASIC_CREDENTIALS,
            subst::MAX_BASIC_FORMS
        ),
    )
}

/// What is left of the request's budget for its body.
fn body_budget(rt: &LiveSettings, o: &Outcome) -> usize {
    rt.proxy
        .max_unsealed_bytes
        .saturating_sub(o.report.unsealed_bytes)
}

/// Where responses are scrubbed, the request may not ask for part of a resource: the scrubber
/// matches whole values, so two ranges (`bytes=0-11`, `bytes=12-`) of a response holding a real
/// value — one the sandbox stored there itself through its token — would carry it past the
/// scrubber in halves. Without `Range` the origin answers the whole resource (RFC 9110 §14.2
/// lets any server ignore it), which is scrubbed; a 206 is refused anyway
/// ([`super::response_scrub`]). Likewise gRPC and Connect clients may accept only
/// uncompressed messages here (`grpc-accept-encoding: identity`): a compressed message must be
/// decoded whole before it can be scrubbed (see [`super::response_scrub`]); a WebSocket
/// upgrade offers no extension (its frames are scrubbed, none may come compressed). And the body is
/// decoded to be scrubbed, so the sandbox gets it uncoded whatever the upstream used: it is
/// asked for no coding whose decoder holds a large window ([`small_window_codings_only`]).
fn whole_responses_only(h: &mut HeaderMap) {
    h.remove(header::RANGE);
    h.remove(header::IF_RANGE);
    for name in &MESSAGE_ACCEPT_ENCODINGS {
        if h.contains_key(name) {
            h.insert(name, HeaderValue::from_static("identity"));
        }
    }
    small_window_codings_only(h);
    // WebSocket frames are scrubbed here (`super::ws_scrub`): none compressed.
    h.remove(header::SEC_WEBSOCKET_EXTENSIONS);
}

/// The fields by which gRPC and Connect clients offer compressed messages.
const MESSAGE_ACCEPT_ENCODINGS: [HeaderName; 2] = [
    HeaderName::from_static("grpc-accept-encoding"),
    HeaderName::from_static("connect-accept-encoding"),
];

/// Drops `br` (a decoder holds up to a 16 MiB window), `zstd` (8 MiB) and `*` from
/// `Accept-Encoding`; gzip and deflate (32 KiB) stay, a value that is not text goes, and a
/// list left empty becomes `identity`. A decoder's window stays allocated while the sandbox's
/// client does not read: an outside review held ~16 MiB per stalled brotli answer (500 MiB
/// with 30). Upstreams that send them anyway meet `[upstream] max_window_decoders[_per_sandbox]`.
///
/// # Cost
/// One pass when nothing is dropped; else one more and one allocation, the new value (most
/// clients offer `br`: this runs on nearly every request to a scrubbed host).
fn small_window_codings_only(h: &mut HeaderMap) {
    let values = h.get_all(header::ACCEPT_ENCODING);
    let keeps_all = |v: &HeaderValue| v.to_str().is_ok_and(|v| !v.split(',').any(is_large_window));
    if values.iter().all(keeps_all) {
        return;
    }
    let mut kept = String::with_capacity(values.iter().map(|v| v.len() + 2).sum());
    let items = values.iter().filter_map(|v| v.to_str().ok());
    for item in items.flat_map(|v| v.split(',')).map(str::trim_ascii) {
        if !item.is_empty() && !is_large_window(item) {
            if !kept.is_empty() {
                kept.push_str(", ");
            }
            kept.push_str(item);
        }
    }
    let identity = HeaderValue::from_static("identity");
    let kept = match kept.is_empty() {
        true => identity,
        false => HeaderValue::from_maybe_shared(Bytes::from(kept)).unwrap_or(identity),
    };
    h.insert(header::ACCEPT_ENCODING, kept);
}

/// True if an `Accept-Encoding` item names a coding with a large decoder window, or any.
fn is_large_window(item: &str) -> bool {
    let coding = item.split_once(';').map_or(item, |(c, _)| c).trim_ascii();
    coding.eq_ignore_ascii_case("br") || coding.eq_ignore_ascii_case("zstd") || coding == "*"
}

/// The sandbox sees the secret name and host; the audit `rule` also names the policy list that
/// excluded the host and where the token was found.
fn denied(t: &Tunnel, d: Denied, o: &mut Outcome) -> Refusal {
    let location = match d.location {
        crate::secret::Location::Header => "header",
        crate::secret::Location::Query => "query",
        crate::secret::Location::Body => "body",
    };
    o.rule = Some(format!(
        "{} (token found in the {location})",
        t.sandbox
            .snapshot()
            .denial_rule(&d.secret, &t.dest, t.scheme)
    ));
    if !o.report.refused.contains(&d.secret) {
        o.report.refused.push(d.secret.clone());
    }
    Refusal::new(
        Code::SecretHostDenied,
        format!(
            "secret {} may not be sent to {} (secret allowed_hosts / store egress_allowlist)",
            d.secret, t.dest
        ),
    )
}

/// A request body as it goes upstream: held in full (it can be sent again) or streamed.
enum UpBody {
    /// Every byte, already substituted where that applies.
    Held(Bytes),
    /// Streams through (and is consumed by) the first attempt.
    Streamed(ProxyBody),
}

impl UpBody {
    /// A streamed body reporting to a new [`Progress`], that the forwarder can take back
    /// ([`Detach`]); a held one as it is.
    fn tracked(self) -> (UpBody, Option<(Arc<Progress>, Detach)>) {
        match self {
            UpBody::Streamed(b) => {
                let progress = Progress::new();
                let b = Tracked::new(b, progress.clone()).boxed_unsync();
                let (b, detach) = Detachable::new(b);
                (UpBody::Streamed(b.boxed_unsync()), Some((progress, detach)))
            }
            held => (held, None),
        }
    }
}

/// Chooses the body path: held in full when its length is known and at most
/// [`BUFFER_BODY_MAX`], or, where body secrets apply, at most [`WHOLE_BODY_MAX`] within the
/// budget of [`read_whole_body`] (substituted whole where body secrets apply; an exact
/// `Content-Length` is kept, and the request can be retried), else streamed — through the
/// engine when body secrets apply (`Content-Length` dropped; HTTP/1.1 upstreams get chunked
/// encoding), untouched otherwise (no body-located secret, or a compressed body). In a body
/// that counts its own bytes (gRPC, protobuf: [`Binary`]) a value in place of its 43-byte token
/// would break the message, so there the engine only refuses ([`SealedOnly`]): allowed tokens
/// travel sealed.
async fn prepare_body(
    t: &Tunnel,
    rt: &LiveSettings,
    snapshot: &Arc<Snapshot>,
    view: &Arc<HostView>,
    req: &mut Request<()>,
    mut body: ReqBody,
    o: &mut Outcome,
) -> Result<(UpBody, Option<SubstOutcome>), Refusal> {
    let scan =
        view.any_body && !view.is_empty() && !compressed(req.headers()) && !body.is_end_stream();
    if !scan {
        if let Some(reserved) = held_whole(t, &mut body, BUFFER_BODY_MAX) {
            let read_ahead = body.is_whole();
            let whole = reserved.holding(collect_small(t, rt, body).await?);
            o.bytes_up = whole.len() as u64;
            if read_ahead {
                req.headers_mut()
                    .insert(header::CONTENT_LENGTH, HeaderValue::from(whole.len()));
            }
            return Ok((UpBody::Held(whole), None));
        }
        o.bytes_up = body.size_hint().exact().unwrap_or(0);
        req.extensions_mut().insert(watch(&mut body));
        return Ok((
            UpBody::Streamed(body.map_err(BoxError::from).boxed_unsync()),
            None,
        ));
    }
    let lookup: Arc<dyn TokenLookup> = match Binary::of(req.headers()) {
        Some(_) => Arc::new(SealedOnly(view.clone())),
        None => view.clone(),
    };
    let mode = rt.proxy.on_disallowed_token;
    let budget = body_budget(rt, o);
    if let Some(reserved) = held_whole(t, &mut body, WHOLE_BODY_MAX) {
        let whole = substitute_whole(t, rt, lookup, mode, req, body, o).await?;
        return Ok((UpBody::Held(reserved.holding(whole)), None));
    }
    req.headers_mut().remove(header::CONTENT_LENGTH);
    req.extensions_mut().insert(watch(&mut body));
    let engine = BodySubst::new(lookup, mode)
        .with_max_unsealed(budget)
        .with_encoding(BodyEncoding::of(req.headers()));
    let sb = SubstBody::new(body, engine).with_guard(still_current(t, snapshot.clone()));
    let outcome = sb.outcome();
    Ok((
        UpBody::Streamed(sb.map_err(BoxError::from).boxed_unsync()),
        Some(outcome),
    ))
}

/// Whether `body` is read whole, with the budget's hold on it (which lasts as long as the
/// held bytes): one read ahead to its end always (its reservation, if it needed one, moves
/// here), one of announced length `n` if `n` is at most [`BUFFER_BODY_MAX`], or at most
/// `max` when [`super::whole_bodies::BUDGET`] and the sandbox's share of it have room for it.
fn held_whole(t: &Tunnel, body: &mut ReqBody, max: u64) -> Option<Reserved> {
    if body.is_whole() {
        return Some(body.take_reserved());
    }
    match body.size_hint().exact()? {
        n if n <= BUFFER_BODY_MAX => Some(Reserved::none()),
        n if n <= max => Reserved::take(n, &t.sandbox.bodies_held),
        _ => None,
    }
}

/// Whether an HTTP/1.1 request's body is chunked: it has one, of no announced length.
fn unframed(body: &Lingering) -> bool {
    body.size_hint().exact().is_none() && !body.is_end_stream()
}

/// The flag recording how a streamed body breaks (a body read ahead to its end cannot).
fn watch(body: &mut ReqBody) -> ClientFailed {
    body.rest_mut().map(Lingering::watch).unwrap_or_default()
}

/// Reads a body [`held_whole`] without substitution into one buffer.
async fn collect_small(t: &Tunnel, rt: &LiveSettings, body: ReqBody) -> Result<Bytes, Refusal> {
    Ok(joined(collect_frames(t, rt, body).await?))
}

/// The data of a body [`held_whole`] (at most [`WHOLE_BODY_MAX`]), in
/// [`super::pieces::Pieces`]: frames of 16 KiB or more as received, smaller ones copied
/// together (an h2 client's one-byte DATA frames cost their bytes, not a `Bytes` each);
/// trailers are dropped.
///
/// # Errors
/// 400 when the body breaks off; 408 when no byte of it came for `response_timeout_secs`,
/// as for a streamed body (a held one that stalled waited for as long as its client kept the
/// connection, holding its request slot and its share of [`super::whole_bodies::BUDGET`]).
async fn collect_frames(
    t: &Tunnel,
    rt: &LiveSettings,
    body: ReqBody,
) -> Result<Vec<Bytes>, Refusal> {
    let stall = rt.upstream.config.response_timeout;
    let mut body = Limited::new(body, WHOLE_BODY_MAX as usize);
    let mut frames = super::pieces::Pieces::default();
    loop {
        let Ok(frame) = tokio::time::timeout(stall, body.frame()).await else {
            return Err(body_stalled(t));
        };
        let Some(frame) = frame else { break };
        let frame = frame.map_err(|_| {
            Refusal::new(
                Code::BadRequest,
                "request body ended early or exceeded its Content-Length",
            )
        })?;
        if let Ok(data) = frame.into_data() {
            frames.push(data);
        }
    }
    Ok(frames.into_vec())
}

/// `pieces` as one buffer: the piece itself when there is only one, else one copy.
fn joined(mut pieces: Vec<Bytes>) -> Bytes {
    if pieces.len() <= 1 {
        return pieces.pop().unwrap_or_default();
    }
    pieces.concat().into()
}

/// Substitutes a held body frame by frame (the engine carries a token split across frames)
/// and joins the result once: one copy of the body, not one to join the frames and another
/// to join the substituted pieces.
async fn substitute_whole(
    t: &Tunnel,
    rt: &LiveSettings,
    lookup: Arc<dyn TokenLookup>,
    mode: subst::OnDisallowed,
    req: &mut Request<()>,
    body: ReqBody,
    o: &mut Outcome,
) -> Result<Bytes, Refusal> {
    let frames = collect_frames(t, rt, body).await?;
    let mut engine = BodySubst::new(lookup, mode)
        .with_max_unsealed(body_budget(rt, o))
        .with_encoding(BodyEncoding::of(req.headers()));
    let mut out = Vec::new();
    for frame in frames {
        engine.push(frame, &mut out).map_err(|d| denied(t, d, o))?;
        if engine.report().over_budget {
            break;
        }
    }
    engine.finish(&mut out);
    o.report.merge(engine.report());
    within_budget(rt, &o.report)?;
    let whole = joined(out);
    o.bytes_up = whole.len() as u64;
    req.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(whole.len()));
    Ok(whole)
}

/// A body in a content coding is not unsealed (DESIGN.md §3 "Where": "not inside compressed
/// encodings"): every `Content-Encoding` field counts (outside review: `identity` then
/// `gzip` had the value written into a gzip member).
fn compressed(h: &HeaderMap) -> bool {
    super::response_scrub::is_coded(h)
}

/// The refusal of a wait for the answer that timed out: the sandbox's if its own streamed
/// body was what the request waited on (a stalled upload answered 504 and blamed the origin;
/// outside review), else the upstream's. An upstream that stops reading does not have the
/// body polled, so its stall stays a 504.
fn timed_out(t: &Tunnel, progress: Option<&Progress>) -> Refusal {
    if progress.is_some_and(Progress::waiting_on_body) {
        return body_stalled(t);
    }
    Refusal::new(
        Code::UpstreamTimeout,
        format!(
            "{} did not answer in time (upstream.response_timeout_secs, counted from the \
             request's last byte)",
            t.dest
        ),
    )
}

/// The refusal of a request whose body broke on the client's side (`b` is not
/// [`BodyBreak::None`]).
fn broken(b: BodyBreak) -> Refusal {
    match b {
        BodyBreak::Malformed => Refusal::new(
            Code::BadRequest,
            "the request body's framing broke off mid-body",
        ),
        _ => Refusal::new(
            Code::ClientGone,
            "the client gave up before the answer (its connection ended mid-body)",
        ),
    }
}

/// The sandbox's own upload stopped: 408 (held or streamed alike).
fn body_stalled(t: &Tunnel) -> Refusal {
    Refusal::new(
        Code::RequestTimeout,
        format!(
            "the request body to {} stopped: no byte for upstream.response_timeout_secs",
            t.dest
        ),
    )
}

/// Sends the request and waits for the response head: `response_timeout` from the request's
/// last byte (a streamed body's `progress`; see [`super::progress`]).
///
/// Held-body requests to an origin that has answered over h2 go to the h2-only client (one
/// connection attempt at a time, see [`super::upstream::KnownH2`]); if that origin no longer
/// chooses h2, it is forgotten and the request goes to the dual-protocol client (nothing was
/// sent). Streamed bodies stay on the dual-protocol client: their bytes could not be sent
/// twice.
///
/// A request the upstream provably did not process — refused with REFUSED_STREAM, or on a
/// stream above a GOAWAY's last-stream-id (see [`super::upstream::RefuseAfterGoaway`]) — is
/// sent again when its body was held in full: on `client_retry`'s pool (so the requests one
/// GOAWAY refuses share one new connection rather than open one each), and if that refuses
/// too, once more on a fresh connection. An idempotent request whose HTTP/1 connection closed
/// under it goes again on a fresh connection straight away ([`super::failure::over_h2`]).
/// HTTP/1 connections closed before the request was written are retried by the pooled client
/// itself.
async fn send(
    t: &Tunnel,
    rt: &LiveSettings,
    head: Request<()>,
    body: UpBody,
    progress: Option<&Progress>,
    websocket: bool,
) -> Result<Response<Incoming>, Refusal> {
    let started = Instant::now();
    let timeout = rt.upstream.config.response_timeout;
    let client_failed = head.extensions().get::<ClientFailed>().cloned();
    let sending = attempts(t, rt, head, body, websocket);
    tokio::pin!(sending);
    let answered = loop {
        let until = super::progress::deadline(started, progress, timeout);
        match tokio::time::timeout_at(until.into(), &mut sending).await {
            Ok(answered) => break answered,
            // The body moved meanwhile: the wait is counted from its last byte.
            Err(_) if super::progress::deadline(started, progress, timeout) > until => {}
            Err(_) => return Err(timed_out(t, progress)),
        }
    };
    let broke = client_failed.map_or(BodyBreak::None, |f| f.get());
    let resp = match answered {
        Err(_) if broke != BodyBreak::None => return Err(broken(broke)),
        Err(e) => return Err(super::failure::classify(t, &e)),
        Ok(r) => r,
    };
    t.state
        .metrics
        .upstream_latency
        .observe(started.elapsed().as_secs_f64());
    Ok(resp)
}

type Attempt = Result<Response<Incoming>, hyper_util::client::legacy::Error>;

/// The attempts of [`send`], without its timeout.
async fn attempts(
    t: &Tunnel,
    rt: &LiveSettings,
    head: Request<()>,
    body: UpBody,
    websocket: bool,
) -> Attempt {
    let bytes = match body {
        UpBody::Held(b) => b,
        UpBody::Streamed(b) => return send_streamed(t, rt, websocket, head, b).await,
    };
    // Only TLS origins can have chosen h2 (ALPN); `known_h2` is keyed by the origin without
    // its default port, so `http://H` and `https://H` share a key, and a plain request sent
    // after an h2 answer from `https://H` went to the h2-only client, which spoke h2 in clear
    // to the plain origin (502 for every sandbox until a reload: two outside passes).
    let tls = t.scheme == Scheme::Https;
    let h2 = tls && !websocket && rt.known_h2.contains(&t.origin);
    let which = match (websocket, h2) {
        (true, _) => Which::H1,
        (false, true) => Which::H2,
        (false, false) => Which::Either,
    };
    match send_held(t, rt, which, &head, &bytes).await {
        Ok(resp) => {
            if tls && !h2 && resp.version() == Version::HTTP_2 {
                rt.known_h2.learn(&t.origin);
            }
            Ok(resp)
        }
        Err(e) if h2 && super::failure::not_h2(&e) => {
            rt.known_h2.forget(&t.origin);
            send_held(t, rt, Which::Either, &head, &bytes).await
        }
        Err(e) if super::failure::may_send_again(&e, head.method()) => {
            tracing::debug!(dest = %t.dest, error = %super::failure::chain(&e),
                "upstream did not process the request, or it is idempotent; retrying");
            match h2 || super::failure::over_h2(&e) {
                true => retry(t, rt, &head, &bytes).await,
                // An HTTP/1 connection closed under it (a kept-alive connection the origin
                // timed out): a new connection, offering both protocols.
                false => send_held(t, rt, Which::Fresh, &head, &bytes).await,
            }
        }
        Err(e) => Err(e),
    }
}

/// A streamed body goes once: it cannot wait for room or go again. At an upstream cap it
/// gets its refusal at once and the client sets that hold the cap's idle connections are
/// dropped ([`drop_idle`]) for the client's next try.
async fn send_streamed(
    t: &Tunnel,
    rt: &LiveSettings,
    websocket: bool,
    head: Request<()>,
    body: ProxyBody,
) -> Attempt {
    let which = if websocket { Which::H1 } else { Which::Either };
    let mut head = head;
    if !websocket {
        frame_streamed(&mut head, &body);
    }
    let sent = client(rt, t, which)
        .request(attach(t, head, UpBody::Streamed(body)))
        .await;
    if let Some(cap) = sent.as_ref().err().and_then(super::failure::upstream_cap) {
        drop_idle(t, rt, cap);
    }
    sent
}

/// hyper's h1 client assumes a GET or HEAD has no body: one of unknown length goes out as no
/// body at all (the origin answered a bodiless GET) unless the request says it is chunked.
/// So a streamed body of unknown length on those methods is marked chunked; hyper's h2 client
/// removes the field (h2 frames bodies itself), other methods are chunked by hyper anyway.
fn frame_streamed(head: &mut Request<()>, body: &ProxyBody) {
    let bodiless_by_default = matches!(*head.method(), Method::GET | Method::HEAD);
    if bodiless_by_default && body.size_hint().exact().is_none() {
        head.headers_mut().insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
    }
}

/// Sends a held-body request on the sandbox's client `which`; at an upstream cap it makes
/// room ([`make_room`]) and, if that freed a slot, sends once more (nothing was sent the
/// first time). Every dial point of a held body goes through here: the first attempt, the
/// h2 fallback, and both retries.
async fn send_held(
    t: &Tunnel,
    rt: &LiveSettings,
    which: Which,
    head: &Request<()>,
    bytes: &Bytes,
) -> Attempt {
    let send = || {
        let req = attach(t, head.clone(), UpBody::Held(bytes.clone()));
        client(rt, t, which).request(req)
    };
    let sent = send().await;
    let Some(cap) = sent.as_ref().err().and_then(super::failure::upstream_cap) else {
        return sent;
    };
    if !make_room(t, rt, cap).await {
        return sent;
    }
    send().await
}

/// Which of a sandbox's clients (`proxy::clients::Clients`) a request goes on.
#[derive(Clone, Copy)]
enum Which {
    /// h2 or HTTP/1.1, whichever the origin chooses.
    Either,
    /// HTTP/1.1 only: WebSocket upgrades.
    H1,
    /// h2 only: held bodies to an origin known to speak h2.
    H2,
    /// h2 only, a pool of its own: the retry of a request the origin did not process.
    Retry,
    /// No pool: the last resort when the retry connection refuses too.
    Fresh,
}

/// The sandbox's client `which`. A clone: a request waiting for its answer keeps that one
/// client's pool alive, not the sandbox's whole set, so [`make_room`] can close the idle
/// connections of the others.
fn client(rt: &LiveSettings, t: &Tunnel, which: Which) -> super::UpstreamClient {
    let clients = rt.clients(&t.sandbox);
    match which {
        Which::Either => clients.client.clone(),
        Which::H1 => clients.client_h1.clone(),
        Which::H2 => clients.client_h2.clone(),
        Which::Retry => clients.client_retry.clone(),
        Which::Fresh => clients.client_fresh.clone(),
    }
}

/// A sandbox at its upstream cap (`[upstream] max_connections_per_sandbox`) may hold it with
/// idle pooled connections, left by requests to other hosts, and the daemon at its cap
/// (`[upstream] max_connections`) with the idle connections of any sandbox: the sets holding
/// them are dropped ([`drop_idle`]) and the request waits up to [`ROOM_WAIT`] for a slot
/// under `cap`. True if one is free.
async fn make_room(t: &Tunnel, rt: &LiveSettings, cap: UpstreamCap) -> bool {
    drop_idle(t, rt, cap);
    let config = &rt.upstream.config;
    let full = || match cap {
        UpstreamCap::Sandbox => t.sandbox.upstream.open() >= config.max_connections_per_sandbox,
        UpstreamCap::Daemon => rt.upstream.counts.connections.open() >= config.max_connections,
    };
    let deadline = tokio::time::Instant::now() + ROOM_WAIT;
    while full() {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    true
}

/// Drops the client sets that hold `cap`'s idle connections, which closes every idle one of
/// them that no request is waiting on (a connection in use closes when its exchange ends):
/// the sandbox's on every worker, or at the daemon's cap every sandbox's.
fn drop_idle(t: &Tunnel, rt: &LiveSettings, cap: UpstreamCap) {
    match cap {
        UpstreamCap::Sandbox => rt.drop_clients(&t.sandbox),
        UpstreamCap::Daemon => rt.drop_all_clients(),
    }
}

/// How long a request at an upstream cap waits for the idle connections it had
/// closed to go (each closes on its own worker, at once unless that worker is busy).
const ROOM_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

/// The retry of a request the upstream did not process: `client_retry`, then, if that
/// refuses too (or the origin no longer chooses h2), a fresh connection.
async fn retry(t: &Tunnel, rt: &LiveSettings, head: &Request<()>, bytes: &Bytes) -> Attempt {
    match send_held(t, rt, Which::Retry, head, bytes).await {
        Err(e) if super::failure::not_processed(&e) || super::failure::not_h2(&e) => {
            send_held(t, rt, Which::Fresh, head, bytes).await
        }
        other => other,
    }
}

/// The request with its body, counted into the `bytes_up` metric, and marking the request's
/// [`Handed`] (from its extensions) when hyper takes it to a connection.
fn attach(t: &Tunnel, head: Request<()>, body: UpBody) -> Request<ProxyBody> {
    let body = match body {
        UpBody::Held(b) => Full::new(b).map_err(|never| match never {}).boxed_unsync(),
        UpBody::Streamed(b) => b,
    };
    let body = Counted::new(body, t.state.metrics.bytes_up.clone()).boxed_unsync();
    let body = match head.extensions().get::<Handed>() {
        Some(handed) => Marking(body, handed.clone()).boxed_unsync(),
        None => body,
    };
    head.map(|()| body)
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

/// A request body that marks its [`Handed`] when hyper looks at it.
struct Marking(ProxyBody, Handed);

impl Body for Marking {
    type Data = Bytes;
    type Error = super::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.1.mark();
        Pin::new(&mut self.0).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.1.mark();
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.1.mark();
        self.0.size_hint()
    }
}

/// What a request asked for, as its answer's shape depends on it.
struct Asked<'a> {
    /// A `HEAD`'s answer has no body.
    method: &'a Method,
    /// It was gRPC or Connect messages: only then is the answer read as messages
    /// ([`Shape::of`]).
    messages: bool,
}

/// Upstream response → what the sandbox gets: hop-by-hop headers and any `x-sealgate-error` of
/// the upstream's own stripped (only sealgate's refusals carry it), `Trailer` kept (it is
/// end-to-end, and hyper's h1 server sends only the trailers it lists), then scrubbed by
/// `scrubber` (none: not at all) following `scope`, with the Basic-auth forms of `report`; the
/// request's `slot` goes with the body. Also says whether the answer is to be read whole
/// ([`read_whole`]).
fn finish_response(
    t: &Tunnel,
    rt: &LiveSettings,
    (scrubber, scope): (Option<Arc<Scrubber>>, Scope),
    report: &Report,
    asked: Asked<'_>,
    resp: Response<Incoming>,
    slot: SlotGuard,
) -> Result<(Response<ProxyBody>, bool), Refusal> {
    let upgrade = resp.status() == http::StatusCode::SWITCHING_PROTOCOLS;
    let (mut parts, body) = resp.into_parts();
    let shape = scrubber.as_ref().map(|_| {
        let held = &t.sandbox.grpc_held;
        Shape::of(
            asked.method,
            asked.messages,
            parts.status,
            &parts.headers,
            &rt.upstream.config,
            held,
        )
    });
    let trailer = take_all(&mut parts.headers, header::TRAILER);
    strip_hop_by_hop(&mut parts.headers, upgrade);
    parts.headers.remove(super::refusal::ERROR_HEADER);
    for value in trailer {
        parts.headers.append(header::TRAILER, value);
    }
    let body = framing_bounded(&parts, body);
    let unscrubbed = scrubber.is_none();
    let (body, whole) = match scrubber.zip(shape) {
        Some((s, shape)) => {
            let scrubbing = Scrubbing {
                scrubber: s,
                scope: scope.clone(),
                report,
            };
            scrub_response(t, &rt.upstream, scrubbing, &mut parts, shape, body)?
        }
        None => (body, false),
    };
    // Plain HTTP never unseals; an upgrade's answer has no body (its relay follows).
    let unscrubbed = unscrubbed && t.scheme == Scheme::Https && !upgrade;
    let body = Held::new(Following::new(body, scope, unscrubbed), slot);
    let body = Counted::new(body, t.state.metrics.bytes_down.clone()).boxed_unsync();
    Ok((Response::from_parts(parts, body), whole))
}

/// The answer's body, counting its data into its HTTP/1 connection's framing allowance
/// ([`super::upstream::OverheadOf`]; h2 answers carry none), which starts now.
fn framing_bounded(
    parts: &http::response::Parts,
    body: Incoming,
) -> http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError> {
    let Some(super::upstream::OverheadOf(overhead)) = parts.extensions.get().cloned() else {
        return body.map_err(BoxError::from).boxed_unsync();
    };
    if parts.status == http::StatusCode::SWITCHING_PROTOCOLS {
        overhead.upgraded(); // a WebSocket relay's frames follow
    }
    super::upstream::DataCounted::new(body, overhead)
        .map_err(BoxError::from)
        .boxed_unsync()
}

/// A small scrubbed answer of known length (`response_scrub::is_whole`) is read to its end,
/// then sent with its exact `Content-Length`. Reading it frees the
/// request's slot and upstream connection before the sandbox has read it. One that has not
/// ended within [`WHOLE_ANSWER_WAIT`], or grew past [`WHOLE_ANSWER_HELD`] scrubbed (values
/// replaced by longer tokens), streams on from where it is, without a length, as before:
/// its client sees the head at once, not after an origin's slow trickle (an outside check:
/// Python `requests`' 3 s read timeout fired on a 64 KiB answer sent over 6 s).
///
/// # Errors
/// The answer failed before its end: 502, or 503 if the node lost sight of the sandbox's
/// values meanwhile ([`unknowable`]); streamed, such an answer had been cut short instead.
async fn read_whole(t: &Tunnel, resp: Response<ProxyBody>) -> Result<Response<ProxyBody>, Refusal> {
    let (parts, mut body) = resp.into_parts();
    let deadline = tokio::time::Instant::now() + WHOLE_ANSWER_WAIT;
    let (mut read, mut held) = (Vec::new(), 0);
    let mut trailers = None;
    while held <= WHOLE_ANSWER_HELD {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => break,
            Ok(None) => return Ok(whole(parts, read, trailers)),
            Ok(Some(frame)) => frame.map_err(|e| cut_before_its_end(t, &e))?,
        };
        match frame.into_data() {
            Ok(data) => {
                held += data.len();
                read.push(data);
            }
            Err(frame) => trailers = frame.into_trailers().ok(),
        }
    }
    // Slow or grown: streamed on, what was read first (trailers, if they came, end it).
    let first = read
        .into_iter()
        .map(Frame::data)
        .chain(trailers.map(Frame::trailers))
        .map(Ok);
    let first = futures_util::stream::iter(first);
    let rest = http_body_util::BodyStream::new(body);
    let body = http_body_util::StreamBody::new(futures_util::StreamExt::chain(first, rest));
    Ok(Response::from_parts(parts, body.boxed_unsync()))
}

/// How long [`read_whole`] waits for a small answer's end before it streams it.
const WHOLE_ANSWER_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// The most [`read_whole`] holds of a scrubbed answer before it streams it: four times the
/// most it reads whole, for values replaced by longer tokens.
const WHOLE_ANSWER_HELD: usize = 4 * super::response_scrub::WHOLE_ANSWER_MAX as usize;

/// The answer of `parts` with body `read` (and `trailers`, which have no place beside a
/// `Content-Length`: such an answer goes without one).
fn whole(
    mut parts: http::response::Parts,
    read: Vec<Bytes>,
    trailers: Option<HeaderMap>,
) -> Response<ProxyBody> {
    let bytes = match read.len() {
        0 => Bytes::new(),
        1 => read.into_iter().next().unwrap_or_default(),
        _ => Bytes::from(read.concat()),
    };
    if let Some(trailers) = trailers {
        let frames = [Frame::data(bytes), Frame::trailers(trailers)];
        let frames = futures_util::stream::iter(frames.map(Ok::<_, BoxError>));
        let body = http_body_util::StreamBody::new(frames);
        return Response::from_parts(parts, body.boxed_unsync());
    }
    parts
        .headers
        .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    let body = Full::new(bytes).map_err(|never| match never {});
    Response::from_parts(parts, body.boxed_unsync())
}

/// The refusal of a whole-read answer that failed before its end (its error names no byte the
/// upstream wrote): the sandbox's end when it ended meanwhile — its answer is cut at the next
/// chunk, and blaming the origin (502 `upstream_unreachable`) fed the operator's upstream
/// alert (outside fleet pass).
fn cut_before_its_end(t: &Tunnel, e: &BoxError) -> Refusal {
    if let Err(ended) = check_live(t) {
        return ended;
    }
    let lost = std::iter::successors(Some(&**e as &(dyn std::error::Error + 'static)), |e| {
        e.source()
    })
    .any(|e| matches!(e.downcast_ref::<BodyError>(), Some(BodyError::ScopeLost)));
    if lost {
        return unknowable(t);
    }
    Refusal::new(
        Code::UpstreamUnreachable,
        format!("{} failed part way through its answer", t.dest),
    )
}

/// Removes every field `name`, returning the values (allocates only if there were any).
fn take_all(h: &mut HeaderMap, name: HeaderName) -> Vec<HeaderValue> {
    match h.entry(name) {
        header::Entry::Occupied(e) => e.remove_entry_mult().1.collect(),
        header::Entry::Vacant(_) => Vec::new(),
    }
}

/// Relays an upgraded (WebSocket) connection both ways until both directions have ended (a
/// half-close goes on to the other side), an error ends either, or the tunnel's policy stops
/// holding (checked every second: the sandbox ended, or the host left the store's
/// `egress_allowlist`), which ends it — such a connection has no further requests at which
/// the policy could be read. With a `scrubber` (the host's answers are scrubbed) the
/// upstream's frames are scrubbed on their way ([`super::ws_scrub`]), by the upgrade
/// request's `extras` (its Basic-auth forms) first.
///
/// The relay runs as a connection of its own ([`ProxyState::spawn_connection`]): counted in
/// `active_connections`, waited for by the stop's drain (up to `shutdown_grace_secs`, like a
/// streaming answer), and holding `t` — so the client connection's admission slot and the
/// tunnel's slot stay taken until it ends.
fn relay_upgrade(
    t: &Arc<Tunnel>,
    client: hyper::upgrade::OnUpgrade,
    mut resp: Response<ProxyBody>,
    (scrubber, extras): (Option<Arc<Scrubber>>, Option<Arc<Scrubber>>),
    mut scope: Scope,
) -> Response<ProxyBody> {
    let Some(upstream) = resp.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
        return resp;
    };
    let (sandbox, host) = (scope.sandbox_id(), scope.host());
    let (allowed, tunnel) = (still_allowed(t), t.clone());
    let tally = AnswerTally::of(t, 0);
    t.state.spawn_connection(async move {
        let _slots = tunnel;
        let (Ok(c), Ok(u)) = (client.await, upstream.await) else {
            return;
        };
        let mut c = hyper_util::rt::TokioIo::new(c);
        let mut u = hyper_util::rt::TokioIo::new(u);
        let relay = async {
            match scrubber {
                Some(s) => {
                    let rescope = Some(scope.rescope());
                    let tally = tally.for_body();
                    super::ws_scrub::relay(&mut c, &mut u, (s, extras), rescope, tally).await
                }
                None => {
                    let gained = move || scope.gained_values();
                    super::ws_scrub::relay_unscrubbed(&mut c, &mut u, gained).await
                }
            }
        };
        tokio::select! {
            ended = relay => match ended {
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                    tracing::warn!(%sandbox, %host, error = %e, "upgraded connection closed");
                }
                Err(e) if changed_scope(&e) => {
                    tracing::info!(%sandbox, %host, error = %e, "upgraded connection closed");
                }
                Err(e) => tracing::debug!(%sandbox, %host, error = %e, "upgraded connection ended"),
                Ok(()) => {}
            },
            () = revoked(allowed) => tracing::info!(
                %sandbox, %host,
                "upgraded connection closed: its sandbox ended or its host left the egress_allowlist"
            ),
        }
    });
    resp
}

/// True for a relay ended by a change of the sandbox's values ([`ScopeGained`], or its
/// node's copy locked).
fn changed_scope(e: &std::io::Error) -> bool {
    e.get_ref().is_some_and(|e| {
        e.is::<ScopeGained>() || matches!(e.downcast_ref(), Some(subst::BodyError::ScopeLost))
    })
}

/// Returns once `allowed` no longer holds (polled every second).
async fn revoked(allowed: impl Fn() -> bool) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if !allowed() {
            return;
        }
    }
}

/// May this tunnel still reach its host: sandbox live, host on the current allowlist.
fn still_allowed(t: &Tunnel) -> impl Fn() -> bool + Send + 'static {
    let (registry, sandbox) = (t.state.registry.clone(), t.sandbox.clone());
    let (dest, scheme) = (t.dest.clone(), t.scheme);
    move || is_live(&registry, &sandbox) && sandbox.snapshot().egress_allowed(&dest, scheme)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    fn names(h: &HeaderMap) -> Vec<&str> {
        let mut n: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        n.sort_unstable();
        n
    }

    #[test]
    fn scrubbed_hosts_are_asked_for_no_large_window_coding() {
        let asked = |pairs: &[(&'static str, &'static str)]| {
            let mut h = fields(pairs);
            whole_responses_only(&mut h);
            let all = h.get_all(header::ACCEPT_ENCODING).iter();
            all.map(|v| v.to_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        };
        let ae = "accept-encoding";
        assert_eq!(asked(&[(ae, "gzip, deflate, br, zstd")]), ["gzip, deflate"]);
        assert_eq!(asked(&[(ae, "gzip;q=1.0, BR;q=0.9")]), ["gzip;q=1.0"]);
        assert_eq!(asked(&[(ae, "br"), (ae, "zstd ; q=1")]), ["identity"]);
        assert_eq!(asked(&[(ae, "*")]), ["identity"]);
        assert_eq!(asked(&[(ae, "gzip"), (ae, "br")]), ["gzip"]);
        assert_eq!(asked(&[(ae, "gzip, deflate")]), ["gzip, deflate"]);
        assert_eq!(asked(&[(ae, "brotli-like, gzip")]), ["brotli-like, gzip"]);
        assert!(asked(&[]).is_empty(), "none asked, none added");
        assert_eq!(
            asked(&[(ae, ", ,"), (ae, " gzip ")]),
            [", ,", " gzip "],
            "kept as sent"
        );
        let mut h = fields(&[(ae, "gzip")]);
        h.append(ae, HeaderValue::from_bytes(b"deflate, \xffbr").unwrap());
        whole_responses_only(&mut h);
        assert_eq!(
            h.get_all(ae).iter().collect::<Vec<_>>(),
            ["gzip"],
            "not text: dropped"
        );
    }

    #[test]
    fn hop_by_hop_and_proxy_fields_never_cross() {
        let mut h = fields(&[
            ("connection", "close, X-Hop-Listed"),
            ("connection", "x-second-listed"),
            ("x-hop-listed", "1"),
            ("x-second-listed", "2"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("proxy-authorization", "Basic eA=="),
            ("proxy-connection", "keep-alive"),
            ("proxy-anything", "y"),
            ("upgrade", "websocket"),
            ("trailer", "x-t"),
            ("x-end-to-end", "kept"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(names(&h), ["trailer", "x-end-to-end"]);
    }

    #[test]
    fn cookie_crumbs_travel_as_one_field() {
        let mut h = fields(&[
            ("cookie", "a=1"),
            ("cookie", "b=2"),
            ("cookie", "c=osb_sealed_x"),
        ]);
        one_cookie_field(&mut h);
        let all: Vec<_> = h.get_all(header::COOKIE).iter().collect();
        assert_eq!(all, ["a=1; b=2; c=osb_sealed_x"]);
        let mut one = fields(&[("cookie", "a=1; b=2")]);
        one_cookie_field(&mut one);
        assert_eq!(one.get_all(header::COOKIE).iter().count(), 1);
        let mut none = fields(&[("x", "y")]);
        one_cookie_field(&mut none);
        assert!(!none.contains_key(header::COOKIE));
    }

    /// The shortcut agrees with the parse on every input: it answers only where the parse
    /// would find the same destination.
    #[test]
    fn an_authority_named_exactly_is_the_parse_s_answer() {
        let inputs = [
            "api.example.test",
            "api.example.test:443",
            "api.example.test:0443",
            "api.example.test:8443",
            "api.example.test:443x",
            "api.example.test:",
            "API.example.test",
            "api.example.test.",
            "api.example.testx",
            "api.example.test:65536",
            "api.example.test:99999",
            "api.example.test:+443",
            "api.example.test@evil.test",
            "api.example.test:443@evil.test",
            "127.0.0.1",
            "[::1]:443",
            "",
        ];
        let dests = [
            "api.example.test:443",
            "api.example.test:8443",
            "127.0.0.1:443",
        ];
        for dest in dests {
            let dest = policy::parse_authority(dest, None).unwrap();
            for raw in inputs {
                for default_port in [443, 80] {
                    let parsed = policy::parse_authority(raw, Some(default_port));
                    let same = parsed.as_ref().is_ok_and(|d| *d == dest);
                    if names_exactly(&dest, raw, default_port) {
                        assert!(same, "{raw:?} for {dest} (default {default_port})");
                    }
                    if same && raw == dest.host.to_string() {
                        assert!(
                            names_exactly(&dest, raw, default_port)
                                || dest.host.to_string().parse::<std::net::IpAddr>().is_ok()
                        );
                    }
                }
            }
        }
        let dest = policy::parse_authority("api.example.test:443", None).unwrap();
        assert!(names_exactly(&dest, "api.example.test", 443));
        assert!(names_exactly(&dest, "api.example.test:443", 80));
    }

    #[test]
    fn an_upgrade_keeps_upgrade_and_names_only_it_in_connection() {
        let mut h = fields(&[
            ("connection", "Upgrade, x-hop"),
            ("upgrade", "websocket"),
            ("x-hop", "1"),
        ]);
        strip_hop_by_hop(&mut h, true);
        assert_eq!(names(&h), ["connection", "upgrade"]);
        assert_eq!(h[header::CONNECTION], "upgrade");
        assert_eq!(h[header::UPGRADE], "websocket");
    }

    #[test]
    fn a_head_without_hop_fields_is_left_as_it_is() {
        let mut h = fields(&[("authorization", "Bearer x"), ("accept", "*/*")]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(names(&h), ["accept", "authorization"]);
    }
}
