//! `POST /v1/sandboxes/{id}/commands`: `sh -c CMD` inside an isolated sandbox.
//!
//! How a command runs: `ip netns exec <ns>` (the sandbox's network namespace, with its
//! `/etc/netns/<ns>/resolv.conf`) → `bwrap` (own PID, IPC, UTS and mount namespaces; the host
//! filesystem read-only, rebuilt one top-level entry at a time ([`super::host_root`]);
//! `data_dir` — the daemon's database and keys and every sandbox's directory — hidden under an
//! empty tmpfs; the sandbox's own `files/home/` at `/home/user` and `files/tmp/` at `/tmp`,
//! both writable; the CA at [`CA_INSIDE`]; dies with its parent) →
//! `setpriv` (drops to the sandbox's user, `[sandbox] run_as`, with `no_new_privs` and no
//! capabilities) →
//! `sh -c CMD`. The command's environment is built from nothing (never the daemon's own) and
//! reaches it through a file sourced inside ([`EnvFile`]): the root-run steps on the way in
//! see only a fixed `PATH`.
//!
//! Limits: the child joins the sandbox's cgroups between `fork` and `exec`, so `ip`, bwrap
//! and everything the command starts count toward `[sandbox] memory_max_mib` and `pids_max`;
//! its files live on the sandbox's tmpfs of `disk_max_mib` ([`crate::limits`]). A process the
//! kernel's OOM killer ends reports exit code 137 (128 + SIGKILL), and the answer says
//! `oom_killed` (the sandbox's OOM-kill counter moved while the command ran).
//!
//! Rules: output beyond `max_output_bytes` per stream is drained and dropped (`truncated`), at
//! most `output_drain_bytes_per_sec` (a faster writer waits on its own pipe: [`drain`]);
//! past its timeout — or the sandbox's, whichever comes first — the whole process group is
//! SIGKILLed (`timed_out`, exit code 124, as `timeout(1)`); a client that goes away (closed stream or dropped request) kills the
//! command too; when the command's first process exits, the PID namespace — and with it
//! every background process — ends. Every command is audited (sandbox, command line cut to
//! 256 bytes, exit code, duration); env values never are.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, OwnedSemaphorePermit};

use super::host_root::{self, RootEntry};
use super::run_as::RunAs;
use super::{check_env, io_err, Isolated, Isolation, IsolationError, CA_INSIDE, HOME_INSIDE};
use crate::audit::{Audit, CommandEvent};
use crate::limits::files::FILES_DIR;
use crate::sandbox::lifecycle::{shadowed_secret, CA_VARS, SANDBOX_ID_VAR};

/// Exit code reported for a command killed by its timeout.
pub const TIMEOUT_EXIT: i32 = 124;
/// Longest command line kept in the audit log.
pub const AUDIT_CMD_BYTES: usize = 256;
/// How long output readers may take after the command ended (they normally end at once).
const DRAIN_GRACE: Duration = Duration::from_secs(2);
/// `PATH` inside.
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The request body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandRequest {
    /// Run as `sh -c cmd`.
    pub cmd: String,
    /// Extra environment variables (override the sandbox's).
    #[serde(default)]
    pub env: Option<BTreeMap<String, String>>,
    /// Working directory inside; relative paths are taken from `/home/user`.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Seconds (fractions allowed); default `[sandbox] command_timeout_secs`.
    #[serde(default)]
    pub timeout: Option<f64>,
    /// Written to the command's standard input, which is then closed (else it is empty).
    #[serde(default)]
    pub stdin: Option<String>,
}

/// How a command ended.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Outcome {
    /// Exit code; 128 + signal when killed; [`TIMEOUT_EXIT`] when the timeout ended it.
    pub exit_code: i32,
    /// The timeout ended it.
    pub timed_out: bool,
    /// Some output was dropped (`max_output_bytes`).
    pub truncated: bool,
    /// The kernel killed a process of the sandbox for its memory limit while the command ran
    /// (`[sandbox] memory_max_mib`; usually this command's, exit code 137).
    pub oom_killed: bool,
    /// Wall time.
    pub duration_ms: u64,
}

/// The non-streaming answer.
#[derive(Debug, Serialize)]
pub struct CommandResult {
    /// Exit code (as [`Outcome::exit_code`]).
    pub exit_code: i32,
    /// Standard output (invalid UTF-8 replaced).
    pub stdout: String,
    /// Standard error (invalid UTF-8 replaced).
    pub stderr: String,
    /// The timeout ended it.
    pub timed_out: bool,
    /// Some output was dropped.
    pub truncated: bool,
    /// As [`Outcome::oom_killed`].
    pub oom_killed: bool,
    /// Wall time.
    pub duration_ms: u64,
}

/// Which output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

impl Which {
    fn event(self) -> &'static str {
        match self {
            Which::Stdout => "stdout",
            Which::Stderr => "stderr",
        }
    }
}

/// What a running command reports, in order; [`Piece::Exit`] is last.
#[derive(Debug)]
pub enum Piece {
    /// Output bytes.
    Out(Which, Vec<u8>),
    /// The end.
    Exit(Outcome),
}

/// Everything one run needs, checked.
struct Prepared {
    iso: Arc<Isolated>,
    argv: Vec<String>,
    /// The command's environment, as a file only the command reads (removed on drop).
    _env_file: EnvFile,
    stdin: Option<String>,
    timeout: Duration,
    max_output: usize,
    /// `[sandbox] output_drain_bytes_per_sec`: how fast output past `max_output` is dropped.
    drain_rate: usize,
    cmd: String,
    /// The sandbox's `cgroup.procs` files, which the child joins before it execs.
    joins: Vec<std::fs::File>,
    /// `[sandbox] max_open_files`, set in the child before it execs.
    max_open_files: Option<u64>,
    /// Unless `[sandbox] netlink = true`: the read end of a pipe holding the filter that
    /// refuses netlink, which bwrap installs before the command (`--seccomp`).
    inner_filter: Option<std::os::fd::OwnedFd>,
    _permit: OwnedSemaphorePermit,
}

/// Handles the route: checks, starts the command, answers JSON or `text/event-stream`.
///
/// # Errors
/// 403 `commands_disabled`, 404, 409 `not_isolated`, 400, 429 `too_many_commands`.
pub async fn handle(
    isolation: &Isolation,
    audit: Arc<Audit>,
    id: &str,
    stream: bool,
    req: CommandRequest,
) -> Result<Response, IsolationError> {
    let prepared = prepare(isolation, id, req)?;
    let rx = start(prepared, audit);
    if stream {
        return Ok(sse_response(rx));
    }
    Ok(Json(collect(rx).await).into_response())
}

fn prepare(
    isolation: &Isolation,
    id: &str,
    req: CommandRequest,
) -> Result<Prepared, IsolationError> {
    let cfg = isolation.config();
    if !cfg.commands {
        return Err(IsolationError::CommandsOff);
    }
    let Some(iso) = isolation.get(id) else {
        isolation.sandboxes.get(id)?;
        return Err(IsolationError::NotIsolated(id.to_owned()));
    };
    let bad = |m: String| Err(IsolationError::BadRequest(m));
    if req.cmd.is_empty() || req.cmd.contains('\0') {
        return bad("cmd: must be a non-empty string without NUL".into());
    }
    let timeout = match req.timeout {
        None => cfg.command_timeout,
        Some(t) if t > 0.0 && t <= cfg.max_command_timeout.as_secs_f64() => {
            Duration::from_secs_f64(t)
        }
        Some(_) => {
            return bad(format!(
                "timeout: must be more than 0 and at most {} seconds",
                cfg.max_command_timeout.as_secs()
            ))
        }
    };
    let cwd = cwd_inside(req.cwd.as_deref())?;
    let extra = req.env.unwrap_or_default();
    for (k, v) in &extra {
        check_env(k, v, "env")?;
    }
    let snapshot = iso.sandbox.snapshot();
    if let Some(e) = snapshot
        .secrets()
        .iter()
        .find(|e| extra.contains_key(&*e.name))
    {
        let msg = shadowed_secret("env", &e.name, &snapshot.store_name);
        return bad(msg);
    }
    super::check_env_sizes(&extra, "env")?;
    let run_as = iso.run_as.clone();
    let permit = iso
        .commands
        .clone()
        .try_acquire_owned()
        .map_err(|_| IsolationError::TooManyCommands(id.to_owned(), cfg.max_commands))?;
    let joins = iso.groups.open_procs()?;
    let env_file = EnvFile::write(&iso.dir, &run_as, &environment(&iso, &run_as, extra))?;
    let root = host_root::list(Path::new("/")).map_err(io_err("listing the host's /"))?;
    let inner_filter = match cfg.netlink {
        true => None,
        false => Some(inner_filter().map_err(io_err("writing the command's seccomp filter"))?),
    };
    let ctx = Sandboxed {
        seccomp_fd: inner_filter.as_ref().map(AsRawFd::as_raw_fd),
        netns: &iso.info.name,
        dir: &iso.dir,
        data_dir: &isolation.data_dir,
        run_as: &run_as,
        cwd: &cwd,
        env_file: &env_file.0,
        hidden: &isolation.hidden,
        hidden_dirs: &isolation.hidden_dirs,
        run_binds: &run_binds(&iso.info.name),
        root: &root,
        identity: !run_as.named, // RunAs::identity_files wrote them at create
    };
    Ok(Prepared {
        argv: bwrap_argv(&ctx, &req.cmd),
        _env_file: env_file,
        stdin: req.stdin,
        timeout,
        max_output: cfg.max_output_bytes,
        drain_rate: cfg.output_drain_bytes_per_sec,
        cmd: req.cmd,
        iso,
        joins,
        max_open_files: cfg.max_open_files,
        inner_filter,
        _permit: permit,
    })
}

fn cwd_inside(cwd: Option<&str>) -> Result<String, IsolationError> {
    let Some(c) = cwd.filter(|c| !c.is_empty()) else {
        return Ok(HOME_INSIDE.to_owned());
    };
    if c.contains('\0') || c.len() > 4096 {
        return Err(IsolationError::BadRequest(
            "cwd: must be a path without NUL".into(),
        ));
    }
    Ok(if c.starts_with('/') {
        c.to_owned()
    } else {
        format!("{HOME_INSIDE}/{c}")
    })
}

/// Where and as whom a command runs.
pub struct Sandboxed<'a> {
    /// `ip netns` name.
    pub netns: &'a str,
    /// A descriptor bwrap reads one more seccomp filter from (`--seccomp`), if any.
    pub seccomp_fd: Option<std::os::fd::RawFd>,
    /// The sandbox's directory (`files/home/`, `files/tmp/`, `ca.pem`).
    pub dir: &'a Path,
    /// The daemon's data directory (hidden inside).
    pub data_dir: &'a Path,
    /// The user.
    pub run_as: &'a RunAs,
    /// Working directory inside.
    pub cwd: &'a str,
    /// The command's environment file (bound read-only at [`ENV_INSIDE`]).
    pub env_file: &'a Path,
    /// Host files masked by `/dev/null` (the config file).
    pub hidden: &'a [PathBuf],
    /// Host directories laid over with an empty tmpfs besides `data_dir` (`cert_dir`).
    pub hidden_dirs: &'a [PathBuf],
    /// `(source, target)` files bound back under the fresh `/run` (see [`run_binds`]).
    pub run_binds: &'a [(PathBuf, PathBuf)],
    /// The host's top-level entries ([`host_root::list`]), from which the root is rebuilt.
    pub root: &'a [RootEntry],
    /// The sandbox's own `passwd` and `group` files (its user has no host entry), bound over
    /// `/etc/passwd` and `/etc/group`.
    pub identity: bool,
}

/// The namespace's own `/etc` files (`ip netns exec` binds `/etc/netns/<ns>/*` over
/// `/etc/*`) whose host path resolves under `/run` — on systemd-resolved hosts
/// `/etc/resolv.conf` is a link to `/run/systemd/resolve/stub-resolv.conf`. The sandbox gets a
/// fresh `/run`, so these are bound back at their resolved path, and nothing else of `/run`.
pub fn run_binds(netns: &str) -> Vec<(PathBuf, PathBuf)> {
    let own = Path::new("/etc/netns").join(netns);
    ["resolv.conf", "nsswitch.conf", "hosts"]
        .into_iter()
        .filter_map(|name| {
            let source = own.join(name);
            let target = std::fs::canonicalize(Path::new("/etc").join(name)).ok()?;
            (source.is_file() && target.starts_with("/run")).then_some((source, target))
        })
        .collect()
}

/// The full argv (pure): `ip netns exec` → `bwrap` → `setpriv` → `sh -c cmd`.
///
/// Invariant: inside, the host is read-only and stripped of what could hold a credential or
/// reach a host service: the root is bwrap's own tmpfs, rebuilt from the host's top-level
/// entries ([`Sandboxed::root`], each bound read-only on its own — never `/` as a whole, see
/// [`host_root`] for why) and remounted read-only last; `data_dir`, `/home`,
/// `/tmp`, `/run` (host UNIX sockets such as PostgreSQL's, D-Bus, Docker,
/// systemd-resolved) and `/etc/netns` (every sandbox's namespace files) are fresh and no host
/// entry is bound there; every
/// [`Sandboxed::hidden`] file is masked by `/dev/null` (mounted `nodev`: it cannot even be
/// opened); [`Sandboxed::run_binds`] are bound back, read-only, under the fresh `/run`. The
/// only writable binds are the sandbox's own `tmp/` and `home/`.
pub fn bwrap_argv(s: &Sandboxed<'_>, cmd: &str) -> Vec<String> {
    let mounts = mounts(s);
    let replaced = |p: &str| mounts.iter().any(|m| Path::new(&m.dest) == Path::new(p));
    let mut v: Vec<String> = ["ip", "netns", "exec", s.netns, "bwrap"]
        .map(String::from)
        .to_vec();
    if let Some(fd) = s.seccomp_fd {
        v.extend(["--seccomp".to_owned(), fd.to_string()]);
    }
    v.extend(host_root::argv(s.root, replaced));
    v.extend(mounts.iter().flat_map(Mount::args));
    v.extend(
        [
            "--remount-ro",
            "/",
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--hostname",
            "sandbox",
            "--die-with-parent",
            "--new-session",
            // bwrap changes directory as root: only into the home, which the user owns. The
            // command's own `cwd` is entered by the wrapper, as the user, so a directory the
            // user may not enter stays shut (an outside review read /root/.cargo through
            // `"cwd": "/root/.cargo"` while `ls /root/.cargo` was denied).
            "--chdir",
            HOME_INSIDE,
            "--",
        ]
        .map(String::from),
    );
    v.extend(s.run_as.setpriv_args());
    v.extend(["sh", "-c", ENV_WRAPPER, "sh", cmd, s.cwd].map(String::from));
    v
}

/// One bwrap step laid over the rebuilt root: `OP [SOURCE] DEST`.
struct Mount {
    op: &'static str,
    source: Option<String>,
    dest: String,
}

impl Mount {
    fn new(op: &'static str, source: Option<&Path>, dest: impl AsRef<Path>) -> Mount {
        Mount {
            op,
            source: source.map(|p| p.display().to_string()),
            dest: dest.as_ref().display().to_string(),
        }
    }

    fn args(&self) -> Vec<String> {
        let mut v = vec![self.op.to_owned()];
        v.extend(self.source.clone());
        v.push(self.dest.clone());
        v
    }
}

/// Everything laid over the root, in order (a later step covers an earlier one).
fn mounts(s: &Sandboxed<'_>) -> Vec<Mount> {
    let none = None::<&Path>;
    let mut m: Vec<Mount> = s
        .hidden
        .iter()
        .map(|h| Mount::new("--ro-bind", Some(Path::new("/dev/null")), h))
        .collect();
    m.push(Mount::new("--tmpfs", none, "/run"));
    for (source, target) in s.run_binds {
        m.push(Mount::new("--ro-bind", Some(source), target));
    }
    if s.identity {
        m.push(Mount::new(
            "--ro-bind",
            Some(&s.dir.join("passwd")),
            "/etc/passwd",
        ));
        m.push(Mount::new(
            "--ro-bind",
            Some(&s.dir.join("group")),
            "/etc/group",
        ));
    }
    m.extend([
        // Every namespace's files (`/etc/netns/<ns>`) name the host's sandboxes, other
        // tenants' too, with their slots and creation times; `ip netns exec` has already bound
        // this one's over `/etc`.
        Mount::new("--tmpfs", none, NETNS_ETC),
        Mount::new("--tmpfs", none, s.data_dir),
    ]);
    m.extend(s.hidden_dirs.iter().map(|d| Mount::new("--tmpfs", none, d)));
    m.extend([
        Mount::new("--bind", Some(&s.dir.join(FILES_DIR).join("tmp")), "/tmp"),
        Mount::new("--tmpfs", none, "/home"),
        Mount::new("--bind", Some(&super::home_of(s.dir)), HOME_INSIDE),
        Mount::new("--tmpfs", none, "/run/sealgate"),
        Mount::new("--ro-bind", Some(&s.dir.join("ca.pem")), CA_INSIDE),
        Mount::new("--ro-bind", Some(s.env_file), ENV_INSIDE),
        Mount::new("--dev", none, "/dev"),
        // POSIX shared memory and semaphores (multiprocessing.Pool): bwrap's /dev/shm is
        // root's; the sandbox's own, on its files' tmpfs, counts toward disk_max_mib.
        Mount::new(
            "--bind",
            Some(&s.dir.join(FILES_DIR).join("shm")),
            "/dev/shm",
        ),
        Mount::new("--proc", none, "/proc"),
    ]);
    m
}

/// The namespaces' own `/etc` files, on the host (hidden inside).
const NETNS_ETC: &str = "/etc/netns";

/// Inside: the command's environment file.
pub const ENV_INSIDE: &str = "/run/sealgate/env";
/// Loads the environment file, enters the working directory (`$2`, always absolute, so
/// `CDPATH` plays no part) as the command's user, then runs the command (`$1`) as `sh -c`
/// would.
const ENV_WRAPPER: &str = ". /run/sealgate/env && cd -- \"$2\" && exec /bin/sh -c \"$1\"";

/// The environment of one command, written as `export NAME='value'` lines to
/// `<dir>/cmd-<random>.env` (0400, owned by `run_as`), bound read-only into the sandbox and
/// sourced there. The processes that run as root on the way in (`ip`, `bwrap`, `setpriv`)
/// therefore see only a fixed `PATH`: a request cannot hand them `LD_PRELOAD` or any other
/// variable, and the values never appear in any process's argv.
struct EnvFile(PathBuf);

impl EnvFile {
    fn write(
        dir: &Path,
        run_as: &RunAs,
        env: &BTreeMap<String, String>,
    ) -> Result<EnvFile, IsolationError> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let path = dir.join(format!("cmd-{}.env", crate::random::random_hex(8)));
        let io = |e| IsolationError::Io {
            what: "writing a command's environment file".into(),
            source: e,
        };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o400)
            .open(&path)
            .map_err(io)?;
        let file = EnvFile(path);
        f.write_all(render_env(env).as_bytes()).map_err(io)?;
        std::os::unix::fs::fchown(&f, Some(run_as.uid), Some(run_as.gid)).map_err(io)?;
        Ok(file)
    }
}

impl Drop for EnvFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `export NAME='value'` lines (names are checked identifiers; values single-quoted, each
/// `'` written as `'\''`), so any value — newlines, quotes, `$` — arrives byte for byte.
pub fn render_env(env: &BTreeMap<String, String>) -> String {
    env.iter()
        .map(|(k, v)| format!("export {k}='{}'\n", v.replace('\'', "'\\''")))
        .collect()
}

/// The command's whole environment: a base, the CA variables, the sandbox's `envs`, the
/// request's `env`, then the sealed tokens (later entries win). A variable named like a
/// secret is refused in `envs` and `env`; one that slipped by (a secret added to the store
/// while the sandbox was made) still never hides the token.
fn environment(
    iso: &Isolated,
    run_as: &RunAs,
    extra: BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut env: BTreeMap<String, String> = [
        ("PATH", PATH),
        ("HOME", HOME_INSIDE),
        ("LANG", "C.UTF-8"),
        ("TMPDIR", "/tmp"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    env.insert("USER".into(), run_as.name.clone());
    env.insert("LOGNAME".into(), run_as.name.clone());
    env.insert(SANDBOX_ID_VAR.into(), iso.sandbox.id.to_string());
    for k in CA_VARS {
        env.insert((*k).to_owned(), CA_INSIDE.to_owned());
    }
    env.extend(iso.envs.clone());
    env.extend(extra);
    for e in iso.sandbox.snapshot().secrets() {
        env.insert(e.name.to_string(), e.token.to_string());
    }
    env
}

/// Starts the command in its own task; its pieces arrive on the returned channel.
fn start(p: Prepared, audit: Arc<Audit>) -> mpsc::Receiver<Piece> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let started = Instant::now();
        let outcome = run(&p, &tx, started).await;
        let cmd = scrubbed_cmd(&p.iso.sandbox, &p.cmd);
        audit.command(&CommandEvent {
            sandbox: &p.iso.sandbox.id,
            cmd: audit_cmd(&cmd),
            exit_code: outcome.exit_code,
            timed_out: outcome.timed_out,
            truncated: outcome.truncated,
            oom_killed: outcome.oom_killed,
            duration_ms: outcome.duration_ms,
        });
        let _ = tx.send(Piece::Exit(outcome)).await;
    });
    rx
}

/// The command line with every real value of the sandbox's secrets (and the forms the
/// response scrubber knows) replaced by its token: an operator who writes a value into `cmd`
/// must not find it in the audit log (found from outside). Scrubbed whole, before any cut, so
/// no prefix of a value can survive at the end of a cut line.
fn scrubbed_cmd<'a>(sandbox: &crate::sandbox::Sandbox, cmd: &'a str) -> Cow<'a, str> {
    let scrubbed = sandbox
        .snapshot()
        .scrubber()
        .and_then(|s| s.scrub(cmd.as_bytes()));
    match scrubbed {
        Some((bytes, _)) => Cow::Owned(String::from_utf8_lossy(&bytes).into_owned()),
        None => Cow::Borrowed(cmd),
    }
}

/// The command line as audited: at most [`AUDIT_CMD_BYTES`], cut at a character boundary.
pub fn audit_cmd(cmd: &str) -> &str {
    let mut end = cmd.len().min(AUDIT_CMD_BYTES);
    while !cmd.is_char_boundary(end) {
        end -= 1;
    }
    &cmd[..end]
}

/// Spawn → output pumps and stdin → wait (or kill at the timeout or when the client left)
/// → drain → outcome.
async fn run(p: &Prepared, tx: &mpsc::Sender<Piece>, started: Instant) -> Outcome {
    let elapsed = || started.elapsed().as_millis() as u64;
    let ooms = p.iso.groups.oom_kills();
    let mut child = match command(p).spawn() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(sandbox = %p.iso.sandbox.id, error = %e, "cannot start a command");
            let msg = format!("sealgate: cannot start the command: {e}\n").into_bytes();
            let _ = tx.send(Piece::Out(Which::Stderr, msg)).await;
            return Outcome::failed(127, elapsed());
        }
    };
    let truncated = Arc::new(AtomicBool::new(false));
    let mut pumps = start_io(&mut child, p, tx, &truncated);
    let Some((status, timed_out)) = wait_or_kill(&mut child, p.timeout, tx).await else {
        return Outcome::failed(137, elapsed());
    };
    let _ = tokio::time::timeout(DRAIN_GRACE, async {
        while pumps.join_next().await.is_some() {}
    })
    .await;
    // Killed because the sandbox's own lifetime ended (expiry tears the namespace down).
    let expired =
        exit_code(status) >= 128 && p.iso.sandbox.is_expired(time::OffsetDateTime::now_utc());
    let timed_out = timed_out || expired;
    Outcome {
        exit_code: if timed_out {
            TIMEOUT_EXIT
        } else {
            exit_code(status)
        },
        timed_out,
        truncated: truncated.load(Ordering::Acquire),
        oom_killed: p.iso.groups.oom_kills() > ooms,
        duration_ms: elapsed(),
    }
}

impl Outcome {
    fn failed(exit_code: i32, duration_ms: u64) -> Outcome {
        Outcome {
            exit_code,
            timed_out: false,
            truncated: false,
            oom_killed: false,
            duration_ms,
        }
    }
}

/// The process: its own process group (so a timeout kills all of it), nothing but a fixed
/// `PATH` in its environment (the command's own comes from its [`EnvFile`]), piped output.
fn command(p: &Prepared) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(&p.argv[0]);
    let stdin = if p.stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    };
    cmd.args(&p.argv[1..])
        .env_clear()
        .env("PATH", PATH)
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let joins: Vec<std::os::fd::RawFd> = p.joins.iter().map(AsRawFd::as_raw_fd).collect();
    let max_open_files = p.max_open_files;
    // The launcher's filter lets netlink through (`ip netns exec` needs it); the command's own
    // (`inner_filter`, installed by bwrap) refuses it unless `[sandbox] netlink = true`.
    let filter = super::seccomp::program(true);
    let inner_fd = p.inner_filter.as_ref().map(AsRawFd::as_raw_fd);
    // SAFETY: the closure makes only async-signal-safe calls (open, write, close, prctl,
    // close_range, getrlimit, setrlimit, fcntl) and allocates nothing, as code between fork and exec
    // must; the descriptors in `joins` stay open in `p` until the spawn has returned.
    unsafe {
        cmd.pre_exec(move || {
            crate::limits::cgroup::join_in_child(&joins)?;
            crate::limits::cgroup::prefer_oom_kill_in_child();
            match max_open_files {
                Some(n) => crate::nofile::limit_in_child(n)?,
                None => crate::nofile::restore_in_child()?,
            }
            crate::core_dumps::restore_in_child()?;
            super::seccomp::install_in_child(&filter)?;
            super::fds::cloexec_in_child()?;
            match inner_fd {
                Some(fd) => super::fds::inherit_in_child(fd),
                None => Ok(()),
            }
        });
    }
    cmd
}

/// A pipe holding the filter that refuses netlink ([`super::seccomp::program`]`(false)`), its
/// write end closed: bwrap reads it to its end. It fits the pipe's buffer (a few hundred
/// bytes), so the write never blocks.
fn inner_filter() -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd as _;
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 writes two descriptors into the array we own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just opened and are owned here alone.
    let (reader, writer) = unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    };
    let prog = super::seccomp::program(false);
    std::io::Write::write_all(&mut &writer, &super::seccomp::to_bytes(&prog))?;
    Ok(reader)
}

/// Starts one pump per output stream and the stdin writer.
fn start_io(
    child: &mut tokio::process::Child,
    p: &Prepared,
    tx: &mpsc::Sender<Piece>,
    truncated: &Arc<AtomicBool>,
) -> tokio::task::JoinSet<()> {
    let mut pumps = tokio::task::JoinSet::new();
    let caps = (p.max_output, p.drain_rate);
    if let Some(out) = child.stdout.take() {
        let (tx, t) = (tx.clone(), truncated.clone());
        pumps.spawn(pump(out, Which::Stdout, caps, tx, t));
    }
    if let Some(err) = child.stderr.take() {
        let (tx, t) = (tx.clone(), truncated.clone());
        pumps.spawn(pump(err, Which::Stderr, caps, tx, t));
    }
    if let (Some(mut sink), Some(input)) = (child.stdin.take(), p.stdin.clone()) {
        tokio::spawn(async move {
            let _ = sink.write_all(input.as_bytes()).await;
        });
    }
    pumps
}

/// Waits for the command; at the timeout, or when the client went away, SIGKILLs its process
/// group. Returns the exit status and whether the timeout ended it (None if the status could
/// not be read).
async fn wait_or_kill(
    child: &mut tokio::process::Child,
    timeout: Duration,
    tx: &mpsc::Sender<Piece>,
) -> Option<(std::process::ExitStatus, bool)> {
    let pgid = child.id();
    let status = tokio::select! {
        st = child.wait() => st.ok(),
        _ = tokio::time::sleep(timeout) => None,
        _ = tx.closed() => None,
    };
    if let Some(st) = status {
        return Some((st, false));
    }
    let timed_out = !tx.is_closed();
    kill_group(pgid);
    let _ = child.start_kill();
    child.wait().await.ok().map(|st| (st, timed_out))
}

/// SIGKILL to the command's process group (bwrap and everything it started outside its
/// PID namespace; inside, the namespace dies with its first process).
fn kill_group(pgid: Option<u32>) {
    let Some(pgid) = pgid
        .and_then(|p| libc::pid_t::try_from(p).ok())
        .filter(|p| *p > 1)
    else {
        return;
    };
    // SAFETY: killpg(2) takes two integers and touches no memory of ours; `pgid` is the
    // positive process-group id of a child we spawned as a group leader (`process_group(0)`).
    unsafe {
        libc::killpg(pgid, libc::SIGKILL);
    }
}

/// The exit code a shell would report: the code, or 128 + the signal that killed it.
fn exit_code(st: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0))
}

/// Reads one output stream to its end; forwards up to `cap` bytes (`caps.0`), then drains the
/// rest at `caps.1` bytes a second ([`drain`]).
async fn pump(
    mut r: impl AsyncRead + Unpin,
    which: Which,
    caps: (usize, usize),
    tx: mpsc::Sender<Piece>,
    truncated: Arc<AtomicBool>,
) {
    let (cap, rate) = caps;
    let mut buf = vec![0u8; 16 * 1024];
    let mut sent = 0usize;
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let keep = n.min(cap - sent);
        // Said before the kept part goes: a slow event-stream reader can hold that send until
        // the command's drain grace aborts this task, and the exit event must still say it
        // (review h45d).
        if keep < n {
            truncated.store(true, Ordering::Release);
        }
        if keep > 0 {
            sent += keep;
            if tx
                .send(Piece::Out(which, buf[..keep].to_vec()))
                .await
                .is_err()
            {
                return;
            }
        }
        if keep < n {
            return drain(r, rate).await;
        }
    }
}

/// Output past the cap: read and dropped at most `rate` bytes a second, to its end. A command
/// that writes faster (`cat /dev/zero`) then waits on its own full pipe, on its own CPU share,
/// where the daemon had copied and dropped its output as fast as it came: 8 such commands in
/// one sandbox took 0.74 of a core of the daemon's and tripled other sandboxes' p90 latency
/// through the proxy (outside pass h45b). Costs the command nothing at ordinary output rates.
///
/// Paced against a schedule (each read moves the next read's time on by `n / rate`), not by a
/// sleep per read: the timer wakes up to a millisecond late, which per 16 KiB read had held the
/// default 16 MiB/s to 7 and no setting above 13 (review h45c). A reader more than
/// [`DRAIN_SLACK`] behind its schedule (a command that paused) starts a new one from now, so
/// at most that much credit is saved up for a burst.
async fn drain(mut r: impl AsyncRead + Unpin, rate: usize) {
    let rate = rate.max(1) as f64;
    let mut buf = vec![0u8; DRAIN_READ];
    let mut due = tokio::time::Instant::now();
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let now = tokio::time::Instant::now();
        if now > due + DRAIN_SLACK {
            due = now;
        }
        due += Duration::from_secs_f64(n as f64 / rate);
        tokio::time::sleep_until(due).await;
    }
}

/// How far behind its schedule a draining stream may fall before the schedule starts again.
const DRAIN_SLACK: Duration = Duration::from_millis(100);

/// The most one read of a draining stream takes: a pipe's default capacity, so a writer that
/// filled it is emptied in one read (a wake-up per 64 KiB, not per 16).
const DRAIN_READ: usize = 64 * 1024;

async fn collect(mut rx: mpsc::Receiver<Piece>) -> CommandResult {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let mut outcome = None;
    while let Some(p) = rx.recv().await {
        match p {
            Piece::Out(Which::Stdout, b) => out.extend_from_slice(&b),
            Piece::Out(Which::Stderr, b) => err.extend_from_slice(&b),
            Piece::Exit(o) => outcome = Some(o),
        }
    }
    let o = outcome.unwrap_or(Outcome::failed(137, 0));
    CommandResult {
        exit_code: o.exit_code,
        stdout: String::from_utf8_lossy(&out).into_owned(),
        stderr: String::from_utf8_lossy(&err).into_owned(),
        timed_out: o.timed_out,
        truncated: o.truncated,
        oom_killed: o.oom_killed,
        duration_ms: o.duration_ms,
    }
}

/// `text/event-stream`: `stdout` / `stderr` events with `{"data": text}`, then one `exit`
/// event with the [`Outcome`]. Multi-byte characters split across reads are held back until
/// complete, so every event's text is valid UTF-8 as the command wrote it.
fn sse_response(rx: mpsc::Receiver<Piece>) -> Response {
    let state = (rx, Utf8Carry::default(), Utf8Carry::default());
    let stream = futures_util::stream::unfold(state, |(mut rx, mut out, mut err)| async move {
        let frame = loop {
            match rx.recv().await? {
                Piece::Out(w, bytes) => {
                    let carry = if w == Which::Stdout {
                        &mut out
                    } else {
                        &mut err
                    };
                    // A chunk that only began a UTF-8 sequence has no text yet: no event.
                    let text = carry.push(&bytes);
                    if !text.is_empty() {
                        break sse_frame(w.event(), &serde_json::json!({ "data": text }));
                    }
                }
                Piece::Exit(o) => break exit_frames(o, &mut out, &mut err),
            }
        };
        Some((Ok::<_, Infallible>(Bytes::from(frame)), (rx, out, err)))
    });
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}

/// The last text held back of each stream, then the `exit` event.
fn exit_frames(o: Outcome, out: &mut Utf8Carry, err: &mut Utf8Carry) -> String {
    let mut frame = String::new();
    for (w, carry) in [(Which::Stdout, out), (Which::Stderr, err)] {
        let rest = carry.finish();
        if !rest.is_empty() {
            frame.push_str(&sse_frame(w.event(), &serde_json::json!({ "data": rest })));
        }
    }
    frame.push_str(&sse_frame(
        "exit",
        &serde_json::to_value(o).unwrap_or_default(),
    ));
    frame
}

fn sse_frame(event: &str, data: &serde_json::Value) -> String {
    format!("event: {event}\ndata: {data}\n\n")
}

/// Holds back an incomplete UTF-8 sequence at the end of a chunk until the next one.
#[derive(Default)]
pub struct Utf8Carry {
    pending: Vec<u8>,
}

impl Utf8Carry {
    /// The text of everything received so far except an incomplete trailing sequence
    /// (invalid bytes become U+FFFD).
    pub fn push(&mut self, chunk: &[u8]) -> String {
        self.pending.extend_from_slice(chunk);
        let split = self.pending.len() - incomplete_tail(&self.pending);
        let text = String::from_utf8_lossy(&self.pending[..split]).into_owned();
        self.pending.drain(..split);
        text
    }

    /// Whatever is still held (at the end of the stream).
    pub fn finish(&mut self) -> String {
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        text
    }
}

/// Length of an incomplete UTF-8 sequence at the end of `b` (0 to 3).
fn incomplete_tail(b: &[u8]) -> usize {
    for k in 1..=b.len().min(3) {
        let byte = b[b.len() - k];
        if byte & 0xC0 == 0x80 {
            continue; // continuation byte: look further back for the lead
        }
        let need = match byte {
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF7 => 4,
            _ => 0,
        };
        return if need > k { k } else { 0 };
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream drained on paused time: `total` bytes at `rate` take `total / rate`, whatever
    /// the size of each read (the schedule, not a sleep per read).
    #[tokio::test(start_paused = true)]
    async fn a_drained_stream_keeps_its_rate() {
        for (total, rate) in [
            (10 << 20, 1 << 20),
            (64 << 20, 16 << 20),
            (1 << 20, 256 << 20),
        ] {
            let data = vec![0u8; total];
            let started = tokio::time::Instant::now();
            drain(&data[..], rate).await;
            let took = started.elapsed().as_secs_f64();
            let want = total as f64 / rate as f64;
            assert!(
                (took - want).abs() < 0.001,
                "{total} at {rate}: {took} s, not {want}"
            );
        }
    }

    /// A writer that pauses past the slack gets no burst of credit for the pause.
    #[tokio::test(start_paused = true)]
    async fn a_pause_saves_no_credit_past_the_slack() {
        let (mut w, r) = tokio::io::duplex(DRAIN_READ);
        let rate = 1 << 20;
        let drained = tokio::spawn(drain(r, rate));
        w.write_all(&[0u8; 64 * 1024]).await.unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
        let started = tokio::time::Instant::now();
        for _ in 0..32 {
            w.write_all(&[0u8; 64 * 1024]).await.unwrap();
        }
        drop(w);
        drained.await.unwrap();
        let took = started.elapsed().as_secs_f64();
        // 2 MiB at 1 MiB/s, less the slack's credit and what the pipe holds.
        assert!(took > 1.8 && took < 2.1, "{took}");
    }
    use crate::isolation::host_root::tests::{bind, link};
    use proptest::prelude::*;

    /// A read that only began a multi-byte character yields no event (an outside test saw
    /// `{"data":""}` events, handed to the SDK's `on_stdout` as empty strings).
    #[tokio::test]
    async fn a_chunk_holding_only_part_of_a_character_sends_no_event() {
        use http_body_util::BodyExt as _;
        let (tx, rx) = mpsc::channel(8);
        let euro = "€".as_bytes();
        tx.send(Piece::Out(Which::Stdout, euro[..1].to_vec()))
            .await
            .unwrap();
        tx.send(Piece::Out(Which::Stdout, euro[1..].to_vec()))
            .await
            .unwrap();
        tx.send(Piece::Exit(Outcome::failed(0, 1))).await.unwrap();
        drop(tx);
        let body = sse_response(rx)
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes();
        let text = String::from_utf8(body.to_vec()).unwrap();
        assert_eq!(text.matches("event: stdout").count(), 1, "{text}");
        assert!(text.contains("data: {\"data\":\"€\"}"), "{text}");
        assert!(!text.contains("\"data\":\"\""), "{text}");
    }

    #[test]
    fn utf8_split_anywhere_reassembles() {
        let text = "a→b😀c";
        let bytes = text.as_bytes();
        for cut in 0..=bytes.len() {
            let mut c = Utf8Carry::default();
            let mut got = c.push(&bytes[..cut]);
            got.push_str(&c.push(&bytes[cut..]));
            got.push_str(&c.finish());
            assert_eq!(got, text, "cut at {cut}");
        }
        let mut c = Utf8Carry::default();
        assert_eq!(c.push(b"x\xffy"), "x\u{fffd}y");
    }

    #[test]
    fn env_file_round_trips_through_sh() {
        let env: BTreeMap<String, String> = [
            ("A".to_owned(), "it's $HOME `x` \"q\"\nline2\\".to_owned()),
            ("B".to_owned(), String::new()),
        ]
        .into();
        let text = render_env(&env);
        let out = std::process::Command::new("sh")
            .args(["-c", &format!("{text}printf '%s|%s' \"$A\" \"$B\"")])
            .env_clear()
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8(out.stdout).unwrap(),
            format!("{}|", env["A"])
        );
    }

    #[test]
    fn audit_cmd_is_cut_at_a_char_boundary() {
        assert_eq!(audit_cmd("echo hi"), "echo hi");
        let long = "é".repeat(200);
        let cut = audit_cmd(&long);
        assert!(cut.len() <= AUDIT_CMD_BYTES && cut.len() >= AUDIT_CMD_BYTES - 1);
    }

    fn nobody() -> RunAs {
        RunAs {
            uid: 65534,
            gid: 65534,
            named: true,
            name: "nobody".into(),
        }
    }

    /// The argv for a fixed sandbox (`data_dir` `/d`) on a host whose `/` is `root`.
    fn argv_on(root: &[RootEntry], cmd: &str) -> Vec<String> {
        let run_as = nobody();
        let s = Sandboxed {
            netns: "sealgate-0005",
            seccomp_fd: None,
            dir: Path::new("/d/sandboxes/sbx_1"),
            data_dir: Path::new("/d"),
            run_as: &run_as,
            cwd: "/home/user",
            env_file: Path::new("/d/sandboxes/sbx_1/cmd-1.env"),
            hidden: &[PathBuf::from("/etc/sealgate/proxy.toml")],
            hidden_dirs: &[PathBuf::from("/srv/certs")],
            run_binds: &[(
                PathBuf::from("/etc/netns/sealgate-0005/resolv.conf"),
                PathBuf::from("/run/systemd/resolve/stub-resolv.conf"),
            )],
            root,
            identity: true,
        };
        bwrap_argv(&s, cmd)
    }

    /// Paths a later mount replaces in [`argv_on`]'s sandbox.
    const REPLACED: [&str; 6] = ["/d", "/dev", "/home", "/proc", "/run", "/tmp"];

    #[test]
    fn argv_confines_in_the_documented_order() {
        let root = [
            link("/bin", "usr/bin"),
            bind("/d"),
            bind("/dev"),
            bind("/etc"),
            bind("/home"),
            bind("/proc"),
            bind("/run"),
            bind("/tmp"),
            bind("/usr"),
        ];
        let v = argv_on(&root, "echo $X");
        let line = v.join(" ");
        assert!(
            line.starts_with(
                "ip netns exec sealgate-0005 bwrap \
                 --symlink usr/bin /bin --ro-bind-try /etc /etc --ro-bind-try /usr /usr \
                 --ro-bind /dev/null /etc/sealgate/proxy.toml --tmpfs /run \
                 --ro-bind /etc/netns/sealgate-0005/resolv.conf /run/systemd/resolve/stub-resolv.conf \
                 --ro-bind /d/sandboxes/sbx_1/passwd /etc/passwd \
                 --ro-bind /d/sandboxes/sbx_1/group /etc/group \
                 --tmpfs /etc/netns --tmpfs /d --tmpfs /srv/certs "
            ),
            "{line}"
        );
        assert!(line.contains("--bind /d/sandboxes/sbx_1/files/tmp /tmp"));
        assert!(line.contains("--bind /d/sandboxes/sbx_1/files/home /home/user"));
        assert!(line.contains("--ro-bind /d/sandboxes/sbx_1/ca.pem /run/sealgate/ca.pem"));
        assert!(line.contains(
            "--dev /dev --bind /d/sandboxes/sbx_1/files/shm /dev/shm --proc /proc \
             --remount-ro / --unshare-pid"
        ));
        assert!(line.contains("--die-with-parent"));
        assert!(line.contains("setpriv --reuid 65534 --regid 65534 --init-groups --no-new-privs"));
        assert!(line.contains("--ro-bind /d/sandboxes/sbx_1/cmd-1.env /run/sealgate/env"));
        assert!(!line.contains("--ro-bind / /"), "{line}");
        for p in REPLACED {
            assert!(
                !line.contains(&format!("--ro-bind-try {p} ")),
                "{p}: {line}"
            );
        }
        assert_eq!(
            &v[v.len() - 6..],
            ["sh", "-c", ENV_WRAPPER, "sh", "echo $X", "/home/user"]
        );
        assert_eq!(cwd_inside(Some("sub")).unwrap(), "/home/user/sub");
        assert_eq!(cwd_inside(None).unwrap(), "/home/user");
        assert!(cwd_inside(Some("a\0b")).is_err());
    }

    #[test]
    fn links_are_recreated_even_where_a_mount_follows_them() {
        // Silverblue: /home -> var/home; the tmpfs over /home must land on /var/home.
        let root = [
            link("/home", "var/home"),
            link("/tmp", "var/tmp"),
            bind("/var"),
        ];
        let line = argv_on(&root, "true").join(" ");
        assert!(
            line.contains(
                "bwrap --symlink var/home /home --symlink var/tmp /tmp --ro-bind-try /var /var \
                 --ro-bind /dev/null"
            ),
            "{line}"
        );
    }

    /// bwrap's steps in `v`, each with its arguments, up to `--`.
    fn bwrap_steps(v: &[String]) -> Vec<(&str, Vec<&str>)> {
        let mut rest = v.iter().skip_while(|a| *a != "bwrap").skip(1);
        let mut steps = Vec::new();
        while let Some(op) = rest.next().filter(|a| *a != "--") {
            let n = match op.as_str() {
                "--symlink" | "--ro-bind-try" | "--ro-bind" | "--bind" => 2,
                "--tmpfs" | "--dev" | "--proc" | "--remount-ro" | "--hostname" | "--chdir" => 1,
                _ => 0,
            };
            let args = rest.by_ref().take(n).map(String::as_str).collect();
            steps.push((op.as_str(), args));
        }
        steps
    }

    fn root_entry() -> impl Strategy<Value = RootEntry> {
        let name = prop_oneof![
            Just("run".to_owned()),
            Just("tmp".to_owned()),
            Just("home".to_owned()),
            Just("proc".to_owned()),
            Just("dev".to_owned()),
            Just("d".to_owned()),
            "[a-z -]{1,6}",
        ];
        let target = prop_oneof![Just("/run".to_owned()), "[a-z/.-]{1,8}"];
        (name, proptest::option::of(target)).prop_map(|(n, t)| match t {
            Some(t) => link(&format!("/{n}"), &t),
            None => bind(&format!("/{n}")),
        })
    }

    proptest! {
        /// Whatever the host's `/` holds: nothing of it is bound writable or at a path a
        /// later mount replaces, no host path under `/run` is bound at all, every link is
        /// recreated, and the root is made read-only after the last mount.
        #[test]
        fn no_host_root_gives_the_sandbox_a_writable_host_path_or_the_host_run(
            root in proptest::collection::vec(root_entry(), 0..12),
        ) {
            let v = argv_on(&root, "true");
            let steps = bwrap_steps(&v);
            let binds = |op: &str| -> Vec<Vec<&str>> {
                steps.iter().filter(|(o, _)| *o == op).map(|(_, a)| a.clone()).collect()
            };
            for a in binds("--bind") {
                prop_assert!(a[0].starts_with("/d/sandboxes/sbx_1/"), "{a:?}");
            }
            for a in binds("--ro-bind-try").iter().chain(&binds("--ro-bind")) {
                prop_assert!(!Path::new(a[0]).starts_with("/run"), "{a:?}");
                prop_assert!(!REPLACED.contains(&a[0]), "{a:?}");
            }
            for e in &root {
                let found = match e {
                    RootEntry::Symlink { path, target } => {
                        binds("--symlink").contains(&vec![target.as_str(), path.as_str()])
                    }
                    RootEntry::Bind(p) => {
                        REPLACED.contains(&p.as_str())
                            || binds("--ro-bind-try").contains(&vec![p.as_str(), p.as_str()])
                    }
                };
                prop_assert!(found, "{e:?}");
            }
            let last_mount = steps.iter().rposition(|(o, _)| o.starts_with("--ro-bind")
                || ["--bind", "--tmpfs", "--dev", "--proc", "--symlink"].contains(o));
            let ro = steps.iter().position(|s| *s == ("--remount-ro", vec!["/"]));
            prop_assert!(ro.is_some() && ro > last_mount, "{steps:?}");
        }
    }
}
