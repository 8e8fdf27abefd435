//! The namespace's DNS responder: answers `A` queries for names the store's `egress_allowlist`
//! allows (every name when it is `null`) with one placeholder address — the host side of the
//! veth, where every TCP connection is redirected to the transparent listener anyway — and
//! NXDOMAIN for every other name. It never forwards a query, so DNS cannot carry data out of
//! the sandbox. The real addresses are looked up by the proxy, after the policy check.
//!
//! The wire format is parsed by hand (RFC 1035 §4): one question, no compression in it, the
//! question echoed verbatim (keeping any 0x20 case randomisation), no EDNS in the reply. The
//! reply is at most 12 + 259 + 16 bytes, always under the 512-byte UDP limit.
//!
//! Answers, per question:
//!
//! | name | `A` / `ANY` | other types (`AAAA`, `HTTPS`, `MX`…) |
//! |---|---|---|
//! | allowed | one `A` record, the placeholder, TTL [`TTL_SECS`] | NOERROR, no records |
//! | not allowed, or not a valid host name | NXDOMAIN | NXDOMAIN |
//!
//! At most `[sandbox] max_dns_queries_per_sec` queries a second are answered ([`Pace`]).
//!
//! Not a query (`QR` set) or shorter than a header → no reply at all (no reflection loops);
//! other opcodes → NOTIMP; not exactly one question or a malformed one → FORMERR; a class
//! other than `IN`/`ANY` → REFUSED.

use std::io;
use std::net::Ipv4Addr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::policy::{self, parse_pattern, Dest, Host, HostError, HostMatcher, Scheme};

/// TTL of the placeholder records.
pub const TTL_SECS: u32 = 30;
const TYPE_A: u16 = 1;
const TYPE_ANY: u16 = 255;
const CLASS_IN: u16 = 1;
const CLASS_ANY: u16 = 255;
/// Length of a DNS message header.
pub(crate) const HEADER_LEN: usize = 12;
/// Longest name on the wire, length bytes included (RFC 1035 §3.1).
const MAX_WIRE_NAME: usize = 255;
const RCODE_FORMERR: u8 = 1;
const RCODE_NXDOMAIN: u8 = 3;
const RCODE_NOTIMP: u8 = 4;
const RCODE_REFUSED: u8 = 5;
/// Concurrent TCP clients.
const MAX_TCP_CLIENTS: usize = 32;
/// A TCP client that sends nothing for this long is dropped.
const TCP_IDLE: Duration = Duration::from_secs(5);

/// The answer to one question.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// One `A` record.
    Address(Ipv4Addr),
    /// The name exists but has no record of this type.
    NoData,
    /// The name does not exist (for this sandbox).
    NxDomain,
}

/// Which names resolve, and to what.
#[derive(Clone, Debug)]
pub struct NameFilter {
    /// Port-less copy of the allowlist (None = every name).
    names: Option<HostMatcher>,
    placeholder: Ipv4Addr,
}

impl NameFilter {
    /// A filter for a store's `egress_allowlist` (`None` = every name). Ports in patterns are
    /// ignored — DNS has no ports; the proxy checks them — and IP-literal patterns match no name.
    ///
    /// # Errors
    /// An invalid pattern.
    pub fn new(allowlist: Option<&[String]>, placeholder: Ipv4Addr) -> Result<Self, HostError> {
        let names = match allowlist {
            None => None,
            Some(list) => {
                let portless = list
                    .iter()
                    .map(|p| strip_port(p))
                    .collect::<Result<Vec<_>, _>>()?;
                Some(HostMatcher::compile(&portless)?)
            }
        };
        Ok(NameFilter { names, placeholder })
    }

    /// The decision for `name` (presentation form, any case) and `qtype`.
    pub fn decide(&self, name: &str, qtype: u16) -> Decision {
        let Ok(Host::Name(n)) = policy::normalise_host(name) else {
            return Decision::NxDomain;
        };
        let dest = Dest {
            host: Host::Name(n),
            port: 443,
        };
        if !self
            .names
            .as_ref()
            .is_none_or(|m| m.matches(&dest, Scheme::Https))
        {
            return Decision::NxDomain;
        }
        match qtype {
            TYPE_A | TYPE_ANY => Decision::Address(self.placeholder),
            _ => Decision::NoData,
        }
    }
}

fn strip_port(pattern: &str) -> Result<String, HostError> {
    let p = parse_pattern(pattern)?;
    let mut text = p.to_string();
    if let Some(port) = p.port() {
        text.truncate(text.len() - port.to_string().len() - 1);
    }
    Ok(text)
}

/// One parsed question (also used by the proxy's stub resolver to check a reply's question).
pub(crate) struct Question {
    /// Labels joined by `.`; None if a label holds a byte that cannot be in a host name.
    pub(crate) name: Option<String>,
    pub(crate) qtype: u16,
    pub(crate) qclass: u16,
    /// Offset just past the question.
    pub(crate) end: usize,
}

/// The big-endian u16 at `at`, if the message is long enough.
pub(crate) fn be16(msg: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*msg.get(at)?, *msg.get(at + 1)?]))
}

/// Parses the question at offset 12; None when malformed.
pub(crate) fn parse_question(msg: &[u8]) -> Option<Question> {
    let mut pos = HEADER_LEN;
    let mut labels: Vec<&[u8]> = Vec::new();
    loop {
        let len = usize::from(*msg.get(pos)?);
        if len == 0 {
            pos += 1;
            break;
        }
        if len > 63 || pos + 1 + len - HEADER_LEN >= MAX_WIRE_NAME {
            return None; // compression pointers (0xC0) and over-long names alike
        }
        labels.push(msg.get(pos + 1..pos + 1 + len)?);
        pos += 1 + len;
    }
    let printable = labels
        .iter()
        .all(|l| l.iter().all(|b| b.is_ascii_graphic() && *b != b'.'));
    let name = printable.then(|| {
        labels
            .iter()
            .map(|l| String::from_utf8_lossy(l))
            .collect::<Vec<_>>()
            .join(".")
    });
    Some(Question {
        name,
        qtype: be16(msg, pos)?,
        qclass: be16(msg, pos + 2)?,
        end: pos + 4,
    })
}

/// The reply to one DNS message, or None when it must not be answered.
pub fn respond(msg: &[u8], filter: &NameFilter) -> Option<Vec<u8>> {
    if msg.len() < HEADER_LEN || msg[2] & 0x80 != 0 {
        return None;
    }
    let opcode = (msg[2] >> 3) & 0x0f;
    if opcode != 0 {
        return Some(header(msg, RCODE_NOTIMP, 0, 0));
    }
    let q = match (be16(msg, 4), parse_question(msg)) {
        (Some(1), Some(q)) => q,
        _ => return Some(header(msg, RCODE_FORMERR, 0, 0)),
    };
    let question = &msg[HEADER_LEN..q.end];
    if q.qclass != CLASS_IN && q.qclass != CLASS_ANY {
        return Some(with_question(msg, RCODE_REFUSED, question, None));
    }
    let decision = match &q.name {
        Some(n) => filter.decide(n, q.qtype),
        None => Decision::NxDomain,
    };
    Some(match decision {
        Decision::Address(ip) => with_question(msg, 0, question, Some(ip)),
        Decision::NoData => with_question(msg, 0, question, None),
        Decision::NxDomain => with_question(msg, RCODE_NXDOMAIN, question, None),
    })
}

/// A reply header: the query's id, QR + its opcode + AA + its RD, RA clear, `rcode`.
fn header(query: &[u8], rcode: u8, qdcount: u16, ancount: u16) -> Vec<u8> {
    let flags_hi = 0x80 | (query[2] & 0x78) | 0x04 | (query[2] & 0x01);
    let mut h = vec![query[0], query[1], flags_hi, rcode & 0x0f];
    for count in [qdcount, ancount, 0, 0] {
        h.extend_from_slice(&count.to_be_bytes());
    }
    h
}

fn with_question(query: &[u8], rcode: u8, question: &[u8], a: Option<Ipv4Addr>) -> Vec<u8> {
    let mut out = header(query, rcode, 1, u16::from(a.is_some()));
    out.extend_from_slice(question);
    if let Some(ip) = a {
        out.extend_from_slice(&[0xc0, 0x0c]); // name: pointer to the question's name
        out.extend_from_slice(&TYPE_A.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&TTL_SECS.to_be_bytes());
        out.extend_from_slice(&4u16.to_be_bytes());
        out.extend_from_slice(&ip.octets());
    }
    out
}

/// The filter in force; replaced when the store's allowlist changes.
pub type SharedFilter = Arc<RwLock<Arc<NameFilter>>>;

fn current(filter: &SharedFilter) -> Arc<NameFilter> {
    filter.read().unwrap_or_else(|e| e.into_inner()).clone()
}

/// A running responder (UDP and TCP on the same port); stops when dropped.
pub struct Responder {
    /// The port, on the address given to [`Responder::start`].
    pub port: u16,
    _tasks: JoinSet<()>,
}

impl Responder {
    /// Binds UDP and TCP on `ip` (same ephemeral port) and starts answering, at most
    /// `per_sec` queries a second (None = no bound; [`Pace`]).
    ///
    /// # Errors
    /// No port could be bound for both protocols.
    pub async fn start(
        ip: Ipv4Addr,
        filter: SharedFilter,
        per_sec: Option<u32>,
    ) -> io::Result<Responder> {
        let (udp, tcp) = bind_pair(ip).await?;
        let port = udp.local_addr()?.port();
        let pace = Arc::new(Pace::new(per_sec));
        let mut tasks = JoinSet::new();
        tasks.spawn(serve_udp(udp, filter.clone(), pace.clone()));
        tasks.spawn(serve_tcp(tcp, filter, pace));
        Ok(Responder {
            port,
            _tasks: tasks,
        })
    }
}

async fn bind_pair(ip: Ipv4Addr) -> io::Result<(UdpSocket, TcpListener)> {
    let mut last = io::Error::other("no attempt");
    for _ in 0..16 {
        let udp = UdpSocket::bind((ip, 0)).await?;
        let port = udp.local_addr()?.port();
        match TcpListener::bind((ip, port)).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// The responder's query budget: a token bucket of `per_sec` tokens a second holding at most
/// [`crate::limits::Flows::burst`]. A query past it waits for its token, so a sandbox that
/// floods (one UDP socket sends any number of queries in one flow, past the iptables bound on
/// new flows) holds its responder to `per_sec` answers a second: its own lookups slow down,
/// the daemon's CPU does not follow, and what the socket buffer cannot hold meanwhile the
/// kernel drops. Invariant: over any span of `t` seconds at most `burst + per_sec × t`
/// queries are answered.
pub struct Pace {
    rate: Option<(f64, f64)>,
    bucket: std::sync::Mutex<(f64, tokio::time::Instant)>,
}

impl Pace {
    /// A budget of `per_sec` queries a second; None = no bound.
    pub fn new(per_sec: Option<u32>) -> Pace {
        let rate = per_sec.map(|r| (f64::from(r), f64::from(crate::limits::Flows::burst(r))));
        let full = rate.map_or(0.0, |(_, burst)| burst);
        Pace {
            rate,
            bucket: std::sync::Mutex::new((full, tokio::time::Instant::now())),
        }
    }

    /// Takes one query's token, waiting for it when the bucket is empty.
    pub async fn take(&self) {
        if let Some(wait) = self.reserve() {
            tokio::time::sleep(wait).await;
        }
    }

    /// Takes a token now (it may go into debt) and says how long to wait until it is covered.
    fn reserve(&self) -> Option<Duration> {
        let (per_sec, burst) = self.rate?;
        let mut b = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        let now = tokio::time::Instant::now();
        let tokens = (b.0 + (now - b.1).as_secs_f64() * per_sec).min(burst) - 1.0;
        *b = (tokens, now);
        (tokens < 0.0).then(|| Duration::from_secs_f64(-tokens / per_sec))
    }
}

async fn serve_udp(sock: UdpSocket, filter: SharedFilter, pace: Arc<Pace>) {
    let mut buf = vec![0u8; 4096];
    loop {
        let Ok((n, from)) = sock.recv_from(&mut buf).await else {
            continue;
        };
        pace.take().await;
        if let Some(reply) = respond(&buf[..n], &current(&filter)) {
            let _ = sock.send_to(&reply, from).await;
        }
    }
}

async fn serve_tcp(listener: TcpListener, filter: SharedFilter, pace: Arc<Pace>) {
    let slots = Arc::new(Semaphore::new(MAX_TCP_CLIENTS));
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((tcp, _)) = accepted else { continue };
                let Ok(slot) = slots.clone().try_acquire_owned() else { continue };
                let (f, pace) = (filter.clone(), pace.clone());
                conns.spawn(async move {
                    let _ = tcp_client(tcp, f, &pace).await;
                    drop(slot);
                });
            }
            Some(_) = conns.join_next() => {}
        }
    }
}

/// RFC 1035 §4.2.2 framing: a 2-byte length before each message.
async fn tcp_client(mut tcp: TcpStream, filter: SharedFilter, pace: &Pace) -> io::Result<()> {
    loop {
        let len = match tokio::time::timeout(TCP_IDLE, tcp.read_u16()).await {
            Ok(r) => usize::from(r?),
            Err(_) => return Ok(()),
        };
        let mut msg = vec![0u8; len];
        tokio::time::timeout(TCP_IDLE, tcp.read_exact(&mut msg))
            .await
            .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
        pace.take().await;
        let Some(reply) = respond(&msg, &current(&filter)) else {
            return Ok(());
        };
        let mut framed = (reply.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&reply);
        tcp.write_all(&framed).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const PLACEHOLDER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

    fn filter(list: Option<&[&str]>) -> NameFilter {
        let owned: Option<Vec<String>> = list.map(|l| l.iter().map(|s| s.to_string()).collect());
        NameFilter::new(owned.as_deref(), PLACEHOLDER).unwrap()
    }

    /// A query the way resolvers send it: id 0xbeef, RD, one question, optional EDNS OPT.
    fn query(name: &str, qtype: u16, edns: bool) -> Vec<u8> {
        let mut q = vec![0xbe, 0xef, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, u8::from(edns)];
        for label in name.split('.').filter(|l| !l.is_empty()) {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.push(0);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&CLASS_IN.to_be_bytes());
        if edns {
            q.extend_from_slice(&[0, 0, 41, 0x10, 0, 0, 0, 0, 0, 0, 0]);
        }
        q
    }

    fn rcode(reply: &[u8]) -> u8 {
        reply[3] & 0x0f
    }

    fn ancount(reply: &[u8]) -> u16 {
        be16(reply, 6).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn the_pace_answers_a_burst_then_its_rate() {
        let pace = Pace::new(Some(10)); // burst 50
        let start = tokio::time::Instant::now();
        for _ in 0..50 {
            pace.take().await;
        }
        assert_eq!(
            start.elapsed(),
            Duration::ZERO,
            "the burst waits for nothing"
        );
        for _ in 0..20 {
            pace.take().await;
        }
        let waited = start.elapsed().as_secs_f64();
        assert!(
            (1.99..2.01).contains(&waited),
            "20 past the burst at 10/s: {waited}"
        );
        tokio::time::sleep(Duration::from_secs(60)).await;
        let again = tokio::time::Instant::now();
        for _ in 0..50 {
            pace.take().await;
        }
        assert_eq!(
            again.elapsed(),
            Duration::ZERO,
            "refilled to the burst, not past it"
        );
        pace.take().await;
        assert_eq!(again.elapsed(), Duration::from_millis(100));
        let open = Pace::new(None);
        for _ in 0..100_000 {
            open.take().await;
        }
        assert_eq!(again.elapsed(), Duration::from_millis(100), "no bound");
    }

    #[test]
    fn allowed_name_gets_the_placeholder() {
        let f = filter(Some(&["api.example.test", "*.corp.test:8443"]));
        let q = query("API.Example.test", TYPE_A, true);
        let r = respond(&q, &f).unwrap();
        assert_eq!(&r[..2], &[0xbe, 0xef]);
        assert_eq!(r[2] & 0x80, 0x80, "QR set");
        assert_eq!(r[2] & 0x01, 0x01, "RD echoed");
        assert_eq!((rcode(&r), ancount(&r)), (0, 1));
        assert_eq!(&r[r.len() - 4..], &PLACEHOLDER.octets());
        let qlen = q.len() - 11 - HEADER_LEN; // question without the OPT record
        assert_eq!(
            &r[HEADER_LEN..HEADER_LEN + qlen],
            &q[HEADER_LEN..HEADER_LEN + qlen]
        );
        let r2 = respond(&query("x.corp.test", TYPE_A, false), &f).unwrap();
        assert_eq!(ancount(&r2), 1, "a pattern's port does not matter to DNS");
    }

    #[test]
    fn other_names_get_nxdomain_and_other_types_nodata() {
        let f = filter(Some(&["api.example.test"]));
        let r = respond(&query("evil.test", TYPE_A, false), &f).unwrap();
        assert_eq!((rcode(&r), ancount(&r)), (RCODE_NXDOMAIN, 0));
        let r = respond(&query("api.example.test", 28, false), &f).unwrap();
        assert_eq!((rcode(&r), ancount(&r)), (0, 0));
        let r = respond(&query("1.2.3.4", TYPE_A, false), &f).unwrap();
        assert_eq!(rcode(&r), RCODE_NXDOMAIN);
        let r = respond(&query("_x._tcp.api.example.test", TYPE_A, false), &f).unwrap();
        assert_eq!(rcode(&r), RCODE_NXDOMAIN);
    }

    #[test]
    fn null_allowlist_resolves_every_name_and_empty_none() {
        let r = respond(&query("anything.test", TYPE_A, false), &filter(None)).unwrap();
        assert_eq!(ancount(&r), 1);
        let r = respond(&query("anything.test", TYPE_A, false), &filter(Some(&[]))).unwrap();
        assert_eq!(rcode(&r), RCODE_NXDOMAIN);
    }

    #[test]
    fn malformed_and_unusual_messages() {
        let f = filter(None);
        assert!(respond(&[0u8; 11], &f).is_none());
        let mut resp = query("a.test", TYPE_A, false);
        resp[2] |= 0x80;
        assert!(respond(&resp, &f).is_none(), "responses are never answered");
        let mut notify = query("a.test", TYPE_A, false);
        notify[2] |= 4 << 3;
        assert_eq!(rcode(&respond(&notify, &f).unwrap()), RCODE_NOTIMP);
        let mut two = query("a.test", TYPE_A, false);
        two[5] = 2;
        assert_eq!(rcode(&respond(&two, &f).unwrap()), RCODE_FORMERR);
        let mut ptr = query("a.test", TYPE_A, false);
        ptr[HEADER_LEN] = 0xc0;
        assert_eq!(rcode(&respond(&ptr, &f).unwrap()), RCODE_FORMERR);
        let truncated = &query("a.test", TYPE_A, false)[..HEADER_LEN + 3];
        assert_eq!(rcode(&respond(truncated, &f).unwrap()), RCODE_FORMERR);
        let mut chaos = query("version.bind", 16, false);
        let n = chaos.len();
        chaos[n - 1] = 3;
        assert_eq!(rcode(&respond(&chaos, &f).unwrap()), RCODE_REFUSED);
    }

    #[test]
    fn over_long_names_are_formerr() {
        let label = "a".repeat(63);
        let name = [label.as_str(); 5].join(".");
        let r = respond(&query(&name, TYPE_A, false), &filter(None)).unwrap();
        assert_eq!(rcode(&r), RCODE_FORMERR);
    }

    proptest! {
        #[test]
        fn never_panics_and_replies_fit_udp(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Some(r) = respond(&bytes, &filter(None)) {
                prop_assert!(r.len() <= 512);
                prop_assert_eq!(&r[..2], &bytes[..2]);
            }
        }

        /// Random names alone almost never hit the allowlist, so most cases are built to: the
        /// exact entry, names under the wildcard, and near misses (the wildcard's apex, a
        /// subdomain of the exact entry).
        #[test]
        fn answers_mirror_the_naive_decision(name in prop_oneof![
            "[a-z]{1,8}(\\.[a-z]{1,8}){0,3}",
            Just("a.test".to_owned()),
            "[a-z]{1,8}(\\.[a-z]{1,8}){0,2}\\.b\\.test",
            Just("b.test".to_owned()),
            "[a-z]{1,8}\\.a\\.test",
        ]) {
            let f = filter(Some(&["*.b.test", "a.test"]));
            let r = respond(&query(&name, TYPE_A, false), &f).unwrap();
            let naive = name == "a.test" || name.ends_with(".b.test");
            prop_assert_eq!(ancount(&r) == 1, naive);
        }
    }
}
