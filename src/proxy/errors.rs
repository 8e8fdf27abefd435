//! Classifies upstream failures into the sandbox-facing codes (DESIGN.md §5).

use std::error::Error as _;

use super::respond::{Code, Refusal};
use super::upstream::ConnectError;
use super::Tunnel;
use crate::subst::BodyError;

/// Maps a hyper-util client error to a refusal, looking through its source chain for our own
/// connector and body errors.
pub fn classify(t: &Tunnel, e: &hyper_util::client::legacy::Error) -> Refusal {
    let mut src: Option<&(dyn std::error::Error + 'static)> = e.source();
    while let Some(s) = src {
        if let Some(c) = s.downcast_ref::<ConnectError>() {
            return from_connect(t, c);
        }
        if let Some(BodyError::Denied(d)) = s.downcast_ref::<BodyError>() {
            return Refusal::new(
                Code::SecretHostDenied,
                format!("secret {} may not be sent to {} (secret allowed_hosts / store egress_allowlist)", d.secret, t.dest),
            );
        }
        src = s.source();
    }
    tracing::debug!(dest = %t.dest, error = %e, "upstream exchange failed");
    Refusal::new(
        Code::UpstreamUnreachable,
        format!("{} failed the exchange", t.dest),
    )
}

fn from_connect(t: &Tunnel, c: &ConnectError) -> Refusal {
    match c {
        ConnectError::Denied(m) => {
            Refusal::new(Code::EgressDenied, format!("address vetting: {m}"))
        }
        ConnectError::Timeout => Refusal::new(
            Code::UpstreamTimeout,
            format!("connecting to {} timed out", t.dest),
        ),
        ConnectError::Tls(m) => Refusal::new(
            Code::UpstreamTlsError,
            format!("TLS to {} failed: {m}", t.dest),
        ),
        ConnectError::Unreachable(m) => Refusal::new(
            Code::UpstreamUnreachable,
            format!("{} unreachable: {m}", t.dest),
        ),
    }
}
