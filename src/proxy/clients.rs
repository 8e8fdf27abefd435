//! The upstream clients: on each proxy worker, one set per sandbox.
//!
//! Why per sandbox: a pooled upstream connection carries every request that reuses it, and
//! over h2 every request at once. Shared across sandboxes, one sandbox could end or stall the
//! requests of another on the same origin: a header field the origin will not take closes the
//! whole h2 connection with every stream on it (nginx: "client sent too large header field"),
//! responses read slowly fill the connection's flow-control window so that no other stream
//! gets a byte, and streams held open use up the origin's `SETTINGS_MAX_CONCURRENT_STREAMS`.
//! Here a request reuses only connections that requests of its own sandbox opened, on its own
//! worker (the connections are driven by the thread the requests run on).
//!
//! Invariants: a [`Clients`] set is used by the requests of one sandbox on one worker only; a
//! set lives until its sandbox ends (the daemon drops the sandbox's sets on every worker then,
//! with their idle connections: `Sandboxes::on_end`), or as long as its sandbox's `Arc`
//! otherwise (dropped when the worker next makes a set; hyper's pool closes idle connections
//! after `[upstream] pool_idle_timeout_secs` meanwhile); a reload builds new
//! [`super::LiveSettings`], so new sets, and the old ones go with the old settings.

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::{upstream, UpstreamClient};
use crate::config::UpstreamConfig;
use crate::sandbox::Budget;

/// One worker's client sets, by owner (the sandbox).
pub(super) struct PerSandbox {
    /// Keyed by the owner's `Arc` address: while an entry's `Weak` lives, that allocation is
    /// not freed, so no other owner can have the same address.
    sets: Mutex<HashMap<usize, Entry>>,
}

struct Entry {
    owner: Weak<dyn Any + Send + Sync>,
    clients: Arc<Clients>,
}

impl PerSandbox {
    pub(super) fn new() -> PerSandbox {
        PerSandbox {
            sets: Mutex::new(HashMap::new()),
        }
    }

    /// `owner`'s set, made on first use (dropping the sets of owners gone meanwhile), its
    /// connections counted against `budget` (the owner's, the same on every worker).
    pub(super) fn of<O: Send + Sync + 'static>(
        &self,
        owner: &Arc<O>,
        budget: &Budget,
        settings: &Arc<upstream::UpstreamSettings>,
    ) -> Arc<Clients> {
        let key = Arc::as_ptr(owner) as usize;
        let mut sets = self.lock();
        if let Some(e) = sets.get(&key) {
            return e.clients.clone();
        }
        // Dropped after the lock: dropping a set closes its idle connections.
        let gone: Vec<usize> = sets
            .iter()
            .filter(|(_, e)| e.owner.strong_count() == 0)
            .map(|(k, _)| *k)
            .collect();
        let gone: Vec<Entry> = gone.iter().filter_map(|k| sets.remove(k)).collect();
        let clients = Arc::new(Clients::new(settings, budget));
        let owner: Arc<dyn Any + Send + Sync> = owner.clone();
        let owner = Arc::downgrade(&owner);
        sets.insert(
            key,
            Entry {
                owner,
                clients: clients.clone(),
            },
        );
        drop(sets);
        drop(gone);
        clients
    }

    /// Drops `owner`'s set (its idle connections close; requests still using it keep it until
    /// they end); its next request makes a new one.
    pub(super) fn drop_set<O>(&self, owner: &Arc<O>) {
        let key = Arc::as_ptr(owner) as usize;
        let mut sets = self.lock();
        let gone = sets.remove(&key);
        drop(sets);
        drop(gone);
    }

    /// Drops every set (a reload: requests take the new settings' sets from now on).
    pub(super) fn clear(&self) {
        let mut sets = self.lock();
        let gone = std::mem::take(&mut *sets);
        drop(sets);
        drop(gone);
    }

    /// How many sets are held (those of owners gone included, until the next new set).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }

    /// The map; a panic while it was held left nothing half-done (each operation is one map
    /// call), so a poisoned lock is taken as it is.
    fn lock(&self) -> MutexGuard<'_, HashMap<usize, Entry>> {
        self.sets.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The upstream clients of one sandbox on one proxy worker, each with a pool of its own.
pub struct Clients {
    /// h2 + http/1.1 client (pooled per authority), for origins not (yet) known to speak h2,
    /// and for held bodies to an origin known to while it holds a usable h2 connection there
    /// (`dual_h2`).
    pub client: UpstreamClient,
    /// `client`'s usable h2 connections, per destination.
    pub dual_h2: Arc<upstream::LiveH2>,
    /// http/1.1-only client, for WebSocket upgrades.
    pub client_h1: UpstreamClient,
    /// h2-only client (pooled per authority, one connection attempt at a time), for the
    /// held-body requests to origins in `known_h2` while `client` holds no usable h2
    /// connection there.
    pub client_h2: UpstreamClient,
    /// h2-only client with a pool of its own, for the retry of a request the upstream
    /// provably did not process (only h2 connections report that): the refused requests of
    /// one GOAWAY share one new connection here, where `client`'s pool would hand out the
    /// refusing connection again.
    pub client_retry: UpstreamClient,
    /// h2 + http/1.1 client without a pool: one new connection per request, the last resort
    /// when the retry connection refuses too (its own GOAWAY).
    pub client_fresh: UpstreamClient,
}

impl Clients {
    fn new(settings: &Arc<upstream::UpstreamSettings>, budget: &Budget) -> Clients {
        let upstream = &settings.config;
        let connector = |alpn| upstream::Connector::new(settings.clone(), alpn, budget);
        let h2_only = || upstream::Connector::h2_only(settings.clone(), budget);
        let dual_h2 = Arc::new(upstream::LiveH2::default());
        let dual = upstream::Connector::dual(settings.clone(), budget, dual_h2.clone());
        Clients {
            client: build_client(upstream, dual),
            dual_h2,
            client_h1: build_client(upstream, connector(upstream::Alpn::H1)),
            client_h2: build_h2_client(upstream, h2_only()),
            client_retry: build_h2_client(upstream, h2_only()),
            client_fresh: client_builder(upstream)
                .pool_max_idle_per_host(0)
                .build(connector(upstream::Alpn::Either)),
        }
    }
}

fn build_client(cfg: &UpstreamConfig, conn: upstream::Connector) -> UpstreamClient {
    client_builder(cfg).build(conn)
}

fn build_h2_client(cfg: &UpstreamConfig, conn: upstream::Connector) -> UpstreamClient {
    client_builder(cfg).http2_only(true).build(conn)
}

/// Every upstream client starts here, so each gets the response-head limits and the h2
/// buffers (review h50a: the pool-less last resort was built on its own and opened its h2
/// connections with hyper's 2 MiB / 5 MiB windows).
fn client_builder(cfg: &UpstreamConfig) -> hyper_util::client::legacy::Builder {
    let mut b = Client::builder(TokioExecutor::new());
    b.pool_idle_timeout(cfg.pool_idle_timeout)
        .pool_max_idle_per_host(cfg.pool_max_idle_per_host)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        // HTTP/1 connections get exactly one `Host`, from the URI's authority; HTTP/2
        // connections get it as `:authority` only (nginx < 1.25 refuses `Host` beside it).
        .set_host(true);
    head_limits(&mut b, cfg);
    h2_buffers(&mut b, cfg);
    b
}

/// The h2 windows and send buffer of every upstream client (`[upstream] h2_*_bytes`,
/// `config::H2Buffers`). hyper's defaults, a 2 MiB stream and 5 MiB connection window, let an
/// h2 origin send a sandbox that does not read ~4.6 MB per stream into the daemon's memory
/// (one stream per connection: 256 such streams of one sandbox took over a GB).
fn h2_buffers(b: &mut hyper_util::client::legacy::Builder, cfg: &UpstreamConfig) {
    b.http2_initial_stream_window_size(cfg.h2.stream_window)
        .http2_initial_connection_window_size(cfg.h2.connection_window)
        .http2_max_send_buf_size(cfg.h2.send_buffer);
}

/// The response-head limits of every upstream client.
/// - `http1_max_buf_size`: hyper's adaptive read buffer grew to ~400 KiB on a large answer,
///   and a chunk the sandbox had not read yet pinned it while the next read took another:
///   ~1 MiB per unread answer (outside review: 256 tunnels of one sandbox, +250 MB).
/// - `http2_max_header_list_size`: the same byte bound for h2 origins, whose heads were held
///   to h2's default of 16 KiB (an outside pass: stock nginx and Node answering 18 KB heads got
///   502 through sealgate, 200 direct).
/// - `http1_max_headers` only when raised past hyper's 100: above that hyper allocates room
///   for that many fields on every response it parses.
fn head_limits<'b>(
    b: &'b mut hyper_util::client::legacy::Builder,
    cfg: &UpstreamConfig,
) -> &'b mut hyper_util::client::legacy::Builder {
    let bytes = cfg.max_response_header_bytes;
    b.http1_max_buf_size(bytes)
        .http2_max_header_list_size(u32::try_from(bytes).unwrap_or(u32::MAX));
    if cfg.max_response_header_fields != 100 {
        b.http1_max_headers(cfg.max_response_header_fields);
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::LiveSettings;

    fn settings() -> Arc<upstream::UpstreamSettings> {
        let c = crate::config::Config::parse("", "test").expect("embedded defaults");
        LiveSettings::new(c.proxy, c.upstream, Vec::new(), 1, Default::default())
            .expect("default settings")
            .upstream
            .clone()
    }

    #[test]
    fn one_set_per_owner_kept_while_it_lives() {
        let (s, sets) = (settings(), PerSandbox::new());
        let budget = Budget::default();
        let (a, b) = (Arc::new(1u8), Arc::new(2u8));
        let a1 = sets.of(&a, &budget, &s);
        assert!(
            Arc::ptr_eq(&a1, &sets.of(&a, &budget, &s)),
            "a's requests share a's set"
        );
        let b1 = sets.of(&b, &budget, &s);
        assert!(!Arc::ptr_eq(&a1, &b1), "b never gets a's set");
        assert_eq!(sets.len(), 2);
        drop(a);
        assert!(
            Arc::ptr_eq(&b1, &sets.of(&b, &budget, &s)),
            "a hit drops nothing"
        );
        assert_eq!(sets.len(), 2);
        sets.drop_set(&b);
        assert!(
            !Arc::ptr_eq(&b1, &sets.of(&b, &budget, &s)),
            "a new set after a drop"
        );
        let c = Arc::new(3u8);
        let c1 = sets.of(&c, &budget, &s);
        assert!(!Arc::ptr_eq(&c1, &a1) && !Arc::ptr_eq(&c1, &b1));
        assert_eq!(sets.len(), 2, "a's set went when c's was made");
    }
}
