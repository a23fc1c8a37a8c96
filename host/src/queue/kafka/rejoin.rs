//! When to leave and rejoin a consumer group whose broker kept a stale
//! assignment. A rebalance that hands back exactly what it took is how
//! such a broker shows itself after a member died (tansu 0.6.0 does: the
//! dead member's partitions then stay unread); leaving and rejoining makes
//! it form a new generation. The task consumer and the expander both
//! rejoin this way, each for its own group, when the store URL asks for it
//! (`?rejoin_stale=true`: see `KafkaConfig::rejoin_stale` for why it is off
//! by default).

use std::time::{Duration, Instant};

/// Least time between two rejoins of one group.
const REJOIN_EVERY: Duration = Duration::from_secs(20);

/// Longest wait between two rejoins of one group in a streak.
const STREAK_MAX: Duration = Duration::from_secs(320);

/// One group's rejoins: none unless enabled, at most one per [`REJOIN_EVERY`].
/// Rejoins in a streak (each due as soon as the last one's wait ran out)
/// wait twice as long each time, up to [`STREAK_MAX`]: a rejoin whose own
/// rebalance raises the flag again (members that take turns rejoining, as
/// seen on tansu under load) then stops its group ever more rarely. A
/// rejoin that comes after a quiet spell of twice its wait starts over at
/// [`REJOIN_EVERY`].
#[derive(Debug)]
pub(super) struct RejoinGate {
    /// Whether stale assignments are looked for at all.
    enabled: bool,
    /// When this host last rejoined (never: a rejoin is due).
    last: Option<Instant>,
    /// How long after `last` the next rejoin may come.
    wait: Duration,
}

impl RejoinGate {
    /// A gate that rejoins only if `enabled` (`KafkaConfig::rejoin_stale`).
    pub(super) fn new(enabled: bool) -> Self {
        RejoinGate {
            enabled,
            last: None,
            wait: REJOIN_EVERY,
        }
    }

    /// Whether to rejoin now: a rejoin is due and `take_unchanged` (which
    /// takes the "rebalance gave back what it took" flag) says so. The
    /// flag is taken only once a rejoin is due: one raised meanwhile, e.g.
    /// by the rejoin's own rebalance while the dead member still counted,
    /// waits for the next due time instead of being dropped (dropped,
    /// nothing asks again and the partitions stay unread for good: seen
    /// under load, a 20,000-task job stuck).
    pub(super) fn due(&mut self, take_unchanged: impl FnOnce() -> bool) -> bool {
        self.due_at(Instant::now(), take_unchanged)
    }

    /// [`RejoinGate::due`] at `now`.
    fn due_at(&mut self, now: Instant, take_unchanged: impl FnOnce() -> bool) -> bool {
        if !self.enabled {
            return false;
        }
        let since = self.last.map(|at| now.saturating_duration_since(at));
        if since.is_some_and(|since| since < self.wait) || !take_unchanged() {
            return false;
        }
        self.wait = match since {
            Some(since) if since < self.wait * 2 => (self.wait * 2).min(STREAK_MAX),
            _ => REJOIN_EVERY,
        };
        self.last = Some(now);
        true
    }
}

/// Longest wait between two rejoins of a member left without partitions.
const EMPTY_HANDED_MAX: Duration = Duration::from_secs(300);

/// Notices a member that a group has left without partitions although it
/// should hold some, and says when to rejoin: seen on tansu 0.6.0 under
/// load, a lone host's expander was never given an expand partition while
/// its task consumer held every band's (a sweep then never expands). The
/// first rejoin comes after [`REJOIN_EVERY`] empty-handed; each one that
/// does not help doubles the wait (up to [`EMPTY_HANDED_MAX`]), so a host
/// that is rightly without partitions (more hosts than partitions, if the
/// caller's test misjudges it) unsettles its group rarely.
#[derive(Debug)]
pub(super) struct EmptyHanded {
    /// Since when it has been empty-handed (none: it holds partitions).
    since: Option<Instant>,
    wait: Duration,
}

impl Default for EmptyHanded {
    fn default() -> Self {
        EmptyHanded {
            since: None,
            wait: REJOIN_EVERY,
        }
    }
}

impl EmptyHanded {
    /// Whether to rejoin at `now`, given whether the member holds no
    /// partition and whether it should hold some.
    pub(super) fn due(&mut self, now: Instant, holds_none: bool, should_hold: bool) -> bool {
        if !holds_none {
            *self = EmptyHanded::default();
            return false;
        }
        if !should_hold {
            self.since = None;
            return false;
        }
        let since = *self.since.get_or_insert(now);
        if now.duration_since(since) < self.wait {
            return false;
        }
        self.since = None;
        self.wait = (self.wait * 2).min(EMPTY_HANDED_MAX);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::{EmptyHanded, REJOIN_EVERY, RejoinGate, STREAK_MAX};
    use std::time::{Duration, Instant};

    #[test]
    fn an_empty_handed_member_rejoins_ever_more_rarely_until_it_holds_partitions() {
        let mut empty = EmptyHanded::default();
        let t0 = Instant::now();
        let after = |d: Duration| t0 + d;
        assert!(!empty.due(t0, true, true), "not at once");
        assert!(!empty.due(after(REJOIN_EVERY / 2), true, true));
        assert!(empty.due(after(REJOIN_EVERY), true, true));
        // Still empty-handed: the next rejoin waits twice as long.
        let t1 = after(REJOIN_EVERY);
        assert!(!empty.due(t1, true, true));
        assert!(!empty.due(t1 + REJOIN_EVERY, true, true));
        assert!(empty.due(t1 + 2 * REJOIN_EVERY, true, true));
        // One that should hold nothing, or holds something, never rejoins.
        let t2 = t1 + 2 * REJOIN_EVERY;
        assert!(!empty.due(t2 + Duration::from_secs(3600), true, false));
        assert!(!empty.due(t2, false, true));
        assert!(!empty.due(t2 + Duration::from_secs(3600), false, true));
        // Holding partitions again reset the wait.
        let t3 = t2 + Duration::from_secs(7200);
        assert!(!empty.due(t3, true, true));
        assert!(empty.due(t3 + REJOIN_EVERY, true, true));
    }

    use std::cell::Cell;

    #[test]
    fn a_flag_raised_during_the_wait_is_left_for_later() {
        let mut off = RejoinGate::new(false);
        assert!(!off.due(|| true), "a gate not enabled never rejoins");
        let mut gate = RejoinGate::new(true);
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

    #[test]
    fn rejoins_in_a_streak_wait_ever_longer_and_a_quiet_spell_starts_over() {
        let mut gate = RejoinGate::new(true);
        let mut now = Instant::now();
        assert!(gate.due_at(now, || true), "the first rejoin is due at once");
        // Each rejoin's rebalance raises the flag again at once: a streak.
        let mut waits = Vec::new();
        for _ in 0..6 {
            let mut waited = Duration::ZERO;
            while !gate.due_at(now + waited, || true) {
                waited += Duration::from_secs(1);
            }
            now += waited;
            waits.push(waited.as_secs());
        }
        assert_eq!(waits, [20, 40, 80, 160, 320, 320]);
        assert_eq!(gate.wait, STREAK_MAX);
        // A quiet spell of twice the wait: the next rejoin starts over.
        now += STREAK_MAX * 2;
        assert!(gate.due_at(now, || true));
        assert!(!gate.due_at(now + REJOIN_EVERY - Duration::from_secs(1), || true));
        assert!(gate.due_at(now + REJOIN_EVERY, || true));
    }
}
