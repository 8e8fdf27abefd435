//! The daemon's open-file limit (`RLIMIT_NOFILE`): raised at start, given back to commands.
//!
//! Every client connection, upstream connection and admin connection is a descriptor. A login
//! shell's soft limit is often 1,024 (systemd's default for sessions: 1,024 soft, 524,288 hard)
//! where `proxy.max_connections` alone is 4,096: started from such a shell, the daemon would
//! fail to accept ("Too many open files") and answer 502 for upstream dials long before any of
//! its own limits. So at start the daemon raises its soft limit to the hard one (as the Go
//! runtime does for every Go server), at most [`CEILING`], and says in its start-up summary
//! what it has and what its configured limits can use ([`need`]), with a warning when the
//! first is smaller. Only the hard limit (systemd's `LimitNOFILE=`, `ulimit -Hn`) is the
//! operator's to raise.
//!
//! Invariants: the soft limit is never lowered; the commands the daemon runs get the soft
//! limit it started with ([`restore_in_child`]), not the raised one, so a program that still
//! uses `select(2)` behaves in a sandbox as it does in the operator's shell.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::config::Config;

/// The highest soft limit the daemon sets: descriptor loops that run to the limit (the
/// `close_range` fallback in `isolation::fds`) stay bounded where the hard limit is huge.
pub const CEILING: u64 = 1 << 20;

/// Descriptors beyond the connection limits: the database, the audit log, the listeners,
/// leaf certificates being written, commands' pipes, the runtime's own.
pub const RESERVE: u64 = 1024;

/// The soft limit the process started with, once raised (0 = never raised).
static STARTED_WITH: AtomicU64 = AtomicU64::new(0);

/// The daemon's limit after [`raise`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Nofile {
    /// The soft limit before.
    pub before: u64,
    /// The soft limit now.
    pub now: u64,
    /// What the configured limits can use at once ([`need`]).
    pub need: u64,
}

impl Nofile {
    /// The start-up summary's value.
    pub fn describe(&self) -> String {
        let had = if self.now > self.before {
            format!("raised from {}", self.before)
        } else {
            "not raised".to_owned()
        };
        let short = if self.now < self.need {
            " — TOO LOW: raise the hard limit (LimitNOFILE=) or lower those limits"
        } else {
            ""
        };
        format!(
            "{} ({had}); proxy, upstream and admin max_connections use up to {}{short}",
            self.now, self.need
        )
    }
}

/// Descriptors the configured limits can hold at once: every client connection
/// (`proxy.max_connections`, all listeners), every upstream connection
/// (`upstream.max_connections`, all sandboxes), every admin connection, and [`RESERVE`].
pub fn need(cfg: &Config) -> u64 {
    let connections = cfg.proxy.max_connections + cfg.upstream.max_connections;
    (connections + cfg.admin_limits.max_connections) as u64 + RESERVE
}

/// Raises the soft limit to the hard one (at most [`CEILING`]; never lowers it) and reports
/// it against `need`; a limit that is still below `need` is logged as a warning.
///
/// # Errors
/// `getrlimit`/`setrlimit` failed (the limit is then what it was).
pub fn raise(need: u64) -> io::Result<Nofile> {
    let lim = get()?;
    let before = lim.rlim_cur;
    let target = lim.rlim_max.min(CEILING).max(before);
    if target > before {
        set(libc::rlimit {
            rlim_cur: target,
            rlim_max: lim.rlim_max,
        })?;
        let _ = STARTED_WITH.compare_exchange(0, before, Ordering::AcqRel, Ordering::Acquire);
    }
    let n = Nofile {
        before,
        now: target,
        need,
    };
    if n.now < n.need {
        tracing::warn!(
            limit = n.now,
            need = n.need,
            "the open-file limit is below what proxy.max_connections, upstream.max_connections \
             and admin.max_connections can use: past it connections fail with \"Too many open \
             files\"; raise the hard limit (systemd: LimitNOFILE=) or lower those limits"
        );
    }
    Ok(n)
}

/// In a command's child after `fork`: back to the soft limit the daemon started with (only
/// async-signal-safe calls: `getrlimit`, `setrlimit`; nothing allocated).
///
/// # Errors
/// The limit could not be read or set.
pub fn restore_in_child() -> io::Result<()> {
    let started_with = STARTED_WITH.load(Ordering::Acquire);
    if started_with == 0 {
        return Ok(());
    }
    let lim = get()?;
    set(libc::rlimit {
        rlim_cur: started_with.min(lim.rlim_max),
        rlim_max: lim.rlim_max,
    })
}

/// In a command's child after `fork`: soft and hard limit `max` (or the hard limit already in
/// force, if lower). The hard limit cannot be raised again without privilege, so the command
/// keeps it (only async-signal-safe calls).
///
/// # Errors
/// The limit could not be read or set.
pub fn limit_in_child(max: u64) -> io::Result<()> {
    let lim = get()?;
    let n = (max as libc::rlim_t).min(lim.rlim_max);
    set(libc::rlimit {
        rlim_cur: n,
        rlim_max: n,
    })
}

/// The host's file table (`fs.file-max`), if it can be read.
pub fn host_file_max() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/fs/file-max")
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn get() -> io::Result<libc::rlimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the rlimit we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(lim)
}

fn set(lim: libc::rlimit) -> io::Result<()> {
    // SAFETY: setrlimit reads the rlimit we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_need_adds_every_connection_limit_and_the_reserve() {
        let cfg = Config::default();
        let (p, u, a) = (4096, 8192, 128);
        assert_eq!(
            (
                cfg.proxy.max_connections,
                cfg.upstream.max_connections,
                cfg.admin_limits.max_connections
            ),
            (p, u, a),
            "the shipped defaults"
        );
        assert_eq!(need(&cfg), (p + u + a) as u64 + RESERVE);
    }

    #[test]
    fn the_summary_says_whether_it_was_raised_and_whether_it_is_enough() {
        let ok = Nofile {
            before: 1024,
            now: 524_288,
            need: 13_440,
        };
        assert_eq!(
            ok.describe(),
            "524288 (raised from 1024); proxy, upstream and admin max_connections use up to 13440"
        );
        let low = Nofile {
            before: 4096,
            now: 4096,
            need: 13_440,
        };
        assert!(low.describe().starts_with("4096 (not raised);"));
        assert!(low.describe().contains("TOO LOW"), "{}", low.describe());
    }
}
