//! Prometheus metrics (prometheus-client), exposed at `GET /metrics` on the admin listener.
//!
//! Invariant: labels carry decisions, error codes, secret *names* and hosts — never values.

use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::task::{Context, Poll};

use bytes::Buf;
use http_body::{Body, Frame, SizeHint};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Labels for request and tunnel counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// "allow", "deny", "error".
    pub decision: &'static str,
    /// Error code or "ok".
    pub code: &'static str,
}

/// Labels for unseal counters. Shared strings, so that counting an unseal on the request path
/// clones two `Arc`s instead of allocating two `String`s.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct UnsealLabels {
    /// Secret name.
    pub secret: std::sync::Arc<str>,
    /// Destination host:port.
    pub host: std::sync::Arc<str>,
}

/// As the derive would write it (which needs `Sized` label values; `str` is not).
impl EncodeLabelSet for UnsealLabels {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::LabelSetEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeLabel as _;
        ("secret", &*self.secret).encode(encoder.encode_label())?;
        ("host", &*self.host).encode(encoder.encode_label())
    }
}

/// Labels of the failed client handshakes' counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeFailureLabels {
    /// "client_alert" (the client's TLS stack refused: most often it does not trust the
    /// sandbox's CA), "timeout", "handshake_error" (not TLS, or nothing in common), "leaf".
    pub reason: &'static str,
}

impl HandshakeFailureLabels {
    /// Every `reason` there is.
    pub const REASONS: [&'static str; 4] = ["client_alert", "timeout", "handshake_error", "leaf"];
}

/// Labels of the per-worker gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabels {
    /// The proxy worker's index (`sealgate-proxy-N`).
    pub worker: usize,
}

/// Labels for store operations.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    /// e.g. "store.create".
    pub op: String,
}

/// The leaf cache's metrics. Registered by [`Metrics::new`] and handed to the cache
/// (`ca::LeafCache::with_counters`), which counts into them directly: the registry owns
/// them, nothing is copied at scrape time.
#[derive(Clone, Debug, Default)]
pub struct LeafCounters {
    /// Leaves minted.
    pub mints: Counter,
    /// Lookups answered from the cache.
    pub hits: Counter,
    /// Lookups that waited for or ran a mint.
    pub misses: Counter,
    /// Leaves held in the cache (finished or in flight).
    pub entries: Gauge,
}

/// All metrics of the daemon.
pub struct Metrics {
    registry: Registry,
    /// Proxied requests by decision.
    pub requests: Family<DecisionLabels, Counter>,
    /// Tunnels (CONNECT / transparent connections) by decision.
    pub tunnels: Family<DecisionLabels, Counter>,
    /// Secrets unsealed, by secret and host; count through [`Metrics::count_unseal`].
    pub unsealed: Family<UnsealLabels, Counter>,
    /// How many (secret, host) series `unsealed` has, at most about [`MAX_UNSEAL_SERIES`].
    unsealed_series: std::sync::atomic::AtomicUsize,
    /// Request body bytes sent upstream.
    pub bytes_up: Counter,
    /// Response body bytes sent to sandboxes.
    pub bytes_down: Counter,
    /// Real values scrubbed from answers to sandboxes (handed to each scrubbed answer's
    /// tally, `proxy::response_scrub`).
    pub values_scrubbed: Counter,
    /// Upstream response-head latency, seconds.
    pub upstream_latency: Histogram,
    /// Completed client TLS handshakes.
    pub tls_handshakes: Counter,
    /// Client TLS handshakes that failed, by reason (no sandbox id: the debug line has it).
    pub tls_handshake_failures: Family<HandshakeFailureLabels, Counter>,
    /// The leaf cache's counters (handed to the cache).
    pub leaf: LeafCounters,
    /// hits / (hits + misses) since start; 0 before the first lookup (derived at scrape).
    pub leaf_hit_ratio: Gauge<f64, AtomicU64>,
    /// Live sandboxes.
    pub sandboxes: Gauge,
    /// Open client connections.
    pub connections: Gauge,
    /// Open upstream connections, all sandboxes together, in use or idle in their pools
    /// (the daemon's count against `[upstream] max_connections`).
    pub upstream_connections: Gauge,
    /// Open client connections per proxy worker (how the kernel spread them).
    pub worker_connections: Family<WorkerLabels, Gauge>,
    /// Store operations.
    pub store_ops: Family<OpLabels, Counter>,
    /// Fleet mode: seconds since this node last reached the shared database (0 with SQLite).
    pub store_sync_lag: Gauge<f64, AtomicU64>,
    /// Audit lines lost: the writer's queue was full, or a write failed (handed to the audit
    /// sink).
    pub audit_dropped: Counter,
    /// Client connections closed before they identified themselves, to make room for newer
    /// ones (`proxy::admission`).
    pub connections_evicted: Counter,
    /// Seconds the proxy workers spent busy-polling instead of sleeping (handed to each
    /// worker's `proxy::spin::Spinner`).
    pub busy_poll_seconds: Counter<f64, AtomicU64>,
}

/// Distinct (secret, host) series of `secrets_unsealed_total`; later hosts are counted as
/// `host="_other"`. A secret allowed under a wildcard could otherwise add a series (kept
/// forever, rendered at every scrape) per host name a sandbox makes up.
pub const MAX_UNSEAL_SERIES: usize = 1000;

/// The `host` label of unseals past [`MAX_UNSEAL_SERIES`].
pub const OTHER_HOST: &str = "_other";

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Counts one unseal of `secret` for `host`, in a bounded number of series.
    pub fn count_unseal(&self, secret: &std::sync::Arc<str>, host: &std::sync::Arc<str>) {
        let labels = UnsealLabels {
            secret: secret.clone(),
            host: host.clone(),
        };
        use std::sync::atomic::Ordering::Relaxed;
        if let Some(counter) = self.unsealed.get(&labels) {
            counter.inc();
            return;
        }
        // A new series: racing first unseals may pass the bound by a few (and count one series
        // twice); it bounds growth, not exactly.
        let labels = if self.unsealed_series.fetch_add(1, Relaxed) < MAX_UNSEAL_SERIES {
            labels
        } else {
            static OTHER: std::sync::LazyLock<std::sync::Arc<str>> =
                std::sync::LazyLock::new(|| std::sync::Arc::from(OTHER_HOST));
            UnsealLabels {
                secret: secret.clone(),
                host: OTHER.clone(),
            }
        };
        self.unsealed.get_or_create(&labels).inc();
    }

    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("sealgate");
        let m = Metrics {
            requests: Family::default(),
            tunnels: Family::default(),
            unsealed: Family::default(),
            unsealed_series: std::sync::atomic::AtomicUsize::new(0),
            bytes_up: Counter::default(),
            bytes_down: Counter::default(),
            values_scrubbed: Counter::default(),
            upstream_latency: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            tls_handshakes: Counter::default(),
            tls_handshake_failures: Family::default(),
            leaf: LeafCounters::default(),
            leaf_hit_ratio: Gauge::default(),
            sandboxes: Gauge::default(),
            connections: Gauge::default(),
            upstream_connections: Gauge::default(),
            worker_connections: Family::default(),
            store_ops: Family::default(),
            store_sync_lag: Gauge::default(),
            registry: Registry::default(),
            audit_dropped: Counter::default(),
            connections_evicted: Counter::default(),
            busy_poll_seconds: Counter::default(),
        };
        registry.register(
            "requests",
            "Proxied requests by decision and code",
            m.requests.clone(),
        );
        registry.register(
            "tunnels",
            "Intercepted connections by decision and code",
            m.tunnels.clone(),
        );
        registry.register(
            "secrets_unsealed",
            "Secrets unsealed by secret name and host",
            m.unsealed.clone(),
        );
        registry.register(
            "bytes_up",
            "Request body bytes sent upstream",
            m.bytes_up.clone(),
        );
        registry.register(
            "bytes_down",
            "Response body bytes sent to sandboxes",
            m.bytes_down.clone(),
        );
        registry.register(
            "values_scrubbed",
            "Real secret values scrubbed from answers to sandboxes (replaced by their tokens, \
             or a header field naming one dropped): an upstream handed one back",
            m.values_scrubbed.clone(),
        );
        registry.register(
            "upstream_latency_seconds",
            "Upstream response head latency",
            m.upstream_latency.clone(),
        );
        registry.register(
            "tls_handshakes",
            "Completed client TLS handshakes",
            m.tls_handshakes.clone(),
        );
        // Every reason exported from the start at 0: an alert on one sees a value, not "no
        // data", on a daemon that has had no failure yet (review h48c).
        for reason in HandshakeFailureLabels::REASONS {
            let _ = m
                .tls_handshake_failures
                .get_or_create(&HandshakeFailureLabels { reason });
        }
        registry.register(
            "tls_handshake_failures",
            "Client TLS handshakes that failed, by reason (client_alert: the client refused \
             the leaf, most often because it does not trust the sandbox's CA)",
            m.tls_handshake_failures.clone(),
        );
        registry.register(
            "leaf_mints",
            "Leaf certificates minted",
            m.leaf.mints.clone(),
        );
        registry.register(
            "leaf_cache_hits",
            "Leaf certificate cache hits",
            m.leaf.hits.clone(),
        );
        registry.register(
            "leaf_cache_misses",
            "Leaf certificate cache misses",
            m.leaf.misses.clone(),
        );
        registry.register(
            "leaf_cache_hit_ratio",
            "Leaf certificate cache hits / lookups since start",
            m.leaf_hit_ratio.clone(),
        );
        registry.register(
            "leaf_cache_entries",
            "Leaf certificates held in the cache",
            m.leaf.entries.clone(),
        );
        registry.register("active_sandboxes", "Live sandboxes", m.sandboxes.clone());
        registry.register(
            "active_connections",
            "Open proxy client connections",
            m.connections.clone(),
        );
        registry.register(
            "upstream_connections",
            "Open upstream connections, all sandboxes, in use or idle (upstream.max_connections)",
            m.upstream_connections.clone(),
        );
        registry.register(
            "worker_connections",
            "Open proxy client connections per proxy worker",
            m.worker_connections.clone(),
        );
        registry.register(
            "store_operations",
            "Admin store operations",
            m.store_ops.clone(),
        );
        registry.register(
            "store_sync_lag_seconds",
            "Fleet mode: seconds since this node last reached the shared database",
            m.store_sync_lag.clone(),
        );
        registry.register(
            "audit_dropped",
            "Audit lines lost: the audit writer's queue was full, or a write failed (disk full)",
            m.audit_dropped.clone(),
        );
        registry.register(
            "connections_evicted",
            "Client connections closed unidentified to make room for newer ones \
             (proxy.max_unauthenticated_per_source, max_unauthenticated_connections, max_connections)",
            m.connections_evicted.clone(),
        );
        registry.register(
            "busy_poll_seconds",
            "Seconds proxy workers spent polling instead of sleeping (proxy.busy_poll_us)",
            m.busy_poll_seconds.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Counts a request decision.
    pub fn request(&self, decision: &'static str, code: &'static str) {
        self.requests
            .get_or_create(&DecisionLabels { decision, code })
            .inc();
    }

    /// Counts a tunnel decision.
    pub fn tunnel(&self, decision: &'static str, code: &'static str) {
        self.tunnels
            .get_or_create(&DecisionLabels { decision, code })
            .inc();
    }

    /// Counts a store operation.
    pub fn store_op(&self, op: &str) {
        self.store_ops
            .get_or_create(&OpLabels { op: op.into() })
            .inc();
    }

    /// The Prometheus text exposition format 0.0.4 (`text/plain; version=0.0.4`), for
    /// scrapers that do not ask for OpenMetrics: the same samples as [`Self::render`].
    pub fn render_prometheus_text(&self) -> String {
        openmetrics_to_prometheus_text(&self.render())
    }

    /// OpenMetrics text exposition (`application/openmetrics-text; version=1.0.0`).
    pub fn render(&self) -> String {
        let (hits, misses) = (self.leaf.hits.get(), self.leaf.misses.get());
        let lookups = hits + misses;
        let ratio = if lookups == 0 {
            0.0
        } else {
            hits as f64 / lookups as f64
        };
        self.leaf_hit_ratio.set(ratio);
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// OpenMetrics text as Prometheus text 0.0.4, for the counters, gauges and histograms this
/// registry holds: a counter family is declared under its samples' `_total` name (OpenMetrics
/// declares the bare name), `# UNIT` and `# EOF` lines are dropped (0.0.4 has neither), and
/// samples are unchanged.
fn openmetrics_to_prometheus_text(open: &str) -> String {
    let counters: std::collections::HashSet<&str> = open
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|t| t.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(open.len() + 16 * counters.len());
    for line in open.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let declared = ["# HELP ", "# TYPE "]
            .iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (*p, rest)));
        match declared {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                out.push_str(prefix);
                out.push_str(name);
                if counters.contains(name) {
                    out.push_str("_total");
                }
                if !tail.is_empty() {
                    out.push(' ');
                    out.push_str(tail);
                }
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// Where [`Counted`] adds the bytes it sees.
pub trait Tally {
    /// `n` more data bytes went by.
    fn add(&self, n: usize);

    /// The body was just polled: `pending` if it had nothing ready (its writer is the slow
    /// one), else it yielded a frame or ended.
    fn polled(&self, pending: bool) {
        let _ = pending;
    }
}

impl Tally for Counter {
    fn add(&self, n: usize) {
        self.inc_by(n as u64);
    }
}

pin_project_lite::pin_project! {
    /// A body that adds the length of every data frame it yields to a tally: a byte counter
    /// (a clone of a registered one), or a request body's progress (`proxy::progress`).
    pub struct Counted<B, T = Counter> {
        #[pin]
        inner: B,
        counter: T,
    }
}

impl<B, T> Counted<B, T> {
    /// Wraps `inner`; `counter` is shared.
    pub fn new(inner: B, counter: T) -> Self {
        Counted { inner, counter }
    }
}

impl<B: Body, T: Tally> Body for Counted<B, T> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let r = this.inner.poll_frame(cx);
        this.counter.polled(r.is_pending());
        if let Poll::Ready(Some(Ok(f))) = &r {
            if let Some(d) = f.data_ref() {
                this.counter.add(d.remaining());
            }
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn unseal_series_are_bounded() {
        let m = Metrics::new();
        let key: Arc<str> = Arc::from("KEY");
        for i in 0..MAX_UNSEAL_SERIES + 50 {
            m.count_unseal(&key, &Arc::from(format!("h{i}.example.test:443")));
        }
        m.count_unseal(&key, &Arc::from("h0.example.test:443"));
        let text = m.render();
        let series = text
            .lines()
            .filter(|l| l.starts_with("sealgate_secrets_unsealed_total{"))
            .count();
        assert_eq!(series, MAX_UNSEAL_SERIES + 1, "the bound plus _other");
        assert!(text.contains(r#"host="_other"} 50"#), "{}", &text[..200]);
        assert!(text.contains(r#"host="h0.example.test:443"} 2"#));
    }

    /// Every family of the 0.0.4 text is declared under the names its samples carry, and the
    /// samples are the OpenMetrics ones.
    #[test]
    fn prometheus_text_declares_what_its_samples_are_named() {
        let m = Metrics::new();
        m.bytes_up.inc_by(7);
        m.upstream_latency.observe(0.01);
        m.tunnel("allowed", "ok");
        let (open, text) = (m.render(), m.render_prometheus_text());
        assert!(text.contains("# HELP sealgate_bytes_up_total Request body bytes sent upstream.\n"));
        assert!(
            text.contains("# TYPE sealgate_bytes_up_total counter\nsealgate_bytes_up_total 7\n")
        );
        assert!(text.contains("# TYPE sealgate_upstream_latency_seconds histogram\n"));
        assert!(text.contains("# TYPE sealgate_active_sandboxes gauge\n"));
        assert!(!text.contains("# EOF") && !text.contains("# UNIT"));
        let samples = |t: &str| -> Vec<String> {
            t.lines()
                .filter(|l| !l.starts_with('#'))
                .map(str::to_owned)
                .collect()
        };
        assert_eq!(samples(&open), samples(&text));
        let declared: std::collections::HashSet<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|t| t.split(' ').next())
            .collect();
        for sample in samples(&text) {
            let name = sample.split(['{', ' ']).next().unwrap();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|f| declared.contains(f)))
                .unwrap_or(name);
            assert!(declared.contains(family), "{sample} has no TYPE line");
        }
    }
}
