//! Descriptor hygiene for what the daemon starts: no descriptor above stdio crosses an
//! `exec`.
//!
//! Rust opens every descriptor close-on-exec, but descriptors the daemon *inherited* — a log
//! file a deploy script kept open, a supervisor's leaked socket — are not, and would pass into
//! every isolated sandbox's command (an outside test read a root-only file and wrote a host
//! file through such descriptors, as `nobody`, past the read-only root). Two layers:
//! [`cloexec_inherited`] at start, and [`cloexec_in_child`] in each command's child between
//! `fork` and `exec`, which also covers a descriptor some library opened without the flag.
//! Setting the flag closes nothing in the daemon itself.

use std::io;

/// The first descriptor above stdin, stdout and stderr.
const FIRST: libc::c_uint = 3;

/// `close_range(2)` with `CLOSE_RANGE_CLOEXEC` (Linux 5.11) over every descriptor from 3 up.
/// Async-signal-safe: a raw system call on integers.
fn close_range_cloexec() -> io::Result<()> {
    // SAFETY: close_range takes three integers and touches no memory; with
    // CLOSE_RANGE_CLOEXEC it only sets the flag on open descriptors in the range.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            FIRST,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sets `FD_CLOEXEC` on `fd` if it is open. Async-signal-safe.
fn set_cloexec(fd: libc::c_int) {
    // SAFETY: fcntl with F_GETFD/F_SETFD takes integers only; a closed fd just fails (EBADF).
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        if flags >= 0 && flags & libc::FD_CLOEXEC == 0 {
            libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
        }
    }
}

/// Marks every descriptor the process holds above stdio close-on-exec. Call first thing in
/// `main`. Without `close_range` (kernels before 5.11) it walks `/proc/self/fd`.
pub fn cloexec_inherited() {
    if close_range_cloexec().is_ok() {
        return;
    }
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<libc::c_int> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd >= FIRST as libc::c_int)
        .collect();
    fds.into_iter().for_each(set_cloexec);
}

/// The same, in a command's child after `fork` (only async-signal-safe calls: no allocation,
/// no `/proc` walk). Without `close_range` it sets the flag on each descriptor number below the
/// soft `RLIMIT_NOFILE` (at most 2^20).
pub fn cloexec_in_child() -> io::Result<()> {
    if close_range_cloexec().is_ok() {
        return Ok(());
    }
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the rlimit we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let top = lim.rlim_cur.min(1 << 20) as libc::c_int;
    (FIRST as libc::c_int..top).for_each(set_cloexec);
    Ok(())
}

/// Clears `FD_CLOEXEC` on `fd` in a command's child after [`cloexec_in_child`], for the one
/// descriptor the launcher must read (bwrap's `--seccomp FD`). Async-signal-safe.
///
/// # Errors
/// `fd` is not open.
pub fn inherit_in_child(fd: libc::c_int) -> io::Result<()> {
    // SAFETY: fcntl with F_SETFD takes integers only.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd as _;

    use super::*;

    fn cloexec(fd: libc::c_int) -> bool {
        // SAFETY: F_GETFD on a descriptor we hold.
        unsafe { libc::fcntl(fd, libc::F_GETFD) & libc::FD_CLOEXEC != 0 }
    }

    #[test]
    fn an_inherited_descriptor_no_longer_crosses_exec() {
        let f = std::fs::File::open("/proc/self/status").unwrap();
        // SAFETY: dup without O_CLOEXEC, as a parent that leaks a descriptor would hand it over.
        let leaked = unsafe { libc::dup(f.as_raw_fd()) };
        assert!(leaked >= 3 && !cloexec(leaked));
        cloexec_inherited();
        assert!(cloexec(leaked));
        // SAFETY: closing the duplicate made above.
        unsafe { libc::close(leaked) };
        let again = unsafe { libc::dup(f.as_raw_fd()) };
        cloexec_in_child().unwrap();
        assert!(cloexec(again));
        unsafe { libc::close(again) };
    }
}
