//! Request, reply and event types: one named payload struct per variant.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{ErrorCode, WireError};
use crate::task::{CancelOutcome, Needs, Priority, SessionList, TaskKind, TaskList, WireDuration};
use crate::ttl::Ttl;
use crate::PROTOCOL_VERSION;

/// A request line: `{"v":1, "id":"c1", "type":"chat", ...fields}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Envelope {
    pub v: u32,
    pub id: String,
    #[serde(flatten)]
    pub request: Request,
}

/// What a client asks of the daemon; the `type` field names the variant.
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
    /// Prometheus metrics, as text.
    Metrics,
    /// Subscribe to what happens in lmsd: loads, unloads, tasks, the backend. Events come until
    /// the client hangs up (or lmsd stops: then a `shutting_down` error ends it).
    Events,
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

/// `{"type":"load", "model":"qwen/qwen3-4b", "context_length":8192}`. The optional fields are
/// LM Studio's load settings and are passed on as given.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadRequest {
    pub model: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_length: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_batch_size: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flash_attention: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_experts: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offload_kv_cache_to_gpu: Option<bool>,
    /// Idle TTL of the instance: `"15m"`, `"0"` or `"never"`; default from the config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<Ttl>,
    /// Pin the model as well (see `pin`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pin: bool,
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
    #[serde(default, flatten)]
    pub options: TaskOptions,
}

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
    Metrics(MetricsText),
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
    /// An event this client does not know yet (sent by a newer daemon): skip it.
    #[serde(other)]
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub daemon: DaemonInfo,
    pub backend: BackendStatus,
    /// Loaded instances, and loads in progress (`state: loading`).
    pub instances: Vec<InstanceStatus>,
    pub memory: MemoryStatus,
    /// The most recent unloads lmsd made on its own, newest first.
    #[serde(default)]
    pub evictions: Vec<Eviction>,
}

/// lmsd's memory budget: what LM Studio has loaded (by `size_bytes`, plus the configured
/// per-instance overhead), outside loads included.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryStatus {
    pub budget_bytes: u64,
    pub used_bytes: u64,
    pub free_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Eviction {
    pub instance_id: String,
    pub model: String,
    /// Why: `idle_ttl`, `memory` (made room for another model), `unload` (asked for).
    pub reason: String,
    pub seconds_ago: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    Loading,
    Idle,
    Busy,
    Unloading,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoadedBy {
    Lmsd,
    /// LM Studio's GUI, `lms load`, another client: counted, never unloaded unless
    /// `[pool] manage_external = true` or asked for by name.
    Outside,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DaemonInfo {
    pub version: String,
    pub protocol: u32,
    pub pid: u32,
    pub uptime_s: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendStatus {
    /// The engine lmsd drives: `lmstudio` or `llama-server` (`[backend] kind`).
    #[serde(default = "BackendStatus::default_engine")]
    pub engine: String,
    pub url: String,
    pub reachable: bool,
    /// True when lmsd runs against its embedded simulator (`lmsd --simulate`): replies are fake.
    pub simulated: bool,
    /// Why the last contact failed, while `reachable` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Milliseconds since the catalogue was last read successfully, if ever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refreshed_ms_ago: Option<u64>,
}

impl BackendStatus {
    /// What an lmsd from before `engine` was reported drives.
    fn default_engine() -> String {
        "lmstudio".into()
    }

    /// The engine's name for people: "LM Studio" or "llama-server".
    pub fn engine_name(&self) -> &str {
        match self.engine.as_str() {
            "lmstudio" => "LM Studio",
            other => other,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceStatus {
    /// Empty while the instance is still loading.
    pub instance_id: String,
    pub model: String,
    pub size_bytes: u64,
    pub context_length: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallel: Option<u32>,
    /// The context length lmsd asked for when it differs from `context_length`, the one the
    /// engine really loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_context_length: Option<u32>,
    pub state: InstanceState,
    pub in_flight: u32,
    /// Seconds since its last task ended (0 while busy).
    pub idle_s: u64,
    pub ttl: Ttl,
    /// Seconds until the idle TTL unloads it; absent when it never expires (TTL `never`,
    /// pinned, or loaded outside lmsd).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_left_s: Option<u64>,
    pub pinned: bool,
    pub loaded_by: LoadedBy,
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
    #[serde(flatten)]
    pub task: TaskReport,
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

/// A request line that could not be accepted: the error reply to send, with the id if one was
/// readable.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    pub id: Option<String>,
    pub error: WireError,
}

impl Rejection {
    pub fn into_reply(self) -> Reply {
        Reply::error(self.id, self.error)
    }
}

/// Parses one request line. Checks, in order: JSON object, `id`, `v`, then the request itself,
/// so that even a request of an unknown type is answered under its own id.
pub fn parse_request(line: &[u8]) -> Result<Envelope, Rejection> {
    let reject = |id: Option<String>, error: WireError| Rejection { id, error };
    let value: Value = serde_json::from_slice(line)
        .map_err(|e| reject(None, WireError::bad_request(format!("invalid JSON: {e}"))))?;
    let Value::Object(mut object) = value else {
        return Err(reject(
            None,
            WireError::bad_request("a request must be a JSON object"),
        ));
    };
    let id = match object.remove("id") {
        Some(Value::String(id)) => id,
        Some(_) => {
            return Err(reject(
                None,
                WireError::bad_request("\"id\" must be a string"),
            ))
        }
        None => return Err(reject(None, WireError::bad_request("missing \"id\""))),
    };
    let reject_for = |error: WireError| reject(Some(id.clone()), error);
    match object.remove("v") {
        Some(Value::Number(v)) if v.as_u64() == Some(u64::from(PROTOCOL_VERSION)) => {}
        Some(other) => {
            return Err(reject_for(WireError::new(
                    ErrorCode::UnsupportedVersion,
                format!(
                    "protocol version {other} is not supported; this lmsd speaks version {PROTOCOL_VERSION}"
                ),
            )))
        }
        None => {
            return Err(reject_for(WireError::bad_request(format!(
                "missing \"v\" (the protocol version, {PROTOCOL_VERSION})"
            ))))
        }
    }
    let request = request_from_object(object).map_err(reject_for)?;
    Ok(Envelope {
        v: PROTOCOL_VERSION,
        id,
        request,
    })
}

fn request_from_object(object: Map<String, Value>) -> Result<Request, WireError> {
    if !object.contains_key("type") {
        return Err(WireError::bad_request("missing \"type\""));
    }
    let request: Request = serde_json::from_value(Value::Object(object))
        .map_err(|e| WireError::bad_request(format!("invalid request: {e}")))?;
    request.validate()?;
    Ok(request)
}

impl Request {
    /// Checks what serde cannot: non-empty names, exactly one unload target.
    fn validate(&self) -> Result<(), WireError> {
        let non_empty = |field: &str, value: &str| {
            if value.trim().is_empty() {
                Err(WireError::bad_request(format!(
                    "\"{field}\" must not be empty"
                )))
            } else {
                Ok(())
            }
        };
        match self {
            Request::Status
            | Request::Models
            | Request::Reload
            | Request::Tasks
            | Request::Sessions(_)
            | Request::Savings(_)
            | Request::Metrics
            | Request::Events => Ok(()),
            Request::Cancel(cancel) => non_empty("task_id", &cancel.task_id),
            Request::Embed(embed) => {
                non_empty("model", &embed.model)?;
                if embed.input.is_empty() {
                    return Err(WireError::bad_request(
                        "\"input\" must hold at least one text",
                    ));
                }
                Ok(())
            }
            Request::Load(load) => non_empty("model", &load.model),
            Request::Pin(pin) | Request::Unpin(pin) => non_empty("model", &pin.model),
            Request::Unload(unload) => match (&unload.model, &unload.instance_id, unload.all) {
                (Some(model), None, false) => non_empty("model", model),
                (None, Some(instance), false) => non_empty("instance_id", instance),
                (None, None, true) => Ok(()),
                _ => Err(WireError::bad_request(
                    "unload takes exactly one of \"model\", \"instance_id\" or \"all\": true",
                )),
            },
            Request::Chat(chat) => {
                non_empty("model", &chat.model)?;
                if let Some(t) = chat.temperature {
                    if !(0.0..=2.0).contains(&t) {
                        return Err(WireError::bad_request(format!(
                            "\"temperature\" must be between 0 and 2, got {t}"
                        )));
                    }
                }
                match &chat.previous_response_id {
                    Some(prev) if !prev.starts_with("resp_") => Err(WireError::bad_request(
                        "\"previous_response_id\" must start with \"resp_\"",
                    )),
                    _ => Ok(()),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Result<Envelope, Rejection> {
        parse_request(line.as_bytes())
    }

    #[test]
    fn documented_request_examples_parse() {
        let status = parse(r#"{"v":1,"id":"s1","type":"status"}"#).unwrap();
        assert_eq!(status.id, "s1");
        assert_eq!(status.request, Request::Status);

        let chat = parse(
            r#"{"v":1,"id":"c1","type":"chat","model":"qwen/qwen3-4b","input":"Summarise: ...","temperature":0.2,"max_output_tokens":200,"stream":true}"#,
        )
        .unwrap();
        let Request::Chat(chat) = chat.request else {
            panic!("not a chat")
        };
        assert_eq!(chat.model, "qwen/qwen3-4b");
        assert!(chat.stream);
        assert_eq!(chat.max_output_tokens, Some(200));

        let auto = parse(
            r#"{"v":1,"id":"c2","type":"chat","model":"auto","input":"Describe","needs":{"vision":true,"min_context":8192},"priority":"batch","timeout":"90s","session":"review"}"#,
        )
        .unwrap();
        let Request::Chat(auto) = auto.request else {
            panic!("not a chat")
        };
        assert!(auto.options.needs.vision);
        assert_eq!(auto.options.needs.min_context, Some(8192));
        assert_eq!(auto.options.priority, Priority::Batch);
        assert_eq!(auto.options.timeout.map(|t| t.0.as_secs()), Some(90));
        assert_eq!(auto.session.as_deref(), Some("review"));

        let unload =
            parse(r#"{"v":1,"id":"u1","type":"unload","instance_id":"qwen/qwen3-4b:2"}"#).unwrap();
        assert_eq!(
            unload.request,
            Request::Unload(UnloadRequest {
                model: None,
                instance_id: Some("qwen/qwen3-4b:2".into()),
                all: false,
            })
        );
    }

    #[test]
    fn envelope_serializes_to_a_parseable_line() {
        let envelope = Envelope {
            v: PROTOCOL_VERSION,
            id: "x".into(),
            request: Request::Load(LoadRequest {
                model: "m".into(),
                context_length: Some(4096),
                ..Default::default()
            }),
        };
        let line = serde_json::to_vec(&envelope).unwrap();
        assert_eq!(parse_request(&line).unwrap(), envelope);
    }

    #[test]
    fn rejections_carry_the_id_when_readable() {
        let r = parse(r#"{"v":2,"id":"a","type":"status"}"#).unwrap_err();
        assert_eq!(r.id.as_deref(), Some("a"));
        assert_eq!(r.error.code, ErrorCode::UnsupportedVersion);

        let r = parse(r#"{"v":1,"id":"b","type":"frobnicate"}"#).unwrap_err();
        assert_eq!(r.id.as_deref(), Some("b"));
        assert_eq!(r.error.code, ErrorCode::BadRequest);

        let r = parse(r#"{"v":1,"id":"c","type":"chat","model":"m","input":"x","max_tokens":5}"#)
            .unwrap_err();
        assert!(
            r.error.message.contains("max_tokens"),
            "{}",
            r.error.message
        );

        let r = parse(
            r#"{"v":1,"id":"p","type":"chat","model":"auto","input":"x","priority":"urgent"}"#,
        )
        .unwrap_err();
        assert!(r.error.message.contains("urgent"), "{}", r.error.message);

        let r = parse(r#"{"v":1,"id":"d","type":"unload"}"#).unwrap_err();
        assert!(r.error.message.contains("exactly one"));

        let r = parse("{not json").unwrap_err();
        assert_eq!(r.id, None);
        assert_eq!(r.error.code, ErrorCode::BadRequest);

        let r = parse_request(b"{\"v\":1,\"id\":\"\xff\"}").unwrap_err();
        assert_eq!(r.error.code, ErrorCode::BadRequest);

        let r = parse(r#"[1,2]"#).unwrap_err();
        assert!(r.error.message.contains("object"));
    }

    #[test]
    fn an_event_from_a_newer_daemon_reads_as_unknown_and_the_new_fields_are_optional() {
        let golden = r#"{"id":"e1","type":"event","event":"gpu_melted","degrees":900}"#;
        let event: Reply = serde_json::from_str(golden).unwrap();
        assert_eq!(event, Reply::event("e1".into(), Event::Unknown));
        let mismatch = r#"{"id":"e1","type":"event","event":"context_mismatch","model":"m","instance_id":"m","requested":16384,"loaded":4096}"#;
        assert!(matches!(
            serde_json::from_str::<Reply>(mismatch).unwrap().body,
            ReplyBody::Event(Event::ContextMismatch { loaded: 4096, .. })
        ));
        // A chat line from an older client, without `store`, still parses.
        let chat = parse(r#"{"v":1,"id":"c","type":"chat","model":"m","input":"x"}"#).unwrap();
        assert!(matches!(
            chat.request,
            Request::Chat(ChatRequest { store: false, .. })
        ));
    }

    #[test]
    fn replies_round_trip_with_their_documented_shape() {
        let reply = Reply::result(
            "c1".into(),
            Outcome::Chat(ChatOutcome {
                content: "hi".into(),
                content_source: ContentSource::Message,
                model_instance_id: "m".into(),
                response_id: Some("resp_1".into()),
                usage: Usage {
                    input_tokens: 3,
                    total_output_tokens: 1,
                    reasoning_output_tokens: 0,
                    model_load_time_seconds: None,
                },
                task: TaskReport {
                    task_id: "t1".into(),
                    model: "m".into(),
                    reason: "requested".into(),
                    total_ms: 7,
                    attempts: 1,
                    ..TaskReport::default()
                },
            }),
        );
        let json: Value = serde_json::to_value(&reply).unwrap();
        assert_eq!(json["type"], "result");
        assert_eq!(json["kind"], "chat");
        assert_eq!(json["content_source"], "message");
        assert_eq!(serde_json::from_value::<Reply>(json).unwrap(), reply);

        let golden = r#"{"id":"c1","type":"event","event":"delta","content":"Hel"}"#;
        let event: Reply = serde_json::from_str(golden).unwrap();
        assert_eq!(
            event,
            Reply::event(
                "c1".into(),
                Event::Delta {
                    content: "Hel".into()
                }
            )
        );
        assert!(!event.is_terminal());

        let golden =
            r#"{"id":null,"type":"error","error":{"code":"bad_request","message":"invalid JSON"}}"#;
        let error: Reply = serde_json::from_str(golden).unwrap();
        assert!(error.is_terminal());
        assert_eq!(serde_json::to_string(&error).unwrap(), golden);
    }
}
