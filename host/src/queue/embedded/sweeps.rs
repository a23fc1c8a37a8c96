//! Lazy sweep expansion: a sweep is one job row and a cursor; its points
//! become tasks a chunk at a time as workers drain them, bounded in bytes
//! as well as in points, and never for held (priority 0), paused or
//! cancelled jobs.

use super::writer::Op;
use super::{EmbeddedQueue, HostState, Tags, entry_from_new};
use crate::model::{Millis, ModuleId, NewTask, Sweep, TaskOptions};
use std::sync::Arc;

/// Payload bytes one sweep may have created ahead of its workers (about
/// twice this are held at most: a refill starts when half are left).
const SWEEP_AHEAD_BYTES: u64 = 4 << 20;

/// Where a sweep's expansion stands: the points below `next` exist as tasks.
pub(super) struct SweepCursor {
    pub(super) job: Arc<str>,
    pub(super) module: ModuleId,
    pub(super) options: TaskOptions,
    pub(super) tags: Tags,
    pub(super) sweep: Sweep,
    pub(super) next: u64,
    pub(super) total: u64,
    /// Bytes of one point's payload (the base dominates), for the byte bound.
    pub(super) point_bytes: u64,
}

impl SweepCursor {
    /// A cursor over `job`'s sweep from point `next`.
    pub(super) fn new(
        job: Arc<str>,
        module: ModuleId,
        options: TaskOptions,
        sweep: Sweep,
        next: u64,
        total: u64,
    ) -> Self {
        let point_bytes = serde_json::to_vec(&sweep.point(next.min(total.saturating_sub(1))))
            .map_or(1, |p| p.len().max(1)) as u64;
        SweepCursor {
            job,
            module,
            tags: Arc::new(options.tags.clone()),
            options,
            sweep,
            next,
            total,
            point_bytes,
        }
    }
}

impl EmbeddedQueue {
    /// Create the next points of sweeps that are running low on waiting tasks.
    pub(super) fn refill_sweeps(&self, state: &mut HostState, now: Millis) {
        let chunk = self.inner.config.sweep_chunk.max(1);
        let mut ops = Vec::new();
        let HostState {
            sweeps,
            scheduler,
            jobs,
            ..
        } = state;
        let ready = &mut scheduler.ready;
        for cursor in sweeps.iter_mut() {
            let flags = jobs.get(&cursor.job).copied().unwrap_or_default();
            // Paused and held (priority 0) sweeps create nothing: their
            // points would only wait, costing memory and disk.
            let held = cursor.options.priority == 0;
            if held
                || flags.paused
                || flags.cancelled
                || flags.waiting
                || cursor.next >= cursor.total
            {
                continue;
            }
            // Bounded in bytes as well as in points: a sweep with a large
            // base (up to 64 KiB) creates fewer tasks ahead.
            let chunk = chunk.min((SWEEP_AHEAD_BYTES / cursor.point_bytes).max(16));
            if ready.job_waiting(&cursor.job) >= chunk / 2 {
                continue;
            }
            let end = (cursor.next + chunk).min(cursor.total);
            let mut tasks = Vec::with_capacity((end - cursor.next) as usize);
            for index in cursor.next..end {
                let task = NewTask {
                    id: format!("{}.{index}", cursor.job),
                    job_id: Some(cursor.job.to_string()),
                    module: cursor.module.clone(),
                    payload: serde_json::to_vec(&cursor.sweep.point(index)).unwrap_or_default(),
                    options: cursor.options.clone(),
                };
                ready.insert(entry_from_new(&task, cursor.tags.clone(), now), now);
                // Stored without its payload: it is made again from the
                // sweep when read (a 64 KiB base is not copied into every row).
                let stored = NewTask {
                    payload: Vec::new(),
                    ..task
                };
                tasks.push((stored, cursor.tags.clone()));
            }
            cursor.next = end;
            ops.push(Op::NewTasks(tasks, now));
            ops.push(Op::JobExpanded(cursor.job.to_string(), end));
        }
        sweeps.retain(|c| c.next < c.total && !jobs.get(&c.job).is_some_and(|f| f.cancelled));
        if !ops.is_empty() {
            self.inner.writer.send(ops);
        }
    }
}
