//! The store check behind `GET /readyz`, shared by every probe.
//!
//! Invariants:
//! - At most one check runs at a time, on a task of its own: a probe that goes away (closed,
//!   or its connection evicted) leaves nothing behind, and waiting probes wait on the one
//!   check, not on threads of the blocking pool. Before, each probe ran its own check on the
//!   blocking pool and a dropped probe left it running: with PostgreSQL slow or away, probes
//!   could pile checks (up to 5 s each) onto the pool that sandbox creation, deletion and
//!   expiry use, and hold the database's connections (a review).
//! - A result answers every probe for [`FRESH_FOR`] after its check ended.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::store::{Store, StoreError};

/// How long a check's result answers probes.
pub const FRESH_FOR: Duration = Duration::from_secs(1);

/// How long a probe waits for the check: past it the probe is answered "not ready" and the
/// check goes on for the next ones. A probe had waited for the store's whole 5 s timeout
/// while the database stalled, longer than most probes' own timeouts (found from outside).
pub const PROBE_WAIT: Duration = Duration::from_secs(2);

/// A check's result: the store's error as text (shown only to the admin token's holders).
pub type Outcome = Result<(), String>;

/// The shared check (see the module docs).
#[derive(Default)]
pub struct ReadyCheck {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Default)]
struct Inner {
    last: Option<(Instant, Outcome)>,
    /// The check in progress: its result arrives here.
    running: Option<watch::Receiver<Option<Outcome>>>,
}

impl ReadyCheck {
    /// The store's state: a fresh result, or that of the check running now (started here if
    /// none is).
    pub async fn check(&self, store: &Arc<dyn Store>) -> Outcome {
        let store = store.clone();
        self.check_with(move || store.check()).await
    }

    /// [`ReadyCheck::check`] with `check` in place of the store's.
    async fn check_with<F>(&self, check: F) -> Outcome
    where
        F: FnOnce() -> Result<(), StoreError> + Send + 'static,
    {
        let mut rx = {
            let mut inner = lock(&self.inner);
            if let Some((at, outcome)) = &inner.last {
                if at.elapsed() < FRESH_FOR {
                    return outcome.clone();
                }
            }
            match &inner.running {
                // (a run whose task is gone, at shutdown, is replaced)
                Some(rx) if rx.has_changed().is_ok() => rx.clone(),
                _ => {
                    let rx = start(self.inner.clone(), check);
                    inner.running = Some(rx.clone());
                    rx
                }
            }
        };
        let outcome = match tokio::time::timeout(PROBE_WAIT, rx.wait_for(Option::is_some)).await {
            Ok(Ok(outcome)) => outcome.clone(),
            Ok(Err(_)) => None,
            Err(_) => {
                return Err(format!(
                    "the store check has not answered within {} s (it goes on)",
                    PROBE_WAIT.as_secs()
                ))
            }
        };
        outcome.unwrap_or_else(|| Err("the store check ended without a result".into()))
    }
}

/// Spawns one check; its task records the result, ends the run and tells the waiters.
fn start<F>(inner: Arc<Mutex<Inner>>, check: F) -> watch::Receiver<Option<Outcome>>
where
    F: FnOnce() -> Result<(), StoreError> + Send + 'static,
{
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        let outcome = tokio::task::spawn_blocking(check)
            .await
            .unwrap_or_else(|_| Err(StoreError::Unavailable("check panicked".into())))
            .map_err(|e| e.to_string());
        {
            let mut inner = lock(&inner);
            inner.last = Some((Instant::now(), outcome.clone()));
            inner.running = None;
        }
        let _ = tx.send(Some(outcome));
    });
    rx
}

fn lock(inner: &Mutex<Inner>) -> std::sync::MutexGuard<'_, Inner> {
    inner.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn slow_check(runs: &Arc<AtomicUsize>) -> impl FnOnce() -> Result<(), StoreError> {
        let runs = runs.clone();
        move || {
            runs.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(200));
            Err(StoreError::Unavailable("database away".into()))
        }
    }

    /// Forty probes, half of them dropped while they wait: one check runs, every probe that
    /// waits gets its result, and the result answers for `FRESH_FOR`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn probes_share_one_check_and_dropped_probes_leave_none_behind() {
        let ready = Arc::new(ReadyCheck::default());
        let runs = Arc::new(AtomicUsize::new(0));
        let mut probes = Vec::new();
        for i in 0..40 {
            let (ready, check) = (ready.clone(), slow_check(&runs));
            let probe = tokio::spawn(async move { ready.check_with(check).await });
            if i % 2 == 0 {
                probe.abort();
            } else {
                probes.push(probe);
            }
        }
        for probe in probes {
            let outcome = probe.await.unwrap();
            assert_eq!(outcome.unwrap_err(), "store unavailable: database away");
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert!(ready.check_with(slow_check(&runs)).await.is_err());
        assert_eq!(runs.load(Ordering::SeqCst), 1, "fresh: no second check");
        tokio::time::sleep(FRESH_FOR).await;
        assert!(ready.check_with(slow_check(&runs)).await.is_err());
        assert_eq!(runs.load(Ordering::SeqCst), 2);
    }

    /// A check that hangs answers the probe "not ready" after `PROBE_WAIT`, not after the
    /// store's own timeout; the check goes on, and its result answers the probes after it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_probe_waits_for_a_hanging_check_at_most_probe_wait() {
        let ready = ReadyCheck::default();
        let hanging = || {
            std::thread::sleep(PROBE_WAIT + Duration::from_secs(3));
            Ok(())
        };
        let started = Instant::now();
        let outcome = ready.check_with(hanging).await;
        let took = started.elapsed();
        assert!(outcome.unwrap_err().contains("has not answered"));
        assert!(
            took >= PROBE_WAIT && took < PROBE_WAIT + Duration::from_secs(2),
            "{took:?}"
        );
        // The hung check's result answers once it comes (no second check runs meanwhile).
        let deadline = Instant::now() + Duration::from_secs(10);
        while ready
            .check_with(|| Err(StoreError::Unavailable("a second check".into())))
            .await
            != Ok(())
        {
            assert!(Instant::now() < deadline, "the hung check never answered");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
