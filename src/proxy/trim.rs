//! Gives the memory that ended and parked connections freed back to the system.
//!
//! Why: glibc's malloc keeps freed chunks in its arenas for reuse and returns memory to the
//! system only from the top of a heap. A connection's buffers sit between other live
//! allocations, so after 1,000 tunnels are parked or closed their freed buffers stay resident:
//! RSS measured no lower after parking 1,000 used tunnels than before (56 MiB either way).
//! `malloc_trim(0)` releases the whole free pages inside freed chunks (`madvise`), which took
//! the same daemon from 59.6 to 50.3 MiB; without parking it released nothing (57.0 → 56.8).
//!
//! How: connections report what they free ([`note_freed`]: one ended or parked connection);
//! a task wakes every [`PERIOD`] and, when at least [`MIN_FREED`] were reported since its last
//! pass, trims on a blocking thread (the trim walks the arenas and takes their locks; it
//! never runs on a worker thread). A busy daemon that ends few connections never trims.
//! Elsewhere than glibc this is a no-op.
//!
//! The same allocator is also told, once at start, to keep no fast bins ([`tune_allocator`]).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::watch;

/// How often the trim task looks at the count.
pub const PERIOD: Duration = Duration::from_secs(10);

/// Ended or parked connections since the last trim that make a trim worth its cost.
pub const MIN_FREED: usize = 64;

static FREED: AtomicUsize = AtomicUsize::new(0);

/// Records that a connection ended or was parked (its buffers were freed).
pub fn note_freed() {
    FREED.fetch_add(1, Ordering::Relaxed);
}

/// Runs the trim loop until `shutdown` changes.
pub async fn run(mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(PERIOD) => {}
            _ = shutdown.changed() => return,
        }
        // Zeroed in the same step as the check, so no count reported meanwhile is lost.
        let due = FREED.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
            (n >= MIN_FREED).then_some(0)
        });
        if due.is_err() {
            continue;
        }
        let took = tokio::task::spawn_blocking(trim).await;
        tracing::debug!(?took, "returned freed memory to the system");
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

    #[test]
    fn a_trim_runs_and_returns() {
        let v: Vec<Vec<u8>> = (0..64).map(|_| vec![1u8; 64 * 1024]).collect();
        drop(v);
        assert!(trim() < Duration::from_secs(5));
    }
}
