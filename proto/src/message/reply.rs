//! What lmsd answers: the reply line, the result kinds, and their payloads.

use serde::{Deserialize, Serialize};

pub use super::batch::{
    BatchDeleted, BatchJob, BatchJobList, BatchResults, BatchState, InvalidLine,
};
use super::{Event, StatusReport};
use crate::error::WireError;
use crate::task::{CancelOutcome, SessionList, TaskList};

/// A reply line. `id` echoes the request's id; it is `null` only when the request line was so
/// broken that no id could be read from it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub id: Option<String>,
    #[serde(flatten)]
    pub body: ReplyBody,
}

/// `type` of a reply: `result` and `error` are terminal (exactly one per request), `event`s come
/// before them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ReplyBody {
    /// Boxed: outcomes are large and rare beside events, and every connection's reply queue
    /// holds a block of replies.
    Result(Box<Outcome>),
    Event(Event),
    Error {
        error: WireError,
    },
}

impl Reply {
    pub fn result(id: String, outcome: Outcome) -> Self {
        Reply {
            id: Some(id),
            body: ReplyBody::Result(Box::new(outcome)),
        }
    }

    pub fn event(id: String, event: Event) -> Self {
        Reply {
            id: Some(id),
            body: ReplyBody::Event(event),
        }
    }

    pub fn error(id: Option<String>, error: WireError) -> Self {
        Reply {
            id,
            body: ReplyBody::Error { error },
        }
    }

    /// True for the one reply that ends a request.
    pub fn is_terminal(&self) -> bool {
        !matches!(self.body, ReplyBody::Event(_))
    }
}

/// The payload of a `result` reply; `kind` names the request it answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Outcome {
    Status(StatusReport),
    Models(ModelList),
    Load(LoadOutcome),
    Unload(UnloadOutcome),
    Chat(ChatOutcome),
    Pin(PinOutcome),
    Reload(ReloadOutcome),
    Embed(EmbedOutcome),
    Tasks(TaskList),
    Cancel(CancelOutcome),
    Sessions(SessionList),
    Savings(SavingsReport),
    Fitness(FitnessReport),
    Metrics(MetricsText),
    /// `batch_submit`, `batch_status` of one job, `batch_cancel`.
    Batch(BatchJob),
    /// `batch_status` without a job.
    BatchList(BatchJobList),
    BatchResults(BatchResults),
    BatchDeleted(BatchDeleted),
    /// A result kind this client does not know yet (from a newer daemon).
    #[serde(other)]
    Unknown,
}

/// Prometheus' text exposition format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricsText {
    pub text: String,
}

/// How a task went inside lmsd: which model and why, and where the time went.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskReport {
    pub task_id: String,
    /// The model key the task ran on.
    pub model: String,
    /// Why that model: `"requested"`, `"loaded instance meets the needs"`, …
    pub reason: String,
    /// Waiting for a slot, a load or memory, load time excluded.
    pub queued_ms: u64,
    /// Loading the model for this task (0 when it was warm).
    pub load_ms: u64,
    /// Submission to answer.
    pub total_ms: u64,
    /// Tries it took (more than 1 after transient failures or fallbacks).
    pub attempts: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbedOutcome {
    pub model_instance_id: String,
    pub embeddings: Vec<Vec<f64>>,
    #[serde(flatten)]
    pub task: TaskReport,
}

/// What a config reload did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReloadOutcome {
    /// The config file read, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Sections applied live, e.g. `pool`, `models`, `log.level`.
    pub applied: Vec<String>,
    /// Changed settings that take effect only after a restart, e.g. `server.socket`.
    pub needs_restart: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelList {
    pub models: Vec<ModelInfo>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    Llm,
    Embedding,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub key: String,
    #[serde(rename = "type")]
    pub kind: ModelKind,
    pub display_name: String,
    pub size_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params_string: Option<String>,
    pub max_context_length: u32,
    pub vision: bool,
    pub reasoning: bool,
    pub tool_use: bool,
    /// Ids of the loaded instances of this model, empty when it is not loaded.
    pub loaded_instances: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadOutcome {
    pub model: String,
    pub instance_id: String,
    pub load_time_seconds: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_length: Option<u32>,
    /// True when an instance was already loaded and no load was made.
    #[serde(default)]
    pub already_loaded: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PinOutcome {
    pub model: String,
    pub pinned: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnloadOutcome {
    /// The instance ids that were unloaded (and verified gone).
    pub unloaded: Vec<String>,
    /// Rounds of unload-then-verify it took.
    pub rounds: u32,
}

/// Where `content` came from: the message, or the reasoning when the message was empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContentSource {
    Message,
    Reasoning,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatOutcome {
    pub content: String,
    pub content_source: ContentSource,
    pub model_instance_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_id: Option<String>,
    pub usage: Usage,
    /// With a contract: the answer parsed (for `choices`, the label as a JSON string).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub json: Option<serde_json::Value>,
    /// With a contract: its kind, and how many answers it took to keep it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contract: Option<ContractReport>,
    #[serde(flatten)]
    pub task: TaskReport,
}

/// How each model kept its contracts, from the ledger: one row per model and contract kind.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FitnessReport {
    /// Seconds covered (absent: everything in the ledger).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_s: Option<u64>,
    pub models: Vec<FitnessRow>,
}

/// One model's record on one kind of contract. A task that tried several models counts on
/// each; `passed_first` + `passed_retry` + `failed` = `tasks`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FitnessRow {
    pub model: String,
    pub kind: ContractKind,
    /// False for `check_only` tasks: the bare model, not held to the contract by the engine.
    pub constrained: bool,
    pub tasks: u64,
    /// Kept by the first answer.
    pub passed_first: u64,
    /// Kept by the retry at temperature 0.
    pub passed_retry: u64,
    /// Broken by both answers.
    pub failed: u64,
    /// (`passed_first` + `passed_retry`) / `tasks`.
    pub pass_rate: f64,
}

/// The kind of a chat's contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContractKind {
    Schema,
    Choices,
    JsonObject,
    /// A kind this client does not know yet (sent by a newer daemon).
    #[serde(other)]
    Unknown,
}

impl ContractKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ContractKind::Schema => "schema",
            ContractKind::Choices => "choices",
            ContractKind::JsonObject => "json_object",
            ContractKind::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for ContractKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a chat kept its contract: `passed` is always true on a result (an answer that broke it
/// is the error `output_invalid`); `attempts` counts the answers it took, across models.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContractReport {
    pub kind: ContractKind,
    pub passed: bool,
    pub attempts: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub input_tokens: u64,
    pub total_output_tokens: u64,
    pub reasoning_output_tokens: u64,
    /// Set when this request made the backend load the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_load_time_seconds: Option<f64>,
}

/// Tokens served locally and what they would have cost at the configured paid prices.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SavingsTotals {
    pub tasks: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub usd_saved: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavingsGroup {
    pub key: String,
    #[serde(flatten)]
    pub totals: SavingsTotals,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavingsReport {
    /// Seconds covered (absent: everything in the ledger).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_s: Option<u64>,
    pub input_usd_per_mtok: f64,
    pub output_usd_per_mtok: f64,
    #[serde(flatten)]
    pub totals: SavingsTotals,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<SavingsGroup>,
}
