//! A count of things held at once against a maximum, and the slot each one holds: a sandbox's
//! upstream connections (`[upstream] max_connections_per_sandbox`), shared by every connector
//! of its client sets (`proxy::clients`) on every worker; the daemon's
//! (`[upstream] max_connections`); the brotli and zstd bodies being decoded, of a sandbox and
//! of the daemon (`[upstream] max_window_decoders[_per_sandbox]`).

use std::sync::atomic::Ordering;

use prometheus_client::metrics::gauge::Gauge;

/// A count of things held against a maximum given at each take. As a sandbox's upstream
/// connections (in use, or idle in its pools), counted against
/// `[upstream] max_connections_per_sandbox` by every connector of its client sets, on every
/// worker. Without it a sandbox could leave any number of idle connections in its pools (up
/// to `pool_max_idle_per_host` per host, and a wildcard allowlist has no end of hosts) and
/// spend the daemon's file descriptors (an outside review left 961 idle sockets from one
/// sandbox with no client connection open).
///
/// The daemon's count of all upstream connections (`[upstream] max_connections`) is one too,
/// kept in the `upstream_connections` gauge ([`Budget::in_gauge`]). Invariant: the count
/// is never negative and never above the `max` of the takes that raised it.
#[derive(Clone, Debug, Default)]
pub struct Budget(Gauge);

impl Budget {
    /// A budget whose count is `gauge` (a metric shows it).
    pub fn in_gauge(gauge: Gauge) -> Budget {
        Budget(gauge)
    }

    /// How many connections are open.
    pub fn open(&self) -> usize {
        self.0.get().max(0) as usize
    }

    /// A slot for one more connection, held by it until it closes; None at `max`.
    pub fn take(&self, max: usize) -> Option<BudgetSlot> {
        let max = i64::try_from(max).unwrap_or(i64::MAX);
        self.0
            .inner()
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| BudgetSlot(self.0.clone()))
    }
}

/// One held thing's place in a [`Budget`], given back when dropped.
pub struct BudgetSlot(Gauge);

impl Drop for BudgetSlot {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_gives_slots_up_to_its_max_and_takes_them_back_on_drop() {
        let budget = Budget::default();
        let (a, b) = (budget.take(2).unwrap(), budget.take(2).unwrap());
        assert!(budget.take(2).is_none(), "full");
        assert_eq!(budget.open(), 2);
        drop(a);
        assert_eq!(budget.open(), 1);
        let c = budget.clone().take(2).expect("a slot freed, on any clone");
        assert!(budget.take(2).is_none());
        drop((b, c));
        assert_eq!(budget.open(), 0);
    }
}
