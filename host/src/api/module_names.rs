//! What module a submission names, without a store read per submission: a
//! synchronous invocation's latency is a few hundred microseconds, and a
//! read on the store's reader thread was a fifth of it. Filled from reads
//! on a miss and kept current by the store's commits of module records
//! (uploads here or on another host re-point names). Modules are never
//! deleted, so an entry never goes stale but by a newer upload.

use crate::model::ModuleId;
use crate::queue::{CommitObserver, Committed, ModuleRecord};
use std::collections::{HashMap, HashSet};
use std::sync::RwLock;

/// Module names and ids known to be stored (a few per uploaded module).
#[derive(Default)]
pub struct ModuleNames {
    known: RwLock<Known>,
}

#[derive(Default)]
struct Known {
    names: HashMap<String, ModuleId>,
    ids: HashSet<ModuleId>,
}

impl ModuleNames {
    /// The module `name` points at, if known here.
    pub fn named(&self, name: &str) -> Option<ModuleId> {
        self.read().names.get(name).cloned()
    }

    /// Whether module `id` is known to be stored.
    pub fn is_stored(&self, id: &ModuleId) -> bool {
        self.read().ids.contains(id)
    }

    /// A read of the store found `name` pointing at `id`: remember it,
    /// unless a commit since told of a newer upload under that name.
    pub fn found(&self, name: &str, id: &ModuleId) {
        let mut known = self.write();
        known.ids.insert(id.clone());
        known
            .names
            .entry(name.to_string())
            .or_insert_with(|| id.clone());
    }

    /// A read of the store found module `id`.
    pub fn found_id(&self, id: &ModuleId) {
        self.write().ids.insert(id.clone());
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Known> {
        self.known.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Known> {
        self.known.write().unwrap_or_else(|p| p.into_inner())
    }
}

impl CommitObserver for ModuleNames {
    fn committed(&self, _batch: &[Committed]) {}

    fn modules_stored(&self, modules: &[ModuleRecord]) {
        let mut known = self.write();
        for module in modules {
            known.ids.insert(module.id.clone());
            if let Some(name) = &module.name {
                known.names.insert(name.clone(), module.id.clone());
            }
        }
    }
}
