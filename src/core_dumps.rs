//! Keeping the daemon's memory out of core dumps and out of other processes' reach.
//!
//! The daemon's memory holds the master key, every store's real values and the admin token;
//! a core dump of it is all of them in a file (an outside pass aborted the daemon with core
//! dumps on: the core held the raw key, 87 values and the token). So at start the daemon
//! makes itself non-dumpable (`PR_SET_DUMPABLE` 0: no core file, and `/proc/PID/mem`,
//! `environ` and ptrace closed to processes of its own user that are not privileged) and sets
//! its soft core-size limit to zero, which pipe handlers such as systemd-coredump honour where
//! `fs.suid_dumpable` = 2 would still dump a non-dumpable process.
//!
//! Invariants: applied before the store is opened (before any value or key is in memory);
//! never fatal (a kernel refusing `prctl` leaves a warning, not a daemon that will not
//! start); the commands the daemon runs get the soft limit it started with
//! ([`restore_in_child`]) and are dumpable again after `execve`, as the kernel resets that.

use std::io;
use std::sync::OnceLock;

/// The soft `RLIMIT_CORE` the process started with (unset: never lowered). Read in a child
/// between `fork` and `exec`: `OnceLock::get` is an atomic load.
static STARTED_WITH: OnceLock<libc::rlim_t> = OnceLock::new();

/// Makes the process non-dumpable and its soft core limit zero.
///
/// # Errors
/// The `prctl` or `setrlimit` call's error; what succeeded before it stays.
pub fn forbid() -> io::Result<()> {
    // SAFETY: PR_SET_DUMPABLE takes one integer argument and touches no memory of ours.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let lim = get()?;
    STARTED_WITH.get_or_init(|| lim.rlim_cur);
    set(libc::rlimit {
        rlim_cur: 0,
        rlim_max: lim.rlim_max,
    })
}

/// In a child between `fork` and `exec`: the soft core limit the daemon started with.
/// Async-signal-safe (getrlimit, setrlimit).
///
/// # Errors
/// The `setrlimit` call's error.
pub fn restore_in_child() -> io::Result<()> {
    let Some(&started_with) = STARTED_WITH.get() else {
        return Ok(());
    };
    let lim = get()?;
    set(libc::rlimit {
        rlim_cur: started_with.min(lim.rlim_max),
        rlim_max: lim.rlim_max,
    })
}

fn get() -> io::Result<libc::rlimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_CORE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(lim)
}

fn set(lim: libc::rlimit) -> io::Result<()> {
    // SAFETY: `lim` is a valid rlimit read by the call.
    if unsafe { libc::setrlimit(libc::RLIMIT_CORE, &lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_process_is_left_undumpable_with_no_core_and_children_get_the_limit_back() {
        let before = get().unwrap();
        forbid().unwrap();
        // SAFETY: PR_GET_DUMPABLE takes no argument.
        assert_eq!(unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) }, 0);
        let now = get().unwrap();
        assert_eq!((now.rlim_cur, now.rlim_max), (0, before.rlim_max));
        forbid().unwrap(); // again (every daemon of a test process): the first limit is kept
        restore_in_child().unwrap();
        assert_eq!(get().unwrap().rlim_cur, before.rlim_cur);
        set(libc::rlimit {
            rlim_cur: 0,
            rlim_max: before.rlim_max,
        })
        .unwrap();
    }
}
