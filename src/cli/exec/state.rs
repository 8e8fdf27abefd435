//! What a running `sandbox exec` leaves in `/run/sealgate/exec/`: one JSON record per
//! namespace (so `sandbox rules` can print the rules in force and a later `exec` can clean up
//! after one that was SIGKILLed) and the sandbox's CA certificate.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::netns::{Plan, RuleParams};

/// Where records live (tmpfs: gone after a reboot, like the namespaces they describe).
pub const STATE_DIR: &str = "/run/sealgate/exec";

/// One namespace's record.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    /// The `sealgate` process that owns the namespace.
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
}

impl Record {
    /// The record's file.
    pub fn path(plan: &Plan) -> PathBuf {
        Path::new(STATE_DIR).join(format!("{}.json", plan.netns))
    }

    /// Directory for the namespace's public files (CA certificate), world-readable so a CMD
    /// that drops privileges can still read it.
    pub fn files_dir(plan: &Plan) -> PathBuf {
        Path::new(STATE_DIR).join(&plan.netns)
    }

    /// Writes (replaces) the record, 0600.
    ///
    /// # Errors
    /// An unwritable state directory.
    pub fn save(&self) -> std::io::Result<()> {
        ensure_dir(Path::new(STATE_DIR), 0o755)?;
        let path = Record::path(&self.plan);
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    }

    /// Every record on this host (unreadable ones skipped).
    pub fn all() -> Vec<Record> {
        let Ok(dir) = std::fs::read_dir(STATE_DIR) else {
            return Vec::new();
        };
        dir.filter_map(Result::ok)
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| std::fs::read(e.path()).ok())
            .filter_map(|b| serde_json::from_slice(&b).ok())
            .collect()
    }

    /// True while the owning process is alive: a `sealgate` with that pid and start time.
    pub fn owner_alive(&self) -> bool {
        let comm = std::fs::read_to_string(format!("/proc/{}/comm", self.pid));
        comm.is_ok_and(|c| c.trim_end() == "sealgate")
            && (self.started.is_none() || start_time(self.pid) == self.started)
    }

    /// Removes the record and the namespace's files.
    pub fn remove(&self) {
        let _ = std::fs::remove_file(Record::path(&self.plan));
        let _ = std::fs::remove_dir_all(Record::files_dir(&self.plan));
    }
}

/// A process's start time in clock ticks since boot (`/proc/<pid>/stat` field 22; the fields
/// after the parenthesised command name start at field 3).
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

/// Writes the sandbox CA certificate (public) where the namespace's programs can read it.
///
/// # Errors
/// An unwritable state directory.
pub fn write_ca(plan: &Plan, pem: &str) -> std::io::Result<PathBuf> {
    let dir = Record::files_dir(plan);
    ensure_dir(Path::new(STATE_DIR), 0o755)?;
    ensure_dir(&dir, 0o755)?;
    let path = dir.join("ca.pem");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(&path)?;
    f.write_all(pem.as_bytes())?;
    Ok(path)
}

fn ensure_dir(dir: &Path, mode: u32) -> std::io::Result<()> {
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
    }
}
