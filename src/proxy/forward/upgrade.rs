//! A WebSocket upgrade: the two upgraded connections relayed, scrubbed, and cut when the
//! tunnel may no longer reach its host.

use std::sync::Arc;

use http::Response;

use super::checks::is_live;
use crate::proxy::response_scrub::{AnswerTally, Scope, ScopeGained};
use crate::proxy::{ProxyBody, Tunnel};
use crate::subst::{self, Scrubber};

/// Relays an upgraded (WebSocket) connection both ways until both directions have ended (a
/// half-close goes on to the other side), an error ends either, or the tunnel's policy stops
/// holding (checked every second: the sandbox ended, or the host left the store's
/// `egress_allowlist`), which ends it — such a connection has no further requests at which
/// the policy could be read. With a `scrubber` (the host's answers are scrubbed) the
/// upstream's frames are scrubbed on their way ([`crate::proxy::ws_scrub`]), by the upgrade
/// request's `extras` (its Basic-auth forms) first.
///
/// The relay runs as a connection of its own ([`crate::proxy::ProxyState::spawn_connection`]):
/// counted in `active_connections`, waited for by the stop's drain (up to `shutdown_grace_secs`,
/// like a streaming answer), and holding `t` — so the client connection's admission slot and the
/// tunnel's slot stay taken until it ends.
pub(super) fn relay_upgrade(
    t: &Arc<Tunnel>,
    client: hyper::upgrade::OnUpgrade,
    mut resp: Response<ProxyBody>,
    (scrubber, extras): (Option<Arc<Scrubber>>, Option<Arc<Scrubber>>),
    mut scope: Scope,
) -> Response<ProxyBody> {
    let Some(upstream) = resp.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
        return resp;
    };
    let (sandbox, host) = (scope.sandbox_id(), scope.host());
    let (allowed, tunnel) = (still_allowed(t), t.clone());
    let tally = AnswerTally::of(t, 0);
    t.state.spawn_connection(async move {
        let _slots = tunnel;
        let (Ok(c), Ok(u)) = (client.await, upstream.await) else {
            return;
        };
        let mut c = hyper_util::rt::TokioIo::new(c);
        let mut u = hyper_util::rt::TokioIo::new(u);
        let relay = async {
            match scrubber {
                Some(s) => {
                    let rescope = Some(scope.rescope());
                    let tally = tally.for_body();
                    crate::proxy::ws_scrub::relay(&mut c, &mut u, (s, extras), rescope, tally).await
                }
                None => {
                    let gained = move || scope.gained_values();
                    crate::proxy::ws_scrub::relay_unscrubbed(&mut c, &mut u, gained).await
                }
            }
        };
        tokio::select! {
            ended = relay => match ended {
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                    tracing::warn!(%sandbox, %host, error = %e, "upgraded connection closed");
                }
                Err(e) if changed_scope(&e) => {
                    tracing::info!(%sandbox, %host, error = %e, "upgraded connection closed");
                }
                Err(e) => tracing::debug!(%sandbox, %host, error = %e, "upgraded connection ended"),
                Ok(()) => {}
            },
            () = revoked(allowed) => tracing::info!(
                %sandbox, %host,
                "upgraded connection closed: its sandbox ended or its host left the egress_allowlist"
            ),
        }
    });
    resp
}

/// True for a relay ended by a change of the sandbox's values ([`ScopeGained`], or its
/// node's copy locked).
fn changed_scope(e: &std::io::Error) -> bool {
    e.get_ref().is_some_and(|e| {
        e.is::<ScopeGained>() || matches!(e.downcast_ref(), Some(subst::BodyError::ScopeLost))
    })
}

/// Returns once `allowed` no longer holds (polled every second).
async fn revoked(allowed: impl Fn() -> bool) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if !allowed() {
            return;
        }
    }
}

/// May this tunnel still reach its host: sandbox live, host on the current allowlist.
fn still_allowed(t: &Tunnel) -> impl Fn() -> bool + Send + 'static {
    let (registry, sandbox) = (t.state.registry.clone(), t.sandbox.clone());
    let (dest, scheme) = (t.dest.clone(), t.scheme);
    move || is_live(&registry, &sandbox) && sandbox.snapshot().egress_allowed(&dest, scheme)
}
