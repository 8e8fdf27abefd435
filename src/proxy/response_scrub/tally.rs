//! What scrubbing did to one answer, told to the operator: an upstream that hands a real value
//! back (an API that echoes the request's `Authorization` into an error message, a request
//! inspector) is the threat scrubbing exists for, and the sandbox never sees that it happened.
//!
//! Invariants:
//! - one answer is reported once, when the last of its scrubbed bodies is dropped (ended,
//!   failed or cut off: a streamed body's count is known only then, long after its audit line
//!   was written at the head), and only when something was scrubbed;
//! - the report holds counts, the sandbox and the host — never a value, nor which value;
//! - nothing runs per chunk: the bodies count into their own field and tell it once.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;

use super::super::Tunnel;
use crate::subst::Tally;

/// The values scrubbed from one answer: its reason phrase and headers (`head`, known at
/// once) and its bodies with their trailers (told by each body as it is dropped).
pub struct AnswerTally {
    head: usize,
    body: AtomicUsize,
    counter: Counter,
    sandbox: Arc<str>,
    host: Arc<str>,
}

impl AnswerTally {
    /// A tally for an answer through `t` whose head had `head` values scrubbed, counted into
    /// the daemon's `sealgate_values_scrubbed_total`.
    pub fn of(t: &Tunnel, head: usize) -> Arc<Self> {
        let counter = t.state.metrics.values_scrubbed.clone();
        Self::new(head, counter, t.sandbox.id.clone(), t.authority.clone())
    }

    /// A tally for an answer of `host` to `sandbox` whose head had `head` values scrubbed,
    /// counted into `counter`.
    fn new(head: usize, counter: Counter, sandbox: Arc<str>, host: Arc<str>) -> Arc<Self> {
        Arc::new(AnswerTally {
            head,
            body: AtomicUsize::new(0),
            counter,
            sandbox,
            host,
        })
    }

    /// What one scrubbed body of the answer tells when it is dropped.
    pub fn for_body(self: &Arc<Self>) -> Tally {
        let tally = self.clone();
        Box::new(move |n| {
            tally.body.fetch_add(n, Ordering::Relaxed);
        })
    }
}

impl Drop for AnswerTally {
    fn drop(&mut self) {
        let body = *self.body.get_mut();
        let total = self.head + body;
        if total == 0 {
            return;
        }
        self.counter.inc_by(total as u64);
        tracing::info!(
            sandbox = %self.sandbox,
            host = %self.host,
            head = self.head,
            body,
            "real values in an answer were scrubbed (replaced by their tokens)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tally(head: usize, counter: &Counter) -> Arc<AnswerTally> {
        AnswerTally::new(head, counter.clone(), "sb".into(), "h:443".into())
    }

    #[test]
    fn an_answer_is_counted_once_when_its_last_body_is_dropped() {
        let counter = Counter::default();
        let t = tally(2, &counter);
        let (first, second) = (t.for_body(), t.for_body());
        drop(t);
        first(3);
        assert_eq!(counter.get(), 0, "a body is still open");
        second(1);
        assert_eq!(counter.get(), 6);
    }

    #[test]
    fn an_answer_with_nothing_scrubbed_counts_nothing() {
        let counter = Counter::default();
        let t = tally(0, &counter);
        t.for_body()(0);
        drop(t);
        assert_eq!(counter.get(), 0);
    }
}
