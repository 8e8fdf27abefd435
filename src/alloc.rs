//! The daemon's allocator options (ARCHITECTURE.md, "The allocator: jemalloc").
//!
//! A library cannot choose the allocator of the programs that link it, so each program that
//! should allocate as the daemon does declares jemalloc itself and exports [`JEMALLOC_CONF`]
//! as jemalloc's `malloc_conf`: the daemon binary (`src/main.rs`) and the load test
//! (`tests/load.rs`, so that its memory bounds hold for what ships). The options live here once.
//! The binary also says so ([`declare_jemalloc`]), and the start summary then shows the options
//! in effect, read back from jemalloc ([`describe`]): `_RJEM_MALLOC_CONF` can change them, and
//! jemalloc ignores a malformed one with only a warning of its own on stderr.

use std::ffi::CStr;
use std::sync::atomic::{AtomicBool, Ordering};

/// jemalloc's built-in options, NUL-terminated, read before `main`; `_RJEM_MALLOC_CONF` in the
/// environment is read after them, so an operator's setting wins.
/// - `background_thread:true`: one thread of jemalloc's own returns freed pages on the decay
///   schedule below even when no thread allocates (an idle daemon after a burst);
///   `max_background_threads:1`: one is enough for that (the default is one per CPU).
/// - `dirty_decay_ms:1000`: freed pages go back to the system over the next second or two
///   (measured from outside: the last step 1.5–2.1 s after 1,000 connections closed).
/// - `muzzy_decay_ms:0`: and at once in full (`MADV_DONTNEED`), not as lazily freed pages
///   that still count in RSS until the kernel wants them.
pub const JEMALLOC_CONF: &[u8] =
    b"background_thread:true,max_background_threads:1,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

/// How long after memory is freed the daemon's allocator has given it back: the
/// `dirty_decay_ms` of [`JEMALLOC_CONF`] and a margin for the background thread's wake-ups
/// (the last step came 1.5–2.1 s after a burst of closes, outside pass h40a).
pub const GIVEN_BACK_AFTER: std::time::Duration = std::time::Duration::from_millis(2500);

/// Set by a program whose global allocator is jemalloc with [`JEMALLOC_CONF`].
static JEMALLOC: AtomicBool = AtomicBool::new(false);

/// Records that this program allocates with jemalloc (call first thing in `main`).
pub fn declare_jemalloc() {
    JEMALLOC.store(true, Ordering::Relaxed);
}

/// The allocator and the options in effect, for the start summary's `allocator:` line.
pub fn describe() -> String {
    if !JEMALLOC.load(Ordering::Relaxed) {
        return "the system's malloc".to_owned();
    }
    let thread = match read::<u8>(c"background_thread") {
        Some(0) => "OFF (memory freed is given back only as the daemon allocates)",
        Some(_) => "on",
        None => "?",
    };
    let ms = |name| read::<isize>(name).map_or("?".to_owned(), |v| v.to_string());
    let from = match std::env::var_os("_RJEM_MALLOC_CONF") {
        Some(_) => "built in, then _RJEM_MALLOC_CONF",
        None => "built in",
    };
    format!(
        "jemalloc, background thread {thread}, dirty_decay_ms {}, muzzy_decay_ms {} ({from})",
        ms(c"opt.dirty_decay_ms"),
        ms(c"opt.muzzy_decay_ms"),
    )
}

/// An integer of jemalloc's by its `mallctl` name (a C `bool` is read as `u8`); None if
/// jemalloc does not know the name or its size is not `T`'s.
fn read<T: Int>(name: &CStr) -> Option<T> {
    let mut value = T::default();
    let mut len = std::mem::size_of::<T>();
    // SAFETY: `mallctl` writes at most `len` bytes to `value`, a `T` of that size, and sets no
    // new value. T is a plain integer, so any bytes it writes (even of a value of another
    // size, which it reports as EINVAL) are a valid T.
    let rc = unsafe {
        tikv_jemalloc_sys::mallctl(
            name.as_ptr(),
            (&raw mut value).cast(),
            &mut len,
            std::ptr::null_mut(),
            0,
        )
    };
    (rc == 0 && len == std::mem::size_of::<T>()).then_some(value)
}

/// The integer types [`read`] may fill: every bit pattern of them is a valid value.
trait Int: Copy + Default {}
impl Int for u8 {}
impl Int for isize {}

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

    #[test]
    fn jemalloc_answers_the_names_the_summary_reads() {
        assert!(read::<u8>(c"background_thread").is_some());
        assert!(read::<isize>(c"opt.dirty_decay_ms").is_some());
        assert!(read::<isize>(c"opt.muzzy_decay_ms").is_some());
        assert_eq!(read::<isize>(c"no.such.name"), None);
    }
}
