//! The in-memory index of tasks waiting to run: strict priority with
//! aging, soft affinity, delayed starts, held (priority 0) and paused tasks.
//! The durable truth is the store; this index is rebuilt from it at start.
//!
//! Queues hold `(id, generation)` and entries are removed lazily: a queue
//! slot whose entry is gone, re-queued or moved is skipped when reached.

use super::Tags;
use crate::model::{Millis, ModuleId, TaskOptions, TaskState};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::Arc;

/// A waiting task with everything needed to lease it without a store read.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) id: Arc<str>,
    pub(crate) job: Option<Arc<str>>,
    pub(crate) module: ModuleId,
    /// The payload, or `None` when it was left in the store to bound the
    /// memory waiting tasks hold (read back when the task is leased).
    pub(crate) payload: Option<Arc<[u8]>>,
    pub(crate) affinity: Option<Arc<str>>,
    pub(crate) priority: u8,
    pub(crate) tags: Tags,
    pub(crate) timeout_ms: u64,
    pub(crate) memory_bytes: u64,
    pub(crate) max_attempts: u32,
    /// Attempts already made.
    pub(crate) attempts: u32,
    /// When it became ready to wait (for aging and the affinity window).
    pub(crate) queued_at: Millis,
    /// The same instant in µs since the epoch, for the queue wait reported
    /// at task resolution.
    pub(crate) ready_us: crate::model::Micros,
    pub(crate) not_before: Option<Millis>,
    /// Pending, or Error while it waits for a retry (what the store says).
    pub(crate) state: TaskState,
    /// A fan-in task's job, whose results are its input.
    pub(crate) results_of: Option<Arc<str>>,
}

impl Entry {
    /// A task waiting for its first attempt since `queued_at`, as submitted
    /// (or as read from a band topic), its payload held in memory.
    pub(crate) fn new(
        id: &str,
        job: Option<Arc<str>>,
        module: &ModuleId,
        payload: &[u8],
        options: &TaskOptions,
        tags: Tags,
        queued_at: Millis,
    ) -> Self {
        Entry {
            id: Arc::from(id),
            job,
            module: module.clone(),
            payload: Some(Arc::from(payload)),
            affinity: options.affinity.as_deref().map(Arc::from),
            priority: options.priority,
            tags,
            timeout_ms: options.timeout_ms,
            memory_bytes: options.memory_bytes,
            max_attempts: options.max_attempts,
            attempts: 0,
            queued_at,
            ready_us: queued_at * 1000,
            not_before: options.not_before,
            state: TaskState::Pending,
            results_of: options.results_of.as_deref().map(Arc::from),
        }
    }

    /// The same entry after `attempts` attempts: a task that failed waits
    /// in Error for its retry, one never tried (or given back) in Pending.
    pub(crate) fn after_attempts(self, attempts: u32, failed: bool) -> Self {
        Entry {
            attempts,
            state: if failed {
                TaskState::Error
            } else {
                TaskState::Pending
            },
            ..self
        }
    }

    /// The options this entry was submitted with (re-published on retry).
    pub(crate) fn options(&self) -> TaskOptions {
        TaskOptions {
            priority: self.priority,
            tags: (*self.tags).clone(),
            affinity: self.affinity.as_deref().map(str::to_string),
            timeout_ms: self.timeout_ms,
            memory_bytes: self.memory_bytes,
            max_attempts: self.max_attempts,
            not_before: self.not_before,
            results_of: self.results_of.as_deref().map(str::to_string),
            // Re-published tasks have run: what they waited for has ended.
            ..TaskOptions::default()
        }
    }

    /// The lease of this entry's next attempt, for `worker`, under `token`.
    pub(crate) fn lease(
        &self,
        worker: &str,
        token: u64,
        warm_hit: bool,
        cancelled: Arc<tokio::sync::Notify>,
    ) -> crate::queue::Lease {
        crate::queue::Lease {
            task_id: self.id.to_string(),
            job_id: self.job.as_deref().map(str::to_string),
            module: self.module.clone(),
            payload: self.payload.clone().unwrap_or_else(|| Arc::from(&[][..])),
            affinity: self.affinity.as_deref().map(str::to_string),
            attempt: self.attempts + 1,
            max_attempts: self.max_attempts,
            timeout: std::time::Duration::from_millis(self.timeout_ms),
            memory_bytes: self.memory_bytes,
            worker: worker.to_string(),
            token,
            queued_at: self.queued_at,
            warm_hit,
            cancelled,
            results_of: self.results_of.as_deref().map(str::to_string),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Queued,
    Delayed,
    Held,
    Parked,
}

struct Waiting {
    entry: Entry,
    slot: Slot,
    generation: u64,
}

/// How the index trades priority against affinity and age.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Policy {
    /// A task's effective priority rises by one per this many ms of waiting.
    pub(crate) aging_ms: u64,
    /// How long a task may wait for the worker that is warm for it.
    pub(crate) affinity_window_ms: u64,
}

/// What a free worker gets.
pub(crate) enum Pick {
    /// This task; `true` if its (module, key) was warm on the worker.
    Task(Entry, bool),
    /// Nothing now; look again by this time (or when notified).
    Wait(Option<Millis>),
}

type Key = (ModuleId, Arc<str>);

/// One queue of task ids with the generation they were queued under.
type Band = VecDeque<(Arc<str>, u64)>;

/// Effective priority, then age (older wins ties).
type Score = (f64, Reverse<Millis>);

/// The best task found so far and its score.
type Best = Option<(Arc<str>, Score)>;

#[derive(Default)]
pub(crate) struct ReadyIndex {
    waiting: HashMap<Arc<str>, Waiting>,
    /// Wasm tasks, per priority.
    by_priority: [Band; 10],
    /// Tasks of each external kind (`external:NAME`), per priority: only
    /// a worker asking for that kind is offered them, and no Wasm worker is.
    external: HashMap<ModuleId, [Band; 10]>,
    by_key: HashMap<Key, VecDeque<(Arc<str>, u64)>>,
    delayed: BinaryHeap<Reverse<(Millis, Arc<str>, u64)>>,
    paused: HashSet<Arc<str>>,
    next_generation: u64,
    depth: [u64; 10],
    per_job: HashMap<Arc<str>, u64>,
    payload_bytes: u64,
}

impl ReadyIndex {
    /// Tasks waiting per priority (queued, delayed, held or parked).
    pub(crate) fn depth(&self) -> [u64; 10] {
        self.depth
    }

    /// Bytes of payload the waiting tasks hold in memory.
    pub(crate) fn payload_bytes(&self) -> u64 {
        self.payload_bytes
    }

    /// Tasks of a job waiting here.
    pub(crate) fn job_waiting(&self, job: &str) -> u64 {
        self.per_job.get(job).copied().unwrap_or(0)
    }

    /// Add a task (or put it back).
    pub(crate) fn insert(&mut self, entry: Entry, now: Millis) {
        self.depth[entry.priority as usize] += 1;
        self.payload_bytes += entry.payload.as_ref().map_or(0, |p| p.len() as u64);
        if let Some(job) = &entry.job {
            *self.per_job.entry(job.clone()).or_default() += 1;
        }
        self.place(entry, now);
    }

    fn place(&mut self, entry: Entry, now: Millis) {
        self.next_generation += 1;
        let generation = self.next_generation;
        let id = entry.id.clone();
        let slot = if entry.priority == 0 {
            Slot::Held
        } else if entry.not_before.is_some_and(|t| t > now) {
            self.delayed.push(Reverse((
                entry.not_before.unwrap_or(now),
                id.clone(),
                generation,
            )));
            Slot::Delayed
        } else if entry.job.as_ref().is_some_and(|j| self.paused.contains(j)) {
            Slot::Parked
        } else {
            let band = if entry.module.is_external() {
                &mut self.external.entry(entry.module.clone()).or_default()
            } else {
                &mut self.by_priority
            };
            band[entry.priority as usize].push_back((id.clone(), generation));
            if let Some(key) = &entry.affinity {
                self.by_key
                    .entry((entry.module.clone(), key.clone()))
                    .or_default()
                    .push_back((id.clone(), generation));
            }
            Slot::Queued
        };
        self.waiting.insert(
            id,
            Waiting {
                entry,
                slot,
                generation,
            },
        );
    }

    /// Take a task out of the index, wherever it waits.
    pub(crate) fn remove(&mut self, id: &str) -> Option<Entry> {
        let waiting = self.waiting.remove(id)?;
        self.depth[waiting.entry.priority as usize] -= 1;
        self.payload_bytes -= waiting.entry.payload.as_ref().map_or(0, |p| p.len() as u64);
        if let Some(job) = &waiting.entry.job
            && let Some(count) = self.per_job.get_mut(job)
        {
            *count -= 1;
            if *count == 0 {
                self.per_job.remove(job);
            }
        }
        Some(waiting.entry)
    }

    /// Change a waiting task's priority; 0 holds it, raising releases it.
    pub(crate) fn set_priority(&mut self, id: &str, priority: u8, now: Millis) -> bool {
        let Some(mut entry) = self.remove(id) else {
            return false;
        };
        entry.priority = priority;
        self.insert(entry, now);
        true
    }

    /// Change the priority of every waiting task of a job (a job raised
    /// from held, or reordered); returns how many it changed.
    pub(crate) fn set_job_priority(&mut self, job: &str, priority: u8, now: Millis) -> usize {
        let ids: Vec<Arc<str>> = self
            .waiting
            .values()
            .filter(|w| w.entry.job.as_deref() == Some(job) && w.entry.priority != priority)
            .map(|w| w.entry.id.clone())
            .collect();
        ids.iter()
            .filter(|id| self.set_priority(id, priority, now))
            .count()
    }

    /// Every waiting task of a job, removed.
    pub(crate) fn remove_job(&mut self, job: &str) -> Vec<Entry> {
        let ids: Vec<Arc<str>> = self
            .waiting
            .values()
            .filter(|w| w.entry.job.as_deref() == Some(job))
            .map(|w| w.entry.id.clone())
            .collect();
        ids.iter().filter_map(|id| self.remove(id)).collect()
    }

    /// Stop offering a job's tasks (they are parked when reached).
    pub(crate) fn pause(&mut self, job: Arc<str>) {
        self.paused.insert(job);
    }

    /// Whether a job is paused here.
    pub(crate) fn is_paused(&self, job: &str) -> bool {
        self.paused.contains(job)
    }

    /// Offer a paused job's tasks again.
    pub(crate) fn resume(&mut self, job: &str, now: Millis) {
        self.paused.remove(job);
        let parked: Vec<Arc<str>> = self
            .waiting
            .values()
            .filter(|w| w.slot == Slot::Parked && w.entry.job.as_deref() == Some(job))
            .map(|w| w.entry.id.clone())
            .collect();
        for id in parked {
            if let Some(waiting) = self.waiting.remove(&id) {
                self.place(waiting.entry, now);
            }
        }
    }

    /// Move delayed tasks whose time has come into the queues.
    pub(crate) fn promote_due(&mut self, now: Millis) {
        while let Some(Reverse((at, id, generation))) = self.delayed.peek().cloned() {
            if at > now {
                break;
            }
            self.delayed.pop();
            let current = self
                .waiting
                .get(&id)
                .is_some_and(|w| w.generation == generation && w.slot == Slot::Delayed);
            if current && let Some(mut waiting) = self.waiting.remove(&id) {
                waiting.entry.not_before = None;
                self.place(waiting.entry, now);
            }
        }
    }

    /// When the next delayed task becomes due.
    pub(crate) fn next_due(&self) -> Option<Millis> {
        self.delayed.peek().map(|Reverse((at, _, _))| *at)
    }

    /// The oldest live queued entry of a queue, dropping stale slots and
    /// parking tasks of paused jobs on the way.
    fn head(&mut self, queue: QueueRef) -> Option<Arc<str>> {
        loop {
            let (id, generation) = match &queue {
                QueueRef::Priority(pool, p) => self.bands(pool.as_ref())?[*p].front().cloned()?,
                QueueRef::Key(key) => self.by_key.get(key).and_then(|q| q.front().cloned())?,
            };
            let live = self
                .waiting
                .get(&id)
                .is_some_and(|w| w.generation == generation && w.slot == Slot::Queued);
            if live {
                let paused = self.waiting[&id]
                    .entry
                    .job
                    .as_ref()
                    .is_some_and(|j| self.paused.contains(j));
                if !paused {
                    return Some(id);
                }
                if let Some(w) = self.waiting.get_mut(&id) {
                    w.slot = Slot::Parked;
                }
            }
            match &queue {
                QueueRef::Priority(pool, p) => {
                    if let Some(bands) = self.bands_mut(pool.as_ref()) {
                        bands[*p].pop_front();
                    }
                }
                QueueRef::Key(key) => {
                    if let Some(q) = self.by_key.get_mut(key) {
                        q.pop_front();
                        if q.is_empty() {
                            self.by_key.remove(key);
                        }
                    }
                }
            }
        }
    }

    /// The priority bands of a pool: Wasm tasks (`None`) or one external kind.
    fn bands(&self, pool: Option<&ModuleId>) -> Option<&[Band; 10]> {
        match pool {
            None => Some(&self.by_priority),
            Some(kind) => self.external.get(kind),
        }
    }

    fn bands_mut(&mut self, pool: Option<&ModuleId>) -> Option<&mut [Band; 10]> {
        match pool {
            None => Some(&mut self.by_priority),
            Some(kind) => self.external.get_mut(kind),
        }
    }

    /// The first live, unreserved task behind the head of band `p`, within
    /// [`SCAN_PAST_RESERVED`] slots (tasks of paused jobs are passed over;
    /// the head parks them when it reaches them).
    fn unreserved_behind(
        &self,
        pool: Option<&ModuleId>,
        p: usize,
        warm_elsewhere: &dyn Fn(&ModuleId, &str) -> bool,
        now: Millis,
        policy: Policy,
    ) -> Option<Arc<str>> {
        let band = &self.bands(pool)?[p];
        band.iter()
            .skip(1)
            .take(SCAN_PAST_RESERVED)
            .find_map(|(id, generation)| {
                let waiting = self.waiting.get(id)?;
                let entry = &waiting.entry;
                let usable = waiting.generation == *generation
                    && waiting.slot == Slot::Queued
                    && !entry.job.as_ref().is_some_and(|j| self.paused.contains(j))
                    && reserved_until(entry, warm_elsewhere, now, policy).is_none();
                usable.then(|| id.clone())
            })
    }

    fn effective(&self, id: &str, now: Millis, policy: Policy) -> Score {
        let entry = &self.waiting[id].entry;
        let waited = now.saturating_sub(entry.queued_at);
        (
            entry.priority as f64 + waited as f64 / policy.aging_ms.max(1) as f64,
            Reverse(entry.queued_at),
        )
    }

    /// The best task of `pool` (Wasm tasks, or one external kind) for a
    /// worker with these warm pairs, given which pairs are warm on other workers.
    pub(crate) fn pick(
        &mut self,
        pool: Option<&ModuleId>,
        warm_here: &[(ModuleId, String)],
        warm_elsewhere: &dyn Fn(&ModuleId, &str) -> bool,
        now: Millis,
        policy: Policy,
    ) -> Pick {
        let cmp = |a: &(f64, Reverse<Millis>), b: &(f64, Reverse<Millis>)| {
            a.0.total_cmp(&b.0).then(a.1.cmp(&b.1))
        };
        let mut best_warm: Best = None;
        for (module, key) in warm_here {
            let in_pool = match pool {
                None => !module.is_external(),
                Some(kind) => module == kind,
            };
            if !in_pool {
                continue;
            }
            if let Some(id) = self.head(QueueRef::Key((module.clone(), Arc::from(key.as_str())))) {
                let score = self.effective(&id, now, policy);
                if best_warm
                    .as_ref()
                    .is_none_or(|(_, best)| cmp(&score, best).is_gt())
                {
                    best_warm = Some((id, score));
                }
            }
        }
        // Best head per priority, skipping tasks reserved for a warm worker elsewhere.
        let mut best_global: Best = None;
        let mut best_any: Best = None;
        let mut wake: Option<Millis> = None;
        for p in 1..10 {
            let Some(id) = self.head(QueueRef::Priority(pool.cloned(), p)) else {
                continue;
            };
            let score = self.effective(&id, now, policy);
            if best_any
                .as_ref()
                .is_none_or(|(_, best)| cmp(&score, best).is_gt())
            {
                best_any = Some((id.clone(), score));
            }
            let entry = &self.waiting[&id].entry;
            let mut id = id;
            if let Some(until) = reserved_until(entry, warm_elsewhere, now, policy) {
                wake = Some(wake.map_or(until, |w: Millis| w.min(until)));
                // A reserved head does not hold up the rest of its band.
                match self.unreserved_behind(pool, p, warm_elsewhere, now, policy) {
                    Some(behind) => id = behind,
                    None => continue,
                }
            }
            let score = self.effective(&id, now, policy);
            if best_global
                .as_ref()
                .is_none_or(|(_, best)| cmp(&score, best).is_gt())
            {
                best_global = Some((id, score));
            }
        }
        let chosen = match (best_warm, best_global, best_any) {
            (Some((warm, warm_score)), _, Some((any, any_score))) => {
                let any_entry = &self.waiting[&any].entry;
                let overdue = now.saturating_sub(any_entry.queued_at) >= policy.affinity_window_ms;
                if cmp(&any_score, &warm_score).is_gt() && overdue {
                    Some((any, false))
                } else {
                    Some((warm, true))
                }
            }
            (Some((warm, _)), _, None) => Some((warm, true)),
            (None, Some((global, _)), _) => Some((global, false)),
            (None, None, _) => None,
        };
        match chosen {
            Some((id, warm_hit)) => {
                let entry = self.remove(&id).expect("picked entry is waiting");
                let warm_hit = warm_hit
                    || entry.affinity.as_ref().is_some_and(|k| {
                        warm_here
                            .iter()
                            .any(|(m, w)| *m == entry.module && w == &**k)
                    });
                Pick::Task(entry, warm_hit)
            }
            None => {
                let due = self.next_due();
                Pick::Wait(match (wake, due) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                })
            }
        }
    }
}

/// How many slots past a reserved band head a worker looks for a task it
/// may take: bounded, so a band full of reserved tasks costs a pick little.
const SCAN_PAST_RESERVED: usize = 64;

/// Until when `entry` is kept for a worker where its (module, key) is warm
/// (the affinity window after it was queued), if it is.
fn reserved_until(
    entry: &Entry,
    warm_elsewhere: &dyn Fn(&ModuleId, &str) -> bool,
    now: Millis,
    policy: Policy,
) -> Option<Millis> {
    let until = entry.queued_at + policy.affinity_window_ms;
    let reserved = entry
        .affinity
        .as_ref()
        .is_some_and(|k| warm_elsewhere(&entry.module, k))
        && now < until;
    reserved.then_some(until)
}

enum QueueRef {
    Priority(Option<ModuleId>, usize),
    Key(Key),
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: Policy = Policy {
        aging_ms: 10_000,
        affinity_window_ms: 1_000,
    };

    fn entry(id: &str, priority: u8, queued_at: Millis, affinity: Option<&str>) -> Entry {
        Entry {
            id: Arc::from(id),
            job: Some(Arc::from("j")),
            module: ModuleId::of(b"m"),
            payload: Some(Arc::from(&b""[..])),
            affinity: affinity.map(Arc::from),
            priority,
            tags: Arc::default(),
            timeout_ms: 1000,
            memory_bytes: 1 << 20,
            max_attempts: 1,
            attempts: 0,
            queued_at,
            ready_us: queued_at * 1000,
            not_before: None,
            state: crate::model::TaskState::Pending,
            results_of: None,
        }
    }

    fn take(
        index: &mut ReadyIndex,
        warm: &[(ModuleId, String)],
        elsewhere: bool,
        now: Millis,
    ) -> Option<String> {
        match index.pick(None, warm, &|_, _| elsewhere, now, POLICY) {
            Pick::Task(e, _) => Some(e.id.to_string()),
            Pick::Wait(_) => None,
        }
    }

    #[test]
    fn strict_priority_then_fifo() {
        let mut index = ReadyIndex::default();
        for (id, p, t) in [
            ("a", 3, 0),
            ("b", 9, 1),
            ("c", 3, 2),
            ("d", 9, 3),
            ("e", 1, 4),
        ] {
            index.insert(entry(id, p, t, None), 10);
        }
        let order: Vec<String> = std::iter::from_fn(|| take(&mut index, &[], false, 10)).collect();
        assert_eq!(order, ["b", "d", "a", "c", "e"]);
        assert_eq!(index.depth(), [0; 10]);
    }

    #[test]
    fn aging_lets_an_old_low_priority_task_through() {
        let mut index = ReadyIndex::default();
        index.insert(entry("old", 1, 0, None), 0);
        index.insert(entry("new", 9, 100_000, None), 100_000);
        // 100 s of waiting at 10 s per level: effective 11 > 9.
        assert_eq!(
            take(&mut index, &[], false, 100_000).as_deref(),
            Some("old")
        );
    }

    #[test]
    fn held_tasks_wait_until_raised_and_delayed_ones_until_due() {
        let mut index = ReadyIndex::default();
        index.insert(entry("held", 0, 0, None), 0);
        let mut later = entry("later", 5, 0, None);
        later.not_before = Some(500);
        index.insert(later, 0);
        assert!(matches!(
            index.pick(None, &[], &|_, _| false, 0, POLICY),
            Pick::Wait(Some(500))
        ));
        index.promote_due(500);
        assert_eq!(take(&mut index, &[], false, 500).as_deref(), Some("later"));
        assert_eq!(take(&mut index, &[], false, 500), None);
        assert!(index.set_priority("held", 4, 600));
        assert_eq!(take(&mut index, &[], false, 600).as_deref(), Some("held"));
    }

    #[test]
    fn warm_worker_prefers_its_key_and_others_leave_it_alone_for_the_window() {
        let mut index = ReadyIndex::default();
        index.insert(entry("plain", 5, 0, None), 0);
        index.insert(entry("usd", 5, 10, Some("curve=USD")), 10);
        let warm = vec![(ModuleId::of(b"m"), "curve=USD".to_string())];
        assert_eq!(
            take(&mut index, &warm, false, 20).as_deref(),
            Some("usd"),
            "warm match beats an older equal"
        );
        index.insert(entry("usd2", 5, 30, Some("curve=USD")), 30);
        // A cold worker skips the task reserved for the warm one...
        assert_eq!(take(&mut index, &[], true, 40).as_deref(), Some("plain"));
        assert!(matches!(
            index.pick(None, &[], &|_, _| true, 40, POLICY),
            Pick::Wait(Some(1030))
        ));
        // ...until the affinity window has passed.
        assert_eq!(take(&mut index, &[], true, 1030).as_deref(), Some("usd2"));
    }

    #[test]
    fn a_reserved_head_does_not_hold_up_its_band() {
        let mut index = ReadyIndex::default();
        index.insert(entry("usd", 5, 0, Some("curve=USD")), 0);
        index.insert(entry("usd2", 5, 1, Some("curve=USD")), 1);
        index.insert(entry("plain", 5, 2, None), 2);
        // A cold worker passes both reserved tasks and takes the one behind...
        assert_eq!(take(&mut index, &[], true, 10).as_deref(), Some("plain"));
        // ...then waits for the window, and the warm worker gets its tasks in order.
        assert!(matches!(
            index.pick(None, &[], &|_, _| true, 10, POLICY),
            Pick::Wait(Some(1000))
        ));
        let warm = vec![(ModuleId::of(b"m"), "curve=USD".to_string())];
        assert_eq!(take(&mut index, &warm, false, 20).as_deref(), Some("usd"));
        assert_eq!(take(&mut index, &warm, false, 20).as_deref(), Some("usd2"));
        assert_eq!(index.depth(), [0; 10]);
    }

    #[test]
    fn warm_preference_yields_to_an_overdue_higher_priority_task() {
        let mut index = ReadyIndex::default();
        let warm = vec![(ModuleId::of(b"m"), "k".to_string())];
        index.insert(entry("urgent", 9, 0, None), 0);
        index.insert(entry("warm", 2, 0, Some("k")), 0);
        assert_eq!(
            take(&mut index, &warm, false, 500).as_deref(),
            Some("warm"),
            "within the window"
        );
        index.insert(entry("warm2", 2, 0, Some("k")), 0);
        assert_eq!(
            take(&mut index, &warm, false, 1500).as_deref(),
            Some("urgent"),
            "overdue"
        );
    }

    #[test]
    fn paused_jobs_park_and_resume() {
        let mut index = ReadyIndex::default();
        index.insert(entry("a", 5, 0, None), 0);
        index.pause(Arc::from("j"));
        assert_eq!(take(&mut index, &[], false, 1), None);
        assert_eq!(index.job_waiting("j"), 1);
        index.resume("j", 2);
        assert_eq!(take(&mut index, &[], false, 2).as_deref(), Some("a"));
        index.insert(entry("b", 5, 0, None), 0);
        assert_eq!(index.remove_job("j").len(), 1);
        assert_eq!(take(&mut index, &[], false, 3), None);
    }
}
