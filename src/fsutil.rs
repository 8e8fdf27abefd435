//! The one home for owner-only file and directory creation (secrets, tokens, keys, state).
//!
//! Invariant: a file made through [`private_file`] is created with mode 0600 and a directory made
//! by [`create_private_dir`] with 0700, both set atomically at creation (never created wider and
//! narrowed afterwards). Existing files and directories keep their mode.
//!
//! The public side (the sandbox CA certificates, which processes of any user must read) is set
//! explicitly, whatever the process's umask: [`create_public_dir`] and [`PUBLIC_FILE_MODE`].

use std::fs::{DirBuilder, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

/// Mode of files holding secrets, tokens, keys or private state.
pub const PRIVATE_FILE_MODE: u32 = 0o600;
/// Mode of directories holding such files.
pub const PRIVATE_DIR_MODE: u32 = 0o700;

/// Mode of the public sandbox CA files. Set after creation, not by it (the umask applies to
/// that): the shipped unit's
/// `UMask=0077` made them 0600, and a sandbox running as another user could not read its CA
/// (`curl: (77)`; outside pass).
pub const PUBLIC_FILE_MODE: u32 = 0o644;
/// Mode of `cert_dir` when sealgate creates it (see [`PUBLIC_FILE_MODE`]).
pub const PUBLIC_DIR_MODE: u32 = 0o755;

/// Creates `dir` if it is missing and gives it [`PUBLIC_DIR_MODE`] (missing parents too);
/// an existing directory keeps its mode. Returns the mode `dir` has then.
///
/// # Errors
/// The directory cannot be created or read.
pub fn create_public_dir(dir: &Path) -> std::io::Result<u32> {
    use std::os::unix::fs::PermissionsExt as _;
    if !dir.exists() {
        let mut missing = vec![dir];
        while let Some(parent) = missing.last().and_then(|d| d.parent()) {
            if parent.as_os_str().is_empty() || parent.exists() {
                break;
            }
            missing.push(parent);
        }
        std::fs::create_dir_all(dir)?;
        for d in missing {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(PUBLIC_DIR_MODE))?;
        }
    }
    Ok(std::fs::metadata(dir)?.permissions().mode() & 0o7777)
}

/// Writes a public file (a sandbox's CA certificate) through a temporary beside it renamed
/// over `path`, mode [`PUBLIC_FILE_MODE`] whatever the umask; its directory is made by
/// [`create_public_dir`] when missing. A file that already holds exactly `bytes` with that
/// mode is left as it is (a restart on a full disk rewrote every intact certificate and
/// refused to start: outside pass); a failed write removes its temporary.
///
/// # Errors
/// The directory or the file cannot be written.
pub fn replace_public_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    if holds(path, bytes) {
        return Ok(());
    }
    check_replaceable(path)?;
    if let Some(dir) = path.parent() {
        create_public_dir(dir)?;
    }
    let tmp = path.with_extension("pem.tmp");
    let written = std::fs::write(&tmp, bytes)
        .and_then(|()| {
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(PUBLIC_FILE_MODE))
        })
        .and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// True when `path` is a regular file (not followed through a link) of mode
/// [`PUBLIC_FILE_MODE`] holding exactly `bytes`.
fn holds(path: &Path, bytes: &[u8]) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return false;
    };
    meta.is_file()
        && meta.len() == bytes.len() as u64
        && meta.permissions().mode() & 0o7777 == PUBLIC_FILE_MODE
        && std::fs::read(path).is_ok_and(|b| b == bytes)
}

/// Opens `path` for reading (links followed) only if it is a regular file: a FIFO in its place
/// would block the read for ever (outside pass: a FIFO as `master.key` hung the start, silently,
/// holding the data_dir lock), a device would be read as if it were the file. Opened
/// non-blocking, so not even the open waits for a FIFO's writer.
///
/// # Errors
/// The open's own (`NotFound` for a missing file), or `InvalidInput` "is not a regular file".
pub fn open_regular(path: &Path) -> std::io::Result<std::fs::File> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "is not a regular file",
        ));
    }
    Ok(f)
}

/// Open options whose newly created file gets mode 0600; the caller picks
/// `write`/`append`/`create`/`create_new`/`truncate`.
pub fn private_file() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.mode(PRIVATE_FILE_MODE);
    o
}

/// Creates `dir` and missing parents with mode 0700; an existing directory is left as it is.
///
/// # Errors
/// The directory cannot be created.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(PRIVATE_DIR_MODE)
        .create(dir)
}

/// Writes `bytes` to `path` as a new 0600 file owned by this process's user, replacing what the
/// name pointed at: the bytes go to a fresh file beside it (`O_CREAT|O_EXCL`, which follows no
/// link), which is then renamed over `path`. A symlink at `path` is replaced, never followed;
/// an existing file's wider mode or other owner is never inherited; in a sticky directory
/// (`/tmp`) another user's file at `path` makes the rename fail instead of being written into.
///
/// # Errors
/// The directory is not writable, or the rename is refused; the temporary file is removed.
pub fn replace_private_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    replace(path, bytes, false)
}

/// [`replace_private_file`], made durable: the fresh file is fsynced before the rename and the
/// directory after it, so a crash or a full disk leaves the old file or the whole new one,
/// never an empty one (an empty admin token would have matched a request without any).
///
/// # Errors
/// As [`replace_private_file`], and a failed fsync.
pub fn replace_private_file_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    replace(path, bytes, true)?;
    sync_parent(path)
}

/// fsyncs the directory holding `path`, so a new or renamed entry there survives a crash.
///
/// # Errors
/// The directory cannot be opened or synced.
pub fn sync_parent(path: &Path) -> std::io::Result<()> {
    match path.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(dir) => std::fs::File::open(dir)?.sync_all(),
        None => std::fs::File::open(".")?.sync_all(),
    }
}

/// Creates `path` holding `bytes` (mode 0600) if it does not exist, durably and whole: the
/// bytes go to a temporary beside it, fsynced, then linked in under `path` — which fails with
/// `AlreadyExists` if another process made it first — and the directory is fsynced. A crash
/// or a full disk leaves no file or the whole one, never an empty one (an empty `master.key`
/// after a full disk refused every later start: outside pass).
///
/// # Errors
/// `AlreadyExists`, or any write, link or fsync failure (the temporary is removed).
pub fn create_private_file_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let linked = through_temp(path, bytes, true, |tmp, path| std::fs::hard_link(tmp, path));
    match linked {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists && !is_no_space(&e) => {
            // A file system without hard links (SMB, some FUSE mounts): created in place, and
            // removed again if it could not be written whole.
            create_in_place(path, bytes)?;
        }
        other => other?,
    }
    sync_parent(path)
}

fn is_no_space(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOSPC)
}

/// `path` created exclusively and written and fsynced, or removed again.
fn create_in_place(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = private_file().write(true).create_new(true).open(path)?;
    let written = f.write_all(bytes).and_then(|()| f.sync_all());
    if written.is_err() {
        let _ = std::fs::remove_file(path);
    }
    written
}

fn replace(path: &Path, bytes: &[u8], sync: bool) -> std::io::Result<()> {
    check_replaceable(path)?;
    through_temp(path, bytes, sync, |tmp, path| std::fs::rename(tmp, path))
}

/// Refuses a `path` that exists as something other than a regular file or a link: a rename
/// over a device, FIFO, socket or directory would destroy it (outside pass: `sandbox create
/// --env-file /dev/null`, run as root, replaced the host's `/dev/null` with a 0600 file
/// holding the proxy password and the tokens).
///
/// # Errors
/// `InvalidInput` naming what `path` is.
pub fn check_replaceable(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::FileTypeExt as _;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    let t = meta.file_type();
    let what = if t.is_file() || t.is_symlink() {
        return Ok(());
    } else if t.is_dir() {
        "a directory"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else if t.is_fifo() {
        "a FIFO"
    } else {
        "a socket"
    };
    Err(std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        format!("it is {what}, not a regular file, and the file is written whole in its place: name a new or regular file"),
    ))
}

/// Writes `bytes` to a fresh temporary beside `path` (fsynced if `sync`), then `place`s it at
/// `path`; the temporary is gone afterwards whatever happened.
fn through_temp(
    path: &Path,
    bytes: &[u8],
    sync: bool,
    place: impl FnOnce(&Path, &Path) -> std::io::Result<()>,
) -> std::io::Result<()> {
    use std::io::Write;
    let name = path.file_name().ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "the path names no file")
    })?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    // A random part too: a crash between create and rename leaves the temp file behind, and a
    // daemon that is PID 1 in its container gets the same pid at every start (a fixed name
    // then failed every later write of the file: review).
    tmp_name.push(format!(
        ".{}.{}.tmp",
        std::process::id(),
        crate::random::random_hex(6)
    ));
    let tmp = path.with_file_name(tmp_name);
    let written = private_file()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            if sync {
                f.sync_all()?;
            }
            Ok(())
        })
        .and_then(|()| place(&tmp, path));
    // After a rename it is gone already; after a link or a failure it is litter.
    let _ = std::fs::remove_file(&tmp);
    written
}

/// Removes what a crash between create and rename left of [`replace_private_file`]'s
/// temporary files for `path` (`.<name>.<pid>[.<random>].tmp` beside it), and nothing else:
/// only a regular file whose name has exactly that shape. Call it only while no other process
/// may be replacing `path` (the daemon holds its `data_dir` lock). Returns how many went.
pub fn remove_stale_temps(path: &Path) -> usize {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        return 0;
    };
    let Ok(entries) = std::fs::read_dir(if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    }) else {
        return 0;
    };
    let prefix = format!(".{name}.");
    let mut removed = 0;
    for entry in entries.flatten() {
        let file = entry.file_name();
        let Some(middle) = file
            .to_str()
            .and_then(|f| f.strip_prefix(&prefix))
            .and_then(|f| f.strip_suffix(".tmp"))
        else {
            continue;
        };
        let shaped = match middle.split_once('.') {
            Some((pid, random)) => is_digits(pid) && is_hex(random),
            None => is_digits(middle),
        };
        let regular = entry.file_type().is_ok_and(|t| t.is_file());
        if shaped && regular && std::fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

fn is_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

fn is_hex(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn stale_temp_files_of_a_path_go_and_nothing_else() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("list");
        let touch = |name: &str| std::fs::write(tmp.path().join(name), b"x").unwrap();
        for stale in [".list.4242.tmp", ".list.4242.3f001ad8270f.tmp"] {
            touch(stale);
        }
        for kept in [
            "list",
            ".list.tmp",
            ".list.x.tmp",
            ".list.42.zz.tmp",
            ".other.42.tmp",
            "list.42.tmp",
        ] {
            touch(kept);
        }
        std::fs::create_dir(tmp.path().join(".list.7.tmp")).unwrap();
        assert_eq!(super::remove_stale_temps(&path), 2);
        let mut left: Vec<String> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                ".list.42.zz.tmp",
                ".list.7.tmp",
                ".list.tmp",
                ".list.x.tmp",
                ".other.42.tmp",
                "list",
                "list.42.tmp"
            ]
        );
    }

    #[test]
    fn a_temp_file_left_by_a_crash_does_not_block_the_next_write() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("list");
        let stale = tmp.path().join(format!(".list.{}.tmp", std::process::id()));
        std::fs::write(&stale, b"half").unwrap();
        super::replace_private_file_synced(&path, b"whole\n").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"whole\n");
    }

    #[test]
    fn creates_owner_only_files_and_dirs() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b");
        super::create_private_dir(&dir).unwrap();
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        let file = dir.join("f");
        super::private_file()
            .write(true)
            .create_new(true)
            .open(&file)
            .unwrap();
        assert_eq!(mode(&file), 0o600);
    }

    #[test]
    fn a_replaced_file_follows_no_link_and_keeps_no_old_mode() {
        let tmp = tempfile::tempdir().unwrap();
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let victim = tmp.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        let link = tmp.path().join("env");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        super::replace_private_file(&link, b"A=1\n").unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        assert!(!std::fs::symlink_metadata(&link).unwrap().is_symlink());
        assert_eq!(
            (std::fs::read_to_string(&link).unwrap(), mode(&link)),
            ("A=1\n".into(), 0o600)
        );

        let wide = tmp.path().join("wide.env");
        std::fs::write(&wide, "old").unwrap();
        std::fs::set_permissions(&wide, std::fs::Permissions::from_mode(0o644)).unwrap();
        super::replace_private_file(&wide, b"B=2\n").unwrap();
        assert_eq!(
            (std::fs::read_to_string(&wide).unwrap(), mode(&wide)),
            ("B=2\n".into(), 0o600)
        );
        let left: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left.len(), 3, "no temporary file left: {left:?}");
    }

    #[test]
    fn a_device_fifo_or_directory_is_never_replaced() {
        use std::os::unix::fs::FileTypeExt as _;
        let tmp = tempfile::tempdir().unwrap();
        let fifo = tmp.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo(3) on a NUL-terminated path we own.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let dir = tmp.path().join("dir");
        std::fs::create_dir(&dir).unwrap();
        for (path, what) in [(&fifo, "a FIFO"), (&dir, "a directory")] {
            for e in [
                super::replace_private_file(path, b"A=1\n").unwrap_err(),
                super::replace_private_file_synced(path, b"A=1\n").unwrap_err(),
                super::replace_public_file(path, b"pem").unwrap_err(),
            ] {
                assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
                assert!(e.to_string().contains(what), "{e}");
            }
        }
        assert!(std::fs::symlink_metadata(&fifo)
            .unwrap()
            .file_type()
            .is_fifo());
        assert!(dir.is_dir());
        // The device itself, only read: /dev/null is checked, never written.
        let e = super::check_replaceable(std::path::Path::new("/dev/null")).unwrap_err();
        assert!(e.to_string().contains("a device"), "{e}");
        let left = std::fs::read_dir(tmp.path()).unwrap().count();
        assert_eq!(left, 2, "no temporary file left");
    }
}
