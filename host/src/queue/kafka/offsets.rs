//! Which offsets of each partition a host may commit. Tasks finish out of
//! order, so a partition's committed offset is the lowest offset still in
//! flight (or one past the highest read when none is): a host that dies
//! replays at most its unfinished tasks, never skips one.

use std::collections::{BTreeSet, HashMap};

/// A topic partition.
pub(crate) type Partition = (String, i32);

/// Progress of one partition.
#[derive(Debug, Default)]
struct PartitionProgress {
    /// Read but not finished.
    in_flight: BTreeSet<i64>,
    /// One past the highest offset read.
    next: i64,
    /// The last offset handed to a commit.
    committed: i64,
}

/// Progress of every partition this host reads.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    partitions: HashMap<Partition, PartitionProgress>,
}

impl Progress {
    /// An offset was read and handed to the scheduler.
    pub(crate) fn read(&mut self, partition: &Partition, offset: i64) {
        let p = self.partitions.entry(partition.clone()).or_default();
        p.in_flight.insert(offset);
        p.next = p.next.max(offset + 1);
    }

    /// The task read at `offset` is finished (its outcome is durable).
    /// Ignored for partitions this host no longer owns.
    pub(crate) fn finished(&mut self, partition: &Partition, offset: i64) {
        if let Some(p) = self.partitions.get_mut(partition) {
            p.in_flight.remove(&offset);
        }
    }

    /// Offsets to commit now: each partition whose commit point moved.
    pub(crate) fn take_commit_points(&mut self) -> Vec<(Partition, i64)> {
        let mut out = Vec::new();
        for (partition, p) in &mut self.partitions {
            let point = p.in_flight.first().copied().unwrap_or(p.next);
            if point > p.committed {
                p.committed = point;
                out.push((partition.clone(), point));
            }
        }
        out
    }

    /// A commit of this partition failed: commit its point again next time.
    pub(crate) fn commit_failed(&mut self, partition: &Partition) {
        if let Some(p) = self.partitions.get_mut(partition) {
            p.committed = 0;
        }
    }

    /// The commit point of every partition (for a final, synchronous commit).
    pub(crate) fn all(&self) -> Vec<(Partition, i64)> {
        self.partitions
            .iter()
            .filter(|(_, p)| p.next > 0)
            .map(|(partition, p)| {
                (
                    partition.clone(),
                    p.in_flight.first().copied().unwrap_or(p.next),
                )
            })
            .collect()
    }

    /// Forget a partition given to another host.
    pub(crate) fn revoke(&mut self, partition: &Partition) {
        self.partitions.remove(partition);
    }

    /// Tasks read but not finished, over all partitions.
    pub(crate) fn in_flight(&self) -> usize {
        self.partitions.values().map(|p| p.in_flight.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_stop_at_the_lowest_unfinished_offset() {
        let p: Partition = ("t".into(), 0);
        let mut progress = Progress::default();
        for offset in 10..15 {
            progress.read(&p, offset);
        }
        assert_eq!(progress.take_commit_points(), vec![(p.clone(), 10)]);
        progress.finished(&p, 12);
        progress.finished(&p, 13);
        assert!(
            progress.take_commit_points().is_empty(),
            "10 is still running"
        );
        progress.finished(&p, 10);
        assert_eq!(progress.take_commit_points(), vec![(p.clone(), 11)]);
        progress.finished(&p, 11);
        assert_eq!(progress.take_commit_points(), vec![(p.clone(), 14)]);
        progress.finished(&p, 14);
        assert_eq!(progress.take_commit_points(), vec![(p.clone(), 15)]);
        assert_eq!(progress.in_flight(), 0);
        progress.commit_failed(&p);
        assert_eq!(
            progress.take_commit_points(),
            vec![(p.clone(), 15)],
            "retried after a failure"
        );
        progress.revoke(&p);
        progress.finished(&p, 20);
        assert!(progress.take_commit_points().is_empty());
    }
}
