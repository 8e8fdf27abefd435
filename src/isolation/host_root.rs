//! The host's top-level entries, from which each command's read-only root is rebuilt.
//!
//! Why not `bwrap --ro-bind / /`: that bind is recursive, and bwrap then remounts each
//! submount read-only, one by one, from the mount table it read just before. `ip netns add`
//! and `del` (any sandbox of this or another daemon coming or going) mount and unmount nsfs
//! files under `/run/netns`, and propagation makes them appear and vanish in the launching
//! mount namespace too: one that vanished mid-walk failed the command with `Unable to apply
//! mount flags: remount "/newroot/run/netns/sealgate-…": Invalid argument` (about one launch
//! in ten while namespaces churned). So bwrap starts from its own empty tmpfs root and gets
//! every top-level entry on its own: directories and files `--ro-bind-try` (still recursive,
//! but no host churns mounts under `/usr` or `/etc`), links `--symlink` with the same target
//! (merged-`/usr` hosts: `/bin -> usr/bin`). What a later mount replaces — `/run`, `/tmp`,
//! `/home`, `/dev`, `/proc`, a top-level `data_dir` — is not bound at all, so the churning
//! `/run` is never walked. The root itself is remounted read-only at the end (see
//! [`super::commands::bwrap_argv`]).
//!
//! Rules: only directories, regular files and links are kept; sockets, FIFOs and device
//! nodes, names or link targets that are not UTF-8 (argv is text), and entries that vanish
//! while being listed are left out — the sandbox does not see them, the launch goes on.
//! `--ro-bind-try` lets an entry removed between the listing and the launch go too. A link
//! is recreated even at a replaced path, so the later mount follows it as it did when all
//! of `/` was bound: with `/home -> var/home` the tmpfs lands on `/var/home`, which stays
//! hidden. A link is only text inside the sandbox, resolved in the sandbox's own view: one
//! into `/run` reaches the fresh `/run`, never the host's.

use std::fs::DirEntry;
use std::io;
use std::path::Path;

/// One top-level entry, named by its path under `/`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RootEntry {
    /// A directory or regular file: bound read-only, with everything mounted under it.
    Bind(String),
    /// A symbolic link: recreated with the same target, never followed on the host.
    Symlink {
        /// `/name`.
        path: String,
        /// The link's target, as written.
        target: String,
    },
}

impl RootEntry {
    /// `/name`.
    pub fn path(&self) -> &str {
        match self {
            RootEntry::Bind(path) | RootEntry::Symlink { path, .. } => path,
        }
    }
}

/// The entries of `root` (the host's `/`; any directory in tests), sorted, each named as
/// under `/`. Leaves out what the module doc says.
///
/// # Errors
/// `root` cannot be read.
pub fn list(root: &Path) -> io::Result<Vec<RootEntry>> {
    let mut entries: Vec<RootEntry> = std::fs::read_dir(root)?
        .filter_map(|e| classify(&e.ok()?))
        .collect();
    entries.sort_by(|a, b| a.path().cmp(b.path()));
    Ok(entries)
}

fn classify(e: &DirEntry) -> Option<RootEntry> {
    let path = format!("/{}", e.file_name().into_string().ok()?);
    let kind = e.file_type().ok()?; // does not follow a link
    if kind.is_symlink() {
        let target = std::fs::read_link(e.path()).ok()?.into_os_string();
        return Some(RootEntry::Symlink {
            path,
            target: target.into_string().ok()?,
        });
    }
    (kind.is_dir() || kind.is_file()).then_some(RootEntry::Bind(path))
}

/// The bwrap arguments that rebuild the root: `--symlink TARGET PATH` for every link,
/// `--ro-bind-try PATH PATH` for every other entry that `replaced` does not claim (a later
/// mount puts something of the sandbox's own there).
pub fn argv(entries: &[RootEntry], replaced: impl Fn(&str) -> bool) -> Vec<String> {
    let mut v = Vec::with_capacity(entries.len() * 3);
    for e in entries {
        match e {
            RootEntry::Symlink { path, target } => {
                v.extend(["--symlink".into(), target.clone(), path.clone()]);
            }
            RootEntry::Bind(path) if !replaced(path) => {
                v.extend(["--ro-bind-try".into(), path.clone(), path.clone()]);
            }
            RootEntry::Bind(_) => {}
        }
    }
    v
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt as _;

    /// A directory or file entry at `p`.
    pub fn bind(p: &str) -> RootEntry {
        RootEntry::Bind(p.into())
    }

    /// A link at `p` to `t`.
    pub fn link(p: &str, t: &str) -> RootEntry {
        RootEntry::Symlink {
            path: p.into(),
            target: t.into(),
        }
    }

    #[test]
    fn list_keeps_dirs_files_and_links_and_leaves_out_the_rest() {
        let root = tempfile::tempdir().unwrap();
        let at = |n: &str| root.path().join(n);
        std::fs::create_dir(at("usr")).unwrap();
        std::fs::write(at(".dockerenv"), b"").unwrap();
        std::os::unix::fs::symlink("usr/bin", at("bin")).unwrap();
        std::os::unix::fs::symlink("/nowhere/at/all", at("dangling")).unwrap();
        std::os::unix::fs::symlink("-x", at("dash")).unwrap();
        let _sock = std::os::unix::net::UnixListener::bind(at("sock")).unwrap();
        let fifo = std::process::Command::new("mkfifo")
            .arg(at("fifo"))
            .status()
            .unwrap();
        assert!(fifo.success());
        let odd = std::ffi::OsStr::from_bytes(b"bad\xff");
        std::fs::create_dir(root.path().join(odd)).unwrap();
        std::os::unix::fs::symlink(odd, at("to-bad")).unwrap();

        assert_eq!(
            list(root.path()).unwrap(),
            [
                bind("/.dockerenv"),
                link("/bin", "usr/bin"),
                link("/dangling", "/nowhere/at/all"),
                link("/dash", "-x"),
                bind("/usr"),
            ]
        );
        assert!(list(&at("no-such-dir")).is_err());
    }

    #[test]
    fn argv_binds_what_is_not_replaced_and_recreates_every_link() {
        let entries = [
            link("/bin", "usr/bin"),
            bind("/etc"),
            link("/home", "var/home"),
            bind("/run"),
            bind("/usr"),
        ];
        let v = argv(&entries, |p| p == "/run" || p == "/home");
        assert_eq!(
            v.join(" "),
            "--symlink usr/bin /bin --ro-bind-try /etc /etc --symlink var/home /home \
             --ro-bind-try /usr /usr"
        );
    }
}
