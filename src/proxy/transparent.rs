//! The transparent listener (iptables REDIRECT target): original destination from
//! `SO_ORIGINAL_DST`, sandbox from the source IP, host from the TLS SNI (or, on port 80, from
//! the plain-HTTP `Host` header).
//!
//! Identification is the only part that differs from the explicit listener; after it, a
//! [`Tunnel`] goes through the same [`intercept`] → [`forward`](super::forward) path.
//!
//! Decisions, in order (each refusal closes the connection, or on plain HTTP answers with the
//! uniform error response, and is audited with `mode = "transparent"`):
//! 1. the source IP must belong to a live sandbox (else: close, nothing read); the connection
//!    then counts against that sandbox's `max_connections_per_sandbox` (over it: close) and
//!    leaves the unauthenticated budget at once ([`super::admission`]);
//! 2. the connection must have been redirected: an original destination equal to the
//!    listener's own address means someone dialled the listener directly (else: close);
//! 3. port 80 → plain HTTP routed by `Host` (never unsealed, see [`plain`]); any other port →
//!    TLS routed by SNI. Without SNI the destination is the original IP literal, so an
//!    SNI-less connection is refused unless that literal is allowlisted;
//! 4. the egress policy and the per-sandbox tunnel cap are checked **before** any leaf is
//!    minted, so a denied SNI never obtains a certificate.

mod plain;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

#[cfg(any(target_os = "linux", target_os = "android"))]
use socket2::SockRef;
use tokio::net::TcpStream;

use super::intercept::{self, InterceptError};
use super::respond::{Code, Refusal};
use super::{ProxyState, Tunnel};
use crate::audit::RequestEvent;
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
    let Some((sandbox, orig)) = identify(&state, &tcp, peer) else {
        return;
    };
    if let Some(slot) = super::connection_slot() {
        let max = state.runtime().proxy.max_connections_per_sandbox;
        if let Err(e) = slot.authenticate(&sandbox.id, max) {
            tracing::debug!(%peer, sandbox = %sandbox.id, error = %e, "transparent connection refused");
            state
                .metrics
                .tunnel("deny", Code::TooManyConnections.as_str());
            return;
        }
    }
    let result = if orig.port() == 80 {
        plain::serve(state, sandbox, tcp, orig).await
    } else {
        serve_tls(state, sandbox, tcp, orig).await
    };
    if let Err(e) = result {
        tracing::debug!(%peer, %orig, error = %e, "transparent connection ended");
    }
}

/// Steps 1 and 2: the sandbox behind `peer` and the original destination.
fn identify(
    state: &ProxyState,
    tcp: &TcpStream,
    peer: SocketAddr,
) -> Option<(Arc<Sandbox>, SocketAddr)> {
    let Some(sandbox) = state.registry.by_source_ip(peer.ip().to_canonical()) else {
        tracing::debug!(%peer, "transparent connection from an unregistered source IP; closed");
        state.metrics.tunnel("deny", "unknown_source");
        return None;
    };
    let local = tcp.local_addr().ok()?;
    match original_dst(tcp) {
        Ok(orig) if !same_addr(orig, local) => Some((sandbox, orig)),
        Ok(_) => {
            tracing::debug!(%peer, sandbox = %sandbox.id, "connection to the transparent listener itself (not redirected); closed");
            state.metrics.tunnel("deny", "not_redirected");
            None
        }
        Err(e) => {
            tracing::debug!(%peer, sandbox = %sandbox.id, error = %e, "no original destination (not redirected); closed");
            state.metrics.tunnel("deny", "not_redirected");
            None
        }
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
    sandbox: Arc<Sandbox>,
    tcp: TcpStream,
    orig: SocketAddr,
) -> Result<(), TransparentError> {
    let rt = state.runtime();
    let start = intercept::read_hello(&rt, tcp).await?;
    let sni = intercept::sni_host(&start)?;
    let dest = tls_dest(sni.clone(), orig);
    let tunnel = open_tunnel(&state, &sandbox, dest, Scheme::Https, "TLS")
        .map_err(|r| TransparentError::Refused(r.message))?;
    intercept::check_sni(sni.as_ref(), &tunnel.dest)?;
    intercept::serve(state, tunnel, start).await?;
    Ok(())
}

/// The destination of a TLS connection: the SNI host at the original port, or — without SNI —
/// the original IP literal (which the allowlist must then name explicitly or by `*`).
pub fn tls_dest(sni: Option<Host>, orig: SocketAddr) -> Dest {
    Dest {
        host: sni.unwrap_or(Host::Ip(orig.ip())),
        port: orig.port(),
    }
}

/// Step 4: egress policy, then the tunnel cap. Refusals are audited and counted here.
fn open_tunnel(
    state: &Arc<ProxyState>,
    sandbox: &Arc<Sandbox>,
    dest: Dest,
    scheme: Scheme,
    what: &'static str,
) -> Result<Arc<Tunnel>, Refusal> {
    if !sandbox.snapshot().egress_allowed(&dest, scheme) {
        let r = Refusal::new(
            Code::EgressDenied,
            format!("{dest} is not in the store's egress_allowlist"),
        );
        return Err(refuse(state, sandbox, &dest, what, r));
    }
    // IP-literal destinations (no SNI) are vetted before any leaf is minted, as at CONNECT.
    if let Err(e) = state.runtime().dialing.precheck(&dest) {
        let r = Refusal::new(Code::EgressDenied, format!("address vetting: {e}"));
        return Err(refuse(state, sandbox, &dest, what, r));
    }
    let max = state.runtime().proxy.max_tunnels_per_sandbox;
    let Some(guard) = sandbox.try_open_tunnel(max) else {
        let r = Refusal::new(
            Code::TooManyTunnels,
            format!("sandbox has {max} tunnels open (proxy.max_tunnels_per_sandbox)"),
        );
        return Err(refuse(state, sandbox, &dest, what, r));
    };
    state.metrics.tunnel("allow", "ok");
    Ok(Tunnel::new(
        state.clone(),
        sandbox.clone(),
        dest,
        scheme,
        "transparent",
        Some(guard),
    ))
}

/// Counts and audits a refusal of a whole connection; returns it for the caller to act on.
fn refuse(
    state: &ProxyState,
    sandbox: &Sandbox,
    dest: &Dest,
    what: &'static str,
    r: Refusal,
) -> Refusal {
    tracing::debug!(sandbox = %sandbox.id, %dest, code = r.code.as_str(), "transparent connection refused");
    state.metrics.tunnel("deny", r.code.as_str());
    state.metrics.request("deny", r.code.as_str());
    state.audit.request(&RequestEvent {
        sandbox: Some(&sandbox.id),
        mode: "transparent",
        host: &dest.authority(),
        method: what,
        path: "",
        decision: "deny",
        code: Some(r.code.as_str()),
        rule: Some(r.message.clone()),
        status: r.code.status().as_u16(),
        ..Default::default()
    });
    r
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
