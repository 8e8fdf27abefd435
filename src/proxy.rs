//! Proxy listeners and the state shared by every connection.
//!
//! Both listeners (explicit CONNECT and transparent REDIRECT) identify the sandbox and the
//! destination their own way, then share one path: [`admit`] → [`intercept`] → [`serve`] →
//! [`forward`]. Every outcome is recorded through [`outcome`].

pub mod admission;
pub mod admit;
pub mod clients;
pub mod explicit;
pub mod failure;
pub mod forward;
pub mod h1_guard;
pub mod held;
pub mod idle;
pub mod intercept;
pub mod linger;
pub mod outcome;
pub mod pieces;
pub mod progress;
pub mod read_ahead;
pub mod refusal;
pub mod response_scrub;
pub mod rewind;
pub mod serve;
pub mod spin;
pub mod transparent;
pub mod unframed;
pub mod upstream;
pub mod whole_bodies;
pub mod workers;
pub mod ws_scrub;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use bytes::Bytes;
use futures_util::FutureExt as _;
use http_body_util::combinators::UnsyncBoxBody;
use hyper_util::client::legacy::Client;
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use crate::audit::Audit;
use crate::ca::LeafCache;
use crate::config::{ProxyConfig, UpstreamConfig};
use crate::metrics::Metrics;
use crate::policy::{AddressPolicy, Dest, Scheme};
use crate::sandbox::{Registry, Sandbox, TunnelGuard};

/// Boxed error for bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Every body the proxy sends (to the sandbox or upstream).
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// A [`ProxyBody`] with no bytes (CONNECT's 200, answers that carry no body).
pub fn empty_body() -> ProxyBody {
    use http_body_util::BodyExt as _;
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}
/// The pooled upstream client.
pub type UpstreamClient = Client<upstream::Connector, ProxyBody>;

/// The proxy's live settings: everything a reload can change (`[proxy]`, `[upstream]`) and the
/// upstream clients built from them. One `Arc` of it is taken per connection (connection-level
/// limits) and per request (everything the request uses), so a reload never mixes two settings
/// within one request.
pub struct LiveSettings {
    /// `[proxy]`.
    pub proxy: ProxyConfig,
    /// `[upstream]`, with what the connectors vet and dial with (also for checks before any
    /// connection is set up).
    pub upstream: Arc<upstream::UpstreamSettings>,
    /// Per proxy worker ([`workers`]), one set of pooled clients per sandbox
    /// ([`clients`]): a request reuses only upstream connections of its own sandbox, driven by
    /// the thread it runs on.
    pools: Vec<clients::PerSandbox>,
    /// The origins that answered over h2 (see [`upstream::KnownH2`]); shared by every worker.
    pub known_h2: upstream::KnownH2,
}

impl LiveSettings {
    /// Builds the settings and `pools` sets of clients, one per proxy worker (the count the
    /// workers started with: a reload keeps [`LiveSettings::pools`] of the settings it
    /// replaces); `own_listeners` are never dialled; upstream connections are counted in
    /// `counts`, the daemon's (a reload hands on those of the settings it replaces, whose
    /// connections and bodies still hold slots in them).
    ///
    /// # Errors
    /// An unreadable upstream CA file.
    pub fn new(
        proxy: ProxyConfig,
        upstream: UpstreamConfig,
        own_listeners: Vec<SocketAddr>,
        pools: usize,
        counts: upstream::Counts,
    ) -> Result<LiveSettings, String> {
        let settings = Arc::new(upstream::UpstreamSettings {
            vet: AddressPolicy::new(upstream.allow_private_cidrs.clone(), own_listeners),
            tls: upstream::TlsByAlpn::new(&*upstream::client_tls(&upstream.ca_files)?),
            stream_limits: Default::default(),
            counts,
            config: upstream,
        });
        let pools = (0..pools.max(1))
            .map(|_| clients::PerSandbox::new())
            .collect();
        Ok(LiveSettings {
            proxy,
            upstream: settings,
            pools,
            known_h2: upstream::KnownH2::new(KNOWN_H2_CAP),
        })
    }

    /// `sandbox`'s clients on the worker this runs on (the first worker's off the workers:
    /// tests).
    pub fn clients(&self, sandbox: &Arc<Sandbox>) -> Arc<clients::Clients> {
        let pools = &self.pools[workers::current() % self.pools.len()];
        pools.of(sandbox, &sandbox.upstream, &self.upstream)
    }

    /// Drops `sandbox`'s client sets on every worker (`clients::PerSandbox::drop_set`).
    pub fn drop_clients(&self, sandbox: &Arc<Sandbox>) {
        for pools in &self.pools {
            pools.drop_set(sandbox);
        }
    }

    /// Drops every sandbox's client sets on every worker (a reload: see
    /// [`ProxyState::set_settings`]; the daemon at `[upstream] max_connections`).
    pub fn drop_all_clients(&self) {
        for pools in &self.pools {
            pools.clear();
        }
    }

    /// How many workers' client sets there are.
    pub fn pools(&self) -> usize {
        self.pools.len()
    }
}

/// How many origins [`upstream::KnownH2`] remembers per settings generation.
const KNOWN_H2_CAP: usize = 4096;

/// The proxy workers as the accept loops see them.
struct WorkerSet {
    /// Each worker's runtime.
    handles: Vec<tokio::runtime::Handle>,
    /// Each worker's open connections (its `worker_connections` gauge), counted from the
    /// moment a connection is handed to it.
    load: Vec<Gauge>,
}

/// An accepted connection moves to another worker only when that worker has at least this
/// many fewer open connections than the one that accepted it.
const HAND_OFF_MARGIN: i64 = 2;

/// Where the connections of a listener run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// On the worker with the fewest open connections (the shared proxy listeners).
    Balanced,
    /// On the worker that accepted them (an isolated sandbox's own listener: one worker).
    Pinned,
}

/// A connection counted as open (`active_connections`, and its worker's gauge) until dropped.
struct Open {
    connections: Gauge,
    worker: Option<Gauge>,
}

impl Open {
    fn new(connections: &Gauge, worker: Option<&Gauge>) -> Open {
        connections.inc();
        if let Some(w) = worker {
            w.inc();
        }
        Open {
            connections: connections.clone(),
            worker: worker.cloned(),
        }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.connections.dec();
        if let Some(w) = &self.worker {
            w.dec();
        }
    }
}

/// State shared by all proxy connections.
pub struct ProxyState {
    /// Live sandboxes.
    pub registry: Arc<Registry>,
    /// Leaf certificates.
    pub leaves: Arc<LeafCache>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Audit sink.
    pub audit: Arc<Audit>,
    settings: RwLock<Arc<LiveSettings>>,
    /// The connection budgets (see [`admission`]).
    pub admission: Arc<admission::Admission>,
    shutdown: watch::Receiver<bool>,
    /// Every client connection and tunnel task, so shutdown can wait for them to drain.
    tasks: TaskTracker,
    /// The proxy workers' runtimes and loads, once they run ([`workers::Workers::start`]).
    workers: OnceLock<WorkerSet>,
    /// The worker the next [`ProxyState::spawn_listener`] goes to.
    next_worker: AtomicUsize,
    /// When the daemon began to stop ([`ProxyState::stopping`]).
    stop_began: OnceLock<std::time::Instant>,
}

impl ProxyState {
    /// Wires the state.
    pub fn new(
        registry: Arc<Registry>,
        leaves: Arc<LeafCache>,
        metrics: Arc<Metrics>,
        audit: Arc<Audit>,
        settings: LiveSettings,
        shutdown: watch::Receiver<bool>,
    ) -> Arc<Self> {
        let evicted = metrics.connections_evicted.clone();
        let admission = Arc::new(admission::Admission::counted(evicted));
        Arc::new(ProxyState {
            registry,
            leaves,
            metrics,
            audit,
            settings: RwLock::new(Arc::new(settings)),
            admission,
            shutdown,
            tasks: TaskTracker::new(),
            workers: OnceLock::new(),
            next_worker: AtomicUsize::new(0),
            stop_began: OnceLock::new(),
        })
    }

    /// Notes that the daemon begins to stop (call as the shutdown signal is sent).
    pub fn stopping(&self) {
        let _ = self.stop_began.set(std::time::Instant::now());
    }

    /// True once the daemon's stop has run past `[proxy] shutdown_grace_secs`: what is cut
    /// now was cut by the stop, not by its client (audited so, not as 499 "the client gave
    /// up": outside pass).
    pub fn grace_ran_out(&self) -> bool {
        self.stop_began
            .get()
            .is_some_and(|t| t.elapsed() >= self.settings().proxy.shutdown_grace)
    }

    /// Accepts on `listener` (an isolated sandbox's own) on one proxy worker, the next in
    /// turn, so every connection of that sandbox runs there; off the workers (tests without
    /// them) on the caller's runtime.
    ///
    /// # Errors
    /// The listener could not be registered with the worker's runtime.
    pub fn spawn_listener(
        self: &Arc<Self>,
        listener: std::net::TcpListener,
        kind: ListenerKind,
    ) -> std::io::Result<tokio::task::JoinHandle<()>> {
        let handle = match self
            .workers
            .get()
            .map(|set| &set.handles)
            .filter(|h| !h.is_empty())
        {
            Some(h) => h[self.next_worker.fetch_add(1, Ordering::Relaxed) % h.len()].clone(),
            None => tokio::runtime::Handle::current(),
        };
        let listener = {
            let _in_rt = handle.enter();
            TcpListener::from_std(listener)?
        };
        let run = run_listener(self.clone(), listener, kind, Placement::Pinned);
        Ok(handle.spawn(run))
    }

    /// Records the workers' runtimes (once, when they start).
    pub(crate) fn set_workers(&self, handles: Vec<tokio::runtime::Handle>) {
        let load = (0..handles.len())
            .map(|worker| {
                let labels = crate::metrics::WorkerLabels { worker };
                self.metrics
                    .worker_connections
                    .get_or_create(&labels)
                    .clone()
            })
            .collect();
        let _ = self.workers.set(WorkerSet { handles, load });
    }

    /// Runs a connection just accepted on this worker: here, unless another worker has at
    /// least [`HAND_OFF_MARGIN`] fewer open connections — then the socket moves to that
    /// worker's reactor and the connection runs there. (The kernel hands a burst of
    /// connections to whichever worker wakes first: 32 connections opened at once were seen
    /// all on one of two workers.)
    fn spawn_accepted<M, F>(self: &Arc<Self>, tcp: TcpStream, make: M)
    where
        M: FnOnce(TcpStream) -> F + Send + 'static,
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let Some(set) = self.workers.get() else {
            return self.spawn_connection(make(tcp));
        };
        let here = workers::current() % set.handles.len();
        let target = least_loaded(&set.load, here);
        if target == here {
            return self.spawn_connection(make(tcp));
        }
        let moved = tcp.into_std();
        let open = Open::new(&self.metrics.connections, Some(&set.load[target]));
        let run = async move {
            let _open = open;
            match moved.and_then(TcpStream::from_std) {
                Ok(tcp) => make(tcp).await,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot move a connection to another proxy worker")
                }
            }
        };
        self.tasks.spawn_on(run, &set.handles[target]);
    }

    /// The current settings (take once per request and pass them down).
    pub fn settings(&self) -> Arc<LiveSettings> {
        self.settings
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Swaps in reloaded settings; live connections keep the limits they started with.
    /// Requests take the new settings' upstream clients, so the old ones' client sets are
    /// dropped: their idle connections would otherwise count against their sandboxes'
    /// upstream budgets until they timed out, unusable (requests in flight keep theirs).
    pub fn set_settings(&self, live: LiveSettings) {
        let mut current = self.settings.write().unwrap_or_else(|e| e.into_inner());
        let old = std::mem::replace(&mut *current, Arc::new(live));
        drop(current);
        old.drop_all_clients();
    }

    /// A receiver that changes when shutdown begins.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.clone()
    }

    /// Runs one client connection or tunnel: tracked for the shutdown drain and counted in
    /// the `active_connections` gauge while it lives.
    pub fn spawn_connection<F>(self: &Arc<Self>, fut: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let worker = self
            .workers
            .get()
            .and_then(|set| set.load.get(workers::current()));
        let open = Open::new(&self.metrics.connections, worker);
        // Not `async move { let _open = open; fut.await }`: rustc lays such a block out with
        // `fut` twice (the captured value and the awaited one), and the task cell — the
        // whole life of every connection and tunnel — doubled with it (type sizes: 1,224
        // bytes for a 592-byte tunnel future, 10,600 for a 5,256-byte connection).
        self.tasks.spawn(fut.map(move |()| drop(open)));
    }

    /// `fut`, counted by [`ProxyState::drain`] like a connection: work a request leaves
    /// behind that a clean stop must finish (a deferred audit line).
    pub fn tracked<F: std::future::Future>(
        &self,
        fut: F,
    ) -> impl std::future::Future<Output = F::Output> {
        self.tasks.track_future(fut)
    }

    /// Waits (after shutdown began) for connections and [`ProxyState::tracked`] work to
    /// finish: each connection applies `shutdown_grace` itself after hyper's graceful
    /// shutdown; this is the overall backstop. Returns the number still open when `limit` ran
    /// out.
    pub async fn drain(&self, limit: std::time::Duration) -> usize {
        self.tasks.close();
        if tokio::time::timeout(limit, self.tasks.wait()).await.is_ok() {
            return 0;
        }
        self.tasks.len()
    }
}

tokio::task_local! {
    /// The admission slot of the client connection being served. A CONNECT tunnel outlives
    /// its HTTP/1 connection (hyper hands the socket over at the upgrade), so it takes a share
    /// of the slot: the slot is free only once the tunnel is closed too.
    static CONNECTION_SLOT: Arc<admission::Slot>;
}

/// A share of the current connection's admission slot (None outside a connection task).
pub fn connection_slot() -> Option<Arc<admission::Slot>> {
    CONNECTION_SLOT.try_with(Arc::clone).ok()
}

/// The warning that `proxy.max_connections` is held by identified connections, counted and
/// written at most once per [`FullWarning::EVERY`].
#[derive(Default)]
struct FullWarning {
    /// Refusals since the last warning.
    refused: u64,
    /// When the last warning was written.
    warned: Option<std::time::Instant>,
}

impl FullWarning {
    const EVERY: std::time::Duration = std::time::Duration::from_secs(10);

    /// Counts one refusal at `now`; writes the warning if one is due.
    fn refused(&mut self, now: std::time::Instant) {
        if let Some(refused) = self.due(now) {
            tracing::warn!(
                refused,
                "proxy.max_connections reached by identified connections; connections refused \
                 (each audited as unavailable; this warning at most every 10 s)"
            );
        }
    }

    /// Counts one refusal at `now`: the refusals since the last warning if one is due.
    fn due(&mut self, now: std::time::Instant) -> Option<u64> {
        self.refused += 1;
        if self
            .warned
            .is_some_and(|at| now.duration_since(at) < Self::EVERY)
        {
            return None;
        }
        self.warned = Some(now);
        Some(std::mem::take(&mut self.refused))
    }
}

/// The connection budgets of `[proxy]`.
pub fn admission_limits(p: &ProxyConfig) -> admission::Limits {
    admission::Limits {
        max_connections: p.max_connections,
        max_unauthenticated: p.max_unauthenticated_connections,
        max_unauthenticated_per_source: p.max_unauthenticated_per_source,
        max_per_sandbox: p.max_connections_per_sandbox,
    }
}

/// One intercepted connection (or one plain-HTTP request): who, where, how.
pub struct Tunnel {
    /// Shared state.
    pub state: Arc<ProxyState>,
    /// The identified sandbox.
    pub sandbox: Arc<Sandbox>,
    /// The destination every request inside must name.
    pub dest: Dest,
    /// Https (intercepted, may unseal) or Http (never unseals).
    pub scheme: Scheme,
    /// The listener the connection arrived on.
    pub listener: ListenerKind,
    /// Holds the sandbox's tunnel slot while the connection lives.
    pub _guard: Option<TunnelGuard>,
    /// A share of the client connection's admission slot (`max_connections`,
    /// `max_connections_per_sandbox`), taken where the tunnel is admitted: whatever outlives
    /// the connection's task holding the tunnel — a CONNECT tunnel, an upgraded (WebSocket)
    /// relay — keeps the connection counted (a relay had dropped it at the upgrade: one
    /// sandbox held 40 live relays under a cap of 4, outside review).
    _connection: Option<Arc<admission::Slot>>,
    /// `dest` as `host:port`, formatted once per tunnel (audit, metrics labels, refusals).
    pub authority: Arc<str>,
    /// The one authority the upstream sees, as the client named the destination: the
    /// normalised host, with the port only when it is not the scheme's default. It is the
    /// upstream URI's authority, so HTTP/2 upstreams get it as `:authority` (and no `Host`)
    /// and HTTP/1 upstreams as the single `Host` the pooled client adds (`set_host`).
    pub origin: http::uri::Authority,
}

impl Tunnel {
    /// A tunnel to `dest`; derives the strings every request needs once, here.
    pub fn new(
        state: Arc<ProxyState>,
        sandbox: Arc<Sandbox>,
        dest: Dest,
        scheme: Scheme,
        listener: ListenerKind,
        guard: Option<TunnelGuard>,
    ) -> Arc<Tunnel> {
        let authority = dest.authority();
        let host = if dest.port == scheme.default_port() {
            dest.host.to_string()
        } else {
            authority.clone()
        };
        let origin = host
            .parse()
            .expect("a normalised host is a valid authority");
        Arc::new(Tunnel {
            state,
            sandbox,
            dest,
            scheme,
            listener,
            _guard: guard,
            _connection: connection_slot(),
            authority: authority.into(),
            origin,
        })
    }
}

/// Which listener a connection arrived on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenerKind {
    /// `HTTPS_PROXY`.
    Explicit,
    /// iptables REDIRECT target.
    Transparent,
}

impl ListenerKind {
    /// The audit log's `mode`.
    pub fn as_str(self) -> &'static str {
        match self {
            ListenerKind::Explicit => "explicit",
            ListenerKind::Transparent => "transparent",
        }
    }
}

/// The worker with the fewest open connections if it has at least [`HAND_OFF_MARGIN`] fewer
/// than `here`, else `here`.
fn least_loaded(load: &[Gauge], here: usize) -> usize {
    let mine = load[here].get();
    let least = (0..load.len()).min_by_key(|&w| load[w].get());
    match least {
        Some(w) if load[w].get() + HAND_OFF_MARGIN <= mine => w,
        _ => here,
    }
}

/// Accepts connections until shutdown; each connection holds one admission slot
/// ([`admission`]) from accept to close, and runs where `placement` says.
///
/// A connection refused because identified connections hold every slot is audited (the
/// `unavailable` line) and warned of at most once per [`FullWarning::EVERY`] per listener
/// and worker: it costs whoever reaches the listener a SYN (review h48d).
pub async fn run_listener(
    state: Arc<ProxyState>,
    listener: TcpListener,
    kind: ListenerKind,
    placement: Placement,
) {
    let mut shutdown = state.shutdown_signal();
    let mut full = FullWarning::default();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        let (tcp, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let limits = admission_limits(&state.settings().proxy);
        let admitted = state.admission.admit(peer.ip().to_canonical(), &limits);
        if let Some(n) = state.admission.unserved_evictions() {
            tracing::warn!(
                closed = n,
                "connections closed before they were served, to make room: more arrived at \
                 once than proxy.max_unauthenticated_connections (or max_connections) allows; \
                 raise it if these were clients (sealgate_connections_evicted_total)"
            );
        }
        let Some(slot) = admitted else {
            full.refused(std::time::Instant::now());
            let r = refusal::Refusal::new(
                refusal::Code::Unavailable,
                "proxy.max_connections reached; connection closed",
            );
            outcome::refuse(&state, &outcome::Attempt::connection(kind, "TCP"), &r);
            // An explicit client speaks HTTP/1.1 first: it gets the uniform answer. A
            // transparent one starts TLS (or plain HTTP to a port we cannot tell): closed.
            match kind {
                ListenerKind::Explicit => refusal::answer_unserved(tcp, &r),
                ListenerKind::Transparent => drop(tcp),
            }
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let st = state.clone();
        let make = move |tcp: TcpStream| {
            let serve = async move {
                match kind {
                    ListenerKind::Explicit => explicit::serve_client(st, tcp, peer).await,
                    ListenerKind::Transparent => transparent::serve_client(st, tcp, peer).await,
                }
            };
            CONNECTION_SLOT.scope(slot, serve)
        };
        match placement {
            Placement::Balanced => state.spawn_accepted(tcp, make),
            Placement::Pinned => state.spawn_connection(make(tcp)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loads(open: &[i64]) -> Vec<Gauge> {
        open.iter()
            .map(|&n| {
                let g = Gauge::default();
                g.set(n);
                g
            })
            .collect()
    }

    /// One SYN per refusal: the warning is written at the first and then at most once per
    /// ten seconds, carrying how many were refused meanwhile (review h48d: one line each).
    #[test]
    fn refusals_at_max_connections_warn_at_most_every_ten_seconds() {
        let start = std::time::Instant::now();
        let mut full = FullWarning::default();
        assert_eq!(full.due(start), Some(1));
        let quiet =
            (1..=500).filter_map(|i| full.due(start + std::time::Duration::from_millis(i * 10)));
        assert_eq!(quiet.count(), 0, "warned again within ten seconds");
        assert_eq!(full.due(start + FullWarning::EVERY), Some(501));
    }

    #[test]
    fn a_connection_moves_only_to_a_clearly_less_loaded_worker() {
        // Equal, or one apart: it stays where it was accepted.
        assert_eq!(least_loaded(&loads(&[0, 0]), 0), 0);
        assert_eq!(least_loaded(&loads(&[3, 2]), 0), 0);
        assert_eq!(least_loaded(&loads(&[2, 3]), 1), 1);
        // Two or more apart: the least-loaded worker takes it.
        assert_eq!(least_loaded(&loads(&[4, 2]), 0), 1);
        assert_eq!(least_loaded(&loads(&[32, 0, 5]), 0), 1);
        assert_eq!(least_loaded(&loads(&[1, 9, 0]), 1), 2);
        // One worker: always here.
        assert_eq!(least_loaded(&loads(&[7]), 0), 0);
    }
}
