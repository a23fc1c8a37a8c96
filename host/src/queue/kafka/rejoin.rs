//! When to leave and rejoin a consumer group whose broker kept a stale
//! assignment. A rebalance that hands back exactly what it took is how
//! such a broker shows itself after a member died (tansu 0.6.0 does: the
//! dead member's partitions then stay unread); leaving and rejoining makes
//! it form a new generation. The task consumer and the expander both
//! rejoin this way, each for its own group.

use std::time::{Duration, Instant};

/// Least time between two rejoins of one group.
const REJOIN_EVERY: Duration = Duration::from_secs(20);

/// One group's rejoins: at most one per [`REJOIN_EVERY`].
#[derive(Debug, Default)]
pub(super) struct RejoinGate {
    /// When this host last rejoined (never: a rejoin is due).
    last: Option<Instant>,
}

impl RejoinGate {
    /// Whether to rejoin now: a rejoin is due and `take_unchanged` (which
    /// takes the "rebalance gave back what it took" flag) says so. The
    /// flag is taken only once a rejoin is due: one raised meanwhile, e.g.
    /// by the rejoin's own rebalance while the dead member still counted,
    /// waits for the next due time instead of being dropped (dropped,
    /// nothing asks again and the partitions stay unread for good: seen
    /// under load, a 20,000-task job stuck).
    pub(super) fn due(&mut self, take_unchanged: impl FnOnce() -> bool) -> bool {
        if self.last.is_some_and(|at| at.elapsed() < REJOIN_EVERY) || !take_unchanged() {
            return false;
        }
        self.last = Some(Instant::now());
        true
    }
}

#[cfg(test)]
mod tests {
    use super::RejoinGate;
    use std::cell::Cell;

    #[test]
    fn a_flag_raised_during_the_wait_is_left_for_later() {
        let mut gate = RejoinGate::default();
        assert!(!gate.due(|| false), "no flag, no rejoin");
        assert!(gate.due(|| true), "the first rejoin is due at once");
        let asked = Cell::new(false);
        assert!(!gate.due(|| {
            asked.set(true);
            true
        }));
        assert!(
            !asked.get(),
            "the flag must not be taken before a rejoin is due"
        );
    }
}
