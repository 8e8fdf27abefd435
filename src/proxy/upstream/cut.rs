//! A kill switch for one HTTP/1 upstream connection, thrown from outside its hyper task.
//!
//! An origin that answers an upload and then never reads another byte leaves hyper's HTTP/1
//! dispatcher blocked writing the upload into a full socket. The orphan watch
//! ([`crate::proxy::forward`]'s `orphan`) takes the sandbox-side body back, but the dispatcher
//! never polls it again to learn that: the connection, its buffers and its places in the
//! upstream connection budgets stayed until the origin closed it (outside pass h48f, re-check
//! h48g). Throwing the switch wakes the dispatcher, whose next read, write or flush then fails,
//! which ends the connection.
//!
//! Only HTTP/1: such a connection carries that one exchange, which can no longer complete.
//! An h2 connection carries other streams, and is left alone.
//!
//! Invariant: once [`Cut::cut`] returns, every later read, write or flush on the connection
//! fails (a shutdown goes on), and
//! the task parked on it by its last I/O call that returned `Pending` has been woken. That is
//! enough because one task (hyper's dispatcher, or the relay after an upgrade) polls an
//! HTTP/1 connection, and a registration stays until a cut takes it, so its last `Pending`
//! read still covers a wait on anything else, the request body included
//! (review h49c; test `an_http1_upload_its_sandbox_stalled_after_the_answer_gives_back_its_connection_when_cut`).

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;

/// One connection's switch: shared by its stream ([`crate::proxy::upstream::overhead`]'s
/// `Counted`) and, through its answers' extensions, the forwarder.
#[derive(Default, Debug)]
pub struct Cut {
    cut: AtomicBool,
    /// The task that last found the connection not ready (hyper's dispatcher).
    parked: AtomicWaker,
}

impl Cut {
    /// Throws the switch: the connection's next I/O call fails.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::Release);
        self.parked.wake();
    }

    /// True once thrown.
    pub fn is_cut(&self) -> bool {
        self.cut.load(Ordering::Acquire)
    }

    /// `Err` once thrown (checked before each I/O call).
    pub fn check(&self) -> io::Result<()> {
        if self.is_cut() {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the upload on this connection was cut: the connection is closed",
            ));
        }
        Ok(())
    }

    /// Passes `polled` through; a `Pending` one parks `cx`'s task here, to be woken by
    /// [`Cut::cut`] (checked again after, so a cut between the two is not missed).
    pub fn park<T>(&self, cx: &Context<'_>, polled: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            return polled;
        }
        self.parked.register(cx.waker());
        match self.check() {
            Ok(()) => Poll::Pending,
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;
    use std::task::{Wake, Waker};

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_cut_wakes_the_parked_task_and_fails_every_later_call() {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let cx = Context::from_waker(&waker);
        let c = Cut::default();
        assert!(c.check().is_ok());
        assert!(c.park::<()>(&cx, Poll::Pending).is_pending());
        assert!(matches!(
            c.park(&cx, Poll::Ready(Ok(3))),
            Poll::Ready(Ok(3))
        ));
        c.cut();
        assert_eq!(
            count.0.load(Ordering::SeqCst),
            1,
            "the parked task is woken"
        );
        let e = c.check().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted);
        assert!(matches!(
            c.park::<()>(&cx, Poll::Pending),
            Poll::Ready(Err(_))
        ));
    }
}
