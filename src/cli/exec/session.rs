//! One sandbox namespace from setup to teardown: slot, veth, sandbox (through the admin API),
//! DNS responder, rules, links, `/etc/netns` files, CA file — and the reverse, idempotently.
//!
//! Setup order (each step recorded in the state file before the next, so a crash anywhere
//! leaves something [`sweep_stale`] can undo): claim a namespace name → record → veth → sandbox
//! with `source_ip` → DNS responder → rules → links up → resolv.conf/nsswitch.conf → CA file.
//! Teardown order: kill what still runs inside, delete veth and namespace, remove rules, end
//! the sandbox, remove files.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use http::Method;
use serde_json::{json, Value};

use super::state::{self, Record};
use crate::cli::client::{AdminClient, ClientError};
use crate::netns::dns::{NameFilter, Responder, SharedFilter};
use crate::netns::plan::SLOTS;
use crate::netns::{self, link, NetnsError, Plan, RuleParams, RuleSet};

/// Slots tried before giving up (each attempt is one `ip netns add`).
const MAX_ATTEMPTS: u32 = 64;
/// How often the DNS filter re-reads the store's allowlist.
const ALLOWLIST_REFRESH: Duration = Duration::from_secs(2);

/// A live sandbox namespace.
pub struct Session {
    /// The record (plan, sandbox id, rule inputs).
    pub record: Record,
    /// The daemon's answer for the sandbox.
    pub sandbox: Value,
    /// Where the CA certificate was written.
    pub ca_path: std::path::PathBuf,
    dns: Option<Responder>,
    refresher: Option<tokio::task::JoinHandle<()>>,
    done: bool,
}

/// What setup needs.
pub struct SetupArgs<'a> {
    /// The store record (`GET /v1/stores/{id}`).
    pub store: &'a Value,
    /// Sandbox lifetime in seconds.
    pub timeout: Option<u64>,
    /// The daemon's transparent listener port.
    pub transparent_port: u16,
}

impl Session {
    /// Builds everything; on failure, removes what was built and returns the error.
    ///
    /// # Errors
    /// Not root, tools missing, pool exhausted, the daemon refusing the sandbox.
    pub async fn setup(c: &AdminClient, a: &SetupArgs<'_>) -> anyhow::Result<Session> {
        let (record, sandbox) = claim(c, a).await?;
        let mut s = Session {
            record,
            sandbox,
            ca_path: Default::default(),
            dns: None,
            refresher: None,
            done: false,
        };
        if let Err(e) = s.finish_setup(c, a).await {
            s.teardown(c).await;
            return Err(e);
        }
        Ok(s)
    }

    async fn finish_setup(&mut self, c: &AdminClient, a: &SetupArgs<'_>) -> anyhow::Result<()> {
        let plan = self.record.plan.clone();
        let filter = shared_filter(a.store, plan.host_ip)?;
        let dns = Responder::start(plan.host_ip, filter.clone())
            .await
            .context("starting the namespace's DNS responder")?;
        let params = RuleParams {
            sandbox_id: self.sandbox_id().to_owned(),
            host_if: plan.host_if.clone(),
            sandbox_ip: plan.ns_ip,
            host_ip: Some(plan.host_ip),
            transparent_port: a.transparent_port,
            dns_port: Some(dns.port),
            ipv6: std::path::Path::new("/proc/sys/net/ipv6").exists(),
        };
        self.dns = Some(dns);
        self.record.rules = Some(params.clone());
        self.record.save().context("writing the exec state file")?;
        netns::apply_rules(&RuleSet::generate(&params)?)?;
        link::bring_up(&plan)?;
        link::write_etc(&plan)?;
        check_listener(plan.host_ip, a.transparent_port)?;
        let pem = self.sandbox["ca_cert_pem"].as_str().unwrap_or_default();
        self.ca_path = state::write_ca(&plan, pem).context("writing the CA certificate")?;
        let store_id = a.store["id"].as_str().unwrap_or_default().to_owned();
        self.refresher = Some(tokio::spawn(refresh(
            c.clone(),
            store_id,
            plan.host_ip,
            filter,
        )));
        Ok(())
    }

    /// The sandbox id.
    pub fn sandbox_id(&self) -> &str {
        self.record.sandbox_id.as_deref().unwrap_or_default()
    }

    /// Removes everything; safe to call more than once.
    pub async fn teardown(&mut self, c: &AdminClient) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        if let Some(r) = self.refresher.take() {
            r.abort();
        }
        self.dns = None;
        undo(&self.record);
        if let Some(id) = &self.record.sandbox_id {
            end_sandbox(c, id).await;
        }
        self.record.remove();
    }
}

impl Drop for Session {
    /// Last resort (a panic between setup and teardown): the system-side undo still runs;
    /// the sandbox then expires on its own.
    fn drop(&mut self) {
        if !self.done {
            undo(&self.record);
            self.record.remove();
        }
    }
}

/// The system side of teardown: namespace, veth, `/etc/netns`, rules.
fn undo(record: &Record) {
    link::destroy(&record.plan);
    if let Some(set) = record
        .rules
        .as_ref()
        .and_then(|p| RuleSet::generate(p).ok())
    {
        netns::remove_rules(&set);
    }
}

async fn end_sandbox(c: &AdminClient, id: &str) {
    match c
        .call(Method::DELETE, &format!("/v1/sandboxes/{id}"), None)
        .await
    {
        Ok(_) | Err(ClientError::Api { status: 404, .. }) => {}
        Err(e) => eprintln!("sealgate: warning: could not end sandbox {id}: {e}"),
    }
}

/// Claims a free slot and creates the sandbox on it, retrying on a taken name or address.
async fn claim(c: &AdminClient, a: &SetupArgs<'_>) -> anyhow::Result<(Record, Value)> {
    let start = random_slot();
    let in_use = link::host_ipv4_addrs();
    let mut tried = 0;
    for i in 0..u32::from(SLOTS) {
        let slot = u16::try_from((u32::from(start) + i) % u32::from(SLOTS))?;
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
        if let Some(done) = try_slot(c, a, plan).await? {
            return Ok(done);
        }
    }
    Err(NetnsError::PoolExhausted.into())
}

/// One attempt: Ok(None) means "taken, try another slot".
async fn try_slot(
    c: &AdminClient,
    a: &SetupArgs<'_>,
    plan: Plan,
) -> anyhow::Result<Option<(Record, Value)>> {
    match link::claim(&plan) {
        Ok(()) => {}
        Err(NetnsError::Failed { stderr, .. }) if stderr.contains("exists") => return Ok(None),
        Err(e) => return Err(anyhow::Error::new(e).context(ROOT_HINT)),
    }
    let mut record = Record {
        pid: std::process::id(),
        started: state::start_time(std::process::id()),
        plan: plan.clone(),
        sandbox_id: None,
        rules: None,
    };
    let created = create_on(c, a, &mut record).await;
    match created {
        Ok(Some(sb)) => Ok(Some((record, sb))),
        other => {
            undo(&record);
            record.remove();
            other.map(|_| None)
        }
    }
}

const ROOT_HINT: &str =
    "creating a network namespace (sealgate sandbox exec needs root: CAP_SYS_ADMIN and CAP_NET_ADMIN)";

async fn create_on(
    c: &AdminClient,
    a: &SetupArgs<'_>,
    record: &mut Record,
) -> anyhow::Result<Option<Value>> {
    record.save().context("writing the exec state file")?;
    link::create(&record.plan)?;
    let mut body =
        json!({"secret_store": a.store["id"], "source_ip": record.plan.ns_ip.to_string()});
    if let Some(t) = a.timeout {
        body["timeout"] = json!(t);
    }
    match c.call(Method::POST, "/v1/sandboxes", Some(body)).await {
        Ok(sb) => {
            record.sandbox_id = sb["id"].as_str().map(str::to_owned);
            record.save().context("writing the exec state file")?;
            Ok(Some(sb))
        }
        Err(ClientError::Api { status: 409, .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn random_slot() -> u16 {
    let raw = uuid::Uuid::new_v4().as_u128();
    (raw % u128::from(SLOTS)) as u16
}

fn allowlist_of(store: &Value) -> Option<Vec<String>> {
    store["egress_allowlist"].as_array().map(|l| {
        l.iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect()
    })
}

fn shared_filter(store: &Value, placeholder: Ipv4Addr) -> anyhow::Result<SharedFilter> {
    let f = NameFilter::new(allowlist_of(store).as_deref(), placeholder)?;
    Ok(Arc::new(RwLock::new(Arc::new(f))))
}

/// Keeps the DNS filter in step with the store's allowlist (the proxy applies allowlist
/// changes to running sandboxes within a second; names should follow). A deleted store keeps
/// the last list, as its running sandboxes keep their snapshot.
async fn refresh(c: AdminClient, store_id: String, placeholder: Ipv4Addr, filter: SharedFilter) {
    let mut last = None;
    loop {
        tokio::time::sleep(ALLOWLIST_REFRESH).await;
        let Ok(store) = c
            .call(Method::GET, &format!("/v1/stores/{store_id}"), None)
            .await
        else {
            continue;
        };
        let list = allowlist_of(&store);
        if last.as_ref() == Some(&list) {
            continue;
        }
        if let Ok(f) = NameFilter::new(list.as_deref(), placeholder) {
            *filter.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(f);
            last = Some(list);
        }
    }
}

/// Fails early when no socket of this network namespace listens on the transparent port at
/// an address REDIRECT can reach (the wildcard or the host-side address): the daemon is not
/// running, has no `transparent_listen`, or listens on loopback only. Reads `/proc/net/tcp{,6}`
/// rather than dialling, so the daemon sees no stray connection.
fn check_listener(host_ip: Ipv4Addr, port: u16) -> anyhow::Result<()> {
    let v4 = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let v6 = std::fs::read_to_string("/proc/net/tcp6").unwrap_or_default();
    let addrs: Vec<IpAddr> = listening(&v4, port)
        .into_iter()
        .chain(listening(&v6, port))
        .collect();
    let reachable = |ip: &IpAddr| ip.is_unspecified() || ip.to_canonical() == IpAddr::V4(host_ip);
    if addrs.iter().any(reachable) {
        return Ok(());
    }
    let seen = if addrs.is_empty() {
        "nothing listens there".to_owned()
    } else {
        let list: Vec<String> = addrs.iter().map(ToString::to_string).collect();
        format!(
            "it listens only on {} (loopback is not reachable by REDIRECT)",
            list.join(", ")
        )
    };
    anyhow::bail!(
        "transparent port {port}: {seen}; run the daemon with [proxy] transparent_listen = \
         \"0.0.0.0:{port}\", or pass --transparent-port"
    )
}

/// Local addresses of the LISTEN sockets on `port` in a `/proc/net/tcp` or `tcp6` table.
///
/// The kernel prints each address as the hex of its in-memory (network order) 32-bit words
/// read as native integers, so `0100007F` is 127.0.0.1 on little-endian hosts; converting
/// every word back with `to_ne_bytes` gives the network-order bytes on any host.
fn listening(table: &str, port: u16) -> Vec<IpAddr> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let local = f.nth(1)?;
            let state = f.nth(1)?;
            let (addr, p) = local.split_once(':')?;
            let listening = state == "0A" && u16::from_str_radix(p, 16).ok()? == port;
            listening.then(|| proc_addr(addr)).flatten()
        })
        .collect()
}

fn proc_addr(hex: &str) -> Option<IpAddr> {
    let mut bytes = Vec::with_capacity(16);
    for i in (0..hex.len()).step_by(8) {
        let word = u32::from_str_radix(hex.get(i..i + 8)?, 16).ok()?;
        bytes.extend_from_slice(&word.to_ne_bytes());
    }
    match bytes.len() {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?)),
        16 => Some(IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?)),
        _ => None,
    }
}

/// Undoes what `sandbox exec` runs that died without cleaning up (SIGKILL, power loss of the
/// process): their namespaces, rules and files, and — through this daemon — their sandboxes.
pub async fn sweep_stale(c: &AdminClient) {
    for rec in Record::all() {
        if rec.pid == std::process::id() || rec.owner_alive() {
            continue;
        }
        undo(&rec);
        if let Some(id) = &rec.sandbox_id {
            end_sandbox(c, id).await;
        }
        rec.remove();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn word(ip: [u8; 4]) -> String {
        format!("{:08X}", u32::from_ne_bytes(ip))
    }

    #[test]
    fn listening_sockets_are_read_from_proc_tables() {
        let table = format!(
            "  sl  local_address rem_address   st\n\
             0: {}:0C39 00000000:0000 0A 0\n\
             1: {}:0C39 00000000:0000 0A 0\n\
             2: {}:0C39 0100007F:D431 01 0\n\
             3: {}:0C3A 00000000:0000 0A 0\n",
            word([127, 0, 0, 1]),
            word([0, 0, 0, 0]),
            word([198, 18, 0, 1]),
            word([198, 18, 0, 1]),
        );
        let got = listening(&table, 3129);
        assert_eq!(
            got,
            [
                "127.0.0.1".parse::<IpAddr>().unwrap(),
                "0.0.0.0".parse().unwrap()
            ]
        );
        let v6 = format!(
            "  sl local\n 0: {}:0C39 {}:0000 0A 0\n",
            "0".repeat(32),
            "0".repeat(32)
        );
        assert_eq!(listening(&v6, 3129), ["::".parse::<IpAddr>().unwrap()]);
        assert!(listening("garbage\n 0: zz:zz 0A\n", 3129).is_empty());
    }
}
