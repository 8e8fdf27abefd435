//! A test-controlled DNS server on loopback (UDP, port 0): the test decides every answer,
//! per name, type and how many times that name and type were asked before — enough to serve
//! private answers, mixed answers and a rebinding name (public first, private later).
//!
//! Written here rather than borrowed: no DNS server package is part of the test environment,
//! and the server only has to answer `A`/`AAAA` questions with the records it is told to.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use tokio::net::UdpSocket;

/// The answers for (`name`, `qtype`, queries of that name and type answered before).
pub type Answers = dyn Fn(&str, u16, usize) -> Vec<IpAddr> + Send + Sync;

/// A running server; stops when dropped.
pub struct DnsServer {
    /// Where it listens (127.0.0.1, UDP).
    pub addr: SocketAddr,
    asked: Arc<Mutex<HashMap<(String, u16), usize>>>,
    task: tokio::task::JoinHandle<()>,
}

impl DnsServer {
    /// Starts a server answering with `answers`.
    pub async fn start(
        answers: impl Fn(&str, u16, usize) -> Vec<IpAddr> + Send + Sync + 'static,
    ) -> DnsServer {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        let asked: Arc<Mutex<HashMap<(String, u16), usize>>> = Arc::default();
        let answers: Arc<Answers> = Arc::new(answers);
        let counts = asked.clone();
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while let Ok((n, peer)) = sock.recv_from(&mut buf).await {
                let Some((name, qtype, qend)) = question(&buf[..n]) else {
                    continue;
                };
                let nth = {
                    let mut c = counts.lock().unwrap();
                    let e = c.entry((name.clone(), qtype)).or_default();
                    *e += 1;
                    *e - 1
                };
                let ips = answers(&name, qtype, nth);
                let _ = sock.send_to(&reply(&buf[..qend], qtype, &ips), peer).await;
            }
        });
        DnsServer { addr, asked, task }
    }

    /// How many `qtype` questions for `name` were answered.
    pub fn asked(&self, name: &str, qtype: u16) -> usize {
        let c = self.asked.lock().unwrap();
        c.get(&(name.to_owned(), qtype)).copied().unwrap_or(0)
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `A`.
pub const A: u16 = 1;
/// `AAAA`.
pub const AAAA: u16 = 28;

/// (lowercased name, qtype, end of the question) of a query.
fn question(msg: &[u8]) -> Option<(String, u16, usize)> {
    let mut pos = 12;
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*msg.get(pos)?);
        pos += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(msg.get(pos..pos + len)?).to_ascii_lowercase());
        pos += len;
    }
    let qtype = u16::from_be_bytes([*msg.get(pos)?, *msg.get(pos + 1)?]);
    Some((labels.join("."), qtype, pos + 4))
}

/// The query (header + question) turned into a reply with one record per address of `qtype`.
fn reply(query: &[u8], qtype: u16, ips: &[IpAddr]) -> Vec<u8> {
    let records: Vec<Vec<u8>> = ips
        .iter()
        .filter_map(|ip| match (ip, qtype) {
            (IpAddr::V4(v4), A) => Some(v4.octets().to_vec()),
            (IpAddr::V6(v6), AAAA) => Some(v6.octets().to_vec()),
            _ => None,
        })
        .collect();
    let mut r = query.to_vec();
    r[2] |= 0x80; // QR
    r[3] = 0x80; // RA, NOERROR
    r[6..8].copy_from_slice(&(records.len() as u16).to_be_bytes());
    r[8..12].fill(0);
    for data in records {
        r.extend_from_slice(&[0xc0, 0x0c]);
        r.extend_from_slice(&qtype.to_be_bytes());
        r.extend_from_slice(&1u16.to_be_bytes());
        r.extend_from_slice(&0u32.to_be_bytes()); // TTL 0: nothing may be cached
        r.extend_from_slice(&(data.len() as u16).to_be_bytes());
        r.extend_from_slice(&data);
    }
    r
}
