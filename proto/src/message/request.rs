//! What clients ask: the request line's envelope, the requests by type, and their payloads.

use serde::{Deserialize, Serialize};

pub use super::batch::{BatchDefaults, BatchJobRequest, BatchStatusRequest, BatchSubmitRequest};
use crate::task::{Needs, Priority, WireDuration};
use crate::ttl::Ttl;

/// A request line: `{"v":1, "id":"c1", "type":"chat", ...fields}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Envelope {
    pub v: u32,
    pub id: String,
    #[serde(flatten)]
    pub request: Request,
}

/// What a client asks of the daemon; the `type` field names the variant.
// Most requests are chats, and a request lives only while it is served: boxing the large
// variant would add an allocation to nearly every request and save nothing kept.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// Daemon, backend and loaded instances.
    Status,
    /// LM Studio's model catalogue.
    Models,
    /// Load an instance of a model.
    Load(LoadRequest),
    /// Unload every instance of a model key, or one instance.
    Unload(UnloadRequest),
    /// Run one chat turn.
    Chat(ChatRequest),
    /// Keep a model loaded always (loaded now if it is not).
    Pin(PinRequest),
    /// Let a pinned model be evicted and expire again.
    Unpin(PinRequest),
    /// Re-read the config file and apply what can change live (as SIGHUP does).
    Reload,
    /// Embed texts with an embedding model.
    Embed(EmbedRequest),
    /// List queued and running tasks.
    Tasks,
    /// Cancel a queued or running task.
    Cancel(CancelRequest),
    /// List stateful sessions, or forget one.
    Sessions(SessionsRequest),
    /// What the tasks served locally would have cost at paid prices.
    Savings(SavingsRequest),
    /// How often each model kept its contracts (schema, choices, JSON object).
    Fitness(FitnessRequest),
    /// Prometheus metrics, as text.
    Metrics,
    /// Subscribe to what happens in lmsd: loads, unloads, tasks, the backend. Events come until
    /// the client hangs up (or lmsd stops: then a `shutting_down` error ends it).
    Events,
    /// Submit a batch job: a JSONL file of tasks, validated whole, then run in the background.
    BatchSubmit(BatchSubmitRequest),
    /// One job's progress, or every job's.
    BatchStatus(BatchStatusRequest),
    /// A job's results, one `batch_line` event per line in input order, then a count.
    BatchResults(BatchJobRequest),
    /// Stop a job: lines not yet done are not run.
    BatchCancel(BatchJobRequest),
    /// Delete a job and everything stored with it (cancelled first if it runs).
    BatchDelete(BatchJobRequest),
}

/// `{"type":"fitness", "since":"7d"}`; `since` optional.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FitnessRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<WireDuration>,
}

/// `{"type":"savings", "since":"7d", "by":"model"}`; both optional.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavingsRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<WireDuration>,
    /// `model`, `agent` or `day`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<SavingsGrouping>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SavingsGrouping {
    Model,
    Agent,
    Day,
}

impl std::str::FromStr for SavingsGrouping {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "model" => Ok(SavingsGrouping::Model),
            "agent" => Ok(SavingsGrouping::Agent),
            "day" => Ok(SavingsGrouping::Day),
            other => Err(format!(
                "cannot group by {other:?}: use model, agent or day"
            )),
        }
    }
}

/// Options every task takes: priority, deadline, and what `auto` must find.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TaskOptions {
    pub priority: Priority,
    /// Time from submission to answer; default `[tasks] default_timeout`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<WireDuration>,
    /// For `"model": "auto"`: what the model must be able to do.
    #[serde(skip_serializing_if = "Needs::is_empty")]
    pub needs: Needs,
    /// Models to try first, in order (with `auto`), or after the named one fails.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub prefer: Vec<String>,
    /// Who asked (an agent's name): the savings ledger can group by it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
}

/// `{"type":"embed", "model":"auto", "input":["text", …]}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbedRequest {
    /// An embedding model's key or instance id, or `auto`.
    pub model: String,
    pub input: Vec<String>,
    #[serde(default, flatten)]
    pub options: TaskOptions,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CancelRequest {
    pub task_id: String,
}

/// `{"type":"sessions"}` lists; `{"type":"sessions","forget":"NAME"}` drops one first.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionsRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forget: Option<String>,
}

/// `{"type":"pin", "model":"qwen/qwen3-4b"}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PinRequest {
    pub model: String,
}

/// `{"type":"load", "model":"qwen/qwen3-4b", "context_length":8192}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadRequest {
    pub model: String,
    #[serde(flatten)]
    pub settings: LoadSettings,
    /// Idle TTL of the instance: `"15m"`, `"0"` or `"never"`; default from the config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<Ttl>,
    /// Pin the model as well (see `pin`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pin: bool,
}

/// LM Studio's load settings, passed on as given: a load request's, and a model's in the
/// config (`[models."KEY"]`). On the wire they sit beside the request's other fields.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
// Denying here is what refuses an unknown field of a request that flattens this struct.
#[serde(deny_unknown_fields, default)]
pub struct LoadSettings {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context_length: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_batch_size: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flash_attention: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_experts: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offload_kv_cache_to_gpu: Option<bool>,
}

impl LoadSettings {
    /// Sets nothing: the engine's defaults apply.
    pub fn is_empty(&self) -> bool {
        *self == LoadSettings::default()
    }

    /// Each setting from `self`, or from `fallback` where `self` leaves it unset.
    pub fn or(self, fallback: LoadSettings) -> LoadSettings {
        LoadSettings {
            context_length: self.context_length.or(fallback.context_length),
            eval_batch_size: self.eval_batch_size.or(fallback.eval_batch_size),
            flash_attention: self.flash_attention.or(fallback.flash_attention),
            num_experts: self.num_experts.or(fallback.num_experts),
            offload_kv_cache_to_gpu: self
                .offload_kv_cache_to_gpu
                .or(fallback.offload_kv_cache_to_gpu),
        }
    }
}

/// `{"type":"unload", "model":"qwen/qwen3-4b"}` unloads every instance of the key;
/// `{"type":"unload", "instance_id":"qwen/qwen3-4b:2"}` unloads that one. Exactly one is given.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnloadRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    /// Every instance lmsd may unload (pinned ones stay).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub all: bool,
}

/// One chat turn. `stream: true` sends `delta` events before the result.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatRequest {
    /// A model key or a loaded instance id.
    pub model: String,
    pub input: String,
    /// Images for a vision model, as data URLs (`data:image/png;base64,…`); with `auto` they
    /// imply `needs.vision`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_prompt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_output_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_response_id: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stream: bool,
    /// Idle TTL of the instance after this task: `"15m"`, `"0"` or `"never"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<Ttl>,
    /// Continue the conversation kept under this name (per model); lmsd stores its last
    /// `response_id` across restarts. An explicit `previous_response_id` wins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// Unload the instance once it is idle after this task (its TTL becomes `"0"`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unload_after: bool,
    /// Keep the instance loaded after this task (its TTL becomes `"never"`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub keep: bool,
    /// Context length to load the model with, if this task loads it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_length: Option<u32>,
    /// Keep the reply on the engine so that it can be continued, and answer with its
    /// `response_id`. Implied by `session` and `previous_response_id`; otherwise lmsd asks the
    /// engine to keep nothing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub store: bool,
    /// Contract: the answer is one JSON value valid against this JSON Schema (the engine is
    /// constrained to it, and lmsd checks it). At most one of `schema`, `choices`,
    /// `json_object`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<serde_json::Value>,
    /// Contract: the answer is exactly one of these labels (a classification).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub choices: Vec<String>,
    /// Contract: the answer is a JSON object.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub json_object: bool,
    /// Check the contract without constraining the engine to it: how the bare model does, or
    /// an engine whose constrained output is broken. On LM Studio such a chat stays on the
    /// native chat, sessions included.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub check_only: bool,
    #[serde(default, flatten)]
    pub options: TaskOptions,
}
