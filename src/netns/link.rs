//! Creating and removing one sandbox namespace and its veth pair with `ip`, plus the files
//! `ip netns exec` bind-mounts over `/etc` inside it (`/etc/netns/<name>/`).
//!
//! Order is part of the security argument: the host side stays down until the caller has
//! applied the rule set ([`bring_up`] comes last), and [`destroy`] first kills whatever still
//! runs inside and deletes the veth, so removing the rules never leaves a live interface
//! unconfined.

use std::path::PathBuf;

use super::plan::{Plan, NS_IF};
use super::{run_args, NetnsError};

/// `ip netns add`: the atomic step that claims a slot (fails if the name exists).
///
/// # Errors
/// The name is taken, or the caller lacks CAP_SYS_ADMIN/CAP_NET_ADMIN.
pub fn claim(plan: &Plan) -> Result<(), NetnsError> {
    run_args(&["ip", "netns", "add", &plan.netns]).map(drop)
}

/// Creates the veth pair (`eth0` directly inside the namespace) and gives the host side its
/// address, with IPv6 off on the host side. Leaves both ends down.
///
/// # Errors
/// The failing `ip` command or sysctl file.
pub fn create(plan: &Plan) -> Result<(), NetnsError> {
    let host_cidr = format!("{}/30", plan.host_ip);
    run_args(&[
        "ip",
        "link",
        "add",
        &plan.host_if,
        "type",
        "veth",
        "peer",
        "name",
        NS_IF,
        "netns",
        &plan.netns,
    ])?;
    disable_ipv6(&plan.host_if)?;
    run_args(&["ip", "addr", "add", &host_cidr, "dev", &plan.host_if]).map(drop)
}

/// Addresses, routes and links inside the namespace, then the host side up.
///
/// # Errors
/// The failing `ip` command.
pub fn bring_up(plan: &Plan) -> Result<(), NetnsError> {
    let ns = plan.netns.as_str();
    let ns_cidr = format!("{}/30", plan.ns_ip);
    let gw = plan.host_ip.to_string();
    run_args(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
    run_args(&["ip", "-n", ns, "addr", "add", &ns_cidr, "dev", NS_IF])?;
    run_args(&["ip", "-n", ns, "link", "set", NS_IF, "up"])?;
    run_args(&["ip", "-n", ns, "route", "add", "default", "via", &gw])?;
    run_args(&["ip", "link", "set", &plan.host_if, "up"]).map(drop)
}

fn disable_ipv6(ifname: &str) -> Result<(), NetnsError> {
    let path = format!("/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6");
    if !std::path::Path::new(&path).exists() {
        return Ok(());
    }
    std::fs::write(&path, "1").map_err(|source| NetnsError::File { path, source })
}

/// `/etc/netns/<name>`: what `ip netns exec` bind-mounts over `/etc`.
pub fn etc_dir(plan: &Plan) -> PathBuf {
    PathBuf::from("/etc/netns").join(&plan.netns)
}

/// Writes `resolv.conf` (the host side as the only nameserver) and an `nsswitch.conf` whose
/// `hosts:` line is `files dns`, so name lookups inside go to the namespace's responder and
/// not to a host resolver module (systemd-resolved's `resolve`, mDNS…).
///
/// # Errors
/// An unwritable `/etc/netns`.
pub fn write_etc(plan: &Plan) -> Result<(), NetnsError> {
    let dir = etc_dir(plan);
    let file_err = |path: &PathBuf| {
        let path = path.display().to_string();
        move |source| NetnsError::File { path, source }
    };
    std::fs::create_dir_all(&dir).map_err(file_err(&dir))?;
    let resolv = dir.join("resolv.conf");
    let text = format!(
        "# written by sealgate for this sandbox\nnameserver {}\noptions attempts:2 timeout:2\n",
        plan.host_ip
    );
    std::fs::write(&resolv, text).map_err(file_err(&resolv))?;
    let nss = dir.join("nsswitch.conf");
    std::fs::write(&nss, nsswitch(&host_nsswitch())).map_err(file_err(&nss))
}

fn host_nsswitch() -> String {
    std::fs::read_to_string("/etc/nsswitch.conf").unwrap_or_default()
}

/// The host's nsswitch.conf with its `hosts:` line replaced (or added) as `files dns`.
pub fn nsswitch(host: &str) -> String {
    let mut out: String = host
        .lines()
        .filter(|l| !l.trim_start().starts_with("hosts:"))
        .map(|l| format!("{l}\n"))
        .collect();
    out.push_str("hosts: files dns\n");
    out
}

/// Process ids still running inside the namespace.
pub fn pids(plan: &Plan) -> Vec<u32> {
    run_args(&["ip", "netns", "pids", &plan.netns])
        .map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Removes everything [`claim`], [`create`], [`bring_up`] and [`write_etc`] made; succeeds
/// whatever is (or is not) left. Processes still inside are killed first, then the veth is
/// deleted (which takes `eth0` with it even if a process holds the namespace open).
pub fn destroy(plan: &Plan) {
    for _ in 0..3 {
        let left = pids(plan);
        if left.is_empty() {
            break;
        }
        for pid in left {
            let _ = super::signal(pid, libc::SIGKILL);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = run_args(&["ip", "link", "del", &plan.host_if]);
    let _ = run_args(&["ip", "netns", "del", &plan.netns]);
    let _ = std::fs::remove_dir_all(etc_dir(plan));
}

/// True if the namespace or the host-side interface still exists.
pub fn exists(plan: &Plan) -> bool {
    PathBuf::from("/run/netns").join(&plan.netns).exists()
        || PathBuf::from("/sys/class/net").join(&plan.host_if).exists()
}

/// IPv4 addresses configured on any host interface (to skip slots someone else uses).
pub fn host_ipv4_addrs() -> Vec<std::net::Ipv4Addr> {
    let Ok(text) = run_args(&["ip", "-o", "-4", "addr", "show"]) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            words.find(|w| *w == "inet")?;
            words.next()?.split('/').next()?.parse().ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nsswitch_hosts_line_is_replaced() {
        let host = "passwd: files systemd\nhosts:   files mdns4_minimal [NOTFOUND=return] resolve dns myhostname\nnetworks: files\n";
        let out = nsswitch(host);
        assert!(out.contains("passwd: files systemd\n"));
        assert!(out.contains("networks: files\n"));
        assert_eq!(out.matches("hosts:").count(), 1);
        assert!(out.ends_with("hosts: files dns\n"));
        assert_eq!(nsswitch(""), "hosts: files dns\n");
    }
}
