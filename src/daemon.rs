//! `sealgate serve`: open the store, restore sandboxes, bind every listener, run until a
//! shutdown signal, then drain.
//!
//! Invariant: listeners are bound before the sandboxes' proxy URLs are computed (port 0 works),
//! and the store is opened — with the master-key check — before anything listens. The data
//! directory is locked ([`crate::data_dir_lock`]) before the store is opened: one daemon per `data_dir`.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};

use crate::admin::{self, AdminState, AdminToken};
use crate::audit::{AdminEvent, Audit};
use crate::ca::LeafCache;
use crate::config::{Backend, Config};
use crate::data_dir_lock;
use crate::isolation::Isolation;
use crate::metrics::Metrics;
use crate::nofile;
use crate::proxy::workers::Workers;
use crate::proxy::{self, ListenerKind, LiveSettings, ProxyState};
use crate::sandbox::lifecycle::{LifecycleConfig, SandboxError};
use crate::sandbox::Budget;
use crate::sandbox::{Registry, Sandboxes, Tombstones};
use crate::secret::SecretValue;
use crate::store::crypto::KeySource;
use crate::store::postgres::{self, DatabaseUrl, Follower, Health, NodeClaim, PgStore};
use crate::store::{Store, StoreError};

/// Startup failures (each message says what to fix).
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Filesystem problem.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// Master key problem.
    #[error(transparent)]
    Key(#[from] crate::store::crypto::CryptoError),
    /// Store problem (including a wrong master key).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Sandbox restore failed.
    #[error("restoring sandboxes: {0}")]
    Restore(#[from] crate::sandbox::SandboxError),
    /// Upstream TLS setup failed.
    #[error("upstream TLS: {0}")]
    Upstream(String),
    /// `[store]` cannot be used as configured.
    #[error("store: {0}")]
    StoreConfig(String),
    /// Another daemon uses this `data_dir`.
    #[error(transparent)]
    Lock(#[from] data_dir_lock::LockError),
    /// `[audit] path` names one of the daemon's own files.
    #[error("[audit] path: {0}")]
    AuditPath(String),
    /// The config file holds a secret but others may read it.
    #[error(
        "{path} holds a database password but is readable by group or others (mode {mode:o}): \
         chmod 600 it, or leave [store] url empty and pass SEALGATE_DATABASE_URL"
    )]
    ConfigReadable {
        /// The config file.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DaemonError {
    let what = what.into();
    move |source| DaemonError::Io { what, source }
}

/// Secrets that may come from the environment instead of files.
#[derive(Default, Clone)]
pub struct Overrides {
    /// `SEALGATE_MASTER_KEY` (base64).
    pub master_key: Option<String>,
    /// `SEALGATE_ADMIN_TOKEN`.
    pub admin_token: Option<String>,
    /// The config file, for reloads.
    pub config_path: Option<PathBuf>,
    /// `SEALGATE_DATABASE_URL` (used when `[store] url` is empty).
    pub database_url: Option<String>,
}

/// A running daemon.
pub struct Running {
    /// Admin API address.
    pub admin_addr: SocketAddr,
    /// Explicit proxy address.
    pub proxy_addr: SocketAddr,
    /// Transparent listener address, if enabled.
    pub transparent_addr: Option<SocketAddr>,
    /// Path of the admin token file (None when it came from the environment).
    pub admin_token_file: Option<PathBuf>,
    /// Where the master key came from.
    pub key_source: KeySource,
    /// The store's database: the SQLite file (absolute), or the PostgreSQL location with its
    /// password redacted (a URL or key=value words, as configured).
    pub db_path: PathBuf,
    /// Fleet mode: this node's id and its view of the shared database.
    pub fleet: Option<(String, Arc<Health>)>,
    /// Where sandbox CA certificates are written (absolute).
    pub cert_dir: PathBuf,
    /// Shared proxy state (tests and reload use it).
    pub proxy: Arc<ProxyState>,
    /// Sandbox service.
    pub sandboxes: Arc<Sandboxes>,
    /// Isolated sandboxes.
    pub isolation: Arc<Isolation>,
    admin_token: Arc<AdminToken>,
    shutdown: watch::Sender<bool>,
    tasks: tokio::task::JoinSet<()>,
    /// The proxy's worker threads (taken by [`Running::wait`]; dropping them stops them).
    workers: Option<Workers>,
    /// The open-file limit, raised at start (None if it could not be read).
    pub nofile: Option<nofile::Nofile>,
    /// Released when the daemon is dropped (after shutdown).
    _data_dir_lock: data_dir_lock::DataDirLock,
    /// Tells other daemons' sweeps that this one runs ([`crate::netns::daemons`]).
    _marker: Option<crate::netns::daemons::Marker>,
}

impl Running {
    /// The running admin bearer token (tests only need this; never logged).
    pub fn admin_token(&self) -> String {
        String::from_utf8_lossy(self.admin_token.current().expose()).into_owned()
    }

    /// The start-up summary, one `  name: value` line each (the one place it is written;
    /// `sealgate serve` prints it to stderr, scripts and tests read its lines).
    pub fn summary(&self) -> String {
        let mut out = format!("sealgate {} running\n", env!("SEALGATE_VERSION"));
        let mut line = |name: &str, value: String| out.push_str(&format!("  {name:<12} {value}\n"));
        line("admin API:", format!("http://{}", self.admin_addr));
        line("proxy:", self.proxy_addr.to_string());
        if let Some(t) = self.transparent_addr {
            line("transparent:", t.to_string());
        }
        line("database:", self.db_path.display().to_string());
        let certs = self.cert_dir.display();
        line(
            "CA certs:",
            format!("{certs} (sandboxes trust <sandbox-id>.pem)"),
        );
        line(
            "sandboxes:",
            format!("{} live", self.sandboxes.registry().len()),
        );
        line(
            "admin token:",
            match &self.admin_token_file {
                Some(p) => format!("{} (file)", absolute(p).display()),
                None => "from SEALGATE_ADMIN_TOKEN".into(),
            },
        );
        line("master key:", shown_key_source(&self.key_source));
        if let Some(n) = &self.nofile {
            line("open files:", n.describe());
        }
        line("allocator:", crate::alloc::describe());
        line(
            "isolation:",
            match crate::isolation::privileges::lacking() {
                None => "\"netns\" available".to_owned(),
                Some(why) => format!("\"netns\" refused: the daemon lacks {why}"),
            },
        );
        if let Some(w) = &self.workers {
            line("workers:", format!("{} (proxy.worker_threads)", w.len()));
            line(
                "busy poll:",
                match w.busy_poll().as_micros() {
                    0 => "off (proxy.busy_poll_us)".to_owned(),
                    us => format!("up to {us} µs after bytes moved (proxy.busy_poll_us)"),
                },
            );
        }
        out
    }

    /// Begins graceful shutdown: stop accepting; in-flight requests get `shutdown_grace`.
    pub fn begin_shutdown(&self) {
        self.proxy.stopping();
        let _ = self.shutdown.send(true);
    }

    /// Waits for every listener and background task to finish, then for in-flight
    /// connections to drain (each gets `shutdown_grace_secs` after shutdown began; one more
    /// second is the backstop before the rest are dropped), then for the audit log to take
    /// every queued line ([`AUDIT_STOP_WAIT`] at most). False when it did not.
    pub async fn wait(mut self) -> bool {
        while self.tasks.join_next().await.is_some() {}
        let workers = self.workers.take();
        if let Some(w) = &workers {
            w.accepting_ended().await;
        }
        let grace = self.proxy.settings().proxy.shutdown_grace;
        let left = self
            .proxy
            .drain(grace + std::time::Duration::from_secs(1))
            .await;
        if left > 0 {
            tracing::warn!(
                connections = left,
                "shutdown grace ran out; closing the remaining connections"
            );
        }
        if let Some(w) = workers {
            let _ = tokio::task::spawn_blocking(move || w.stop()).await;
        }
        let s = self.sandboxes.clone();
        let (pending, recorded) = tokio::task::spawn_blocking(move || s.settle_pending())
            .await
            .unwrap_or_default();
        let file = self
            .sandboxes
            .pending_deletions_file()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        if !pending.is_empty() && recorded {
            tracing::warn!(
                sandboxes = ?pending,
                %file,
                "sandboxes deleted while the store refused writes still have their rows: \
                 recorded in the file, so this node does not serve them when it starts; their \
                 rows are deleted then"
            );
        } else if !pending.is_empty() {
            tracing::error!(
                sandboxes = ?pending,
                %file,
                "sandboxes deleted while the store refused writes still have their rows, and \
                 the file could not be written either: this node serves them again when it \
                 starts; delete them again then"
            );
        }
        // Every request has ended: its audit line is queued; write them all out — within
        // AUDIT_STOP_WAIT: a stalled sink (a stopped reader, a hung mount) had the stop wait
        // for ever, a second signal too (outside pass).
        let audit = self.proxy.audit.clone();
        let flush = tokio::task::spawn_blocking(move || audit.flush());
        let flushed = tokio::time::timeout(AUDIT_STOP_WAIT, flush).await.is_ok();
        if !flushed {
            tracing::error!(
                wait_secs = AUDIT_STOP_WAIT.as_secs(),
                "the audit log did not take its last lines (a full or stalled disk, or a reader \
                 that stopped): exiting without them"
            );
        }
        flushed
    }

    /// Shuts down and waits; false when the audit log did not take its last lines (the caller
    /// must then exit without dropping the log: its writer is stuck in a write).
    pub async fn shutdown(self) -> bool {
        self.begin_shutdown();
        self.wait().await
    }
}

/// Refuses an `[audit] path` that is one of the daemon's own files — in `data_dir` the master
/// key, the admin token, the database and its journals, the lock, the deletion records; in
/// `cert_dir` a certificate; the configuration file. The first audit line appended to
/// `master.key` made the next start refuse the key (outside pass). Links are followed; a path
/// whose directory does not exist is left to the open, which names it.
fn check_audit_path(cfg: &Config, config_file: Option<&Path>) -> Result<(), DaemonError> {
    let Some(path) = &cfg.audit_path else {
        return Ok(());
    };
    let resolved = std::fs::canonicalize(path).ok().or_else(|| {
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
        let dir = std::fs::canonicalize(dir.unwrap_or(Path::new("."))).ok()?;
        Some(dir.join(path.file_name()?))
    });
    let (Some(resolved), Some(name)) = (
        resolved.as_deref(),
        resolved.as_deref().and_then(Path::file_name),
    ) else {
        return Ok(());
    };
    let name = name.to_string_lossy();
    let in_dir = |d: &Path| std::fs::canonicalize(d).is_ok_and(|d| resolved.parent() == Some(&*d));
    let own_data = [
        crate::store::crypto::KEY_FILE_NAME,
        ADMIN_TOKEN_FILE,
        data_dir_lock::LOCK_FILE,
        crate::sandbox::tombstones::FILE_NAME,
        crate::sandbox::tombstones::ISOLATED_FILE_NAME,
    ]
    .contains(&&*name)
        || name.starts_with(crate::store::sqlite::DB_FILE_NAME);
    let own_cert = name.ends_with(".pem") || name.ends_with(".pem.tmp");
    let config = config_file.and_then(|c| std::fs::canonicalize(c).ok());
    if (own_data && in_dir(&cfg.data_dir))
        || (own_cert && in_dir(&cfg.cert_dir))
        || config.as_deref() == Some(resolved)
    {
        return Err(DaemonError::AuditPath(format!(
            "{} is one of the daemon's own files (its configuration, or in data_dir or \
             cert_dir): choose another file, e.g. /var/log/sealgate/audit.log",
            path.display()
        )));
    }
    Ok(())
}

/// How long a stop waits for the audit log to take the lines still queued.
pub const AUDIT_STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Starts the daemon on `cfg`.
///
/// # Errors
/// Any [`DaemonError`]: nothing is left listening then.
pub async fn start(cfg: Config, ov: Overrides) -> Result<Running, DaemonError> {
    let signals = Signals {
        reload: crate::signals::Reload::install(),
        user: crate::signals::User::install(),
    };
    start_with(cfg, ov, signals).await
}

/// The daemon's signal handlers, installed by whoever calls [`start_with`] (`serve` installs
/// them before the start, so a signal sent while it runs waits for the daemon).
pub struct Signals {
    /// SIGHUP: reload.
    pub reload: crate::signals::Reload,
    /// SIGUSR1 (reopen the audit log) and SIGUSR2 (logged).
    pub user: crate::signals::User,
}

/// [`start`] with the signal handlers given.
///
/// # Errors
/// As [`start`].
pub async fn start_with(
    cfg: Config,
    ov: Overrides,
    signals: Signals,
) -> Result<Running, DaemonError> {
    let Signals { reload: hup, user } = signals;
    check_config_private(&cfg, ov.config_path.as_deref())?;
    prepare_dirs(&cfg)?;
    let data_dir_lock = data_dir_lock::lock(&cfg.data_dir)?;
    remove_stale_temps(&cfg.data_dir);
    let nofile = nofile::raise(nofile::need(&cfg))
        .inspect_err(|e| tracing::warn!(error = %e, "could not raise the open-file limit"))
        .ok();
    if let Err(e) = crate::core_dumps::forbid() {
        tracing::warn!(error = %e, "could not keep the daemon out of core dumps");
    }
    let opened = open_backend(&cfg, &ov)?;
    let (store, key_source) = (opened.store.clone(), opened.key_source.clone());
    let admin_token = Arc::new(admin_token(&cfg.data_dir, ov.admin_token.as_deref())?);
    let admin_token_file = admin_token.file().map(Path::to_path_buf);
    // Before any listener is bound: once the admin port answers, the host is clean.
    let ended = record_stale_isolated(&cfg)?;
    let rows = stored_sandboxes(&*store);
    let marker = crate::netns::daemons::Marker::write();
    sweep_namespaces(proxy_only_ids(rows, &ended)).await;
    let listeners = Listeners::bind(&cfg).await?;
    let node = opened.fleet.as_ref().map(|f| f.node.clone());
    let metrics = Arc::new(Metrics::new());
    // Current as of the start of the restore's reads, not of its end.
    let restore_began = std::time::Instant::now();
    let (sandboxes, restored, cert_dir) =
        restore_sandboxes(&cfg, store.clone(), listeners.proxy_addr, node, &metrics)?;
    if let Some(fleet) = &opened.fleet {
        fleet.health.restored(restore_began);
    }
    metrics.sandboxes.set(sandboxes.registry().len() as i64);
    check_audit_path(&cfg, ov.config_path.as_deref())?;
    let audit = Audit::open_counted(cfg.audit_path.clone(), metrics.audit_dropped.clone())
        .map_err(io_err(format!(
            "opening the audit log {} ([audit] path)",
            cfg.audit_path
                .as_deref()
                .unwrap_or(Path::new("-"))
                .display()
        )))?;
    let audit = Arc::new(audit);
    for (id, action) in sandboxes.take_ended_at_start() {
        audit.admin(&AdminEvent::sandbox_end(action, &id, "start"));
    }
    let workers = proxy::workers::count(cfg.proxy.worker_threads);
    let settings = LiveSettings::new(
        cfg.proxy.clone(),
        cfg.upstream.clone(),
        listeners.own(),
        workers,
        proxy::upstream::Counts {
            connections: Budget::in_gauge(metrics.upstream_connections.clone()),
            decoders: Default::default(),
        },
    )
    .map_err(DaemonError::Upstream)?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let proxy = ProxyState::new(
        sandboxes.registry().clone(),
        sandboxes.leaves().clone(),
        metrics.clone(),
        audit.clone(),
        settings,
        shutdown_rx.clone(),
    );
    let ended = Arc::downgrade(&proxy);
    sandboxes.on_end(move |sb| {
        if let Some(proxy) = ended.upgrade() {
            proxy.settings().drop_clients(sb);
        }
    });
    let isolation = start_isolation(&cfg, &ov, &sandboxes, &proxy)?;
    let (reload_tx, reload_rx) = mpsc::unbounded_channel();
    let admin_state = Arc::new(AdminState {
        store,
        sandboxes: sandboxes.clone(),
        isolation: isolation.clone(),
        admin_token: admin_token.clone(),
        metrics,
        audit: audit.clone(),
        reload: Some(reload_tx),
        ready: Default::default(),
        follower: opened.fleet.as_ref().map(|f| f.health.clone()),
    });
    let (admin_addr, proxy_addr, transparent_addr, own) = (
        listeners.admin_addr,
        listeners.proxy_addr,
        listeners.transparent_addr,
        listeners.own(),
    );
    let mut tasks = tokio::task::JoinSet::new();
    let workers = listeners.spawn(
        &mut tasks,
        &proxy,
        &admin_state,
        &shutdown_rx,
        workers,
        cfg.proxy.busy_poll,
    )?;
    tasks.spawn(sweep(
        sandboxes.clone(),
        isolation.clone(),
        audit.clone(),
        shutdown_rx.clone(),
    ));
    tasks.spawn(user_signals(user, audit.clone(), shutdown_rx.clone()));
    tasks.spawn(end_isolated_on_shutdown(
        isolation.clone(),
        audit.clone(),
        shutdown_rx.clone(),
    ));
    if let Some(fleet) = &opened.fleet {
        let follower = Follower {
            url: fleet.url.clone(),
            node: fleet.node.clone(),
            health: fleet.health.clone(),
            max_staleness: cfg.store.max_staleness,
            lag_gauge: admin_state.metrics.store_sync_lag.clone(),
            claim: fleet.claim.clone(),
            reread: cfg.store.reread,
        };
        tasks.spawn(follower.run(sandboxes.clone(), shutdown_rx.clone()));
    }
    tasks.spawn(reloads(
        ReloadAsks {
            hup,
            api: reload_rx,
        },
        proxy.clone(),
        admin_token.clone(),
        ov.config_path.clone(),
        cfg.clone(),
        own,
        shutdown_rx,
    ));
    let running = Running {
        admin_addr,
        proxy_addr,
        transparent_addr,
        admin_token_file,
        key_source,
        db_path: opened.location,
        fleet: opened
            .fleet
            .as_ref()
            .map(|f| (f.node.clone(), f.health.clone())),
        cert_dir,
        proxy,
        sandboxes,
        isolation,
        admin_token,
        shutdown: shutdown_tx,
        tasks,
        workers: Some(workers),
        nofile,
        _data_dir_lock: data_dir_lock,
        _marker: marker,
    };
    tracing::debug!(sandboxes_restored = restored, "sandboxes restored");
    warn_admin_exposed(admin_addr);
    warn_wide_private_cidrs(&cfg.upstream);
    warn_one_sandbox_fills(&cfg.proxy);
    warn_h2_windows(&cfg.proxy.h2, &cfg.upstream.h2);
    Ok(running)
}

/// Legal but rarely meant: the admin API (plain HTTP, one bearer token for every store)
/// reachable from beyond this host.
fn warn_admin_exposed(admin: SocketAddr) {
    if !admin.ip().is_loopback() {
        tracing::warn!(
            admin = %admin,
            "admin.listen is not a loopback address: the admin API speaks plain HTTP, so its \
             bearer token crosses the network in clear; keep it on loopback, or behind a \
             firewall and a TLS-terminating proxy"
        );
    }
}

/// Legal but rarely meant: a private-address exception as wide as a whole address family,
/// which lets sandboxes reach loopback, link-local (cloud metadata) and every private range.
fn warn_wide_private_cidrs(upstream: &crate::config::UpstreamConfig) {
    for net in upstream
        .allow_private_cidrs
        .iter()
        .filter(|n| n.prefix_len() == 0)
    {
        tracing::warn!(
            cidr = %net,
            "upstream.allow_private_cidrs admits every address of its family: sandboxes may \
             reach this host's loopback services and the cloud metadata address (sealgate's \
             own listeners stay refused)"
        );
    }
}

/// Legal but rarely meant: a daemon-wide connection cap that one sandbox's own cap reaches,
/// so one sandbox can hold every connection and lock the others out (outside review: with
/// `max_connections = 300` one sandbox left another 1 probe of 33).
fn warn_one_sandbox_fills(proxy: &crate::config::ProxyConfig) {
    if proxy.max_connections <= proxy.max_connections_per_sandbox {
        tracing::warn!(
            max_connections = proxy.max_connections,
            max_connections_per_sandbox = proxy.max_connections_per_sandbox,
            "proxy.max_connections is not above proxy.max_connections_per_sandbox: one sandbox \
             can hold every connection and lock the others out"
        );
    }
}

/// Legal but rarely meant: an h2 connection window below its stream window, so one stream
/// whose reader does not read holds the whole connection's window and every other stream of
/// that connection waits (review h50a).
fn warn_h2_windows(proxy: &crate::config::H2Buffers, upstream: &crate::config::H2Buffers) {
    for (side, h2) in [("proxy", proxy), ("upstream", upstream)] {
        if h2.connection_window < h2.stream_window {
            tracing::warn!(
                stream_window = h2.stream_window,
                connection_window = h2.connection_window,
                "{side}.h2_connection_window_bytes is below {side}.h2_stream_window_bytes: one \
                 stream whose reader does not read stops every other stream of its connection"
            );
        }
    }
}

/// The opened store and what start-up needs to know about it.
struct Opened {
    store: Arc<dyn Store>,
    key_source: KeySource,
    location: PathBuf,
    fleet: Option<Fleet>,
}

/// Fleet mode's parts (PostgreSQL backend).
struct Fleet {
    node: String,
    url: DatabaseUrl,
    health: Arc<Health>,
    claim: Arc<NodeClaim>,
}

/// The key source with an absolute path, as the summary's other paths are.
fn shown_key_source(source: &crate::store::crypto::KeySource) -> String {
    use crate::store::crypto::KeySource;
    match source {
        KeySource::Created(p) => KeySource::Created(absolute(p)),
        KeySource::Loaded(p) => KeySource::Loaded(absolute(p)),
        KeySource::Env => KeySource::Env,
    }
    .to_string()
}

/// `path` as an absolute path for the summary (the CA directory already is one).
fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}

/// Opens the configured backend, with the master-key check (and, for SQLite, the recovery of
/// an interrupted rotation).
fn open_backend(cfg: &Config, ov: &Overrides) -> Result<Opened, DaemonError> {
    if cfg.store.backend == Backend::Sqlite {
        let (store, key_source) =
            crate::rotate::open_store(&cfg.data_dir, ov.master_key.as_deref())?;
        if store.is_fresh() && matches!(key_source, KeySource::Loaded(_)) {
            tracing::warn!(
                database = %store.db_path().display(),
                key = %key_source,
                "the database was empty and is now initialised under an existing master key: \
                 if you meant to restore a backup, it is not there (a copy of sealgate.db \
                 without its -wal after a crash holds nothing; see docs/operations.md, Backups)"
            );
        }
        return Ok(Opened {
            location: absolute(store.db_path()),
            store: Arc::new(store),
            key_source,
            fleet: None,
        });
    }
    let url = database_url(cfg, ov)?;
    let node = cfg
        .node_id
        .clone()
        .unwrap_or_else(postgres::default_node_id);
    let (store, key_source) =
        crate::rotate::open_pg_store(&cfg.data_dir, ov.master_key.as_deref(), &url, &node)?;
    let claim = store.claim_node()?;
    tracing::info!(node = %node, database = %url, "fleet mode: shared PostgreSQL store");
    let store: Arc<PgStore> = Arc::new(store);
    let health = Arc::new(Health::watching(&node, claim.clone()));
    Ok(Opened {
        location: PathBuf::from(url.redacted()),
        store,
        key_source,
        fleet: Some(Fleet {
            node,
            url,
            health,
            claim,
        }),
    })
}

/// `[store] url`, else `SEALGATE_DATABASE_URL`, with `[store] ca_files`.
/// Also warns when both are set (the file wins), and when a SQLite database of an earlier
/// single-host life sits in `data_dir` (fleet mode never reads it).
fn database_url(cfg: &Config, ov: &Overrides) -> Result<DatabaseUrl, DaemonError> {
    let url = cfg
        .store
        .database_url(ov.database_url.as_deref())
        .map_err(DaemonError::StoreConfig)?;
    if cfg.store.url.is_some() && ov.database_url.as_deref().is_some_and(|u| !u.is_empty()) {
        tracing::warn!(
            database = %url,
            "both [store] url and SEALGATE_DATABASE_URL are set: using [store] url"
        );
    }
    let sqlite = cfg.data_dir.join(crate::store::sqlite::DB_FILE_NAME);
    if sqlite.exists() {
        tracing::warn!(
            file = %sqlite.display(),
            "fleet mode does not read this node's SQLite database: its stores, secrets and \
             sandboxes are not in the shared database (re-create them through the API)"
        );
    }
    Ok(url)
}

fn prepare_dirs(cfg: &Config) -> Result<(), DaemonError> {
    create_private_dir(&cfg.data_dir)?;
    let mode = crate::fsutil::create_public_dir(&cfg.cert_dir).map_err(io_err(format!(
        "creating cert_dir {}",
        cfg.cert_dir.display()
    )))?;
    if mode & 0o005 != 0o005 {
        tracing::warn!(
            cert_dir = %cfg.cert_dir.display(),
            mode = format!("{mode:o}"),
            "cert_dir is not readable by other users: a sandbox that runs as another user \
             cannot read its CA certificate (chmod 755 it)"
        );
    }
    Ok(())
}

/// Every listener, bound before anything that needs their real addresses (port 0 works).
struct Listeners {
    admin: TcpListener,
    admin_limits: admin::serve::Limits,
    proxy: TcpListener,
    transparent: Option<TcpListener>,
    admin_addr: SocketAddr,
    proxy_addr: SocketAddr,
    transparent_addr: Option<SocketAddr>,
}

impl Listeners {
    async fn bind(cfg: &Config) -> Result<Listeners, DaemonError> {
        let admin = bind(cfg.admin_listen, "admin.listen").await?;
        let proxy = bind(cfg.proxy.listen, "proxy.listen").await?;
        let transparent = match cfg.proxy.transparent_listen {
            Some(a) => Some(bind(a, "proxy.transparent_listen").await?),
            None => None,
        };
        Ok(Listeners {
            admin_limits: cfg.admin_limits,
            admin_addr: local(&admin)?,
            proxy_addr: local(&proxy)?,
            transparent_addr: transparent.as_ref().map(local).transpose()?,
            admin,
            proxy,
            transparent,
        })
    }

    /// The bound addresses the proxy must never dial.
    fn own(&self) -> Vec<SocketAddr> {
        [
            Some(self.admin_addr),
            Some(self.proxy_addr),
            self.transparent_addr,
        ]
        .into_iter()
        .flatten()
        .collect()
    }

    /// Starts the proxy's workers on the proxy listeners and the admin API on the runtime.
    fn spawn(
        self,
        tasks: &mut tokio::task::JoinSet<()>,
        proxy: &Arc<ProxyState>,
        admin: &Arc<AdminState>,
        shutdown: &watch::Receiver<bool>,
        workers: usize,
        busy_poll: std::time::Duration,
    ) -> Result<Workers, DaemonError> {
        let mut own = vec![(
            self.proxy.into_std().map_err(io_err("proxy.listen"))?,
            ListenerKind::Explicit,
        )];
        if let Some(l) = self.transparent {
            let l = l.into_std().map_err(io_err("proxy.transparent_listen"))?;
            own.push((l, ListenerKind::Transparent));
        }
        let workers = Workers::start(proxy, &own, workers, busy_poll)
            .map_err(io_err("starting the proxy workers (proxy.worker_threads)"))?;
        tasks.spawn(admin::serve::serve(
            admin::router(admin.clone()),
            self.admin,
            self.admin_limits,
            admin.admin_token.clone(),
            shutdown.clone(),
        ));
        Ok(workers)
    }
}

/// Builds the sandbox service and registers every stored session (same CA, same tokens).
/// Also returns the absolute `cert_dir`.
fn restore_sandboxes(
    cfg: &Config,
    store: Arc<dyn Store>,
    proxy_addr: SocketAddr,
    node: Option<String>,
    metrics: &Metrics,
) -> Result<(Arc<Sandboxes>, usize, PathBuf), DaemonError> {
    let cert_dir = std::fs::canonicalize(&cfg.cert_dir).map_err(io_err("resolving cert_dir"))?;
    let lifecycle = LifecycleConfig {
        cert_dir: cert_dir.clone(),
        proxy_public: public_authority(&cfg.proxy.public_host, proxy_addr.port()),
        default_timeout: cfg.sandbox.default_timeout,
        max_timeout: cfg.sandbox.max_timeout,
        node: node.clone(),
        tombstones: Tombstones::in_dir(&cfg.data_dir),
    };
    let registry = Arc::new(Registry::default());
    let leaves = Arc::new(LeafCache::with_counters(
        cfg.sandbox.leaf_cache_capacity,
        metrics.leaf.clone(),
    ));
    let sandboxes = Arc::new(Sandboxes::new(store, registry, leaves, lifecycle));
    let restored = sandboxes.restore()?;
    if node.is_none() {
        // A row holds the snapshot its sandbox was last given, sealed under the sandbox's id
        // only: one put back from a backup, or by a stale `-wal`, opened and served a rotated
        // value and a deleted secret again, invisibly (outside pass h38b). Every store's
        // current rows are applied before anything is served; an unchanged sandbox is left as
        // it is. A store deleted meanwhile leaves its sandboxes their snapshot (DESIGN §3); one
        // that fails its checks is quarantined and the others start.
        use crate::store::postgres::follow::Target;
        for store_id in sandboxes.watched_stores() {
            match sandboxes.catch_up(&store_id) {
                Ok(_)
                | Err(SandboxError::Store(StoreError::NotFound(_) | StoreError::Corrupt(_))) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    if node.is_some() {
        // Rows keep their creation snapshot (changes from other nodes are applied in memory):
        // bring every restored sandbox up to date before anything is served.
        use crate::store::postgres::follow::Target;
        // A store that fails its checks is quarantined (its sandboxes serve a locked copy)
        // and the others start: one tampered row must not keep every sandbox of the node down.
        for store_id in sandboxes.watched_stores() {
            match sandboxes.apply_store_change(&store_id) {
                Err(SandboxError::Store(StoreError::Corrupt(_))) => {}
                other => {
                    other?;
                }
            }
        }
    }
    Ok((sandboxes, restored, cert_dir))
}

fn create_private_dir(dir: &Path) -> Result<(), DaemonError> {
    if dir.is_dir() {
        return Ok(());
    }
    if std::fs::symlink_metadata(dir).is_ok() {
        let e = std::io::Error::other("it exists and is not a directory (or a link to one)");
        return Err(io_err(format!("data_dir {}", dir.display()))(e));
    }
    crate::fsutil::create_private_dir(dir)
        .map_err(io_err(format!("creating data_dir {}", dir.display())))
}

/// The admin token's file in `data_dir`.
const ADMIN_TOKEN_FILE: &str = "admin.token";

/// What a crash in the middle of replacing a file of `data_dir` left behind (litter, never
/// read: found from outside). Under the `data_dir` lock, so no other daemon is writing them.
fn remove_stale_temps(data_dir: &Path) {
    use crate::sandbox::tombstones::{FILE_NAME, ISOLATED_FILE_NAME};
    let key = data_dir.join(crate::store::crypto::KEY_FILE_NAME);
    let staged = crate::rotate::staged_key_path(&key);
    let files = [FILE_NAME, ISOLATED_FILE_NAME, ADMIN_TOKEN_FILE].map(|n| data_dir.join(n));
    for path in files.iter().chain([&key, &staged]) {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let removed = crate::fsutil::remove_stale_temps(path);
        if removed > 0 {
            tracing::info!(file = %name, removed, "removed temporary files a crash left");
        }
    }
}

/// The admin token: from the environment, else `data_dir/admin.token` (created 0600 when
/// missing; see [`admin::read_token_file`] for what an existing one must be).
fn admin_token(data_dir: &Path, env: Option<&str>) -> Result<AdminToken, DaemonError> {
    if let Some(t) = env.filter(|t| !t.is_empty()) {
        if t.trim().is_empty() {
            return Err(blank_token(
                "SEALGATE_ADMIN_TOKEN is blank: set a long random token or unset it",
            ));
        }
        // Trimmed like the file's: a header never carries the spaces around it.
        let t = t.trim();
        if let Some(why) = admin::unsendable_token(t) {
            return Err(blank_token(&format!(
                "SEALGATE_ADMIN_TOKEN holds {why}, which no client can send in an \
                 Authorization header: set one line of visible ASCII"
            )));
        }
        admin::warn_short_token(t, "SEALGATE_ADMIN_TOKEN");
        return Ok(AdminToken::new(
            SecretValue::new(t.as_bytes().to_vec()),
            None,
        ));
    }
    let path = data_dir.join(ADMIN_TOKEN_FILE);
    // Only a missing file is created: an unreadable one is the operator's to fix (a create
    // would fail with "File exists" and point at deleting it, rotating the token).
    if let Some(token) = admin::read_token_file(&path).map_err(io_err("admin token"))? {
        return Ok(AdminToken::new(token, Some(path)));
    }
    let token = crate::random::random_hex(32);
    crate::fsutil::replace_private_file_synced(&path, format!("{token}\n").as_bytes())
        .map_err(io_err(format!("creating {}", path.display())))?;
    Ok(AdminToken::new(
        SecretValue::new(token.into_bytes()),
        Some(path),
    ))
}

/// The refusal of a blank admin token (a start-up error, like an unreadable token file).
fn blank_token(why: &str) -> DaemonError {
    io_err("admin token")(std::io::Error::new(std::io::ErrorKind::InvalidData, why))
}

async fn bind(addr: SocketAddr, key: &str) -> Result<TcpListener, DaemonError> {
    TcpListener::bind(addr)
        .await
        .map_err(io_err(format!("binding {key} = {addr}")))
}

fn local(l: &TcpListener) -> Result<SocketAddr, DaemonError> {
    l.local_addr().map_err(io_err("reading listener address"))
}

/// Every 500 ms: ends the sandboxes whose time is up (each audited as `sandbox.expire`, so a
/// sandbox's life can be read from the audit log alone), retries pending row deletions, and
/// audits (`sandbox.end`, actor `reconcile`) and ends the isolation of those found deleted
/// elsewhere when the node got its id back ([`Sandboxes::reconcile_rows`]).
async fn sweep(
    sandboxes: Arc<Sandboxes>,
    isolation: Arc<Isolation>,
    audit: Arc<Audit>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let s = sandboxes.clone();
        if let Ok(ended) = tokio::task::spawn_blocking(move || s.sweep_expired()).await {
            for id in &ended {
                audit.admin(&AdminEvent::sandbox_end("sandbox.expire", id, "expiry"));
            }
            isolation.end(&ended).await;
        }
        let gone = sandboxes.take_ended_elsewhere();
        if !gone.is_empty() {
            for id in &gone {
                audit.admin(&AdminEvent::sandbox_end("sandbox.end", id, "reconcile"));
            }
            isolation.end(&gone).await;
        }
    }
}

/// The ids of the stored, unexpired sandboxes of this node. `None` when the rows cannot be
/// read (one that fails to authenticate fails them all, as does a database that is briefly
/// away): the sweep then keeps every chain, and the restore reports the rows.
fn stored_sandboxes(store: &dyn Store) -> Option<Vec<String>> {
    let rows = store
        .load_sandboxes()
        .inspect_err(|e| {
            tracing::warn!(error = %e, "could not read the stored sandboxes before the sweep: \
                every SG-* chain on the host is kept")
        })
        .ok()?;
    let now = time::OffsetDateTime::now_utc();
    Some(
        rows.into_iter()
            .filter(|row| row.expires_at > now)
            .map(|row| row.id)
            .collect(),
    )
}

/// Records as pending deletions ([`Tombstones`]) the sandboxes that were isolated in an earlier
/// run — listed in `data_dir/isolated-sandboxes`, named by a record whose owner is
/// dead, or owning a directory under `data_dir/sandboxes/` — before the sweep removes what
/// identifies them; then empties that list (none of them lives on). An outside test killed a
/// start in the middle of its sweep: the records and directories were gone, the rows not yet,
/// and the next start restored those sandboxes as proxy-only ones, credentials working. The
/// restore skips recorded ids and deletes their rows. Returns every recorded end.
fn record_stale_isolated(cfg: &Config) -> Result<HashSet<String>, DaemonError> {
    let roster = Tombstones::named(
        &cfg.data_dir,
        crate::sandbox::tombstones::ISOLATED_FILE_NAME,
    );
    let listed = roster.load()?;
    let dirs: Vec<String> = std::fs::read_dir(cfg.data_dir.join("sandboxes"))
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let dead = crate::netns::sweep::dead_record_sandboxes();
    // Not narrowed to the rows read before the sweep: that read may fail (a database blip)
    // where the restore's succeeds (review). An id without a row here costs one failed delete
    // at the restore (a node deletes only its own rows).
    let stale = listed
        .into_iter()
        .chain(dead)
        .chain(dirs)
        .filter(|id| crate::sandbox::is_sandbox_id(id));
    let ended = Tombstones::in_dir(&cfg.data_dir).add(stale)?;
    roster.save(&Default::default()).map_err(io_err(format!(
        "emptying {}",
        roster.path().unwrap_or(&cfg.data_dir).display()
    )))?;
    Ok(ended)
}

/// The stored, unexpired sandboxes that this daemon serves on (the ones whose hand-applied
/// rules the sweep keeps): not those whose end is `ended` (isolated in an earlier run, or
/// deleted while the store refused writes: their rows go at the restore, so their chains go
/// now; review: they were kept one more run).
fn proxy_only_ids(stored: Option<Vec<String>>, ended: &HashSet<String>) -> Option<Vec<String>> {
    Some(
        stored?
            .into_iter()
            .filter(|id| !ended.contains(id))
            .collect(),
    )
}

/// Undoes namespaces, veths and rules that daemons which died on this host left behind,
/// keeping the chains of the `live` sandboxes ([`crate::netns::sweep::sweep`]).
async fn sweep_namespaces(live: Option<Vec<String>>) {
    // Only a root daemon makes namespaces, rules and cgroups (packaging/isolation.conf). One
    // of another user reads none of the root-only records, so a live root daemon's sandboxes
    // looked like leftovers to it: "removing" lines for what it could not remove, and a
    // second of retries per cgroup at every start (outside pass).
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return;
    }
    let swept = tokio::task::spawn_blocking(move || crate::netns::sweep::sweep(live.as_deref()))
        .await
        .unwrap_or_default();
    if swept.records + swept.orphans > 0 {
        tracing::info!(
            records = swept.records,
            orphans = swept.orphans,
            "removed isolated sandboxes' leftovers of an earlier run"
        );
    }
}

/// Refuses a config file that holds a database password while group or others may read it
/// (a sandbox user on the host could read it; isolated sandboxes see it masked).
fn check_config_private(cfg: &Config, path: Option<&Path>) -> Result<(), DaemonError> {
    use std::os::unix::fs::PermissionsExt as _;
    let (Some(path), Some(url)) = (path, cfg.store.url.as_ref()) else {
        return Ok(());
    };
    if !url.has_password() {
        return Ok(());
    }
    let meta = std::fs::metadata(path).map_err(io_err(format!("reading {}", path.display())))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(DaemonError::ConfigReadable {
            path: path.display().to_string(),
            mode,
        });
    }
    Ok(())
}

/// Directories hidden inside every isolated sandbox besides `data_dir`: `cert_dir` (absolute),
/// unless `data_dir` holds it already or it is `/` (nothing would be left to run).
fn hidden_dirs(cfg: &Config, data_dir: &Path) -> Vec<PathBuf> {
    std::fs::canonicalize(&cfg.cert_dir)
        .into_iter()
        .filter(|c| !c.starts_with(data_dir) && c.parent().is_some())
        .collect()
}

/// The isolation service; ends the sandboxes an earlier run had isolated (they are not
/// restored: their namespaces and processes died with that run).
fn start_isolation(
    cfg: &Config,
    ov: &Overrides,
    sandboxes: &Arc<Sandboxes>,
    proxy: &Arc<ProxyState>,
) -> Result<Arc<Isolation>, DaemonError> {
    let data_dir = std::fs::canonicalize(&cfg.data_dir).map_err(io_err("resolving data_dir"))?;
    // The config file may hold a database password: masked inside every sandbox.
    let hidden = ov
        .config_path
        .iter()
        .filter_map(|p| std::fs::canonicalize(p).ok())
        .collect();
    let hidden_dirs = hidden_dirs(cfg, &data_dir);
    let isolation = Arc::new(Isolation::new(
        cfg.sandbox.clone(),
        data_dir,
        hidden,
        hidden_dirs,
        sandboxes.clone(),
        proxy.clone(),
    ));
    warn_if_file_table_small(&cfg.sandbox);
    let cleared = isolation.clear_stale_dirs();
    if cleared > 0 {
        tracing::info!(
            sandboxes = cleared,
            "removed the directories of isolated sandboxes of an earlier run (isolation is not \
             restored)"
        );
    }
    Ok(isolation)
}

/// Warns when one isolated sandbox could hold half of the host's file table (`fs.file-max`,
/// shared by every process on the host): its processes × their open-file limit. An outside
/// review filled the table from one sandbox, and other sandboxes' commands and unprivileged
/// host processes failed to start (root, and so the daemon, is exempt).
fn warn_if_file_table_small(s: &crate::config::SandboxConfig) {
    let (Some(pids), Some(files)) = (s.limits.pids, s.max_open_files) else {
        tracing::warn!(
            "sandbox.pids_max or sandbox.max_open_files is 0: one isolated sandbox can fill the \
             host's file table (fs.file-max)"
        );
        return;
    };
    let per_sandbox = pids.saturating_mul(files);
    match crate::nofile::host_file_max() {
        Some(max) if max / 2 < per_sandbox => tracing::warn!(
            file_max = max,
            per_sandbox,
            "one isolated sandbox may open sandbox.pids_max × sandbox.max_open_files files, more \
             than half of the host's file table (fs.file-max): raise fs.file-max (sysctl) or \
             lower those keys"
        ),
        _ => {}
    }
}

/// On shutdown every isolated sandbox ends: namespace, rules, processes and files go; each
/// is audited (`sandbox.end`, actor `shutdown`), so a sandbox's whole life is in the audit log
/// even if this `data_dir` never starts again.
async fn end_isolated_on_shutdown(
    isolation: Arc<Isolation>,
    audit: Arc<Audit>,
    mut shutdown: watch::Receiver<bool>,
) {
    let _ = shutdown.changed().await;
    isolation
        .shutdown(|id| audit.admin(&AdminEvent::sandbox_end("sandbox.end", id, "shutdown")))
        .await;
}

/// SIGUSR1 reopens the audit log (what logrotate snippets of other daemons send), nothing
/// else; SIGUSR2 is logged and changes nothing. Either had ended the daemon without the
/// drain (outside pass h39b).
async fn user_signals(
    mut user: crate::signals::User,
    audit: Arc<Audit>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let got = tokio::select! {
            s = user.recv() => s,
            _ = shutdown.changed() => return,
        };
        match got {
            crate::signals::UserSignal::Usr1 => match audit.reopen() {
                Ok(()) => tracing::info!(path = %audit.shown_path(), "SIGUSR1: audit log reopened"),
                Err(e) => tracing::warn!(
                    error = %e,
                    path = %audit.shown_path(),
                    "SIGUSR1: audit log reopen failed: lines go on into the file opened before"
                ),
            },
            crate::signals::UserSignal::Usr2 => tracing::warn!(
                "SIGUSR2 does nothing: SIGHUP reloads the configuration and reopens the audit \
                 log, SIGUSR1 reopens the audit log only"
            ),
        }
    }
}

type ReloadReply = oneshot::Sender<Result<admin::Reloaded, String>>;

/// Where reloads are asked for: SIGHUP, and the admin route's channel (which answers).
struct ReloadAsks {
    hup: crate::signals::Reload,
    api: mpsc::UnboundedReceiver<ReloadReply>,
}

async fn reloads(
    mut asks: ReloadAsks,
    proxy: Arc<ProxyState>,
    token: Arc<AdminToken>,
    path: Option<PathBuf>,
    running: Config,
    own: Vec<SocketAddr>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let reply = tokio::select! {
            r = asks.api.recv() => match r { Some(r) => Some(r), None => return },
            _ = asks.hup.recv() => None,
            _ = shutdown.changed() => return,
        };
        let outcome = reload_with_token(&proxy, &token, path.as_deref(), &running, &own);
        match &outcome {
            Ok(done) => tracing::info!(
                needs_restart = ?done.needs_restart,
                admin_token = done.token.as_str(),
                "configuration reloaded"
            ),
            Err(e) => tracing::warn!(
                error = %e,
                "reload refused; running configuration and admin token kept"
            ),
        }
        if matches!(&outcome, Ok(done) if done.token == admin::TokenReload::Replaced) {
            tracing::warn!(
                file = %token.file().map(Path::display).map(|d| d.to_string()).unwrap_or_default(),
                "admin token replaced from its file: the previous token no longer opens the admin API"
            );
        }
        if let Err(e) = proxy.audit.reopen() {
            tracing::warn!(
                error = %e,
                path = %proxy.audit.shown_path(),
                "audit log reopen failed: lines go on into the file opened before (rotated \
                 away?); the path must be creatable or writable by the daemon's user"
            );
        }
        match reply {
            Some(r) => {
                let _ = r.send(outcome); // the admin route writes its own audit line
            }
            None => audit_signal_reload(&proxy.audit, &outcome),
        }
    }
}

/// The audit lines of a reload a SIGHUP asked for (the admin route writes its own).
fn audit_signal_reload(audit: &Audit, outcome: &Result<admin::Reloaded, String>) {
    let line = |action, outcome| crate::audit::AdminEvent {
        action,
        store: None,
        store_name: None,
        secret: None,
        sandbox: None,
        actor: "signal:SIGHUP".into(),
        outcome,
    };
    audit.admin(&line(
        "config.reload",
        outcome.is_err().then_some("refused"),
    ));
    if matches!(outcome, Ok(done) if done.token == admin::TokenReload::Replaced) {
        audit.admin(&line("admin_token.replace", None));
    }
}

/// A reload: the admin token file and the config file are both read and checked before
/// either is applied, so a refusal of one keeps both as they ran. Without a config file
/// (embedded defaults) only the token file is re-read.
fn reload_with_token(
    proxy: &ProxyState,
    token: &AdminToken,
    path: Option<&Path>,
    running: &Config,
    own: &[SocketAddr],
) -> Result<admin::Reloaded, String> {
    let staged = token.stage()?;
    let needs_restart = match (path, &staged) {
        (None, Some(_)) => Vec::new(),
        _ => reload_once(proxy, path, running, own)?,
    };
    Ok(admin::Reloaded {
        needs_restart,
        token: token.install(staged),
    })
}

/// Re-reads the config file and applies what can change live. Returns the keys whose new
/// value differs from `running`, the configuration the daemon started with: those are applied
/// only by a restart, so they stay reported on every reload until the file matches again.
fn reload_once(
    proxy: &ProxyState,
    path: Option<&Path>,
    running: &Config,
    own: &[SocketAddr],
) -> Result<Vec<String>, String> {
    let Some(path) = path else {
        return Err(
            "no --config file was given and the admin token comes from SEALGATE_ADMIN_TOKEN; \
             nothing to reload"
                .into(),
        );
    };
    let new = Config::load(Some(path)).map_err(|e| e.to_string())?;
    let restart = needs_restart(running, &new);
    // The workers keep the count they started with (`worker_threads` needs a restart), and the
    // daemon's counts go on (the old settings' connections and bodies still hold slots).
    let old = proxy.settings();
    let (pools, counts) = (old.pools(), old.upstream.counts.clone());
    drop(old);
    let (proxy_cfg, upstream_cfg) = (new.proxy.clone(), new.upstream.clone());
    let live = LiveSettings::new(proxy_cfg, upstream_cfg, own.to_vec(), pools, counts)?;
    proxy.set_settings(live);
    warn_wide_private_cidrs(&new.upstream);
    warn_one_sandbox_fills(&new.proxy);
    crate::logging::set_level(&new.log_level);
    Ok(restart)
}

fn needs_restart(old: &Config, new: &Config) -> Vec<String> {
    macro_rules! changed {
        ($($key:literal => $($field:ident).+;)*) => {
            [$(($key, old.$($field).+ != new.$($field).+)),*]
        };
    }
    changed! {
        "data_dir" => data_dir;
        "cert_dir" => cert_dir;
        "admin.listen" => admin_listen;
        "admin.max_connections" => admin_limits.max_connections;
        "admin.header_read_timeout_secs" => admin_limits.header_read_timeout;
        "admin.body_read_timeout_secs" => admin_limits.body_read_timeout;
        "proxy.listen" => proxy.listen;
        "proxy.transparent_listen" => proxy.transparent_listen;
        "proxy.public_host" => proxy.public_host;
        "proxy.worker_threads" => proxy.worker_threads;
        "proxy.busy_poll_us" => proxy.busy_poll;
        "sandbox.leaf_cache_capacity" => sandbox.leaf_cache_capacity;
        "sandbox.default_timeout_secs" => sandbox.default_timeout;
        "sandbox.max_timeout_secs" => sandbox.max_timeout;
        "sandbox.run_as" => sandbox.run_as;
        "sandbox.commands" => sandbox.commands;
        "sandbox.netlink" => sandbox.netlink;
        "sandbox.command_timeout_secs" => sandbox.command_timeout;
        "sandbox.max_command_timeout_secs" => sandbox.max_command_timeout;
        "sandbox.max_output_bytes" => sandbox.max_output_bytes;
        "sandbox.output_drain_bytes_per_sec" => sandbox.output_drain_bytes_per_sec;
        "sandbox.max_commands_per_sandbox" => sandbox.max_commands;
        "sandbox.memory_max_mib" => sandbox.limits.memory_bytes;
        "sandbox.pids_max" => sandbox.limits.pids;
        "sandbox.disk_max_mib" => sandbox.limits.disk_bytes;
        "sandbox.uid_base" => sandbox.uid_base;
        "sandbox.max_open_files" => sandbox.max_open_files;
        "sandbox.max_flows" => sandbox.flows.max;
        "sandbox.max_new_flows_per_sec" => sandbox.flows.new_per_sec;
        "sandbox.max_dns_queries_per_sec" => sandbox.dns_per_sec;
        "log.format" => log_format;
        "store.backend" => store.backend;
        "store.max_staleness_secs" => store.max_staleness;
        "store.reread_secs" => store.reread;
        "store.url" => store.url;
        "store.ca_files" => store.ca_files;
        "node.id" => node_id;
        "audit.path" => audit_path;
    }
    .into_iter()
    .filter(|(_, changed)| *changed)
    .map(|(key, _)| key.to_owned())
    .collect()
}

/// `host:port` as it goes into the sandboxes' proxy URL: an IPv6 address in brackets
/// (`public_host = "::1"` and `"[::1]"` both give `[::1]:3128`).
fn public_authority(host: &str, port: u16) -> String {
    if host.parse::<std::net::Ipv6Addr>().is_ok() {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    /// Every key a reload does not apply is named: `[admin]` limits and four `[sandbox]` keys
    /// answered `needs_restart: []` although nothing applied them (outside pass).
    #[test]
    fn a_reload_names_every_key_it_does_not_apply() {
        let old = Config::parse("", "t").unwrap();
        let new = Config::parse(
            "[admin]\nmax_connections = 77\nheader_read_timeout_secs = 3\n\
             [sandbox]\nuid_base = 300000\nmax_open_files = 4096\nmax_flows = 2048\n\
             max_new_flows_per_sec = 64\n",
            "t",
        )
        .unwrap();
        assert_eq!(
            needs_restart(&old, &new),
            [
                "admin.max_connections",
                "admin.header_read_timeout_secs",
                "sandbox.uid_base",
                "sandbox.max_open_files",
                "sandbox.max_flows",
                "sandbox.max_new_flows_per_sec",
            ]
        );
    }

    fn with_mode(text: &str, mode: u32) -> (tempfile::TempDir, PathBuf, Config) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("proxy.toml");
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        let cfg = Config::load(Some(&path)).unwrap();
        (dir, path, cfg)
    }

    #[test]
    fn restart_keys_include_a_changed_database_password() {
        let pg = |pw: &str| {
            Config::parse(
                &format!("[store]\nbackend = \"postgres\"\nurl = \"postgres://u:{pw}@db/sg\"\n"),
                "test",
            )
            .unwrap()
        };
        assert!(needs_restart(&pg("one"), &pg("one")).is_empty());
        assert_eq!(needs_restart(&pg("one"), &pg("two")), ["store.url"]);
        let other = Config::parse("[proxy]\npublic_host = \"h.example\"\n", "t").unwrap();
        let default = Config::parse("", "t").unwrap();
        assert_eq!(needs_restart(&default, &other), ["proxy.public_host"]);
        let threads =
            Config::parse("[proxy]\nworker_threads = 3\nbusy_poll_us = 0\n", "t").unwrap();
        assert_eq!(
            needs_restart(&default, &threads),
            ["proxy.worker_threads", "proxy.busy_poll_us"]
        );
        let limits = Config::parse("[sandbox]\npids_max = 64\ndisk_max_mib = 0\n", "t").unwrap();
        assert_eq!(
            needs_restart(&default, &limits),
            ["sandbox.pids_max", "sandbox.disk_max_mib"]
        );
    }

    #[test]
    fn a_readable_config_with_a_database_password_is_refused() {
        let pw =
            "[store]\nbackend = \"postgres\"\nurl = \"postgres://sg:hunter2-PW@db.internal/sg\"\n";
        let (_d, path, cfg) = with_mode(pw, 0o644);
        let err = check_config_private(&cfg, Some(&path))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("mode 644") && err.contains("chmod 600"),
            "{err}"
        );
        assert!(!err.contains("hunter2"), "{err}");
        let (_d, path, cfg) = with_mode(pw, 0o600);
        assert!(check_config_private(&cfg, Some(&path)).is_ok());
        let no_pw = "[store]\nbackend = \"postgres\"\nurl = \"host=/run/postgresql user=sg\"\n";
        let (_d, path, cfg) = with_mode(no_pw, 0o644);
        assert!(check_config_private(&cfg, Some(&path)).is_ok());
    }

    #[test]
    fn an_ipv6_public_host_is_bracketed_in_the_proxy_url() {
        assert_eq!(public_authority("::1", 3128), "[::1]:3128");
        assert_eq!(public_authority("[::1]", 3128), "[::1]:3128");
        assert_eq!(public_authority("10.0.0.1", 3128), "10.0.0.1:3128");
        assert_eq!(
            public_authority("proxy.internal", 3128),
            "proxy.internal:3128"
        );
    }
}
