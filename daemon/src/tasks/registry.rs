//! The tasks lmsd has accepted and not yet answered: for `tasks` listings and `cancel`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use lmsd_proto::{Priority, TaskInfo, TaskKind, TaskState};
use tokio_util::sync::CancellationToken;

#[derive(Debug)]
struct Entry {
    kind: TaskKind,
    model: String,
    priority: Priority,
    instance_id: Option<String>,
    submitted: Instant,
    deadline: Instant,
    cancel: CancellationToken,
}

/// Accepted tasks by id. A plain mutex: every access is a quick map operation, never held
/// across an `.await`, and an actor would add a hop to every task for no gain.
#[derive(Debug, Default)]
pub struct Registry {
    tasks: Mutex<HashMap<String, Entry>>,
    next_id: AtomicU64,
}

/// A registered task; dropping it removes the task from the registry.
#[derive(Debug)]
pub struct TaskHandle {
    registry: Arc<Registry>,
    pub id: String,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.tasks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn register(
        self: &Arc<Self>,
        kind: TaskKind,
        model: &str,
        priority: Priority,
        deadline: Instant,
        cancel: CancellationToken,
    ) -> TaskHandle {
        let id = format!("t{}", self.next_id.fetch_add(1, Ordering::Relaxed) + 1);
        self.lock().insert(
            id.clone(),
            Entry {
                kind,
                model: model.to_owned(),
                priority,
                instance_id: None,
                submitted: Instant::now(),
                deadline,
                cancel,
            },
        );
        TaskHandle {
            registry: self.clone(),
            id,
        }
    }

    /// Cancels a task; false when there is no such task (any more).
    pub fn cancel(&self, id: &str) -> bool {
        match self.lock().get(id) {
            Some(entry) => {
                entry.cancel.cancel();
                true
            }
            None => false,
        }
    }

    pub fn list(&self) -> Vec<TaskInfo> {
        let now = Instant::now();
        let millis = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let mut tasks: Vec<TaskInfo> = self
            .lock()
            .iter()
            .map(|(id, entry)| TaskInfo {
                task_id: id.clone(),
                kind: entry.kind,
                model: entry.model.clone(),
                state: if entry.instance_id.is_some() {
                    TaskState::Running
                } else {
                    TaskState::Queued
                },
                priority: entry.priority,
                instance_id: entry.instance_id.clone(),
                age_ms: millis(now.saturating_duration_since(entry.submitted)),
                deadline_ms: millis(entry.deadline.saturating_duration_since(now)),
            })
            .collect();
        tasks.sort_by_key(|t| std::cmp::Reverse(t.age_ms));
        tasks
    }
}

impl TaskHandle {
    /// The task runs on `instance_id` now (or waits again, with `None`).
    pub fn set_instance(&self, instance_id: Option<&str>) {
        if let Some(entry) = self.registry.lock().get_mut(&self.id) {
            entry.instance_id = instance_id.map(str::to_owned);
        }
    }
}

impl Drop for TaskHandle {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_are_listed_cancelled_and_removed_when_done() {
        let registry = Arc::new(Registry::default());
        let deadline = Instant::now() + std::time::Duration::from_secs(60);
        let cancel = CancellationToken::new();
        let first = registry.register(
            TaskKind::Chat,
            "m",
            Priority::Batch,
            deadline,
            cancel.clone(),
        );
        let second = registry.register(
            TaskKind::Embed,
            "e",
            Priority::Normal,
            deadline,
            CancellationToken::new(),
        );
        assert_ne!(first.id, second.id);
        second.set_instance(Some("e"));
        let listed = registry.list();
        assert_eq!(listed.len(), 2);
        let running = listed.iter().find(|t| t.task_id == second.id).unwrap();
        assert_eq!(running.state, TaskState::Running);
        assert!(registry.cancel(&first.id));
        assert!(cancel.is_cancelled());
        drop(first);
        assert!(!registry.cancel("t1"));
        assert_eq!(registry.list().len(), 1);
    }
}
