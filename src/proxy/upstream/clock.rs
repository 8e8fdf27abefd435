//! One clock for the times upstream connections keep in atomics (`keep_alive`'s retirement,
//! `live_h2`'s last stream): milliseconds since a process-wide instant.

use std::sync::OnceLock;
use std::time::Instant;

/// The instant the clock counts from (its first use).
pub fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

/// `at` in milliseconds since [`base`]: 0 before it, at most `u64::MAX - 1` (so `u64::MAX`
/// can mean "never").
pub fn ms_since_base(at: Instant) -> u64 {
    let ms = at.saturating_duration_since(base()).as_millis();
    u64::try_from(ms).unwrap_or(u64::MAX - 1).min(u64::MAX - 1)
}
