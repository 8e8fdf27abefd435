//! The executor of the upstream clients: a future that hyper starts while one of its own tasks
//! is being polled, and that task has nothing else in flight, runs *inside* that task instead
//! of as a new one.
//!
//! Why: hyper's h2 client starts one future per request (the one that waits for the response
//! head, plus one that pipes a streamed request body) from its dispatch task, right after
//! waking the connection task that writes the request. Spawned, that future displaced the
//! woken connection task from the worker's next-task slot into its queue, and tokio then woke
//! a parked worker to share it: a futex wake, a futex wait and a hand-off to another core on
//! every request (`perf record -e syscalls:sys_enter_futex` during the one-connection GET
//! bench: 99.7 % of all futex calls came from that spawn, one wake and one wait per request).
//! Nested, a lone request stays on the worker that read it. With requests already in flight
//! on the connection the new one is spawned as before: the workers are busy then (no parked
//! one to wake), and separate tasks spread the responses over them.
//!
//! Invariants:
//! - A future given to [`Nesting::execute`] while a [`Nest`] without children is polled on
//!   this thread becomes a child of that nest (at most one per poll): it is polled only by
//!   that nest's task, and the nest completes only once its own future and every child have.
//!   Any other future is spawned as a new nest.
//! - A child that panics ends alone (caught at the child): its siblings and the nest's own
//!   future — hyper's connection dispatch — keep running, as they would as separate tasks.
//! - The thread's collecting slot is restored when a nest's poll ends, even by unwinding, so a
//!   spawn made outside any nest never lands in one.

use std::any::Any;
use std::cell::RefCell;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::future::CatchUnwind;
use futures_util::task::AtomicWaker;
use futures_util::FutureExt;

type Child = Pin<Box<dyn Future<Output = ()> + Send>>;

thread_local! {
    /// While a [`Nest`] is polled on this thread: the futures executed during that poll.
    static COLLECTING: RefCell<Option<Collected>> = const { RefCell::new(None) };
}

/// A `hyper::rt::Executor` for the upstream clients (see the module docs).
#[derive(Clone, Copy, Debug, Default)]
pub struct Nesting;

impl<F> hyper::rt::Executor<F> for Nesting
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        let unclaimed = COLLECTING.with(|slot| match slot.borrow_mut().as_mut() {
            Some(c) if !c.busy && c.new.is_none() => {
                c.new = Some(boxed(fut));
                None
            }
            _ => Some(fut),
        });
        if let Some(fut) = unclaimed {
            tokio::spawn(Nest::new(fut));
        }
    }
}

/// `fut` as a [`Child`], without a second box when it already is one (hyper-util boxes what
/// it executes).
fn boxed<F: Future<Output = ()> + Send + 'static>(fut: F) -> Child {
    let mut slot = Some(fut);
    match (&mut slot as &mut dyn Any).downcast_mut::<Option<Child>>() {
        Some(already) => already.take(),
        None => None,
    }
    .unwrap_or_else(|| Box::pin(slot.take().expect("filled above; taken only in one arm")))
}

/// A task's future plus the children executed while it was polled.
///
/// Children are polled only when their own waker fired (or when new). A child woken while the
/// nest itself is being polled is polled in that same poll without waking the nest's task:
/// a task woken during its own poll is re-queued by tokio as a yield, which wakes another
/// worker — the very hand-off this module exists to avoid.
pub struct Nest<F> {
    main: Option<Pin<Box<F>>>,
    children: Vec<Slot>,
    /// The nest's task waker, registered only between polls (see above).
    parent: Arc<AtomicWaker>,
}

/// One child: its future (a panic ends it alone) and its waker, which marks it ready.
struct Slot {
    fut: CatchUnwind<AssertUnwindSafe<Child>>,
    mark: Arc<Mark>,
    waker: Waker,
}

/// A child's waker: sets its ready flag, then wakes the nest's task if that is registered.
struct Mark {
    ready: AtomicBool,
    parent: Arc<AtomicWaker>,
}

impl Wake for Mark {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.ready.store(true, Ordering::Release);
        self.parent.wake();
    }
}

impl<F: Future<Output = ()>> Nest<F> {
    /// A nest with no children yet.
    pub fn new(main: F) -> Self {
        Nest {
            main: Some(Box::pin(main)),
            children: Vec::new(),
            parent: Arc::new(AtomicWaker::new()),
        }
    }

    /// Polls the nest's own future (if still running) and then every ready child, adopting
    /// what each of them executes, until nothing is ready and nothing new was executed; only
    /// then is the task's waker handed to the children.
    fn poll_all(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let collecting = Collecting::start(!self.children.is_empty());
        self.parent.take();
        if let Some(main) = self.main.as_mut() {
            if main.as_mut().poll(cx).is_ready() {
                self.main = None;
            }
        }
        loop {
            self.adopt(collecting.take());
            self.poll_ready_children();
            collecting.set_busy(!self.children.is_empty());
            if collecting.has_new() {
                continue;
            }
            self.parent.register(cx.waker());
            if !self.any_ready() {
                break;
            }
            self.parent.take();
        }
        if self.main.is_none() && self.children.is_empty() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    fn adopt(&mut self, new: Option<Child>) {
        if let Some(child) = new {
            let mark = Arc::new(Mark {
                ready: AtomicBool::new(true),
                parent: self.parent.clone(),
            });
            self.children.push(Slot {
                fut: AssertUnwindSafe(child).catch_unwind(),
                waker: Waker::from(mark.clone()),
                mark,
            });
        }
    }

    /// Polls each child whose flag is set once; drops the ones that ended (or panicked).
    fn poll_ready_children(&mut self) {
        let mut i = 0;
        while i < self.children.len() {
            let slot = &mut self.children[i];
            if slot.mark.ready.swap(false, Ordering::Acquire) {
                let mut child_cx = Context::from_waker(&slot.waker);
                if Pin::new(&mut slot.fut).poll(&mut child_cx).is_ready() {
                    self.children.swap_remove(i);
                    continue;
                }
            }
            i += 1;
        }
    }

    fn any_ready(&self) -> bool {
        self.children
            .iter()
            .any(|s| s.mark.ready.load(Ordering::Acquire))
    }
}

impl<F: Future<Output = ()>> Future for Nest<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // `Nest` is `Unpin`: `main` and every child are boxed.
        self.get_mut().poll_all(cx)
    }
}

/// What a nest's poll collects: the one future executed during it, and whether the nest
/// already has a child (then a new future is spawned instead: see [`Nesting`]).
struct Collected {
    busy: bool,
    new: Option<Child>,
}

/// Marks this thread as collecting for one nest's poll; restores the previous state on drop.
struct Collecting {
    previous: Option<Collected>,
}

impl Collecting {
    fn start(busy: bool) -> Self {
        let now = Collected { busy, new: None };
        let previous = COLLECTING.with(|slot| slot.replace(Some(now)));
        Collecting { previous }
    }

    fn set_busy(&self, busy: bool) {
        COLLECTING.with(|slot| {
            if let Some(c) = slot.borrow_mut().as_mut() {
                c.busy = busy;
            }
        });
    }

    /// The future executed since the last call, if any.
    fn take(&self) -> Option<Child> {
        COLLECTING.with(|slot| slot.borrow_mut().as_mut().and_then(|c| c.new.take()))
    }

    fn has_new(&self) -> bool {
        COLLECTING.with(|slot| slot.borrow().as_ref().is_some_and(|c| c.new.is_some()))
    }
}

impl Drop for Collecting {
    fn drop(&mut self) {
        let previous = self.previous.take();
        COLLECTING.with(|slot| slot.replace(previous));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Executor;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::sync::oneshot;

    fn on_this_thread() -> std::thread::ThreadId {
        std::thread::current().id()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_future_executed_outside_a_nest_is_spawned() {
        let (tx, rx) = oneshot::channel();
        Nesting.execute(async move {
            let _ = tx.send(());
        });
        rx.await.expect("the spawned future ran");
        assert!(COLLECTING.with(|s| s.borrow().is_none()));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn children_run_in_the_nest_and_the_nest_waits_for_them() {
        let (release_tx, release_rx) = oneshot::channel::<()>();
        let (seen_tx, seen_rx) = oneshot::channel();
        let nest = tokio::spawn(Nest::new(async move {
            let parent = on_this_thread();
            Nesting.execute(async move {
                release_rx.await.expect("released");
                let _ = seen_tx.send(on_this_thread() == parent);
            });
            // The nest's own future ends first; the child still waits.
        }));
        tokio::task::yield_now().await;
        assert!(!nest.is_finished(), "a nest ends only after its children");
        release_tx.send(()).expect("child alive");
        nest.await.expect("nest ran");
        assert!(seen_rx.await.expect("child reported"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_second_future_while_the_nest_has_a_child_is_spawned_on_its_own() {
        let (release_tx, release_rx) = oneshot::channel::<()>();
        let (second_tx, second_rx) = oneshot::channel();
        let nest = tokio::spawn(Nest::new(async move {
            Nesting.execute(async move {
                release_rx.await.expect("released");
            });
            Nesting.execute(async move {
                let _ = second_tx.send(());
            });
        }));
        // The second runs although the first child (and so the nest) is still waiting.
        second_rx.await.expect("the second future ran on its own");
        assert!(!nest.is_finished());
        release_tx.send(()).expect("first child alive");
        nest.await.expect("nest ran");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_childs_own_spawn_is_spawned_and_runs() {
        let ran = Arc::new(AtomicUsize::new(0));
        let (done_tx, done_rx) = oneshot::channel();
        let r = ran.clone();
        tokio::spawn(Nest::new(async move {
            Nesting.execute(async move {
                r.fetch_add(1, Ordering::SeqCst);
                Nesting.execute(async move {
                    r.fetch_add(1, Ordering::SeqCst);
                    let _ = done_tx.send(());
                });
            });
        }))
        .await
        .expect("nest ran");
        done_rx.await.expect("the grandchild ran");
        assert_eq!(ran.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_child_ends_alone() {
        let (tx, rx) = oneshot::channel::<()>();
        let (done_tx, done_rx) = oneshot::channel();
        let nest = tokio::spawn(Nest::new(async move {
            Nesting.execute(async { panic!("child panics") });
            rx.await.expect("released");
            let _ = done_tx.send(());
        }));
        tokio::task::yield_now().await;
        tx.send(()).expect("nest's own future is still running");
        nest.await.expect("the nest survives its child's panic");
        done_rx.await.expect("the nest's own future finished");
    }

    /// Counts how often the nest's task would have been woken.
    struct CountingWaker(AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_child_woken_during_the_nests_own_poll_runs_then_without_waking_the_task() {
        let child_waker: Arc<std::sync::Mutex<Option<Waker>>> = Arc::default();
        let child_polls = Arc::new(AtomicUsize::new(0));
        let (stored, polls) = (child_waker.clone(), child_polls.clone());
        let mut main_polls = 0;
        let main = std::future::poll_fn(move |_cx| {
            main_polls += 1;
            if main_polls == 1 {
                let (stored, polls) = (stored.clone(), polls.clone());
                Nesting.execute(std::future::poll_fn(move |cx| {
                    polls.fetch_add(1, Ordering::SeqCst);
                    *stored.lock().expect("lock") = Some(cx.waker().clone());
                    Poll::<()>::Pending
                }));
            } else if let Some(w) = stored.lock().expect("lock").take() {
                w.wake();
            }
            Poll::<()>::Pending
        });
        let task = Arc::new(CountingWaker(AtomicUsize::new(0)));
        let waker = Waker::from(task.clone());
        let mut cx = Context::from_waker(&waker);
        let mut nest = Nest::new(main);
        assert!(Pin::new(&mut nest).poll(&mut cx).is_pending());
        assert_eq!(
            child_polls.load(Ordering::SeqCst),
            1,
            "a new child is polled at once"
        );
        assert!(Pin::new(&mut nest).poll(&mut cx).is_pending());
        assert_eq!(
            child_polls.load(Ordering::SeqCst),
            2,
            "woken in the poll, run in it"
        );
        assert_eq!(task.0.load(Ordering::SeqCst), 0, "the task was not woken");
        child_waker
            .lock()
            .expect("lock")
            .take()
            .expect("child waiting")
            .wake();
        assert_eq!(
            task.0.load(Ordering::SeqCst),
            1,
            "a wake between polls wakes the task"
        );
        assert!(Pin::new(&mut nest).poll(&mut cx).is_pending());
        assert_eq!(child_polls.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn the_collecting_slot_is_restored_after_a_panicking_poll() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let joined =
            rt.block_on(async { tokio::spawn(Nest::new(async { panic!("main panics") })).await });
        assert!(joined.is_err());
        assert!(COLLECTING.with(|s| s.borrow().is_none()));
    }
}
