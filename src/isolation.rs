//! Isolated sandboxes (`"isolation": "netns"`): the daemon (root) owns one network namespace
//! per sandbox — veth, iptables rule set, DNS responder and a transparent listener on the host
//! side of the veth — plus a private directory, and runs the sandbox's commands inside
//! ([`commands`]).
//!
//! Lifetime: built by [`Isolation::create`] (the sandbox is created with the namespace's
//! address as its `source_ip`); removed by `DELETE`, by expiry ([`Isolation::end`]), by daemon
//! shutdown ([`Isolation::shutdown`]) and, as a last resort, when dropped. A daemon restart
//! does not restore isolated sandboxes: the start-up sweep removes what an earlier run left
//! (see [`crate::netns::sweep`]), their sandboxes are recorded as ended before it and not
//! restored, and [`Isolation::clear_stale_dirs`] removes their directories.
//!
//! The transparent listener is per sandbox, bound to the host side of its veth on an
//! ephemeral port (the rules REDIRECT there), so `[proxy] transparent_listen` is not needed
//! and nothing listens on a wildcard address for isolated sandboxes.

pub mod commands;
pub mod fds;
pub mod host_root;
pub mod privileges;
pub mod run_as;
pub mod seccomp;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::config::SandboxConfig;
use crate::limits::cgroup::{CgroupError, Groups};
use crate::limits::files::{self, FILES_DIR};
use crate::netns::dns::{NameFilter, SharedFilter};
use crate::netns::session::Owner;
use crate::netns::{self, Namespace, NetnsError};
use crate::proxy::{ListenerKind, ProxyState};
use crate::sandbox::lifecycle::{NetnsInfo, SandboxInfo};
use crate::sandbox::tombstones::ISOLATED_FILE_NAME;
use crate::sandbox::{CreateSandbox, Sandbox, SandboxError, Sandboxes, Tombstones};
use run_as::RunAs;

/// Inside the sandbox: the work directory (also `HOME`) and the CA certificate.
pub const HOME_INSIDE: &str = "/home/user";
/// Inside the sandbox: the sandbox CA certificate (a tmpfs over `/run/sealgate` holds it).
pub const CA_INSIDE: &str = "/run/sealgate/ca.pem";
/// How often the DNS filter follows the sandbox's (refreshed) allowlist.
const ALLOWLIST_REFRESH: Duration = Duration::from_secs(1);

/// Isolation failures.
#[derive(Debug, thiserror::Error)]
pub enum IsolationError {
    /// The request is invalid.
    #[error("{0}")]
    BadRequest(String),
    /// The sandbox exists but has no namespace.
    #[error("sandbox {0} is not isolated: commands need \"isolation\": \"netns\"")]
    NotIsolated(String),
    /// `[sandbox] commands = false`.
    #[error("commands are turned off on this daemon ([sandbox] commands = false)")]
    CommandsOff,
    /// `max_commands_per_sandbox` commands are running.
    #[error("sandbox {0} already runs {1} commands ([sandbox] max_commands_per_sandbox)")]
    TooManyCommands(String, usize),
    /// `run_as` cannot be resolved.
    #[error(transparent)]
    RunAs(#[from] run_as::RunAsError),
    /// Namespace, veth, rules or DNS setup failed.
    #[error("isolation setup failed: {0}")]
    Netns(#[from] NetnsError),
    /// The sandbox's cgroups could not be made (its limits could not be applied).
    #[error("isolation setup failed: {0}")]
    Cgroup(#[from] CgroupError),
    /// A file or socket of the sandbox.
    #[error("isolation setup failed: {what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        source: std::io::Error,
    },
    /// The sandbox itself.
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    /// The daemon lacks what an isolated sandbox needs ([`privileges::refusal`]).
    #[error("{0}")]
    Unprivileged(String),
    /// The daemon is shutting down: a sandbox created meanwhile has been ended again.
    #[error("the daemon is shutting down: the sandbox was ended again; create it once the daemon is back")]
    ShuttingDown,
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> IsolationError {
    let what = what.into();
    move |source| IsolationError::Io { what, source }
}

/// One live isolated sandbox.
pub struct Isolated {
    /// The sandbox.
    pub sandbox: Arc<Sandbox>,
    /// Its namespace (torn down once, under the lock).
    ns: Mutex<Namespace>,
    /// Namespace names and addresses, for the API.
    pub info: NetnsInfo,
    /// Extra plain environment variables.
    pub envs: BTreeMap<String, String>,
    /// `data_dir/sandboxes/<id>`: `files/` (a tmpfs of `disk_max_mib`, see
    /// [`crate::limits::files`]) with `home/` (the work directory) and `tmp/`; `ca.pem`; each
    /// command's environment file.
    pub dir: PathBuf,
    /// Its cgroups, which every command joins (empty when memory and pids are unlimited).
    pub groups: Groups,
    /// Who its commands run as.
    pub run_as: RunAs,
    /// One permit per running command.
    pub commands: Arc<Semaphore>,
}

impl Isolated {
    fn teardown(&self) {
        self.ns.lock().unwrap_or_else(|e| e.into_inner()).teardown();
    }
}

/// Who sandboxes' commands run as (`[sandbox] run_as`).
enum Users {
    /// Each sandbox its own uid and gid: the base plus its namespace slot.
    PerSandbox(u32),
    /// One user for all (resolved at start).
    One(Result<RunAs, run_as::RunAsError>),
}

impl Users {
    /// The user of the sandbox in namespace `slot`.
    async fn for_slot(&self, slot: u16) -> Result<RunAs, IsolationError> {
        match self {
            Users::One(one) => Ok(one.clone()?),
            Users::PerSandbox(base) => {
                let base = *base;
                blocking(move || Ok::<_, IsolationError>(RunAs::for_slot(base, slot)?)).await
            }
        }
    }
}

/// The isolated sandboxes of this daemon.
pub struct Isolation {
    cfg: SandboxConfig,
    /// Absolute `data_dir` (hidden inside every sandbox).
    data_dir: PathBuf,
    /// Files masked inside every sandbox (the config file, which may hold a database password).
    hidden: Vec<PathBuf>,
    /// Directories laid over with an empty tmpfs inside every sandbox besides `data_dir`:
    /// `cert_dir`, whose `<sandbox-id>.pem` files list every live sandbox of the host, other
    /// tenants' too, with their creation times (outside review; each command has its own CA at
    /// `/run/sealgate/ca.pem`).
    hidden_dirs: Vec<PathBuf>,
    users: Users,
    sandboxes: Arc<Sandboxes>,
    proxy: Arc<ProxyState>,
    live: Mutex<HashMap<String, Arc<Isolated>>>,
    /// Sandboxes the expiry sweep took out of `live` and is tearing down: a DELETE meeting
    /// one waits for that teardown ([`Isolated::teardown`] runs once, under its lock), so
    /// its answer, 404 included, comes when nothing of the sandbox is left.
    ending: Mutex<HashMap<Arc<str>, Arc<Isolated>>>,
    /// Sandboxes whose row and registry entry exist while their namespace is being built: a
    /// DELETE meeting one waits for the build to end (notified when it does). It had answered
    /// 204 with the namespace still being built, and the creation then answered 404, never
    /// audited (review).
    building: Mutex<HashMap<String, Arc<tokio::sync::Notify>>>,
    /// `data_dir/isolated-sandboxes`: every isolated sandbox from before its row exists until
    /// it has ended, so a start ends what a crash left (the lock makes each update whole).
    roster: Arc<Mutex<Tombstones>>,
    /// Set when the daemon's shutdown begins: an isolated creation that finishes after it is
    /// ended instead of answered (the shutdown has ended every other one).
    closing: std::sync::atomic::AtomicBool,
}

impl Isolation {
    /// The service; `run_as` is resolved now. A failure does not stop the daemon (proxy-only
    /// sandboxes need no user): it is logged now and answered to each isolated create as a
    /// server-side 500 `isolation_failed`, naming the key.
    pub fn new(
        cfg: SandboxConfig,
        data_dir: PathBuf,
        hidden: Vec<PathBuf>,
        hidden_dirs: Vec<PathBuf>,
        sandboxes: Arc<Sandboxes>,
        proxy: Arc<ProxyState>,
    ) -> Isolation {
        let users = if cfg.run_as == crate::config::PER_SANDBOX {
            Users::PerSandbox(cfg.uid_base)
        } else {
            let one = RunAs::resolve(&cfg.run_as);
            match &one {
                Err(e) => {
                    tracing::warn!(error = %e, "isolated sandboxes cannot be created until this is fixed");
                }
                Ok(user) if user.is_root() => tracing::warn!(
                    run_as = %cfg.run_as,
                    "sandbox.run_as is root (uid or gid 0): untrusted commands of isolated \
                     sandboxes can read every root-only host file they see (read-only: \
                     /etc/shadow, SSH host keys, other services' credentials; data_dir and \
                     the config file stay hidden); use \"per-sandbox\" or an unprivileged user"
                ),
                Ok(_) => {}
            }
            Users::One(one)
        };
        // The mount point of the tmpfs that holds the CA inside (root only; without it
        // isolation fails at its first command with bwrap's message).
        let _ = netns::record::ensure_dir(Path::new("/run/sealgate"), 0o755);
        Isolation {
            cfg,
            data_dir: data_dir.clone(),
            hidden,
            hidden_dirs,
            users,
            sandboxes,
            proxy,
            live: Mutex::new(HashMap::new()),
            ending: Mutex::new(HashMap::new()),
            building: Mutex::new(HashMap::new()),
            roster: Arc::new(Mutex::new(Tombstones::named(&data_dir, ISOLATED_FILE_NAME))),
            closing: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// `[sandbox]` settings.
    pub fn config(&self) -> &SandboxConfig {
        &self.cfg
    }

    /// The isolated sandbox `id`, if live.
    pub fn get(&self, id: &str) -> Option<Arc<Isolated>> {
        self.lock().get(id).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Isolated>>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds the isolation fields to an API answer.
    pub fn decorate(&self, info: &mut SandboxInfo) {
        if let Some(iso) = self.get(&info.id) {
            info.isolation = "netns";
            info.envs = iso.envs.clone();
            info.workdir = Some(home_of(&iso.dir).display().to_string());
            info.netns = Some(iso.info.clone());
            info.user = Some(crate::sandbox::lifecycle::UserInfo {
                name: iso.run_as.name.clone(),
                uid: iso.run_as.uid,
                gid: iso.run_as.gid,
            });
        }
    }

    /// Creates a sandbox: `"isolation": "none"` (or absent) is the proxy-only sandbox, `"netns"`
    /// builds the namespace around it.
    ///
    /// # Errors
    /// Invalid isolation or envs (400), and every failure of either path.
    pub async fn create(&self, req: CreateSandbox) -> Result<SandboxInfo, IsolationError> {
        match req.isolation.as_deref() {
            None | Some("none") => {
                if req.envs.as_ref().is_some_and(|e| !e.is_empty()) {
                    return Err(IsolationError::BadRequest(
                        "envs are given to commands, which need \"isolation\": \"netns\"".into(),
                    ));
                }
                let sbx = self.sandboxes.clone();
                Ok(blocking(move || sbx.create(req)).await?)
            }
            Some("netns") => self.create_isolated(req).await,
            Some(other) => Err(IsolationError::BadRequest(format!(
                "isolation: '{other}' is not \"none\" or \"netns\""
            ))),
        }
    }

    async fn create_isolated(&self, mut req: CreateSandbox) -> Result<SandboxInfo, IsolationError> {
        if req.source_ip.is_some() {
            return Err(IsolationError::BadRequest(
                "source_ip is chosen by the daemon for \"isolation\": \"netns\"".into(),
            ));
        }
        let envs = validate_envs(req.envs.take().unwrap_or_default())?;
        if let Users::One(one) = &self.users {
            one.clone()?;
        }
        self.sandboxes.precheck(&req, &envs)?;
        // After the request's own checks (a bad request is the client's 400 or 404 anywhere),
        // before anything is built.
        if let Some(why) = privileges::refusal() {
            return Err(IsolationError::Unprivileged(why));
        }
        let ns = blocking(Namespace::claim).await?;
        let run_as = self.users.for_slot(ns.plan().slot).await?;
        req.source_ip = Some(IpAddr::V4(ns.plan().ns_ip));
        let id = crate::sandbox::new_id();
        self.listed(&id, true).await?;
        let _building = Building::start(self, &id);
        req.id = Some(id.clone());
        let sbx = self.sandboxes.clone();
        let mut info = match blocking(move || sbx.create(req)).await {
            Ok(info) => info,
            Err(e) => {
                let _ = self.listed(&id, false).await;
                return Err(e);
            }
        };
        let built = self.build(ns, &info, &run_as, envs).await;
        match built {
            Ok(iso) => {
                if !self.adopt(&info.id, iso.clone()) {
                    // Finished after the shutdown ended every isolated sandbox (found from
                    // outside: six answered 201 for sandboxes already gone, never audited).
                    tracing::info!(sandbox = %info.id, "created during the shutdown: ended");
                    blocking(move || {
                        iso.teardown();
                        Ok::<_, IsolationError>(())
                    })
                    .await?;
                    if self.sandboxes.delete(&info.id).is_ok() {
                        let _ = self.listed(&info.id, false).await;
                    }
                    return Err(IsolationError::ShuttingDown);
                }
                if self.sandboxes.registry().get(&info.id).is_none() {
                    // Expired or deleted while its namespace was being built.
                    self.end(&[Arc::from(info.id.as_str())]).await;
                    return Err(SandboxError::NotFound(info.id).into());
                }
                self.decorate(&mut info);
                tracing::info!(sandbox = %info.id, netns = ?info.netns.as_ref().map(|n| &n.name), "isolated sandbox ready");
                Ok(info)
            }
            Err(e) => {
                if self.sandboxes.delete(&info.id).is_ok() {
                    let _ = self.listed(&info.id, false).await;
                }
                Err(e)
            }
        }
    }

    /// Everything after the sandbox exists; on failure the namespace is torn down on drop.
    async fn build(
        &self,
        mut ns: Namespace,
        info: &SandboxInfo,
        run_as: &RunAs,
        envs: BTreeMap<String, String>,
    ) -> Result<Arc<Isolated>, IsolationError> {
        let sandbox = self
            .sandboxes
            .registry()
            .get(&info.id)
            .ok_or_else(|| SandboxError::NotFound(info.id.clone()))?;
        let dir = self.data_dir.join("sandboxes").join(&info.id);
        let limits = self.cfg.limits;
        let groups = if limits.needs_cgroup() {
            Groups::plan(&info.id, &limits)?
        } else {
            Groups::default()
        };
        ns.set_owner(Owner {
            sandbox_id: info.id.clone(),
            dir: dir.clone(),
            cgroups: groups.paths(),
            files: limits.disk_bytes.map(|_| dir.join(FILES_DIR)),
        })?;
        groups.create()?;
        make_dir(&dir, run_as, &info.ca_cert_pem, limits.disk_bytes)?;
        write_identity(&dir, run_as)?;
        let filter = filter_for(&sandbox, ns.host_ip())?;
        ns.start_dns(filter.clone(), self.cfg.dns_per_sec)
            .await
            .map_err(io_err("starting the namespace's DNS responder"))?;
        let listener = TcpListener::bind((ns.host_ip(), 0))
            .await
            .map_err(io_err("binding the sandbox's transparent listener"))?;
        let port = listener
            .local_addr()
            .map_err(io_err("reading the transparent listener's address"))?
            .port();
        // On one proxy worker: every connection of this sandbox runs there.
        let accepting = listener
            .into_std()
            .and_then(|l| self.proxy.spawn_listener(l, ListenerKind::Transparent))
            .map_err(io_err("handing the sandbox's listener to a proxy worker"))?;
        ns.own_task(accepting);
        ns.own_task(tokio::spawn(follow_allowlist(
            Arc::downgrade(&sandbox),
            filter,
            ns.host_ip(),
        )));
        let flows = self.cfg.flows;
        let ns = blocking(move || ns.confine(port, flows).map(|()| ns)).await?;
        let plan = ns.plan().clone();
        Ok(Arc::new(Isolated {
            sandbox,
            ns: Mutex::new(ns),
            info: NetnsInfo {
                name: plan.netns,
                interface: plan.host_if,
                address: IpAddr::V4(plan.ns_ip),
                gateway: IpAddr::V4(plan.host_ip),
            },
            envs,
            dir,
            groups,
            run_as: run_as.clone(),
            commands: Arc::new(Semaphore::new(self.cfg.max_commands)),
        }))
    }

    /// Ends a sandbox (isolated or not): tokens first, then namespace, processes and files.
    /// A DELETE that meets another teardown of the same sandbox (the expiry sweep's, or a
    /// concurrent DELETE's) answers when that teardown is done: the sandbox is in `ending`
    /// while it is torn down, and [`Isolated::teardown`] waits for one in progress. A second
    /// DELETE had answered 404 at once, with the namespace and processes still there.
    ///
    /// # Errors
    /// [`SandboxError::NotFound`] if it was not live.
    pub async fn delete(&self, id: &str) -> Result<(), IsolationError> {
        self.until_built(id).await;
        let (iso, mine) = {
            let mut live = self.lock();
            let mut ending = self.ending();
            match live.remove(id) {
                Some(iso) => {
                    ending.insert(iso.sandbox.id.clone(), iso.clone());
                    (Some(iso), true)
                }
                None => (ending.get(id).cloned(), false),
            }
        };
        let ended = self.sandboxes.delete(id);
        if let Some(iso) = iso {
            let torn = blocking(move || {
                iso.teardown();
                Ok::<_, IsolationError>(())
            })
            .await;
            if mine {
                self.ending().remove(id);
            }
            torn?;
            if ended.is_ok() {
                let _ = self.listed(id, false).await;
            }
        }
        Ok(ended?)
    }

    /// Tears down the namespaces of sandboxes that already ended (expiry).
    pub async fn end(&self, ids: &[Arc<str>]) {
        let gone: Vec<Arc<Isolated>> = {
            let mut live = self.lock();
            let gone: Vec<_> = ids.iter().filter_map(|id| live.remove(&**id)).collect();
            // Under `live`'s lock, so a DELETE finds the sandbox in one map or the other.
            let mut ending = self.ending();
            for iso in &gone {
                ending.insert(iso.sandbox.id.clone(), iso.clone());
            }
            gone
        };
        if gone.is_empty() {
            return;
        }
        let _ = blocking(move || {
            gone.iter().for_each(|iso| iso.teardown());
            Ok::<_, IsolationError>(())
        })
        .await;
        {
            let mut ending = self.ending();
            for id in ids {
                ending.remove(id);
            }
        }
        // Expired: a row the sweep could not delete is purged at the next start anyway.
        for id in ids {
            let _ = self.listed(id, false).await;
        }
    }

    /// Adds `id` to (`true`) or removes it from the roster of isolated sandboxes. A failed
    /// removal is logged and harmless (the next start finds no row for it); a failed addition
    /// stops the create.
    /// The write (with its fsyncs) runs off the async workers.
    async fn listed(&self, id: &str, add: bool) -> Result<(), IsolationError> {
        let (roster, id) = (self.roster.clone(), id.to_owned());
        blocking(move || {
            let roster = roster.lock().unwrap_or_else(|e| e.into_inner());
            let done = match add {
                true => roster.add([id.clone()]).map(drop),
                false => roster.remove(&id),
            };
            if let Err(e) = &done {
                tracing::error!(sandbox = %id, error = %e, "cannot update the list of isolated sandboxes");
            }
            done
        })
        .await
    }

    /// Waits while sandbox `id` is being built ([`Isolation::building`]).
    async fn until_built(&self, id: &str) {
        let Some(done) = self.building().get(id).cloned() else {
            return;
        };
        let notified = done.notified();
        tokio::pin!(notified);
        // Registered before the second look, so an end between the two is not missed.
        notified.as_mut().enable();
        if self.building().contains_key(id) {
            notified.await;
        }
    }

    fn building(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<tokio::sync::Notify>>> {
        self.building.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn ending(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Arc<Isolated>>> {
        self.ending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Puts a built sandbox among the live ones, unless the shutdown has begun (`false`).
    /// Under `live`'s lock, as the shutdown's drain, so a sandbox is either drained by the
    /// shutdown or refused here.
    fn adopt(&self, id: &str, iso: Arc<Isolated>) -> bool {
        let mut live = self.lock();
        if self.closing.load(std::sync::atomic::Ordering::Acquire) {
            return false;
        }
        live.insert(id.to_owned(), iso);
        true
    }

    /// Daemon shutdown: every isolated sandbox ends (a restart does not restore them), and
    /// one whose creation finishes later is ended by it ([`Self::adopt`]). `ended` is called
    /// with each sandbox's id as soon as its row is deleted, before the teardown: a second
    /// signal that drops the daemon during the teardown must not lose the record of an end
    /// that already happened (outside pass h39b: no `sandbox.end` line at all).
    pub async fn shutdown(&self, ended: impl Fn(&str)) {
        let all: Vec<Arc<Isolated>> = {
            let mut live = self.lock();
            self.closing
                .store(true, std::sync::atomic::Ordering::Release);
            live.drain().map(|(_, v)| v).collect()
        };
        for iso in &all {
            if self.sandboxes.delete(&iso.sandbox.id).is_ok() {
                ended(&iso.sandbox.id);
                let _ = self.listed(&iso.sandbox.id, false).await;
            }
        }
        let _ = blocking(move || {
            all.iter().for_each(|iso| iso.teardown());
            Ok::<_, IsolationError>(())
        })
        .await;
    }

    /// Daemon start, after restore: removes what isolated sandboxes of an earlier run left
    /// under `data_dir/sandboxes/` (their files' tmpfs detached first); returns how many
    /// directories there were. Their sandboxes were ended before the sweep
    /// (`daemon::record_stale_isolated` recorded them, the restore skipped and deleted their
    /// rows), so nothing is deleted here.
    pub fn clear_stale_dirs(&self) -> usize {
        let root = self.data_dir.join("sandboxes");
        let stale: Vec<std::ffi::OsString> = std::fs::read_dir(&root)
            .map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect())
            .unwrap_or_default();
        for id in &stale {
            files::unmount(&root.join(id).join(FILES_DIR));
        }
        let _ = std::fs::remove_dir_all(&root);
        stale.len()
    }
}

impl Drop for Isolation {
    /// Last resort (a dropped runtime without a shutdown): namespaces never outlive the daemon.
    fn drop(&mut self) {
        for (_, iso) in self.lock().drain() {
            iso.teardown();
        }
    }
}

/// Marks a sandbox as being built for as long as it lives ([`Isolation::building`]); its drop,
/// on every way out of the creation, wakes the DELETEs waiting for it.
struct Building<'a> {
    isolation: &'a Isolation,
    id: String,
}

impl<'a> Building<'a> {
    fn start(isolation: &'a Isolation, id: &str) -> Building<'a> {
        isolation
            .building()
            .insert(id.to_owned(), Arc::new(tokio::sync::Notify::new()));
        Building {
            isolation,
            id: id.to_owned(),
        }
    }
}

impl Drop for Building<'_> {
    fn drop(&mut self) {
        if let Some(done) = self.isolation.building().remove(&self.id) {
            done.notify_waiters();
        }
    }
}

/// Runs blocking work (`ip`, `iptables`, SQLite) off the async workers.
async fn blocking<T, E, F>(f: F) -> Result<T, IsolationError>
where
    F: FnOnce() -> Result<T, E> + Send + 'static,
    T: Send + 'static,
    E: Into<IsolationError> + Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(Into::into),
        Err(e) => Err(IsolationError::Io {
            what: "isolation task".into(),
            source: std::io::Error::other(e.to_string()),
        }),
    }
}

/// `envs`: environment variable names and values without NUL, within [`check_env_sizes`].
fn validate_envs(
    envs: BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, IsolationError> {
    for (k, v) in &envs {
        check_env(k, v, "envs")?;
    }
    check_env_sizes(&envs, "envs")?;
    Ok(envs)
}

/// The kernel's limit for one `NAME=value` string passed to `exec` (`MAX_ARG_STRLEN`, NUL
/// included).
pub const MAX_ENV_VAR: usize = 128 * 1024;

/// The most all of `envs` (or of one command's `env`) may hold: a quarter of the usual 2 MiB
/// `exec` limit each, so sandbox variables, a command's own and the tokens always fit.
pub const MAX_ENV_TOTAL: usize = 512 * 1024;

/// Refuses what `exec` would: a variable over [`MAX_ENV_VAR`], or more than [`MAX_ENV_TOTAL`]
/// together. Accepted, such a sandbox could never run a command (every one would fail with
/// "Argument list too long").
///
/// # Errors
/// [`IsolationError::BadRequest`] naming the field and variable (never the value).
pub fn check_env_sizes(env: &BTreeMap<String, String>, field: &str) -> Result<(), IsolationError> {
    let size = |k: &String, v: &String| k.len() + v.len() + 2;
    if let Some((k, _)) = env.iter().find(|(k, v)| size(k, v) > MAX_ENV_VAR) {
        return Err(IsolationError::BadRequest(format!(
            "{field}: {k} is over {} KiB (the kernel's limit for one variable)",
            MAX_ENV_VAR / 1024
        )));
    }
    let total: usize = env.iter().map(|(k, v)| size(k, v)).sum();
    if total > MAX_ENV_TOTAL {
        return Err(IsolationError::BadRequest(format!(
            "{field}: {} KiB in all, over the {} KiB allowed",
            total.div_ceil(1024),
            MAX_ENV_TOTAL / 1024
        )));
    }
    Ok(())
}

/// One environment variable: a name of `[A-Za-z_][A-Za-z0-9_]*`, a value without NUL.
///
/// # Errors
/// [`IsolationError::BadRequest`] naming the field (never the value).
pub fn check_env(name: &str, value: &str, field: &str) -> Result<(), IsolationError> {
    let name_ok = name
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !name_ok {
        return Err(IsolationError::BadRequest(format!(
            "{field}: '{}' is not an environment variable name",
            name.escape_debug()
        )));
    }
    if value.contains('\0') {
        return Err(IsolationError::BadRequest(format!(
            "{field}: the value of {name} contains NUL"
        )));
    }
    Ok(())
}

/// `passwd` and `group` in the sandbox's directory (0644), bound over `/etc/passwd` and
/// `/etc/group` inside, when its user has no entry on the host ([`RunAs::identity_files`]).
fn write_identity(dir: &Path, run_as: &RunAs) -> Result<(), IsolationError> {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let Some((passwd, group)) = run_as.identity_files(&read("/etc/passwd"), &read("/etc/group"))
    else {
        return Ok(());
    };
    for (name, text) in [("passwd", passwd), ("group", group)] {
        let p = dir.join(name);
        std::fs::write(&p, text).map_err(io_err(format!("writing {}", p.display())))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644))
            .map_err(io_err(format!("chmod {}", p.display())))?;
    }
    Ok(())
}

/// The sandbox's work directory on the host.
pub fn home_of(dir: &Path) -> PathBuf {
    dir.join(FILES_DIR).join("home")
}

/// `dir` (0700 root) with `files/` (0755 root; a tmpfs of `disk` bytes when set) holding
/// `home/`, `tmp/` and `shm/` (0700, owned by the sandbox's user; `shm/` is its `/dev/shm`),
/// and `ca.pem` (0644).
fn make_dir(
    dir: &Path,
    run_as: &RunAs,
    ca_pem: &str,
    disk: Option<u64>,
) -> Result<(), IsolationError> {
    let what = |p: &Path| format!("creating {}", p.display());
    netns::record::ensure_dir(dir, 0o700).map_err(io_err(what(dir)))?;
    let files = dir.join(FILES_DIR);
    netns::record::ensure_dir(&files, 0o755).map_err(io_err(what(&files)))?;
    if let Some(bytes) = disk {
        files::mount(&files, bytes).map_err(io_err(format!(
            "mounting a tmpfs of {bytes} bytes ([sandbox] disk_max_mib; 0 = unbounded files \
             on data_dir) at {}",
            files.display()
        )))?;
    }
    for sub in ["home", "tmp", "shm"] {
        let p = files.join(sub);
        netns::record::ensure_dir(&p, 0o700).map_err(io_err(what(&p)))?;
        std::os::unix::fs::chown(&p, Some(run_as.uid), Some(run_as.gid))
            .map_err(io_err(format!("chown {}", p.display())))?;
    }
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, ca_pem).map_err(io_err(what(&ca)))?;
    std::fs::set_permissions(&ca, std::fs::Permissions::from_mode(0o644)).map_err(io_err(what(&ca)))
}

fn filter_for(sandbox: &Sandbox, placeholder: Ipv4Addr) -> Result<SharedFilter, IsolationError> {
    let list = sandbox.snapshot().egress_allowlist.clone();
    let f = NameFilter::new(list.as_deref(), placeholder)
        .map_err(|e| IsolationError::BadRequest(format!("egress_allowlist: {e}")))?;
    Ok(Arc::new(std::sync::RwLock::new(Arc::new(f))))
}

/// Keeps the namespace's DNS answers in step with the sandbox's allowlist (rotation and
/// `update` re-snapshot live sandboxes; names follow within [`ALLOWLIST_REFRESH`]).
async fn follow_allowlist(
    sandbox: std::sync::Weak<Sandbox>,
    filter: SharedFilter,
    placeholder: Ipv4Addr,
) {
    let mut last = sandbox
        .upgrade()
        .map(|s| s.snapshot().egress_allowlist.clone());
    loop {
        tokio::time::sleep(ALLOWLIST_REFRESH).await;
        let Some(sb) = sandbox.upgrade() else {
            return;
        };
        let list = sb.snapshot().egress_allowlist.clone();
        if last.as_ref() == Some(&list) {
            continue;
        }
        if let Ok(f) = NameFilter::new(list.as_deref(), placeholder) {
            *filter.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(f);
            last = Some(list);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_names_and_values_are_checked() {
        assert!(check_env("API_KEY", "x", "env").is_ok());
        assert!(check_env("_x1", "", "env").is_ok());
        for bad in ["", "1A", "A-B", "A=B", "A B", "É"] {
            assert!(check_env(bad, "v", "env").is_err(), "{bad}");
        }
        assert!(check_env("A", "x\0y", "env").is_err());
        let one = |n: usize| BTreeMap::from([("BIG".to_string(), "x".repeat(n))]);
        assert!(check_env_sizes(&one(MAX_ENV_VAR - 5), "envs").is_ok());
        assert!(check_env_sizes(&one(MAX_ENV_VAR - 4), "envs").is_err());
        let many: BTreeMap<String, String> = (0..5)
            .map(|i| (format!("V{i}"), "x".repeat(120 * 1024)))
            .collect();
        let err = check_env_sizes(&many, "env").unwrap_err().to_string();
        assert!(err.contains("in all"), "{err}");
        let bad: BTreeMap<String, String> = [("A=1".to_owned(), "x".to_owned())].into();
        assert!(validate_envs(bad).is_err());
    }
}
