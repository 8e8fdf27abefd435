//! Connection budgets (issue 12): who can starve whom. Silent TCP connections — which cost an
//! attacker nothing — must not keep any sandbox out; one sandbox at its connection cap must not
//! block another; an unidentified connection is closed at `unauthenticated_timeout_secs`.
//!
//! The regression: `max_connections` was one pool taken at accept, so 45 silent connections
//! with `max_connections = 40` made every other sandbox's CONNECT close unanswered.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http::StatusCode;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};

use super::{eventually, API};
use crate::proxy_explicit::{setup_with, Env};
use crate::support::daemon::Opts;
use crate::support::proxy_client::{self as pc, SandboxCreds};

const VALUE: &str = "sk-budget-real-0901";

async fn env(proxy_toml: &str) -> Env {
    let opts = Opts {
        proxy_toml: proxy_toml.into(),
        ..Default::default()
    };
    setup_with(
        Some(&["api.example.test"]),
        &[("KEY", VALUE, None, Some(&["header"]))],
        opts,
    )
    .await
}

/// A TCP connection to `proxy` from `source` that never sends a byte.
async fn silent(proxy: SocketAddr, source: [u8; 4]) -> TcpStream {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind((source, 0).into()).unwrap();
    sock.connect(proxy).await.unwrap()
}

/// A full request through a fresh tunnel of `sb`: CONNECT, TLS, GET with the sealed key.
async fn request(e: &Env, sb: &SandboxCreds) -> StatusCode {
    let mut c = pc::h1(e.h.proxy, sb, API).await;
    let key = sb.token("KEY");
    let a = pc::send1(
        &mut c,
        pc::get("/echo", "api.example.test", &[("x-api-key", &key)]),
    )
    .await;
    a.status
}

fn unauthenticated(e: &Env) -> usize {
    e.h.daemon
        .as_ref()
        .unwrap()
        .proxy
        .admission
        .unauthenticated()
}

#[tokio::test]
async fn silent_connections_from_the_same_source_do_not_starve_a_sandbox() {
    let e = env(
        "max_connections = 40\nmax_unauthenticated_connections = 8\n\
         max_unauthenticated_per_source = 4\nunauthenticated_timeout_secs = 30\n",
    )
    .await;
    // The attacker shares the sandbox's source address (explicit sandboxes on one host do).
    // A burst may go past the source's share until its connections turn idle (silent while
    // served; `proxy::admission::IDLE_AFTER`), never past the unidentified budget.
    let mut attacker = Vec::new();
    for _ in 0..45 {
        attacker.push(silent(e.h.proxy, [127, 0, 0, 1]).await);
    }
    eventually(
        Duration::from_secs(5),
        "the silent connections are accepted",
        || (4..=8).contains(&unauthenticated(&e)),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..3 {
        assert_eq!(request(&e, &e.sb).await, StatusCode::OK);
    }
    assert!(e.echo.received_bytes_contain(VALUE.as_bytes()));
    assert!(
        unauthenticated(&e) <= 4,
        "one source holds at most its share"
    );
}

#[tokio::test]
async fn silent_connections_from_other_sources_do_not_starve_a_sandbox() {
    let e = env(
        "max_connections = 40\nmax_unauthenticated_connections = 8\n\
         max_unauthenticated_per_source = 4\nunauthenticated_timeout_secs = 30\n",
    )
    .await;
    let mut attacker = Vec::new();
    for i in 0..45u8 {
        attacker.push(silent(e.h.proxy, [127, 0, 1, 2 + i % 5]).await);
    }
    eventually(
        Duration::from_secs(5),
        "the silent connections are accepted",
        || unauthenticated(&e) == 8,
    )
    .await;
    let other = SandboxCreds::from_answer(&e.h.sandbox("s").await);
    assert_eq!(request(&e, &other).await, StatusCode::OK);
    assert_eq!(request(&e, &e.sb).await, StatusCode::OK);
}

#[tokio::test]
async fn a_sandbox_at_its_connection_cap_does_not_block_another() {
    let e = env("max_connections = 40\nmax_connections_per_sandbox = 8\n").await;
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..40 {
        match pc::connect(e.h.proxy, Some(&e.sb.proxy_auth()), API).await {
            Ok(s) => held.push(s),
            Err(r) => {
                assert_eq!(r.status, 429, "{r:?}");
                assert!(r.head.contains("too_many_connections"), "{r:?}");
                refused += 1;
            }
        }
    }
    assert_eq!((held.len(), refused), (8, 32));
    let other = SandboxCreds::from_answer(&e.h.sandbox("s").await);
    assert_eq!(request(&e, &other).await, StatusCode::OK);
    drop(held);
    eventually(
        Duration::from_secs(5),
        "the first sandbox's slots are released",
        || {
            e.h.daemon
                .as_ref()
                .unwrap()
                .proxy
                .admission
                .of_sandbox(&e.sb.id)
                == 0
        },
    )
    .await;
    assert_eq!(request(&e, &e.sb).await, StatusCode::OK);
}

#[tokio::test]
async fn an_unidentified_connection_is_closed_at_its_deadline() {
    let e = env("unauthenticated_timeout_secs = 1\nheader_read_timeout_secs = 30\n").await;
    let mut s = silent(e.h.proxy, [127, 0, 0, 1]).await;
    let start = Instant::now();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("closed well before header_read_timeout")
        .unwrap_or(0);
    assert_eq!(n, 0, "closed without an answer");
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "{took:?}"
    );
    // An identified connection is not cut at that deadline.
    let mut c = pc::h1(e.h.proxy, &e.sb, API).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let key = e.sb.token("KEY");
    let a = pc::send1(
        &mut c,
        pc::get("/echo", "api.example.test", &[("x-api-key", &key)]),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
}

/// Requests of `sb` in flight upstream, as the daemon counts them.
fn in_flight(e: &Env, sb: &SandboxCreds) -> usize {
    let d = e.h.daemon.as_ref().unwrap();
    d.sandboxes
        .registry()
        .get(&sb.id)
        .map_or(0, |s| s.requests())
}

/// One sandbox's requests in flight are capped (`max_requests_per_sandbox`; each may hold an
/// upstream connection, a descriptor of the daemon's): past the cap it gets 429
/// `too_many_requests` while another sandbox is served, and the slots come back when the
/// answers end. The regression: 10 tunnels × 100 h2 streams held 997 upstream sockets and
/// every other sandbox's connection timed out at `ulimit -n 1024`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_are_capped_per_sandbox() {
    let e = env("max_requests_per_sandbox = 2\n").await;
    // The third request's tunnel is open before the two slow ones start, and they hold their
    // slots 4 s: only the request itself races their end (a 1.5 s hold, less the two
    // starts' skew and a whole tunnel set-up, was tight on a loaded machine).
    let mut c = pc::h1(e.h.proxy, &e.sb, API).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let (proxy, sb) = (e.h.proxy, e.sb.clone());
        held.push(tokio::spawn(async move {
            let mut c = pc::h1(proxy, &sb, API).await;
            let slow = pc::get("/slow?ms=4000&chunks=2", "api.example.test", &[]);
            pc::send1(&mut c, slow).await.status
        }));
    }
    eventually(Duration::from_secs(10), "two requests in flight", || {
        in_flight(&e, &e.sb) == 2
    })
    .await;
    let a = pc::send1(&mut c, pc::get("/echo", "api.example.test", &[])).await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS, "{}", a.text());
    assert_eq!(a.code().as_deref(), Some("too_many_requests"));
    let other = SandboxCreds::from_answer(&e.h.sandbox("s").await);
    assert_eq!(request(&e, &other).await, StatusCode::OK, "another sandbox");
    for h in held {
        assert_eq!(h.await.unwrap(), StatusCode::OK);
    }
    eventually(Duration::from_secs(10), "slots released", || {
        in_flight(&e, &e.sb) == 0
    })
    .await;
    assert_eq!(
        request(&e, &e.sb).await,
        StatusCode::OK,
        "after the answers"
    );
}

/// A burst of connections from one source, each with its CONNECT and credentials sent at
/// once: the accept loop runs ahead of their tasks, so their requests wait unread. None of
/// them is silent, and none is closed to make room (an outside test had 44 of 300 closed
/// without an answer, across sandboxes, past `max_unauthenticated_per_source`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_credentialed_connections_from_one_source_is_served() {
    use tokio::io::AsyncWriteExt;
    let e =
        env("max_unauthenticated_connections = 512\nmax_unauthenticated_per_source = 4\n").await;
    let connect = format!(
        "CONNECT {API} HTTP/1.1\r\nHost: {API}\r\nProxy-Authorization: {}\r\n\r\n",
        e.sb.proxy_auth()
    );
    let mut streams = Vec::new();
    for _ in 0..200 {
        let mut s = TcpStream::connect(e.h.proxy).await.unwrap();
        s.write_all(connect.as_bytes()).await.unwrap();
        streams.push(s);
    }
    let mut answered = 0;
    for mut s in streams {
        let mut head = [0u8; 12];
        let read = tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut head)).await;
        if matches!(read, Ok(Ok(_))) && head.starts_with(b"HTTP/1.1 200") {
            answered += 1;
        }
    }
    assert_eq!(answered, 200);
    let evicted = e.h.metric("sealgate_connections_evicted_total").await;
    assert_eq!(evicted, 0.0);
}
