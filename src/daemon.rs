//! `sealgate serve`: open the store, restore sandboxes, bind every listener, run until a
//! shutdown signal, then drain.
//!
//! Invariant: listeners are bound before the sandboxes' proxy URLs are computed (port 0 works),
//! and the store is opened — with the master-key check — before anything listens. The data
//! directory is locked ([`lock`]) before the store is opened: one daemon per `data_dir`.

pub mod lock;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};

use crate::admin::{self, AdminState};
use crate::audit::Audit;
use crate::ca::LeafCache;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::proxy::{self, ListenerKind, ProxyState, Runtime};
use crate::sandbox::lifecycle::LifecycleConfig;
use crate::sandbox::{Registry, Sandboxes};
use crate::secret::SecretValue;
use crate::store::crypto::KeySource;
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
    /// Another daemon uses this `data_dir`.
    #[error(transparent)]
    Lock(#[from] lock::LockError),
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
    /// The store's database file.
    pub db_path: PathBuf,
    /// Where sandbox CA certificates are written (absolute).
    pub cert_dir: PathBuf,
    /// Shared proxy state (tests and reload use it).
    pub proxy: Arc<ProxyState>,
    /// Sandbox service.
    pub sandboxes: Arc<Sandboxes>,
    admin_token: SecretValue,
    shutdown: watch::Sender<bool>,
    tasks: tokio::task::JoinSet<()>,
    /// Released when the daemon is dropped (after shutdown).
    _data_dir_lock: lock::DataDirLock,
}

impl Running {
    /// The admin bearer token (tests only need this; never logged).
    pub fn admin_token(&self) -> String {
        String::from_utf8_lossy(self.admin_token.expose()).into_owned()
    }

    /// Begins graceful shutdown: stop accepting; in-flight requests get `shutdown_grace`.
    pub fn begin_shutdown(&self) {
        let _ = self.shutdown.send(true);
    }

    /// Waits for every listener and background task to finish, then for in-flight
    /// connections to drain (each gets `shutdown_grace_secs` after shutdown began; one more
    /// second is the backstop before the rest are dropped).
    pub async fn wait(mut self) {
        while self.tasks.join_next().await.is_some() {}
        let grace = self.proxy.runtime().proxy.shutdown_grace;
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
    }

    /// Shuts down and waits.
    pub async fn shutdown(self) {
        self.begin_shutdown();
        self.wait().await;
    }
}

/// Starts the daemon on `cfg`.
///
/// # Errors
/// Any [`DaemonError`]: nothing is left listening then.
pub async fn start(cfg: Config, ov: Overrides) -> Result<Running, DaemonError> {
    prepare_dirs(&cfg)?;
    let data_dir_lock = lock::lock(&cfg.data_dir)?;
    let (store, key_source) = crate::rotate::open_store(&cfg.data_dir, ov.master_key.as_deref())?;
    let store: Arc<dyn Store> = Arc::new(store);
    let (admin_token, admin_token_file) = admin_token(&cfg.data_dir, ov.admin_token.as_deref())?;
    let listeners = Listeners::bind(&cfg).await?;
    let (sandboxes, restored, cert_dir) =
        restore_sandboxes(&cfg, store.clone(), listeners.proxy_addr)?;
    let metrics = Arc::new(Metrics::new());
    metrics.watch_leaf_cache(sandboxes.leaves().clone());
    metrics.sandboxes.set(sandboxes.registry().len() as i64);
    let audit = Arc::new(Audit::open(cfg.audit_path.clone()).map_err(io_err("opening audit log"))?);
    let runtime = Runtime::new(cfg.proxy.clone(), cfg.upstream.clone(), listeners.own())
        .map_err(DaemonError::Upstream)?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let proxy = ProxyState::new(
        sandboxes.registry().clone(),
        sandboxes.leaves().clone(),
        metrics.clone(),
        audit.clone(),
        runtime,
        shutdown_rx.clone(),
    );
    let (reload_tx, reload_rx) = mpsc::unbounded_channel();
    let admin_state = Arc::new(AdminState {
        store,
        sandboxes: sandboxes.clone(),
        admin_token: admin_token.clone(),
        metrics,
        audit,
        listeners_ready: false.into(),
        reload: Some(reload_tx),
    });
    let (admin_addr, proxy_addr, transparent_addr, own) = (
        listeners.admin_addr,
        listeners.proxy_addr,
        listeners.transparent_addr,
        listeners.own(),
    );
    let mut tasks = tokio::task::JoinSet::new();
    listeners.spawn(&mut tasks, &proxy, &admin_state, &shutdown_rx);
    tasks.spawn(sweep(sandboxes.clone(), shutdown_rx.clone()));
    tasks.spawn(reloads(
        proxy.clone(),
        ov.config_path.clone(),
        cfg.clone(),
        own,
        reload_rx,
        shutdown_rx,
    ));
    admin_state.listeners_ready.store(true, Ordering::Release);
    let running = Running {
        admin_addr,
        proxy_addr,
        transparent_addr,
        admin_token_file,
        key_source,
        db_path: cfg.data_dir.join(crate::store::sqlite::DB_FILE_NAME),
        cert_dir,
        proxy,
        sandboxes,
        admin_token,
        shutdown: shutdown_tx,
        tasks,
        _data_dir_lock: data_dir_lock,
    };
    log_started(&running, &cfg, restored);
    Ok(running)
}

fn prepare_dirs(cfg: &Config) -> Result<(), DaemonError> {
    create_private_dir(&cfg.data_dir)?;
    std::fs::create_dir_all(&cfg.cert_dir).map_err(io_err(format!(
        "creating cert_dir {}",
        cfg.cert_dir.display()
    )))
}

/// Every listener, bound before anything that needs their real addresses (port 0 works).
struct Listeners {
    admin: TcpListener,
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

    fn spawn(
        self,
        tasks: &mut tokio::task::JoinSet<()>,
        proxy: &Arc<ProxyState>,
        admin: &Arc<AdminState>,
        shutdown: &watch::Receiver<bool>,
    ) {
        tasks.spawn(proxy::run_listener(
            proxy.clone(),
            self.proxy,
            ListenerKind::Explicit,
        ));
        if let Some(l) = self.transparent {
            tasks.spawn(proxy::run_listener(
                proxy.clone(),
                l,
                ListenerKind::Transparent,
            ));
        }
        tasks.spawn(serve_admin(admin.clone(), self.admin, shutdown.clone()));
    }
}

/// Builds the sandbox service and registers every stored session (same CA, same tokens).
/// Also returns the absolute `cert_dir`.
fn restore_sandboxes(
    cfg: &Config,
    store: Arc<dyn Store>,
    proxy_addr: SocketAddr,
) -> Result<(Arc<Sandboxes>, usize, PathBuf), DaemonError> {
    let cert_dir = std::fs::canonicalize(&cfg.cert_dir).map_err(io_err("resolving cert_dir"))?;
    let lifecycle = LifecycleConfig {
        cert_dir: cert_dir.clone(),
        proxy_public: format!("{}:{}", cfg.proxy.public_host, proxy_addr.port()),
        default_timeout: cfg.sandbox.default_timeout,
        max_timeout: cfg.sandbox.max_timeout,
    };
    let registry = Arc::new(Registry::default());
    let leaves = Arc::new(LeafCache::new(cfg.sandbox.leaf_cache_capacity));
    let sandboxes = Arc::new(Sandboxes::new(store, registry, leaves, lifecycle));
    let restored = sandboxes.restore()?;
    Ok((sandboxes, restored, cert_dir))
}

fn log_started(r: &Running, cfg: &Config, restored: usize) {
    let transparent = r
        .transparent_addr
        .map_or_else(|| "off".to_owned(), |a| a.to_string());
    let token_file = r.admin_token_file.as_ref().map_or_else(
        || "(from SEALGATE_ADMIN_TOKEN)".to_owned(),
        |p| p.display().to_string(),
    );
    tracing::info!(
        admin = %format!("http://{}", r.admin_addr),
        proxy = %r.proxy_addr,
        transparent = %transparent,
        data_dir = %cfg.data_dir.display(),
        cert_dir = %r.cert_dir.display(),
        admin_token_file = %token_file,
        master_key = %r.key_source,
        sandboxes_restored = restored,
        "sealgate is running"
    );
}

fn create_private_dir(dir: &Path) -> Result<(), DaemonError> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(format!("creating data_dir {}", dir.display())))
}

/// The admin token: from the environment, else `data_dir/admin.token` (created 0600).
fn admin_token(
    data_dir: &Path,
    env: Option<&str>,
) -> Result<(SecretValue, Option<PathBuf>), DaemonError> {
    if let Some(t) = env.filter(|t| !t.is_empty()) {
        return Ok((SecretValue::new(t.as_bytes().to_vec()), None));
    }
    let path = data_dir.join("admin.token");
    if let Ok(text) = std::fs::read_to_string(&path) {
        return Ok((
            SecretValue::new(text.trim().as_bytes().to_vec()),
            Some(path),
        ));
    }
    let token = crate::sandbox::lifecycle::random_hex(32);
    write_private(&path, token.as_bytes())
        .map_err(io_err(format!("creating {}", path.display())))?;
    Ok((SecretValue::new(token.into_bytes()), Some(path)))
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.write_all(b"\n")?;
    f.sync_all()
}

async fn bind(addr: SocketAddr, key: &str) -> Result<TcpListener, DaemonError> {
    TcpListener::bind(addr)
        .await
        .map_err(io_err(format!("binding {key} = {addr}")))
}

fn local(l: &TcpListener) -> Result<SocketAddr, DaemonError> {
    l.local_addr().map_err(io_err("reading listener address"))
}

async fn serve_admin(state: Arc<AdminState>, l: TcpListener, mut shutdown: watch::Receiver<bool>) {
    let app = admin::router(state).into_make_service_with_connect_info::<SocketAddr>();
    let res = axum::serve(l, app)
        .with_graceful_shutdown(async move {
            let _ = shutdown.changed().await;
        })
        .await;
    if let Err(e) = res {
        tracing::error!(error = %e, "admin listener failed");
    }
}

async fn sweep(sandboxes: Arc<Sandboxes>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let s = sandboxes.clone();
        let _ = tokio::task::spawn_blocking(move || s.sweep_expired()).await;
    }
}

type ReloadReply = oneshot::Sender<Result<Vec<String>, String>>;

async fn reloads(
    proxy: Arc<ProxyState>,
    path: Option<PathBuf>,
    mut current: Config,
    own: Vec<SocketAddr>,
    mut rx: mpsc::UnboundedReceiver<ReloadReply>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        let reply = tokio::select! {
            r = rx.recv() => match r { Some(r) => Some(r), None => return },
            _ = async { match &mut hup { Some(h) => { h.recv().await; } None => std::future::pending().await } } => None,
            _ = shutdown.changed() => return,
        };
        let outcome = reload_once(&proxy, path.as_deref(), &mut current, &own);
        match &outcome {
            Ok(restart) => tracing::info!(needs_restart = ?restart, "configuration reloaded"),
            Err(e) => tracing::warn!(error = %e, "reload refused; running configuration kept"),
        }
        if let Err(e) = proxy.audit.reopen() {
            tracing::warn!(error = %e, "audit log reopen failed");
        }
        if let Some(r) = reply {
            let _ = r.send(outcome);
        }
    }
}

/// Re-reads the config file and applies what can change live.
fn reload_once(
    proxy: &ProxyState,
    path: Option<&Path>,
    current: &mut Config,
    own: &[SocketAddr],
) -> Result<Vec<String>, String> {
    let Some(path) = path else {
        return Err("no --config file was given; nothing to reload".into());
    };
    let new = Config::load(Some(path)).map_err(|e| e.to_string())?;
    let restart = needs_restart(current, &new);
    let rt = Runtime::new(new.proxy.clone(), new.upstream.clone(), own.to_vec())?;
    proxy.set_runtime(rt);
    crate::logging::set_level(&new.log_level);
    *current = new;
    Ok(restart)
}

fn needs_restart(old: &Config, new: &Config) -> Vec<String> {
    let mut out = Vec::new();
    let mut check = |key: &str, changed: bool| {
        if changed {
            out.push(key.to_owned());
        }
    };
    check("data_dir", old.data_dir != new.data_dir);
    check("cert_dir", old.cert_dir != new.cert_dir);
    check("admin.listen", old.admin_listen != new.admin_listen);
    check("proxy.listen", old.proxy.listen != new.proxy.listen);
    check(
        "proxy.transparent_listen",
        old.proxy.transparent_listen != new.proxy.transparent_listen,
    );
    check(
        "proxy.public_host",
        old.proxy.public_host != new.proxy.public_host,
    );
    check(
        "proxy.max_connections",
        old.proxy.max_connections != new.proxy.max_connections,
    );
    check(
        "sandbox.leaf_cache_capacity",
        old.sandbox.leaf_cache_capacity != new.sandbox.leaf_cache_capacity,
    );
    check(
        "sandbox.default_timeout_secs",
        old.sandbox.default_timeout != new.sandbox.default_timeout,
    );
    check(
        "sandbox.max_timeout_secs",
        old.sandbox.max_timeout != new.sandbox.max_timeout,
    );
    check("log.format", old.log_format != new.log_format);
    check("audit.path", old.audit_path != new.audit_path);
    out
}
