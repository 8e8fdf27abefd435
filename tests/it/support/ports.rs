//! Ports for servers the tests spawn (nginx, Caddy, Node, PostgreSQL, a daemon process).
//!
//! Binding port 0 and letting it go hands out a port from the kernel's ephemeral range, which
//! is also where every other port-0 listener of the suite (in-process daemons, echo origins)
//! and every outgoing connection get their ports: between the probe and the server's own bind,
//! another test could take it. A server that then failed to bind would leave a *different*
//! listener answering on its port (seen once: every Caddy cell of the transparent matrix got
//! 502). So these ports come from below the ephemeral range, handed out by one counter per
//! test process (each port at most once per run), and are checked free before use.
//!
//! The module is declared by `support::pg` (which the library's and the benches' tests include
//! by path too) and re-exported as `support::ports`: one counter per test binary.

use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

/// How many ports below the ephemeral range the counter may use.
const SPAN: u32 = 8000;

/// The first port of the kernel's ephemeral range (32768 if it cannot be read).
fn ephemeral_start() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768)
}

/// A loopback TCP port no other part of this run was given and nothing listens on now.
/// Panics if none is left.
pub fn free_port() -> u16 {
    static RANGE: OnceLock<(u32, u32)> = OnceLock::new();
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let (lo, hi) = *RANGE.get_or_init(|| {
        let hi = ephemeral_start().min(u32::from(u16::MAX));
        (hi.saturating_sub(SPAN).max(1024), hi)
    });
    // Start at a place that depends on the process, so two suites on one host rarely meet.
    let offset = std::process::id() % (hi - lo);
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(n < hi - lo, "no free test port left in {lo}..{hi}");
        let port = lo + (offset + n) % (hi - lo);
        let port = u16::try_from(port).expect("a port below 65536");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}
