//! The admission step: the one sequence every destination passes before a [`Tunnel`] exists.
//!
//! Order, and why: (1) the store's egress allowlist — a destination the store does not allow is
//! refused before any DNS lookup; (2) the address precheck — an IP-literal destination that is
//! not public (loopback, private, metadata, the proxy's own listeners…) is refused before a leaf
//! is minted for it (names are vetted after DNS, by the connector, on the first request); (3) the
//! sandbox's tunnel cap (`proxy.max_tunnels_per_sandbox`); then the [`Tunnel`] is built.
//!
//! Every listener calls [`admit`]: an explicit CONNECT target and absolute-form `http://`
//! request, a transparent connection's SNI host or port-80 `Host`. Nothing else builds a tunnel.
//! Refusals are returned, not recorded: the caller records each one exactly once through
//! [`super::outcome::refuse`], knowing what the audit line must name (method, path).
//!
//! Which admissions take a tunnel slot: every intercepted *connection* (CONNECT tunnels and
//! transparent connections, TLS or plain). An explicit absolute-form `http://` request rides on
//! the client's own proxy connection — already counted against `max_connections_per_sandbox` —
//! and takes none. Each slot taken counts once in `tunnels_total{decision="allow"}`.

use std::sync::Arc;

use super::outcome::Decision;
use super::refusal::{Code, Refusal};
use super::{ListenerKind, LiveSettings, ProxyState, Tunnel};
use crate::policy::{Dest, Scheme};
use crate::sandbox::Sandbox;

/// Admits `sandbox` to `dest` over `scheme` on `listener`, or says why not.
///
/// `live` is the runtime the caller took for this request or connection: the precheck and the
/// cap are read from it, never from a fresher one.
///
/// # Errors
/// [`Code::EgressDenied`] (allowlist or address precheck) or [`Code::TooManyTunnels`].
pub fn admit(
    state: &Arc<ProxyState>,
    live: &LiveSettings,
    sandbox: &Arc<Sandbox>,
    dest: Dest,
    scheme: Scheme,
    listener: ListenerKind,
) -> Result<Arc<Tunnel>, Refusal> {
    let snapshot = sandbox.snapshot();
    if !snapshot.egress_allowed(&dest, scheme) {
        let msg = match snapshot.egress_allowlist {
            Some(_) => format!("{dest} is not in the store's egress_allowlist"),
            None => format!(
                "{dest}: the store has no egress_allowlist, which allows the default ports only \
                 (443, and 80 for plain HTTP)"
            ),
        };
        return Err(Refusal::new(Code::EgressDenied, msg));
    }
    if let Err(e) = live.upstream.precheck(&dest) {
        let msg = format!("address vetting: {e}");
        return Err(Refusal::new(Code::EgressDenied, msg));
    }
    let guard = if takes_tunnel_slot(listener, scheme) {
        let max = live.proxy.max_tunnels_per_sandbox;
        let Some(guard) = sandbox.try_open_tunnel(max) else {
            let msg = format!("sandbox has {max} tunnels open (proxy.max_tunnels_per_sandbox)");
            return Err(Refusal::new(Code::TooManyTunnels, msg));
        };
        state.metrics.tunnel(Decision::Allow.as_str(), "ok");
        Some(guard)
    } else {
        None
    };
    let tunnel = Tunnel::new(
        state.clone(),
        sandbox.clone(),
        dest,
        scheme,
        listener,
        guard,
    );
    Ok(tunnel)
}

/// Only an explicit plain-HTTP request is not a connection of its own (see the module docs).
fn takes_tunnel_slot(listener: ListenerKind, scheme: Scheme) -> bool {
    !(listener == ListenerKind::Explicit && scheme == Scheme::Http)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_connection_takes_a_slot_but_explicit_plain_requests_do_not() {
        use ListenerKind::{Explicit, Transparent};
        assert!(takes_tunnel_slot(Explicit, Scheme::Https));
        assert!(takes_tunnel_slot(Transparent, Scheme::Https));
        assert!(takes_tunnel_slot(Transparent, Scheme::Http));
        assert!(!takes_tunnel_slot(Explicit, Scheme::Http));
    }
}
