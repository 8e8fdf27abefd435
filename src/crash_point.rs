//! Crash and pause injection for the tests (cargo feature `crash-points`): crashes for the
//! master-key rotation tests, a pause for the signal tests.
//!
//! Invariant: without the feature, [`hit`] and [`pause`] are empty inline functions and
//! neither the environment variables' names nor any abort or sleep path is compiled into the
//! binary, so a production build cannot be made to abort or stall by its environment. The integration tests that
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

/// Environment variable naming a start-up point at which the daemon sleeps for 2 s.
#[cfg(feature = "crash-points")]
pub const PAUSE_ENV: &str = "SEALGATE_TEST_PAUSE_AFTER";

/// When `SEALGATE_TEST_PAUSE_AFTER` equals `point`, say so on stderr and block the calling
/// thread for 2 s: a window in which a test signals the daemon. Points: `main` (the first
/// statements of `main`, before the configuration is read).
#[cfg(feature = "crash-points")]
pub fn pause(point: &str) {
    if std::env::var_os(PAUSE_ENV).is_some_and(|v| v == point) {
        eprintln!("sealgate: {PAUSE_ENV}={point}: pausing 2 s (test hook)");
        std::thread::sleep(std::time::Duration::from_secs(2));
    }
}

/// Without the `crash-points` feature a pause point does nothing.
#[cfg(not(feature = "crash-points"))]
#[inline(always)]
pub fn pause(_point: &str) {}
