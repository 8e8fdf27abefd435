//! The memory budget of request bodies read whole past `forward::BUFFER_BODY_MAX` (up to
//! `forward::WHOLE_BODY_MAX`), so that they keep an exact `Content-Length`.
//!
//! Invariant: the announced lengths of all such bodies held at once, across every sandbox,
//! never exceed [`BUDGET`]. A body that does not fit streams instead (without a length, as
//! every larger body does): the budget decides how a body is framed, it never refuses one.
//! Without it, one sandbox's 256 requests in flight could pin 256 MiB.

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

/// The most announced bytes held at once (see the module invariant).
pub const BUDGET: u64 = 64 * 1024 * 1024;

/// Bytes reserved now.
static RESERVED: AtomicU64 = AtomicU64::new(0);

/// A reservation of `n` announced bytes, given back when dropped (by the held body's last
/// copy, see [`Reserved::holding`]). Zero for bodies within `BUFFER_BODY_MAX`, which are
/// always read whole.
#[derive(Debug)]
pub struct Reserved(u64);

impl Reserved {
    /// No reservation (a body always read whole).
    pub fn none() -> Reserved {
        Reserved(0)
    }

    /// Reserves `n` bytes if the budget has room for them.
    pub fn take(n: u64) -> Option<Reserved> {
        // Lazily: a reservation made and dropped would give back bytes it never took.
        add(n).then(|| Reserved(n))
    }

    /// Grows this reservation to `n` bytes if the budget has room (true), or leaves it as it
    /// is (false). A reservation of `n` or more already is left as it is.
    pub fn grow_to(&mut self, n: u64) -> bool {
        let Some(more) = n.checked_sub(self.0).filter(|more| *more > 0) else {
            return true;
        };
        if !add(more) {
            return false;
        }
        self.0 += more;
        true
    }

    /// The bytes reserved.
    pub fn bytes(&self) -> u64 {
        self.0
    }

    /// `body`, keeping this reservation until its last clone is dropped (retries clone it).
    pub fn holding(self, body: Bytes) -> Bytes {
        if self.0 == 0 {
            return body;
        }
        Bytes::from_owner(Owned {
            body,
            _reserved: self,
        })
    }
}

/// Adds `n` to the bytes reserved if the budget has room for them.
fn add(n: u64) -> bool {
    RESERVED
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| {
            r.checked_add(n).filter(|total| *total <= BUDGET)
        })
        .is_ok()
}

impl Drop for Reserved {
    fn drop(&mut self) {
        if self.0 > 0 {
            RESERVED.fetch_sub(self.0, Ordering::AcqRel);
        }
    }
}

/// The bytes of a held body and its reservation.
struct Owned {
    body: Bytes,
    _reserved: Reserved,
}

impl AsRef<[u8]> for Owned {
    fn as_ref(&self) -> &[u8] {
        &self.body
    }
}

/// Bytes reserved now (for tests and the budget's own checks).
pub fn reserved() -> u64 {
    RESERVED.load(Ordering::Acquire)
}

/// Serializes the tests that reserve (the counter is process-wide, and they count it).
#[cfg(test)]
pub static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[cfg(test)]
mod tests {
    use super::*;

    /// Reservations add up to the budget and no further; dropping the last copy of a held
    /// body gives its bytes back. One test: the counter is process-wide.
    #[test]
    fn reservations_stop_at_the_budget_and_come_back_with_the_last_copy() {
        let _serial = SERIAL.blocking_lock();
        let start = reserved();
        let half = Reserved::take(BUDGET / 2).expect("room for half");
        let body = half.holding(Bytes::from_static(b"held"));
        let copy = body.clone();
        assert_eq!(reserved(), start + BUDGET / 2);
        assert!(Reserved::take(BUDGET).is_none(), "past the budget");
        drop(body);
        assert_eq!(reserved(), start + BUDGET / 2, "a copy still holds it");
        assert_eq!(&copy[..], b"held");
        drop(copy);
        assert_eq!(reserved(), start);
        assert_eq!(Reserved::none().holding(Bytes::from_static(b"x")), "x");

        let mut growing = Reserved::none();
        assert!(growing.grow_to(1000) && growing.grow_to(10) && growing.grow_to(4000));
        assert_eq!((growing.bytes(), reserved()), (4000, start + 4000));
        assert!(!growing.grow_to(BUDGET + 1), "past the budget");
        assert_eq!(reserved(), start + 4000, "a refused growth takes nothing");
        drop(growing);
        assert_eq!(reserved(), start);
    }
}
