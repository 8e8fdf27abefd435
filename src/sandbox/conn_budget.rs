//! One sandbox's budget of upstream connections (`[upstream] max_connections_per_sandbox`):
//! a count shared by every connector of the sandbox's client sets (`proxy::clients`) on every
//! worker, and the slot each open connection holds.

use std::sync::atomic::Ordering;

use prometheus_client::metrics::gauge::Gauge;

/// One sandbox's open upstream connections (in use, or idle in its pools), counted against
/// `[upstream] max_connections_per_sandbox` by every connector of its client sets, on every
/// worker. Without it a sandbox could leave any number of idle connections in its pools (up
/// to `pool_max_idle_per_host` per host, and a wildcard allowlist has no end of hosts) and
/// spend the daemon's file descriptors (an outside review left 961 idle sockets from one
/// sandbox with no client connection open).
///
/// The daemon's count of all upstream connections (`[upstream] max_connections`) is one too,
/// kept in the `upstream_connections` gauge ([`ConnBudget::in_gauge`]). Invariant: the count
/// is never negative and never above the `max` of the takes that raised it.
#[derive(Clone, Debug, Default)]
pub struct ConnBudget(Gauge);

impl ConnBudget {
    /// A budget whose count is `gauge` (a metric shows it).
    pub fn in_gauge(gauge: Gauge) -> ConnBudget {
        ConnBudget(gauge)
    }

    /// How many connections are open.
    pub fn open(&self) -> usize {
        self.0.get().max(0) as usize
    }

    /// A slot for one more connection, held by it until it closes; None at `max`.
    pub fn take(&self, max: usize) -> Option<ConnSlot> {
        let max = i64::try_from(max).unwrap_or(i64::MAX);
        self.0
            .inner()
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| ConnSlot(self.0.clone()))
    }
}

/// One open upstream connection's place in a [`ConnBudget`].
pub struct ConnSlot(Gauge);

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_gives_slots_up_to_its_max_and_takes_them_back_on_drop() {
        let budget = ConnBudget::default();
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
