//! Gives the memory that ended and parked connections freed back to the system.
//!
//! Why: glibc's malloc keeps freed chunks in its arenas for reuse and returns memory to the
//! system only from the top of a heap. A connection's buffers sit between other live
//! allocations, so after 1,000 tunnels are parked or closed their freed buffers stay resident:
//! RSS measured no lower after parking 1,000 used tunnels than before (56 MiB either way).
//! `malloc_trim(0)` releases the whole free pages inside freed chunks (`madvise`), which took
//! the same daemon from 59.6 to 50.3 MiB; without parking it released nothing (57.0 → 56.8).
//!
//! How: connections report what they free ([`note_freed`]: one ended or parked connection;
//! [`Moved`]: each [`LARGE_TRANSFER`] bytes one body moves count as [`MIN_FREED`]).
//! Once [`MIN_FREED`] were reported since the last trim, the trim is due. It runs when no
//! connection has ended or parked for [`QUIET`] (a burst of closes is over), or [`PERIOD`]
//! after it fell due if they never stop (steady churn), and at most once per [`MIN_GAP`]. It
//! runs on a blocking thread (the trim walks the arenas and takes their locks; it never runs
//! on a worker thread). A busy daemon that ends few connections never trims; an idle one
//! sleeps until one is due (no timer ticks). Elsewhere than glibc the trim is a no-op.
//!
//! Why not a fixed period: RSS read after a burst of connections closed then depended on
//! where the reading fell in the period (10 rounds of 1,000 connections read 30 … 45 MiB with
//! a 10 s period; `benches/records/2026-12-03-session15-workers.md`). An operator looking at a
//! host after a burst sees the memory back within a fraction of a second.
//!
//! The same allocator is also told, once at start, to keep no fast bins ([`tune_allocator`]).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio::time::Instant;

/// How long no connection may end or park before a due trim runs.
pub const QUIET: Duration = Duration::from_millis(250);

/// The longest a due trim waits for [`QUIET`], counted from when the trim task takes the
/// signal up (up to [`MIN_GAP`] after it was given, when it came during the previous trim).
pub const PERIOD: Duration = Duration::from_secs(10);

/// The shortest time between two trims.
pub const MIN_GAP: Duration = Duration::from_secs(1);

/// Ended or parked connections since the last trim that make a trim worth its cost.
pub const MIN_FREED: usize = 64;

/// The daemon's one trim state: every connection reports to it, [`run`] drives it.
static TRIMS: Trims = Trims::new();

/// Records that a connection ended or was parked (its buffers were freed).
pub fn note_freed() {
    TRIMS.note(1);
}

/// Every this many bytes a body moves make a trim due by themselves: the buffers of a large
/// streamed body are freed one by one between other allocations, and after two 256 MiB
/// downloads RSS stayed 7 MiB above what a trim gave back for as long as no 64 connections
/// ended (outside pass h38c: 105 s and counting). Counted as the body goes, in the body
/// ([`Moved`]): the request's audit line, read first, is written at an answer's head, before
/// a streamed body moved anything (re-check h38g: downloads never counted).
pub const LARGE_TRANSFER: u64 = 8 * 1024 * 1024;

/// A body's byte tally: the byte metric as ever, and every [`LARGE_TRANSFER`] bytes of this
/// one body count as [`MIN_FREED`] freed connections. During a long transfer the trim waits
/// for it to pause ([`QUIET`]) or for [`PERIOD`].
pub struct Moved {
    counter: prometheus_client::metrics::counter::Counter,
    moved: std::sync::atomic::AtomicU64,
    trims: &'static Trims,
}

impl Moved {
    /// A tally adding to `counter`.
    pub fn new(counter: prometheus_client::metrics::counter::Counter) -> Self {
        Moved {
            counter,
            moved: std::sync::atomic::AtomicU64::new(0),
            trims: &TRIMS,
        }
    }
}

impl crate::metrics::Tally for Moved {
    fn add(&self, n: usize) {
        self.counter.inc_by(n as u64);
        let before = self.moved.fetch_add(n as u64, Ordering::Relaxed);
        if before / LARGE_TRANSFER != (before + n as u64) / LARGE_TRANSFER {
            self.trims.note(MIN_FREED);
        }
    }
}

/// Runs the trim loop until `shutdown` changes.
pub async fn run(shutdown: watch::Receiver<bool>) {
    TRIMS.run(shutdown, trim).await;
}

/// What the trim loop counts and waits on; a type so a test can drive its own.
struct Trims {
    /// Connections that ended or parked since the last trim.
    freed: AtomicUsize,
    /// Signalled once per trim cycle, by the report that makes `freed` reach [`MIN_FREED`].
    /// `Notify` keeps the signal when nobody waits, so a report during a trim is not lost.
    due: Notify,
}

impl Trims {
    const fn new() -> Self {
        Trims {
            freed: AtomicUsize::new(0),
            due: Notify::const_new(),
        }
    }

    /// Counts `n` freed connections (or their worth); the report that takes the count to
    /// [`MIN_FREED`] or past it signals the trim.
    fn note(&self, n: usize) {
        let before = self.freed.fetch_add(n, Ordering::Relaxed);
        if before < MIN_FREED && before + n >= MIN_FREED {
            self.due.notify_one();
        }
    }

    /// Calls `trim` on a blocking thread each time one is due (see the module doc), until
    /// `shutdown` changes.
    async fn run(&self, mut shutdown: watch::Receiver<bool>, trim: fn() -> Duration) {
        loop {
            let cycle = async {
                self.due.notified().await;
                settle(&self.freed, QUIET, PERIOD).await;
            };
            tokio::select! {
                () = cycle => {}
                _ = shutdown.changed() => return,
            }
            // Reports from now on count towards the next trim; the count restarts below
            // MIN_FREED, so the report that reaches it again signals `due` again.
            self.freed.store(0, Ordering::Relaxed);
            let took = tokio::task::spawn_blocking(trim).await;
            tracing::debug!(?took, "returned freed memory to the system");
            tokio::select! {
                () = tokio::time::sleep(MIN_GAP) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// Returns once `count` did not change for `quiet`, or `cap` after the call.
async fn settle(count: &AtomicUsize, quiet: Duration, cap: Duration) {
    let deadline = Instant::now() + cap;
    let mut seen = count.load(Ordering::Relaxed);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        tokio::time::sleep(quiet.min(left)).await;
        let now = count.load(Ordering::Relaxed);
        if now == seen {
            return;
        }
        seen = now;
    }
}

/// Turns glibc's fast bins off (`mallopt(M_MXFAST, 0)`); call once, before threads start.
/// Returns false where there is nothing to tune (not glibc) or glibc refused.
///
/// Why: glibc consolidates every fast-bin chunk of an arena before each allocation of 1 KiB or
/// more whenever any are waiting (`malloc_consolidate`), and this daemon's requests mix many
/// small frees with large buffers (TLS records, 16 KiB bodies, hyper's read buffers). Small
/// frees still go to the per-thread cache first (tcache), so fast bins bought little. Measured
/// (`benches/records/2026-12-03-allocator.md`, five in-run A/B runs on a noisy VM): the 16 KiB
/// POST row used 3–8 % less CPU per request in four runs of five (10 of 15 samples), the other
/// rows moved within their noise, and idle-tunnel memory did not change (19–20 KiB per used
/// idle tunnel; rounds flat). An operator's `GLIBC_TUNABLES=glibc.malloc.mxfast=…` is
/// overridden.
pub fn tune_allocator() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets glibc's own allocator parameters; M_MXFAST = 0 is documented
    // (malloc(3)) and takes effect for later frees.
    unsafe {
        libc::mallopt(libc::M_MXFAST, 0) == 1
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    false
}

/// One trim; returns how long it took.
fn trim() -> Duration {
    let start = std::time::Instant::now();
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks and releases glibc's own free lists; it takes the arena
    // locks itself and is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
    start.elapsed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glibc_takes_the_allocator_setting() {
        assert_eq!(
            tune_allocator(),
            cfg!(all(target_os = "linux", target_env = "gnu"))
        );
    }

    /// Adds one to `count` every `every`, `times` times (tokio time, so paused tests are exact).
    fn tick(count: &std::sync::Arc<AtomicUsize>, every: Duration, times: usize) {
        let count = count.clone();
        tokio::spawn(async move {
            for _ in 0..times {
                tokio::time::sleep(every).await;
                count.fetch_add(1, Ordering::Relaxed);
            }
        });
    }

    #[tokio::test(start_paused = true)]
    async fn a_due_trim_waits_until_the_ends_stop() {
        let count = std::sync::Arc::new(AtomicUsize::new(0));
        tick(&count, Duration::from_millis(10), 30);
        let start = Instant::now();
        settle(&count, Duration::from_millis(60), Duration::from_secs(5)).await;
        let waited = start.elapsed();
        assert_eq!(
            count.load(Ordering::Relaxed),
            30,
            "returned while ends went on"
        );
        // The last end is at 300 ms. Looks come every 60 ms, and one that coincides with
        // the last end may see it or not: the first whole quiet interval after it ends at
        // 360 or 420 ms.
        assert!(waited >= Duration::from_millis(360), "{waited:?}");
        assert!(waited <= Duration::from_millis(420), "{waited:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn ends_that_never_stop_trim_at_the_cap() {
        let count = std::sync::Arc::new(AtomicUsize::new(0));
        tick(&count, Duration::from_millis(5), usize::MAX);
        let start = Instant::now();
        settle(
            &count,
            Duration::from_millis(50),
            Duration::from_millis(420),
        )
        .await;
        assert_eq!(start.elapsed(), Duration::from_millis(420));
    }

    #[tokio::test(start_paused = true)]
    async fn no_ends_at_all_return_after_one_quiet_interval() {
        let count = AtomicUsize::new(7);
        let start = Instant::now();
        settle(&count, Duration::from_millis(250), Duration::from_secs(10)).await;
        assert_eq!(start.elapsed(), Duration::from_millis(250));
    }

    /// Trims done by [`counting_trim`] (only the test below uses it).
    static TRIMMED: AtomicUsize = AtomicUsize::new(0);

    fn counting_trim() -> Duration {
        TRIMMED.fetch_add(1, Ordering::SeqCst);
        Duration::ZERO
    }

    /// Waits (real time, at most 5 s) for the blocking thread to have trimmed `n` times.
    fn trimmed(n: usize) -> bool {
        for _ in 0..5000 {
            if TRIMMED.load(Ordering::SeqCst) >= n {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    /// The loop as a whole: no trim below MIN_FREED, one after QUIET once due, none sooner
    /// than MIN_GAP after the last even when due again during it (the signal is kept), and
    /// an end on shutdown.
    #[tokio::test(start_paused = true)]
    async fn the_loop_trims_once_due_and_quiet_and_no_more_than_once_per_gap() {
        let trims: &'static Trims = Box::leak(Box::new(Trims::new()));
        let (stop, shutdown) = watch::channel(false);
        let task = tokio::spawn(trims.run(shutdown, counting_trim));
        let report = |n: usize| (0..n).for_each(|_| trims.note(1));

        report(MIN_FREED - 1);
        tokio::time::sleep(PERIOD * 2).await;
        assert_eq!(TRIMMED.load(Ordering::SeqCst), 0, "trimmed below MIN_FREED");

        report(1);
        tokio::time::sleep(QUIET - Duration::from_millis(10)).await;
        assert_eq!(TRIMMED.load(Ordering::SeqCst), 0, "trimmed before QUIET");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(trimmed(1), "no trim once due and quiet");

        // Due again at once, during the gap: kept, but not trimmed before the gap is over.
        report(MIN_FREED);
        tokio::time::sleep(MIN_GAP / 2).await;
        assert_eq!(TRIMMED.load(Ordering::SeqCst), 1, "trimmed within MIN_GAP");
        tokio::time::sleep(MIN_GAP / 2 + QUIET + Duration::from_millis(20)).await;
        assert!(trimmed(2), "the signal given during the gap was lost");

        // One large transfer is worth MIN_FREED reports by itself.
        tokio::time::sleep(MIN_GAP).await;
        trims.note(MIN_FREED);
        tokio::time::sleep(QUIET + Duration::from_millis(20)).await;
        assert!(trimmed(3), "a large transfer alone did not make a trim due");

        stop.send(true).expect("the loop listens");
        tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .expect("the loop ends on shutdown")
            .expect("no panic");
        assert_eq!(TRIMMED.load(Ordering::SeqCst), 3);
    }

    /// A body counts toward the trim as it goes: each LARGE_TRANSFER bytes of it, once.
    #[test]
    fn a_large_body_makes_a_trim_due_as_it_goes() {
        use crate::metrics::Tally;
        let counter = prometheus_client::metrics::counter::Counter::default();
        let trims: &'static Trims = Box::leak(Box::new(Trims::new()));
        let body = Moved {
            trims,
            ..Moved::new(counter.clone())
        };
        let freed = || trims.freed.load(Ordering::Relaxed);
        let chunk = 64 * 1024;
        let before = freed();
        for _ in 0..(LARGE_TRANSFER as usize / chunk) - 1 {
            body.add(chunk);
        }
        assert!(
            freed() < before + MIN_FREED,
            "made due before {LARGE_TRANSFER} bytes"
        );
        body.add(chunk);
        assert!(
            freed() >= before + MIN_FREED,
            "not made due at {LARGE_TRANSFER} bytes"
        );
        assert_eq!(
            counter.get(),
            LARGE_TRANSFER,
            "the metric counts every byte"
        );
    }

    #[test]
    fn a_trim_runs_and_returns() {
        let v: Vec<Vec<u8>> = (0..64).map(|_| vec![1u8; 64 * 1024]).collect();
        drop(v);
        assert!(trim() < Duration::from_secs(5));
    }
}
