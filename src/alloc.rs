//! The daemon's allocator options (ARCHITECTURE.md, "The allocator: jemalloc").
//!
//! A library cannot choose the allocator of the programs that link it, so each program that
//! should allocate as the daemon does declares jemalloc itself and exports [`JEMALLOC_CONF`]
//! as jemalloc's `malloc_conf`: the daemon binary (`src/main.rs`) and the load test
//! (`tests/load.rs`, so that its memory bounds hold for what ships). The options live here once.

/// jemalloc's built-in options, NUL-terminated, read before `main`; `_RJEM_MALLOC_CONF` in the
/// environment is read after them, so an operator's setting wins.
/// - `background_thread:true`: one thread of jemalloc's own returns freed pages on the decay
///   schedule below even when no thread allocates (an idle daemon after a burst);
///   `max_background_threads:1`: one is enough for that (the default is one per CPU).
/// - `dirty_decay_ms:1000`: freed pages go back to the system within about a second.
/// - `muzzy_decay_ms:0`: and at once in full (`MADV_DONTNEED`), not as lazily freed pages
///   that still count in RSS until the kernel wants them.
pub const JEMALLOC_CONF: &[u8] =
    b"background_thread:true,max_background_threads:1,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

/// How long after memory is freed the daemon's allocator has given it back: the
/// `dirty_decay_ms` of [`JEMALLOC_CONF`] and a margin for the background thread's wake-up.
pub const GIVEN_BACK_AFTER: std::time::Duration = std::time::Duration::from_millis(1500);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_options_are_one_nul_terminated_string() {
        let (last, text) = JEMALLOC_CONF.split_last().unwrap();
        assert_eq!(*last, 0);
        assert!(!text.contains(&0));
        assert!(std::str::from_utf8(text)
            .unwrap()
            .contains("dirty_decay_ms:1000"));
    }
}
