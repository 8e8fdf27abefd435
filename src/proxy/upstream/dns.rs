//! A minimal stub resolver for `[upstream] nameservers`: `A` and `AAAA` over UDP, nothing else.
//!
//! Why: with `nameservers` empty, names go to the system resolver (getaddrinfo). Operators who
//! want the proxy's lookups to go to a resolver of their choosing — and the test suite, which
//! must control answers to prove the vetting rules end to end — list nameservers instead.
//! hickory-resolver was not added for this: it brings ~40 crates for two queries, and the wire
//! format is already parsed here (`netns::dns` checks the question the reply echoes).
//!
//! Rules:
//! - one query per type (`A`, `AAAA`, concurrently), a fresh random 16-bit id and a fresh
//!   ephemeral source port each, sent to each nameserver in order until one answers;
//! - a reply counts only if it comes from that nameserver (connected UDP socket), carries the
//!   query's id with QR set, and echoes the question (same name ignoring ASCII case, same type,
//!   class IN); anything else is ignored as a spoof until the deadline;
//! - NOERROR → every `A`/`AAAA` record of the answer section (the server follows CNAME chains);
//!   NXDOMAIN → no addresses; any other rcode → the next nameserver;
//! - a truncated (TC) reply is used as it is, without a TCP retry: every address is vetted
//!   anyway, and an address that was cut off is simply never dialled;
//! - no cache: each new upstream connection resolves afresh and vets what it got; the caller
//!   dials only addresses from that one vetted answer set.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use ring::rand::{SecureRandom, SystemRandom};
use tokio::net::UdpSocket;

use crate::netns::dns::{be16, parse_question, HEADER_LEN};

const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const CLASS_IN: u16 = 1;
const RCODE_NXDOMAIN: u8 = 3;
/// How long one nameserver gets to answer one query.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest reply read (EDNS is not offered, so servers keep to 512 bytes; this is slack).
const MAX_REPLY: usize = 4096;

/// Why a lookup through the configured nameservers failed.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// Sending or receiving failed.
    #[error("nameserver {0}: {1}")]
    Io(SocketAddr, std::io::Error),
    /// No valid reply before the deadline.
    #[error("nameserver {0} did not answer")]
    Timeout(SocketAddr),
    /// The reply was malformed (after id and question matched).
    #[error("nameserver {0} sent a malformed reply")]
    Malformed(SocketAddr),
    /// The server answered with an error code other than NXDOMAIN.
    #[error("nameserver {0} answered rcode {1}")]
    Rcode(SocketAddr, u8),
    /// `nameservers` is empty (the caller should have used the system resolver).
    #[error("no nameservers configured")]
    NoNameservers,
}

/// Every `A` and `AAAA` address of `name` (a normalised host name), paired with `port`.
///
/// # Errors
/// When neither query got a usable reply from any nameserver.
pub async fn lookup(
    servers: &[SocketAddr],
    name: &str,
    port: u16,
) -> Result<Vec<SocketAddr>, DnsError> {
    let (a, aaaa) = tokio::join!(
        query_any(servers, name, TYPE_A),
        query_any(servers, name, TYPE_AAAA)
    );
    let addrs: Vec<SocketAddr> = match (a, aaaa) {
        (Err(e), Err(_)) => return Err(e),
        (a, aaaa) => a
            .unwrap_or_default()
            .into_iter()
            .chain(aaaa.unwrap_or_default())
            .map(|ip| SocketAddr::new(ip, port))
            .collect(),
    };
    Ok(addrs)
}

async fn query_any(
    servers: &[SocketAddr],
    name: &str,
    qtype: u16,
) -> Result<Vec<IpAddr>, DnsError> {
    let mut last = DnsError::NoNameservers;
    for server in servers {
        match exchange(*server, name, qtype).await {
            Ok(addrs) => return Ok(addrs),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// One query to one server; waits for the matching reply until [`QUERY_TIMEOUT`].
async fn exchange(server: SocketAddr, name: &str, qtype: u16) -> Result<Vec<IpAddr>, DnsError> {
    let io = |e| DnsError::Io(server, e);
    let local: SocketAddr = match server {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let sock = UdpSocket::bind(local).await.map_err(io)?;
    sock.connect(server).await.map_err(io)?;
    let id = random_id();
    sock.send(&query(id, name, qtype)).await.map_err(io)?;
    let wait = async {
        let mut buf = vec![0u8; MAX_REPLY];
        loop {
            let n = sock.recv(&mut buf).await.map_err(io)?;
            match parse_reply(&buf[..n], id, name, qtype) {
                Reply::Ignore => continue,
                Reply::Malformed => return Err(DnsError::Malformed(server)),
                Reply::Rcode(rcode) if rcode == RCODE_NXDOMAIN => return Ok(Vec::new()),
                Reply::Rcode(rcode) => return Err(DnsError::Rcode(server, rcode)),
                Reply::Addresses(a) => return Ok(a),
            }
        }
    };
    tokio::time::timeout(QUERY_TIMEOUT, wait)
        .await
        .unwrap_or(Err(DnsError::Timeout(server)))
}

fn random_id() -> u16 {
    let mut b = [0u8; 2];
    SystemRandom::new()
        .fill(&mut b)
        .expect("the OS random number generator failed");
    u16::from_be_bytes(b)
}

/// A standard query (RD set) for `name` / `qtype` / IN with message id `id`.
pub fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut q = Vec::with_capacity(HEADER_LEN + name.len() + 6);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]); // RD; QDCOUNT 1
    for label in name.split('.').filter(|l| !l.is_empty()) {
        // Normalised names have labels of 1..=63 bytes.
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&CLASS_IN.to_be_bytes());
    q
}

/// What a received datagram means for the query (`id`, `name`, `qtype`).
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// Not a reply to this query (wrong id, not a response, another question): keep waiting.
    Ignore,
    /// A reply to this query that cannot be parsed.
    Malformed,
    /// A reply with a non-zero rcode.
    Rcode(u8),
    /// NOERROR: the answer section's addresses of type `qtype`.
    Addresses(Vec<IpAddr>),
}

/// Judges one datagram against the query it should answer.
pub fn parse_reply(msg: &[u8], id: u16, name: &str, qtype: u16) -> Reply {
    if msg.len() < HEADER_LEN || be16(msg, 0) != Some(id) || msg[2] & 0x80 == 0 {
        return Reply::Ignore;
    }
    let Some(q) = parse_question(msg).filter(|_| be16(msg, 4) == Some(1)) else {
        return Reply::Ignore;
    };
    let same_name = q
        .name
        .as_deref()
        .is_some_and(|n| n.trim_end_matches('.').eq_ignore_ascii_case(name));
    if !same_name || q.qtype != qtype || q.qclass != CLASS_IN {
        return Reply::Ignore;
    }
    match msg[3] & 0x0f {
        0 => answers(msg, q.end, qtype).map_or(Reply::Malformed, Reply::Addresses),
        rcode => Reply::Rcode(rcode),
    }
}

/// The `qtype` addresses among the answer records that start at `pos`.
fn answers(msg: &[u8], mut pos: usize, qtype: u16) -> Option<Vec<IpAddr>> {
    let count = be16(msg, 6)?;
    let mut out = Vec::new();
    for _ in 0..count {
        pos = skip_name(msg, pos)?;
        let (rtype, class, len) = (be16(msg, pos)?, be16(msg, pos + 2)?, be16(msg, pos + 8)?);
        let data = msg.get(pos + 10..pos + 10 + usize::from(len))?;
        pos += 10 + usize::from(len);
        if class != CLASS_IN || rtype != qtype {
            continue; // CNAME and friends: the addresses follow as their own records
        }
        out.push(match (rtype, data.len()) {
            (TYPE_A, 4) => IpAddr::from(<[u8; 4]>::try_from(data).ok()?),
            (TYPE_AAAA, 16) => IpAddr::from(<[u8; 16]>::try_from(data).ok()?),
            _ => return None,
        });
    }
    Some(out)
}

/// The offset just past the (possibly compressed) name at `pos`.
fn skip_name(msg: &[u8], mut pos: usize) -> Option<usize> {
    loop {
        let len = *msg.get(pos)?;
        match len {
            0 => return Some(pos + 1),
            l if l & 0xc0 == 0xc0 => return msg.get(pos + 1).map(|_| pos + 2),
            l if l <= 63 => pos += 1 + usize::from(l),
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reply to `q` with `answers` (type, rdata) as records whose name points at the question.
    fn reply(q: &[u8], rcode: u8, answers: &[(u16, &[u8])]) -> Vec<u8> {
        let mut r = q.to_vec();
        r[2] |= 0x80;
        r[3] = 0x80 | rcode;
        r[6..8].copy_from_slice(&(answers.len() as u16).to_be_bytes());
        for (t, data) in answers {
            r.extend_from_slice(&[0xc0, 0x0c]);
            r.extend_from_slice(&t.to_be_bytes());
            r.extend_from_slice(&CLASS_IN.to_be_bytes());
            r.extend_from_slice(&60u32.to_be_bytes());
            r.extend_from_slice(&(data.len() as u16).to_be_bytes());
            r.extend_from_slice(data);
        }
        r
    }

    #[test]
    fn query_layout() {
        let q = query(0x1234, "api.example.test", TYPE_A);
        assert_eq!(&q[..4], &[0x12, 0x34, 0x01, 0x00]);
        let parsed = parse_question(&q).unwrap();
        assert_eq!(parsed.name.as_deref(), Some("api.example.test"));
        assert_eq!(
            (parsed.qtype, parsed.qclass, parsed.end),
            (TYPE_A, CLASS_IN, q.len())
        );
    }

    #[test]
    fn addresses_of_the_asked_type_only() {
        let q = query(7, "a.test", TYPE_A);
        let cname: &[u8] = &[1, b'b', 4, b't', b'e', b's', b't', 0];
        let r = reply(
            &q,
            0,
            &[
                (5, cname),
                (TYPE_A, &[192, 0, 2, 1]),
                (TYPE_A, &[10, 0, 0, 1]),
            ],
        );
        assert_eq!(
            parse_reply(&r, 7, "a.test", TYPE_A),
            Reply::Addresses(vec![[192, 0, 2, 1].into(), [10, 0, 0, 1].into()])
        );
        let q6 = query(8, "a.test", TYPE_AAAA);
        let r6 = reply(&q6, 0, &[(TYPE_AAAA, &[0u8; 16])]);
        assert_eq!(
            parse_reply(&r6, 8, "A.TEST", TYPE_AAAA),
            Reply::Addresses(vec![IpAddr::from([0u8; 16])])
        );
    }

    #[test]
    fn foreign_replies_are_ignored_and_errors_reported() {
        let q = query(7, "a.test", TYPE_A);
        let ok = reply(&q, 0, &[(TYPE_A, &[192, 0, 2, 1])]);
        assert_eq!(
            parse_reply(&ok, 8, "a.test", TYPE_A),
            Reply::Ignore,
            "wrong id"
        );
        assert_eq!(
            parse_reply(&ok, 7, "b.test", TYPE_A),
            Reply::Ignore,
            "wrong name"
        );
        assert_eq!(
            parse_reply(&ok, 7, "a.test", TYPE_AAAA),
            Reply::Ignore,
            "wrong type"
        );
        assert_eq!(
            parse_reply(&q, 7, "a.test", TYPE_A),
            Reply::Ignore,
            "a query, not a reply"
        );
        assert_eq!(
            parse_reply(&reply(&q, 3, &[]), 7, "a.test", TYPE_A),
            Reply::Rcode(3)
        );
        let mut cut = ok.clone();
        cut.truncate(ok.len() - 2);
        assert_eq!(parse_reply(&cut, 7, "a.test", TYPE_A), Reply::Malformed);
        let bad_len = reply(&q, 0, &[(TYPE_A, &[1, 2, 3])]);
        assert_eq!(parse_reply(&bad_len, 7, "a.test", TYPE_A), Reply::Malformed);
    }
}
