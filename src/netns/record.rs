//! What the daemon leaves in `/run/sealgate/netns/` for each namespace it owns: one JSON
//! record per namespace, written *before* the namespace exists and removed *after* everything
//! it names is gone, so a daemon that died anywhere in between leaves something the next
//! start can undo ([`super::sweep`]).
//!
//! Ownership is the daemon's process id plus its start time (a reused pid is not mistaken
//! for the owner). The record file itself is the claim on a slot: it is created with
//! `O_EXCL`, so two daemons on one host never build the same slot.

use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{Plan, RuleParams};

/// Where records live (tmpfs: gone after a reboot, like the namespaces they describe).
pub const STATE_DIR: &str = "/run/sealgate/netns";
/// Where `sealgate sandbox exec` runs of earlier versions kept theirs (never touched here,
/// only read so the sweep leaves their namespaces alone).
pub const LEGACY_DIR: &str = "/run/sealgate/exec";

/// One namespace's record.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    /// The process that owns the namespace.
    pub pid: u32,
    /// Its start time (`/proc/<pid>/stat` field 22), so a reused pid is not mistaken for it.
    #[serde(default)]
    pub started: Option<u64>,
    /// Names and addresses.
    pub plan: Plan,
    /// The sandbox, once created.
    pub sandbox_id: Option<String>,
    /// The rule set's inputs, once known.
    pub rules: Option<RuleParams>,
    /// The sandbox's private directory (work directory, /tmp, CA file), once made.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// The sandbox's cgroups ([`crate::limits::cgroup`]), named before they are made.
    #[serde(default)]
    pub cgroups: Vec<PathBuf>,
    /// The tmpfs holding its files ([`crate::limits::files`]), named before it is mounted.
    #[serde(default)]
    pub files: Option<PathBuf>,
}

impl Record {
    /// A fresh record for `plan`, owned by this process.
    pub fn new(plan: Plan) -> Record {
        let pid = std::process::id();
        Record {
            pid,
            started: start_time(pid),
            plan,
            sandbox_id: None,
            rules: None,
            dir: None,
            cgroups: Vec::new(),
            files: None,
        }
    }

    /// The record's file.
    pub fn path(plan: &Plan) -> PathBuf {
        Path::new(STATE_DIR).join(format!("{}.json", plan.netns))
    }

    /// Creates the record file exclusively: Ok(false) when another owner holds the slot.
    ///
    /// # Errors
    /// An unwritable state directory.
    pub fn claim(&self) -> std::io::Result<bool> {
        ensure_dir(Path::new(STATE_DIR), 0o755)?;
        let created = crate::fsutil::private_file()
            .write(true)
            .create_new(true)
            .open(Record::path(&self.plan));
        match created {
            Ok(_) => self.save().map(|()| true),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Writes (replaces) the record, 0600, atomically.
    ///
    /// # Errors
    /// An unwritable state directory.
    pub fn save(&self) -> std::io::Result<()> {
        let path = Record::path(&self.plan);
        let tmp = path.with_extension("tmp");
        let mut f = crate::fsutil::private_file()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?)?;
        std::fs::rename(&tmp, &path)
    }

    /// Every record in `dir` (unreadable ones skipped).
    pub fn all_in(dir: &str) -> Vec<Record> {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        entries
            .filter_map(Result::ok)
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| std::fs::read(e.path()).ok())
            .filter_map(|b| serde_json::from_slice(&b).ok())
            .collect()
    }

    /// Every record of this daemon's kind on the host.
    pub fn all() -> Vec<Record> {
        Record::all_in(STATE_DIR)
    }

    /// True while the owning process is alive (same pid and start time).
    pub fn owner_alive(&self) -> bool {
        let now = start_time(self.pid);
        now.is_some() && (self.started.is_none() || now == self.started)
    }

    /// The sandbox's id if it has the shape the daemon gives ids (`sbx_` + 24 hex digits).
    fn checked_id(&self) -> Option<&str> {
        self.sandbox_id
            .as_deref()
            .filter(|id| crate::sandbox::is_sandbox_id(id))
    }

    /// What a teardown may remove, kill or unmount from this record: only paths of the shape
    /// the daemon writes for the sandbox it names — a directory `…/sandboxes/<id>`, its
    /// `files` mount, cgroups `…/sealgate/<id>`. A record edited to name `/`, another
    /// sandbox's directory or a cgroup such as `system.slice` yields nothing for that field.
    pub fn owned(&self) -> Owned {
        let Some(id) = self.checked_id() else {
            return Owned::default();
        };
        let dir = self
            .dir
            .clone()
            .filter(|d| d.ends_with(Path::new("sandboxes").join(id)));
        let files = self.files.clone().filter(|f| {
            dir.as_ref()
                .is_some_and(|d| *f == d.join(crate::limits::files::FILES_DIR))
        });
        let suffix = Path::new(crate::limits::cgroup::PARENT).join(id);
        let cgroups = self
            .cgroups
            .iter()
            .filter(|g| g.is_absolute() && g.ends_with(&suffix))
            .cloned()
            .collect();
        Owned {
            dir,
            files,
            cgroups,
        }
    }

    /// Removes the record file (last step of a teardown).
    pub fn remove(&self) {
        let _ = std::fs::remove_file(Record::path(&self.plan));
    }
}

/// The paths of a record a teardown may act on ([`Record::owned`]).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Owned {
    /// The sandbox's directory.
    pub dir: Option<PathBuf>,
    /// Its files' tmpfs.
    pub files: Option<PathBuf>,
    /// Its cgroups.
    pub cgroups: Vec<PathBuf>,
}

/// A process's start time in clock ticks since boot (`/proc/<pid>/stat` field 22; the fields
/// after the parenthesised command name start at field 3). None when the process is gone or
/// a zombie.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let mut fields = rest.split_whitespace();
    if fields.next()? == "Z" {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

/// Creates `dir` (and parents) with `mode` if missing.
///
/// # Errors
/// The OS error.
pub fn ensure_dir(dir: &Path, mode: u32) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_start_time_is_readable_and_stable() {
        let me = std::process::id();
        let t = start_time(me).expect("start time of this process");
        assert_eq!(start_time(me), Some(t));
        let rec = Record::new(Plan::for_slot(1).unwrap());
        assert!(rec.owner_alive());
        let dead = Record {
            started: Some(t + 1),
            ..rec
        };
        assert!(!dead.owner_alive(), "a reused pid is not the owner");
    }

    #[test]
    fn a_teardown_acts_only_on_paths_shaped_like_the_sandbox_it_names() {
        let id = "sbx_0123456789abcdef01234567";
        let mut rec = Record::new(Plan::for_slot(1).unwrap());
        rec.sandbox_id = Some(id.into());
        rec.dir = Some(format!("/d/sandboxes/{id}").into());
        rec.files = Some(format!("/d/sandboxes/{id}/files").into());
        rec.cgroups = vec![
            format!("/sys/fs/cgroup/memory/x/sealgate/{id}").into(),
            "/sys/fs/cgroup/system.slice".into(),
            format!("sealgate/{id}").into(),
        ];
        let owned = rec.owned();
        assert_eq!(owned.dir, rec.dir);
        assert_eq!(owned.files, rec.files);
        assert_eq!(
            owned.cgroups,
            [PathBuf::from(format!(
                "/sys/fs/cgroup/memory/x/sealgate/{id}"
            ))]
        );

        let mut bad = Record::new(Plan::for_slot(1).unwrap());
        bad.sandbox_id = Some(id.into());
        bad.dir = Some("/".into());
        bad.files = Some("/".into());
        let owned = bad.owned();
        assert_eq!((owned.dir, owned.files), (None, None));

        for forged in ["sbx_..", "../../x", "sbx_0123456789ABCDEF01234567"] {
            let mut r = Record::new(Plan::for_slot(1).unwrap());
            r.sandbox_id = Some(forged.into());
            r.dir = Some(format!("/d/sandboxes/{forged}").into());
            assert_eq!(r.owned(), Owned::default(), "{forged}");
        }
    }
}
