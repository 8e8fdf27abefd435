//! The proxy's worker threads: one single-threaded tokio runtime per thread, each accepting on
//! its own descriptor of every proxy listener and running the connections placed on it to
//! their end.
//!
//! A connection never leaves the worker it was placed on: its TLS, its requests, its CONNECT
//! tunnel and the upstream connections it dials (hyper's connection tasks are spawned where
//! the request runs) are all polled by that one thread. On the multi-thread runtime the same
//! connection's client side, upstream side and the I/O driver were picked up by whichever
//! worker woke first, so most hand-offs between them crossed threads (a futex wake and a cold
//! cache each); see ARCHITECTURE.md, "Proxy worker threads", for the measurement.
//!
//! Balance: every worker waits on every listener; the kernel wakes the waiting workers and
//! one `accept` wins, and the accepting worker then hands the connection to a worker with
//! clearly fewer open connections, if there is one ([`super::ProxyState::spawn_accepted`]).
//! A connection is not moved once it runs. Each worker has upstream clients of its own
//! ([`super::LiveSettings::clients`], picked by [`current`]), so the pooled upstream connection
//! a request reuses was dialled, and is driven, by the same thread.
//!
//! Invariants:
//! - Every worker's accept loop ends when shutdown begins ([`Workers::accepting_ended`]);
//!   connections already accepted keep running on their worker.
//! - A worker's runtime, with every connection still on it, is dropped at [`Workers::stop`] or
//!   when [`Workers`] is dropped: their sockets close then, and so do the workers' listener
//!   descriptors.
//! - With `[proxy] busy_poll_us` above zero, a worker that runs out of work shortly after its
//!   clients moved bytes polls its driver before it parks ([`super::spin`]); it never polls
//!   while it has work, and it parks once the window has passed.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::spin::Spinner;
use super::{run_listener, ListenerKind, Placement, ProxyState};

/// How long a stopping worker waits for its blocking tasks (name lookups through
/// `getaddrinfo`) before it lets them finish on their own.
const BLOCKING_GRACE: Duration = Duration::from_secs(1);

/// The blocking threads of all workers together (tokio's default for one runtime): each
/// worker gets its share, so slow name lookups cannot hold more threads than before.
const MAX_BLOCKING_THREADS: usize = 512;

/// The running workers.
pub struct Workers {
    threads: Vec<std::thread::JoinHandle<()>>,
    stop: CancellationToken,
    accepting: TaskTracker,
    /// `[proxy] busy_poll_us` as the workers started with it (zero: off).
    busy_poll: Duration,
}

/// The number of workers for `[proxy] worker_threads`: 0 means `TOKIO_WORKER_THREADS` if it
/// is set (as for the admin runtime), else one per core.
pub fn count(configured: usize) -> usize {
    if configured > 0 {
        return configured;
    }
    std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|n| (1..=1024).contains(n))
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

impl Workers {
    /// Starts `n` workers, each accepting on its own duplicate of every listener.
    ///
    /// # Errors
    /// A runtime, thread or descriptor that could not be made; the workers started before it
    /// are stopped.
    pub fn start(
        state: &Arc<ProxyState>,
        listeners: &[(std::net::TcpListener, ListenerKind)],
        n: usize,
        busy_poll: Duration,
    ) -> io::Result<Workers> {
        let n = n.max(1);
        let mut workers = Workers {
            threads: Vec::with_capacity(n),
            stop: CancellationToken::new(),
            accepting: TaskTracker::new(),
            busy_poll,
        };
        let handles = (0..n)
            .map(|i| {
                let spin = Spinner::new(busy_poll, state.metrics.busy_poll_seconds.clone());
                workers.start_one(i, n, state, listeners, spin)
            })
            .collect::<io::Result<Vec<_>>>()?;
        state.set_workers(handles);
        Ok(workers)
    }

    /// Starts worker `i` of `n`: its runtime (busy-polling if `spin`), its accept loops, its
    /// thread; returns the runtime's handle.
    fn start_one(
        &mut self,
        i: usize,
        n: usize,
        state: &Arc<ProxyState>,
        listeners: &[(std::net::TcpListener, ListenerKind)],
        spin: Option<Spinner>,
    ) -> io::Result<tokio::runtime::Handle> {
        let mut builder = tokio::runtime::Builder::new_current_thread();
        builder
            .max_blocking_threads((MAX_BLOCKING_THREADS / n).max(1))
            .enable_all();
        if let Some(s) = spin.clone() {
            builder.on_thread_park(move || s.before_park());
        }
        // Owned at once: an error below drops it inside the daemon's runtime.
        let rt = Owned(Some(builder.build()?));
        let handle = rt.0.as_ref().expect("just built").handle().clone();
        if let Some(s) = spin {
            handle.spawn(s.run());
        }
        let own = {
            let _in_rt = handle.enter();
            listeners
                .iter()
                .map(|(l, kind)| Ok((TcpListener::from_std(l.try_clone()?)?, *kind)))
                .collect::<io::Result<Vec<_>>>()?
        };
        // Spawned here, before the thread runs them, so `accepting_ended` cannot miss one.
        for (listener, kind) in own {
            let accept = run_listener(state.clone(), listener, kind, Placement::Balanced);
            self.accepting.spawn_on(accept, &handle);
        }
        let stop = self.stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("sealgate-proxy-{i}"))
            .spawn(move || run(i, rt, stop))?;
        self.threads.push(thread);
        Ok(handle)
    }

    /// How many workers run.
    pub fn len(&self) -> usize {
        self.threads.len()
    }

    /// The longest busy-poll window of each worker (zero: off; see [`super::spin`]).
    pub fn busy_poll(&self) -> Duration {
        self.busy_poll
    }

    /// Always false: [`Workers::start`] starts at least one.
    pub fn is_empty(&self) -> bool {
        self.threads.is_empty()
    }

    /// Resolves once every worker's accept loops have returned (after shutdown began): no
    /// connection is accepted after this.
    pub async fn accepting_ended(&self) {
        self.accepting.close();
        self.accepting.wait().await;
    }

    /// Stops every worker, closing the connections still on it, and waits for the threads.
    pub fn stop(mut self) {
        self.stop.cancel();
        for t in std::mem::take(&mut self.threads) {
            let _ = t.join();
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

thread_local! {
    /// The index of the worker this thread is (0 on every other thread).
    static CURRENT: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The index of the worker running the caller (0 off the workers).
pub fn current() -> usize {
    CURRENT.with(std::cell::Cell::get)
}

/// A worker's runtime on its way to its thread. If the thread cannot be started, it is dropped
/// where `start` runs, inside the daemon's runtime, where dropping a runtime the usual way
/// (waiting for its tasks) would panic; it is shut down in the background instead.
struct Owned(Option<tokio::runtime::Runtime>);

impl Drop for Owned {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// Worker `index`'s thread: runs its accept loops, and every connection they start, until
/// `stop`.
fn run(index: usize, mut rt: Owned, stop: CancellationToken) {
    CURRENT.with(|c| c.set(index));
    let rt = rt.0.take().expect("a worker gets its runtime once");
    rt.block_on(stop.cancelled());
    rt.shutdown_timeout(BLOCKING_GRACE);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_means_one_per_core() {
        assert_eq!(count(3), 3);
        assert!(count(0) >= 1);
    }
}
