//! `sealgate sandbox exec` (run a command in a network namespace whose only way out is the
//! daemon's transparent listener) and `sealgate sandbox rules` (print a sandbox's rule set).
//!
//! exec creates the sandbox through the admin API with the namespace's address as its
//! `source_ip`, runs `ip netns exec <ns> CMD…` with the sealed `env` and the CA variables set
//! (proxy variables removed: none are needed), streams its output, and returns its exit code
//! (128 + signal when it was killed, 124 when the sandbox's timeout ended it). Namespace,
//! rules, files and sandbox are removed on every way out: CMD exits or fails, Ctrl-C, SIGTERM,
//! SIGHUP, the timeout, or a setup error; a run killed with SIGKILL is cleaned up by the next.
//!
//! The DNS responder runs inside this process (it needs nothing from the daemon but the
//! store's allowlist, which it re-reads every two seconds), so a namespace's DNS lives and dies
//! with the exec that made it, and the daemon stays free of per-namespace sockets.

mod session;
mod state;

use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use http::Method;
use serde_json::Value;
use tokio::signal::unix::{signal, Signal, SignalKind};

use super::client::AdminClient;
use crate::config::Config;
use crate::netns::{Plan, RuleParams, RuleSet};
use session::{Session, SetupArgs};
use state::Record;

/// Default transparent port when neither the flag nor the config names one.
const DEFAULT_TRANSPARENT_PORT: u16 = 3129;
/// After forwarding a signal, how long CMD gets to exit before SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(3);
/// Exit code when the sandbox's timeout ended CMD (as `timeout(1)`).
const TIMEOUT_EXIT: i32 = 124;
/// Proxy variables removed from CMD's environment: in a namespace every connection is
/// redirected anyway, and a stale `HTTPS_PROXY` would point at an unreachable loopback.
const PROXY_VARS: &[&str] = &[
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "no_proxy",
];
/// Variables pointed at the sandbox's CA certificate (DESIGN §7 "Clients").
const CA_VARS: &[&str] = &[
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "NODE_EXTRA_CA_CERTS",
    "GIT_SSL_CAINFO",
];

/// `sealgate sandbox exec` options.
#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Store name or id.
    #[arg(long)]
    pub store: String,
    /// Sandbox lifetime in seconds; CMD is ended when it runs out.
    #[arg(long)]
    pub timeout: Option<u64>,
    /// The daemon's transparent listener port (default: from `[proxy] transparent_listen` of
    /// --config, else 3129).
    #[arg(long, env = "SEALGATE_TRANSPARENT_PORT")]
    pub transparent_port: Option<u16>,
    /// Run CMD as USER[:GROUP] (name or number) through `setpriv`, with `no_new_privs`.
    /// Recommended for untrusted code: a root process can leave any network namespace.
    #[arg(long, value_name = "USER[:GROUP]")]
    pub user: Option<String>,
    /// Print what was set up (namespace, addresses, sandbox id) on stderr.
    #[arg(long, short)]
    pub verbose: bool,
    /// The command and its arguments (after `--`).
    #[arg(last = true, required = true, num_args = 1..)]
    pub cmd: Vec<String>,
}

/// `sealgate sandbox rules` options.
#[derive(Debug, Args)]
pub struct RulesArgs {
    /// Sandbox id.
    pub id: String,
    /// Host-side interface the sandbox's traffic arrives on (default: the one `sandbox exec`
    /// uses for the sandbox's source IP).
    #[arg(long)]
    pub interface: Option<String>,
    /// The daemon's transparent listener port (default as for `exec`).
    #[arg(long, env = "SEALGATE_TRANSPARENT_PORT")]
    pub transparent_port: Option<u16>,
    /// Port of a DNS responder to REDIRECT UDP/TCP 53 to (default: the running exec's, else
    /// none: DNS is dropped like all other UDP).
    #[arg(long)]
    pub dns_port: Option<u16>,
    /// Omit the ip6tables rules.
    #[arg(long)]
    pub no_ipv6: bool,
}

fn transparent_port(flag: Option<u16>, config: Option<&Path>) -> anyhow::Result<u16> {
    if let Some(p) = flag {
        return Ok(p);
    }
    let cfg = Config::load(config).context("loading the config for [proxy] transparent_listen")?;
    Ok(cfg
        .proxy
        .transparent_listen
        .map(|a| a.port())
        .filter(|p| *p != 0)
        .unwrap_or(DEFAULT_TRANSPARENT_PORT))
}

/// Runs `sandbox exec`; returns CMD's exit code. Everything is cleaned up before it returns.
///
/// # Errors
/// Setup failures (nothing is left behind then).
pub async fn exec(c: &AdminClient, a: &ExecArgs, config: Option<&Path>) -> anyhow::Result<i32> {
    let port = transparent_port(a.transparent_port, config)?;
    let user = a.user.as_deref().map(RunAs::resolve).transpose()?;
    let mut signals = Signals::new()?;
    session::sweep_stale(c).await;
    let store = find_store(c, &a.store).await?;
    let setup = SetupArgs {
        store: &store,
        timeout: a.timeout,
        transparent_port: port,
    };
    let mut s = Session::setup(c, &setup).await?;
    if a.verbose {
        describe(&s);
    }
    let code = run_cmd(&s, &a.cmd, user.as_ref(), &mut signals).await;
    s.teardown(c).await;
    code
}

fn describe(s: &Session) {
    let p = &s.record.plan;
    eprintln!(
        "sealgate: sandbox {} in namespace {} ({} via {} on {})",
        s.sandbox_id(),
        p.netns,
        p.ns_ip,
        p.host_ip,
        p.host_if
    );
}

async fn find_store(c: &AdminClient, id_or_name: &str) -> anyhow::Result<Value> {
    let all = c.call(Method::GET, "/v1/stores", None).await?;
    all.as_array()
        .into_iter()
        .flatten()
        .find(|s| s["id"] == id_or_name || s["name"] == id_or_name)
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("no store with id or name '{id_or_name}'"))
}

/// How the wait for CMD ended.
enum Ended {
    Exited(std::process::ExitStatus),
    Signalled(i32),
    TimedOut,
}

async fn run_cmd(
    s: &Session,
    cmd: &[String],
    user: Option<&RunAs>,
    signals: &mut Signals,
) -> anyhow::Result<i32> {
    let mut child = command(s, cmd, user)
        .spawn()
        .context("starting `ip netns exec`")?;
    let ended = tokio::select! {
        st = child.wait() => Ended::Exited(st?),
        sig = signals.recv() => Ended::Signalled(sig),
        _ = tokio::time::sleep(remaining(&s.sandbox)) => Ended::TimedOut,
    };
    let forward = match ended {
        Ended::Exited(st) => return Ok(exit_code(st)),
        Ended::Signalled(sig) => sig,
        Ended::TimedOut => {
            eprintln!("sealgate: the sandbox's timeout ran out; ending the command");
            libc::SIGTERM
        }
    };
    if let Some(pid) = child.id() {
        let _ = crate::netns::signal(pid, forward);
    }
    let status = tokio::select! {
        st = tokio::time::timeout(KILL_GRACE, child.wait()) => st.ok().and_then(Result::ok),
        _ = signals.recv() => None,
    };
    let status = match status {
        Some(st) => st,
        None => {
            let _ = child.start_kill();
            child.wait().await?
        }
    };
    Ok(match ended {
        Ended::TimedOut => TIMEOUT_EXIT,
        _ => exit_code(status),
    })
}

fn command(s: &Session, cmd: &[String], user: Option<&RunAs>) -> tokio::process::Command {
    let mut c = tokio::process::Command::new("ip");
    c.args(["netns", "exec", &s.record.plan.netns]);
    if let Some(u) = user {
        c.args(u.setpriv_args());
        if let Some(home) = &u.home {
            c.env("HOME", home);
        }
    }
    c.args(cmd).kill_on_drop(true);
    for k in PROXY_VARS {
        c.env_remove(k);
    }
    if let Some(env) = s.sandbox["env"].as_object() {
        for (k, v) in env {
            c.env(k, v.as_str().unwrap_or_default());
        }
    }
    for k in CA_VARS {
        c.env(k, &s.ca_path);
    }
    c.env("SEALGATE_SANDBOX_ID", s.sandbox_id());
    c
}

/// Who CMD runs as with `--user`.
#[derive(Debug, PartialEq, Eq)]
struct RunAs {
    uid: u32,
    gid: u32,
    /// Known to the passwd database (then its supplementary groups are set, else none).
    named: bool,
    home: Option<String>,
}

impl RunAs {
    /// Resolves `USER[:GROUP]` (names or numbers) with `getent`.
    fn resolve(spec: &str) -> anyhow::Result<RunAs> {
        let (user, group) = match spec.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (spec, None),
        };
        let entry = getent("passwd", user);
        let field = |i: usize| entry.as_ref().and_then(|e| e.get(i)).cloned();
        let uid = match field(2).or_else(|| user.parse::<u32>().ok().map(|n| n.to_string())) {
            Some(u) => u.parse()?,
            None => anyhow::bail!("--user: no such user '{user}'"),
        };
        let gid = match group {
            Some(g) => match getent("group", g).and_then(|e| e.get(2).cloned()) {
                Some(id) => id.parse()?,
                None => g
                    .parse()
                    .map_err(|_| anyhow::anyhow!("--user: no such group '{g}'"))?,
            },
            None => field(3).map_or(Ok(uid), |g| g.parse())?,
        };
        Ok(RunAs {
            uid,
            gid,
            named: entry.is_some(),
            home: field(5),
        })
    }

    /// `setpriv` (util-linux) arguments that run the rest of argv as this user.
    fn setpriv_args(&self) -> Vec<String> {
        let groups = if self.named {
            "--init-groups"
        } else {
            "--clear-groups"
        };
        [
            "setpriv",
            "--reuid",
            &self.uid.to_string(),
            "--regid",
            &self.gid.to_string(),
            groups,
            "--no-new-privs",
            "--",
        ]
        .map(String::from)
        .to_vec()
    }
}

/// One `getent DB KEY` entry split at `:`, or None.
fn getent(db: &str, key: &str) -> Option<Vec<String>> {
    let out = std::process::Command::new("getent")
        .args([db, key])
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let line = text.lines().next().filter(|_| out.status.success())?;
    Some(line.split(':').map(str::to_owned).collect())
}

/// Time left until the sandbox's `expires_at` (a day when it cannot be read).
fn remaining(sandbox: &Value) -> Duration {
    let fallback = Duration::from_secs(86_400);
    let Some(text) = sandbox["expires_at"].as_str() else {
        return fallback;
    };
    let fmt = time::format_description::well_known::Rfc3339;
    let Ok(at) = time::OffsetDateTime::parse(text, &fmt) else {
        return fallback;
    };
    let left = at - time::OffsetDateTime::now_utc();
    Duration::try_from(left).unwrap_or(Duration::ZERO)
}

/// The exit code a shell would report: the code, or 128 + the signal that killed it.
fn exit_code(st: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0))
}

/// SIGINT, SIGTERM and SIGHUP, caught from the start so no signal skips cleanup.
struct Signals {
    int: Signal,
    term: Signal,
    hup: Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Self> {
        Ok(Signals {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// The next signal's number.
    async fn recv(&mut self) -> i32 {
        tokio::select! {
            _ = self.int.recv() => libc::SIGINT,
            _ = self.term.recv() => libc::SIGTERM,
            _ = self.hup.recv() => libc::SIGHUP,
        }
    }
}

/// Prints a sandbox's rule set: exactly the one in force when a `sandbox exec` on this host
/// owns the sandbox, else generated from the sandbox's `source_ip` and the flags.
///
/// # Errors
/// Unknown sandbox, no `source_ip`, or no interface to name.
pub async fn rules(c: &AdminClient, a: &RulesArgs, config: Option<&Path>) -> anyhow::Result<()> {
    let params = match Record::all()
        .into_iter()
        .find(|r| r.sandbox_id.as_deref() == Some(a.id.as_str()))
        .and_then(|r| r.rules)
    {
        Some(p) => p,
        None => rule_params(c, a, config).await?,
    };
    let set = RuleSet::generate(&params)?;
    println!(
        "# sealgate rule set for {} (interface {}, source {}, transparent port {}, dns port {})",
        params.sandbox_id,
        params.host_if,
        params.sandbox_ip,
        params.transparent_port,
        params.dns_port.map_or("none".into(), |p| p.to_string()),
    );
    print!("{set}");
    Ok(())
}

async fn rule_params(
    c: &AdminClient,
    a: &RulesArgs,
    config: Option<&Path>,
) -> anyhow::Result<RuleParams> {
    let sb = c
        .call(Method::GET, &format!("/v1/sandboxes/{}", a.id), None)
        .await?;
    let ip: std::net::Ipv4Addr = sb["source_ip"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "sandbox {} has no IPv4 source_ip (transparent mode identifies sandboxes by it)",
                a.id
            )
        })?;
    let plan = Plan::for_ns_ip(ip).filter(|_| a.interface.is_none());
    let host_if = a
        .interface
        .clone()
        .or_else(|| plan.as_ref().map(|p| p.host_if.clone()))
        .ok_or_else(|| anyhow::anyhow!("give --interface: {ip} is not a `sandbox exec` address"))?;
    Ok(RuleParams {
        sandbox_id: a.id.clone(),
        host_if,
        sandbox_ip: ip,
        host_ip: plan.map(|p| p.host_ip),
        transparent_port: transparent_port(a.transparent_port, config)?,
        dns_port: a.dns_port,
        ipv6: !a.no_ipv6,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_as_resolves_names_numbers_and_groups() {
        let root = RunAs::resolve("root").unwrap();
        assert_eq!((root.uid, root.gid, root.named), (0, 0, true));
        let n = RunAs::resolve("4242:4343").unwrap();
        assert_eq!((n.uid, n.gid, n.named), (4242, 4343, false));
        assert!(n.setpriv_args().contains(&"--clear-groups".to_owned()));
        assert!(RunAs::resolve("no-such-user-sealgate").is_err());
        assert!(RunAs::resolve("root:no-such-group-sealgate").is_err());
    }

    #[test]
    fn setpriv_argv_ends_options_before_the_command() {
        let args = RunAs::resolve("4242").unwrap().setpriv_args();
        assert_eq!(args.first().map(String::as_str), Some("setpriv"));
        assert_eq!(args.last().map(String::as_str), Some("--"));
        assert!(args.contains(&"--no-new-privs".to_owned()));
    }
}
