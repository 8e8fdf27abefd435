//! An upload its answer outlived: the origin answered before it took the whole request body,
//! and the sandbox is still sending.
//!
//! That is allowed (an early 413, a server that answers and then reads on), but an origin that
//! answers and then never takes another byte (h2: a flow-control window it never opens; h1: a
//! socket it never reads) left the upload with hyper's task writing it, forever: ~1.4 MB per
//! request (the sandbox-side stream window and hyper's buffers), and the request's slot was
//! released with the answer, so a sandbox could pin any number of them (outside pass h48f,
//! HIGH: 300 uploads, 88 → 425 MB, kept past every timeout and the sandbox's deletion).
//!
//! So the request's slot (`proxy.max_requests_per_sandbox`) stays held until the upload is
//! over as well as the answer, and an upload that has not moved for
//! `upstream.response_timeout_secs` (the timeout that already ends a wait on an upstream that
//! stopped reading), or whose sandbox has ended, is taken back ([`Detach::drop_body`]): the sandbox-side body and its buffers
//! are dropped, the sandbox's stream is drained and ended ([`crate::proxy::linger`]), the slot
//! is released.
//!
//! Invariant: at most `max_requests_per_sandbox` such uploads per sandbox at a time, each for at
//! most that timeout after its last byte moved. An HTTP/1 upload's connection is ended with it
//! ([`crate::proxy::upstream`]'s `cut`): hyper's task on it, blocked writing into a socket
//! the origin does not read, would never poll the body again to see it gone, and held the
//! connection, its buffers and its places in the upstream budgets until the origin closed it.
//! On h2, what stays is hyper's writing task on its stream, waiting for a window that never
//! opens, with the last piece it took (a frame, up to 16 KiB), until the origin closes the
//! connection: hyper's client offers no way to reset a stream whose request body it is
//! writing, and the connection carries other streams (ARCHITECTURE, "Orphaned uploads").

use std::sync::Arc;
use std::time::Duration;

use super::super::linger::Detach;
use super::super::progress::{Progress, Stall};
use super::super::upstream::OverheadOf;
use super::super::{LiveSettings, Tunnel};
use crate::sandbox::SlotGuard;

/// How often a watched upload is looked at: its slot is released at most this late after the
/// upload ends.
const LOOK_EVERY: Duration = Duration::from_millis(250);

/// A request's slot as its answer holds it: its own, or shared with the watch of an upload
/// still going (released when both are done). Only the second allocates.
pub(super) enum AnswerSlot {
    /// Nothing else holds the slot.
    Own { _slot: SlotGuard },
    /// An upload's watch holds it too.
    Shared { _slot: Arc<SlotGuard> },
}

/// Watches an upload still going when its answer came (see the module docs), if `upload` is
/// one: the slot is then shared with the watch, which holds it until the upload is over and
/// takes the upload back once it has not moved for the response timeout. An HTTP/1 answer's
/// connection (in its `answer` extensions) is ended with the cut: it carries only this
/// exchange, which can no longer complete, and hyper's task on it would wait for the origin to
/// close it.
pub(super) fn watch(
    t: &Tunnel,
    rt: &LiveSettings,
    slot: SlotGuard,
    upload: Option<(Arc<Progress>, Detach)>,
    answer: &http::Extensions,
) -> AnswerSlot {
    let Some((progress, detach)) = upload.filter(|(_, d)| !d.is_taken()) else {
        return AnswerSlot::Own { _slot: slot };
    };
    let conn = answer.get::<OverheadOf>().cloned();
    let stall = rt.upstream.config.response_timeout;
    let slot = Arc::new(slot);
    let (held, sandbox, dest) = (slot.clone(), t.sandbox.clone(), t.dest.to_string());
    tokio::spawn(async move {
        let _slot = held;
        let Some(cut) = cause(&sandbox, &progress, &detach, stall).await else {
            return;
        };
        detach.drop_body();
        if let Some(conn) = conn {
            conn.cut_connection();
        }
        let why = match cut {
            Cut::SandboxEnded => "its sandbox ended".to_owned(),
            Cut::Stalled(Stall::Upstream, idle) => {
                format!(
                    "nothing more could be written upstream for {} s",
                    idle.as_secs()
                )
            }
            Cut::Stalled(Stall::Sandbox, idle) => {
                format!("the sandbox sent nothing for {} s", idle.as_secs())
            }
            // Its refusal has its audit line; this is the connection's end only.
            Cut::TakenBack => {
                tracing::debug!(sandbox = &*sandbox.id, host = %dest, "a refused upload's connection was ended");
                return;
            }
        };
        tracing::info!(
            sandbox = &*sandbox.id,
            host = %dest,
            bytes = progress.bytes(),
            "an upload still going after its answer was cut: {why}"
        );
    });
    AnswerSlot::Shared { _slot: slot }
}

/// Why a watched upload is cut.
enum Cut {
    /// Its sandbox ended while hyper still held it.
    SandboxEnded,
    /// It did not move for the response timeout (how long), stalled by that side.
    Stalled(Stall, Duration),
    /// The forwarder took it back (its answer was refused) while hyper still held it: on
    /// HTTP/1, hyper may be blocked writing it into a socket its origin does not read.
    TakenBack,
}

/// Waits for the reason to cut the upload, or for its end (None: nothing to cut).
async fn cause(
    sandbox: &crate::sandbox::Sandbox,
    progress: &Progress,
    detach: &Detach,
    stall: Duration,
) -> Option<Cut> {
    tokio::select! {
        // The sandbox's end first: it is the cause when both are ready (review h49a).
        biased;
        // Its buffers go with the sandbox, not a response timeout later (re-check h48g). The
        // deferred audit line's task may have taken the body back first: the connection is
        // cut all the same. Once hyper let go, its connection may serve another request:
        // left alone (review h49c).
        () = sandbox.ended() => detach.reader_holds().then_some(Cut::SandboxEnded),
        cut = until_over_or_stalled(progress, detach, stall) => cut,
    }
}

/// Waits until hyper let go of the upload (None: over, or its exchange ended), the forwarder
/// took it back, or it has not moved for `stall` (marked on `progress` before it returns, so
/// the deferred audit line reads why).
async fn until_over_or_stalled(
    progress: &Progress,
    detach: &Detach,
    stall: Duration,
) -> Option<Cut> {
    loop {
        if !detach.reader_holds() {
            return None;
        }
        if detach.was_taken_back() {
            return Some(Cut::TakenBack);
        }
        let idle = progress.last().elapsed();
        if idle >= stall {
            return Some(Cut::Stalled(progress.mark_cut(), idle));
        }
        tokio::time::sleep((stall - idle).min(LOOK_EVERY)).await;
    }
}
