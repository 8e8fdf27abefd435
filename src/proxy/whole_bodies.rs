//! The memory budget of request bodies read whole past `forward::BUFFER_BODY_MAX` (up to
//! `forward::WHOLE_BODY_MAX`), so that they keep an exact `Content-Length`.
//!
//! Invariant: the announced lengths of all such bodies held at once (and what is read ahead
//! of chunked ones, `proxy::unframed`), across every sandbox, never exceed [`BUDGET`], and one
//! sandbox's never exceed [`SANDBOX_SHARE`]. A body that does not fit streams instead (without
//! a length, as every larger body does): the budget decides how a body is framed, it never
//! refuses one. Without it, one sandbox's 256 requests in flight could pin 256 MiB; without
//! the share, one sandbox's stalled uploads could take the whole budget from every other
//! sandbox, whose bodies then lost their length (outside pass h42a).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;

/// The most announced bytes held at once (see the module invariant).
pub const BUDGET: u64 = 64 * 1024 * 1024;

/// The most of [`BUDGET`] one sandbox's bodies hold at once: a quarter.
pub const SANDBOX_SHARE: u64 = BUDGET / 4;

/// One sandbox's bytes reserved now (`Sandbox::bodies_held`).
pub type Share = Arc<AtomicU64>;

/// Bytes reserved now.
static RESERVED: AtomicU64 = AtomicU64::new(0);

/// A reservation of `n` announced bytes, in the budget and in one sandbox's share, given back
/// when dropped (by the held body's last copy, see [`Reserved::holding`]). Zero for bodies
/// within `BUFFER_BODY_MAX`, which are always read whole.
#[derive(Debug)]
pub struct Reserved {
    n: u64,
    /// The sandbox's share it counts in (set with the first byte reserved).
    share: Option<Share>,
}

impl Reserved {
    /// No reservation (a body always read whole).
    pub fn none() -> Reserved {
        Reserved { n: 0, share: None }
    }

    /// Reserves `n` bytes in the budget and in `share` if both have room for them.
    pub fn take(n: u64, share: &Share) -> Option<Reserved> {
        let mut r = Reserved::none();
        r.grow_to(n, share).then_some(r)
    }

    /// Grows this reservation to `n` bytes if the budget and `share` (the sandbox's, the same
    /// for every call on one reservation) have room (true), or leaves it as it is (false). A
    /// reservation of `n` or more already is left as it is.
    pub fn grow_to(&mut self, n: u64, share: &Share) -> bool {
        let Some(more) = n.checked_sub(self.n).filter(|more| *more > 0) else {
            return true;
        };
        if !add(&RESERVED, more, BUDGET) {
            return false;
        }
        if !add(share, more, SANDBOX_SHARE) {
            RESERVED.fetch_sub(more, Ordering::AcqRel);
            return false;
        }
        self.share.get_or_insert_with(|| share.clone());
        self.n += more;
        true
    }

    /// The bytes reserved.
    pub fn bytes(&self) -> u64 {
        self.n
    }

    /// `body`, keeping this reservation until its last clone is dropped (retries clone it).
    pub fn holding(self, body: Bytes) -> Bytes {
        if self.n == 0 {
            return body;
        }
        Bytes::from_owner(Owned {
            body,
            _reserved: self,
        })
    }
}

/// Adds `n` to `counter` if that keeps it within `cap`.
fn add(counter: &AtomicU64, n: u64, cap: u64) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| {
            r.checked_add(n).filter(|total| *total <= cap)
        })
        .is_ok()
}

impl Drop for Reserved {
    fn drop(&mut self) {
        if self.n > 0 {
            RESERVED.fetch_sub(self.n, Ordering::AcqRel);
        }
        if let Some(share) = &self.share {
            share.fetch_sub(self.n, Ordering::AcqRel);
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

    /// Reservations add up to the budget and no further, and one sandbox's to its share;
    /// dropping the last copy of a held body gives its bytes back to both. One test: the
    /// counter is process-wide.
    #[test]
    fn reservations_stop_at_the_budget_and_the_share_and_come_back_with_the_last_copy() {
        let _serial = SERIAL.blocking_lock();
        let start = reserved();
        let (a, b) = (Share::default(), Share::default());
        let quarter = Reserved::take(SANDBOX_SHARE, &a).expect("room for a share");
        assert!(Reserved::take(1, &a).is_none(), "past a's share");
        let body = quarter.holding(Bytes::from_static(b"held"));
        let copy = body.clone();
        assert_eq!(reserved(), start + SANDBOX_SHARE);
        let other = Reserved::take(1, &b).expect("b has its own share");
        drop(other);
        let rest: Vec<_> = (0..3)
            .map(|_| Reserved::take(SANDBOX_SHARE, &Share::default()))
            .collect();
        assert!(
            rest.iter().all(Option::is_some),
            "four shares fill the budget"
        );
        assert!(Reserved::take(1, &b).is_none(), "past the budget");
        drop(rest);
        drop(body);
        assert_eq!(reserved(), start + SANDBOX_SHARE, "a copy still holds it");
        assert_eq!(a.load(Ordering::Acquire), SANDBOX_SHARE);
        assert_eq!(&copy[..], b"held");
        drop(copy);
        assert_eq!((reserved(), a.load(Ordering::Acquire)), (start, 0));
        assert_eq!(Reserved::none().holding(Bytes::from_static(b"x")), "x");

        let mut growing = Reserved::none();
        assert!(growing.grow_to(1000, &b) && growing.grow_to(10, &b) && growing.grow_to(4000, &b));
        assert_eq!((growing.bytes(), reserved()), (4000, start + 4000));
        assert!(!growing.grow_to(SANDBOX_SHARE + 1, &b), "past the share");
        assert_eq!(reserved(), start + 4000, "a refused growth takes nothing");
        assert_eq!(b.load(Ordering::Acquire), 4000);
        drop(growing);
        assert_eq!((reserved(), b.load(Ordering::Acquire)), (start, 0));
    }
}
