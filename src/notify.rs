//! The service manager's readiness protocol (`sd_notify(3)`, systemd `Type=notify`): one
//! datagram of `KEY=VALUE` lines to the socket named by `NOTIFY_SOCKET`.
//!
//! Invariants: without `NOTIFY_SOCKET` nothing is sent; a socket that cannot be reached is
//! logged and never stops the daemon; `READY=1` is sent only once the listeners are bound, the
//! start has returned and the reload and stop handlers are in, so a service manager that
//! waits for it (`systemctl start`, a `reload` queued behind the start) never signals a daemon
//! that could not yet take the signal. Only the daemon's own process sends (sandbox commands
//! start with an empty environment).

use std::os::unix::net::UnixDatagram;

/// `READY=1`: the daemon serves.
pub fn ready() {
    send("READY=1\nSTATUS=serving");
}

/// `STOPPING=1`: the graceful stop has begun.
pub fn stopping() {
    send("STOPPING=1\nSTATUS=stopping: in-flight requests may finish");
}

fn send(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(e) = send_to(&path, state.as_bytes()) {
        tracing::warn!(error = %e, socket = ?path, "cannot notify the service manager");
    }
}

/// Sends one datagram to `path`; a leading `@` names a Linux abstract socket.
fn send_to(path: &std::ffi::OsStr, msg: &[u8]) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    let sock = UnixDatagram::unbound()?;
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
        send_to(path.as_os_str(), b"READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");

        use std::os::linux::net::SocketAddrExt as _;
        let name = format!("sealgate-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let rx = UnixDatagram::bind_addr(&addr).unwrap();
        send_to(std::ffi::OsStr::new(&format!("@{name}")), b"STOPPING=1").unwrap();
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
    }
}
