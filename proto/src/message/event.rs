//! What lmsd reports while a request runs, and to an `events` subscription.

use serde::{Deserialize, Serialize};

use crate::task::TaskKind;

/// Streamed progress of a request; `event` names the variant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The backend is loading the model for this request; `progress` runs 0..1.
    Load {
        model_instance_id: String,
        progress: f64,
    },
    /// A piece of reasoning text.
    Reasoning { content: String },
    /// A piece of the answer.
    Delta { content: String },
    /// The task waits in lmsd's queue; `position` 1 is next.
    Queued { task_id: String, position: u32 },
    // What an `events` subscription hears, for every task and instance:
    /// lmsd started loading a model.
    LoadStarted { model: String },
    /// A load finished.
    Loaded {
        model: String,
        instance_id: String,
        load_ms: u64,
    },
    /// A load failed.
    LoadFailed { model: String, error: String },
    /// An instance was unloaded: `reason` is `idle_ttl`, `memory` or `unload`.
    Unloaded {
        model: String,
        instance_id: String,
        reason: String,
    },
    /// A task was accepted.
    TaskQueued {
        task_id: String,
        kind: TaskKind,
        model: String,
    },
    /// A task got a slot on an instance.
    TaskStarted {
        task_id: String,
        instance_id: String,
    },
    /// A task ended: `outcome` is `ok` or an error code.
    TaskFinished {
        task_id: String,
        outcome: String,
        total_ms: u64,
    },
    /// LM Studio became reachable or unreachable.
    Backend { reachable: bool },
    /// An instance was loaded with another context length than lmsd asked for (LM Studio's
    /// MLX auto-fit, or a llama.cpp load that shrank it): tasks that need more are not sent
    /// to it.
    ContextMismatch {
        model: String,
        instance_id: String,
        requested: u32,
        loaded: u32,
    },
    /// A batch job's line finished (to an `events` subscription).
    BatchProgress {
        job_id: String,
        done: u64,
        failed: u64,
        total: u64,
    },
    /// One line of a job's results (`batch_results`): `id`, then `result` or `error`.
    BatchLine { line: serde_json::Value },
    /// An event this client does not know yet (sent by a newer daemon): skip it.
    #[serde(other)]
    Unknown,
}
