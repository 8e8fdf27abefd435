//! Prometheus metrics (prometheus-client), exposed at `GET /metrics` on the admin listener.
//!
//! Invariant: labels carry decisions, error codes, secret *names* and hosts — never values.

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
    pub decision: String,
    /// Error code or "ok".
    pub code: String,
}

/// Labels for unseal counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UnsealLabels {
    /// Secret name.
    pub secret: String,
    /// Destination host:port.
    pub host: String,
}

/// Labels for store operations.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    /// e.g. "store.create".
    pub op: String,
}

/// All metrics of the daemon.
pub struct Metrics {
    registry: Registry,
    /// Proxied requests by decision.
    pub requests: Family<DecisionLabels, Counter>,
    /// Tunnels (CONNECT / transparent connections) by decision.
    pub tunnels: Family<DecisionLabels, Counter>,
    /// Secrets unsealed.
    pub unsealed: Family<UnsealLabels, Counter>,
    /// Request body bytes sent upstream.
    pub bytes_up: Counter,
    /// Response body bytes sent to sandboxes.
    pub bytes_down: Counter,
    /// Upstream response-head latency, seconds.
    pub upstream_latency: Histogram,
    /// Completed client TLS handshakes.
    pub tls_handshakes: Counter,
    /// Leaves minted.
    pub leaf_mints: Counter,
    /// Leaf cache hits.
    pub leaf_hits: Counter,
    /// Live sandboxes.
    pub sandboxes: Gauge,
    /// Open client connections.
    pub connections: Gauge,
    /// Store operations.
    pub store_ops: Family<OpLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("sealgate");
        let m = Metrics {
            requests: Family::default(),
            tunnels: Family::default(),
            unsealed: Family::default(),
            bytes_up: Counter::default(),
            bytes_down: Counter::default(),
            upstream_latency: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            tls_handshakes: Counter::default(),
            leaf_mints: Counter::default(),
            leaf_hits: Counter::default(),
            sandboxes: Gauge::default(),
            connections: Gauge::default(),
            store_ops: Family::default(),
            registry: Registry::default(),
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
            "upstream_latency_seconds",
            "Upstream response head latency",
            m.upstream_latency.clone(),
        );
        registry.register(
            "tls_handshakes",
            "Completed client TLS handshakes",
            m.tls_handshakes.clone(),
        );
        registry.register(
            "leaf_mints",
            "Leaf certificates minted",
            m.leaf_mints.clone(),
        );
        registry.register(
            "leaf_cache_hits",
            "Leaf certificate cache hits",
            m.leaf_hits.clone(),
        );
        registry.register("active_sandboxes", "Live sandboxes", m.sandboxes.clone());
        registry.register(
            "active_connections",
            "Open proxy client connections",
            m.connections.clone(),
        );
        registry.register(
            "store_operations",
            "Admin store operations",
            m.store_ops.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Counts a request decision.
    pub fn request(&self, decision: &str, code: &str) {
        self.requests
            .get_or_create(&DecisionLabels {
                decision: decision.into(),
                code: code.into(),
            })
            .inc();
    }

    /// Counts a tunnel decision.
    pub fn tunnel(&self, decision: &str, code: &str) {
        self.tunnels
            .get_or_create(&DecisionLabels {
                decision: decision.into(),
                code: code.into(),
            })
            .inc();
    }

    /// Counts a store operation.
    pub fn store_op(&self, op: &str) {
        self.store_ops
            .get_or_create(&OpLabels { op: op.into() })
            .inc();
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
