//! Crash injection for the master-key rotation tests (cargo feature `crash-points`).
//!
//! Invariant: without the feature, [`hit`] is an empty inline function and neither the
//! environment variable's name nor any abort path is compiled into the binary, so a
//! production build cannot be made to abort by its environment. The integration tests that
//! abort a rotation at each step run only when the crate is built with
//! `--features crash-points` (as `scripts/test` does).

/// Environment variable naming a rotation step at which the process aborts.
#[cfg(feature = "crash-points")]
pub const ENV: &str = "SEALGATE_TEST_CRASH_AFTER";

/// When `SEALGATE_TEST_CRASH_AFTER` equals `step`, abort the process right here, as a kill -9
/// would (no destructors, no rollback, no flush). Steps, in order: `staged`,
/// `resealed_secrets`, `resealed_sandboxes`, `wrote_key_check`, `committed`, `renamed`.
/// Only rotation code calls this; the variable has no other effect.
#[cfg(feature = "crash-points")]
pub fn hit(step: &str) {
    if std::env::var_os(ENV).is_some_and(|v| v == step) {
        eprintln!("sealgate: {ENV}={step}: aborting (test hook)");
        std::process::abort();
    }
}

/// Without the `crash-points` feature a crash point does nothing.
#[cfg(not(feature = "crash-points"))]
#[inline(always)]
pub fn hit(_step: &str) {}
