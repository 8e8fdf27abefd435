//! proxy.toml: a raw serde mirror (`RawConfig`) validated into a typed [`Config`].
//!
//! Invariant: every key has a default (the shipped `proxy.toml` documents exactly these values,
//! checked by a test), unknown keys are rejected, and validation reports every problem at once,
//! each naming its key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use crate::store::postgres::DatabaseUrl;
use crate::subst::OnDisallowed;

/// Errors from reading or validating the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML (unknown keys and wrong types are [`ConfigError::Invalid`]).
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// The parser's message (names the key and line).
        message: String,
    },
    /// One or more values are out of range; each line names its key.
    #[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
}

/// Raw mirror of proxy.toml.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    /// See proxy.toml.
    pub data_dir: Option<String>,
    /// See proxy.toml.
    pub cert_dir: Option<String>,
    /// `[admin]`.
    pub admin: RawAdmin,
    /// `[proxy]`.
    pub proxy: RawProxy,
    /// `[upstream]`.
    pub upstream: RawUpstream,
    /// `[sandbox]`.
    pub sandbox: RawSandbox,
    /// `[log]`.
    pub log: RawLog,
    /// `[audit]`.
    pub audit: RawAudit,
    /// `[store]`.
    pub store: RawStoreSection,
    /// `[node]`.
    pub node: RawNode,
}

/// `[store]`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RawStoreSection {
    /// "sqlite" or "postgres".
    pub backend: Option<String>,
    /// `postgres://…` (or key=value form); empty = `SEALGATE_DATABASE_URL`.
    pub url: Option<String>,
    /// Seconds; 0 = off.
    pub max_staleness_secs: Option<u64>,
    /// Seconds between re-reads of every store with sandboxes here, whatever its generation.
    pub reread_secs: Option<u64>,
    /// PEM files trusted for the database's certificate (`sslmode=require`).
    pub ca_files: Option<Vec<String>>,
}

/// `[node]`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RawNode {
    /// This daemon's name in fleet mode; empty = the hostname.
    pub id: Option<String>,
}

/// `[admin]`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RawAdmin {
    /// Admin API listen address.
    pub listen: Option<String>,
    /// Admin connections served at once.
    pub max_connections: Option<usize>,
    /// Seconds a request head may take.
    pub header_read_timeout_secs: Option<u64>,
    /// Seconds a token holder's request body may take.
    pub body_read_timeout_secs: Option<u64>,
}

/// `[proxy]`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RawProxy {
    /// Explicit proxy listen address.
    pub listen: Option<String>,
    /// Transparent listener; empty = off.
    pub transparent_listen: Option<String>,
    /// "block" or "forward_sealed".
    pub on_disallowed_token: Option<String>,
    /// Host written into proxy URLs.
    pub public_host: Option<String>,
    /// Seconds.
    pub header_read_timeout_secs: Option<u64>,
    /// Seconds.
    pub tls_handshake_timeout_secs: Option<u64>,
    /// Seconds.
    pub idle_timeout_secs: Option<u64>,
    /// Bytes.
    pub max_header_bytes: Option<usize>,
    /// Bytes.
    pub max_unsealed_bytes: Option<usize>,
    /// Count.
    pub max_header_fields: Option<usize>,
    /// Count.
    pub max_connections: Option<usize>,
    /// Count.
    pub max_tunnels_per_sandbox: Option<usize>,
    /// Count.
    pub max_requests_per_sandbox: Option<usize>,
    /// Count.
    pub max_unauthenticated_connections: Option<usize>,
    /// Count.
    pub max_unauthenticated_per_source: Option<usize>,
    /// Count.
    pub max_connections_per_sandbox: Option<usize>,
    /// Seconds.
    pub unauthenticated_timeout_secs: Option<u64>,
    /// Count.
    pub max_h2_streams: Option<u32>,
    /// Seconds.
    pub shutdown_grace_secs: Option<u64>,
    /// Count; 0 = `TOKIO_WORKER_THREADS`, else one per CPU core.
    pub worker_threads: Option<usize>,
    /// Microseconds; 0 = off.
    pub busy_poll_us: Option<u64>,
    /// Seconds; 0 = no lingering.
    pub linger_timeout_secs: Option<u64>,
    /// Bytes; 0 = no lingering.
    pub linger_max_bytes: Option<u64>,
    /// Bytes.
    pub h2_stream_window_bytes: Option<u32>,
    /// Bytes.
    pub h2_connection_window_bytes: Option<u32>,
    /// Bytes.
    pub h2_send_buffer_bytes: Option<usize>,
}

/// `[upstream]`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RawUpstream {
    /// PEM files with extra roots.
    pub ca_files: Option<Vec<String>>,
    /// host → "ip:port".
    pub resolve: Option<BTreeMap<String, String>>,
    /// CIDRs exempt from address vetting.
    pub allow_private_cidrs: Option<Vec<String>>,
    /// "ip:port" of DNS servers; empty = the system resolver.
    pub nameservers: Option<Vec<String>>,
    /// Seconds.
    pub connect_timeout_secs: Option<u64>,
    /// Seconds.
    pub response_timeout_secs: Option<u64>,
    /// Seconds.
    pub pool_idle_timeout_secs: Option<u64>,
    /// Count.
    pub pool_max_idle_per_host: Option<usize>,
    /// Count.
    pub max_connections_per_sandbox: Option<usize>,
    /// Count.
    pub max_connections: Option<usize>,
    /// Count.
    pub max_window_decoders: Option<usize>,
    /// Count.
    pub max_window_decoders_per_sandbox: Option<usize>,
    /// Count.
    pub max_response_codings: Option<usize>,
    /// Bytes.
    pub max_grpc_message_bytes: Option<usize>,
    /// Bytes.
    pub max_response_header_bytes: Option<usize>,
    /// Count.
    pub max_response_header_fields: Option<usize>,
    /// Bytes.
    pub h2_stream_window_bytes: Option<u32>,
    /// Bytes.
    pub h2_connection_window_bytes: Option<u32>,
    /// Bytes.
    pub h2_send_buffer_bytes: Option<usize>,
}

/// `[sandbox]`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RawSandbox {
    /// Seconds.
    pub default_timeout_secs: Option<u64>,
    /// Seconds.
    pub max_timeout_secs: Option<u64>,
    /// Count.
    pub leaf_cache_capacity: Option<usize>,
    /// `per-sandbox`, or the user (name or number, optionally `:group`) commands in every
    /// isolated sandbox run as.
    pub run_as: Option<String>,
    /// First uid (and gid) of the per-sandbox range.
    pub uid_base: Option<u64>,
    /// `POST /v1/sandboxes/{id}/commands` on or off.
    pub commands: Option<bool>,
    /// Seconds.
    pub command_timeout_secs: Option<u64>,
    /// Seconds.
    pub max_command_timeout_secs: Option<u64>,
    /// Bytes.
    pub max_output_bytes: Option<usize>,
    /// Bytes per second.
    pub output_drain_bytes_per_sec: Option<usize>,
    /// Count.
    pub max_commands_per_sandbox: Option<usize>,
    /// MiB; 0 = no memory limit.
    pub memory_max_mib: Option<u64>,
    /// Count; 0 = no process limit.
    pub pids_max: Option<u64>,
    /// Count (RLIMIT_NOFILE of each command, soft and hard); 0 = the limit the daemon
    /// started with.
    pub max_open_files: Option<u64>,
    /// MiB; 0 = files on `data_dir`'s filesystem, unbounded.
    pub disk_max_mib: Option<u64>,
    /// Count; 0 = no bound.
    pub max_flows: Option<u64>,
    /// Per second; 0 = no bound.
    pub max_new_flows_per_sec: Option<u64>,
    /// Per second; 0 = no bound.
    pub max_dns_queries_per_sec: Option<u64>,
    /// Whether commands may open netlink sockets.
    pub netlink: Option<bool>,
}

/// `[log]`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RawLog {
    /// Level or EnvFilter directive.
    pub level: Option<String>,
    /// "text" or "json".
    pub format: Option<String>,
}

/// `[audit]`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RawAudit {
    /// File path; empty = stdout.
    pub path: Option<String>,
}

/// Log output format (defined in [`crate::logging`]; re-exported here for compatibility).
pub use crate::logging::LogFormat;

/// Validated configuration. Paths are as written (relative to the working directory).
#[derive(Clone, Debug)]
pub struct Config {
    /// Database, master key and admin token live here.
    pub data_dir: PathBuf,
    /// Public CA certificates are written here.
    pub cert_dir: PathBuf,
    /// Admin API address.
    pub admin_listen: SocketAddr,
    /// `[admin] max_connections` and `header_read_timeout_secs`.
    pub admin_limits: AdminLimits,
    /// Proxy settings.
    pub proxy: ProxyConfig,
    /// Upstream settings.
    pub upstream: UpstreamConfig,
    /// Sandbox settings.
    pub sandbox: SandboxConfig,
    /// Log level directive.
    pub log_level: String,
    /// Log format.
    pub log_format: LogFormat,
    /// Audit log file; None = stdout.
    pub audit_path: Option<PathBuf>,
    /// `[store]`, validated.
    pub store: StoreConfig,
    /// `[node] id`; None = the hostname (resolved at start, [`StoreConfig`] docs).
    pub node_id: Option<String>,
}

/// Which database holds stores, secrets and sandbox sessions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// One SQLite file under `data_dir` (one host).
    Sqlite,
    /// A PostgreSQL database shared by many nodes (fleet mode).
    Postgres,
}

/// `[store]`, validated. `Debug` never shows a password (see [`DatabaseUrl`]).
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// The backend.
    pub backend: Backend,
    /// `[store] url`; None = take `SEALGATE_DATABASE_URL` at start (required for postgres).
    /// Without `ca_files`: connect through [`StoreConfig::database_url`], never this.
    pub url: Option<DatabaseUrl>,
    /// Refuse to unseal after being cut off from the database this long; None = off.
    pub max_staleness: Option<Duration>,
    /// `[store] reread_secs`: how often a fleet node re-reads every store its sandboxes use
    /// whatever the store's generation says (bounds how long a database writer can hide a
    /// change from it by replaying a generation).
    pub reread: Duration,
    /// `[store] ca_files`: CA certificates (PEM) trusted, besides the web PKI roots, for the
    /// database's certificate when the URL says `sslmode=require`.
    pub ca_files: Vec<PathBuf>,
}

impl StoreConfig {
    /// The database URL: `[store] url`, else `env` (`SEALGATE_DATABASE_URL`), trusting
    /// `[store] ca_files`.
    ///
    /// # Errors
    /// No URL; an invalid `env`; CA files that cannot be read, or given without
    /// `sslmode=require`.
    pub fn database_url(&self, env: Option<&str>) -> Result<DatabaseUrl, String> {
        let url = match (&self.url, env.filter(|u| !u.is_empty())) {
            (Some(url), _) => url.clone(),
            (None, Some(text)) => DatabaseUrl::parse(text.to_owned())
                .map_err(|e| format!("SEALGATE_DATABASE_URL: {e}"))?,
            (None, None) => {
                return Err(
                    "store.backend = \"postgres\" needs [store] url or SEALGATE_DATABASE_URL"
                        .into(),
                )
            }
        };
        url.with_ca_files(&self.ca_files)
    }
}

/// `[admin]` limits, validated (served by `admin::serve`).
#[derive(Clone, Copy, Debug)]
pub struct AdminLimits {
    /// `max_connections`: connections served at once.
    pub max_connections: usize,
    /// `header_read_timeout_secs`: how long a request head may take.
    pub header_read_timeout: Duration,
    /// `body_read_timeout_secs`: how long a token holder's request body may take.
    pub body_read_timeout: Duration,
}

/// `[proxy]`, validated.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// Explicit listener.
    pub listen: SocketAddr,
    /// Transparent listener, if on.
    pub transparent_listen: Option<SocketAddr>,
    /// Policy for known tokens sent to disallowed hosts.
    pub on_disallowed_token: OnDisallowed,
    /// Host in sandbox proxy URLs.
    pub public_host: String,
    /// CONNECT line / request head deadline.
    pub header_read_timeout: Duration,
    /// Client TLS handshake deadline.
    pub tls_handshake_timeout: Duration,
    /// Idle connection deadline.
    pub idle_timeout: Duration,
    /// Request head cap in bytes.
    pub max_header_bytes: usize,
    /// Real-value bytes one request may carry after substitution (headers, query and body
    /// together); a request that would carry more gets 413 and nothing of it is sent.
    pub max_unsealed_bytes: usize,
    /// Header fields per HTTP/1 request head (the framing guard, the transparent `Host`
    /// pre-parse and hyper all use this one number); more → 431.
    pub max_header_fields: usize,
    /// Open client connections, all listeners.
    pub max_connections: usize,
    /// Concurrent intercepted connections per sandbox.
    pub max_tunnels_per_sandbox: usize,
    /// Requests of one sandbox in flight upstream at once (each may hold an upstream
    /// connection, a file descriptor) until its response body ends; more → 429.
    pub max_requests_per_sandbox: usize,
    /// Connections not yet identified as a sandbox's, all sources together.
    pub max_unauthenticated_connections: usize,
    /// Connections not yet identified, from one source IP.
    pub max_unauthenticated_per_source: usize,
    /// Identified connections of one sandbox.
    pub max_connections_per_sandbox: usize,
    /// How long a connection may stay unidentified.
    pub unauthenticated_timeout: Duration,
    /// h2 concurrent streams per connection.
    pub max_h2_streams: u32,
    /// Graceful shutdown window.
    pub shutdown_grace: Duration,
    /// Threads of the daemon's runtime (proxy, admin API); 0 = `TOKIO_WORKER_THREADS` if set,
    /// else one per CPU core. Read once at start (a reload reports a change as needing a
    /// restart).
    pub worker_threads: usize,
    /// The longest a proxy worker polls without blocking after its clients last moved bytes
    /// (`proxy::spin`); zero = off. Read once at start.
    pub busy_poll: Duration,
    /// What the client still sends after sealgate answered early is read and dropped within
    /// these (`proxy::linger`; `linger_timeout_secs`, `linger_max_bytes`), per stage.
    pub linger: LingerBounds,
    /// The h2 flow-control windows sealgate opens to a sandbox's uploads and the answer bytes
    /// it queues per stream for a sandbox's client (`h2_*_bytes`).
    pub h2: H2Buffers,
}

/// `[upstream]`, validated.
#[derive(Clone, Debug)]
pub struct UpstreamConfig {
    /// Extra root files (already checked to exist).
    pub ca_files: Vec<PathBuf>,
    /// Fixed addresses, keyed by normalised host name.
    pub resolve: BTreeMap<String, SocketAddr>,
    /// CIDRs exempt from vetting.
    pub allow_private_cidrs: Vec<IpNet>,
    /// DNS servers asked for A/AAAA; empty = the system resolver.
    pub nameservers: Vec<SocketAddr>,
    /// TCP + TLS connect deadline.
    pub connect_timeout: Duration,
    /// Response head deadline, counted from the request's last byte (`proxy::progress`).
    pub response_timeout: Duration,
    /// Pool idle timeout.
    pub pool_idle_timeout: Duration,
    /// Pool size per host.
    pub pool_max_idle_per_host: usize,
    /// Upstream connections one sandbox may hold open at once (in use and idle in its pools).
    pub max_connections_per_sandbox: usize,
    /// Upstream connections the daemon holds open at once, all sandboxes together (in use and
    /// idle); with `proxy.max_connections` and `admin.max_connections` it bounds the daemon's
    /// open descriptors, whatever the number of sandboxes.
    pub max_connections: usize,
    /// Response bodies decoded from brotli or zstd at once, all sandboxes together (each
    /// decoder may hold a 16 or 8 MiB window while its client is not reading).
    pub max_window_decoders: usize,
    /// The same for one sandbox.
    pub max_window_decoders_per_sandbox: usize,
    /// Stacked content/transfer codings accepted on one response where scrubbing decodes.
    pub max_response_codings: usize,
    /// Largest compressed gRPC message, before or after decoding, that scrubbing decodes.
    pub max_grpc_message_bytes: usize,
    /// hyper's HTTP/1 client buffer: the largest response head an HTTP/1.1 origin may send,
    /// and the most of an answer read ahead per upstream connection (a sandbox that does not
    /// read its answer pins no more).
    pub max_response_header_bytes: usize,
    /// Header fields an HTTP/1.1 origin's response head may have (hyper's client refuses more;
    /// past its default of 100 it allocates room for this many on every response).
    pub max_response_header_fields: usize,
    /// The h2 flow-control windows sealgate opens to an h2 origin's answers and the upload
    /// bytes it queues per stream for the origin (`h2_*_bytes`).
    pub h2: H2Buffers,
}

/// `[sandbox]`, validated.
#[derive(Clone, Debug)]
pub struct SandboxConfig {
    /// Default lifetime.
    pub default_timeout: Duration,
    /// Longest lifetime.
    pub max_timeout: Duration,
    /// Leaf cache bound.
    pub leaf_cache_capacity: usize,
    /// Who commands run as in isolated sandboxes: [`PER_SANDBOX`], or one user for all.
    pub run_as: String,
    /// With `run_as = "per-sandbox"`: the sandbox in namespace slot S runs as uid and gid
    /// `uid_base + S`.
    pub uid_base: u32,
    /// Whether the commands route is on.
    pub commands: bool,
    /// Command timeout when the request gives none.
    pub command_timeout: Duration,
    /// Longest accepted command timeout.
    pub max_command_timeout: Duration,
    /// Output kept per stream (stdout, stderr) of one command.
    pub max_output_bytes: usize,
    /// How fast a stream's output past `max_output_bytes` is read and dropped.
    pub output_drain_bytes_per_sec: usize,
    /// Commands running at once in one sandbox.
    pub max_commands: usize,
    /// Each isolated sandbox's memory, process and file limits.
    pub limits: crate::limits::Limits,
    /// Open files per process of a command (soft and hard limit); `None`: the limit the
    /// daemon started with.
    pub max_open_files: Option<u64>,
    /// Each isolated sandbox's bounds on the host's connection-tracking table.
    pub flows: crate::limits::Flows,
    /// DNS queries a second the daemon's responder answers for one isolated sandbox, UDP and
    /// TCP together (one socket sends any number in one flow, past `flows`); None = no bound.
    pub dns_per_sec: Option<u32>,
    /// Whether isolated sandboxes' commands may open netlink sockets (`isolation::seccomp`):
    /// their receive queues are kernel memory no cgroup charges. Read when a command starts.
    pub netlink: bool,
}

impl Default for Config {
    fn default() -> Self {
        RawConfig::default()
            .validate()
            .expect("embedded defaults are valid")
    }
}

impl Config {
    /// Reads and validates `path`, or the embedded defaults when `path` is None.
    ///
    /// # Errors
    /// Unreadable file, TOML errors (unknown keys included), or every invalid value at once.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let Some(path) = path else {
            return RawConfig::default().validate();
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses TOML text (`origin` names it in errors).
    ///
    /// # Errors
    /// As [`Config::load`].
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let table: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_owned(),
            message: e.to_string(),
        })?;
        let (raw, mut problems) = typed(table);
        match raw.validate() {
            Ok(cfg) if problems.is_empty() => Ok(cfg),
            Ok(_) => Err(ConfigError::Invalid(problems)),
            Err(ConfigError::Invalid(more)) => {
                problems.extend(more);
                Err(ConfigError::Invalid(problems))
            }
            Err(other) => Err(other),
        }
    }
}

/// Keys a file may get wrong (unknown, or of the wrong type) before [`typed`] stops listing.
const MAX_TYPE_PROBLEMS: usize = 64;

/// The table as a [`RawConfig`], with every unknown key and every value of the wrong type
/// named by its dotted key (`proxy.max_connections: invalid type: …`) and left out, so that
/// all of them are reported at once with the range checks (serde stops at the first).
fn typed(mut table: toml::Table) -> (RawConfig, Vec<String>) {
    let mut problems = Vec::new();
    loop {
        let value = toml::Value::Table(table.clone());
        match serde_path_to_error::deserialize::<_, RawConfig>(value) {
            Ok(raw) => return (raw, problems),
            Err(e) => {
                let key = e.path().to_string();
                // toml adds the table ("in `log`") on a second line: the key says it already.
                let inner = e.inner().to_string();
                let message = inner.lines().next().unwrap_or_default().to_owned();
                let removed = remove_key(&mut table, e.path());
                problems.push(match key.as_str() {
                    "." => message,
                    _ => format!("{key}: {message}"),
                });
                if !removed || problems.len() >= MAX_TYPE_PROBLEMS {
                    return (RawConfig::default(), problems);
                }
            }
        }
    }
}

/// Removes the key `path` names from `table` (a value inside an array takes the whole key
/// with it). False if nothing was removed.
fn remove_key(table: &mut toml::Table, path: &serde_path_to_error::Path) -> bool {
    use serde_path_to_error::Segment;
    let keys: Vec<&str> = path
        .iter()
        .map_while(|s| match s {
            Segment::Map { key } => Some(key.as_str()),
            _ => None,
        })
        .collect();
    let Some((last, parents)) = keys.split_last() else {
        return false;
    };
    let mut at = table;
    for key in parents {
        match at.get_mut(*key) {
            Some(toml::Value::Table(inner)) => at = inner,
            _ => return false,
        }
    }
    at.remove(*last).is_some()
}

/// Collects validation problems so all of them are reported together.
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn addr(&mut self, key: &str, value: Option<&str>, default: &str) -> SocketAddr {
        let v = value.unwrap_or(default);
        v.parse().unwrap_or_else(|_| {
            self.0
                .push(format!("{key}: '{v}' is not an ip:port socket address"));
            default.parse().expect("default address is valid")
        })
    }

    fn secs(&mut self, key: &str, value: Option<u64>, default: u64) -> Duration {
        let v = value.unwrap_or(default);
        if v == 0 || v > 7 * 24 * 3600 {
            self.0
                .push(format!("{key}: {v} is out of range (1..=604800 seconds)"));
        }
        Duration::from_secs(v)
    }

    /// A list of file paths (default none), each of which must name a file.
    fn files(&mut self, key: &str, value: Option<Vec<String>>) -> Vec<PathBuf> {
        let files: Vec<PathBuf> = value
            .unwrap_or_default()
            .into_iter()
            .map(PathBuf::from)
            .collect();
        for f in &files {
            if !f.is_file() {
                self.0
                    .push(format!("{key}: '{}' is not a readable file", f.display()));
            }
        }
        files
    }

    /// A count where 0 means "choose for me" (default 0).
    fn count_or_zero(&mut self, key: &str, value: Option<usize>, max: usize) -> usize {
        let v = value.unwrap_or(0);
        if v > max {
            self.0.push(format!(
                "{key}: {v} is out of range (0..={max}; 0 = one per CPU core)"
            ));
        }
        v
    }

    /// `default` when absent; else 0 (which means `zero`, as the message says) or a value
    /// within `range` (`unit` follows the range in the message).
    fn zero_or_within(
        &mut self,
        key: &str,
        value: Option<u64>,
        default: u64,
        range: (u64, u64),
        (zero, unit): (&str, &str),
    ) -> u64 {
        let v = value.unwrap_or(default);
        if v != 0 && !(range.0..=range.1).contains(&v) {
            self.0.push(format!(
                "{key}: {v} is out of range (0 = {zero}, or {}..={}{unit})",
                range.0, range.1
            ));
        }
        v
    }

    /// Microseconds: `default` when absent, 0 = off, else within `range`.
    fn micros_or_off(
        &mut self,
        key: &str,
        value: Option<u64>,
        default: u64,
        range: (u64, u64),
    ) -> u64 {
        self.zero_or_within(key, value, default, range, ("off", " µs"))
    }

    /// A limit: `default` when absent, 0 = off (None), else within `min..=max`.
    fn limit(
        &mut self,
        key: &str,
        value: Option<u64>,
        default: u64,
        range: (u64, u64),
    ) -> Option<u64> {
        let v = self.zero_or_within(key, value, default, range, ("no limit", ""));
        (v != 0).then_some(v)
    }

    fn count(&mut self, key: &str, value: Option<usize>, default: usize, max: usize) -> usize {
        self.count_from(key, value, default, 1, max)
    }

    fn count_from(
        &mut self,
        key: &str,
        value: Option<usize>,
        default: usize,
        min: usize,
        max: usize,
    ) -> usize {
        let v = value.unwrap_or(default);
        if v < min || v > max {
            self.0
                .push(format!("{key}: {v} is out of range ({min}..={max})"));
        }
        v
    }
}

impl RawConfig {
    /// Validates into a [`Config`], reporting every problem at once.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] listing each bad key.
    pub fn validate(self) -> Result<Config, ConfigError> {
        let mut p = Problems::default();
        let proxy = self.proxy.validate(&mut p);
        let upstream = self.upstream.validate(&mut p);
        let sandbox = self.sandbox.validate(&mut p);
        let admin_listen = p.addr(
            "admin.listen",
            self.admin.listen.as_deref(),
            "127.0.0.1:7070",
        );
        let admin_limits = AdminLimits {
            max_connections: p.count(
                "admin.max_connections",
                self.admin.max_connections,
                128,
                65536,
            ),
            header_read_timeout: p.secs(
                "admin.header_read_timeout_secs",
                self.admin.header_read_timeout_secs,
                10,
            ),
            body_read_timeout: p.secs(
                "admin.body_read_timeout_secs",
                self.admin.body_read_timeout_secs,
                30,
            ),
        };
        let log_format = match self.log.format.as_deref().unwrap_or("text") {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                p.0.push(format!("log.format: '{other}' is not \"text\" or \"json\""));
                LogFormat::Text
            }
        };
        let log_level = self.log.level.unwrap_or_else(|| "info".into());
        if let Err(why) = crate::logging::parse_filter(&log_level) {
            p.0.push(format!("log.level: {why}"));
        }
        let data_dir = non_empty_path(&mut p, "data_dir", self.data_dir, "data");
        let cert_dir = non_empty_path(&mut p, "cert_dir", self.cert_dir, "certs");
        let audit_path = self.audit.path.filter(|s| !s.is_empty()).map(PathBuf::from);
        let store = self.store.validate(&mut p);
        let node_id = self.node.validate(&mut p);
        distinct_listeners(&mut p, admin_listen, &proxy);
        if !p.0.is_empty() {
            return Err(ConfigError::Invalid(p.0));
        }
        Ok(Config {
            data_dir,
            cert_dir,
            admin_listen,
            admin_limits,
            proxy,
            upstream,
            sandbox,
            log_level,
            log_format,
            audit_path,
            store,
            node_id,
        })
    }
}

/// Two listeners on one port whose addresses overlap (equal, or one the unspecified address
/// of a family that takes the other) cannot both bind; say so by key instead of letting the second bind fail later
/// with "address in use". Port 0 (any free port) never collides.
fn distinct_listeners(p: &mut Problems, admin: SocketAddr, proxy: &ProxyConfig) {
    let named = [
        ("admin.listen", Some(admin)),
        ("proxy.listen", Some(proxy.listen)),
        ("proxy.transparent_listen", proxy.transparent_listen),
    ];
    // `[::]` also takes IPv4 (dual stack, Linux's default); `0.0.0.0` takes IPv4 only.
    let covers = |wide: SocketAddr, other: SocketAddr| {
        wide.ip().is_unspecified() && (wide.is_ipv6() || other.is_ipv4())
    };
    let overlap = |a: SocketAddr, b: SocketAddr| {
        a.port() != 0 && a.port() == b.port() && (a.ip() == b.ip() || covers(a, b) || covers(b, a))
    };
    for (i, (ka, a)) in named.iter().enumerate() {
        for (kb, b) in &named[i + 1..] {
            if let (Some(a), Some(b)) = (a, b) {
                if overlap(*a, *b) {
                    p.0.push(format!(
                        "{ka} ({a}) and {kb} ({b}) share a port: each listener needs its own"
                    ));
                }
            }
        }
    }
}

impl RawStoreSection {
    fn validate(self, p: &mut Problems) -> StoreConfig {
        let backend = match self.backend.as_deref().unwrap_or("sqlite") {
            "sqlite" => Backend::Sqlite,
            "postgres" => Backend::Postgres,
            other => {
                p.0.push(format!(
                    "store.backend: '{other}' is not \"sqlite\" or \"postgres\""
                ));
                Backend::Sqlite
            }
        };
        let url = match self.url.filter(|u| !u.is_empty()).map(DatabaseUrl::parse) {
            None => None,
            Some(Ok(url)) => Some(url),
            Some(Err(e)) => {
                p.0.push(format!("store.url: {e}"));
                None
            }
        };
        if url.is_some() && backend == Backend::Sqlite {
            p.0.push("store.url: only used with store.backend = \"postgres\"".into());
        }
        let max_staleness = match self.max_staleness_secs.unwrap_or(0) {
            0 => None,
            s if s > 7 * 24 * 3600 => {
                p.0.push(format!(
                    "store.max_staleness_secs: {s} is out of range (0..=604800 seconds)"
                ));
                None
            }
            s => Some(Duration::from_secs(s)),
        };
        // Checked here as far as the file name goes (any command loads this file, also where
        // the certificates are not readable); read and parsed when the daemon connects.
        let ca_files = p.files("store.ca_files", self.ca_files);
        if !ca_files.is_empty() && backend == Backend::Sqlite {
            p.0.push("store.ca_files: only used with store.backend = \"postgres\"".into());
        }
        if url.as_ref().is_some_and(|u| !u.requires_tls()) && !ca_files.is_empty() {
            p.0.push(crate::store::postgres::CA_FILES_WITHOUT_TLS.into());
        }
        let reread = p.secs("store.reread_secs", self.reread_secs, 60);
        StoreConfig {
            backend,
            url,
            max_staleness,
            reread,
            ca_files,
        }
    }
}

impl RawNode {
    fn validate(self, p: &mut Problems) -> Option<String> {
        let id = self.id.filter(|s| !s.is_empty())?;
        if let Err(why) = crate::store::postgres::check_node_id(&id) {
            p.0.push(format!("node.id: '{id}' {why}"));
        }
        Some(id)
    }
}

fn non_empty_path(p: &mut Problems, key: &str, v: Option<String>, default: &str) -> PathBuf {
    let v = v.unwrap_or_else(|| default.into());
    if v.is_empty() {
        p.0.push(format!("{key}: must not be empty"));
    }
    PathBuf::from(v)
}

impl RawProxy {
    fn validate(self, p: &mut Problems) -> ProxyConfig {
        let transparent_listen = match self.transparent_listen.as_deref() {
            None | Some("") => None,
            Some(v) => Some(p.addr("proxy.transparent_listen", Some(v), "0.0.0.0:3129")),
        };
        let on_disallowed_token = match self.on_disallowed_token.as_deref().unwrap_or("block") {
            "block" => OnDisallowed::Block,
            "forward_sealed" => OnDisallowed::ForwardSealed,
            other => {
                p.0.push(format!(
                    "proxy.on_disallowed_token: '{other}' is not \"block\" or \"forward_sealed\""
                ));
                OnDisallowed::Block
            }
        };
        let public_host = self.public_host.unwrap_or_else(|| "127.0.0.1".into());
        if crate::policy::normalise_host(&public_host).is_err() {
            p.0.push(format!(
                "proxy.public_host: '{public_host}' is not a host name or IP"
            ));
        }
        ProxyConfig {
            listen: p.addr("proxy.listen", self.listen.as_deref(), "127.0.0.1:3128"),
            transparent_listen,
            on_disallowed_token,
            public_host,
            header_read_timeout: p.secs(
                "proxy.header_read_timeout_secs",
                self.header_read_timeout_secs,
                10,
            ),
            tls_handshake_timeout: p.secs(
                "proxy.tls_handshake_timeout_secs",
                self.tls_handshake_timeout_secs,
                10,
            ),
            idle_timeout: p.secs("proxy.idle_timeout_secs", self.idle_timeout_secs, 90),
            // Below 1 KiB no CONNECT with its credentials fits: every request would get 431.
            max_header_bytes: p.count_from(
                "proxy.max_header_bytes",
                self.max_header_bytes,
                65536,
                1024,
                1 << 20,
            ),
            // Values count in whole KiB: below one, every token would be refused.
            max_unsealed_bytes: p.count_from(
                "proxy.max_unsealed_bytes",
                self.max_unsealed_bytes,
                1 << 20,
                crate::subst::BUDGET_UNIT,
                1 << 30,
            ),
            max_header_fields: p.count(
                "proxy.max_header_fields",
                self.max_header_fields,
                100,
                10_000,
            ),
            max_connections: p.count("proxy.max_connections", self.max_connections, 4096, 1 << 20),
            max_tunnels_per_sandbox: p.count(
                "proxy.max_tunnels_per_sandbox",
                self.max_tunnels_per_sandbox,
                256,
                1 << 20,
            ),
            max_requests_per_sandbox: p.count(
                "proxy.max_requests_per_sandbox",
                self.max_requests_per_sandbox,
                256,
                1 << 20,
            ),
            max_unauthenticated_connections: p.count(
                "proxy.max_unauthenticated_connections",
                self.max_unauthenticated_connections,
                1024,
                1 << 20,
            ),
            max_unauthenticated_per_source: p.count(
                "proxy.max_unauthenticated_per_source",
                self.max_unauthenticated_per_source,
                256,
                1 << 20,
            ),
            max_connections_per_sandbox: p.count(
                "proxy.max_connections_per_sandbox",
                self.max_connections_per_sandbox,
                512,
                1 << 20,
            ),
            unauthenticated_timeout: p.secs(
                "proxy.unauthenticated_timeout_secs",
                self.unauthenticated_timeout_secs,
                5,
            ),
            max_h2_streams: p.count(
                "proxy.max_h2_streams",
                self.max_h2_streams.map(|v| v as usize),
                100,
                10_000,
            ) as u32,
            shutdown_grace: p.secs("proxy.shutdown_grace_secs", self.shutdown_grace_secs, 30),
            worker_threads: p.count_or_zero("proxy.worker_threads", self.worker_threads, 1024),
            busy_poll: Duration::from_micros(p.micros_or_off(
                "proxy.busy_poll_us",
                self.busy_poll_us,
                DEFAULT_BUSY_POLL_US,
                BUSY_POLL_RANGE_US,
            )),
            linger: linger_bounds(p, self.linger_timeout_secs, self.linger_max_bytes),
            h2: h2_buffers(
                p,
                "proxy",
                (
                    self.h2_stream_window_bytes,
                    self.h2_connection_window_bytes,
                    self.h2_send_buffer_bytes,
                ),
                H2Buffers::PROXY,
            ),
        }
    }
}

/// `[proxy] linger_timeout_secs` when absent: the most a lingering connection or request
/// body waits for the client to end it (`proxy::linger`).
pub const LINGER_FOR: Duration = Duration::from_secs(2);
/// `[proxy] linger_max_bytes` when absent: the most it reads and drops.
pub const LINGER_BYTES: u64 = 16 << 20;

/// How long and how much one lingering stage reads and drops (`proxy::linger`). Either zero:
/// no lingering (the connection or body ends at once, as before lingering existed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LingerBounds {
    /// The most a stage waits for the client to end it.
    pub wait: Duration,
    /// The most a stage reads and drops.
    pub bytes: u64,
}

impl LingerBounds {
    /// The embedded defaults ([`LINGER_FOR`], [`LINGER_BYTES`]).
    pub const DEFAULT: LingerBounds = LingerBounds {
        wait: LINGER_FOR,
        bytes: LINGER_BYTES,
    };

    /// Whether these bounds turn lingering off.
    pub fn off(self) -> bool {
        self.wait.is_zero() || self.bytes == 0
    }
}

/// `[proxy] linger_timeout_secs` (0 or 1..=60) and `linger_max_bytes` (0 or 1..=1 GiB);
/// either 0 turns lingering off.
fn linger_bounds(p: &mut Problems, secs: Option<u64>, bytes: Option<u64>) -> LingerBounds {
    let secs = p.zero_or_within(
        "proxy.linger_timeout_secs",
        secs,
        LINGER_FOR.as_secs(),
        (1, 60),
        ("no lingering", " seconds"),
    );
    let bytes = p.zero_or_within(
        "proxy.linger_max_bytes",
        bytes,
        LINGER_BYTES,
        (1, 1 << 30),
        ("no lingering", " bytes"),
    );
    LingerBounds {
        wait: Duration::from_secs(secs),
        bytes,
    }
}

/// One side's h2 buffers: what a peer may send ahead on a stream and on a connection before
/// sealgate's reader takes it (the flow-control windows sealgate advertises), and what sealgate
/// queues on one stream for a peer that is not taking it.
///
/// Invariant: what one stream holds while its reader on the other side does not read is
/// bounded by these — a window's bytes (measured: about twice that in memory) and a send
/// buffer — and so is what one connection holds, by its connection window. Throughput of one
/// stream is at most its window per round trip to the peer (ARCHITECTURE.md, "h2 windows").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct H2Buffers {
    /// `SETTINGS_INITIAL_WINDOW_SIZE`: bytes a peer may send on one stream ahead of sealgate.
    pub stream_window: u32,
    /// The connection window: bytes a peer may send on all streams together ahead of sealgate
    /// (never below h2's initial 65,535).
    pub connection_window: u32,
    /// Bytes queued on one stream for a peer whose window or socket is full.
    pub send_buffer: usize,
}

impl H2Buffers {
    /// `[proxy]`'s defaults: the sandbox is on this host, so small windows cost its uploads
    /// nothing measurable (a round trip of microseconds).
    pub const PROXY: H2Buffers = H2Buffers {
        stream_window: 256 << 10,
        connection_window: 1 << 20,
        send_buffer: 128 << 10,
    };
    /// `[upstream]`'s defaults: 1 MiB per stream gave ~35 MB/s at a 20 ms round trip; a sandbox
    /// that stops reading holds about twice it per stream (hyper's defaults, 2 MiB and 5 MiB,
    /// held ~4.6 MB per stream).
    pub const UPSTREAM: H2Buffers = H2Buffers {
        stream_window: 1 << 20,
        connection_window: 4 << 20,
        send_buffer: 256 << 10,
    };
}

/// `[proxy]` or `[upstream]` `h2_stream_window_bytes` (16 KiB..=1 GiB),
/// `h2_connection_window_bytes` (65,535, h2's initial connection window, ..=1 GiB) and
/// `h2_send_buffer_bytes` (16 KiB..=64 MiB).
fn h2_buffers(
    p: &mut Problems,
    section: &str,
    (stream, connection, send): (Option<u32>, Option<u32>, Option<usize>),
    default: H2Buffers,
) -> H2Buffers {
    let mut window = |key: &str, value: Option<u32>, default: u32, min: usize| {
        let v = p.count_from(
            &format!("{section}.{key}"),
            value.map(|v| v as usize),
            default as usize,
            min,
            1 << 30,
        );
        u32::try_from(v).unwrap_or(default)
    };
    let stream_window = window(
        "h2_stream_window_bytes",
        stream,
        default.stream_window,
        16 << 10,
    );
    let connection_window = window(
        "h2_connection_window_bytes",
        connection,
        default.connection_window,
        65_535,
    );
    let send_buffer = p.count_from(
        &format!("{section}.h2_send_buffer_bytes"),
        send,
        default.send_buffer,
        16 << 10,
        64 << 20,
    );
    H2Buffers {
        stream_window,
        connection_window,
        send_buffer,
    }
}

impl RawUpstream {
    fn validate(self, p: &mut Problems) -> UpstreamConfig {
        let ca_files = p.files("upstream.ca_files", self.ca_files);
        let mut resolve = BTreeMap::new();
        for (host, addr) in self.resolve.unwrap_or_default() {
            let key = format!("upstream.resolve.\"{host}\"");
            let Ok(h) = crate::policy::normalise_host(&host) else {
                p.0.push(format!("{key}: '{host}' is not a valid host name"));
                continue;
            };
            match addr.parse::<SocketAddr>() {
                Ok(a) => {
                    resolve.insert(h.to_string(), a);
                }
                Err(_) => {
                    p.0.push(format!("{key}: '{addr}' is not an ip:port socket address"))
                }
            }
        }
        let mut allow_private_cidrs = Vec::new();
        for c in self.allow_private_cidrs.unwrap_or_default() {
            match c.parse::<IpNet>() {
                Ok(n) => allow_private_cidrs.push(n),
                Err(_) => {
                    p.0.push(format!("upstream.allow_private_cidrs: '{c}' is not a CIDR"))
                }
            }
        }
        let nameservers = self
            .nameservers
            .unwrap_or_default()
            .iter()
            .map(|n| p.addr("upstream.nameservers", Some(n.as_str()), "127.0.0.1:53"))
            .collect();
        UpstreamConfig {
            ca_files,
            resolve,
            allow_private_cidrs,
            nameservers,
            connect_timeout: p.secs(
                "upstream.connect_timeout_secs",
                self.connect_timeout_secs,
                10,
            ),
            response_timeout: p.secs(
                "upstream.response_timeout_secs",
                self.response_timeout_secs,
                300,
            ),
            pool_idle_timeout: p.secs(
                "upstream.pool_idle_timeout_secs",
                self.pool_idle_timeout_secs,
                90,
            ),
            pool_max_idle_per_host: p.count(
                "upstream.pool_max_idle_per_host",
                self.pool_max_idle_per_host,
                256,
                10_000,
            ),
            max_connections_per_sandbox: p.count(
                "upstream.max_connections_per_sandbox",
                self.max_connections_per_sandbox,
                512,
                1_000_000,
            ),
            max_connections: p.count(
                "upstream.max_connections",
                self.max_connections,
                8192,
                1 << 20,
            ),
            max_window_decoders: p.count(
                "upstream.max_window_decoders",
                self.max_window_decoders,
                32,
                1 << 16,
            ),
            max_window_decoders_per_sandbox: p.count(
                "upstream.max_window_decoders_per_sandbox",
                self.max_window_decoders_per_sandbox,
                4,
                1 << 16,
            ),
            max_response_codings: p.count(
                "upstream.max_response_codings",
                self.max_response_codings,
                4,
                16,
            ),
            max_grpc_message_bytes: p.count(
                "upstream.max_grpc_message_bytes",
                self.max_grpc_message_bytes,
                4 << 20,
                64 << 20,
            ),
            max_response_header_bytes: p.count_from(
                "upstream.max_response_header_bytes",
                self.max_response_header_bytes,
                64 << 10,
                8 << 10,
                1 << 20,
            ),
            max_response_header_fields: p.count_from(
                "upstream.max_response_header_fields",
                self.max_response_header_fields,
                100,
                16,
                10_000,
            ),
            h2: h2_buffers(
                p,
                "upstream",
                (
                    self.h2_stream_window_bytes,
                    self.h2_connection_window_bytes,
                    self.h2_send_buffer_bytes,
                ),
                H2Buffers::UPSTREAM,
            ),
        }
    }
}

/// `proxy.busy_poll_us` when absent: windows of up to 200 µs cover a round trip to an origin
/// on the same network and a client's next request on a keep-alive connection
/// (`benches/records/2026-12-03-session17-busy-poll.md`).
pub const DEFAULT_BUSY_POLL_US: u64 = 200;
/// `proxy.busy_poll_us` when not 0: from 20 µs (a first window of 5 µs, below which polling
/// catches nothing) to 1 ms (a longer window would only catch gaps that polling does not
/// usefully shorten, at a cost in CPU).
const BUSY_POLL_RANGE_US: (u64, u64) = (20, 1_000);

/// `[sandbox] run_as` value giving each isolated sandbox a user of its own.
pub const PER_SANDBOX: &str = "per-sandbox";
/// Default `[sandbox] uid_base` (0x70000000: above the ranges systemd and container runtimes
/// hand out by default, below 2^31).
pub const UID_BASE: u64 = 0x7000_0000;
/// Largest `uid_base`: the range (one id per namespace slot, 32768 at most) stays below 2^31.
const MAX_UID_BASE: u64 = (1 << 31) - (1 << 15) - 1;

impl RawSandbox {
    /// `memory_max_mib` (at least 16: bwrap and a shell), `pids_max` (at least 8: the
    /// launcher's own processes), `disk_max_mib`.
    fn limits(&self, p: &mut Problems) -> crate::limits::Limits {
        const MIB: u64 = 1 << 20;
        let memory = p.limit(
            "sandbox.memory_max_mib",
            self.memory_max_mib,
            2048,
            (16, 1 << 24),
        );
        let disk = p.limit(
            "sandbox.disk_max_mib",
            self.disk_max_mib,
            1024,
            (1, 1 << 24),
        );
        if let (Some(m), Some(d)) = (memory, disk) {
            if d.saturating_mul(5) / 4 >= m {
                p.0.push(format!(
                    "sandbox.disk_max_mib: {d} MiB of files would fill sandbox.memory_max_mib = \
                     {m} (a sandbox's files are in memory, about 1.25 × disk_max_mib with their \
                     inodes, and a sandbox whose files fill its memory has every command killed): \
                     keep memory_max_mib above 1.25 × disk_max_mib, or set either to 0"
                ));
            }
        }
        crate::limits::Limits {
            memory_bytes: memory.map(|m| m * MIB),
            pids: p.limit("sandbox.pids_max", self.pids_max, 1024, (8, 1 << 22)),
            disk_bytes: disk.map(|d| d * MIB),
        }
    }

    fn validate(self, p: &mut Problems) -> SandboxConfig {
        let limits = self.limits(p);
        let max_timeout = p.secs("sandbox.max_timeout_secs", self.max_timeout_secs, 86400);
        let default_timeout = p.secs(
            "sandbox.default_timeout_secs",
            self.default_timeout_secs,
            3600,
        );
        if default_timeout > max_timeout {
            p.0.push("sandbox.default_timeout_secs: larger than sandbox.max_timeout_secs".into());
        }
        let max_command_timeout = p.secs(
            "sandbox.max_command_timeout_secs",
            self.max_command_timeout_secs,
            3600,
        );
        let command_timeout = p.secs(
            "sandbox.command_timeout_secs",
            self.command_timeout_secs,
            60,
        );
        if command_timeout > max_command_timeout {
            p.0.push(
                "sandbox.command_timeout_secs: larger than sandbox.max_command_timeout_secs".into(),
            );
        }
        let uid_base = self.uid_base.unwrap_or(UID_BASE);
        if !(1000..=MAX_UID_BASE).contains(&uid_base) {
            p.0.push(format!(
                "sandbox.uid_base: {uid_base} is out of range (1000..={MAX_UID_BASE}: the range \
                 holds 32768 ids below 2^31)"
            ));
        }
        let run_as = self.run_as.unwrap_or_else(|| PER_SANDBOX.into());
        if run_as.is_empty() || run_as.starts_with('-') || run_as.contains(char::is_whitespace) {
            p.0.push(format!(
                "sandbox.run_as: '{run_as}' is not a user name or number"
            ));
        }
        SandboxConfig {
            run_as,
            uid_base: uid_base.min(MAX_UID_BASE) as u32,
            commands: self.commands.unwrap_or(true),
            netlink: self.netlink.unwrap_or(false),
            command_timeout,
            max_command_timeout,
            max_output_bytes: p.count(
                "sandbox.max_output_bytes",
                self.max_output_bytes,
                1 << 20,
                1 << 30,
            ),
            output_drain_bytes_per_sec: p.count_from(
                "sandbox.output_drain_bytes_per_sec",
                self.output_drain_bytes_per_sec,
                16 << 20,
                1 << 20,
                1 << 34,
            ),
            max_commands: p.count(
                "sandbox.max_commands_per_sandbox",
                self.max_commands_per_sandbox,
                8,
                1024,
            ),
            limits,
            max_open_files: p.limit(
                "sandbox.max_open_files",
                self.max_open_files,
                1024,
                (64, 1 << 20),
            ),
            flows: crate::limits::Flows {
                max: p
                    .limit("sandbox.max_flows", self.max_flows, 1024, (16, 1_000_000))
                    .map(|v| v as u32),
                new_per_sec: p
                    .limit(
                        "sandbox.max_new_flows_per_sec",
                        self.max_new_flows_per_sec,
                        500,
                        (1, 100_000),
                    )
                    .map(|v| v as u32),
            },
            dns_per_sec: p
                .limit(
                    "sandbox.max_dns_queries_per_sec",
                    self.max_dns_queries_per_sec,
                    1000,
                    (1, 1_000_000),
                )
                .map(|v| v as u32),
            default_timeout,
            max_timeout,
            leaf_cache_capacity: p.count(
                "sandbox.leaf_cache_capacity",
                self.leaf_cache_capacity,
                10_000,
                10_000_000,
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_proxy_toml_matches_embedded_defaults() {
        let shipped = Config::parse(include_str!("../proxy.toml"), "proxy.toml").unwrap();
        let defaults = Config::default();
        assert_eq!(format!("{shipped:?}"), format!("{defaults:?}"));
    }

    /// Both sides' h2 buffers: the embedded defaults, a file's values, and each key named
    /// when out of range.
    #[test]
    fn h2_buffers_have_defaults_values_and_ranges() {
        let d = Config::default();
        assert_eq!(d.proxy.h2, H2Buffers::PROXY);
        assert_eq!(d.upstream.h2, H2Buffers::UPSTREAM);
        let set = Config::parse(
            "[proxy]\nh2_stream_window_bytes = 65536\nh2_connection_window_bytes = 65535\n\
             h2_send_buffer_bytes = 16384\n[upstream]\nh2_stream_window_bytes = 8388608\n\
             h2_connection_window_bytes = 16777216\nh2_send_buffer_bytes = 1048576\n",
            "t",
        )
        .unwrap();
        assert_eq!(
            (set.proxy.h2, set.upstream.h2),
            (
                H2Buffers {
                    stream_window: 65536,
                    connection_window: 65535,
                    send_buffer: 16384
                },
                H2Buffers {
                    stream_window: 8 << 20,
                    connection_window: 16 << 20,
                    send_buffer: 1 << 20
                }
            )
        );
        let err = Config::parse(
            "[proxy]\nh2_stream_window_bytes = 16383\nh2_connection_window_bytes = 65534\n\
             [upstream]\nh2_stream_window_bytes = 1073741825\nh2_send_buffer_bytes = 67108865\n",
            "t",
        )
        .unwrap_err()
        .to_string();
        for key in [
            "proxy.h2_stream_window_bytes: 16383 is out of range",
            "proxy.h2_connection_window_bytes: 65534 is out of range",
            "upstream.h2_stream_window_bytes: 1073741825 is out of range",
            "upstream.h2_send_buffer_bytes: 67108865 is out of range",
        ] {
            assert!(err.contains(key), "missing {key} in {err}");
        }
        let over = Config::parse("[upstream]\nh2_connection_window_bytes = 4294967296\n", "t")
            .unwrap_err()
            .to_string();
        assert!(
            over.contains("upstream.h2_connection_window_bytes"),
            "{over}"
        );
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let err = Config::parse("[proxy]\nlisten_addr = \"x\"\n", "t").unwrap_err();
        assert!(err.to_string().contains("proxy.listen_addr"), "{err}");
    }

    /// Unknown keys and values of the wrong type are each named by their dotted key, all at
    /// once and with the range checks of the rest (serde stops at the first; an outside
    /// review met `invalid type: string "many", expected usize` for a key three sections
    /// share).
    #[test]
    fn every_unknown_key_and_wrong_type_is_named_at_once() {
        let text = "bogus = 1\n[proxy]\nmax_connections = \"many\"\nlevle = 2\n\
                    [upstream]\nca_files = [1]\nmax_connections = -3\n\
                    [log]\nlevel = \"warning\"\n";
        let err = Config::parse(text, "t").unwrap_err().to_string();
        for needle in [
            "bogus: unknown field",
            "proxy.max_connections: invalid type: string \"many\"",
            "proxy.levle: unknown field",
            "upstream.ca_files[0]: invalid type",
            "upstream.max_connections: invalid value: integer `-3`",
            "log.level: 'warning' is not a level",
        ] {
            assert!(err.contains(needle), "{needle}: {err}");
        }
        assert!(!err.contains("\nin `"), "{err}");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = "[proxy]\nlisten = \"nope\"\non_disallowed_token = \"maybe\"\n\
                    [upstream]\nallow_private_cidrs = [\"10.0.0.0/99\"]\nresolve = { \"a.test\" = \"x\" }\n\
                    [log]\nformat = \"xml\"\n";
        let err = Config::parse(text, "t").unwrap_err().to_string();
        for key in [
            "proxy.listen",
            "proxy.on_disallowed_token",
            "allow_private_cidrs",
            "upstream.resolve",
            "log.format",
        ] {
            assert!(err.contains(key), "missing {key} in {err}");
        }
    }

    #[test]
    fn store_and_node_keys_are_validated() {
        let err = Config::parse(
            "[store]\nbackend = \"mysql\"\nmax_staleness_secs = 999999999\n[node]\nid = \"a b\"\n",
            "t",
        )
        .unwrap_err()
        .to_string();
        for key in ["store.backend", "store.max_staleness_secs", "node.id"] {
            assert!(err.contains(key), "missing {key} in {err}");
        }
        let cfg = Config::parse(
            "[store]\nbackend = \"postgres\"\nurl = \"postgres://sg:hunter2-PW@db.internal/sealgate\"\n\
             max_staleness_secs = 30\n[node]\nid = \"node-a\"\n",
            "t",
        )
        .unwrap();
        assert_eq!(cfg.store.backend, Backend::Postgres);
        assert_eq!(cfg.store.max_staleness, Some(Duration::from_secs(30)));
        assert_eq!(cfg.node_id.as_deref(), Some("node-a"));
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("hunter2-PW"), "{shown}");
        assert!(shown.contains("db.internal"), "{shown}");
    }

    #[test]
    fn listeners_sharing_a_port_are_named() {
        let err = Config::parse(
            "[admin]\nlisten = \"127.0.0.1:3128\"\n[proxy]\nlisten = \"0.0.0.0:3128\"\n",
            "t",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains(
                "admin.listen (127.0.0.1:3128) and proxy.listen (0.0.0.0:3128) share a port"
            ),
            "{err}"
        );
        let err = Config::parse(
            "[proxy]\nlisten = \"[::]:4000\"\ntransparent_listen = \"127.0.0.1:4000\"\n",
            "t",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("proxy.transparent_listen"), "{err}");
        // Other families, other addresses of one family, and port 0 never collide.
        for ok in [
            "[admin]\nlisten = \"[::1]:4000\"\n[proxy]\nlisten = \"0.0.0.0:4000\"\n",
            "[admin]\nlisten = \"127.0.0.2:4000\"\n[proxy]\nlisten = \"127.0.0.1:4000\"\n",
            "[admin]\nlisten = \"127.0.0.1:0\"\n[proxy]\nlisten = \"0.0.0.0:0\"\n",
        ] {
            Config::parse(ok, "t").unwrap();
        }
    }

    #[test]
    fn nameservers_are_socket_addresses() {
        let cfg = Config::parse("[upstream]\nnameservers = [\"127.0.0.1:5353\"]\n", "t").unwrap();
        assert_eq!(
            cfg.upstream.nameservers,
            vec!["127.0.0.1:5353".parse().unwrap()]
        );
        let err = Config::parse("[upstream]\nnameservers = [\"127.0.0.1\"]\n", "t").unwrap_err();
        assert!(err.to_string().contains("upstream.nameservers"), "{err}");
    }

    #[test]
    fn unknown_log_levels_are_rejected() {
        let err = Config::parse("[log]\nlevel = \"warning\"\n", "t")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(
                "log.level: 'warning' is not a level (trace, debug, info, warn, error, off)"
            ),
            "{err}"
        );
        assert!(Config::parse("[log]\nlevel = \"warn,sealgate=debug\"\n", "t").is_ok());
    }

    #[test]
    fn busy_poll_defaults_to_200_us_zero_is_off_and_it_is_bounded() {
        assert_eq!(
            Config::default().proxy.busy_poll,
            Duration::from_micros(200)
        );
        let cfg = Config::parse("[proxy]\nbusy_poll_us = 0\n", "t").unwrap();
        assert_eq!(cfg.proxy.busy_poll, Duration::ZERO);
        let cfg = Config::parse("[proxy]\nbusy_poll_us = 50\n", "t").unwrap();
        assert_eq!(cfg.proxy.busy_poll, Duration::from_micros(50));
        for bad in [19, 1001] {
            let err = Config::parse(&format!("[proxy]\nbusy_poll_us = {bad}\n"), "t")
                .unwrap_err()
                .to_string();
            let said =
                format!("proxy.busy_poll_us: {bad} is out of range (0 = off, or 20..=1000 µs)");
            assert!(err.contains(&said), "{err}");
        }
    }

    #[test]
    fn lingering_defaults_to_2_s_and_16_mib_zero_is_off_and_it_is_bounded() {
        use super::LingerBounds as Bounds;
        assert_eq!(Config::default().proxy.linger, Bounds::DEFAULT);
        let cfg = Config::parse(
            "[proxy]\nlinger_timeout_secs = 5\nlinger_max_bytes = 4096\n",
            "t",
        )
        .unwrap();
        let five = Bounds {
            wait: Duration::from_secs(5),
            bytes: 4096,
        };
        assert_eq!(cfg.proxy.linger, five);
        for off in ["linger_timeout_secs = 0", "linger_max_bytes = 0"] {
            let cfg = Config::parse(&format!("[proxy]\n{off}\n"), "t").unwrap();
            assert!(cfg.proxy.linger.off(), "{off}");
        }
        let err = Config::parse(
            "[proxy]\nlinger_timeout_secs = 61\nlinger_max_bytes = 1073741825\n",
            "t",
        )
        .unwrap_err()
        .to_string();
        for said in [
            "proxy.linger_timeout_secs: 61 is out of range (0 = no lingering, or 1..=60 seconds)",
            "proxy.linger_max_bytes: 1073741825 is out of range (0 = no lingering, or 1..=1073741824 bytes)",
        ] {
            assert!(err.contains(said), "{err}");
        }
    }

    #[test]
    fn a_header_limit_no_request_fits_is_refused() {
        let err = Config::parse("[proxy]\nmax_header_bytes = 10\n", "t")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("proxy.max_header_bytes: 10 is out of range (1024..=1048576)"),
            "{err}"
        );
        assert!(Config::parse("[proxy]\nmax_header_bytes = 1024\n", "t").is_ok());
    }

    /// Values count against the budget in whole KiB: a budget under one would refuse every
    /// token, so it is refused at start with the range, not met with 413s.
    #[test]
    fn an_unsealed_budget_below_one_kib_is_refused() {
        let err = Config::parse("[proxy]\nmax_unsealed_bytes = 512\n", "t")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("proxy.max_unsealed_bytes: 512 is out of range (1024..=1073741824)"),
            "{err}"
        );
        let cfg = Config::parse("[proxy]\nmax_unsealed_bytes = 1024\n", "t").unwrap();
        assert_eq!(cfg.proxy.max_unsealed_bytes, 1024);
    }

    #[test]
    fn worker_threads_default_to_the_core_count_and_are_bounded() {
        assert_eq!(
            Config::default().proxy.worker_threads,
            0,
            "0 = one per core"
        );
        let cfg = Config::parse("[proxy]\nworker_threads = 3\n", "t").unwrap();
        assert_eq!(cfg.proxy.worker_threads, 3);
        let err = Config::parse("[proxy]\nworker_threads = 5000\n", "t")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("proxy.worker_threads: 5000 is out of range (0..=1024"),
            "{err}"
        );
    }

    #[test]
    fn zero_limits_are_rejected() {
        let err = Config::parse(
            "[proxy]\nmax_header_bytes = 0\nidle_timeout_secs = 0\n",
            "t",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("proxy.max_header_bytes") && err.contains("proxy.idle_timeout_secs"),
            "{err}"
        );
    }

    #[test]
    fn sandbox_resource_limits_default_on_turn_off_with_zero_and_are_bounded() {
        let l = Config::parse("", "t").unwrap().sandbox.limits;
        assert_eq!(
            (l.memory_bytes, l.pids, l.disk_bytes),
            (Some(2048 << 20), Some(1024), Some(1024 << 20))
        );
        let off = "[sandbox]\nmemory_max_mib = 0\npids_max = 0\ndisk_max_mib = 0\n";
        let l = Config::parse(off, "t").unwrap().sandbox.limits;
        assert_eq!(l, crate::limits::Limits::default());
        assert!(!l.needs_cgroup());
        let err = Config::parse("[sandbox]\nmemory_max_mib = 8\npids_max = 2\n", "t")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("sandbox.memory_max_mib: 8 is out of range (0 = no limit, or 16..=")
                && err.contains("sandbox.pids_max: 2"),
            "{err}"
        );
        let err = Config::parse("[sandbox]\nmemory_max_mib = 1024\n", "t")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(
                "sandbox.disk_max_mib: 1024 MiB of files would fill sandbox.memory_max_mib = 1024"
            ),
            "{err}"
        );
        Config::parse("[sandbox]\nmemory_max_mib = 1024\ndisk_max_mib = 0\n", "t").unwrap();
    }

    #[test]
    fn output_past_the_cap_drains_at_16_mib_a_second_and_no_slower_than_one() {
        let s = Config::parse("", "t").unwrap().sandbox;
        assert_eq!(s.output_drain_bytes_per_sec, 16 << 20);
        let s = Config::parse("[sandbox]\noutput_drain_bytes_per_sec = 1048576\n", "t").unwrap();
        assert_eq!(s.sandbox.output_drain_bytes_per_sec, 1 << 20);
        let err = Config::parse("[sandbox]\noutput_drain_bytes_per_sec = 1\n", "t")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("sandbox.output_drain_bytes_per_sec: 1 is out of range (1048576..="),
            "{err}"
        );
    }

    #[test]
    fn header_field_limit_defaults_to_hypers_and_is_configurable() {
        let cfg = Config::parse("", "t").unwrap();
        assert_eq!(cfg.proxy.max_header_fields, 100);
        let cfg = Config::parse("[proxy]\nmax_header_fields = 40\n", "t").unwrap();
        assert_eq!(cfg.proxy.max_header_fields, 40);
        let err = Config::parse("[proxy]\nmax_header_fields = 0\n", "t").unwrap_err();
        assert!(err.to_string().contains("proxy.max_header_fields"), "{err}");
        assert_eq!(cfg.upstream.max_response_header_fields, 100);
        let raised = "[upstream]\nmax_response_header_fields = 400\n";
        let cfg = Config::parse(raised, "t").unwrap();
        assert_eq!(cfg.upstream.max_response_header_fields, 400);
        for bad in [8, 10_001] {
            let text = format!("[upstream]\nmax_response_header_fields = {bad}\n");
            let err = Config::parse(&text, "t").unwrap_err().to_string();
            assert!(err.contains("upstream.max_response_header_fields"), "{err}");
        }
    }

    #[test]
    fn stores_are_reread_every_minute_by_default_and_it_is_bounded() {
        let cfg = Config::parse("", "t").unwrap();
        assert_eq!(cfg.store.reread, Duration::from_secs(60));
        let cfg = Config::parse("[store]\nreread_secs = 5\n", "t").unwrap();
        assert_eq!(cfg.store.reread, Duration::from_secs(5));
        let err = Config::parse("[store]\nreread_secs = 0\n", "t").unwrap_err();
        assert!(err.to_string().contains("store.reread_secs"), "{err}");
    }
}
