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

/// Mounts a tmpfs of `bytes` at `at` (an existing directory), root-owned, mode 0755.
///
/// # Errors
/// Not root, or the kernel refused the mount.
pub fn mount(at: &Path, bytes: u64) -> io::Result<()> {
    let target = CString::new(at.as_os_str().as_bytes())?;
    let options = CString::new(format!("size={bytes},mode=0755"))?;
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
