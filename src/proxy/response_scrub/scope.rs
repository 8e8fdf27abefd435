//! Answers that outlive their request's decisions: an event stream, a long poll, a WebSocket.
//!
//! An answer is scrubbed with the values its host could receive, and those change while it
//! streams: a rotation, a secret added, a host added to `allowed_hosts` or the allowlist. An
//! upstream that echoes requests onto a stream opened earlier (a request inspector's live
//! view, a chat or pub/sub socket) then hands back a value unsealed after the stream began
//! (found from outside: the stream's scrubber was fixed when its request started). So:
//!
//! - a scrubbed answer goes on with the host's current scrubber from its next chunk
//!   ([`crate::subst::ScrubBody::with_rescope`], [`super::super::ws_scrub`]); what it held back
//!   is scanned with the new values too;
//! - an answer that was not scrubbed (nothing could be unsealed for its host when it began:
//!   its body may be compressed or a range, and its length was passed on) ends once something
//!   can be ([`Following`]): the client asks again and gets a scrubbed answer.
//!
//! Every answer also ends once its sandbox has ended (deleted, expired): an event stream or a
//! download it opened went on to its end, for minutes (found from outside), where a deleted
//! sandbox's WebSockets and uploads stopped at once.
//!
//! Invariant: a change is noticed at the first chunk after it, at the cost of one atomic load
//! per chunk ([`crate::sandbox::Sandbox::generation`]); the snapshot is read only on a change.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use super::super::{BoxError, Tunnel};
use crate::policy::{Dest, Scheme};
use crate::sandbox::{HostView, Sandbox, Snapshot};
use crate::subst::{Rescope, Rescoped, Scrubber};

/// Follows one sandbox's snapshot for the answers of one tunnel's host. Cheap to clone (the
/// tunnel is shared).
#[derive(Clone)]
pub struct Scope {
    tunnel: Arc<Tunnel>,
    /// The generation last looked at.
    seen: u64,
}

impl Scope {
    /// A scope that has seen generation `seen` (read with the snapshot the request's
    /// decisions came from, [`Sandbox::snapshot_at`]).
    pub fn since(tunnel: &Arc<Tunnel>, seen: u64) -> Scope {
        Scope {
            tunnel: tunnel.clone(),
            seen,
        }
    }

    fn sandbox(&self) -> &Sandbox {
        &self.tunnel.sandbox
    }

    /// The sandbox's id (for log lines).
    pub fn sandbox_id(&self) -> Arc<str> {
        self.sandbox().id.clone()
    }

    /// The host (for log lines).
    pub fn host(&self) -> Arc<str> {
        self.tunnel.authority.clone()
    }

    /// `Some` once the snapshot changed since the last look: the host's place in the current
    /// one.
    pub fn changed(&mut self) -> Option<Place> {
        let now = self.sandbox().generation();
        if now == self.seen {
            return None;
        }
        let (now, snap) = self.sandbox().snapshot_at();
        self.seen = now;
        Some(Place::of(&snap, &self.tunnel.dest, self.tunnel.scheme))
    }

    /// The hook of a scrubbed body: the host's current scrubber after a change; the end of
    /// the answer once the node's copy is locked ([`Place::Unknowable`]). A change after
    /// which nothing can be unsealed for the host keeps the scrubber it had (its values stay
    /// scrubbed).
    pub fn rescope(mut self) -> Rescope {
        Box::new(move || match self.changed()? {
            Place::Scrubbed(s) => Some(Rescoped::Use(s)),
            Place::Unknowable => Some(Rescoped::End),
            Place::Clear => None,
        })
    }

    /// True once something can be unsealed for the host (for answers that were not scrubbed).
    pub fn gained_values(&mut self) -> bool {
        matches!(self.changed(), Some(Place::Scrubbed(_) | Place::Unknowable))
    }
}

/// What a host's answers need under one snapshot.
pub enum Place {
    /// Nothing can be unsealed for the host: no scrubbing.
    Clear,
    /// Scrubbing with this scrubber.
    Scrubbed(Arc<Scrubber>),
    /// The snapshot is a node's locked copy (cut off from the shared database, or the store
    /// quarantined) and the store's values could go to the host: values changed elsewhere
    /// meanwhile are unknown here, so its answers cannot be scrubbed of them (found from
    /// outside: a value rotated through another node came back in clear). Fail closed.
    Unknowable,
}

impl Place {
    /// The place of `dest` over `scheme` in `snap`.
    pub fn of(snap: &Snapshot, dest: &Dest, scheme: Scheme) -> Place {
        let view = match scheme {
            Scheme::Https => snap.view(dest),
            Scheme::Http => snap.plain_view(dest),
        };
        if unknowable(snap, &view) {
            return Place::Unknowable;
        }
        match view.scrubber.clone() {
            None => Place::Clear,
            Some(s) => Place::Scrubbed(s),
        }
    }
}

/// True if `view` (of `snap`) is [`Place::Unknowable`]: a locked copy whose values could go
/// to the host.
pub fn unknowable(snap: &Snapshot, view: &HostView) -> bool {
    snap.is_locked() && view.scrubber.is_some()
}

pin_project_lite::pin_project! {
    /// An answer's body that ends with an error once its sandbox has ended, or — `unscrubbed`
    /// — once its host could receive a value (see the module docs).
    pub struct Following<B> {
        #[pin]
        body: B,
        scope: Scope,
        unscrubbed: bool,
        // Ended by a change: nothing more is passed on.
        ended: bool,
    }
}

impl<B> Following<B> {
    /// Wraps `body`.
    pub fn new(body: B, scope: Scope, unscrubbed: bool) -> Self {
        Following {
            body,
            scope,
            unscrubbed,
            ended: false,
        }
    }
}

impl Scope {
    /// Why an answer following this scope must end now, if it must.
    fn cut(&mut self, unscrubbed: bool) -> Option<AnswerCut> {
        if self.sandbox().has_ended() {
            return Some(AnswerCut::SandboxEnded);
        }
        (unscrubbed && self.gained_values()).then_some(AnswerCut::ScopeGained)
    }
}

/// Why an answer was ended before its end.
#[derive(Debug, thiserror::Error)]
pub enum AnswerCut {
    /// Its sandbox ended.
    #[error("answer ended: its sandbox has ended")]
    SandboxEnded,
    /// Its host may now receive values, and it began unscrubbed.
    #[error("{ScopeGained}")]
    ScopeGained,
}

/// Why an unscrubbed answer or relay was ended.
#[derive(Debug, thiserror::Error)]
#[error(
    "answer ended: the sandbox's store changed so that values may now be unsealed for this \
     host, and this answer began unscrubbed"
)]
pub struct ScopeGained;

impl<B> Body for Following<B>
where
    B: Body<Data = Bytes, Error = BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        if *this.ended {
            return Poll::Ready(None);
        }
        let polled = this.body.poll_frame(cx);
        if let Poll::Ready(Some(Err(e))) = &polled {
            if matches!(e.downcast_ref(), Some(crate::subst::BodyError::ScopeLost)) {
                let (sandbox, host) = (this.scope.sandbox_id(), this.scope.host());
                tracing::info!(sandbox = %sandbox, host = %host, "answer ended: {e}");
            }
        }
        let Poll::Ready(Some(Ok(_))) = &polled else {
            return polled;
        };
        let Some(why) = this.scope.cut(*this.unscrubbed) else {
            return polled;
        };
        *this.ended = true;
        let (sandbox, host) = (this.scope.sandbox_id(), this.scope.host());
        tracing::info!(sandbox = %sandbox, host = %host, "{why}");
        Poll::Ready(Some(Err(why.into())))
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
