//! The transparent listener (iptables REDIRECT target): original destination from
//! `SO_ORIGINAL_DST`, sandbox from the source IP, host from the TLS SNI (or, on port 80, from
//! the plain-HTTP `Host` header).
//!
//! Identification is the only part that differs from the explicit listener; after it, a
//! [`Tunnel`] goes through the same [`intercept`] → [`forward`](super::forward) path.
//!
//! Decisions, in order (each refusal closes the connection, or on plain HTTP answers with the
//! uniform error response, and is recorded once through [`outcome::refuse`] with
//! `mode = "transparent"`):
//! 1. the source IP must belong to a live sandbox (else: close, nothing read; recorded as
//!    `proxy_auth_required`, the identity failure); the connection then counts against that
//!    sandbox's `max_connections_per_sandbox` (over it: close, `too_many_connections`) and
//!    leaves the unauthenticated budget at once ([`super::admission`]);
//! 2. the connection must have been redirected: an original destination equal to the
//!    listener's own address means someone dialled the listener directly (else: close,
//!    `bad_request`);
//! 3. port 80, or any port whose first byte is an ASCII capital (an HTTP method) → plain HTTP
//!    routed by `Host` (never unsealed, see [`plain`]); anything else → TLS routed by SNI (an
//!    SNI that is not a host name: close, `bad_request`). Without SNI the destination is the
//!    original IP literal, so an SNI-less connection is refused unless that literal is
//!    allowlisted;
//! 4. the admission step ([`admit`]: egress policy, address precheck, tunnel cap) runs
//!    **before** any leaf is minted, so a denied SNI never obtains a certificate.

mod plain;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

#[cfg(any(target_os = "linux", target_os = "android"))]
use socket2::SockRef;
use tokio::net::TcpStream;

use super::admit::admit;
use super::intercept::{self, InterceptError};
use super::outcome::{self, Attempt};
use super::read_ahead::ReadAhead;
use super::refusal::{Code, Refusal};
use super::{ListenerKind, LiveSettings, ProxyState};
use crate::policy::{Dest, Host, Scheme};
use crate::sandbox::Sandbox;

/// Why a transparent connection ended before (or while) being served.
#[derive(Debug, thiserror::Error)]
pub enum TransparentError {
    /// The ClientHello could not be read or the TLS handshake failed (sandbox side).
    #[error(transparent)]
    Intercept(#[from] InterceptError),
    /// The policy refused the destination (already audited).
    #[error("refused: {0}")]
    Refused(String),
    /// Reading the plain-HTTP request head failed (sandbox side).
    #[error("plain HTTP request head: {0}")]
    Head(String),
}

/// Serves one redirected connection.
pub async fn serve_client(state: Arc<ProxyState>, tcp: TcpStream, peer: SocketAddr) {
    let live = state.settings();
    let mut at = Attempt::connection(ListenerKind::Transparent, "TCP");
    let (sandbox, orig) = match identify(&state, &live, &mut at, &tcp, peer) {
        Ok(x) => x,
        Err(r) => return outcome::refuse(&state, &at, &r),
    };
    let deadline = tokio::time::Instant::now() + live.proxy.tls_handshake_timeout;
    let (id, metrics) = (sandbox.id.clone(), state.metrics.clone());
    let first = match orig.port() {
        80 => First::Method,
        _ => first_byte(&tcp, deadline).await,
    };
    let result = match first {
        // Boxed: inline, the plain path would size every transparent connection's task.
        First::Method => Box::pin(plain::serve(state, live, sandbox, tcp, orig)).await,
        First::Other => serve_tls(state, live, sandbox, tcp, orig, deadline).await,
        // A port check, a preconnect, a Happy Eyeballs loser: not a failed handshake.
        First::Closed => {
            return tracing::debug!(%peer, %orig, sandbox = &*id, "closed before its first byte")
        }
    };
    match result {
        Err(TransparentError::Intercept(e)) => e.record(&metrics, &id),
        Err(e) => {
            tracing::debug!(%peer, %orig, sandbox = &*id, error = %e, "transparent connection ended")
        }
        Ok(()) => {}
    }
}

/// What a redirected connection opens with.
enum First {
    /// An ASCII capital: an HTTP method, where a TLS record starts with 0x16.
    Method,
    /// Anything else, or nothing by the deadline: the TLS path, which ends a silent
    /// connection at the same deadline.
    Other,
    /// The connection closed without a byte.
    Closed,
}

/// Peeks at the connection's first byte. Plain HTTP to a port other than 80 is read as plain
/// HTTP, as the explicit listener reads `GET http://host:8080/` (before, it met a TLS alert
/// the client called "HTTP/0.9", and no audit line).
async fn first_byte(tcp: &TcpStream, deadline: tokio::time::Instant) -> First {
    let mut first = [0u8; 1];
    match tokio::time::timeout_at(deadline, tcp.peek(&mut first)).await {
        Ok(Ok(1)) if first[0].is_ascii_uppercase() => First::Method,
        Ok(Ok(0)) => First::Closed,
        _ => First::Other,
    }
}

/// Steps 1 and 2: the sandbox behind `peer`, counted against its budget, and the original
/// destination.
fn identify(
    state: &ProxyState,
    live: &LiveSettings,
    at: &mut Attempt<'_>,
    tcp: &TcpStream,
    peer: SocketAddr,
) -> Result<(Arc<Sandbox>, SocketAddr), Refusal> {
    let ip = peer.ip().to_canonical();
    let Some(sandbox) = state.registry.by_source_ip(ip) else {
        let msg = format!("no live sandbox has source IP {ip}; connection closed");
        return Err(Refusal::new(Code::ProxyAuthRequired, msg));
    };
    at.sandbox = Some(sandbox.clone());
    if let Some(slot) = super::connection_slot() {
        let max = live.proxy.max_connections_per_sandbox;
        slot.authenticate(&sandbox.id, max)
            .map_err(|e| Refusal::new(Code::TooManyConnections, e.to_string()))?;
    }
    let not_redirected = |why: String| {
        let msg = format!("not a redirected connection ({why}); closed");
        Refusal::new(Code::BadRequest, msg)
    };
    let local = tcp
        .local_addr()
        .map_err(|e| not_redirected(e.to_string()))?;
    match original_dst(tcp) {
        Ok(orig) if !same_addr(orig, local) => Ok((sandbox, orig)),
        Ok(_) => Err(not_redirected("addressed to the listener itself".into())),
        Err(e) => Err(not_redirected(e.to_string())),
    }
}

fn same_addr(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && a.ip().to_canonical() == b.ip().to_canonical()
}

/// The destination a redirected connection was addressed to before REDIRECT rewrote it
/// (`SO_ORIGINAL_DST`, or `IP6T_SO_ORIGINAL_DST` for IPv6), IPv4-mapped forms canonicalised.
///
/// Only NAT rules of this socket's own network namespace are visible to the kernel lookup
/// (DESIGN §7): the REDIRECT must sit on the host side of the sandbox's veth.
///
/// # Errors
/// `ENOENT` (or similar) when the connection has no conntrack entry, i.e. was not redirected.
#[cfg(any(target_os = "linux", target_os = "android"))]
pub fn original_dst(tcp: &TcpStream) -> io::Result<SocketAddr> {
    let sock = SockRef::from(tcp);
    let local = tcp.local_addr()?;
    let v4 = match local {
        SocketAddr::V4(_) => true,
        SocketAddr::V6(a) => a.ip().to_ipv4_mapped().is_some(),
    };
    let raw = if v4 {
        sock.original_dst_v4()?
    } else {
        sock.original_dst_v6()?
    };
    let addr = raw
        .as_socket()
        .ok_or_else(|| io::Error::other("original destination is not an IP address"))?;
    Ok(SocketAddr::new(addr.ip().to_canonical(), addr.port()))
}

/// Transparent mode needs netfilter's `SO_ORIGINAL_DST`: Linux only.
///
/// # Errors
/// Always [`io::ErrorKind::Unsupported`].
#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub fn original_dst(_tcp: &TcpStream) -> io::Result<SocketAddr> {
    Err(io::ErrorKind::Unsupported.into())
}

/// TLS routed by SNI: one intercepted connection, served by the shared pipeline.
async fn serve_tls(
    state: Arc<ProxyState>,
    live: Arc<LiveSettings>,
    sandbox: Arc<Sandbox>,
    tcp: TcpStream,
    orig: SocketAddr,
    deadline: tokio::time::Instant,
) -> Result<(), TransparentError> {
    let mut at = Attempt::connection(ListenerKind::Transparent, "TLS");
    at.sandbox = Some(sandbox.clone());
    at.host = orig.to_string();
    let start = intercept::read_hello(deadline, ReadAhead::new(tcp)).await?;
    let sni = intercept::sni_host(&start).map_err(|e| refuse_intercept(&state, &at, e))?;
    let dest = tls_dest(sni.clone(), orig);
    at.host = dest.authority();
    let tunnel = admit(
        &state,
        &live,
        &sandbox,
        dest,
        Scheme::Https,
        ListenerKind::Transparent,
    )
    .map_err(|r| refused(&state, &at, r))?;
    intercept::check_sni(sni.as_ref(), &tunnel.dest)
        .map_err(|e| refuse_intercept(&state, &at, e))?;
    intercept::serve(live, tunnel, start, deadline).await?;
    Ok(())
}

/// Records a refusal of the whole connection; the error that ends it.
fn refused(state: &ProxyState, at: &Attempt<'_>, r: Refusal) -> TransparentError {
    outcome::refuse(state, at, &r);
    TransparentError::Refused(r.message)
}

/// An interception error that is a refusal (bad SNI) is recorded as one.
fn refuse_intercept(state: &ProxyState, at: &Attempt<'_>, e: InterceptError) -> TransparentError {
    match e.refusal() {
        Some(r) => refused(state, at, r),
        None => e.into(),
    }
}

/// The destination of a TLS connection: the SNI host at the original port, or — without SNI —
/// the original IP literal (which the allowlist must then name explicitly or by `*`).
pub fn tls_dest(sni: Option<Host>, orig: SocketAddr) -> Dest {
    Dest {
        host: sni.unwrap_or(Host::Ip(orig.ip())),
        port: orig.port(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};

    fn orig(port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1)), port)
    }

    #[test]
    fn sni_names_the_destination_at_the_original_port() {
        let d = tls_dest(Some(Host::Name("api.x.com".into())), orig(8443));
        assert_eq!(d.authority(), "api.x.com:8443");
    }

    #[test]
    fn no_sni_falls_back_to_the_original_ip_literal() {
        let d = tls_dest(None, orig(443));
        assert_eq!(d.host, Host::Ip(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1))));
    }

    #[test]
    fn same_addr_sees_through_ipv4_mapping() {
        let mapped: SocketAddr = "[::ffff:198.18.0.1]:3129".parse().unwrap();
        assert!(same_addr(mapped, orig(3129)));
        assert!(!same_addr(mapped, orig(443)));
    }
}
