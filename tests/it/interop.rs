//! Interoperability (issue 11): servers and clients this project did not write, through
//! sealgate. Origins: nginx (HTTP/1.1-only and h1+h2), Caddy, Node (`https`, `http2`) and
//! Hypercorn on loopback with a test CA; clients: curl (h1 and h2), Python `requests`,
//! `httpx`, the `anthropic` and `openai` SDKs, `websockets`, Node `fetch` and git, in explicit
//! mode (the sandbox's `proxy_env`) and transparent mode (`sealgate sandbox exec`). Each cell
//! checks what the origin recorded and what the client saw, and lands in `docs/interop.md`.
//!
//! Third-party programs missing: with `CI` set the tests fail; otherwise they say so and skip.

mod apache;
mod big;
mod early;
mod explicit;
mod grpc;
mod load;
mod matrix;
mod origins;
mod regress;
mod transparent;
mod windows;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::support::daemon::{Harness, Opts};
use crate::support::pki::TestPki;
use crate::support::proxy_client::SandboxCreds;
use origins::{Caddy, Grpc, Hypercorn, Nginx, Node};

pub const KEY: &str = "sk-interop-real-0001";
pub const ANTHROPIC_KEY: &str = "sk-ant-interop-real-0002";
pub const OPENAI_KEY: &str = "sk-openai-interop-real-0003";
pub const GIT_PASSWORD: &str = "git-interop-real-0004";
pub const BODY_KEY: &str = "sk-body-interop-real-0005";
/// Unsealed in the query (to nginx only); `/`, `+` and `=` change under percent-encoding.
pub const QUERY_KEY: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYINTEROPKEY+x=";

/// Hosts where `KEY` may be unsealed (their answers are scrubbed).
const KEY_HOSTS: &[&str] = &[
    "nginx-h1.test",
    "nginx-h2.test",
    "caddy.test",
    "node-h1.test",
    "node-h2.test",
    "hypercorn.test",
    "grpc.test",
];

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

pub fn python() -> String {
    std::env::var("SEALGATE_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// `s` single-quoted for `sh`.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The shell words that start the test Python in `mode`. Explicit mode: `"$PY"`. Transparent
/// mode (`sandbox exec`: `[sandbox] run_as`, only the sandbox's environment): the interpreter's
/// absolute path when other users can run it, else — a venv over an interpreter they cannot
/// reach, such as pyenv's under `/root` — a reachable `python3.X` of the same version with the
/// venv's site-packages on `PYTHONPATH`.
pub fn python_cmd(mode: Mode) -> String {
    if mode == Mode::Explicit {
        return "\"$PY\"".into();
    }
    let py = python();
    let resolved = std::fs::canonicalize(&py).unwrap_or_else(|_| py.clone().into());
    if others_reach(std::path::Path::new(&py)) && others_reach(&resolved) {
        return sh_quote(&py);
    }
    let probe = "import sys, sysconfig\n\
        p = sysconfig.get_paths()\n\
        print('%d.%d' % sys.version_info[:2])\n\
        print(':'.join(dict.fromkeys([p['purelib'], p['platlib']])))";
    let out = std::process::Command::new(&py)
        .args(["-c", probe])
        .output()
        .expect("the test Python runs");
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines = out.lines();
    let (version, site) = (lines.next().unwrap_or(""), lines.next().unwrap_or(""));
    let base = ["/usr/bin", "/usr/local/bin"]
        .iter()
        .map(|d| std::path::PathBuf::from(format!("{d}/python{version}")))
        .find(|p| std::fs::canonicalize(p).is_ok_and(|r| others_reach(&r)))
        .unwrap_or_else(|| {
            panic!("no python{version} that `[sandbox] run_as` can run for the venv {py}")
        });
    format!(
        "PYTHONPATH={} {}",
        sh_quote(site),
        sh_quote(&base.display().to_string())
    )
}

/// True when other users can reach `path`: every directory above it searchable, and `path`
/// itself readable and executable (symbolic links are followed by the caller).
fn others_reach(path: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = |p: &std::path::Path| std::fs::metadata(p).map_or(0, |m| m.permissions().mode());
    path.ancestors()
        .skip(1)
        .all(|d| d.as_os_str().is_empty() || mode(d) & 0o001 != 0)
        && mode(path) & 0o005 == 0o005
}

/// True when every program runs (`prog --version`-like probe); in CI a missing one fails.
pub fn have(progs: &[(&str, &[&str])]) -> bool {
    for (prog, args) in progs {
        let ok = std::process::Command::new(prog)
            .args(*args)
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            assert!(
                !in_ci(),
                "{prog} is required in CI (scripts/test installs it)"
            );
            eprintln!("SKIPPED: {prog} unavailable (run scripts/test)");
            return false;
        }
    }
    true
}

/// The servers a test needs.
#[derive(Default, Clone, Copy)]
pub struct Want {
    pub caddy: bool,
    pub node: bool,
    pub hypercorn: bool,
    pub grpc: bool,
    pub transparent: bool,
    /// nginx's `keepalive_requests` (0: nginx's default, 1000).
    pub keepalive_requests: u32,
    /// sealgate's `[proxy] worker_threads` (0: one per core).
    pub proxy_workers: u32,
    /// Lines for sealgate's `[upstream]` table.
    pub upstream_toml: &'static str,
}

/// The daemon, the origins, and one explicit-mode sandbox of store `s`.
pub struct World {
    pub h: Harness,
    pub sb: SandboxCreds,
    pub nginx: Nginx,
    pub caddy: Option<Caddy>,
    pub node: Option<Node>,
    pub hypercorn: Option<Hypercorn>,
    pub grpc: Option<Grpc>,
    pub transparent_port: u16,
    pub dir: tempfile::TempDir,
}

/// Every name the origins answer to, with the address sealgate must dial for it.
fn names(
    nginx: &Nginx,
    caddy: Option<&Caddy>,
    node: Option<&Node>,
    hypercorn: Option<&Hypercorn>,
    grpc: Option<&Grpc>,
) -> Vec<(String, std::net::SocketAddr)> {
    let mut out = Vec::new();
    for n in origins::NGINX_NAMES {
        let addr = match *n {
            "both-nginx.test" => nginx.both,
            n if n.ends_with("h1.test") || n == "git.test" => nginx.h1,
            _ => nginx.h2,
        };
        out.push((n.to_string(), addr));
    }
    if let Some(c) = caddy {
        out.extend(origins::CADDY_NAMES.iter().map(|n| (n.to_string(), c.addr)));
    }
    if let Some(node) = node {
        for n in origins::NODE_NAMES {
            out.push((
                n.to_string(),
                if *n == "node-h1.test" {
                    node.h1
                } else {
                    node.h2
                },
            ));
        }
    }
    if let Some(hc) = hypercorn {
        out.extend(
            origins::HYPERCORN_NAMES
                .iter()
                .map(|n| (n.to_string(), hc.addr)),
        );
    }
    if let Some(g) = grpc {
        out.extend(origins::GRPC_NAMES.iter().map(|n| (n.to_string(), g.addr)));
    }
    out
}

/// Store `s` allowing `all`, its six secrets, and a sandbox of it.
async fn setup_store(h: &Harness, all: &[&str]) -> SandboxCreds {
    let store = h.store("s", Some(all)).await;
    let hdr: &[&str] = &["header"];
    h.secret(&store, "KEY", KEY, Some(KEY_HOSTS), Some(hdr))
        .await;
    let anthropic: &[&str] = &["api.anthropic.com"];
    h.secret(
        &store,
        "ANTHROPIC_API_KEY",
        ANTHROPIC_KEY,
        Some(anthropic),
        Some(hdr),
    )
    .await;
    let openai: &[&str] = &["api.openai.com"];
    h.secret(
        &store,
        "OPENAI_API_KEY",
        OPENAI_KEY,
        Some(openai),
        Some(hdr),
    )
    .await;
    let git: &[&str] = &["git.test", "git-h2.test"];
    h.secret(&store, "GIT_PASSWORD", GIT_PASSWORD, Some(git), Some(hdr))
        .await;
    let body: &[&str] = &["body"];
    h.secret(
        &store,
        "BODY_KEY",
        BODY_KEY,
        Some(&["nginx-h2.test", "grpc.test", "both-nginx.test"]),
        Some(body),
    )
    .await;
    let query: &[&str] = &["query"];
    h.secret(
        &store,
        "QUERY_KEY",
        QUERY_KEY,
        Some(&["nginx-h2.test", "hypercorn.test"]),
        Some(query),
    )
    .await;
    SandboxCreds::from_answer(&h.sandbox("s").await)
}

impl World {
    /// Starts the wanted origins, then the daemon (resolving every origin name to its
    /// loopback port), a store `s` allowing all of them and its secrets, and a sandbox.
    pub async fn start(want: Want) -> World {
        let pki = Arc::new(TestPki::new());
        let dir = tempfile::tempdir().unwrap();
        let keepalive = if want.keepalive_requests == 0 {
            1000
        } else {
            want.keepalive_requests
        };
        let nginx = Nginx::start(&pki, dir.path(), GIT_PASSWORD, keepalive);
        let caddy = want.caddy.then(|| Caddy::start(&pki, dir.path()));
        let node = want.node.then(|| Node::start(&pki, dir.path()));
        let hypercorn = want
            .hypercorn
            .then(|| Hypercorn::start(&pki, dir.path(), &python()));
        let grpc = want.grpc.then(|| Grpc::start(&pki, dir.path(), &python()));
        let resolve = names(
            &nginx,
            caddy.as_ref(),
            node.as_ref(),
            hypercorn.as_ref(),
            grpc.as_ref(),
        );
        let mut opts = Opts {
            resolve: resolve.clone(),
            ..Opts::default()
        };
        if want.transparent {
            opts.proxy_toml = "transparent_listen = \"0.0.0.0:0\"\n".into();
        }
        opts.upstream_toml = want.upstream_toml.to_owned();
        if want.proxy_workers > 0 {
            opts.proxy_toml += &format!("worker_threads = {}\n", want.proxy_workers);
        }
        let h = Harness::try_start(opts, Some(pki))
            .await
            .expect("daemon starts");
        let transparent_port = h
            .daemon
            .as_ref()
            .and_then(|d| d.transparent_addr)
            .map_or(0, |a| a.port());
        let mut all: Vec<&str> = resolve.iter().map(|(n, _)| n.as_str()).collect();
        all.push("nginx-h2.test:8443"); // a non-default port: its authority keeps the port
        let sb = setup_store(&h, &all).await;
        World {
            h,
            sb,
            nginx,
            caddy,
            node,
            hypercorn,
            grpc,
            transparent_port,
            dir,
        }
    }

    /// The sandbox's environment: sealed secrets plus its proxy and CA variables.
    pub fn sandbox_env(&self) -> HashMap<String, String> {
        let mut env = HashMap::new();
        for v in [&self.sb.env, &self.sb.proxy_env] {
            for (k, v) in v.as_object().unwrap() {
                env.insert(k.clone(), v.as_str().unwrap().to_owned());
            }
        }
        env
    }

    /// Runs `sh -c script` as an explicit-mode sandbox process: a clean environment with
    /// only PATH, HOME and the sandbox's variables.
    pub async fn sh(&self, script: &str) -> Ran {
        let home = self.dir.path().join("home");
        let _ = std::fs::create_dir_all(&home);
        let mut c = tokio::process::Command::new("sh");
        c.args(["-c", script])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", &home)
            .env("PY", python())
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .envs(self.sandbox_env())
            .current_dir(self.dir.path())
            .kill_on_drop(true);
        run(c).await
    }

    /// Runs `sh -c script` through `sealgate sandbox exec` (its own isolated sandbox of store
    /// `s`, no proxy variables). The script runs as `[sandbox] run_as` in bwrap with a private
    /// `/home/user` (its cwd) and `/tmp` and only the sandbox's environment (sealed tokens, CA
    /// variables, `PATH`, `HOME`): nothing of this process's environment or of `self.dir`
    /// reaches it, so scripts carry their programs inline and print what they got to stdout.
    pub async fn exec(&self, script: &str) -> Ran {
        let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_sealgate"));
        c.args(["sandbox", "exec", "--store", "s", "--", "sh", "-c", script])
            .env("SEALGATE_ADMIN_URL", &self.h.admin_url)
            .env("SEALGATE_ADMIN_TOKEN", &self.h.token)
            .env(
                "SEALGATE_TRANSPARENT_PORT",
                self.transparent_port.to_string(),
            )
            .env_remove("SEALGATE_CONFIG")
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .current_dir(self.dir.path())
            .kill_on_drop(true);
        run(c).await
    }

    /// A file in the world's temp dir.
    pub fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }
}

/// A finished client process.
pub struct Ran {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    /// `Ok` when it exited 0, else its output as the error.
    pub fn ok(&self) -> Result<(), String> {
        if self.ok {
            Ok(())
        } else {
            Err(format!(
                "exit failure: {} {}",
                self.stdout.trim(),
                self.stderr.trim()
            ))
        }
    }

    /// The value of the last `name=value` line of stdout.
    pub fn var(&self, name: &str) -> String {
        let prefix = format!("{name}=");
        self.stdout
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or("")
            .to_owned()
    }
}

async fn run(mut c: tokio::process::Command) -> Ran {
    c.stdin(std::process::Stdio::null());
    let out = tokio::time::timeout(Duration::from_secs(120), c.output())
        .await
        .expect("client finishes within 2 minutes")
        .expect("client runs");
    Ran {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `Err(msg)` unless `cond`.
pub fn ensure(cond: bool, msg: impl FnOnce() -> String) -> Result<(), String> {
    if cond {
        Ok(())
    } else {
        Err(msg())
    }
}

/// Runs `f` until it returns `Ok` or ten seconds pass (origins write their logs after
/// answering; a loaded machine may run them late).
pub async fn eventually<F: FnMut() -> Result<(), String>>(mut f: F) -> Result<(), String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match f() {
            Ok(()) => return Ok(()),
            Err(e) if std::time::Instant::now() > deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(25)).await,
        }
    }
}

/// The origins, as named in cells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Server {
    Nginx,
    Caddy,
    Node,
    Hypercorn,
}

/// What an origin recorded for one request, the same fields whatever the server.
#[derive(Debug, Default)]
pub struct Seen {
    /// `1.1` or `2`.
    pub version: String,
    /// `Host` / `:authority` as the origin saw it.
    pub authority: String,
    pub key: String,
    pub auth: String,
    pub te: String,
    pub expect: String,
    /// `host` fields beside `:authority` (Node h2 only; others fold them).
    pub extra_host: bool,
}

fn version_of(s: &str) -> String {
    let s = s.trim_start_matches("HTTP/");
    match s {
        "2.0" | "2" => "2".into(),
        other => other.into(),
    }
}

fn header_of(headers: &serde_json::Value, name: &str) -> String {
    let Some(obj) = headers.as_object() else {
        return String::new();
    };
    obj.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| match v {
            serde_json::Value::Array(a) => a.first().and_then(|x| x.as_str()).unwrap_or("").into(),
            other => other.as_str().unwrap_or("").into(),
        })
        .unwrap_or_default()
}

impl World {
    /// What `server` recorded for the request carrying `x-cell: cell` (the last one).
    pub fn seen(&self, server: Server, cell: &str) -> Option<Seen> {
        match server {
            Server::Nginx => {
                let hits = self.nginx.hits();
                let h = hits.iter().rev().find(|h| h.get("cell") == cell)?;
                Some(Seen {
                    version: version_of(h.get("proto")),
                    authority: h.get("http_host").into(),
                    key: h.get("key").into(),
                    auth: h.get("auth").into(),
                    te: h.get("te").into(),
                    expect: h.get("expect").into(),
                    extra_host: false,
                })
            }
            Server::Caddy => {
                let hits = self.caddy.as_ref()?.hits();
                let h = hits
                    .iter()
                    .rev()
                    .find(|h| header_of(&h["request"]["headers"], "x-cell") == cell)?;
                let hd = &h["request"]["headers"];
                Some(Seen {
                    version: version_of(h["request"]["proto"].as_str().unwrap_or("")),
                    authority: h["request"]["host"].as_str().unwrap_or("").into(),
                    key: header_of(hd, "x-api-key"),
                    auth: header_of(hd, "authorization"),
                    te: header_of(hd, "te"),
                    expect: header_of(hd, "expect"),
                    extra_host: false,
                })
            }
            Server::Node | Server::Hypercorn => {
                let hits = match server {
                    Server::Node => self.node.as_ref()?.hits(),
                    _ => self.hypercorn.as_ref()?.hits(),
                };
                let h = hits
                    .iter()
                    .rev()
                    .find(|h| header_of(&h["headers"], "x-cell") == cell)?;
                let hd = &h["headers"];
                let authority = [":authority", "host"]
                    .iter()
                    .map(|n| header_of(hd, n))
                    .find(|v| !v.is_empty())
                    .unwrap_or_default();
                Some(Seen {
                    version: version_of(h["version"].as_str().unwrap_or("")),
                    extra_host: !header_of(hd, ":authority").is_empty()
                        && !header_of(hd, "host").is_empty(),
                    authority,
                    key: header_of(hd, "x-api-key"),
                    auth: header_of(hd, "authorization"),
                    te: header_of(hd, "te"),
                    expect: header_of(hd, "expect"),
                })
            }
        }
    }

    /// Waits (up to 10 s, for a loaded machine) for `server`'s record of `cell`.
    pub async fn seen_eventually(&self, server: Server, cell: &str) -> Result<Seen, String> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = self.seen(server, cell) {
                return Ok(s);
            }
            if std::time::Instant::now() > deadline {
                return Err(format!("{server:?} recorded no request for cell {cell}"));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

/// How a client reaches sealgate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `HTTPS_PROXY` and the CA variables of the sandbox's `proxy_env`.
    Explicit,
    /// `sealgate sandbox exec`: a namespace, no proxy variables.
    Transparent,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Explicit => "explicit",
            Mode::Transparent => "transparent",
        }
    }
}

/// What curl saw.
#[derive(Debug)]
pub struct Curl {
    pub status: String,
    pub version: String,
    /// Body bytes curl received (`%{size_download}`).
    pub size: u64,
    /// The whole transfer (`%{time_total}`).
    pub seconds: f64,
    /// Response headers (and trailers), lowercased.
    pub headers: String,
    pub body: Vec<u8>,
}

impl Curl {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl World {
    /// Runs a shell script as the sandbox in `mode`.
    pub async fn run(&self, mode: Mode, script: &str) -> Ran {
        match mode {
            Mode::Explicit => self.sh(script).await,
            Mode::Transparent => self.exec(script).await,
        }
    }

    /// `curl -sS ARGS URL` as the sandbox; `args` may use the sandbox's variables (`$KEY`).
    pub async fn curl(&self, mode: Mode, args: &str, url: &str) -> Result<Curl, String> {
        let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (body, head) = (
            self.path(&format!("curl-{n}.body")),
            self.path(&format!("curl-{n}.head")),
        );
        let script = format!(
            "curl -sS {args} -o {} -D {} -w 'status=%{{http_code}}\\nversion=%{{http_version}}\\nsize=%{{size_download}}\\ntime=%{{time_total}}\\n' '{url}'",
            body.display(),
            head.display()
        );
        let r = self.run(mode, &script).await;
        r.ok()?;
        Ok(Curl {
            status: r.var("status"),
            version: r.var("version"),
            size: r.var("size").parse().unwrap_or(u64::MAX),
            seconds: r.var("time").parse().unwrap_or(f64::MAX),
            headers: std::fs::read_to_string(&head)
                .unwrap_or_default()
                .to_ascii_lowercase(),
            body: std::fs::read(&body).unwrap_or_default(),
        })
    }
}
