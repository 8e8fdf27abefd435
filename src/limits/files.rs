//! A sandbox's files — `home/` (its work directory) and `tmp/` — on a tmpfs of
//! `[sandbox] disk_max_mib`, mounted by the daemon at `<sandbox dir>/files`.
//!
//! Why a tmpfs: it bounds what one sandbox can write with no quota support from the
//! filesystem under `data_dir` (which also holds the database), it goes with the sandbox (an
//! isolated sandbox never outlives its daemon run), and its pages are charged to the memory
//! cgroup of the command that writes them, so files count toward `memory_max_mib` too.
//!
//! The daemon's own files of the sandbox (the CA, each command's environment file) stay
//! outside the mount: a sandbox that filled its files can still run the command that cleans
//! them up. Mounted `nosuid,nodev`.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;

/// The mount point's name inside the sandbox's directory.
pub const FILES_DIR: &str = "files";

/// Files (inodes) per byte of the size: one per 4 KiB, at least [`MIN_INODES`].
const BYTES_PER_INODE: u64 = 4096;
/// The fewest files a sandbox's tmpfs holds.
const MIN_INODES: u64 = 1024;

/// The tmpfs's inode count for `bytes`. Inodes do not count toward a tmpfs's `size`, but each
/// costs about a KiB of kernel memory charged to the sandbox: without a bound, a sandbox
/// creating empty files filled its memory limit (64 MiB at about 68,000 files, measured) and
/// every later command was OOM-killed on start. With it, file creation fails with ENOSPC first.
pub fn inodes_for(bytes: u64) -> u64 {
    (bytes / BYTES_PER_INODE).max(MIN_INODES)
}

/// Mounts a tmpfs of `bytes` (and [`inodes_for`] files) at `at` (an existing directory),
/// root-owned, mode 0755.
///
/// # Errors
/// Not root, or the kernel refused the mount.
pub fn mount(at: &Path, bytes: u64) -> io::Result<()> {
    let target = CString::new(at.as_os_str().as_bytes())?;
    let options = CString::new(format!(
        "size={bytes},nr_inodes={},mode=0755",
        inodes_for(bytes)
    ))?;
    // SAFETY: every pointer is a NUL-terminated string that outlives the call.
    let rc = unsafe {
        libc::mount(
            c"tmpfs".as_ptr(),
            target.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            options.as_ptr().cast(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Detaches the mount at `at` if there is one (lazily: a process still holding a file in it
/// does not keep the directory from being removed). Silent, as a teardown must be.
pub fn unmount(at: &Path) {
    let Ok(target) = CString::new(at.as_os_str().as_bytes()) else {
        return;
    };
    // SAFETY: a NUL-terminated path that outlives the call; an unmounted path fails (EINVAL).
    unsafe {
        libc::umount2(target.as_ptr(), libc::MNT_DETACH);
    }
}
