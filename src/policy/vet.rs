//! Address vetting: which resolved addresses the proxy may dial (smokescreen-style table).
//!
//! [`classify`] says why an address is not public (or `None` when it is); [`AddressPolicy`]
//! adds the operator's `allow_private_cidrs` holes and the daemon's own listeners, which are
//! refused whatever the holes say (no proxy loops).
//!
//! # The table
//!
//! IPv4 (most specific first):
//!
//! | range | class |
//! |---|---|
//! | 0.0.0.0/32 | Unspecified |
//! | 0.0.0.0/8 | ThisNetwork (Linux dials these locally) |
//! | 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16 | Private |
//! | 100.64.0.0/10 (incl. 100.100.100.200) | Cgnat |
//! | 127.0.0.0/8 | Loopback |
//! | 169.254.0.0/16 (incl. 169.254.169.254) | LinkLocal |
//! | 192.0.0.0/24 (IETF protocol assignments) | Reserved |
//! | 192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24 | Documentation |
//! | 192.88.99.0/24 (6to4 relay anycast) | Reserved |
//! | 198.18.0.0/15 | Benchmarking |
//! | 224.0.0.0/4 | Multicast |
//! | 255.255.255.255/32 | Broadcast |
//! | 240.0.0.0/4 | Reserved |
//!
//! IPv6:
//!
//! | range | class |
//! |---|---|
//! | ::/128 | Unspecified |
//! | ::1/128 | Loopback |
//! | ::ffff:0:0/96 (IPv4-mapped) | the embedded IPv4's class; public if it is public |
//! | ::/96 (IPv4-compatible, deprecated) | the embedded IPv4's class, else Reserved |
//! | 64:ff9b::/96 (NAT64 well-known) | the embedded IPv4's class, else Nat64 |
//! | 64:ff9b:1::/48 (NAT64 local use) | the class of the last 32 bits as IPv4, else Nat64 |
//! | 2002::/16 (6to4) | the embedded IPv4's class; public if it is public |
//! | 100::/64 (discard) | Reserved |
//! | 2001:2::/48 | Benchmarking |
//! | 2001::/23 (IETF special, incl. Teredo 2001::/32) | Reserved |
//! | 2001:db8::/32, 3fff::/20 | Documentation |
//! | fc00::/7 (incl. fd00:ec2::254) | UniqueLocal |
//! | fe80::/10 | LinkLocal |
//! | fec0::/10 | SiteLocal |
//! | ff00::/8 | Multicast |
//! | anything else outside 2000::/3 (not global unicast) | Reserved |
//!
//! NAT64 of a *public* IPv4 is non-public (Nat64) on purpose: where the NAT64 gateway lives and
//! what it reaches is deployment knowledge. Deployments on a NAT64 network open it with
//! `allow_private_cidrs = ["64:ff9b::/96"]`; a NAT64 form of a *non-public* IPv4 still needs that
//! IPv4 itself to be allowed (see [`AddressPolicy::vet`]).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;

/// Why an address is not public. `Display` gives a short reason for error messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NonPublic {
    Loopback,
    Private,
    LinkLocal,
    Cgnat,
    UniqueLocal,
    Unspecified,
    ThisNetwork,
    Multicast,
    Broadcast,
    Documentation,
    Reserved,
    Benchmarking,
    SiteLocal,
    Nat64,
}

impl fmt::Display for NonPublic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NonPublic::Loopback => "loopback",
            NonPublic::Private => "private",
            NonPublic::LinkLocal => "link-local",
            NonPublic::Cgnat => "carrier-grade NAT (shared)",
            NonPublic::UniqueLocal => "unique local",
            NonPublic::Unspecified => "unspecified",
            NonPublic::ThisNetwork => "\"this network\" (0.0.0.0/8)",
            NonPublic::Multicast => "multicast",
            NonPublic::Broadcast => "broadcast",
            NonPublic::Documentation => "documentation",
            NonPublic::Reserved => "reserved",
            NonPublic::Benchmarking => "benchmarking",
            NonPublic::SiteLocal => "site-local",
            NonPublic::Nat64 => "NAT64",
        })
    }
}

/// Why an address may not be dialled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VetError {
    #[error("refusing to connect to {addr}: {class} address (not in allow_private_cidrs)")]
    NonPublic { addr: SocketAddr, class: NonPublic },
    #[error("refusing to connect to {addr}: that is one of sealgate's own listeners")]
    OwnListener { addr: SocketAddr },
    /// A public address the kernel routes to this host (found by the connector, which can
    /// ask: `proxy::upstream::local_route`).
    #[error(
        "refusing to connect to {addr}: an address of this host (its services are not upstreams)"
    )]
    ThisHost { addr: SocketAddr },
}

const V4_TABLE: &[(Ipv4Addr, u8, NonPublic)] = &[
    (Ipv4Addr::new(0, 0, 0, 0), 32, NonPublic::Unspecified),
    (Ipv4Addr::new(0, 0, 0, 0), 8, NonPublic::ThisNetwork),
    (Ipv4Addr::new(10, 0, 0, 0), 8, NonPublic::Private),
    (Ipv4Addr::new(100, 64, 0, 0), 10, NonPublic::Cgnat),
    (Ipv4Addr::new(127, 0, 0, 0), 8, NonPublic::Loopback),
    (Ipv4Addr::new(169, 254, 0, 0), 16, NonPublic::LinkLocal),
    (Ipv4Addr::new(172, 16, 0, 0), 12, NonPublic::Private),
    (Ipv4Addr::new(192, 0, 0, 0), 24, NonPublic::Reserved),
    (Ipv4Addr::new(192, 0, 2, 0), 24, NonPublic::Documentation),
    (Ipv4Addr::new(192, 88, 99, 0), 24, NonPublic::Reserved),
    (Ipv4Addr::new(192, 168, 0, 0), 16, NonPublic::Private),
    (Ipv4Addr::new(198, 18, 0, 0), 15, NonPublic::Benchmarking),
    (Ipv4Addr::new(198, 51, 100, 0), 24, NonPublic::Documentation),
    (Ipv4Addr::new(203, 0, 113, 0), 24, NonPublic::Documentation),
    (Ipv4Addr::new(224, 0, 0, 0), 4, NonPublic::Multicast),
    (Ipv4Addr::new(255, 255, 255, 255), 32, NonPublic::Broadcast),
    (Ipv4Addr::new(240, 0, 0, 0), 4, NonPublic::Reserved),
];

/// Fixed IPv6 ranges, checked after `::`, `::1` and the IPv4-embedding forms.
const V6_TABLE: &[(Ipv6Addr, u8, NonPublic)] = &[
    (
        Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, 0, 0),
        64,
        NonPublic::Reserved,
    ),
    (
        Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0),
        48,
        NonPublic::Benchmarking,
    ),
    (
        Ipv6Addr::new(0x2001, 0, 0, 0, 0, 0, 0, 0),
        23,
        NonPublic::Reserved,
    ),
    (
        Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0),
        32,
        NonPublic::Documentation,
    ),
    (
        Ipv6Addr::new(0x3fff, 0, 0, 0, 0, 0, 0, 0),
        20,
        NonPublic::Documentation,
    ),
    (
        Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0),
        7,
        NonPublic::UniqueLocal,
    ),
    (
        Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0),
        10,
        NonPublic::LinkLocal,
    ),
    (
        Ipv6Addr::new(0xfec0, 0, 0, 0, 0, 0, 0, 0),
        10,
        NonPublic::SiteLocal,
    ),
    (
        Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0),
        8,
        NonPublic::Multicast,
    ),
];

/// Classifies an address; `None` means public (dialable without an allow rule).
pub fn classify(ip: IpAddr) -> Option<NonPublic> {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(ip: Ipv4Addr) -> Option<NonPublic> {
    let n = u32::from(ip);
    V4_TABLE
        .iter()
        .find(|(net, len, _)| prefix_eq32(n, u32::from(*net), *len))
        .map(|(_, _, class)| *class)
}

fn classify_v6(ip: Ipv6Addr) -> Option<NonPublic> {
    if ip.is_unspecified() {
        return Some(NonPublic::Unspecified);
    }
    if ip.is_loopback() {
        return Some(NonPublic::Loopback);
    }
    if let Some((v4, form)) = embedded_ipv4(ip) {
        return classify_v4(v4).or(form.public_class());
    }
    let n = u128::from(ip);
    let fixed = V6_TABLE
        .iter()
        .find(|(net, len, _)| prefix_eq128(n, u128::from(*net), *len))
        .map(|(_, _, class)| *class);
    let global_unicast = n >> 125 == 0b001;
    fixed.or((!global_unicast).then_some(NonPublic::Reserved))
}

fn prefix_eq32(a: u32, b: u32, len: u8) -> bool {
    let shift = 32 - u32::from(len);
    a.checked_shr(shift).unwrap_or(0) == b.checked_shr(shift).unwrap_or(0)
}

fn prefix_eq128(a: u128, b: u128, len: u8) -> bool {
    let shift = 128 - u32::from(len);
    a.checked_shr(shift).unwrap_or(0) == b.checked_shr(shift).unwrap_or(0)
}

/// The IPv6 forms that carry an IPv4 address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Embedding {
    Mapped,
    Compatible,
    Nat64,
    SixToFour,
}

impl Embedding {
    /// The class of this form when the embedded IPv4 is public.
    fn public_class(self) -> Option<NonPublic> {
        match self {
            Embedding::Mapped | Embedding::SixToFour => None,
            Embedding::Compatible => Some(NonPublic::Reserved),
            Embedding::Nat64 => Some(NonPublic::Nat64),
        }
    }
}

/// The IPv4 address inside a mapped, compatible, NAT64 or 6to4 IPv6 address.
///
/// `::` and `::1` are not treated as compatible forms (they are unspecified and loopback).
/// For 64:ff9b:1::/48 the last 32 bits are taken (the /96 layout operators use in practice).
fn embedded_ipv4(ip: Ipv6Addr) -> Option<(Ipv4Addr, Embedding)> {
    const NAT64_WELL_KNOWN_96: u128 = 0x0064_ff9b_0000_0000_0000_0000;
    const NAT64_LOCAL_48: u128 = 0x0064_ff9b_0001;
    const SIX_TO_FOUR_16: u128 = 0x2002;
    let n = u128::from(ip);
    let low32 = Ipv4Addr::from(n as u32);
    if n >> 112 == SIX_TO_FOUR_16 {
        return Some((Ipv4Addr::from((n >> 80) as u32), Embedding::SixToFour));
    }
    let form = if n >> 32 == 0xffff {
        Embedding::Mapped
    } else if n >> 32 == 0 && n > 1 {
        Embedding::Compatible
    } else if n >> 32 == NAT64_WELL_KNOWN_96 || n >> 80 == NAT64_LOCAL_48 {
        Embedding::Nat64
    } else {
        return None;
    };
    Some((low32, form))
}

/// Decides which resolved addresses may be dialled. Built once from config and the bound
/// listener addresses; `vet` is pure and cheap.
#[derive(Clone, Debug, Default)]
pub struct AddressPolicy {
    allow_private_cidrs: Vec<IpNet>,
    own_listeners: Vec<SocketAddr>,
}

impl AddressPolicy {
    /// `own_listeners` must be the *bound* addresses (`local_addr()`, not a configured port 0).
    /// The host's own public addresses, through which a listener bound to `0.0.0.0`/`::` is
    /// reachable too, cannot be known without I/O: the dialer refuses a connection that
    /// lands on this host instead (`proxy::upstream`, `lands_on_this_host`).
    pub fn new(allow_private_cidrs: Vec<IpNet>, own_listeners: Vec<SocketAddr>) -> Self {
        Self {
            allow_private_cidrs,
            own_listeners,
        }
    }

    /// Ok if `addr` may be dialled.
    ///
    /// Rules, in order:
    /// 1. one of our own listeners → refused, even when an allow CIDR covers it (see
    ///    [`listener_reaches`]: e.g. a listener on `0.0.0.0:3128` refuses port 3128 on every
    ///    non-public address, `127.0.0.1:3128` also refuses `[::ffff:127.0.0.1]:3128`);
    /// 2. public per [`classify`] → ok;
    /// 3. non-public → ok only if `allow_private_cidrs` covers it. For an IPv6 form embedding a
    ///    non-public IPv4 (`[::ffff:10.0.0.1]`, `[64:ff9b::a00:1]`, …) the embedded IPv4 — the
    ///    real destination — must be covered; covering the IPv6 form is not enough.
    ///
    /// # Errors
    /// [`VetError::OwnListener`] or [`VetError::NonPublic`].
    pub fn vet(&self, addr: SocketAddr) -> Result<(), VetError> {
        if self.is_own_listener(addr) {
            return Err(VetError::OwnListener { addr });
        }
        match classify(addr.ip()) {
            None => Ok(()),
            Some(_) if self.allows(addr.ip()) => Ok(()),
            Some(class) => Err(VetError::NonPublic { addr, class }),
        }
    }

    /// Only the own-listener check: used for operator-written `[upstream] resolve` overrides,
    /// which are trusted as written but must never loop back into sealgate itself.
    ///
    /// # Errors
    /// [`VetError::OwnListener`].
    pub fn vet_own_listener(&self, addr: SocketAddr) -> Result<(), VetError> {
        if self.is_own_listener(addr) {
            return Err(VetError::OwnListener { addr });
        }
        Ok(())
    }

    fn allows(&self, ip: IpAddr) -> bool {
        let target = match ip {
            IpAddr::V6(v6) => match embedded_ipv4(v6) {
                Some((v4, _)) if classify_v4(v4).is_some() => IpAddr::V4(v4),
                _ => ip,
            },
            IpAddr::V4(_) => ip,
        };
        self.allow_private_cidrs
            .iter()
            .any(|net| net.contains(&target))
    }

    /// Ports first: most dials share no port with a listener, and that test is a few integer
    /// compares, small enough to inline into [`AddressPolicy::vet`]; the addresses are looked
    /// at only on a shared port. (Written as one function, LLVM stopped inlining it as the
    /// crate grew: `policy/vet/address_policy_vet` read 1.09–1.16× the 2026-11-29 build on
    /// unchanged source; `scripts/bench-paired`.)
    #[inline]
    fn is_own_listener(&self, addr: SocketAddr) -> bool {
        let port = addr.port();
        self.own_listeners.iter().any(|l| l.port() == port) && self.reaches_own_listener(addr)
    }

    /// Kept out of line so that [`AddressPolicy::is_own_listener`] stays small enough to inline.
    #[inline(never)]
    fn reaches_own_listener(&self, addr: SocketAddr) -> bool {
        self.own_listeners
            .iter()
            .any(|l| l.port() == addr.port() && listener_reaches_any_form(l.ip(), addr.ip()))
    }
}

/// [`listener_reaches`] for `target` itself or, for an IPv6 form embedding an IPv4 address,
/// for that address.
fn listener_reaches_any_form(listener: IpAddr, target: IpAddr) -> bool {
    if listener_reaches(listener, target) {
        return true;
    }
    match target {
        IpAddr::V6(v6) => {
            embedded_ipv4(v6).is_some_and(|(v4, _)| listener_reaches(listener, IpAddr::V4(v4)))
        }
        IpAddr::V4(_) => false,
    }
}

/// Could a connection to `target` (same port) land on a socket bound to `listener`?
/// Deliberately generous (refusing too much here costs nothing real):
/// - the same address;
/// - `target` unspecified (`connect(0.0.0.0)` reaches the local host on Linux);
/// - both loopback (any family);
/// - `listener` unspecified (`0.0.0.0`/`::`, either family) and `target` non-public: the host's
///   own interface addresses live in those ranges.
fn listener_reaches(listener: IpAddr, target: IpAddr) -> bool {
    listener == target
        || target.is_unspecified()
        || (listener.is_loopback() && target.is_loopback())
        || (listener.is_unspecified() && classify(target).is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(s: &str) -> Option<NonPublic> {
        classify(s.parse().expect("test ip"))
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("test socket addr")
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().expect("test cidr")).collect()
    }

    /// (first, last, class) for each IPv4 range, plus the public neighbours either side.
    const V4_EDGES: &[(&str, &str, NonPublic)] = &[
        ("0.0.0.1", "0.255.255.255", NonPublic::ThisNetwork),
        ("10.0.0.0", "10.255.255.255", NonPublic::Private),
        ("100.64.0.0", "100.127.255.255", NonPublic::Cgnat),
        ("127.0.0.0", "127.255.255.255", NonPublic::Loopback),
        ("169.254.0.0", "169.254.255.255", NonPublic::LinkLocal),
        ("172.16.0.0", "172.31.255.255", NonPublic::Private),
        ("192.0.0.0", "192.0.0.255", NonPublic::Reserved),
        ("192.0.2.0", "192.0.2.255", NonPublic::Documentation),
        ("192.88.99.0", "192.88.99.255", NonPublic::Reserved),
        ("192.168.0.0", "192.168.255.255", NonPublic::Private),
        ("198.18.0.0", "198.19.255.255", NonPublic::Benchmarking),
        ("198.51.100.0", "198.51.100.255", NonPublic::Documentation),
        ("203.0.113.0", "203.0.113.255", NonPublic::Documentation),
        ("224.0.0.0", "239.255.255.255", NonPublic::Multicast),
        ("240.0.0.0", "255.255.255.254", NonPublic::Reserved),
    ];

    #[test]
    fn v4_range_edges() {
        for (first, last, c) in V4_EDGES {
            assert_eq!(class(first), Some(*c), "{first}");
            assert_eq!(class(last), Some(*c), "{last}");
        }
    }

    #[test]
    fn v4_public_neighbours() {
        for s in [
            "1.0.0.0",
            "1.1.1.1",
            "8.8.8.8",
            "9.255.255.255",
            "11.0.0.0",
            "100.63.255.255",
            "100.128.0.0",
            "126.255.255.255",
            "128.0.0.0",
            "169.253.255.255",
            "169.255.0.0",
            "172.15.255.255",
            "172.32.0.0",
            "192.0.1.0",
            "192.0.3.0",
            "192.88.98.255",
            "192.88.100.0",
            "192.167.255.255",
            "192.169.0.0",
            "198.17.255.255",
            "198.20.0.0",
            "198.51.99.255",
            "198.51.101.0",
            "203.0.112.255",
            "203.0.114.0",
            "223.255.255.255",
        ] {
            assert_eq!(class(s), None, "{s}");
        }
    }

    #[test]
    fn v4_named_addresses() {
        assert_eq!(class("0.0.0.0"), Some(NonPublic::Unspecified));
        assert_eq!(class("255.255.255.255"), Some(NonPublic::Broadcast));
        assert_eq!(
            class("169.254.169.254"),
            Some(NonPublic::LinkLocal),
            "metadata"
        );
        assert_eq!(
            class("100.100.100.200"),
            Some(NonPublic::Cgnat),
            "alibaba metadata"
        );
        assert_eq!(class("127.0.0.1"), Some(NonPublic::Loopback));
    }

    #[test]
    fn v6_fixed_ranges() {
        for (s, c) in [
            ("::", NonPublic::Unspecified),
            ("::1", NonPublic::Loopback),
            ("100::", NonPublic::Reserved),
            ("100::ffff:ffff:ffff:ffff", NonPublic::Reserved),
            ("2001::", NonPublic::Reserved),
            ("2001:0:4136:e378:8000:63bf:3fff:fdd2", NonPublic::Reserved),
            (
                "2001:1ff:ffff:ffff:ffff:ffff:ffff:ffff",
                NonPublic::Reserved,
            ),
            ("2001:2::1", NonPublic::Benchmarking),
            ("2001:3::1", NonPublic::Reserved),
            ("2001:db8::", NonPublic::Documentation),
            (
                "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff",
                NonPublic::Documentation,
            ),
            ("3fff::1", NonPublic::Documentation),
            ("3fff:fff::1", NonPublic::Documentation),
            ("fc00::", NonPublic::UniqueLocal),
            ("fd00:ec2::254", NonPublic::UniqueLocal),
            (
                "fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
                NonPublic::UniqueLocal,
            ),
            ("fe80::", NonPublic::LinkLocal),
            ("fe80::1", NonPublic::LinkLocal),
            (
                "febf:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
                NonPublic::LinkLocal,
            ),
            ("fec0::", NonPublic::SiteLocal),
            (
                "feff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
                NonPublic::SiteLocal,
            ),
            ("ff00::", NonPublic::Multicast),
            ("ff02::1", NonPublic::Multicast),
            (
                "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
                NonPublic::Multicast,
            ),
            (
                "1fff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
                NonPublic::Reserved,
            ),
            ("4000::", NonPublic::Reserved),
            ("5f00::1", NonPublic::Reserved),
            ("fb00::1", NonPublic::Reserved),
            ("0:0:0:1::", NonPublic::Reserved),
        ] {
            assert_eq!(class(s), Some(c), "{s}");
        }
    }

    #[test]
    fn v6_public_neighbours() {
        for s in [
            "2000::",
            "2001:200::",
            "2001:db7:ffff:ffff:ffff:ffff:ffff:ffff",
            "2001:db9::",
            "2001:4860:4860::8888",
            "2606:4700::1111",
            "2003::",
            "3ffe::1",
            "3fff:1000::",
        ] {
            assert_eq!(class(s), None, "{s}");
        }
    }

    #[test]
    fn v6_mapped_takes_the_v4_class() {
        assert_eq!(class("::ffff:127.0.0.1"), Some(NonPublic::Loopback));
        assert_eq!(class("::ffff:169.254.169.254"), Some(NonPublic::LinkLocal));
        assert_eq!(class("::ffff:10.0.0.1"), Some(NonPublic::Private));
        assert_eq!(class("::ffff:0.0.0.0"), Some(NonPublic::Unspecified));
        assert_eq!(class("::ffff:100.100.100.200"), Some(NonPublic::Cgnat));
        assert_eq!(class("::ffff:8.8.8.8"), None);
    }

    #[test]
    fn v6_compatible_takes_the_v4_class_else_reserved() {
        assert_eq!(class("::127.0.0.1"), Some(NonPublic::Loopback));
        assert_eq!(class("::10.0.0.1"), Some(NonPublic::Private));
        assert_eq!(class("::169.254.169.254"), Some(NonPublic::LinkLocal));
        assert_eq!(class("::2"), Some(NonPublic::ThisNetwork));
        assert_eq!(class("::8.8.8.8"), Some(NonPublic::Reserved));
    }

    #[test]
    fn v6_nat64_takes_the_v4_class_else_nat64() {
        assert_eq!(class("64:ff9b::127.0.0.1"), Some(NonPublic::Loopback));
        assert_eq!(
            class("64:ff9b::169.254.169.254"),
            Some(NonPublic::LinkLocal)
        );
        assert_eq!(class("64:ff9b::8.8.8.8"), Some(NonPublic::Nat64));
        assert_eq!(class("64:ff9b:1::10.0.0.1"), Some(NonPublic::Private));
        assert_eq!(class("64:ff9b:1:ffff::8.8.8.8"), Some(NonPublic::Nat64));
        // Just outside the well-known /96: an ordinary non-global address.
        assert_eq!(class("64:ff9b:0:0:0:1::"), Some(NonPublic::Reserved));
    }

    #[test]
    fn v6_6to4_takes_the_v4_class() {
        assert_eq!(class("2002:7f00:1::"), Some(NonPublic::Loopback));
        assert_eq!(class("2002:a9fe:a9fe::1"), Some(NonPublic::LinkLocal));
        assert_eq!(class("2002:c0a8:101::"), Some(NonPublic::Private));
        assert_eq!(class("2002:808:808::1"), None);
    }

    // ---- AddressPolicy ----

    #[test]
    fn default_policy_refuses_non_public_and_allows_public() {
        let p = AddressPolicy::new(vec![], vec![]);
        assert_eq!(p.vet(sa("93.184.216.34:443")), Ok(()));
        assert_eq!(p.vet(sa("[2606:4700::1111]:443")), Ok(()));
        assert_eq!(
            p.vet(sa("169.254.169.254:80")),
            Err(VetError::NonPublic {
                addr: sa("169.254.169.254:80"),
                class: NonPublic::LinkLocal
            })
        );
        for s in [
            "127.0.0.1:443",
            "[::1]:443",
            "[::ffff:127.0.0.1]:443",
            "0.0.0.0:443",
            "[fd00:ec2::254]:80",
        ] {
            assert!(
                matches!(p.vet(sa(s)), Err(VetError::NonPublic { .. })),
                "{s}"
            );
        }
    }

    #[test]
    fn allow_private_cidrs_open_holes() {
        let p = AddressPolicy::new(nets(&["127.0.0.0/8", "::1/128", "10.1.0.0/16"]), vec![]);
        assert_eq!(p.vet(sa("127.0.0.1:8443")), Ok(()));
        assert_eq!(p.vet(sa("127.9.9.9:8443")), Ok(()));
        assert_eq!(p.vet(sa("[::1]:8443")), Ok(()));
        assert_eq!(p.vet(sa("10.1.2.3:443")), Ok(()));
        assert!(p.vet(sa("10.2.0.1:443")).is_err());
        assert!(p.vet(sa("169.254.169.254:80")).is_err());
        // The embedded IPv4 is what counts.
        assert_eq!(p.vet(sa("[::ffff:127.0.0.1]:8443")), Ok(()));
        assert_eq!(p.vet(sa("[64:ff9b::a01:203]:443")), Ok(()));
        assert!(p.vet(sa("[::ffff:10.2.0.1]:443")).is_err());
    }

    #[test]
    fn covering_an_embedding_form_does_not_cover_what_it_embeds() {
        let p = AddressPolicy::new(nets(&["64:ff9b::/96", "::ffff:0:0/96"]), vec![]);
        assert_eq!(
            p.vet(sa("[64:ff9b::8.8.8.8]:443")),
            Ok(()),
            "NAT64 of a public v4"
        );
        assert!(p.vet(sa("[64:ff9b::169.254.169.254]:80")).is_err());
        assert!(p.vet(sa("[::ffff:127.0.0.1]:80")).is_err());
    }

    #[test]
    fn own_listeners_are_refused_even_when_allowed() {
        let p = AddressPolicy::new(
            nets(&["127.0.0.0/8", "::/0"]),
            vec![sa("127.0.0.1:3128"), sa("[::1]:7070")],
        );
        for s in [
            "127.0.0.1:3128",
            "127.0.0.2:3128",
            "[::1]:3128",
            "[::ffff:127.0.0.1]:3128",
            "[::127.0.0.1]:3128",
            "0.0.0.0:3128",
            "[::]:3128",
            "[::1]:7070",
            "127.0.0.1:7070",
            // NAT64 (well-known and local-use prefixes) and 6to4 forms of 127.0.0.1
            "[64:ff9b::127.0.0.1]:3128",
            "[64:ff9b:1::7f00:1]:3128",
            "[2002:7f00:1::]:3128",
        ] {
            assert_eq!(
                p.vet(sa(s)),
                Err(VetError::OwnListener { addr: sa(s) }),
                "{s}"
            );
            assert_eq!(
                p.vet_own_listener(sa(s)),
                Err(VetError::OwnListener { addr: sa(s) }),
                "{s} (vet_own_listener)"
            );
        }
        assert_eq!(p.vet_own_listener(sa("127.0.0.1:3129")), Ok(()));
        assert_eq!(p.vet(sa("127.0.0.1:3129")), Ok(()));
        assert_eq!(p.vet(sa("[::1]:8443")), Ok(()));
    }

    #[test]
    fn unspecified_listener_refuses_its_port_on_every_local_address() {
        let p = AddressPolicy::new(nets(&["0.0.0.0/0", "::/0"]), vec![sa("0.0.0.0:3129")]);
        for s in [
            "127.0.0.1:3129",
            "127.1.2.3:3129",
            "0.0.0.0:3129",
            "10.0.0.5:3129",
            "192.168.1.1:3129",
            "[::1]:3129",
            "[::ffff:10.0.0.5]:3129",
            "[fe80::1]:3129",
        ] {
            assert!(
                matches!(p.vet(sa(s)), Err(VetError::OwnListener { .. })),
                "{s}"
            );
        }
        assert_eq!(p.vet(sa("127.0.0.1:3128")), Ok(()));
        assert_eq!(p.vet(sa("8.8.8.8:3129")), Ok(()));
        let v6 = AddressPolicy::new(vec![], vec![sa("[::]:3129")]);
        assert!(matches!(
            v6.vet(sa("127.0.0.1:3129")),
            Err(VetError::OwnListener { .. })
        ));
    }

    #[test]
    fn specific_listener_address() {
        let p = AddressPolicy::new(nets(&["10.0.0.0/8"]), vec![sa("10.0.0.5:3129")]);
        assert!(matches!(
            p.vet(sa("10.0.0.5:3129")),
            Err(VetError::OwnListener { .. })
        ));
        assert_eq!(p.vet(sa("10.0.0.6:3129")), Ok(()));
    }

    /// A shared port alone is not enough: the address must reach the listener on that port.
    /// Here 10.0.0.6 is a listener's address and 3129 another listener's port.
    #[test]
    fn port_and_address_must_belong_to_the_same_listener() {
        let p = AddressPolicy::new(
            nets(&["10.0.0.0/8"]),
            vec![sa("10.0.0.5:3129"), sa("10.0.0.6:8080")],
        );
        assert_eq!(p.vet(sa("10.0.0.6:3129")), Ok(()));
        assert_eq!(p.vet(sa("[::ffff:10.0.0.6]:3129")), Ok(()));
        assert!(matches!(
            p.vet(sa("[::ffff:10.0.0.6]:8080")),
            Err(VetError::OwnListener { .. })
        ));
    }

    #[test]
    fn messages_are_short_and_name_the_address() {
        let p = AddressPolicy::default();
        let msg = p.vet(sa("100.100.100.200:80")).unwrap_err().to_string();
        assert!(
            msg.contains("100.100.100.200:80") && msg.contains("carrier-grade NAT"),
            "{msg}"
        );
    }
}
