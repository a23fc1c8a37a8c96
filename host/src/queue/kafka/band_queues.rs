//! The task partitions read one queue each, so a band that holds
//! `band_buffer` tasks on this host is simply not read until it drains.
//! librdkafka then stops fetching for those partitions once each queue
//! holds its read-ahead, and drops nothing. Pausing the partitions instead
//! (as before 2026-12-07) made librdkafka drop its read-ahead of them and
//! fetch it again on resume: each task message was fetched 2.5-6.7 times on
//! tansu and up to 2.9 times on the mock broker.

use super::consumer::GroupContext;
use rdkafka::consumer::base_consumer::PartitionQueue;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaResult;
use rdkafka::message::BorrowedMessage;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Rung by librdkafka when a queue of the task consumer goes from empty to
/// non-empty, so the reading thread sleeps until there is something to
/// read instead of polling one queue with a timeout while another fills.
#[derive(Clone, Default)]
pub(super) struct Doorbell(Arc<(Mutex<bool>, Condvar)>);

impl Doorbell {
    /// Something arrived.
    pub(super) fn ring(&self) {
        let (rung, wake) = &*self.0;
        *rung.lock().unwrap_or_else(|p| p.into_inner()) = true;
        wake.notify_one();
    }

    /// Forget earlier rings: called before the queues are read, so a ring
    /// while they are read is not lost.
    pub(super) fn clear(&self) {
        *self.0.0.lock().unwrap_or_else(|p| p.into_inner()) = false;
    }

    /// Sleep until rung (since the last [`clear`](Self::clear)) or `limit`.
    pub(super) fn wait(&self, limit: Duration) {
        let (rung, wake) = &*self.0;
        let guard = rung.lock().unwrap_or_else(|p| p.into_inner());
        let _ = wake
            .wait_timeout_while(guard, limit, |rung| !*rung)
            .unwrap_or_else(|p| p.into_inner());
    }
}

/// One queue per assigned task partition, with the band it belongs to.
#[derive(Default)]
pub(super) struct BandQueues {
    queues: Vec<(u8, PartitionQueue<GroupContext>)>,
    /// Where the next read starts, so no partition of a band is always
    /// read first.
    next: usize,
}

impl BandQueues {
    /// Give every assigned task partition its own queue again: a rebalance
    /// (librdkafka's assign) puts a partition's messages back on the
    /// consumer's own queue, and a revoked partition must not be read.
    pub(super) fn rebuild(
        &mut self,
        consumer: &Arc<BaseConsumer<GroupContext>>,
        band_of: impl Fn(&str) -> Option<u8>,
        bell: &Doorbell,
    ) {
        self.queues.clear();
        let Ok(assignment) = consumer.assignment() else {
            return;
        };
        for element in assignment.elements() {
            let Some(band) = band_of(element.topic()) else {
                continue;
            };
            if let Some(mut queue) =
                consumer.split_partition_queue(element.topic(), element.partition())
            {
                let bell = bell.clone();
                queue.set_nonempty_callback(move || bell.ring());
                self.queues.push((band, queue));
            }
        }
    }

    /// Read what the queues hold, band by band while a band holds fewer
    /// than `buffer` tasks here (`depth`, counted up by one per message
    /// handed to `take`). Returns whether anything was read.
    pub(super) fn drain(
        &mut self,
        mut depth: [u64; 10],
        buffer: u64,
        mut take: impl FnMut(KafkaResult<BorrowedMessage<'_>>),
    ) -> bool {
        let count = self.queues.len();
        let mut took = false;
        for i in 0..count {
            let (band, queue) = &self.queues[(self.next + i) % count];
            let band = *band as usize;
            while depth[band] < buffer {
                let Some(result) = queue.poll(Duration::ZERO) else {
                    break;
                };
                take(result);
                depth[band] += 1;
                took = true;
            }
        }
        self.next = self.next.wrapping_add(1);
        took
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ring_while_reading_is_not_lost() {
        let bell = Doorbell::default();
        bell.clear();
        bell.ring();
        // Rung after the clear: the wait returns at once, not after the limit.
        let started = std::time::Instant::now();
        bell.wait(Duration::from_secs(30));
        assert!(started.elapsed() < Duration::from_secs(30));
    }

    #[test]
    fn a_ring_wakes_a_sleeping_reader() {
        let bell = Doorbell::default();
        bell.clear();
        let ringer = bell.clone();
        let thread = std::thread::spawn(move || ringer.ring());
        bell.wait(Duration::from_secs(30));
        thread.join().unwrap();
        assert!(*bell.0.0.lock().unwrap());
    }
}
