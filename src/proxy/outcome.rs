//! The one record of a request's outcome — allowed or refused: exactly one audit line and one
//! `requests_total{decision, code}` increment, both derived from the same [`Code`], so the two
//! can never disagree.
//!
//! Two callers: the per-request pipeline (`proxy::forward`) records every request it serves
//! through [`record`]; everything refused before that pipeline (identification, framing on the
//! proxy connection, the admission step, SNI checks, plain-HTTP routing) goes through
//! [`refuse`]. A refusal of a whole connection or tunnel also counts once in `tunnels_total`
//! (the question "how many tunnels were opened or refused", next to `requests_total`).

use std::sync::Arc;

use super::refusal::{Code, Refusal};
use super::{ListenerKind, ProxyState};
use crate::audit::RequestEvent;
use crate::sandbox::Sandbox;

/// What happened to a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Forwarded.
    Allow,
    /// Refused by sealgate's policy or checks.
    Deny,
    /// The upstream failed (TLS, unreachable, timeout).
    Error,
}

impl Decision {
    /// The decision behind a refusal code (`None`: the request was allowed).
    pub fn of(code: Option<Code>) -> Decision {
        match code {
            None => Decision::Allow,
            Some(Code::UpstreamTlsError | Code::UpstreamUnreachable | Code::UpstreamTimeout) => {
                Decision::Error
            }
            Some(_) => Decision::Deny,
        }
    }

    /// The label and audit value.
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Deny => "deny",
            Decision::Error => "error",
        }
    }
}

/// Writes one request outcome: one audit line and one `requests_total` increment. `event`'s
/// `decision` and `code` are overwritten from `code`.
pub fn record(state: &ProxyState, code: Option<Code>, mut event: RequestEvent<'_>) {
    let decision = Decision::of(code).as_str();
    let code_str = code.map(Code::as_str);
    event.decision = decision;
    event.code = code_str;
    state.metrics.request(decision, code_str.unwrap_or("ok"));
    state.audit.request(&event);
}

/// What the audit line of a refusal outside the per-request pipeline names.
pub struct Attempt<'a> {
    /// The listener it arrived on.
    pub listener: ListenerKind,
    /// The sandbox, once identified.
    pub sandbox: Option<Arc<Sandbox>>,
    /// The destination as far as it is known (`host:port`, a raw target, or `-`).
    pub host: String,
    /// The HTTP method, or `TCP` / `TLS` / `HTTP` for a connection refused before any request.
    pub method: &'a str,
    /// The request path, or empty.
    pub path: &'a str,
    /// A whole connection or tunnel is refused (also counted in `tunnels_total`).
    pub tunnel: bool,
    /// The length of the answer the refusal gets (0 when the connection just closes).
    pub bytes_down: u64,
}

impl<'a> Attempt<'a> {
    /// A connection-level attempt on `listener` (no request read yet).
    pub fn connection(listener: ListenerKind, method: &'a str) -> Self {
        Attempt {
            listener,
            sandbox: None,
            host: "-".into(),
            method,
            path: "",
            tunnel: true,
            bytes_down: 0,
        }
    }
}

/// Records a refusal made outside the per-request pipeline (see the module docs).
pub fn refuse(state: &ProxyState, at: &Attempt<'_>, r: &Refusal) {
    tracing::debug!(
        mode = at.listener.as_str(),
        sandbox = at.sandbox.as_ref().map(|s| &*s.id),
        host = %at.host,
        code = r.code.as_str(),
        "refused"
    );
    if at.tunnel {
        let decision = Decision::of(Some(r.code)).as_str();
        state.metrics.tunnel(decision, r.code.as_str());
    }
    let event = RequestEvent {
        sandbox: at.sandbox.as_ref().map(|s| &*s.id),
        mode: at.listener.as_str(),
        host: &at.host,
        method: at.method,
        path: at.path,
        rule: Some(r.message.clone()),
        status: r.code.status().as_u16(),
        bytes_down: at.bytes_down,
        ..Default::default()
    };
    record(state, Some(r.code), event);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_failures_are_errors_and_everything_else_refused_is_a_denial() {
        assert_eq!(Decision::of(None), Decision::Allow);
        assert_eq!(Decision::of(Some(Code::UpstreamTimeout)), Decision::Error);
        assert_eq!(Decision::of(Some(Code::UpstreamTlsError)), Decision::Error);
        assert_eq!(Decision::of(Some(Code::EgressDenied)), Decision::Deny);
        assert_eq!(Decision::of(Some(Code::BadRequest)), Decision::Deny);
    }
}
