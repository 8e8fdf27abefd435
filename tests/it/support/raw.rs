//! Bare TCP and UDP sinks that only count what reaches them, for "this never arrives" tests.
//!
//! Both bind `<ip>:0` and stop (listener and every connection task) when dropped.
#![allow(dead_code)] // shared by many tests; each test binary module uses a different subset

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::{JoinHandle, JoinSet};

/// A TCP listener that accepts, reads and discards everything, counting connections and bytes.
pub struct RawListener {
    /// Where it listens.
    pub addr: SocketAddr,
    counters: Arc<Counters>,
    task: JoinHandle<()>,
}

/// A UDP socket that counts datagrams (and their bytes) and never answers.
pub struct UdpSink {
    /// Where it listens.
    pub addr: SocketAddr,
    counters: Arc<Counters>,
    task: JoinHandle<()>,
}

#[derive(Default)]
struct Counters {
    events: AtomicUsize,
    bytes: AtomicUsize,
}

impl Counters {
    fn load(&self) -> (usize, usize) {
        (
            self.events.load(Ordering::SeqCst),
            self.bytes.load(Ordering::SeqCst),
        )
    }
}

impl RawListener {
    /// Binds `ip:0` and starts accepting.
    ///
    /// # Panics
    /// If `ip` cannot be bound (e.g. an address not configured on this host).
    pub async fn start(ip: IpAddr) -> RawListener {
        let listener = TcpListener::bind((ip, 0))
            .await
            .expect("bind raw TCP listener");
        let addr = listener.local_addr().expect("raw listener address");
        let counters = Arc::new(Counters::default());
        let task = tokio::spawn(accept_loop(listener, counters.clone()));
        RawListener {
            addr,
            counters,
            task,
        }
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.counters.load().0
    }

    /// Bytes received so far over all connections.
    pub fn bytes(&self) -> usize {
        self.counters.load().1
    }
}

impl Drop for RawListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Accepts forever; the `JoinSet` owns the connection tasks, so aborting this task ends them.
async fn accept_loop(listener: TcpListener, counters: Arc<Counters>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                if let Ok((tcp, _)) = accepted {
                    counters.events.fetch_add(1, Ordering::SeqCst);
                    conns.spawn(drain(tcp, counters.clone()));
                }
            }
            Some(_) = conns.join_next() => {}
        }
    }
}

async fn drain(mut tcp: TcpStream, counters: Arc<Counters>) {
    let mut buf = vec![0u8; 16 * 1024];
    while let Ok(n @ 1..) = tcp.read(&mut buf).await {
        counters.bytes.fetch_add(n, Ordering::SeqCst);
    }
}

impl UdpSink {
    /// Binds `ip:0` and starts counting datagrams.
    ///
    /// # Panics
    /// If `ip` cannot be bound.
    pub async fn start(ip: IpAddr) -> UdpSink {
        let socket = UdpSocket::bind((ip, 0)).await.expect("bind UDP sink");
        let addr = socket.local_addr().expect("UDP sink address");
        let counters = Arc::new(Counters::default());
        let task = tokio::spawn(count_datagrams(socket, counters.clone()));
        UdpSink {
            addr,
            counters,
            task,
        }
    }

    /// Datagrams received so far.
    pub fn datagrams(&self) -> usize {
        self.counters.load().0
    }

    /// Payload bytes received so far.
    pub fn bytes(&self) -> usize {
        self.counters.load().1
    }
}

impl Drop for UdpSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn count_datagrams(socket: UdpSocket, counters: Arc<Counters>) {
    let mut buf = vec![0u8; 65_536];
    loop {
        if let Ok(n) = socket.recv(&mut buf).await {
            counters.events.fetch_add(1, Ordering::SeqCst);
            counters.bytes.fetch_add(n, Ordering::SeqCst);
        }
    }
}
