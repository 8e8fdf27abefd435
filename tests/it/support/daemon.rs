//! Starts sealgate in process on port 0 with a temp data dir, captures its logs, and checks
//! that no registered secret value ever appears in them.
#![allow(dead_code)]

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sealgate::config::{Config, LogFormat};
use sealgate::daemon::{self, Overrides, Running};
use serde_json::{json, Value};

use super::pki::TestPki;

/// Every log line of every daemon started by this test binary.
static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();

#[derive(Clone)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Everything every daemon of this test binary has logged so far, lossily decoded.
pub fn logs_text() -> String {
    String::from_utf8_lossy(&logs().lock().unwrap()).into_owned()
}

fn logs() -> Arc<Mutex<Vec<u8>>> {
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let cap = Capture(buf.clone());
        sealgate::logging::init("debug", LogFormat::Text, move || cap.clone());
        buf
    })
    .clone()
}

/// A running daemon plus everything a test needs to talk to it.
pub struct Harness {
    pub daemon: Option<Running>,
    pub dir: tempfile::TempDir,
    pub admin_url: String,
    pub token: String,
    pub proxy: SocketAddr,
    pub pki: Arc<TestPki>,
    pub config_text: String,
    secrets: Mutex<Vec<String>>,
    http: Client<HttpConnector, Full<Bytes>>,
}

/// Options for [`Harness::start_with`].
#[derive(Default, Clone)]
pub struct Opts {
    /// host → address overrides.
    pub resolve: Vec<(String, SocketAddr)>,
    /// Extra lines for the `[admin]` table.
    pub admin_toml: String,
    /// Extra lines for the `[proxy]` table.
    pub proxy_toml: String,
    /// Extra lines for the `[upstream]` table.
    pub upstream_toml: String,
    /// Extra lines for the `[sandbox]` table.
    pub sandbox_toml: String,
    /// Reuse this data dir (restart tests).
    pub data_dir: Option<PathBuf>,
    /// Reuse this cert dir (restart tests).
    pub cert_dir: Option<PathBuf>,
    /// Master key override.
    pub master_key: Option<String>,
    /// Leave `allow_private_cidrs` empty (the default opens 127.0.0.0/8 for the loopback echo
    /// upstreams): for address-vetting tests, which then reach upstreams only through `resolve`.
    pub strict_vetting: bool,
    /// Extra tables appended at the end of the file (e.g. `[store]` and `[node]`).
    pub extra_toml: String,
    /// With `strict_vetting`: these CIDRs only (e.g. `"127.0.0.2/32"`).
    pub private_cidrs: Vec<String>,
    /// Write `proxy.toml` here instead of the harness's temporary directory.
    pub config_dir: Option<PathBuf>,
}

impl Harness {
    /// Starts a daemon with test defaults.
    pub async fn start() -> Harness {
        Self::start_with(Opts::default()).await
    }

    /// Starts a daemon; panics with the daemon's error if it refuses to start.
    pub async fn start_with(opts: Opts) -> Harness {
        Self::try_start(opts, None).await.expect("daemon starts")
    }

    /// Starts a daemon, returning its startup error instead of panicking.
    pub async fn try_start(opts: Opts, pki: Option<Arc<TestPki>>) -> Result<Harness, String> {
        let _ = logs();
        let dir = tempfile::tempdir().unwrap();
        let pki = pki.unwrap_or_else(|| Arc::new(TestPki::new()));
        let data_dir = opts
            .data_dir
            .clone()
            .unwrap_or_else(|| dir.path().join("data"));
        let cert_dir = opts
            .cert_dir
            .clone()
            .unwrap_or_else(|| dir.path().join("certs"));
        let text = config_text(
            &opts,
            &data_dir,
            &cert_dir,
            &pki,
            &dir.path().join("audit.log"),
        );
        let path = opts
            .config_dir
            .as_deref()
            .unwrap_or(dir.path())
            .join("proxy.toml");
        std::fs::write(&path, &text).unwrap();
        let cfg = Config::load(Some(&path)).map_err(|e| e.to_string())?;
        let ov = Overrides {
            master_key: opts.master_key.clone(),
            admin_token: None,
            config_path: Some(path),
            ..Overrides::default()
        };
        let running = daemon::start(cfg, ov).await.map_err(|e| e.to_string())?;
        Ok(Harness {
            admin_url: format!("http://{}", running.admin_addr),
            token: running.admin_token(),
            proxy: running.proxy_addr,
            daemon: Some(running),
            dir,
            pki,
            config_text: text,
            secrets: Mutex::new(Vec::new()),
            // A connection per call, as the CLI and the SDK make: the admin listener closes a
            // kept-alive connection idle for `header_read_timeout_secs`, and a request written
            // on a pooled one in the ~10 ms as it closed was reset (reproduced 21 in 180 by
            // review h39a at a 1 s timeout; one fleet test's admin calls are ~9.6 s apart).
            http: Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(0)
                .build(HttpConnector::new()),
        })
    }

    /// Path of the audit log.
    pub fn audit_path(&self) -> PathBuf {
        self.dir.path().join("audit.log")
    }

    /// The audit log's whole lines (after writing out what the daemon has queued).
    /// The first audit line containing `needle`, waiting up to 5 s for it (a request's line
    /// is written as its exchange ends, on a proxy worker).
    pub async fn audit_line_eventually(&self, needle: &str) -> String {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let audit = self.audit_log();
            if let Some(l) = audit.lines().find(|l| l.contains(needle)) {
                return l.to_owned();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no line with {needle}: {audit}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    pub fn audit_log(&self) -> String {
        if let Some(d) = &self.daemon {
            d.proxy.audit.flush();
        }
        let mut text = std::fs::read_to_string(self.audit_path()).unwrap_or_default();
        // A request finishing on a proxy worker meanwhile may be mid-append: its line is read
        // once it is whole.
        text.truncate(text.rfind('\n').map_or(0, |i| i + 1));
        text
    }

    /// Remembers a fake secret value so the log check looks for it.
    pub fn register_secret(&self, v: &str) {
        self.secrets.lock().unwrap().push(v.to_owned());
    }

    /// Fails if any registered value appears in the captured logs or the audit log.
    pub fn assert_logs_clean(&self) {
        let logs = logs();
        let logs = logs.lock().unwrap();
        let audit = self.audit_log();
        for s in self.secrets.lock().unwrap().iter() {
            assert!(
                memchr::memmem::find(&logs, s.as_bytes()).is_none(),
                "secret value found in daemon logs"
            );
            assert!(
                !audit.contains(s.as_str()),
                "secret value found in audit log"
            );
        }
    }

    /// Raw admin call: status and body bytes.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        body: Option<&str>,
        token: Option<&str>,
    ) -> (StatusCode, Bytes) {
        let (status, _, bytes) = self.exchange(method, path, body, token).await;
        (status, bytes)
    }

    /// Raw admin call: status, headers and body bytes.
    pub async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Option<&str>,
        token: Option<&str>,
    ) -> (StatusCode, http::HeaderMap, Bytes) {
        let mut b = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.admin_url));
        if let Some(t) = token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        if body.is_some() {
            b = b.header("content-type", "application/json");
        }
        let req = b
            .body(Full::new(Bytes::from(body.unwrap_or("").to_owned())))
            .unwrap();
        let resp = self.http.request(req).await.expect("admin API reachable");
        let (parts, body) = resp.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        (parts.status, parts.headers, bytes)
    }

    /// The first sample of the metric `name` on `/metrics` (a gauge or counter without labels).
    pub async fn metric(&self, name: &str) -> f64 {
        let (_, body) = self
            .raw(Method::GET, "/metrics", None, Some(&self.token.clone()))
            .await;
        let text = String::from_utf8_lossy(&body).into_owned();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in metrics"))
    }

    /// Authenticated admin call returning status and JSON.
    pub async fn api(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let text = body.map(|b| b.to_string());
        let (s, bytes) = self
            .raw(method, path, text.as_deref(), Some(&self.token.clone()))
            .await;
        let v = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or(Value::Null)
        };
        (s, v)
    }

    /// Creates a store; returns its id.
    pub async fn store(&self, name: &str, allow: Option<&[&str]>) -> String {
        let (s, v) = self
            .api(
                Method::POST,
                "/v1/stores",
                Some(json!({"name": name, "egress_allowlist": allow})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        v["id"].as_str().unwrap().to_owned()
    }

    /// Sets a secret (registering its value for the log check).
    pub async fn secret(
        &self,
        store: &str,
        name: &str,
        value: &str,
        allowed: Option<&[&str]>,
        locations: Option<&[&str]>,
    ) -> Value {
        self.register_secret(value);
        let mut body = json!({"value": value, "allowed_hosts": allowed});
        if let Some(l) = locations {
            body["locations"] = json!(l);
        }
        let (s, v) = self
            .api(
                Method::PUT,
                &format!("/v1/stores/{store}/secrets/{name}"),
                Some(body),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        v
    }

    /// Deletes secret `name` of `store`; returns the answer's status.
    pub async fn delete_secret(&self, store: &str, name: &str) -> StatusCode {
        let path = format!("/v1/stores/{store}/secrets/{name}");
        self.api(Method::DELETE, &path, None).await.0
    }

    /// Creates a sandbox for a store (name or id); returns the full answer.
    pub async fn sandbox(&self, store: &str) -> Value {
        let (s, v) = self
            .api(
                Method::POST,
                "/v1/sandboxes",
                Some(json!({"secret_store": store})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        v
    }

    /// The running daemon's live sandbox `id` (its counters: tunnels, upstream connections).
    pub fn live_sandbox(&self, id: &str) -> Arc<sealgate::sandbox::Sandbox> {
        let daemon = self.daemon.as_ref().expect("daemon running");
        daemon.proxy.registry.get(id).expect("live sandbox")
    }

    /// Stops the daemon (graceful) and keeps the data dir.
    pub async fn stop(&mut self) {
        if let Some(d) = self.daemon.take() {
            d.shutdown().await;
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            self.assert_logs_clean();
        }
        if let Some(d) = &self.daemon {
            d.begin_shutdown();
        }
    }
}

fn config_text(
    o: &Opts,
    data: &std::path::Path,
    certs: &std::path::Path,
    pki: &TestPki,
    audit: &std::path::Path,
) -> String {
    let mut resolve = String::new();
    for (h, a) in &o.resolve {
        resolve.push_str(&format!("\"{h}\" = \"{a}\"\n"));
    }
    format!(
        "data_dir = \"{}\"\ncert_dir = \"{}\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n{}\n\n[proxy]\nlisten = \"127.0.0.1:0\"\n{}\n\
         [upstream]\nca_files = [\"{}\"]\nallow_private_cidrs = [{}]\n{}\n\n[upstream.resolve]\n{resolve}\n\
         [sandbox]\n{}\n[log]\nlevel = \"debug\"\n\n[audit]\npath = \"{}\"\n{}",
        data.display(),
        certs.display(),
        o.admin_toml,
        o.proxy_toml,
        pki.ca_file.display(),
        if o.strict_vetting {
            o.private_cidrs
                .iter()
                .map(|c| format!("\"{c}\""))
                .collect::<Vec<_>>()
                .join(", ")
        } else {
            "\"127.0.0.0/8\"".to_owned()
        },
        o.upstream_toml,
        o.sandbox_toml,
        audit.display(),
        o.extra_toml,
    )
}
