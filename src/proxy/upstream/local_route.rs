//! Whether the kernel would deliver a connection to an address to this host itself: one
//! `RTM_GETROUTE` question over rtnetlink, answered with the route's type.
//!
//! Why: address vetting refuses loopback and private ranges, but a host's *public* addresses
//! (a public IPv4 on an interface, a global IPv6, a range routed to `lo` as "AnyIP") pass it,
//! and through them a sandbox would reach every host service listening on all addresses.
//! Those addresses change at run time and cannot be listed once; the routing table says it
//! for each one: a destination of this host has a route of type `RTN_LOCAL`. Asking before
//! dialling means a host service never sees a connection from the proxy, and an open and a
//! closed port of the host answer the same (the check after connecting answered 403 for one
//! and 502 for the other: a port scan).
//!
//! Cost: one socket, one send and one receive (the kernel answers within the send), a few
//! microseconds, paid per new upstream connection to a public address and per admission of
//! a public IP literal — never per request on a pooled connection.

use std::io::Read;
use std::net::IpAddr;

use socket2::{Domain, Protocol, Socket, Type};

/// `nlmsghdr` (16 bytes) + `rtmsg` (12 bytes): where the answer's route type sits.
const RTM_TYPE_OFFSET: usize = 16 + 7;
/// The same header: where an `NLMSG_ERROR` answer's (negative) errno sits.
const ERRNO_OFFSET: usize = 16;

/// `Some(true)` if a connection to `ip` would be routed to this host, `Some(false)` if not
/// (or if there is no route at all), `None` if the kernel could not be asked (the caller then
/// falls back to looking at the connection it made).
pub fn is_local(ip: IpAddr) -> Option<bool> {
    let ip = ip.to_canonical();
    let answer = ask(&request(ip))?;
    read_answer(&answer)
}

/// An `RTM_GETROUTE` request for `ip` (native endian, as rtnetlink expects).
fn request(ip: IpAddr) -> Vec<u8> {
    let (family, addr): (u8, Vec<u8>) = match ip {
        IpAddr::V4(v4) => (libc::AF_INET as u8, v4.octets().to_vec()),
        IpAddr::V6(v6) => (libc::AF_INET6 as u8, v6.octets().to_vec()),
    };
    let attr_len = 4 + addr.len();
    let total = 16 + 12 + attr_len;
    let mut m = Vec::with_capacity(total);
    // nlmsghdr: length, type, flags, sequence number, port id (0: the kernel).
    m.extend_from_slice(&(total as u32).to_ne_bytes());
    m.extend_from_slice(&libc::RTM_GETROUTE.to_ne_bytes());
    m.extend_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    // rtmsg: family, dst_len (a host route), src_len, tos, table, protocol, scope, type; flags.
    m.extend_from_slice(&[family, (addr.len() * 8) as u8, 0, 0, 0, 0, 0, 0]);
    m.extend_from_slice(&0u32.to_ne_bytes());
    // rtattr RTA_DST: length, type, the address.
    m.extend_from_slice(&(attr_len as u16).to_ne_bytes());
    m.extend_from_slice(&libc::RTA_DST.to_ne_bytes());
    m.extend_from_slice(&addr);
    m
}

/// Sends `request` to the kernel and reads its answer. rtnetlink handles a request within the
/// send, so the answer is queued when `send` returns: the socket is non-blocking and an empty
/// queue means no answer (`None`), never a wait.
fn ask(request: &[u8]) -> Option<Vec<u8>> {
    let socket = Socket::new(
        Domain::from(libc::AF_NETLINK),
        Type::RAW,
        Some(Protocol::from(libc::NETLINK_ROUTE)),
    )
    .ok()?;
    socket.set_nonblocking(true).ok()?;
    if socket.send(request).ok()? != request.len() {
        return None;
    }
    let mut answer = vec![0u8; 1024];
    let n = (&socket).read(&mut answer).ok()?;
    answer.truncate(n);
    Some(answer)
}

/// The route type of an `RTM_NEWROUTE` answer; an `NLMSG_ERROR` answer (no route: the host
/// is unreachable, nothing here) is `Some(false)`; anything else is `None`.
fn read_answer(answer: &[u8]) -> Option<bool> {
    let kind = u16::from_ne_bytes(answer.get(4..6)?.try_into().ok()?);
    match kind {
        libc::RTM_NEWROUTE => Some(*answer.get(RTM_TYPE_OFFSET)? == libc::RTN_LOCAL),
        k if k == libc::NLMSG_ERROR as u16 => {
            let errno = i32::from_ne_bytes(
                answer
                    .get(ERRNO_OFFSET..ERRNO_OFFSET + 4)?
                    .try_into()
                    .ok()?,
            );
            (errno != 0).then_some(false)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Loopback and the host's address on its default route are local; an address on another
    /// host is not.
    #[test]
    fn the_kernel_says_which_addresses_are_this_hosts() {
        assert_eq!(is_local("127.0.0.1".parse().unwrap()), Some(true));
        assert_eq!(is_local("127.3.4.5".parse().unwrap()), Some(true));
        assert_eq!(is_local("::1".parse().unwrap()), Some(true));
        assert_eq!(is_local("::ffff:127.0.0.1".parse().unwrap()), Some(true));
        let probe = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        probe.connect("198.51.100.1:9").expect("a default route");
        let own = probe.local_addr().unwrap().ip();
        assert_eq!(is_local(own), Some(true), "{own}");
        assert_eq!(is_local("198.51.100.1".parse().unwrap()), Some(false));
    }

    #[test]
    fn answers_that_say_nothing_are_not_read_as_local() {
        assert_eq!(read_answer(&[]), None);
        assert_eq!(read_answer(&[0; 8]), None);
        let mut error = vec![0u8; 20];
        error[4..6].copy_from_slice(&(libc::NLMSG_ERROR as u16).to_ne_bytes());
        error[16..20].copy_from_slice(&(-libc::ENETUNREACH).to_ne_bytes());
        assert_eq!(read_answer(&error), Some(false));
    }
}
