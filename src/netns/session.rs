//! One isolated sandbox's network namespace, owned by the daemon from claim to teardown.
//!
//! Setup order (the record is written before each system change it names, so a daemon that
//! dies anywhere leaves something [`super::sweep`] can undo): record (the `O_EXCL` claim) →
//! `ip netns add` → veth (down, IPv6 off on the host side) → [the sandbox is created with the
//! namespace's address as `source_ip`] → DNS responder and transparent listener on the host
//! side → rules (one transaction per family) → links up → `/etc/netns/<ns>` files.
//!
//! Teardown order (idempotent, also run on drop): stop the responder and listener, kill what
//! still runs inside, delete the veth and the namespace (so removing the rules never leaves a
//! live interface unconfined), kill what is left in the sandbox's cgroups and remove them,
//! remove the rules and the `/etc/netns` files, unmount the sandbox's files and remove its
//! directory, and last the record.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use tokio::task::JoinHandle;

use super::dns::{Responder, SharedFilter};
use super::plan::SLOTS;
use super::record::Record;
use super::{link, NetnsError, Plan, RuleParams, RuleSet};

/// Slots tried before giving up (each attempt is one `ip netns add`).
const MAX_ATTEMPTS: u32 = 64;

/// What a sandbox puts in its namespace's record ([`Namespace::set_owner`]).
pub struct Owner {
    /// The sandbox.
    pub sandbox_id: String,
    /// Its private directory.
    pub dir: PathBuf,
    /// Its cgroups (none when unlimited).
    pub cgroups: Vec<PathBuf>,
    /// Its files' tmpfs mount point (None when `disk_max_mib = 0`).
    pub files: Option<PathBuf>,
}

/// A live sandbox namespace.
pub struct Namespace {
    /// The record (plan, sandbox id, rule inputs, directory).
    pub record: Record,
    dns: Option<Responder>,
    tasks: Vec<JoinHandle<()>>,
    done: bool,
}

impl Namespace {
    /// Claims a free slot and creates the namespace and its veth (both ends down). Blocking.
    ///
    /// # Errors
    /// Not root, tools missing, the pool exhausted.
    pub fn claim() -> Result<Namespace, NetnsError> {
        let start = random_slot();
        let in_use = link::host_ipv4_addrs();
        let mut tried = 0;
        for i in 0..u32::from(SLOTS) {
            let slot = ((u32::from(start) + i) % u32::from(SLOTS)) as u16;
            let Some(plan) = Plan::for_slot(slot) else {
                continue;
            };
            if in_use.iter().any(|ip| plan.contains(*ip)) || link::exists(&plan) {
                continue;
            }
            tried += 1;
            if tried > MAX_ATTEMPTS {
                break;
            }
            if let Some(ns) = Namespace::try_slot(plan)? {
                return Ok(ns);
            }
        }
        Err(NetnsError::PoolExhausted)
    }

    /// One attempt: Ok(None) means "taken, try another slot".
    fn try_slot(plan: Plan) -> Result<Option<Namespace>, NetnsError> {
        let record = Record::new(plan);
        let file_err = |source| NetnsError::File {
            path: Record::path(&record.plan).display().to_string(),
            source,
        };
        if !record.claim().map_err(file_err)? {
            return Ok(None);
        }
        let mut ns = Namespace {
            record,
            dns: None,
            tasks: Vec::new(),
            done: false,
        };
        match link::claim(&ns.record.plan) {
            Ok(()) => {}
            Err(NetnsError::Failed { stderr, .. }) if stderr.contains("exists") => {
                ns.done = true;
                ns.record.remove();
                return Ok(None);
            }
            Err(e) => return Err(e),
        }
        link::create(&ns.record.plan)?;
        Ok(Some(ns))
    }

    /// The plan (names and addresses).
    pub fn plan(&self) -> &Plan {
        &self.record.plan
    }

    /// Records the sandbox's id, directory, cgroups and files mount before anything is named
    /// after them.
    ///
    /// # Errors
    /// An unwritable state directory.
    pub fn set_owner(&mut self, owner: Owner) -> Result<(), NetnsError> {
        self.record.sandbox_id = Some(owner.sandbox_id);
        self.record.dir = Some(owner.dir);
        self.record.cgroups = owner.cgroups;
        self.record.files = owner.files;
        self.save()
    }

    fn save(&self) -> Result<(), NetnsError> {
        self.record.save().map_err(|source| NetnsError::File {
            path: Record::path(&self.record.plan).display().to_string(),
            source,
        })
    }

    /// Starts the DNS responder on the host side of the veth, answering at most `per_sec`
    /// queries a second; returns its port.
    ///
    /// # Errors
    /// No port could be bound.
    pub async fn start_dns(
        &mut self,
        filter: SharedFilter,
        per_sec: Option<u32>,
    ) -> std::io::Result<u16> {
        let dns = Responder::start(self.record.plan.host_ip, filter, per_sec).await?;
        let port = dns.port;
        self.dns = Some(dns);
        Ok(port)
    }

    /// Hands over a task (listener, refresher) that must stop when the namespace goes.
    pub fn own_task(&mut self, task: JoinHandle<()>) {
        self.tasks.push(task);
    }

    /// Applies the rule set for `transparent_port` and the started DNS responder, brings the
    /// links up and writes `/etc/netns/<ns>`. Blocking.
    ///
    /// # Errors
    /// The failing command or file.
    pub fn confine(
        &mut self,
        transparent_port: u16,
        flows: crate::limits::Flows,
    ) -> Result<(), NetnsError> {
        let plan = self.record.plan.clone();
        let params = RuleParams {
            sandbox_id: self.record.sandbox_id.clone().unwrap_or_default(),
            host_if: plan.host_if.clone(),
            sandbox_ip: plan.ns_ip,
            host_ip: Some(plan.host_ip),
            transparent_port,
            dns_port: self.dns.as_ref().map(|d| d.port),
            ipv6: std::path::Path::new("/proc/sys/net/ipv6").exists(),
            flows: Some(flows),
        };
        let set = RuleSet::generate(&params)?;
        self.record.rules = Some(params);
        self.save()?;
        super::apply_rules(&set)?;
        link::bring_up(&plan)?;
        link::write_etc(&plan)
    }

    /// The host-side address (gateway, DNS server, transparent listener address).
    pub fn host_ip(&self) -> Ipv4Addr {
        self.record.plan.host_ip
    }

    /// Removes everything; safe to call more than once. Blocking.
    pub fn teardown(&mut self) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        for t in self.tasks.drain(..) {
            t.abort();
        }
        self.dns = None;
        undo(&self.record);
    }
}

impl Drop for Namespace {
    /// Last resort (a panic, a dropped runtime): the system side is undone all the same.
    fn drop(&mut self) {
        self.teardown();
    }
}

/// The system side of a teardown, from a record alone (also used by the sweep).
pub fn undo(record: &Record) {
    let owned = record.owned();
    link::destroy(&record.plan);
    crate::limits::cgroup::remove(&owned.cgroups);
    if let Some(set) = record
        .rules
        .as_ref()
        .and_then(|p| RuleSet::generate(p).ok())
    {
        super::remove_rules(&set);
    }
    if let Some(files) = &owned.files {
        crate::limits::files::unmount(files);
    }
    if let Some(dir) = &owned.dir {
        let _ = std::fs::remove_dir_all(dir);
    }
    record.remove();
}

fn random_slot() -> u16 {
    let raw = uuid::Uuid::new_v4().as_u128();
    (raw % u128::from(SLOTS)) as u16
}
