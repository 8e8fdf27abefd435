//! One cgroup per isolated sandbox, holding every process of its commands, with a memory
//! limit (`memory.limit_in_bytes` / `memory.max`, swap included) and a process-count limit
//! (`pids.max`). cgroup v1 and v2 alike: each controller is taken from whichever mounted
//! hierarchy holds it for this process.
//!
//! Where: under the daemon's own group of that hierarchy, `<own>/sealgate/<sandbox id>`, so a
//! limit set on the daemon (a systemd unit's `MemoryMax`, a container's) still bounds all of
//! its sandboxes together. On v2 a group with processes of its own cannot hand controllers
//! down (the "no internal processes" rule): if the daemon's own group refuses, the daemon
//! moves itself into `<own>/sealgate-daemon` and tries again — what systemd's `Delegate=yes`
//! expects of a service.
//!
//! Invariants: the sandbox's record names the groups before they are made ([`Groups::plan`]
//! then [`Groups::create`]), so a teardown or the start-up sweep removes them whatever
//! happened in between; a command's child joins every group before it execs
//! ([`join_in_child`]) and a failed join fails the command, so no command runs outside its
//! limits; [`remove`] kills what is left in a group before removing it.

use std::fs;
use std::io;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::Limits;

/// The group under the daemon's own that holds one group per sandbox.
pub const PARENT: &str = "sealgate";
/// On v2, the leaf the daemon moves itself into when its own group must delegate.
pub const DAEMON_LEAF: &str = "sealgate-daemon";

/// Why a sandbox's groups cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// No mounted hierarchy offers the controller to this process.
    #[error(
        "no cgroup hierarchy offers the {controller} controller to this process (is cgroupfs \
         mounted, and on cgroup v2 is {controller} delegated to the daemon's group?); set \
         [sandbox] {key} = 0 to run commands without that limit"
    )]
    NoController {
        /// `memory` or `pids`.
        controller: &'static str,
        /// The proxy.toml key that asks for it.
        key: &'static str,
    },
    /// A cgroup file or directory.
    #[error("cgroup: {what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> CgroupError {
    let path = path.to_owned();
    move |source| CgroupError::Io { what, path, source }
}

/// cgroup v1 (one hierarchy per controller set) or v2 (the unified hierarchy).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// Legacy hierarchies.
    V1,
    /// The unified hierarchy.
    V2,
}

/// A mounted cgroup hierarchy (one line of `/proc/self/mountinfo`).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Hierarchy {
    point: PathBuf,
    /// The group the mount shows as its root (not `/` inside some containers).
    root: String,
    version: Version,
    /// v1: the controllers bound to it (from the super options); v2: empty.
    controllers: Vec<String>,
}

/// The cgroup hierarchies in a `/proc/self/mountinfo` text.
fn hierarchies(mountinfo: &str) -> Vec<Hierarchy> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let l: Vec<&str> = left.split(' ').collect();
            let mut r = right.split(' ');
            let (fstype, _source, opts) = (r.next()?, r.next()?, r.next()?);
            let version = match fstype {
                "cgroup" => Version::V1,
                "cgroup2" => Version::V2,
                _ => return None,
            };
            let controllers = match version {
                Version::V1 => opts.split(',').map(str::to_owned).collect(),
                Version::V2 => Vec::new(),
            };
            Some(Hierarchy {
                point: PathBuf::from(l.get(4)?),
                root: (*l.get(3)?).to_owned(),
                version,
                controllers,
            })
        })
        .collect()
}

/// This process's group in the hierarchy (from a `/proc/self/cgroup` text): the line naming
/// `controller` for v1, the `0::` line for v2.
fn own_group(proc_cgroup: &str, h: &Hierarchy, controller: &str) -> Option<String> {
    proc_cgroup.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (id, names, path) = (parts.next()?, parts.next()?, parts.next()?);
        let hit = match h.version {
            Version::V1 => names.split(',').any(|n| n == controller),
            Version::V2 => id == "0" && names.is_empty(),
        };
        hit.then(|| path.to_owned())
    })
}

/// The directory of this process's own group for `controller` (pure: from the two texts).
/// A v1 hierarchy that has the controller wins over v2; on v2 a daemon already moved into
/// [`DAEMON_LEAF`] counts the group above it as its own.
fn locate_in(controller: &str, mountinfo: &str, proc_cgroup: &str) -> Option<(Version, PathBuf)> {
    let all = hierarchies(mountinfo);
    let h = all
        .iter()
        .find(|h| h.version == Version::V1 && h.controllers.iter().any(|c| c == controller))
        .or_else(|| all.iter().find(|h| h.version == Version::V2))?;
    let own = own_group(proc_cgroup, h, controller)?;
    let rel = own.strip_prefix(h.root.as_str()).unwrap_or(&own);
    let mut dir = h.point.join(rel.trim_start_matches('/'));
    if h.version == Version::V2 && dir.file_name().is_some_and(|n| n == DAEMON_LEAF) {
        dir.pop();
    }
    Some((h.version, dir))
}

/// [`locate_in`] on this process; on v2 also checks that the group offers the controller.
fn locate(controller: &'static str, key: &'static str) -> Result<(Version, PathBuf), CgroupError> {
    let none = || CgroupError::NoController { controller, key };
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let proc_cgroup = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let (version, dir) = locate_in(controller, &mountinfo, &proc_cgroup).ok_or_else(none)?;
    if version == Version::V2 {
        let offered = fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
        if !offered.split_whitespace().any(|c| c == controller) {
            return Err(none());
        }
    }
    Ok((version, dir))
}

/// One group of a sandbox and what it limits.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Group {
    path: PathBuf,
    version: Version,
    memory: Option<u64>,
    pids: Option<u64>,
}

/// The groups of one sandbox: one per hierarchy that holds a limited controller (one on v2,
/// up to two on v1).
#[derive(Clone, Debug, Default)]
pub struct Groups(Vec<Group>);

impl Groups {
    /// Where the groups of `sandbox_id` go under `limits` (nothing is made yet).
    ///
    /// # Errors
    /// A limited controller no hierarchy offers.
    pub fn plan(sandbox_id: &str, limits: &Limits) -> Result<Groups, CgroupError> {
        let mut groups: Vec<Group> = Vec::new();
        let wanted = [
            ("memory", "memory_max_mib", limits.memory_bytes),
            ("pids", "pids_max", limits.pids),
        ];
        for (controller, key, limit) in wanted {
            let Some(limit) = limit else { continue };
            let (version, own) = locate(controller, key)?;
            let path = own.join(PARENT).join(sandbox_id);
            let i = match groups.iter().position(|g| g.path == path) {
                Some(i) => i,
                None => {
                    groups.push(Group {
                        path,
                        version,
                        memory: None,
                        pids: None,
                    });
                    groups.len() - 1
                }
            };
            match controller {
                "memory" => groups[i].memory = Some(limit),
                _ => groups[i].pids = Some(limit),
            }
        }
        Ok(Groups(groups))
    }

    /// The groups' directories (for the sandbox's record).
    pub fn paths(&self) -> Vec<PathBuf> {
        self.0.iter().map(|g| g.path.clone()).collect()
    }

    /// Makes the groups and writes their limits.
    ///
    /// # Errors
    /// A directory or limit file the kernel refused.
    pub fn create(&self) -> Result<(), CgroupError> {
        for g in &self.0 {
            if g.version == Version::V2 {
                delegate(g)?;
            }
            fs::create_dir_all(&g.path).map_err(io_err("creating", &g.path))?;
            write_limits(g)?;
        }
        Ok(())
    }

    /// Every group's `cgroup.procs`, opened for a command's child to join
    /// ([`join_in_child`]); close-on-exec, as every descriptor the daemon opens.
    ///
    /// # Errors
    /// A group that is gone.
    pub fn open_procs(&self) -> Result<Vec<fs::File>, CgroupError> {
        self.0
            .iter()
            .map(|g| {
                let p = g.path.join("cgroup.procs");
                fs::OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .map_err(io_err("opening", &p))
            })
            .collect()
    }
}

/// v2: turns the group's controllers on in the subtree of the daemon's own group and of
/// [`PARENT`] (moving the daemon into [`DAEMON_LEAF`] if its group has to be emptied first).
fn delegate(g: &Group) -> Result<(), CgroupError> {
    let parent = g.path.parent().unwrap_or(&g.path);
    let own = parent.parent().unwrap_or(parent);
    let mut wanted = Vec::new();
    if g.memory.is_some() {
        wanted.push("+memory");
    }
    if g.pids.is_some() {
        wanted.push("+pids");
    }
    let wanted = wanted.join(" ");
    if let Err(e) = enable(own, &wanted) {
        if e.raw_os_error() != Some(libc::EBUSY) {
            return Err(io_err("enabling controllers in", own)(e));
        }
        let leaf = own.join(DAEMON_LEAF);
        fs::create_dir_all(&leaf).map_err(io_err("creating", &leaf))?;
        let procs = leaf.join("cgroup.procs");
        fs::write(&procs, std::process::id().to_string())
            .map_err(io_err("moving the daemon into", &leaf))?;
        enable(own, &wanted).map_err(io_err("enabling controllers in", own))?;
    }
    fs::create_dir_all(parent).map_err(io_err("creating", parent))?;
    enable(parent, &wanted).map_err(io_err("enabling controllers in", parent))
}

fn enable(group: &Path, controllers: &str) -> io::Result<()> {
    fs::write(group.join("cgroup.subtree_control"), controllers)
}

/// Writes `g`'s limits; swap is held to the same bound (v1 `memsw`, v2 `swap.max = 0`) where
/// the kernel accounts it, so a sandbox cannot page its way past its memory limit.
fn write_limits(g: &Group) -> Result<(), CgroupError> {
    let set = |file: &str, value: String| {
        let p = g.path.join(file);
        fs::write(&p, value).map_err(io_err("writing", &p))
    };
    let optional = |file: &str, value: String| {
        let p = g.path.join(file);
        match fs::write(&p, value) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("writing", &p)(e)),
            _ => Ok(()),
        }
    };
    if let Some(bytes) = g.memory {
        match g.version {
            Version::V1 => {
                set("memory.limit_in_bytes", bytes.to_string())?;
                optional("memory.memsw.limit_in_bytes", bytes.to_string())?;
            }
            Version::V2 => {
                set("memory.max", bytes.to_string())?;
                optional("memory.swap.max", "0".into())?;
            }
        }
    }
    if let Some(n) = g.pids {
        set("pids.max", n.to_string())?;
    }
    Ok(())
}

/// In a command's child, between `fork` and `exec`: moves the calling process into each group
/// by writing `0` to the `cgroup.procs` descriptors [`Groups::open_procs`] opened.
/// Async-signal-safe: one `write(2)` per descriptor, no allocation.
///
/// # Errors
/// The kernel refused a join (the spawn then fails: the command never runs unbounded).
pub fn join_in_child(fds: &[RawFd]) -> io::Result<()> {
    for &fd in fds {
        // SAFETY: write(2) of one byte from a static buffer to a descriptor the parent opened
        // and keeps open until the spawn returns.
        let n = unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) };
        if n != 1 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Kills every process left in each group, then removes the group. Idempotent and silent, as
/// a teardown must be: a group that is already gone is skipped.
pub fn remove(paths: &[PathBuf]) {
    for path in paths.iter().filter(|p| p.is_dir()) {
        let _ = fs::write(path.join("cgroup.kill"), "1");
        for _ in 0..40 {
            let left = members(path);
            if left.is_empty() && fs::remove_dir(path).is_ok() {
                break;
            }
            for pid in left {
                let _ = kill_pid(pid);
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

/// Process ids in the group.
pub fn members(path: &Path) -> Vec<i32> {
    fs::read_to_string(path.join("cgroup.procs"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn kill_pid(pid: i32) -> io::Result<()> {
    if pid <= 1 {
        return Ok(());
    }
    // SAFETY: kill(2) takes two integers; `pid` is a member of a sandbox's group.
    if unsafe { libc::kill(pid, libc::SIGKILL) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1_MOUNTS: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const V1_SELF: &str = "\
8:pids:/
4:memory:/process_api/7d0a
1:cpu,cpuacct:/
0::/
";

    #[test]
    fn v1_controllers_come_from_their_own_hierarchies() {
        assert_eq!(
            locate_in("memory", V1_MOUNTS, V1_SELF),
            Some((Version::V1, "/sys/fs/cgroup/memory/process_api/7d0a".into()))
        );
        assert_eq!(
            locate_in("pids", V1_MOUNTS, V1_SELF),
            Some((Version::V1, "/sys/fs/cgroup/pids".into()))
        );
    }

    #[test]
    fn v2_uses_the_unified_group_and_looks_past_the_daemon_leaf() {
        let mounts = "25 30 0:23 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            locate_in("memory", mounts, "0::/system.slice/sealgate.service\n"),
            Some((
                Version::V2,
                "/sys/fs/cgroup/system.slice/sealgate.service".into()
            ))
        );
        assert_eq!(
            locate_in(
                "pids",
                mounts,
                "0::/system.slice/sealgate.service/sealgate-daemon\n"
            ),
            Some((
                Version::V2,
                "/sys/fs/cgroup/system.slice/sealgate.service".into()
            ))
        );
    }

    #[test]
    fn a_container_mount_root_is_stripped_and_no_mount_is_none() {
        let mounts = "35 31 0:32 /docker/abc /sys/fs/cgroup/memory ro - cgroup cgroup rw,memory\n";
        assert_eq!(
            locate_in("memory", mounts, "4:memory:/docker/abc\n"),
            Some((Version::V1, "/sys/fs/cgroup/memory".into()))
        );
        assert_eq!(locate_in("memory", "", "4:memory:/\n"), None);
    }
}
