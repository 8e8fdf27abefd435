//! Which sealgate daemons run on this host, so that one daemon's start-up sweep leaves alone
//! the `SG-*` chains another live daemon's operator applied by hand.
//!
//! Why: rules applied from `sealgate sandbox rules` have no record (the daemon did not make
//! them); the sweep keeps those of the sandboxes the starting daemon serves, and took every
//! other one for a leftover. A second daemon on the host (a blue/green upgrade into a new
//! `data_dir`, a staging daemon) thereby removed a live daemon's sandboxes' REDIRECT and INPUT
//! hooks: their traffic went unredirected and they reached host services (outside pass).
//!
//! How: every daemon that may sweep writes `DIR/<pid>-<random>` holding its pid and start time
//! ([`super::record::start_time`], so a reused pid is not taken for it) and removes it when it
//! stops ([`Marker`]'s drop). A marker whose process is gone is litter, removed by the next
//! look. Markers of this very process (in-process daemons of a test binary) are not "another
//! daemon".
//!
//! Invariant: [`others_alive`] errs towards true only for a live process whose start time
//! matches; an unreadable directory means no other daemon is known.

use std::path::{Path, PathBuf};

use super::record::{ensure_dir, start_time};

/// Where daemons leave their markers.
pub const DIR: &str = "/run/sealgate/daemons";

/// This daemon's marker; removed when dropped.
#[derive(Debug)]
pub struct Marker(PathBuf);

impl Marker {
    /// Writes this process's marker in [`DIR`]; `None` when it cannot be written (not root:
    /// such a daemon sweeps nothing either).
    pub fn write() -> Option<Marker> {
        Marker::write_in(Path::new(DIR))
    }

    fn write_in(dir: &Path) -> Option<Marker> {
        let pid = std::process::id();
        let started = start_time(pid)?;
        ensure_dir(dir, 0o755).ok()?;
        let name = format!("{pid}-{}", crate::random::random_hex(6));
        // Written whole, then renamed in: another daemon's look never reads half a marker
        // (and takes it for litter).
        let (tmp, path) = (dir.join(format!(".{name}")), dir.join(name));
        std::fs::write(&tmp, format!("{pid} {started}\n"))
            .and_then(|()| std::fs::rename(&tmp, &path))
            .inspect_err(|_| {
                let _ = std::fs::remove_file(&tmp);
            })
            .ok()?;
        Some(Marker(path))
    }
}

impl Drop for Marker {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// True when a sealgate daemon other than this process runs on the host (it has a marker and
/// its process lives). Markers of dead processes are removed.
pub fn others_alive() -> bool {
    others_alive_in(Path::new(DIR))
}

fn others_alive_in(dir: &Path) -> bool {
    let own = std::process::id();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    let mut alive = false;
    for path in entries.filter_map(|e| Some(e.ok()?.path())) {
        if is_temporary(&path) {
            continue;
        }
        match read(&path) {
            Some((pid, started)) if start_time(pid) == Some(started) => alive |= pid != own,
            _ => {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    alive
}

/// A marker being written (`.<name>`): never read; one a crash left is litter only once it is
/// old, and only this rare case needs its age.
fn is_temporary(path: &Path) -> bool {
    let dotted = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'));
    if dotted {
        let old = std::fs::metadata(path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > std::time::Duration::from_secs(60));
        if old {
            let _ = std::fs::remove_file(path);
        }
    }
    dotted
}

/// (pid, start time) of a marker.
fn read(path: &Path) -> Option<(u32, u64)> {
    let text = std::fs::read_to_string(path).ok()?;
    let (pid, started) = text.trim().split_once(' ')?;
    Some((pid.parse().ok()?, started.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_markers_are_not_others_and_dead_ones_go() {
        let dir = tempfile::tempdir().unwrap();
        let mine = Marker::write_in(dir.path()).expect("marker");
        assert!(
            !others_alive_in(dir.path()),
            "this process is not another daemon"
        );
        // A dead process: pid 1's start time is never this.
        let dead = dir.path().join("1-dead");
        std::fs::write(&dead, "1 18446744073709551615\n").unwrap();
        let junk = dir.path().join("junk");
        std::fs::write(&junk, "not a marker").unwrap();
        let writing = dir.path().join(".2-being-written");
        std::fs::write(&writing, "").unwrap();
        assert!(!others_alive_in(dir.path()));
        assert!(!dead.exists() && !junk.exists(), "litter is removed");
        assert!(writing.exists(), "a marker being written is left alone");
        // A live other process: pid 1 with its real start time.
        let other = dir.path().join("1-init");
        std::fs::write(&other, format!("1 {}\n", start_time(1).unwrap())).unwrap();
        assert!(others_alive_in(dir.path()));
        let path = mine.0.clone();
        drop(mine);
        assert!(!path.exists(), "removed when dropped");
    }
}
