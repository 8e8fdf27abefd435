//! Third-party origin servers on loopback, each in its own temp dir with its own port, pid
//! and log files, killed on drop: nginx (an HTTP/1.1-only server and an h1+h2 server in one
//! process, git http-backend through fcgiwrap behind the h1-only one), Caddy (Go net/http),
//! Node (`https` and `http2`) and Hypercorn. Each records what it received; the suite reads
//! those records to check what reached the origin.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::pki::TestPki;

/// A server process in its own process group; on drop the whole group gets SIGTERM (nginx's
/// master then stops its workers, fcgiwrap's children go too), then SIGKILL if it lingers.
pub struct Proc {
    child: Child,
}

impl Proc {
    fn spawn(what: &str, cmd: &mut Command) -> Proc {
        use std::os::unix::process::CommandExt as _;
        let child = cmd
            .stdin(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e} (scripts/test installs it)"));
        Proc { child }
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn signal_group(&self, sig: &str) {
        let _ = Command::new("kill")
            .args([sig, "--", &format!("-{}", self.child.id())])
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.signal_group("-TERM");
        let deadline = Instant::now() + Duration::from_secs(3);
        while self.alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.signal_group("-KILL");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub use crate::support::ports::free_port;

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Waits until every port accepts TCP connections; panics with `log` if `proc` dies first.
fn wait_ports(what: &str, proc: &mut Proc, ports: &[u16], log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    for &p in ports {
        while std::net::TcpStream::connect(loopback(p)).is_err() {
            let dead = !proc.alive();
            if dead || Instant::now() > deadline {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                panic!("{what} did not start on port {p} (exited: {dead}):\n{text}");
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

/// Every JSON line of `path` (an origin's record of what it received).
pub fn json_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
}

// ---- nginx ----------------------------------------------------------------------------------

/// Names served by the nginx instance (one leaf certificate covers them all).
pub const NGINX_NAMES: &[&str] = &[
    "nginx-h1.test",
    "nginx-h2.test",
    "clean-nginx.test",
    "clean-nginx-h1.test",
    "git.test",
    "git-h2.test",
    "api.anthropic.com",
    "both-nginx.test",
];

/// nginx (apt) with three servers: `h1` speaks only HTTP/1.1 (and serves git), `h2` h1+h2,
/// and one plain HTTP/1.1 server without TLS; `both` is one port in front of `h2` and that,
/// as a host serving `https://` and `http://` under one name (`both-nginx.test`) is.
pub struct Nginx {
    /// The HTTP/1.1-only server.
    pub h1: SocketAddr,
    /// The h1+h2 server.
    pub h2: SocketAddr,
    /// TLS connections to `h2`, the others to the plain server ([`split_by_tls`]).
    pub both: SocketAddr,
    /// Its temp dir (config, logs, document root, git repositories).
    pub dir: PathBuf,
    _nginx: Proc,
    _fcgi: Proc,
}

/// One request as nginx's access log recorded it.
pub struct NginxHit(pub Value);

impl NginxHit {
    /// A logged field (`-` and absent both read as "").
    pub fn get(&self, k: &str) -> &str {
        self.0[k].as_str().filter(|v| *v != "-").unwrap_or("")
    }
}

impl Nginx {
    /// Starts nginx with `keepalive_requests` per connection (nginx's default is 1000; a low
    /// value makes it send GOAWAY often).
    pub fn start(pki: &TestPki, dir: &Path, git_password: &str, keepalive_requests: u32) -> Nginx {
        let dir = dir.join("nginx");
        for d in ["www/static", "tmp", "git", "dav"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        let (crt, key) = pki.write_leaf(&dir, "leaf", NGINX_NAMES);
        write_site(&dir.join("www"));
        init_git(&dir.join("git"));
        std::fs::write(
            dir.join("htpasswd"),
            format!("sandbox:{{PLAIN}}{git_password}\n"),
        )
        .unwrap();
        let (h1, h2, plain) = (free_port(), free_port(), free_port());
        let conf = nginx_conf(&dir, &crt, &key, [h1, h2, plain], keepalive_requests);
        std::fs::write(dir.join("nginx.conf"), conf).unwrap();
        let sock = dir.join("fcgiwrap.sock");
        let fcgi = Proc::spawn(
            "fcgiwrap",
            Command::new("fcgiwrap")
                .args(["-c", "4", "-s"])
                .arg(format!("unix:{}", sock.display()))
                .stderr(Stdio::null()),
        );
        let mut nginx = Proc::spawn(
            "nginx",
            Command::new("nginx")
                .arg("-c")
                .arg(dir.join("nginx.conf"))
                .arg("-p")
                .arg(&dir)
                .arg("-e")
                .arg(dir.join("error.log")),
        );
        wait_ports(
            "nginx",
            &mut nginx,
            &[h1, h2, plain],
            &dir.join("error.log"),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sock.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        Nginx {
            h1: loopback(h1),
            h2: loopback(h2),
            both: split_by_tls(loopback(h2), loopback(plain)),
            dir,
            _nginx: nginx,
            _fcgi: fcgi,
        }
    }

    /// Every request nginx logged so far.
    pub fn hits(&self) -> Vec<NginxHit> {
        json_lines(&self.dir.join("access.log"))
            .into_iter()
            .map(NginxHit)
            .collect()
    }

    /// Logged requests whose URI starts with `prefix`.
    pub fn hits_for(&self, prefix: &str) -> Vec<NginxHit> {
        self.hits()
            .into_iter()
            .filter(|h| h.get("uri").starts_with(prefix))
            .collect()
    }

    /// nginx's error log.
    pub fn errors(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }

    /// A file the DAV location stored.
    pub fn dav_file(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.dir.join("dav").join(name)).unwrap_or_default()
    }

    /// The bare repository served as `https://git.test/repo.git`.
    pub fn repo(&self) -> PathBuf {
        self.dir.join("git/repo.git")
    }
}

/// Static files: a small text (Content-Length), a 64 KiB text (gzip) and a 256 MiB sparse
/// file (streamed download; sparse, so it costs no disk).
fn write_site(www: &Path) {
    std::fs::write(www.join("static/hello.txt"), "hello from nginx\n").unwrap();
    let text = "all work and no play makes a proxy a dull boy\n".repeat(1500);
    std::fs::write(www.join("static/text.txt"), text).unwrap();
    let big = std::fs::File::create(www.join("static/256m.bin")).unwrap();
    big.set_len(256 << 20).unwrap();
    // An object stored gzip-compressed, served as a storage service serves one uploaded with
    // `Content-Encoding: gzip` (`/obj/data.txt`).
    std::fs::create_dir_all(www.join("obj")).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, "stored compressed\n".repeat(200).as_bytes()).unwrap();
    std::fs::write(www.join("obj/data.txt.gz"), gz.finish().unwrap()).unwrap();
}

fn git(args: &[&str], cwd: &Path) {
    let out = Command::new("git")
        .args(args)
        .current_dir(cwd)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", cwd)
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A bare repository with one commit, pushable over smart HTTP.
fn init_git(root: &Path) {
    git(&["init", "-q", "--bare", "-b", "main", "repo.git"], root);
    git(
        &["config", "http.receivepack", "true"],
        &root.join("repo.git"),
    );
    let work = root.join("seed");
    std::fs::create_dir_all(&work).unwrap();
    git(&["init", "-q", "-b", "main"], &work);
    std::fs::write(work.join("README"), "seeded\n").unwrap();
    git(&["add", "README"], &work);
    git(
        &[
            "-c",
            "user.name=seed",
            "-c",
            "user.email=seed@example.test",
            "commit",
            "-q",
            "-m",
            "seed",
        ],
        &work,
    );
    let bare = root.join("repo.git");
    git(&["push", "-q", bare.to_str().unwrap(), "main"], &work);
}

fn git_exec_path() -> String {
    let out = Command::new("git")
        .arg("--exec-path")
        .output()
        .expect("git runs");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A loopback port that hands each connection to `tls` when its first byte opens a TLS
/// record (0x16), else to `plain`, bytes passed through untouched. A task of the test's
/// runtime: it ends with the test.
fn split_by_tls(tls: SocketAddr, plain: SocketAddr) -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut first = [0u8; 1];
                if client.peek(&mut first).await.unwrap_or(0) == 0 {
                    return;
                }
                let to = if first[0] == 0x16 { tls } else { plain };
                if let Ok(mut server) = tokio::net::TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    addr
}

fn nginx_conf(dir: &Path, crt: &Path, key: &Path, ports: [u16; 3], keepalive: u32) -> String {
    let [h1, h2, plain] = ports;
    let d = dir.display();
    let user = if running_as_root() {
        "user root root;"
    } else {
        ""
    };
    let locations = nginx_locations(dir);
    format!(
        r#"{user}
daemon off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 1024; }}
http {{
    log_format interop escape=json '{{"port":"$server_port","proto":"$server_protocol",'
        '"method":"$request_method","uri":"$request_uri","host":"$host","http_host":"$http_host",'
        '"key":"$http_x_api_key","auth":"$http_authorization","te":"$http_te",'
        '"expect":"$http_expect","status":"$status","length":"$request_length",'
        '"user":"$remote_user","sent":"$body_bytes_sent","cell":"$http_x_cell",'
        '"tls":"$ssl_protocol","cipher":"$ssl_cipher","conn":"$connection"}}';
    access_log {d}/access.log interop;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    types {{ text/plain txt; application/octet-stream bin; }}
    default_type application/octet-stream;
    keepalive_requests {keepalive};
    if_modified_since before;
    gzip on;
    gzip_types text/plain application/json;
    gzip_min_length 1;
    gzip_proxied any;
    ssl_certificate {crt};
    ssl_certificate_key {key};
    server {{
        listen 127.0.0.1:{h1} ssl;
        server_name _;
        {locations}
    }}
    server {{
        listen 127.0.0.1:{h2} ssl http2;
        server_name _;
        {locations}
    }}
    server {{
        listen 127.0.0.1:{plain};
        server_name _;
        {locations}
    }}
}}
"#,
        crt = crt.display(),
        key = key.display(),
    )
}

fn nginx_locations(dir: &Path) -> String {
    let d = dir.display();
    let exec = git_exec_path();
    // A head of 150 fields (a site that sets many cookies), and one of six copies of the
    // request's `x-pad` (a large head from a stock server).
    let many: String = (0..150)
        .map(|i| format!("add_header x-field-{i} v{i} always; "))
        .collect();
    let big: String = (0..6)
        .map(|i| format!("add_header x-big-{i} $http_x_pad always; "))
        .collect();
    format!(
        r#"root {d}/www;
        location = /manyfields {{ {many}return 200 'many'; }}
        location = /obj/data.txt {{
            alias {d}/www/obj/data.txt.gz;
            default_type text/plain;
            gzip off;
            add_header content-encoding gzip;
            add_header content-md5 "c3RvcmVkLWNvZGVkLWJ5dGVz";
            add_header x-goog-hash "md5=c3RvcmVkLWNvZGVkLWJ5dGVz";
        }}
        location = /bighead {{ {big}return 200 'big'; }}
        location = /echo {{
            default_type application/json;
            return 200 '{{"proto":"$server_protocol","host":"$http_host","key":"$http_x_api_key"}}';
        }}
        # 200 and the request URI back only when `sig` is the query key as sealgate
        # percent-encodes it: the echo a scrubber must recognise in that form.
        location = /echo-uri {{
            default_type text/plain;
            if ($arg_sig != "wJalrXUtnFEMI%2FK7MDENG%2FbPxRfiCYINTEROPKEY%2Bx%3D") {{ return 403; }}
            return 200 '$request_uri';
        }}
        location = /nocontent {{ return 204; }}
        location = /trailers {{
            # sub_filter drops Content-Length (curl ignores trailers after a known length)
            sub_filter 'zzz' 'zzz';
            sub_filter_types text/plain;
            add_trailer x-checksum sha-interop-1 always;
            default_type text/plain;
            return 200 'with trailers';
        }}
        location = /v1/messages {{
            default_type application/json;
            return 200 '{{"id":"msg_interop","type":"message","role":"assistant","model":"claude-test","content":[{{"type":"text","text":"hi"}}],"stop_reason":"end_turn","stop_sequence":null,"usage":{{"input_tokens":1,"output_tokens":1}}}}';
        }}
        location = /post {{
            client_max_body_size 1m;
            client_body_buffer_size 1m;
            default_type application/json;
            return 200 '{{"ok":true}}';
        }}
        location /dav/ {{
            alias {d}/dav/;
            dav_methods PUT;
            create_full_put_path on;
            client_max_body_size 0;
        }}
        # Refuses bodies over 64 KiB: from the head when a length is declared, mid-body (after
        # reading 64 KiB of it) when not.
        location /dav-capped/ {{
            alias {d}/dav/;
            dav_methods PUT;
            create_full_put_path on;
            client_max_body_size 64k;
        }}
        location ~ ^/repo\.git(/.*)?$ {{
            auth_basic "git";
            auth_basic_user_file {d}/htpasswd;
            client_max_body_size 0;
            fastcgi_pass unix:{d}/fcgiwrap.sock;
            fastcgi_param SCRIPT_FILENAME {exec}/git-http-backend;
            fastcgi_param GIT_PROJECT_ROOT {d}/git;
            fastcgi_param GIT_HTTP_EXPORT_ALL "";
            fastcgi_param REMOTE_USER $remote_user;
            fastcgi_param PATH_INFO $uri;
            fastcgi_param QUERY_STRING $query_string;
            fastcgi_param REQUEST_METHOD $request_method;
            fastcgi_param CONTENT_TYPE $content_type;
            fastcgi_param CONTENT_LENGTH $content_length;
            fastcgi_param SERVER_PROTOCOL $server_protocol;
            fastcgi_param HTTP_GIT_PROTOCOL $http_git_protocol;
        }}"#
    )
}

// ---- Caddy ----------------------------------------------------------------------------------

/// Names Caddy serves.
pub const CADDY_NAMES: &[&str] = &["caddy.test", "clean-caddy.test", "api.openai.com"];

/// Caddy (apt; Go's net/http h1+h2 stack).
pub struct Caddy {
    /// Its TLS listener.
    pub addr: SocketAddr,
    dir: PathBuf,
    _proc: Proc,
}

impl Caddy {
    /// Starts Caddy with an echo, 204, static files with gzip and an OpenAI-shaped answer.
    pub fn start(pki: &TestPki, dir: &Path) -> Caddy {
        let dir = dir.join("caddy");
        std::fs::create_dir_all(dir.join("www/static")).unwrap();
        let (crt, key) = pki.write_leaf(&dir, "leaf", CADDY_NAMES);
        let text = "caddy says hello, and again\n".repeat(2000);
        std::fs::write(dir.join("www/static/text.txt"), text).unwrap();
        let port = free_port();
        let conf = caddy_conf(&dir, &crt, &key, port);
        std::fs::write(dir.join("Caddyfile"), conf).unwrap();
        let log = dir.join("caddy.log");
        let mut proc = Proc::spawn(
            "caddy",
            Command::new("caddy")
                .args(["run", "--adapter", "caddyfile", "--config"])
                .arg(dir.join("Caddyfile"))
                .env("HOME", &dir)
                .env("XDG_DATA_HOME", dir.join("data"))
                .env("XDG_CONFIG_HOME", dir.join("config"))
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap()),
        );
        wait_ports("caddy", &mut proc, &[port], &log);
        Caddy {
            addr: loopback(port),
            dir,
            _proc: proc,
        }
    }

    /// Caddy's JSON access log: one entry per request with the request's headers.
    pub fn hits(&self) -> Vec<Value> {
        json_lines(&self.dir.join("access.log"))
            .into_iter()
            .filter(|v| v.get("request").is_some())
            .collect()
    }
}

/// Site addresses without a port (`https_port` sets it): Caddy matches its per-site access
/// log by the request's host, which through sealgate carries no default port.
fn caddy_conf(dir: &Path, crt: &Path, key: &Path, port: u16) -> String {
    let d = dir.display();
    let sites = CADDY_NAMES.join(", ");
    let http_port = free_port();
    format!(
        r#"{{
    admin off
    https_port {port}
    http_port {http_port}
    auto_https disable_redirects
    skip_install_trust
    storage file_system {d}/data
    servers {{
        protocols h1 h2
        log_credentials
    }}
}}
{sites} {{
    bind 127.0.0.1
    tls {crt} {key}
    log {{
        output file {d}/access.log
        format json
    }}
    encode zstd gzip
    handle /echo {{
        header Content-Type application/json
        respond `{{"proto":"{{http.request.proto}}","host":"{{http.request.host}}","key":"{{http.request.header.X-Api-Key}}"}}` 200
    }}
    handle /nocontent {{
        respond 204
    }}
    handle /v1/chat/completions {{
        header Content-Type application/json
        respond `{{"id":"chatcmpl-interop","object":"chat.completion","created":1,"model":"gpt-test","choices":[{{"index":0,"message":{{"role":"assistant","content":"hi"}},"finish_reason":"stop"}}],"usage":{{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}}}` 200
    }}
    handle /static/* {{
        root * {d}/www
        file_server
    }}
}}
"#,
        crt = crt.display(),
        key = key.display(),
    )
}

// ---- Node -----------------------------------------------------------------------------------

/// Names Node serves: `node-h1.test` → its `https` server, `node-h2.test` → its `http2` one.
pub const NODE_NAMES: &[&str] = &["node-h1.test", "node-h2.test", "clean-node.test"];

/// Node's own `https` (h1, WebSocket echo) and `http2` (h2) servers.
pub struct Node {
    /// The `https` server.
    pub h1: SocketAddr,
    /// The `http2` server.
    pub h2: SocketAddr,
    log: PathBuf,
    _proc: Proc,
}

impl Node {
    /// Starts `node_origin.js`.
    pub fn start(pki: &TestPki, dir: &Path) -> Node {
        let dir = dir.join("node");
        std::fs::create_dir_all(&dir).unwrap();
        let (crt, key) = pki.write_leaf(&dir, "leaf", NODE_NAMES);
        std::fs::write(dir.join("origin.js"), include_str!("node_origin.js")).unwrap();
        let (h1, h2) = (free_port(), free_port());
        let log = dir.join("requests.jsonl");
        let out = dir.join("node.log");
        let mut proc = Proc::spawn(
            "node",
            Command::new("node")
                .arg(dir.join("origin.js"))
                .env("CERT", crt)
                .env("KEY", key)
                .env("LOG", &log)
                .env("PORT_H1", h1.to_string())
                .env("PORT_H2", h2.to_string())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&out).unwrap()),
        );
        wait_ports("node", &mut proc, &[h1, h2], &out);
        Node {
            h1: loopback(h1),
            h2: loopback(h2),
            log,
            _proc: proc,
        }
    }

    /// What Node received (method, path, version, headers, bytes, sha256).
    pub fn hits(&self) -> Vec<Value> {
        json_lines(&self.log)
    }
}

// ---- Hypercorn ------------------------------------------------------------------------------

/// Names Hypercorn serves.
pub const HYPERCORN_NAMES: &[&str] = &["hypercorn.test"];

/// Hypercorn (Python h11 + h2) running `asgi_origin.py`.
pub struct Hypercorn {
    /// Its TLS listener (h1 + h2 by ALPN).
    pub addr: SocketAddr,
    log: PathBuf,
    _proc: Proc,
}

impl Hypercorn {
    /// Starts Hypercorn from the test venv (`SEALGATE_TEST_PYTHON`'s directory).
    pub fn start(pki: &TestPki, dir: &Path, python: &str) -> Hypercorn {
        let dir = dir.join("hypercorn");
        std::fs::create_dir_all(&dir).unwrap();
        let (crt, key) = pki.write_leaf(&dir, "leaf", HYPERCORN_NAMES);
        std::fs::write(dir.join("asgi_origin.py"), include_str!("asgi_origin.py")).unwrap();
        let port = free_port();
        let log = dir.join("requests.jsonl");
        let out = dir.join("hypercorn.log");
        let mut proc = Proc::spawn(
            "hypercorn",
            Command::new(python)
                .args(["-m", "hypercorn", "--certfile"])
                .arg(crt)
                .arg("--keyfile")
                .arg(key)
                .args(["--bind", &format!("127.0.0.1:{port}"), "asgi_origin:app"])
                .current_dir(&dir)
                .env("INTEROP_LOG", &log)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&out).unwrap()),
        );
        wait_ports("hypercorn", &mut proc, &[port], &out);
        Hypercorn {
            addr: loopback(port),
            log,
            _proc: proc,
        }
    }

    /// What Hypercorn received.
    pub fn hits(&self) -> Vec<Value> {
        json_lines(&self.log)
    }
}

// ---- gRPC (grpcio) --------------------------------------------------------------------------

/// Names the gRPC origin serves (`grpc.test` is scrubbed, `clean-grpc.test` is not).
pub const GRPC_NAMES: &[&str] = &["grpc.test", "clean-grpc.test"];

/// grpcio's server (C-core: its own h2 and HPACK) running `grpc_origin.py`.
pub struct Grpc {
    /// Its TLS listener (h2 only).
    pub addr: SocketAddr,
    log: PathBuf,
    _proc: Proc,
}

impl Grpc {
    /// Starts the origin from the test venv's interpreter `python`.
    pub fn start(pki: &TestPki, dir: &Path, python: &str) -> Grpc {
        let dir = dir.join("grpc");
        std::fs::create_dir_all(&dir).unwrap();
        let (crt, key) = pki.write_leaf(&dir, "leaf", GRPC_NAMES);
        std::fs::write(dir.join("grpc_origin.py"), include_str!("grpc_origin.py")).unwrap();
        let port = free_port();
        let log = dir.join("requests.jsonl");
        let out = dir.join("grpc.log");
        let mut proc = Proc::spawn(
            "grpc origin",
            Command::new(python)
                .arg(dir.join("grpc_origin.py"))
                .env("CERT", crt)
                .env("KEY", key)
                .env("PORT", port.to_string())
                .env("INTEROP_LOG", &log)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&out).unwrap()),
        );
        wait_ports("grpc origin", &mut proc, &[port], &out);
        Grpc {
            addr: loopback(port),
            log,
            _proc: proc,
        }
    }

    /// What the origin received (method, metadata, body).
    pub fn hits(&self) -> Vec<Value> {
        json_lines(&self.log)
    }
}

/// lighttpd (apt) with a CGI echo: its h2 server refuses a CGI request body without a
/// `Content-Length` (411), which a stock HTTP/1.1 client's upload never lacks.
pub struct Lighttpd {
    /// Its TLS listener (h2 and HTTP/1.1 by ALPN).
    pub addr: SocketAddr,
    _proc: Proc,
}

/// The CGI: the body's announced length, the length read and its SHA-256 (never the body).
const LIGHTTPD_CGI: &str = "#!/usr/bin/env python3
import hashlib, os, sys
n = os.environ.get('CONTENT_LENGTH', '')
body = sys.stdin.buffer.read(int(n)) if n else sys.stdin.buffer.read()
sys.stdout.write('Content-Type: text/plain\\r\\n\\r\\n')
sys.stdout.write('content_length=%s\\nread=%d\\nsha256=%s\\n' % (n, len(body), hashlib.sha256(body).hexdigest()))
";

impl Lighttpd {
    /// Starts lighttpd serving `echo.cgi` for `names`, with a leaf of `pki`.
    pub fn start(pki: &TestPki, dir: &Path, names: &[&str]) -> Lighttpd {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = dir.join("lighttpd");
        std::fs::create_dir_all(dir.join("www")).unwrap();
        let (crt, key) = pki.write_leaf(&dir, "leaf", names);
        let cgi = dir.join("www/echo.cgi");
        std::fs::write(&cgi, LIGHTTPD_CGI).unwrap();
        std::fs::set_permissions(&cgi, std::fs::Permissions::from_mode(0o755)).unwrap();
        let port = free_port();
        let d = dir.display();
        let conf = format!(
            "server.modules = (\"mod_openssl\", \"mod_cgi\")\n\
             server.document-root = \"{d}/www\"\n\
             server.bind = \"127.0.0.1\"\n\
             server.port = {port}\n\
             server.errorlog = \"{d}/error.log\"\n\
             ssl.engine = \"enable\"\n\
             ssl.pemfile = \"{}\"\n\
             ssl.privkey = \"{}\"\n\
             cgi.assign = (\".cgi\" => \"\")\n",
            crt.display(),
            key.display()
        );
        std::fs::write(dir.join("lighttpd.conf"), conf).unwrap();
        let log = dir.join("error.log");
        let mut proc = Proc::spawn(
            "lighttpd",
            Command::new("lighttpd")
                .args(["-D", "-f"])
                .arg(dir.join("lighttpd.conf"))
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.join("stderr.log")).unwrap()),
        );
        wait_ports("lighttpd", &mut proc, &[port], &log);
        Lighttpd {
            addr: loopback(port),
            _proc: proc,
        }
    }
}

// ---- Apache httpd ---------------------------------------------------------------------------

/// Apache httpd 2.4 (apt: `apache2`, the event MPM, mod_ssl, mod_http2, mod_cgid) with a CGI
/// echo on two TLS ports: `h2` offers h2 and HTTP/1.1 by ALPN, `h1` only HTTP/1.1. Its
/// connection limits are set low so a short test meets them many times: an idle connection is
/// closed after `KeepAliveTimeout` (an h2 one with GOAWAY first), an HTTP/1.1 one also after
/// `MaxKeepAliveRequests` requests.
pub struct Apache {
    /// The h2 + HTTP/1.1 port.
    pub h2: SocketAddr,
    /// The HTTP/1.1-only port.
    pub h1: SocketAddr,
    /// `method path status` per request, as Apache logged it.
    access_log: PathBuf,
    conf: PathBuf,
    proc: Proc,
}

/// The CGI: the announced and read body lengths, the body's SHA-256 and the SHA-256 of the
/// `X-Api-Key` field (never a value itself).
const APACHE_CGI: &str = "#!/usr/bin/env python3
import hashlib, os, sys
n = os.environ.get('CONTENT_LENGTH', '')
body = sys.stdin.buffer.read(int(n)) if n else sys.stdin.buffer.read()
key = os.environ.get('HTTP_X_API_KEY', '').encode()
sys.stdout.write('Content-Type: text/plain\\r\\n\\r\\n')
sys.stdout.write('content_length=%s\\nread=%d\\nsha256=%s\\nkey_sha256=%s\\n' % (
    n, len(body), hashlib.sha256(body).hexdigest(), hashlib.sha256(key).hexdigest()))
";

impl Apache {
    /// Starts Apache serving `echo.cgi` for `names` with a leaf of `pki`, closing idle
    /// connections after `keepalive` (Apache takes milliseconds: `100ms`).
    pub fn start(pki: &TestPki, dir: &Path, names: &[&str], keepalive: &str) -> Apache {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = dir.join("apache");
        std::fs::create_dir_all(dir.join("www")).unwrap();
        std::fs::create_dir_all(dir.join("run")).unwrap();
        // The CGI runs as `nobody` when the suite runs as root: it must reach the script
        // through the test's temp dir (created 0700).
        for d in [dir.parent().unwrap(), &dir, &dir.join("www")] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let (crt, key) = pki.write_leaf(&dir, "leaf", names);
        let cgi = dir.join("www/echo.cgi");
        std::fs::write(&cgi, APACHE_CGI).unwrap();
        std::fs::set_permissions(&cgi, std::fs::Permissions::from_mode(0o755)).unwrap();
        let (h2, h1) = (free_port(), free_port());
        let conf = apache_conf(&dir, &crt, &key, [h2, h1], keepalive);
        std::fs::write(dir.join("apache.conf"), conf).unwrap();
        let log = dir.join("error.log");
        let mut proc = Proc::spawn(
            "apache2",
            Command::new("apache2")
                .arg("-f")
                .arg(dir.join("apache.conf"))
                .args(["-D", "FOREGROUND"])
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.join("stderr.log")).unwrap()),
        );
        wait_ports("apache2", &mut proc, &[h2, h1], &log);
        Apache {
            h2: loopback(h2),
            h1: loopback(h1),
            access_log: dir.join("access.log"),
            conf: dir.join("apache.conf"),
            proc,
        }
    }

    /// Takes h2 off the `h2` port (its `Protocols` become `http/1.1`) and restarts Apache
    /// (SIGHUP: the configuration is read again, open connections end); returns once the
    /// port accepts connections again.
    pub fn drop_h2(&mut self) {
        let conf = std::fs::read_to_string(&self.conf).unwrap();
        let conf = conf.replace("Protocols h2 http/1.1\n", "Protocols http/1.1\n");
        std::fs::write(&self.conf, conf).unwrap();
        let pid = self.proc.child.id().to_string();
        let _ = Command::new("kill").args(["-HUP", &pid]).status();
        // The listeners stay open across the restart; the new children serve once the
        // configuration is read again, and the error log says so.
        let log = self.conf.with_file_name("error.log");
        let deadline = Instant::now() + Duration::from_secs(20);
        let restarted = || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            text.matches("resuming normal operations").count() >= 2
        };
        while !restarted() {
            if Instant::now() > deadline {
                // What Apache said, wherever it said it: a start that failed before its
                // error log opened writes to stderr.
                let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
                let (text, err) = (read(&log), read(&self.conf.with_file_name("stderr.log")));
                let alive = self.proc.alive();
                panic!("apache2 did not restart (running: {alive}):\n{text}\n{err}");
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// The lines Apache logged for requests whose path and query contain `marker`.
    pub fn hits(&self, marker: &str) -> Vec<String> {
        std::fs::read_to_string(&self.access_log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(marker))
            .map(str::to_owned)
            .collect()
    }
}

fn apache_conf(dir: &Path, crt: &Path, key: &Path, ports: [u16; 2], keepalive: &str) -> String {
    let (d, m) = (dir.display(), "/usr/lib/apache2/modules");
    let [h2, h1] = ports;
    let user = match running_as_root() {
        true => "User nobody\nGroup nogroup\n",
        false => "",
    };
    format!(
        "ServerRoot \"{d}\"\n\
         ServerName apache.test\n\
         Listen 127.0.0.1:{h2}\n\
         Listen 127.0.0.1:{h1}\n\
         PidFile \"{d}/run/apache.pid\"\n\
         DefaultRuntimeDir \"{d}/run\"\n\
         Mutex file:{d}/run\n\
         ErrorLog \"{d}/error.log\"\n\
         LogFormat \"%m %U%q %>s %k\" hit\n\
         CustomLog \"{d}/access.log\" hit\n\
         {user}\
         LoadModule mpm_event_module {m}/mod_mpm_event.so\n\
         LoadModule authz_core_module {m}/mod_authz_core.so\n\
         LoadModule mime_module {m}/mod_mime.so\n\
         TypesConfig /dev/null\n\
         LoadModule ssl_module {m}/mod_ssl.so\n\
         LoadModule http2_module {m}/mod_http2.so\n\
         LoadModule cgid_module {m}/mod_cgid.so\n\
         ScriptSock \"{d}/run/cgid.sock\"\n\
         KeepAliveTimeout {keepalive}\n\
         MaxKeepAliveRequests 3\n\
         SSLEngine on\n\
         SSLCertificateFile \"{}\"\n\
         SSLCertificateKeyFile \"{}\"\n\
         SSLSessionCache none\n\
         Protocols h2 http/1.1\n\
         DocumentRoot \"{d}/www\"\n\
         <Directory \"{d}/www\">\n\
         \x20   Options +ExecCGI\n\
         \x20   AddHandler cgi-script .cgi\n\
         \x20   Require all granted\n\
         </Directory>\n\
         <VirtualHost 127.0.0.1:{h1}>\n\
         \x20   Protocols http/1.1\n\
         </VirtualHost>\n",
        crt.display(),
        key.display()
    )
}
