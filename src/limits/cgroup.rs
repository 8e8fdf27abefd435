//! One cgroup per isolated sandbox, holding every process of its commands, with a memory
//! limit (`memory.limit_in_bytes` / `memory.max`, swap included) and a process-count limit
//! (`pids.max`). cgroup v1 and v2 alike: each controller is taken from whichever mounted
//! hierarchy holds it for this process.
//!
//! Where: under the daemon's own group of that hierarchy, `<own>/sealgate/<sandbox id>`, so a
//! limit set on the daemon (a systemd unit's `MemoryMax`, a container's) still bounds all of
//! its sandboxes together. On v2 a group with processes of its own cannot hand controllers
//! down (the "no internal processes" rule): [`v2_base`] moves the daemon into
//! `<own>/sealgate-daemon` when it is alone in its group (what systemd's `Delegate=yes`
//! expects of a service), and otherwise uses the hierarchy's root.
//!
//! Invariants: the sandbox's record names the groups before they are made ([`Groups::plan`]
//! then [`Groups::create`]), so a teardown or the start-up sweep removes them whatever
//! happened in between; a command's child joins every group before it execs
//! ([`join_in_child`]) and a failed join fails the command, so no command runs outside its
//! limits; [`remove`] kills what is left in a group before removing it.

use crate::sandbox::is_sandbox_id;
use std::fs;
use std::io;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
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
    /// v2: neither the daemon's group nor the hierarchy's root can hand the controllers down.
    #[error(
        "cgroup v2: cannot hand {controllers} down to sandboxes: the daemon's group {} holds \
         other processes (run the daemon as a systemd unit with Delegate=yes, or alone in its \
         group) and the hierarchy's root refused; set [sandbox] memory_max_mib = 0 and \
         pids_max = 0 to run commands without these limits",
        own.display()
    )]
    NoDelegation {
        /// The daemon's own group.
        own: PathBuf,
        /// `+memory +pids`.
        controllers: String,
    },
    /// A cgroup file or directory.
    #[error(
        "cgroup: {what} {}: {source} (set [sandbox] memory_max_mib = 0 and pids_max = 0 to run \
         commands without these limits)",
        path.display()
    )]
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

/// Where `controller` is for this process (pure: from the two texts): the hierarchy's version,
/// this process's own group in it and the hierarchy's mount point. A v1 hierarchy that has
/// the controller wins over v2; on v2 a daemon already moved into [`DAEMON_LEAF`] counts the
/// group above it as its own.
fn locate_in(controller: &str, mountinfo: &str, proc_cgroup: &str) -> Option<Located> {
    let all = hierarchies(mountinfo);
    let h = all
        .iter()
        .find(|h| h.version == Version::V1 && h.controllers.iter().any(|c| c == controller))
        .or_else(|| all.iter().find(|h| h.version == Version::V2))?;
    let own = own_group(proc_cgroup, h, controller)?;
    let rel = Path::new(&own)
        .strip_prefix(&h.root)
        .unwrap_or(Path::new(&own));
    let mut dir = h.point.join(rel.strip_prefix("/").unwrap_or(rel));
    if h.version == Version::V2 && dir.file_name().is_some_and(|n| n == DAEMON_LEAF) {
        dir.pop();
    }
    Some(Located {
        version: h.version,
        own: dir,
        mount: h.point.clone(),
    })
}

/// Where a controller is ([`locate_in`]).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Located {
    version: Version,
    own: PathBuf,
    mount: PathBuf,
}

/// One group of a sandbox and what it limits.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Group {
    path: PathBuf,
    version: Version,
    memory: Option<u64>,
    pids: Option<u64>,
    /// In the `cpu` controller, with its default weight: no limit, but the sandbox's
    /// threads share one weight against the daemon's instead of one each.
    cpu: bool,
}

impl Group {
    /// `+memory +pids`, as far as this group limits them.
    fn controllers(&self) -> String {
        let mut v = Vec::new();
        if self.memory.is_some() {
            v.push("+memory");
        }
        if self.pids.is_some() {
            v.push("+pids");
        }
        if self.cpu {
            v.push("+cpu");
        }
        v.join(" ")
    }
}

/// Serialises, within this process, making [`PARENT`] and a group in it against removing an
/// empty [`PARENT`] ([`remove`]); another daemon's removal is met by [`Groups::create`]'s retry.
static PARENT_LOCK: Mutex<()> = Mutex::new(());

/// The groups of one sandbox: one per hierarchy that holds a limited controller (one on v2,
/// up to two on v1).
#[derive(Clone, Debug, Default)]
pub struct Groups(Vec<Group>);

impl Groups {
    /// Where the groups of `sandbox_id` go under `limits`. Nothing of the sandbox is made
    /// yet; on v2 the group that will hold them is made able to hand the controllers down
    /// ([`v2_base`]).
    ///
    /// # Errors
    /// A limited controller that no hierarchy offers, or that v2 cannot delegate.
    pub fn plan(sandbox_id: &str, limits: &Limits) -> Result<Groups, CgroupError> {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let proc_cgroup = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let wanted = [
            ("memory", "memory_max_mib", limits.memory_bytes),
            ("pids", "pids_max", limits.pids),
        ];
        let mut groups: Vec<(Located, Group)> = Vec::new();
        for (controller, key, limit) in wanted {
            let Some(limit) = limit else { continue };
            let at = locate_in(controller, &mountinfo, &proc_cgroup)
                .ok_or(CgroupError::NoController { controller, key })?;
            let i = match groups.iter().position(|(l, _)| *l == at) {
                Some(i) => i,
                None => {
                    let group = Group {
                        path: PathBuf::new(),
                        version: at.version,
                        memory: None,
                        pids: None,
                        cpu: false,
                    };
                    groups.push((at, group));
                    groups.len() - 1
                }
            };
            match controller {
                "memory" => groups[i].1.memory = Some(limit),
                _ => groups[i].1.pids = Some(limit),
            }
        }
        if !groups.is_empty() {
            share_cpu(&mut groups, &mountinfo, &proc_cgroup);
        }
        groups
            .into_iter()
            .map(|(at, mut g)| {
                let base = match at.version {
                    Version::V1 => at.own,
                    Version::V2 => match v2_base(&at, &g.controllers()) {
                        Err(_) if g.cpu => {
                            g.cpu = false;
                            v2_base(&at, &g.controllers())?
                        }
                        other => other?,
                    },
                };
                g.path = base.join(PARENT).join(sandbox_id);
                Ok(g)
            })
            .collect::<Result<_, _>>()
            .map(Groups)
    }

    /// The groups' directories (for the sandbox's record).
    pub fn paths(&self) -> Vec<PathBuf> {
        self.0.iter().map(|g| g.path.clone()).collect()
    }

    /// Makes the groups and writes their limits (a [`PARENT`] another daemon removed in
    /// between is made again).
    ///
    /// # Errors
    /// A directory or limit file the kernel refused.
    pub fn create(&self) -> Result<(), CgroupError> {
        for g in &self.0 {
            let mut tries = 0;
            loop {
                match make(g) {
                    Err(CgroupError::Io { source, .. })
                        if source.kind() == io::ErrorKind::NotFound && tries < 3 =>
                    {
                        tries += 1;
                    }
                    other => break other?,
                }
            }
            write_limits(g)?;
        }
        Ok(())
    }

    /// How many times the kernel's OOM killer acted in the sandbox's memory group so far
    /// (0 without one, or on a kernel that does not count: v1 `memory.oom_control`, v2
    /// `memory.events`).
    pub fn oom_kills(&self) -> u64 {
        self.0
            .iter()
            .find(|g| g.memory.is_some())
            .and_then(|g| {
                let file = match g.version {
                    Version::V1 => "memory.oom_control",
                    Version::V2 => "memory.events",
                };
                fs::read_to_string(g.path.join(file)).ok()
            })
            .and_then(|text| oom_kill_count(&text))
            .unwrap_or(0)
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

/// The `oom_kill N` line of `memory.oom_control` (v1) or `memory.events` (v2).
fn oom_kill_count(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
}

/// Puts the sandbox in the `cpu` controller too, where there is one: without it each of a
/// sandbox's threads weighs as much as each of the daemon's, so a command running a thousand
/// busy threads took nearly all of the CPU from the proxy serving every sandbox. With it the
/// sandbox weighs as one. v1: a group of its own in the `cpu` hierarchy; v2: `+cpu` on the
/// sandbox's one group, dropped again if the hierarchy will not hand it down.
fn share_cpu(groups: &mut Vec<(Located, Group)>, mountinfo: &str, proc_cgroup: &str) {
    let Some(at) = locate_in("cpu", mountinfo, proc_cgroup) else {
        return;
    };
    if let Some((_, g)) = groups.iter_mut().find(|(l, _)| *l == at) {
        g.cpu = true;
    } else if at.version == Version::V1 {
        let version = at.version;
        groups.push((
            at,
            Group {
                path: PathBuf::new(),
                version,
                memory: None,
                pids: None,
                cpu: true,
            },
        ));
    }
}

/// [`PARENT`] (on v2 with `controllers` handed down) and the sandbox's group in it.
fn make(g: &Group) -> Result<(), CgroupError> {
    let _serial = PARENT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let parent = g.path.parent().unwrap_or(&g.path);
    match fs::create_dir(parent) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
            return Err(io_err("creating", parent)(e))
        }
        _ => {}
    }
    if g.version == Version::V2 {
        enable(parent, &g.controllers()).map_err(io_err("enabling controllers in", parent))?;
    }
    match fs::create_dir(&g.path) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(io_err("creating", &g.path)(e)),
        _ => Ok(()),
    }
}

/// v2: the group under which sandboxes' groups go, able to hand `controllers` (`+memory
/// +pids`) down. v2 lets a group with processes of its own hand no controller down, so:
/// 1. the daemon's own group, if it offers them and the daemon is alone in it — moving the
///    daemon into [`DAEMON_LEAF`] first if needed (a systemd unit with `Delegate=yes`);
/// 2. else the hierarchy's root, which the rule exempts (as Docker's cgroupfs driver does):
///    the daemon shares its group with others (a login session, a supervisor), and a group
///    of theirs is not the daemon's to rearrange.
fn v2_base(at: &Located, controllers: &str) -> Result<PathBuf, CgroupError> {
    let names: Vec<&str> = controllers
        .split(' ')
        .map(|c| c.trim_start_matches('+'))
        .collect();
    let offers = |dir: &Path| {
        let have = fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
        names
            .iter()
            .all(|n| have.split_whitespace().any(|h| h == *n))
    };
    if offers(&at.own) {
        if enable(&at.own, controllers).is_ok() {
            return Ok(at.own.clone());
        }
        let alone = members(&at.own) == [std::process::id() as i32];
        if alone && move_self(&at.own).is_ok() && enable(&at.own, controllers).is_ok() {
            return Ok(at.own.clone());
        }
    }
    if offers(&at.mount) && enable(&at.mount, controllers).is_ok() {
        return Ok(at.mount.clone());
    }
    Err(CgroupError::NoDelegation {
        own: at.own.clone(),
        controllers: controllers.to_owned(),
    })
}

/// Moves this process into `<own>/`[`DAEMON_LEAF`].
fn move_self(own: &Path) -> io::Result<()> {
    let leaf = own.join(DAEMON_LEAF);
    match fs::create_dir(&leaf) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    write_existing(&leaf.join("cgroup.procs"), &std::process::id().to_string())
}

fn enable(group: &Path, controllers: &str) -> io::Result<()> {
    write_existing(&group.join("cgroup.subtree_control"), controllers)
}

/// Writes an existing file: never `O_CREAT`, with which a missing cgroupfs file fails with
/// EACCES instead of ENOENT.
fn write_existing(path: &Path, value: &str) -> io::Result<()> {
    use std::io::Write as _;
    fs::OpenOptions::new()
        .write(true)
        .open(path)?
        .write_all(value.as_bytes())
}

/// Writes `g`'s limits; swap is held to the same bound (v1 `memsw`, v2 `swap.max = 0`) where
/// the kernel accounts it, so a sandbox cannot page its way past its memory limit. On v1 the
/// TCP socket-buffer counter (`kmem.tcp`) gets the limit too, which makes the kernel count
/// them (it counts only once a limit is set) — but see below: it does not enforce it.
fn write_limits(g: &Group) -> Result<(), CgroupError> {
    let set = |file: &str, value: &str| {
        let p = g.path.join(file);
        write_existing(&p, value).map_err(io_err("writing", &p))
    };
    let optional = |file: &str, value: &str| {
        let p = g.path.join(file);
        match write_existing(&p, value) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("writing", &p)(e)),
            _ => Ok(()),
        }
    };
    if let Some(bytes) = g.memory {
        let bytes = bytes.to_string();
        match g.version {
            Version::V1 => {
                set("memory.limit_in_bytes", &bytes)?;
                optional("memory.memsw.limit_in_bytes", &bytes)?;
                // v1 counts socket buffers on a counter of their own, and only once it has a
                // limit. Kernel 6.18 counts but does not enforce it: re-measured with this
                // set, 632 MiB counted, failcnt 0, under a 128 MiB limit. Kept for the count
                // (`memory.kmem.tcp.usage_in_bytes`); v2 charges them to memory.max.
                optional("memory.kmem.tcp.limit_in_bytes", &bytes)?;
            }
            Version::V2 => {
                set("memory.max", &bytes)?;
                optional("memory.swap.max", "0")?;
            }
        }
    }
    if let Some(n) = g.pids {
        set("pids.max", &n.to_string())?;
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

/// In a command's child, between `fork` and `exec`: `oom_score_adj = 1000`, inherited by
/// everything the command starts, so whenever memory runs out — the host's, or a group above
/// the sandbox's that also holds the daemon — the kernel ends a sandbox's process before the
/// daemon. Raising the score needs no privilege — but the file is the process's own only while
/// it is dumpable: the daemon is not ([`crate::core_dumps`]) and the child inherits that until
/// `exec`, so only a root daemon (isolation needs one) can write it here; a rootless mode would
/// have to write it after `exec` or before turning dumpability off (review h38e). Best effort
/// (a kernel without the file changes nothing). Async-signal-safe: open, write, close on a
/// static path.
pub fn prefer_oom_kill_in_child() {
    // SAFETY: a static NUL-terminated path and a static buffer; the descriptor is ours and
    // closed before returning.
    unsafe {
        let fd = libc::open(
            c"/proc/self/oom_score_adj".as_ptr(),
            libc::O_WRONLY | libc::O_CLOEXEC,
        );
        if fd >= 0 {
            libc::write(fd, b"1000".as_ptr().cast(), 4);
            libc::close(fd);
        }
    }
}

/// Kills every process left in each group, then removes the group, and its [`PARENT`] once
/// empty. Idempotent, as a teardown must be: a group that is already gone is skipped; one that
/// cannot be removed (a process that does not die) is logged.
pub fn remove(paths: &[PathBuf]) {
    for path in paths.iter().filter(|p| p.is_dir()) {
        let _ = write_existing(&path.join("cgroup.kill"), "1");
        let mut removed = false;
        for _ in 0..40 {
            let left = members(path);
            if left.is_empty() && fs::remove_dir(path).is_ok() {
                removed = true;
                break;
            }
            for pid in left {
                let _ = kill_pid(pid);
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        if !removed {
            tracing::warn!(group = %path.display(), left = ?members(path), "a sandbox's cgroup could not be removed");
            continue;
        }
        if let Some(parent) = path.parent().filter(|p| p.ends_with(PARENT)) {
            let _serial = PARENT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
            let _ = fs::remove_dir(parent);
        }
    }
}

/// Every sandbox group (a directory named like a sandbox id) under [`PARENT`] where this
/// process would put one: its own group of each hierarchy holding `memory`, `pids` or `cpu`,
/// and on v2 the hierarchy's root. For the start-up sweep, which removes those no record
/// names.
pub fn listed() -> Vec<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let proc_cgroup = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let mut parents: Vec<PathBuf> = Vec::new();
    for c in ["memory", "pids", "cpu"] {
        if let Some(at) = locate_in(c, &mountinfo, &proc_cgroup) {
            parents.push(at.own.join(PARENT));
            if at.version == Version::V2 {
                parents.push(at.mount.join(PARENT));
            }
        }
    }
    parents.sort();
    parents.dedup();
    parents
        .iter()
        .filter_map(|p| fs::read_dir(p).ok())
        .flat_map(|d| d.filter_map(Result::ok).map(|e| e.path()))
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(is_sandbox_id)
        })
        .collect()
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

    fn own(c: &str, mounts: &str, proc_cgroup: &str) -> Option<(Version, PathBuf)> {
        locate_in(c, mounts, proc_cgroup).map(|l| (l.version, l.own))
    }

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
            own("memory", V1_MOUNTS, V1_SELF),
            Some((Version::V1, "/sys/fs/cgroup/memory/process_api/7d0a".into()))
        );
        assert_eq!(
            own("pids", V1_MOUNTS, V1_SELF),
            Some((Version::V1, "/sys/fs/cgroup/pids".into()))
        );
    }

    #[test]
    fn v2_uses_the_unified_group_and_looks_past_the_daemon_leaf() {
        let mounts = "25 30 0:23 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            locate_in("memory", mounts, "0::/system.slice/sealgate.service\n").map(|l| l.mount),
            Some("/sys/fs/cgroup".into())
        );
        assert_eq!(
            own("memory", mounts, "0::/system.slice/sealgate.service\n"),
            Some((
                Version::V2,
                "/sys/fs/cgroup/system.slice/sealgate.service".into()
            ))
        );
        assert_eq!(
            own(
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
    fn the_oom_kill_counter_is_read_from_either_version() {
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        let v2 = "low 0\nhigh 0\nmax 9\noom 2\noom_kill 2\noom_group_kill 0\n";
        assert_eq!(oom_kill_count(v1), Some(3));
        assert_eq!(oom_kill_count(v2), Some(2));
        assert_eq!(oom_kill_count("oom_kill_disable 0\n"), None);
    }

    #[test]
    fn a_container_mount_root_is_stripped_and_no_mount_is_none() {
        let mounts = "35 31 0:32 /docker/abc /sys/fs/cgroup/memory ro - cgroup cgroup rw,memory\n";
        assert_eq!(
            own("memory", mounts, "4:memory:/docker/abc\n"),
            Some((Version::V1, "/sys/fs/cgroup/memory".into()))
        );
        // Path components, not string prefixes: /docker/abcdef is not under /docker/abc.
        assert_eq!(
            own("memory", mounts, "4:memory:/docker/abcdef\n"),
            Some((Version::V1, "/sys/fs/cgroup/memory/docker/abcdef".into()))
        );
        assert_eq!(own("memory", "", "4:memory:/\n"), None);
    }
}
