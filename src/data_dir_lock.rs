//! One daemon per data directory: an exclusive `flock` on `data_dir/sealgate.lock`.
//!
//! Two daemons on one `data_dir` would share the SQLite database, the master key and the CA
//! keys while each believes it owns the sandboxes it restored. So `serve` takes this lock
//! before it opens the store, holds it for its whole life, and writes its pid into the file so
//! that a second daemon can say *which* process holds it.
//!
//! Invariants: the kernel releases a `flock` when its last descriptor closes — also on
//! `kill -9` — so a leftover file never blocks a restart, and the file is never removed (removal
//! would let a starting daemon lock a new inode while another holds the old one). The
//! descriptor is close-on-exec (std opens files with `O_CLOEXEC`), so commands the daemon
//! spawns do not inherit the lock.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// The lock file's name inside `data_dir`.
pub const LOCK_FILE: &str = "sealgate.lock";

/// Why the data directory could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds the lock.
    #[error(
        "data_dir {} is in use by another sealgate process (pid {holder}); stop it, or give \
         this daemon another data_dir",
        .dir.display()
    )]
    Held {
        /// The data directory.
        dir: PathBuf,
        /// The pid written by the holder (`unknown` if it had not written it yet).
        holder: String,
    },
    /// The lock file could not be opened, locked or written.
    #[error("locking {}: {source}", .path.display())]
    Io {
        /// The lock file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Holds the lock until dropped (the daemon keeps it in `Running`).
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
}

/// Locks `data_dir` (which must exist) for this process and records its pid.
///
/// # Errors
/// [`LockError::Held`] naming the other process's pid; [`LockError::Io`] otherwise.
pub fn lock(data_dir: &Path) -> Result<DataDirLock, LockError> {
    let path = data_dir.join(LOCK_FILE);
    let io = |source| LockError::Io {
        path: path.clone(),
        source,
    };
    let mut file = open(&path).map_err(io)?;
    if !lock_within(&file, HELD_PATIENCE).map_err(io)? {
        return Err(LockError::Held {
            dir: data_dir.to_owned(),
            holder: holder_pid(&mut file),
        });
    }
    write_pid(&mut file).map_err(io)?;
    Ok(DataDirLock { _file: file })
}

/// How long a held lock is retried before it counts as held by another daemon. A process that
/// just released the lock may not have let go of it yet: a child forked by that process (any
/// `Command` spawn, in a daemon or a test binary running several daemons) shares the open file
/// description, and so the lock, until it execs and the close-on-exec descriptor closes.
const HELD_PATIENCE: std::time::Duration = std::time::Duration::from_secs(2);

/// Tries the lock until it is taken or `patience` has passed; `Ok(false)`: still held.
fn lock_within(file: &File, patience: std::time::Duration) -> std::io::Result<bool> {
    let deadline = std::time::Instant::now() + patience;
    loop {
        if try_lock_exclusive(file)? {
            return Ok(true);
        }
        if std::time::Instant::now() >= deadline {
            return Ok(false);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn open(path: &Path) -> std::io::Result<File> {
    crate::fsutil::private_file()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
}

/// `flock(LOCK_EX | LOCK_NB)`: `Ok(false)` when another open file description holds it.
fn try_lock_exclusive(file: &File) -> std::io::Result<bool> {
    // SAFETY: flock takes a descriptor number and flags only; `file` keeps the descriptor
    // open for the duration of the call.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Ok(false);
    }
    Err(e)
}

fn holder_pid(file: &mut File) -> String {
    let mut text = String::new();
    let _ = file.read_to_string(&mut text);
    let pid = text.trim();
    if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return "unknown".into();
    }
    pid.to_owned()
}

fn write_pid(file: &mut File) -> std::io::Result<()> {
    file.set_len(0)?;
    file.seek(SeekFrom::Start(0))?;
    writeln!(file, "{}", std::process::id())?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_names_the_holder_and_a_released_lock_is_free_again() {
        let dir = tempfile::tempdir().unwrap();
        let first = lock(dir.path()).unwrap();
        let err = lock(dir.path()).unwrap_err().to_string();
        let pid = std::process::id().to_string();
        assert!(err.contains(&format!("(pid {pid})")), "{err}");
        assert!(err.contains("in use by another sealgate process"), "{err}");
        drop(first);
        let again = lock(dir.path()).unwrap();
        drop(again);
        let text = std::fs::read_to_string(dir.path().join(LOCK_FILE)).unwrap();
        assert_eq!(text.trim(), pid);
    }
}
