//! Network namespaces for isolated sandboxes (Linux, root): the address plan, the veth and
//! namespace plumbing, the iptables rule set, the namespace's DNS responder, the records that
//! make every namespace the daemon builds undoable, and the start-up sweep of leftovers.
//!
//! Everything that touches the system runs a program from an argv vector (`ip`, `iptables`,
//! `ip6tables`) — never a shell string — and every removal is idempotent, so cleanup can run
//! after a partial setup, twice, or after a crashed run. Every such program starts from
//! [`helper`]: the daemon's environment without its credentials.

pub mod daemons;
pub mod dns;
pub mod link;
pub mod plan;
pub mod record;
pub mod rules;
pub mod session;
pub mod sweep;

use std::io::Write as _;
use std::process::{Command, Stdio};

pub use plan::Plan;
pub use rules::{Family, RuleParams, RuleSet};
pub use session::Namespace;

/// Namespace, interface and rule failures. Each names the command or file involved.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// A program could not be started (not installed?).
    #[error("cannot run {program}: {source} (is iproute2/iptables installed?)")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        source: std::io::Error,
    },
    /// A program exited non-zero.
    #[error("`{command}` failed: {stderr}")]
    Failed {
        /// The command line (shell-quoted for reading only).
        command: String,
        /// Its standard error, trimmed.
        stderr: String,
    },
    /// A file under /etc/netns or /proc/sys could not be written.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A name or id that may not be used as an argument.
    #[error("refusing invalid {0}")]
    Invalid(String),
    /// No free slot in the address pool.
    #[error("no free /30 left in 198.18.0.0/15 for a sandbox namespace")]
    PoolExhausted,
}

/// The prefix of the daemon's own variables. Three of them hold credentials
/// (`SEALGATE_ADMIN_TOKEN`, `SEALGATE_MASTER_KEY`, `SEALGATE_DATABASE_URL` with its password);
/// none is meant for another program.
const OWN_VARIABLES: &str = "SEALGATE_";

/// A host program the daemon runs (`ip`, `iptables-restore`, `getent`).
///
/// Invariant: its environment is the daemon's minus every `SEALGATE_*` variable, so a
/// credential the operator handed the daemon never reaches another process's environment
/// (`/proc/PID/environ`, a wrapper script, a core dump). The rest (`PATH`, `XTABLES_LIBDIR`,
/// locale) passes as the operator set it: these are the operator's own tools.
pub(crate) fn helper(program: &str) -> Command {
    let mut cmd = Command::new(program);
    for (name, _) in std::env::vars_os() {
        if name
            .as_encoded_bytes()
            .starts_with(OWN_VARIABLES.as_bytes())
        {
            cmd.env_remove(name);
        }
    }
    cmd
}

/// Runs `argv` to completion; stderr becomes the error message.
///
/// # Errors
/// [`NetnsError::Spawn`] or [`NetnsError::Failed`].
pub fn run(argv: &[String]) -> Result<String, NetnsError> {
    let (program, rest) = argv
        .split_first()
        .ok_or_else(|| NetnsError::Invalid("empty command".into()))?;
    let out = helper(program)
        .args(rest)
        .output()
        .map_err(|source| NetnsError::Spawn {
            program: program.clone(),
            source,
        })?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    Err(NetnsError::Failed {
        command: rules::shell_line(argv),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    })
}

/// [`run`] for string literals and formatted values.
pub(crate) fn run_args<S: AsRef<str>>(argv: &[S]) -> Result<String, NetnsError> {
    let owned: Vec<String> = argv.iter().map(|s| s.as_ref().to_owned()).collect();
    run(&owned)
}

/// Runs `program args…` with `input` on its standard input (`iptables-restore`).
///
/// # Errors
/// [`NetnsError::Spawn`] or [`NetnsError::Failed`].
pub fn run_stdin(program: &str, args: &[&str], input: &str) -> Result<(), NetnsError> {
    let spawn_err = |source| NetnsError::Spawn {
        program: program.to_owned(),
        source,
    };
    let mut child = helper(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input.as_bytes()).map_err(spawn_err)?;
    }
    let out = child.wait_with_output().map_err(spawn_err)?;
    if out.status.success() {
        return Ok(());
    }
    Err(NetnsError::Failed {
        command: format!("{program} {}", args.join(" ")),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    })
}

fn restore(family: Family, input: &str) -> Result<(), NetnsError> {
    let program = match family {
        Family::V4 => "iptables-restore",
        Family::V6 => "ip6tables-restore",
    };
    run_stdin(program, &["-w", "5", "--noflush"], input)
}

/// Applies a rule set: one `iptables-restore` transaction per family (tables commit in order,
/// nat before filter); on failure, removes whatever was applied.
///
/// # Errors
/// The failing command.
pub fn apply_rules(set: &RuleSet) -> Result<(), NetnsError> {
    for family in [Family::V4, Family::V6] {
        let Some(input) = set.restore_apply(family) else {
            continue;
        };
        if let Err(e) = restore(family, &input) {
            remove_rules(set);
            return Err(e);
        }
    }
    Ok(())
}

/// Removes a rule set; succeeds whether or not (any of) it is installed. The fast path is one
/// transaction per family; when that fails (a piece was already gone) every piece is removed
/// by its own command, and a hook inserted more than once is deleted until none is left.
pub fn remove_rules(set: &RuleSet) {
    let batched = [Family::V4, Family::V6].iter().all(|f| {
        set.restore_remove(*f)
            .is_none_or(|input| restore(*f, &input).is_ok())
    });
    if batched {
        return;
    }
    for argv in set.remove_argvs() {
        let is_delete = argv.iter().any(|a| a == "-D");
        let tries = if is_delete { 8 } else { 1 };
        for _ in 0..tries {
            if run(&argv).is_err() {
                break;
            }
        }
    }
}

/// Sends `sig` to `pid`.
///
/// # Errors
/// The OS error (`ESRCH` when the process is gone).
pub fn signal(pid: u32, sig: i32) -> std::io::Result<()> {
    let pid = libc::pid_t::try_from(pid)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: kill(2) takes two integers and touches no memory of ours; `pid` is a positive
    // process id (never 0 or negative, which would address process groups).
    let rc = unsafe { libc::kill(pid, sig) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
