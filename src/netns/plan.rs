//! Address and name plan for one sandbox namespace: a /30 from 198.18.0.0/15 per slot, and the
//! namespace, interface and chain names derived from the slot.
//!
//! Worked example, slot 5 (`0x0005`): the /30 is 198.18.0.20/30; the host side of the veth is
//! `sg0005h` with 198.18.0.21, the namespace `sealgate-0005` holds `eth0` with 198.18.0.22
//! (the sandbox's `source_ip`), and its default route points at 198.18.0.21 — which is also
//! the namespace's DNS server and the placeholder address every allowed name resolves to.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// First address of the pool (198.18.0.0/15, RFC 2544 benchmarking space: never routed).
pub const POOL_BASE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 0);
/// Number of /30 slots `sealgate sandbox exec` allocates from. The pool's last /24
/// (198.19.255.0/24, 64 slots) is never allocated: it is left for operators' and tests' own
/// addresses.
pub const SLOTS: u16 = (1 << 15) - 64;
/// The interface name inside every sandbox namespace.
pub const NS_IF: &str = "eth0";

/// Everything named or numbered for one sandbox namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// Slot number, `0..SLOTS`.
    pub slot: u16,
    /// Network namespace name (`ip netns`), e.g. `sealgate-0005`.
    pub netns: String,
    /// Host side of the veth pair, e.g. `sg0005h` (≤ 15 bytes, IFNAMSIZ).
    pub host_if: String,
    /// Host-side address: gateway, DNS server and DNS placeholder for the namespace.
    pub host_ip: Ipv4Addr,
    /// Namespace-side address: the sandbox's `source_ip`.
    pub ns_ip: Ipv4Addr,
}

impl Plan {
    /// The plan for `slot`, or None outside `0..SLOTS`.
    pub fn for_slot(slot: u16) -> Option<Plan> {
        if slot >= SLOTS {
            return None;
        }
        let base = u32::from(POOL_BASE) + 4 * u32::from(slot);
        Some(Plan {
            slot,
            netns: format!("sealgate-{slot:04x}"),
            host_if: format!("sg{slot:04x}h"),
            host_ip: Ipv4Addr::from(base + 1),
            ns_ip: Ipv4Addr::from(base + 2),
        })
    }

    /// The plan whose namespace-side address is `ns_ip` (how `sandbox rules` finds the names
    /// of a sandbox created by `sandbox exec`), or None when `ns_ip` is not such an address.
    pub fn for_ns_ip(ns_ip: Ipv4Addr) -> Option<Plan> {
        let offset = u32::from(ns_ip).checked_sub(u32::from(POOL_BASE))?;
        if offset % 4 != 2 {
            return None;
        }
        Plan::for_slot(u16::try_from(offset / 4).ok()?)
    }

    /// The network address of the slot's /30.
    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.host_ip) - 1)
    }

    /// True if `ip` lies in this slot's /30.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & !3 == u32::from(self.network())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worked_example_from_the_module_docs() {
        let p = Plan::for_slot(5).unwrap();
        assert_eq!(p.netns, "sealgate-0005");
        assert_eq!(p.host_if, "sg0005h");
        assert_eq!(p.network(), Ipv4Addr::new(198, 18, 0, 20));
        assert_eq!(p.host_ip, Ipv4Addr::new(198, 18, 0, 21));
        assert_eq!(p.ns_ip, Ipv4Addr::new(198, 18, 0, 22));
    }

    #[test]
    fn slots_stay_inside_the_pool_and_out_of_the_reserved_24() {
        let last = Plan::for_slot(SLOTS - 1).unwrap();
        assert_eq!(last.ns_ip, Ipv4Addr::new(198, 19, 254, 254));
        assert!(last.host_if.len() <= 15);
        assert!(Plan::for_slot(SLOTS).is_none());
    }

    #[test]
    fn ns_ip_round_trips_and_other_addresses_do_not() {
        for slot in [0, 1, 63, 64, 4095, SLOTS - 1] {
            let p = Plan::for_slot(slot).unwrap();
            assert_eq!(Plan::for_ns_ip(p.ns_ip), Some(p.clone()));
            assert!(Plan::for_ns_ip(p.host_ip).is_none());
            assert!(p.contains(p.host_ip) && p.contains(p.ns_ip));
        }
        assert!(Plan::for_ns_ip(Ipv4Addr::new(10, 0, 0, 2)).is_none());
        assert!(Plan::for_ns_ip(Ipv4Addr::new(198, 19, 255, 2)).is_none());
    }
}
