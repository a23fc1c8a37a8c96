//! What an expander that died had written past its last cursor: the band
//! messages from the cursor's scan positions to the bands' ends, read
//! outside any group, filtered to the job's points. Its successor writes
//! only the points in the gap, so after a death no point is missing and
//! none is written twice, without Kafka transactions.

use super::super::reads::TopicKind;
use super::super::wire::{ScanFrom, TaskMessage};
use super::super::{Member, topics};
use crate::queue::QueueError;
use rdkafka::consumer::Consumer;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use std::collections::{BTreeSet, HashSet};
use std::time::{Duration, Instant};

/// Longest a scan may take before the expander gives up and tries again.
const SCAN_LIMIT: Duration = Duration::from_secs(120);

/// The indices at or past `next` of `job`'s points found on the bands from
/// `scan` to their current ends.
pub(super) fn written_past(
    shared: &Member,
    job: &str,
    next: u64,
    scan: &[ScanFrom],
) -> Result<BTreeSet<u64>, QueueError> {
    let mut found = BTreeSet::new();
    let prefix = format!("{job}.");
    scan_bands(shared, scan, &format!("job {job}'s points"), |task| {
        if task.job_id.as_deref() == Some(job)
            && let Some(index) = task
                .id
                .as_deref()
                .and_then(|id| id.strip_prefix(&prefix))
                .and_then(|i| i.parse::<u64>().ok())
            && index >= next
        {
            found.insert(index);
        }
    })?;
    Ok(found)
}

/// Which of the lone tasks `ids` are on the bands from `scan` (the
/// earliest position of each partition named) to their current ends:
/// those a dead expander released before it could say so.
pub(super) fn tasks_written(
    shared: &Member,
    ids: &HashSet<String>,
    scan: &[ScanFrom],
) -> Result<HashSet<String>, QueueError> {
    let mut earliest: Vec<ScanFrom> = Vec::new();
    for from in scan {
        match earliest
            .iter_mut()
            .find(|e| e.topic == from.topic && e.partition == from.partition)
        {
            Some(e) => e.offset = e.offset.min(from.offset),
            None => earliest.push(from.clone()),
        }
    }
    let mut found = HashSet::new();
    scan_bands(shared, &earliest, "released tasks", |task| {
        if let Some(id) = task.id.as_deref().filter(|id| ids.contains(*id)) {
            found.insert(id.to_string());
        }
    })?;
    Ok(found)
}

/// Read every task message on the bands from `scan` to their ends (as
/// they are now), outside any group, and show each to `visit`; `what` names
/// the search in errors.
fn scan_bands(
    shared: &Member,
    scan: &[ScanFrom],
    what: &str,
    mut visit: impl FnMut(&TaskMessage),
) -> Result<(), QueueError> {
    let consumer = topics::reader(&shared.config, "expand-scan")?;
    let mut list = TopicPartitionList::new();
    let mut ends = Vec::new();
    for from in scan {
        let (low, high) = consumer
            .fetch_watermarks(&from.topic, from.partition, Duration::from_secs(30))
            .map_err(|e| QueueError::storage(format!("the end of {}", from.topic), e))?;
        // Retention may have deleted the start of the range: scan what is left.
        let start = from.offset.max(low);
        if high > start {
            list.add_partition_offset(&from.topic, from.partition, Offset::Offset(start))
                .map_err(|e| QueueError::storage("choosing where to scan from", e))?;
            ends.push((from.topic.clone(), from.partition, high));
        }
    }
    if ends.is_empty() {
        return Ok(());
    }
    consumer
        .assign(&list)
        .map_err(|e| QueueError::storage("scanning the bands", e))?;
    let started = Instant::now();
    while !ends.is_empty() {
        if started.elapsed() > SCAN_LIMIT {
            return Err(QueueError::storage_message(format!(
                "scanning the bands for {what} took over {SCAN_LIMIT:?}"
            )));
        }
        if shared.closed() {
            return Err(QueueError::storage_message("closing".to_string()));
        }
        let Some(result) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let message = result.map_err(|e| QueueError::storage("scanning the bands", e))?;
        let value = message.payload().unwrap_or_default();
        shared.reads.add(
            TopicKind::Expand,
            message.key().map_or(0, <[u8]>::len),
            value.len(),
        );
        if let Ok(task) = TaskMessage::decode(value) {
            visit(&task);
        }
        let (topic, partition, offset) = (message.topic(), message.partition(), message.offset());
        ends.retain(|(t, p, end)| !(t == topic && *p == partition && offset + 1 >= *end));
    }
    Ok(())
}
