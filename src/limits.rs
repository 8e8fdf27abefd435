//! Resource limits of isolated sandboxes' commands (`[sandbox] memory_max_mib`, `pids_max`,
//! `disk_max_mib`): one cgroup per sandbox that every process of its commands joins before it
//! execs ([`cgroup`]), and a size-bounded tmpfs that holds the sandbox's `home/` and `tmp/`
//! ([`files`]).
//!
//! Without them one sandbox could fill the disk under the daemon's database, exhaust the
//! host's memory or its process table, and take every other sandbox down with it. A limit
//! that is set but cannot be applied fails the sandbox's creation (fail closed): the daemon
//! never runs a command unbounded because the host refused a cgroup. `0` turns a limit off.

pub mod cgroup;
pub mod files;

/// The limits of one isolated sandbox (None = off).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of memory for all its processes together, tmpfs pages (its files) included.
    pub memory_bytes: Option<u64>,
    /// Processes and threads at once.
    pub pids: Option<u64>,
    /// Bytes of files in `home/` and `tmp/` together.
    pub disk_bytes: Option<u64>,
}

impl Limits {
    /// True when commands run in a cgroup.
    pub fn needs_cgroup(&self) -> bool {
        self.memory_bytes.is_some() || self.pids.is_some()
    }
}
