//! Fleet mode, measured end to end with two in-process daemons (nodes) on one throwaway
//! PostgreSQL cluster:
//!
//! - propagation latency: from the `PUT …/secrets/KEY` sent to node A's admin API until every
//!   running sandbox of the store on node B serves the new value (p50/p99 over the rotations);
//! - admin write throughput: sequential `PUT …/secrets/KEY` through the admin API, PostgreSQL
//!   node vs SQLite node, as the baseline in the same run.
//!
//! `cargo bench --bench fleet` runs the full sizes (100 rotations, 2 nodes × 500 sandboxes,
//! 1000 writes); without `--bench` (as under `cargo test --all-targets`) a smoke size runs.

#[path = "../tests/it/support/pg.rs"]
mod pg;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sealgate::config::Config;
use sealgate::daemon::{self, Overrides, Running};
use sealgate::sandbox::CreateSandbox;
use sealgate::store::MasterKey;
use serde_json::{json, Value};

struct Sizes {
    rotations: usize,
    per_node: usize,
    writes: usize,
}

struct Node {
    running: Running,
    admin: SocketAddr,
    token: String,
    http: Client<HttpConnector, Full<Bytes>>,
    _dir: tempfile::TempDir,
}

impl Node {
    async fn start(store_toml: &str) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "data_dir = \"{}\"\ncert_dir = \"{}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
             [proxy]\nlisten = \"127.0.0.1:0\"\n[log]\nlevel = \"warn\"\n[audit]\npath = \"{}\"\n{store_toml}",
            dir.path().join("data").display(),
            dir.path().join("certs").display(),
            dir.path().join("audit.log").display(),
        );
        let cfg = Config::parse(&text, "bench").unwrap();
        let ov = Overrides {
            master_key: Some(fleet_key()),
            ..Overrides::default()
        };
        let running = daemon::start(cfg, ov).await.expect("daemon starts");
        Node {
            admin: running.admin_addr,
            token: running.admin_token(),
            running,
            http: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
            _dir: dir,
        }
    }

    async fn api(&self, method: Method, path: &str, body: Value) -> (StatusCode, Value) {
        let req = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.admin))
            .header("authorization", format!("Bearer {}", self.token))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        let resp = self.http.request(req).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    async fn put(&self, store: &str, value: &str) {
        let (s, v) = self
            .api(
                Method::PUT,
                &format!("/v1/stores/{store}/secrets/KEY"),
                json!({"value": value, "allowed_hosts": ["api.example.test"]}),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
    }

    fn sandboxes(&self, n: usize) {
        let req = || -> CreateSandbox {
            serde_json::from_value(json!({"secret_store": "bench"})).unwrap()
        };
        for _ in 0..n {
            self.running.sandboxes.create(req()).unwrap();
        }
    }

    /// True once every live sandbox of the node serves `value` for KEY.
    fn all_serve(&self, value: &[u8]) -> bool {
        self.running.sandboxes.registry().all().iter().all(|sb| {
            sb.snapshot()
                .secrets()
                .iter()
                .any(|e| &*e.name == "KEY" && e.value.expose() == value)
        })
    }
}

/// One master key for every node of the run (a fleet shares its key).
fn fleet_key() -> String {
    static KEY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    KEY.get_or_init(|| MasterKey::generate().to_base64().to_string())
        .clone()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

async fn propagation(cluster: &pg::Cluster, sizes: &Sizes) {
    let db = cluster.create_database();
    let store_toml = |node: &str| {
        format!(
            "[store]\nbackend = \"postgres\"\nurl = \"{}\"\n[node]\nid = \"{node}\"\n",
            cluster.url(&db)
        )
    };
    let a = Node::start(&store_toml("node-a")).await;
    let b = Node::start(&store_toml("node-b")).await;
    let (s, v) = a
        .api(
            Method::POST,
            "/v1/stores",
            json!({"name": "bench", "egress_allowlist": ["api.example.test"]}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let store = v["id"].as_str().unwrap().to_owned();
    a.put(&store, "v-0").await;
    let started = Instant::now();
    // Blocking calls on the thread that drives `block_on`, not on a runtime worker.
    a.sandboxes(sizes.per_node);
    b.sandboxes(sizes.per_node);
    println!(
        "created 2 × {} sandboxes in {:.1?}",
        sizes.per_node,
        started.elapsed()
    );
    let mut reach_b = Vec::with_capacity(sizes.rotations);
    let mut put_a = Vec::with_capacity(sizes.rotations);
    for i in 1..=sizes.rotations {
        let value = format!("v-{i}");
        let t0 = Instant::now();
        a.put(&store, &value).await;
        put_a.push(t0.elapsed());
        while !b.all_serve(value.as_bytes()) {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "rotation {i} never reached B"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        reach_b.push(t0.elapsed());
    }
    reach_b.sort();
    put_a.sort();
    println!(
        "propagation to node B ({} sandboxes), {} rotations: p50 {:.1?}  p99 {:.1?}  max {:.1?}",
        sizes.per_node,
        sizes.rotations,
        percentile(&reach_b, 0.5),
        percentile(&reach_b, 0.99),
        reach_b[reach_b.len() - 1]
    );
    println!(
        "PUT latency on node A (commit + refresh of its own {} sandboxes): p50 {:.1?}  p99 {:.1?}",
        sizes.per_node,
        percentile(&put_a, 0.5),
        percentile(&put_a, 0.99)
    );
    a.running.shutdown().await;
    b.running.shutdown().await;
}

async fn throughput(name: &str, node: Node, writes: usize) {
    let (s, v) = node
        .api(
            Method::POST,
            "/v1/stores",
            json!({"name": "bench", "egress_allowlist": null}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let store = v["id"].as_str().unwrap().to_owned();
    let started = Instant::now();
    for i in 0..writes {
        node.put(&store, &format!("w-{i}")).await;
    }
    let took = started.elapsed();
    println!(
        "admin writes ({name}): {writes} sequential PUT secret in {took:.2?} = {:.0}/s",
        writes as f64 / took.as_secs_f64()
    );
    node.running.shutdown().await;
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let sizes = if full {
        Sizes {
            rotations: 100,
            per_node: 500,
            writes: 1000,
        }
    } else {
        Sizes {
            rotations: 3,
            per_node: 5,
            writes: 20,
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let cluster = pg::Cluster::owned();
    rt.block_on(async {
        propagation(&cluster, &sizes).await;
        let db = cluster.create_database();
        let pg_node = Node::start(&format!(
            "[store]\nbackend = \"postgres\"\nurl = \"{}\"\n[node]\nid = \"w\"\n",
            cluster.url(&db)
        ))
        .await;
        throughput("postgres", pg_node, sizes.writes).await;
        throughput("sqlite", Node::start("").await, sizes.writes).await;
    });
}
