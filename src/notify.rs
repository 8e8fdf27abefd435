//! The service manager's readiness protocol (`sd_notify(3)`, systemd `Type=notify`): one
//! datagram of `KEY=VALUE` lines to the socket named by `NOTIFY_SOCKET`.
//!
//! Invariants: without `NOTIFY_SOCKET` nothing is sent; a socket that cannot be reached is
//! logged and never stops the daemon; a full queue holds `READY=1` for at most 5 s and
//! `STOPPING=1` not at all; `READY=1` is sent only once the listeners are bound, the
//! start has returned and the reload and stop handlers are in, so a service manager that
//! waits for it (`systemctl start`, a `reload` queued behind the start) never signals a daemon
//! that could not yet take the signal. Only the daemon's own process sends (sandbox commands
//! start with an empty environment).

use std::os::unix::net::UnixDatagram;

/// How long `READY=1` waits for room in a full queue: a service manager busy for a moment
/// still hears it (dropped at once, systemd would have waited for it until its start timeout
/// and then restarted the daemon: re-check h39f), and one that never reads holds the start of
/// serving for no longer than this.
const READY_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// `READY=1`: the daemon serves.
pub fn ready() {
    send("READY=1\nSTATUS=serving", Some(READY_WAIT));
}

/// `STOPPING=1`: the graceful stop has begun. Never waits: nothing may hold the stop (a full
/// queue did: re-check h39d); the datagram is dropped then.
pub fn stopping() {
    send(
        "STOPPING=1\nSTATUS=stopping: in-flight requests may finish",
        None,
    );
}

fn send(state: &str, wait: Option<std::time::Duration>) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(e) = send_to(&path, state.as_bytes(), wait) {
        tracing::warn!(error = %e, socket = ?path, "cannot notify the service manager");
    }
}

/// Sends one datagram to `path`, waiting at most `wait` for room (not at all: `None`); a
/// leading `@` names a Linux abstract socket.
fn send_to(
    path: &std::ffi::OsStr,
    msg: &[u8],
    wait: Option<std::time::Duration>,
) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    let sock = UnixDatagram::unbound()?;
    match wait {
        Some(w) => sock.set_write_timeout(Some(w))?,
        None => sock.set_nonblocking(true)?,
    }
    let bytes = path.as_bytes();
    let sent = match bytes.strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt as _;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(msg, &addr)?
        }
        None => sock.send_to(msg, path)?,
    };
    match sent == msg.len() {
        true => Ok(()),
        false => Err(std::io::Error::other("datagram cut short")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_and_an_abstract_name_each_receive_the_datagram() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let rx = UnixDatagram::bind(&path).unwrap();
        send_to(path.as_os_str(), b"READY=1", None).unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");

        use std::os::linux::net::SocketAddrExt as _;
        let name = format!("sealgate-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let rx = UnixDatagram::bind_addr(&addr).unwrap();
        send_to(
            std::ffi::OsStr::new(&format!("@{name}")),
            b"STOPPING=1",
            None,
        )
        .unwrap();
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
    }

    /// A reader that never reads fills its queue; the next send fails at once instead of
    /// waiting (a blocking send held the daemon's stop: re-check h39d).
    #[test]
    fn a_full_queue_fails_the_send_without_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let _rx = UnixDatagram::bind(&path).unwrap();
        let started = std::time::Instant::now();
        let failed = (0..100_000).find_map(|_| send_to(path.as_os_str(), b"x", None).err());
        assert!(failed.is_some(), "the queue never filled");
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }

    /// A queue full for a moment still takes a send that may wait: room made 300 ms later
    /// lets it through (READY=1 dropped at once left systemd waiting: re-check h39f).
    #[test]
    fn a_send_that_may_wait_gets_through_once_the_reader_makes_room() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let rx = UnixDatagram::bind(&path).unwrap();
        while send_to(path.as_os_str(), b"x", None).is_ok() {}
        let reader = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            let mut buf = [0u8; 64];
            let mut last = Vec::new();
            rx.set_read_timeout(Some(std::time::Duration::from_secs(5)))
                .unwrap();
            while let Ok(n) = rx.recv(&mut buf) {
                last = buf[..n].to_vec();
                if last == b"READY=1" {
                    break;
                }
            }
            last
        });
        let wait = Some(std::time::Duration::from_secs(5));
        send_to(path.as_os_str(), b"READY=1", wait).expect("sent once there was room");
        assert_eq!(reader.join().unwrap(), b"READY=1");
    }
}
