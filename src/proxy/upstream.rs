//! Upstream connections: resolve the normalised host ourselves, vet every address, dial exactly
//! the vetted address, verify TLS on the normalised name, and pool connections per authority.
//!
//! Invariants: no address is dialled that [`AddressPolicy::vet`] refused (resolve overrides are
//! operator-written and trusted, but never one of our own listeners); certificate verification
//! is never disabled; the name used for SNI and verification is the same normalised host the
//! policy approved.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::config::UpstreamConfig;
use crate::policy::{self, AddressPolicy};

use super::read_ahead::ReadAhead;

mod clock;
mod cut;
mod goaway;
pub mod keep_alive;
mod known_h2;
mod limits;
mod live_h2;
mod local_route;
mod overhead;
mod tls_error;

pub use goaway::RefuseAfterGoaway;
pub use known_h2::KnownH2;
pub use limits::StreamLimits;
pub use live_h2::LiveH2;
use overhead::Counted;
pub use overhead::{DataCounted, OverheadOf};
pub mod dns;

use crate::sandbox::Budget;

/// Why an upstream connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Address vetting refused every address (or one of them).
    #[error("{0}")]
    Denied(String),
    /// DNS failed or TCP connect failed.
    #[error("upstream unreachable: {0}")]
    Unreachable(String),
    /// Connect or handshake timed out.
    #[error("upstream connect timed out")]
    Timeout,
    /// TLS failed (untrusted certificate, name mismatch, protocol error).
    #[error("upstream TLS failed: {0}")]
    Tls(String),
    /// An h2-only connector's handshake did not choose h2 (the origin stopped offering it);
    /// nothing was sent, so the request may go again on a client that also speaks HTTP/1.1.
    #[error("upstream did not negotiate h2")]
    NotH2,
    /// The sandbox already holds `[upstream] max_connections_per_sandbox` upstream
    /// connections (the value); nothing was dialled.
    #[error("the sandbox holds {0} upstream connections")]
    TooMany(usize),
    /// The daemon already holds `[upstream] max_connections` upstream connections, all
    /// sandboxes together (the value); nothing was dialled.
    #[error("the daemon holds {0} upstream connections")]
    DaemonFull(usize),
}

/// Upstream settings the connector needs.
pub struct UpstreamSettings {
    /// `[upstream]` as validated (resolve overrides, nameservers, timeouts, pool sizes…).
    pub config: UpstreamConfig,
    /// Address policy (`allow_private_cidrs` and sealgate's own listeners).
    pub vet: AddressPolicy,
    /// Verified TLS configs, one per ALPN offer.
    pub tls: TlsByAlpn,
    /// h2 origins' per-connection stream limits, learned from their GOAWAYs.
    pub stream_limits: Arc<StreamLimits>,
    /// The daemon's counts: one for its life, handed from settings to the settings a reload
    /// makes (connections and bodies of the old ones still hold their slots).
    pub counts: Counts,
}

/// What the daemon holds at once, all sandboxes together.
#[derive(Clone, Debug, Default)]
pub struct Counts {
    /// Open upstream connections (`[upstream] max_connections`; the `upstream_connections`
    /// gauge).
    pub connections: Budget,
    /// Response bodies being decoded from brotli or zstd (`[upstream] max_window_decoders`).
    pub decoders: Budget,
}

impl UpstreamSettings {
    /// Vets what can be vetted without DNS, so a refused destination is refused before a
    /// tunnel, a leaf or a connection is set up for it: an IP literal must pass
    /// [`AddressPolicy::vet`] and [`UpstreamSettings::vet_not_this_host`]; a host with a
    /// `resolve` override (trusted as written) must not be one of sealgate's own listeners.
    /// DNS names pass here and are vetted once resolved.
    ///
    /// # Errors
    /// The vetting error, as [`ConnectError::Denied`] would carry it.
    pub fn precheck(&self, dest: &policy::Dest) -> Result<(), policy::VetError> {
        if let Some(a) = self.config.resolve.get(&dest.host.as_str_for_sni()) {
            return self.vet.vet_own_listener(*a);
        }
        match dest.host {
            policy::Host::Ip(ip) => {
                let addr = SocketAddr::new(ip, dest.port);
                self.vet.vet(addr)?;
                Self::vet_not_this_host(addr)
            }
            policy::Host::Name(_) => Ok(()),
        }
    }

    /// Refuses a *public* address that the kernel routes to this host (one of its interface
    /// addresses, or a range routed to `lo`): the host's services are not upstreams, and the
    /// question is asked before dialling, so an open and a closed port answer alike and no
    /// host service sees a connection. A non-public address passed vetting only through
    /// `allow_private_cidrs`, which the operator wrote to reach such addresses: not refused.
    /// If the kernel cannot be asked, the dialler's check after connecting still refuses it.
    ///
    /// # Errors
    /// [`policy::VetError::ThisHost`].
    pub fn vet_not_this_host(addr: SocketAddr) -> Result<(), policy::VetError> {
        let public = policy::classify(addr.ip()).is_none();
        if public && local_route::is_local(addr.ip()) == Some(true) {
            return Err(policy::VetError::ThisHost { addr });
        }
        Ok(())
    }
}

/// The hyper-util connector: one `Arc`, since hyper-util clones it for every request (the
/// lazy connect future it races against the pool holds a clone even when a pooled connection
/// answers) and every `Client` clone holds one. A clone of the parts themselves was three
/// atomic increments and decrements per request, on counters shared across workers.
#[derive(Clone)]
pub struct Connector(Arc<Parts>);

/// What a [`Connector`] holds.
pub struct Parts {
    settings: Arc<UpstreamSettings>,
    tls: TlsConnector,
    /// Fail with [`ConnectError::NotH2`] unless ALPN chose h2 (for `http2_only` clients).
    require_h2: bool,
    /// The sandbox's budget, which every connection made here counts against.
    budget: Budget,
    /// The connection attempts under way here, per destination ([`DIALS_PER_HOST`]).
    dialing: Dialing,
    /// The dual-protocol client's: its usable h2 connections, per destination ([`LiveH2`]).
    live_h2: Option<Arc<LiveH2>>,
}

/// How many connection attempts one connector (one client of one sandbox on one worker) has
/// under way to one destination at a time. hyper-util's legacy pool starts a dial for every
/// request that finds no idle connection, hands the next connection returned to the pool to
/// the oldest waiting request instead, and lets the dial finish in the background; for
/// HTTP/1 it sets no bound on them. With more requests in flight on a worker than
/// `pool_max_idle_per_host`, every request past that dialled, and the dials queued at the
/// origin's TLS handshake held the sandbox's budget up to `max_connections_per_sandbox`: 429s
/// with 72 requests in flight, and the origin busy completing handshakes of connections
/// closed unused (outside review h37e). A request waiting here holds no slot and no socket,
/// and is served by whichever comes first, a returned connection or its dial. It waits at
/// most `connect_timeout_secs` for a turn and then dials without one, its dial timed from its
/// start: a queue of turns never fails a request (a review: with a 1 s handshake, 150 long
/// requests of one sandbox had 44 answered 504 "connecting timed out" that never dialled).
const DIALS_PER_HOST: usize = 32;

/// Past this many destinations, those with no attempt under way are forgotten.
const DIALING_KEPT: usize = 256;

/// Per destination (`host:port`), the turns to dial it ([`DIALS_PER_HOST`]).
#[derive(Default)]
struct Dialing(std::sync::Mutex<std::collections::HashMap<Box<str>, Arc<tokio::sync::Semaphore>>>);

impl Dialing {
    /// A turn to dial `dest`, held until the connection is made or failed; `None` once `wait`
    /// has passed without one.
    async fn turn_within(
        &self,
        dest: &str,
        wait: std::time::Duration,
    ) -> Option<tokio::sync::OwnedSemaphorePermit> {
        tokio::time::timeout(wait, self.turn(dest))
            .await
            .ok()
            .flatten()
    }

    /// A turn to dial `dest`, held until the connection is made or failed.
    async fn turn(&self, dest: &str) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let turns = {
            let mut map = self
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if map.len() >= DIALING_KEPT {
                map.retain(|_, t| {
                    Arc::strong_count(t) > 1 || t.available_permits() < DIALS_PER_HOST
                });
            }
            map.entry(dest.into())
                .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(DIALS_PER_HOST)))
                .clone()
        };
        turns.acquire_owned().await.ok()
    }
}

/// True if the origin's handshake says it speaks none of the protocols offered: it ended the
/// handshake with `no_application_protocol`, or it chose one that was not offered (Apache
/// httpd on a host whose `Protocols` lack h2 answers an offer of h2 alone with `http/1.1`,
/// which rustls refuses). To an h2-only connector that is [`ConnectError::NotH2`], as an
/// origin that picks no ALPN is: nothing was sent, and the request may go on a client that
/// offers HTTP/1.1 too (re-check h38f: a GET retried on the h2-only client after an HTTP/1.1
/// origin closed unanswered got `502 upstream_tls_error` — Node and rustls servers send the
/// alert; nginx just picks none; Apache picks its own).
fn refused_alpn(e: &std::io::Error) -> bool {
    use rustls::{AlertDescription, Error, PeerMisbehaved};
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<Error>())
        .is_some_and(|r| {
            matches!(
                r,
                Error::AlertReceived(AlertDescription::NoApplicationProtocol)
                    | Error::PeerMisbehaved(PeerMisbehaved::SelectedUnofferedApplicationProtocol)
            )
        })
}

/// What a connector offers in ALPN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alpn {
    /// h2, then http/1.1.
    Either,
    /// http/1.1 only (WebSocket upgrades).
    H1,
    /// h2 only (`http2_only` clients).
    H2,
}

/// The verified upstream TLS config once per [`Alpn`] offer, built with the settings and
/// shared by every connector: each sandbox's client sets make five connectors per worker, and
/// a config of their own each was five copies of the same config per set.
pub struct TlsByAlpn {
    either: TlsConnector,
    h1: TlsConnector,
    h2: TlsConnector,
}

impl TlsByAlpn {
    /// `verified` with each ALPN offer.
    pub fn new(verified: &rustls::ClientConfig) -> TlsByAlpn {
        let with = |alpn: &[&[u8]]| {
            let mut cfg = verified.clone();
            cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            TlsConnector::from(Arc::new(cfg))
        };
        TlsByAlpn {
            either: with(&[b"h2", b"http/1.1"]),
            h1: with(&[b"http/1.1"]),
            h2: with(&[b"h2"]),
        }
    }

    fn get(&self, alpn: Alpn) -> TlsConnector {
        match alpn {
            Alpn::Either => self.either.clone(),
            Alpn::H1 => self.h1.clone(),
            Alpn::H2 => self.h2.clone(),
        }
    }
}

impl Connector {
    /// A connector offering `alpn`, its connections counted against `budget` (a sandbox's).
    pub fn new(settings: Arc<UpstreamSettings>, alpn: Alpn, budget: &Budget) -> Self {
        Connector::with(settings, alpn, budget, false, None)
    }

    fn with(
        settings: Arc<UpstreamSettings>,
        alpn: Alpn,
        budget: &Budget,
        require_h2: bool,
        live_h2: Option<Arc<LiveH2>>,
    ) -> Self {
        Connector(Arc::new(Parts {
            tls: settings.tls.get(alpn),
            settings,
            require_h2,
            budget: budget.clone(),
            dialing: Dialing::default(),
            live_h2,
        }))
    }

    /// The dual-protocol client's connector: offers h2 and http/1.1, and counts its usable h2
    /// connections in `live` (see [`LiveH2`]).
    pub fn dual(settings: Arc<UpstreamSettings>, budget: &Budget, live: Arc<LiveH2>) -> Self {
        Connector::with(settings, Alpn::Either, budget, false, Some(live))
    }

    /// A connector for an `http2_only` client: offers only h2 and returns
    /// [`ConnectError::NotH2`] (before anything is sent) when the origin does not choose it.
    /// Plain-HTTP destinations never reach it (no h2c upstream).
    pub fn h2_only(settings: Arc<UpstreamSettings>, budget: &Budget) -> Self {
        Connector::with(settings, Alpn::H2, budget, true, None)
    }
}

impl std::ops::Deref for Connector {
    type Target = Parts;

    fn deref(&self) -> &Parts {
        &self.0
    }
}

pub use crate::tls_roots::client_tls;

impl tower_service::Service<Uri> for Connector {
    type Response = UpstreamStream;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<UpstreamStream, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { this.connect(uri).await })
    }
}

impl Connector {
    /// Waits for a turn ([`DIALS_PER_HOST`]; at most `connect_timeout`), takes the budget's
    /// slots, then dials within `connect_timeout` counted from the dial's start.
    async fn connect(&self, uri: Uri) -> Result<UpstreamStream, ConnectError> {
        let config = &self.settings.config;
        let timeout = config.connect_timeout;
        // Waited for before the slots: a request waiting for its turn holds none.
        let dest = uri.authority().map_or("", |a| a.as_str());
        let _turn = self.dialing.turn_within(dest, timeout).await;
        tokio::time::timeout(timeout, self.dial(uri))
            .await
            .unwrap_or(Err(ConnectError::Timeout))
    }

    async fn dial(&self, uri: Uri) -> Result<UpstreamStream, ConnectError> {
        let config = &self.settings.config;
        let max = config.max_connections_per_sandbox;
        let slot = self.budget.take(max).ok_or(ConnectError::TooMany(max))?;
        let max = config.max_connections;
        let total =
            (self.settings.counts.connections.take(max)).ok_or(ConnectError::DaemonFull(max))?;
        let io = self.connect_io(uri).await?;
        Ok(UpstreamStream {
            io,
            _slots: (slot, total),
        })
    }

    async fn connect_io(&self, uri: Uri) -> Result<Io, ConnectError> {
        let host = uri
            .host()
            .ok_or_else(|| ConnectError::Unreachable("no host".into()))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let https = uri.scheme_str() == Some("https");
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        // No h2c upstream: the h2-only client never speaks h2 in clear (it did, to a plain
        // origin, once `known_h2` mixed `http://H` with `https://H`).
        if !https && self.require_h2 {
            return Err(ConnectError::NotH2);
        }
        let (addrs, overridden) = self.addresses(host, port).await?;
        let tcp = dial(&addrs, !overridden).await?;
        if !https {
            let counts = overhead::Overhead::to(format!("{host}:{port}"));
            return Ok(Io::Plain(TokioIo::new(Counted::new(tcp, counts))));
        }
        let name = ServerName::try_from(host.to_owned())
            .map_err(|_| ConnectError::Tls(format!("invalid server name {host}")))?;
        let tls = self
            .tls
            .connect(name, ReadAhead::new(tcp))
            .await
            .map_err(|e| match self.require_h2 && refused_alpn(&e) {
                true => ConnectError::NotH2,
                false => ConnectError::Tls(tls_error::describe(&e)),
            })?;
        if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
            let origin = format!("{host}:{port}").into_boxed_str();
            let mut watched =
                RefuseAfterGoaway::new(tls).learning(self.settings.stream_limits.clone(), origin);
            if let (Some(live), Some(dest)) = (&self.live_h2, uri.authority()) {
                watched = watched.marking(live.mark(dest.as_str()));
            }
            return Ok(Io::H2(Box::new(TokioIo::new(watched))));
        }
        if self.require_h2 {
            return Err(ConnectError::NotH2);
        }
        let counts = overhead::Overhead::to(format!("{host}:{port}"));
        Ok(Io::Tls(Box::new(TokioIo::new(Counted::new(tls, counts)))))
    }

    /// The addresses to dial: the override (`true`: trusted as written), or every DNS
    /// answer, each vetted.
    async fn addresses(
        &self,
        host: &str,
        port: u16,
    ) -> Result<(Vec<SocketAddr>, bool), ConnectError> {
        if let Some(a) = self.settings.config.resolve.get(host) {
            self.settings
                .vet
                .vet_own_listener(*a)
                .map_err(|e| ConnectError::Denied(e.to_string()))?;
            return Ok((vec![*a], true));
        }
        // Invariant: `host` passed policy::normalise_host, so legacy IPv4 spellings never reach getaddrinfo.
        let normalised =
            policy::normalise_host(host).map_err(|e| ConnectError::Denied(e.to_string()))?;
        let addrs: Vec<SocketAddr> = match normalised {
            policy::Host::Ip(ip) => vec![SocketAddr::new(ip, port)],
            policy::Host::Name(n) => self.resolve(&n, port).await?,
        };
        if addrs.is_empty() {
            return Err(ConnectError::Unreachable(format!(
                "{host} has no addresses"
            )));
        }
        // Strict: one non-public answer, or one of this host's own, refuses the whole name
        // (defeats mixed answers and rebinding).
        for a in &addrs {
            (self.settings.vet.vet(*a))
                .and_then(|()| UpstreamSettings::vet_not_this_host(*a))
                .map_err(|e| ConnectError::Denied(format!("{host}: {e}")))?;
        }
        Ok((addrs, false))
    }
}

impl Connector {
    /// Every address of `name`: from `[upstream] nameservers` when set, else the system
    /// resolver. Unvetted: the caller vets every one.
    async fn resolve(&self, name: &str, port: u16) -> Result<Vec<SocketAddr>, ConnectError> {
        let failed = |e: &dyn std::fmt::Display| {
            ConnectError::Unreachable(format!("cannot resolve {name}: {e}"))
        };
        if self.settings.config.nameservers.is_empty() {
            let found = tokio::net::lookup_host((name, port))
                .await
                .map_err(|e| failed(&e))?;
            return Ok(found.collect());
        }
        dns::lookup(&self.settings.config.nameservers, name, port)
            .await
            .map_err(|e| failed(&e))
    }
}

/// Connects to the first of `addrs` that answers. With `refuse_this_host`, a connection to a
/// public address that landed on this host is refused ([`lands_on_this_host`]; a non-public
/// one is here only because `allow_private_cidrs` lets it be): the fallback for
/// [`UpstreamSettings::vet_not_this_host`], which asked before dialling unless the kernel
/// could not be asked.
async fn dial(addrs: &[SocketAddr], refuse_this_host: bool) -> Result<TcpStream, ConnectError> {
    let mut last = None;
    for a in addrs {
        let public = policy::classify(a.ip()).is_none();
        match TcpStream::connect(a).await {
            Ok(s) if refuse_this_host && public && lands_on_this_host(&s) => {
                return Err(ConnectError::Denied(format!(
                    "{}: an address of this host (its services are not upstreams)",
                    a.ip()
                )));
            }
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(ConnectError::Unreachable(
        last.map_or_else(|| "no address".into(), |e| e.to_string()),
    ))
}

/// Whether `s` is connected to one of this host's own addresses. Address vetting refuses
/// loopback and private ranges, but a host's *public* addresses (a public IPv4 on an
/// interface, a global IPv6) passed, and a sandbox reached every host service listening on
/// all addresses through them, sealgate's own wildcard listeners included (outside review).
/// They cannot be listed without I/O and change at run time; the kernel tells instead: a
/// connection to a local address is routed through the loopback and takes that very address
/// as its source, which no connection to another host does.
fn lands_on_this_host(s: &TcpStream) -> bool {
    match (s.local_addr(), s.peer_addr()) {
        (Ok(local), Ok(peer)) => local.ip().to_canonical() == peer.ip().to_canonical(),
        _ => false,
    }
}

/// Read through a [`ReadAhead`]: a large response record in one `recv`, not one per 4 KiB.
type TlsStream = tokio_rustls::client::TlsStream<ReadAhead<TcpStream>>;

/// An upstream connection, holding its place in its sandbox's [`Budget`] and in the
/// daemon's ([`Counts::connections`]) until dropped.
///
/// Field order matters: `io` is dropped (the socket closed) before `_slots` gives the places
/// back, so whoever gets a place finds the connection gone.
pub struct UpstreamStream {
    io: Io,
    _slots: (crate::sandbox::BudgetSlot, crate::sandbox::BudgetSlot),
}

/// A plain or TLS upstream connection. HTTP/1 reads count into the connection's [`Overhead`].
enum Io {
    /// Plain HTTP.
    Plain(TokioIo<Counted<TcpStream>>),
    /// HTTPS, HTTP/1.1.
    Tls(Box<TokioIo<Counted<TlsStream>>>),
    /// HTTPS that negotiated h2: streams opened after the server's GOAWAY are refused.
    H2(Box<TokioIo<RefuseAfterGoaway<TlsStream>>>),
}

/// A connection closes with a reset when it was cut ([`cut`]) or still has bytes the kernel
/// has not sent: its origin was not reading, and a normal close left them queued in the
/// kernel, the socket in FIN-WAIT-1, for minutes each (outside pass h49b: ~1 GB of the host's
/// TCP memory after 250 cut uploads; h49e: uploads still going at a daemon stop, 164 MB left
/// after the process had exited). A connection whose bytes all went out closes normally
/// (a TLS close_notify written by a clean shutdown is sent by then).
impl Drop for UpstreamStream {
    fn drop(&mut self) {
        let (tcp, cut) = match &self.io {
            Io::Plain(s) => (s.inner().get_ref(), s.inner().overhead().cut.is_cut()),
            Io::Tls(s) => (
                s.inner().get_ref().get_ref().0.get_ref(),
                s.inner().overhead().cut.is_cut(),
            ),
            Io::H2(s) => (s.inner().get_ref().get_ref().0.get_ref(), false),
        };
        if cut || unsent_bytes(tcp) > 0 {
            let _ = tcp.set_zero_linger();
        }
    }
}

/// Bytes written to `tcp` that the kernel has not sent yet (`SIOCOUTQNSD`; sent but not yet
/// acknowledged ones are not counted); 0 when it cannot tell.
fn unsent_bytes(tcp: &TcpStream) -> u32 {
    use std::os::fd::AsRawFd as _;
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQNSD writes one int through the pointer, which is valid for the call;
    // the descriptor is the live socket `tcp` owns.
    let rc = unsafe { libc::ioctl(tcp.as_raw_fd(), libc::SIOCOUTQNSD as _, &mut n) };
    if rc == 0 {
        u32::try_from(n).unwrap_or(0)
    } else {
        0
    }
}

impl Connection for UpstreamStream {
    /// An HTTP/1 connection hands its [`Overhead`] to each of its answers ([`OverheadOf`]).
    fn connected(&self) -> Connected {
        match &self.io {
            Io::Plain(s) => Connected::new().extra(OverheadOf(s.inner().overhead())),
            Io::Tls(s) => Connected::new().extra(OverheadOf(s.inner().overhead())),
            Io::H2(_) => Connected::new().negotiated_h2(),
        }
    }
}

impl hyper::rt::Read for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Io::H2(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl hyper::rt::Write for UpstreamStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Io::H2(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    /// h2 writes a DATA frame as its 9-byte header and the payload: through a vectored write
    /// TLS seals both in one go and sends them with one syscall (through `poll_write` they
    /// were a record and a syscall each).
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Io::H2(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
            Io::H2(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Io::H2(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Io::H2(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a peer that does not read leaves unsent is counted; a connection whose bytes went
    /// out has none.
    #[tokio::test]
    async fn unsent_bytes_are_what_a_peer_that_does_not_read_left_queued() {
        use tokio::io::AsyncWriteExt as _;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut out = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (_peer, _) = l.accept().await.unwrap();
        out.write_all(b"sent").await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(unsent_bytes(&out), 0);
        let chunk = vec![0u8; 1 << 20];
        while let Ok(Ok(_)) =
            tokio::time::timeout(std::time::Duration::from_millis(200), out.write(&chunk)).await
        {
        }
        assert!(unsent_bytes(&out) > 0, "the peer's window is full");
    }

    /// An origin that speaks none of the offered protocols, whichever way it says so, is "not
    /// h2" for an h2-only connector; any other handshake failure is not.
    #[test]
    fn an_alpn_the_origin_refused_or_chose_unoffered_is_not_h2() {
        use rustls::{AlertDescription, Error, PeerMisbehaved};
        let io = |e: Error| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        let refused = Error::AlertReceived(AlertDescription::NoApplicationProtocol);
        let unoffered = Error::PeerMisbehaved(PeerMisbehaved::SelectedUnofferedApplicationProtocol);
        assert!(refused_alpn(&io(refused)));
        assert!(refused_alpn(&io(unoffered)));
        let other = Error::PeerMisbehaved(PeerMisbehaved::SelectedUnofferedCipherSuite);
        assert!(!refused_alpn(&io(other)));
        assert!(!refused_alpn(&io(Error::DecryptError)));
        let eof = std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
        assert!(!refused_alpn(&eof));
    }

    /// The kernel property [`lands_on_this_host`] relies on: a connection to one of this host's
    /// addresses, loopback or not, has that address as its source.
    #[tokio::test]
    async fn a_connection_to_an_address_of_this_host_is_recognised() {
        let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accept = tokio::spawn(async move {
            for _ in 0..2 {
                let _ = listener.accept().await;
            }
        });
        let lo = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        assert!(lands_on_this_host(&lo));
        // The host's own address on its default route (a UDP "connect" sends nothing).
        let probe = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        probe.connect("198.51.100.1:9").expect("a default route");
        let own = probe.local_addr().unwrap().ip();
        let s = TcpStream::connect((own, port)).await.unwrap();
        assert!(lands_on_this_host(&s), "{own}");
        accept.abort();
    }

    /// At most [`DIALS_PER_HOST`] attempts to one destination at a time; another destination
    /// is not held up by them.
    #[tokio::test]
    async fn dials_to_one_destination_take_turns() {
        let dialing = Dialing::default();
        let mut held = Vec::new();
        for _ in 0..DIALS_PER_HOST {
            held.push(dialing.turn("a:443").await.expect("a turn"));
        }
        let wait = std::time::Duration::from_millis(50);
        assert!(
            tokio::time::timeout(wait, dialing.turn("a:443"))
                .await
                .is_err(),
            "a waits"
        );
        assert!(
            tokio::time::timeout(wait, dialing.turn("b:443"))
                .await
                .is_ok(),
            "b does not"
        );
        let waited = std::time::Instant::now();
        assert!(
            dialing.turn_within("a:443", wait).await.is_none(),
            "no turn within the wait: the caller dials without one"
        );
        assert!(waited.elapsed() >= wait);
        held.pop();
        assert!(
            tokio::time::timeout(wait, dialing.turn("a:443"))
                .await
                .is_ok(),
            "a's turn freed"
        );
    }
}
