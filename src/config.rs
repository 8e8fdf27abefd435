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
    /// The file is not valid TOML or has unknown keys / wrong types.
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
}

/// `[admin]`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RawAdmin {
    /// Admin API listen address.
    pub listen: Option<String>,
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
    /// Count.
    pub max_connections: Option<usize>,
    /// Count.
    pub max_tunnels_per_sandbox: Option<usize>,
    /// Count.
    pub max_h2_streams: Option<u32>,
    /// Seconds.
    pub shutdown_grace_secs: Option<u64>,
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
    /// Seconds.
    pub connect_timeout_secs: Option<u64>,
    /// Seconds.
    pub response_timeout_secs: Option<u64>,
    /// Seconds.
    pub pool_idle_timeout_secs: Option<u64>,
    /// Count.
    pub pool_max_idle_per_host: Option<usize>,
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

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Validated configuration. Paths are as written (relative to the working directory).
#[derive(Clone, Debug)]
pub struct Config {
    /// Database, master key and admin token live here.
    pub data_dir: PathBuf,
    /// Public CA certificates are written here.
    pub cert_dir: PathBuf,
    /// Admin API address.
    pub admin_listen: SocketAddr,
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
    /// Open client connections, all listeners.
    pub max_connections: usize,
    /// Concurrent intercepted connections per sandbox.
    pub max_tunnels_per_sandbox: usize,
    /// h2 concurrent streams per connection.
    pub max_h2_streams: u32,
    /// Graceful shutdown window.
    pub shutdown_grace: Duration,
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
    /// TCP + TLS connect deadline.
    pub connect_timeout: Duration,
    /// Response head deadline.
    pub response_timeout: Duration,
    /// Pool idle timeout.
    pub pool_idle_timeout: Duration,
    /// Pool size per host.
    pub pool_max_idle_per_host: usize,
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
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_owned(),
            message: e.to_string(),
        })?;
        raw.validate()
    }
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

    fn count(&mut self, key: &str, value: Option<usize>, default: usize, max: usize) -> usize {
        let v = value.unwrap_or(default);
        if v == 0 || v > max {
            self.0
                .push(format!("{key}: {v} is out of range (1..={max})"));
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
        if !p.0.is_empty() {
            return Err(ConfigError::Invalid(p.0));
        }
        Ok(Config {
            data_dir,
            cert_dir,
            admin_listen,
            proxy,
            upstream,
            sandbox,
            log_level,
            log_format,
            audit_path,
        })
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
            max_header_bytes: p.count(
                "proxy.max_header_bytes",
                self.max_header_bytes,
                65536,
                1 << 20,
            ),
            max_connections: p.count("proxy.max_connections", self.max_connections, 4096, 1 << 20),
            max_tunnels_per_sandbox: p.count(
                "proxy.max_tunnels_per_sandbox",
                self.max_tunnels_per_sandbox,
                256,
                1 << 20,
            ),
            max_h2_streams: p.count(
                "proxy.max_h2_streams",
                self.max_h2_streams.map(|v| v as usize),
                100,
                10_000,
            ) as u32,
            shutdown_grace: p.secs("proxy.shutdown_grace_secs", self.shutdown_grace_secs, 30),
        }
    }
}

impl RawUpstream {
    fn validate(self, p: &mut Problems) -> UpstreamConfig {
        let ca_files: Vec<PathBuf> = self
            .ca_files
            .unwrap_or_default()
            .into_iter()
            .map(PathBuf::from)
            .collect();
        for f in &ca_files {
            if !f.is_file() {
                p.0.push(format!(
                    "upstream.ca_files: '{}' is not a readable file",
                    f.display()
                ));
            }
        }
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
        UpstreamConfig {
            ca_files,
            resolve,
            allow_private_cidrs,
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
                32,
                10_000,
            ),
        }
    }
}

impl RawSandbox {
    fn validate(self, p: &mut Problems) -> SandboxConfig {
        let max_timeout = p.secs("sandbox.max_timeout_secs", self.max_timeout_secs, 86400);
        let default_timeout = p.secs(
            "sandbox.default_timeout_secs",
            self.default_timeout_secs,
            3600,
        );
        if default_timeout > max_timeout {
            p.0.push("sandbox.default_timeout_secs: larger than sandbox.max_timeout_secs".into());
        }
        SandboxConfig {
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

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let err = Config::parse("[proxy]\nlisten_addr = \"x\"\n", "t").unwrap_err();
        assert!(err.to_string().contains("listen_addr"), "{err}");
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
}
