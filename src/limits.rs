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

/// Bounds on the connection-tracking entries one sandbox puts in the host's table
/// (`nf_conntrack_max`, shared by the whole host): every flow out of a sandbox's namespace is
/// redirected on the host, so each distinct destination is a host entry (UDP 30 s, TCP in
/// TIME_WAIT 120 s). Enforced by its iptables chain (`netns::rules`): new flows past either
/// bound are dropped before conntrack keeps them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Flows {
    /// Open TCP connections at once (`connlimit`; TIME_WAIT is not counted); None = no bound.
    pub max: Option<u32>,
    /// New flows per second (`hashlimit`, burst five seconds' worth, at most 10,000); None =
    /// no bound.
    pub new_per_sec: Option<u32>,
}

impl Flows {
    /// The `hashlimit` burst for `rate` new flows per second.
    pub fn burst(rate: u32) -> u32 {
        rate.saturating_mul(5).min(10_000)
    }
}

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
