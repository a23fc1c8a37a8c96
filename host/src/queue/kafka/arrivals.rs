//! Waiting for a module uploaded on another host: its bytes reach this
//! host's view through the modules topic, usually within milliseconds of
//! the task that names it. A fetch waits on the view's commits (woken when
//! module records are stored), not on a polling sleep.

use crate::queue::{CommitObserver, Committed, ModuleRecord};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// Told by the view's writer whenever module records are stored.
#[derive(Default)]
pub(super) struct ModuleArrivals {
    /// Batches of modules stored so far (a change means "look again").
    stored: Mutex<u64>,
    changed: Condvar,
}

impl ModuleArrivals {
    /// `find()` until it yields, waiting for module arrivals in between,
    /// for at most `patience`; `None` if it never did or `gave_up()` says so.
    pub(super) fn wait_for<T>(
        &self,
        patience: Duration,
        mut find: impl FnMut() -> Option<T>,
        gave_up: impl Fn() -> bool,
    ) -> Option<T> {
        let deadline = Instant::now() + patience;
        loop {
            let seen = *self.stored.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(found) = find() {
                return Some(found);
            }
            let now = Instant::now();
            if now >= deadline || gave_up() {
                return None;
            }
            let guard = self.stored.lock().unwrap_or_else(|p| p.into_inner());
            let _ = self
                .changed
                .wait_timeout_while(guard, deadline - now, |stored| {
                    *stored == seen && !gave_up()
                });
        }
    }

    /// Wake every waiting fetch (the host is closing).
    pub(super) fn wake_all(&self) {
        let _guard = self.stored.lock().unwrap_or_else(|p| p.into_inner());
        self.changed.notify_all();
    }
}

impl CommitObserver for ModuleArrivals {
    fn committed(&self, _batch: &[Committed]) {}

    fn modules_stored(&self, _modules: &[ModuleRecord]) {
        *self.stored.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn a_fetch_is_woken_by_the_arrival_not_by_a_clock() {
        let arrivals = Arc::new(ModuleArrivals::default());
        let present = Arc::new(AtomicBool::new(false));
        let waiter = std::thread::spawn({
            let (arrivals, present) = (arrivals.clone(), present.clone());
            move || {
                arrivals.wait_for(
                    Duration::from_secs(60),
                    || present.load(Ordering::Acquire).then_some("bytes"),
                    || false,
                )
            }
        });
        present.store(true, Ordering::Release);
        arrivals.modules_stored(&[]);
        assert_eq!(waiter.join().unwrap(), Some("bytes"));
    }

    #[test]
    fn a_fetch_gives_up_when_told() {
        let arrivals = ModuleArrivals::default();
        let found: Option<()> = arrivals.wait_for(Duration::from_secs(60), || None, || true);
        assert_eq!(found, None);
    }
}
