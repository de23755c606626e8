//! llama.cpp's `llama-server` in router mode (`--models-dir`, `--no-models-autoload`): each
//! loaded model runs as a child process that the router starts and stops on request.
//!
//! Translated into the pool's vocabulary:
//! - a model's one instance has the model's id as its instance id;
//! - its size is the GGUF file's, raised to the largest resident memory lmsd has seen its child
//!   process use (a model needs more than its file: KV cache, compute buffers);
//! - loads and unloads are asynchronous on the router, so lmsd polls `GET /models` until the
//!   change has happened before it answers;
//! - the router keeps no conversations, so lmsd does: each reply gets a response id, and a chat
//!   that continues one sends the whole conversation again. They live in memory, the newest
//!   [`CONVERSATIONS_MAX`] replies, and end when lmsd stops.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{
    decode_reply, BackendError, ChatBody, ChatReply, ChatStats, Http, InstanceConfig, Limit,
    LoadBody, LoadReply, LoadedInstance, Model, ModelType, Opened, OutputItem, StreamEvent,
};

/// Replies whose conversations lmsd keeps for continuation; older ones are forgotten.
pub const CONVERSATIONS_MAX: usize = 4096;
/// Text the kept replies may hold together (their earlier turns, shared, come on top).
pub const CONVERSATIONS_MAX_BYTES: usize = 64 << 20;
const LOAD_PATH: &str = "/models/load";
/// Slots of a child whose `--parallel` is unset or `-1` (llama-server's "auto").
const AUTO_PARALLEL: u32 = 4;
/// How often a load or unload is checked on while the router carries it out.
const STATE_POLL: Duration = Duration::from_millis(50);

/// A cheap-to-clone client for one router-mode `llama-server`.
#[derive(Debug, Clone)]
pub struct LlamaServer {
    http: Http,
    conversations: Arc<Mutex<Conversations>>,
    /// Per model, the largest size seen: its file, or its child's resident memory.
    sizes: Arc<Mutex<HashMap<String, u64>>>,
}

// ---------------------------------------------------------------------------------------------
// The router's wire types

#[derive(Debug, Deserialize)]
struct RouterModels {
    data: Vec<RouterModel>,
}

#[derive(Debug, Deserialize)]
struct RouterModel {
    id: String,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    status: RouterStatus,
}

#[derive(Debug, Default, Deserialize)]
struct RouterStatus {
    /// `unloaded`, `loading` or `loaded`.
    #[serde(default)]
    value: String,
    /// The child process's arguments.
    #[serde(default)]
    args: Vec<String>,
}

impl RouterModel {
    fn is_loaded(&self) -> bool {
        self.status.value == "loaded"
    }

    /// The value of the first of `flags` in the child's arguments.
    fn arg(&self, flags: &[&str]) -> Option<&str> {
        let args = &self.status.args;
        args.iter()
            .position(|a| flags.contains(&a.as_str()))
            .and_then(|i| args.get(i + 1))
            .map(String::as_str)
    }

    /// The GGUF file: the listing's path, else the child's `-m`.
    fn file(&self) -> Option<&str> {
        self.path
            .as_deref()
            .or_else(|| self.arg(&["-m", "--model"]))
    }
}

#[derive(Deserialize)]
struct Success {}

// ---------------------------------------------------------------------------------------------
// Conversations

/// One exchange of a conversation; earlier ones are reached through `parent`, so a long
/// conversation costs one turn per reply, not a copy of its history.
struct Turn {
    parent: Option<Arc<Turn>>,
    system: Option<String>,
    user: String,
    assistant: String,
}

impl Turn {
    fn bytes(&self) -> usize {
        self.system.as_ref().map_or(0, String::len) + self.user.len() + self.assistant.len()
    }
}

/// Conversations by response id: the newest, at most [`CONVERSATIONS_MAX`] replies and
/// [`CONVERSATIONS_MAX_BYTES`] of their text.
#[derive(Default)]
struct Conversations {
    by_response: HashMap<String, Arc<Turn>>,
    order: VecDeque<String>,
    /// Text of the turns in `by_response`.
    bytes: usize,
    next: u64,
}

// Conversations are prompts and outputs: never printed.
impl std::fmt::Debug for Conversations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Conversations({} kept)", self.by_response.len())
    }
}

impl Conversations {
    fn get(&self, response_id: &str) -> Result<Arc<Turn>, BackendError> {
        self.by_response
            .get(response_id)
            .cloned()
            .ok_or_else(|| BackendError::ConversationLost {
                response_id: response_id.to_owned(),
                why: format!(
                    "on llama-server lmsd keeps conversations in memory (the newest {CONVERSATIONS_MAX} replies, {} MiB of text), and they end when lmsd restarts",
                    CONVERSATIONS_MAX_BYTES >> 20
                ),
            })
    }

    /// Records a reply and returns its response id.
    fn record(&mut self, turn: Turn) -> String {
        self.next += 1;
        // The process id keeps ids of a restarted lmsd apart from the last one's.
        let id = format!("resp_lmsd_{}_{}", std::process::id(), self.next);
        self.bytes += turn.bytes();
        self.order.push_back(id.clone());
        self.by_response.insert(id.clone(), Arc::new(turn));
        // The newest reply stays, whatever its size.
        while self.order.len() > 1
            && (self.order.len() > CONVERSATIONS_MAX || self.bytes > CONVERSATIONS_MAX_BYTES)
        {
            let oldest = self.order.pop_front();
            if let Some(turn) = oldest.and_then(|id| self.by_response.remove(&id)) {
                self.bytes -= turn.bytes();
            }
        }
        id
    }
}

/// OpenAI chat messages for `turn`'s history followed by the new input.
fn messages(history: Option<&Arc<Turn>>, body: &ChatBody) -> Vec<Value> {
    let mut turns = Vec::new();
    let mut next = history;
    while let Some(turn) = next {
        turns.push(turn);
        next = turn.parent.as_ref();
    }
    turns.reverse();
    // The conversation's first system prompt holds unless this chat sets its own.
    let system = body
        .system_prompt
        .as_deref()
        .or_else(|| turns.first().and_then(|t| t.system.as_deref()));
    let mut messages = Vec::with_capacity(2 * turns.len() + 2);
    if let Some(system) = system {
        messages.push(json!({ "role": "system", "content": system }));
    }
    for turn in turns {
        messages.push(json!({ "role": "user", "content": turn.user }));
        messages.push(json!({ "role": "assistant", "content": turn.assistant }));
    }
    messages.push(json!({ "role": "user", "content": body.input }));
    messages
}

// ---------------------------------------------------------------------------------------------
// Client

impl LlamaServer {
    pub fn new(http: Http) -> Self {
        LlamaServer {
            http,
            conversations: Arc::default(),
            sizes: Arc::default(),
        }
    }

    pub fn http(&self) -> &Http {
        &self.http
    }

    async fn router_models(&self) -> Result<Vec<RouterModel>, BackendError> {
        let reply: RouterModels = self.http.get("/models").await?;
        Ok(reply.data)
    }

    pub async fn models(&self) -> Result<Vec<Model>, BackendError> {
        let listed = self.router_models().await?;
        let sizes = self.sizes.clone();
        // Reading /proc and the model files is blocking I/O (a process's command line waits on
        // its memory map lock): off the async workers.
        match tokio::task::spawn_blocking(move || sized_models(listed, &sizes)).await {
            Ok(models) => Ok(models),
            Err(error) => match error.try_into_panic() {
                Ok(panic) => std::panic::resume_unwind(panic),
                Err(_) => Err(BackendError::Unreachable {
                    url: self.http.base().to_owned(),
                    detail: "lmsd is shutting down".into(),
                }),
            },
        }
    }

    /// Asks the router to load or unload `model`; `Ok(false)` when it answers that this is done
    /// already (`already_done` is its message for that).
    /// A load goes on a fresh connection and is never sent twice (see [`Http::post_load`]).
    async fn ask(&self, path: &str, model: &str, already_done: &str) -> Result<bool, BackendError> {
        let body = json!({ "model": model });
        let sent = if path == LOAD_PATH {
            self.http.post_load::<Success>(path, &body).await
        } else {
            self.http.post::<Success>(path, &body, Limit::Control).await
        };
        match sent {
            Ok(Success {}) => Ok(true),
            Err(BackendError::Api { message, .. }) if message.contains(already_done) => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// The router's state of one model, `None` when it lists no such model.
    async fn state(&self, id: &str) -> Result<Option<RouterModel>, BackendError> {
        Ok(self.router_models().await?.into_iter().find(|m| m.id == id))
    }

    pub async fn load(&self, body: &LoadBody) -> Result<LoadReply, BackendError> {
        if body.context_length.is_some()
            || body.eval_batch_size.is_some()
            || body.flash_attention.is_some()
            || body.num_experts.is_some()
            || body.offload_kv_cache_to_gpu.is_some()
        {
            return Err(no_load_settings());
        }
        let started = Instant::now();
        let deadline = started + self.http.timeout(Limit::Request);
        // Already running (loaded by someone else meanwhile) is what we wanted too.
        self.ask(LOAD_PATH, &body.model, "already running").await?;
        loop {
            match self.state(&body.model).await? {
                Some(model) if model.is_loaded() => break,
                Some(model) if model.status.value == "loading" => {}
                // Back to unloaded without having loaded: the child failed to start.
                Some(_) | None => {
                    return Err(BackendError::LoadFailed {
                        message: format!(
                            "llama-server could not load {:?} (its log says why)",
                            body.model
                        ),
                    })
                }
            }
            if Instant::now() >= deadline {
                return Err(BackendError::Timeout {
                    after: self.http.timeout(Limit::Request),
                });
            }
            tokio::time::sleep(STATE_POLL).await;
        }
        Ok(LoadReply {
            instance_id: body.model.clone(),
            load_time_seconds: started.elapsed().as_secs_f64(),
            load_config: None,
        })
    }

    /// Asks the router to stop the model's child and waits until it lists the model unloaded.
    pub async fn unload(&self, instance_id: &str) -> Result<(), BackendError> {
        let deadline = Instant::now() + self.http.timeout(Limit::Control);
        if !self
            .ask("/models/unload", instance_id, "not running")
            .await?
        {
            return Ok(());
        }
        loop {
            match self.state(instance_id).await? {
                Some(model) if model.is_loaded() || model.status.value == "loading" => {}
                _ => return Ok(()),
            }
            if Instant::now() >= deadline {
                // The pool re-reads the catalogue and says the unload did not take.
                return Ok(());
            }
            tokio::time::sleep(STATE_POLL).await;
        }
    }

    /// The OpenAI request for `body`, and the conversation it continues.
    fn completion_request(
        &self,
        body: &ChatBody,
        stream: bool,
    ) -> Result<(Value, Option<Arc<Turn>>), BackendError> {
        let history = match &body.previous_response_id {
            Some(id) => Some(self.lock_conversations().get(id)?),
            None => None,
        };
        let mut request = json!({
            "model": body.model,
            "messages": messages(history.as_ref(), body),
            "stream": stream,
        });
        if let Some(temperature) = body.temperature {
            request["temperature"] = json!(temperature);
        }
        if let Some(max_tokens) = body.max_output_tokens {
            request["max_tokens"] = json!(max_tokens);
        }
        if stream {
            request["stream_options"] = json!({ "include_usage": true });
        }
        Ok((request, history))
    }

    fn lock_conversations(&self) -> std::sync::MutexGuard<'_, Conversations> {
        self.conversations.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The reply in the pool's vocabulary, its conversation recorded for continuation.
    fn finish(
        &self,
        body: &ChatBody,
        history: Option<Arc<Turn>>,
        message: String,
        reasoning: String,
        usage: Usage,
    ) -> ChatReply {
        // Kept only when asked for: a one-shot chat leaves nothing behind, as on LM Studio.
        let response_id = body.store.then(|| {
            let system = match &history {
                Some(_) => None,
                None => body.system_prompt.clone(),
            };
            self.lock_conversations().record(Turn {
                parent: history,
                system,
                user: body.input.clone(),
                assistant: message.clone(),
            })
        });
        let mut output = Vec::with_capacity(2);
        if !reasoning.is_empty() {
            output.push(OutputItem::Reasoning { content: reasoning });
        }
        output.push(OutputItem::Message { content: message });
        ChatReply {
            model_instance_id: body.model.clone(),
            output,
            stats: ChatStats {
                input_tokens: usage.prompt_tokens,
                total_output_tokens: usage.completion_tokens,
                ..ChatStats::default()
            },
            response_id,
        }
    }

    /// `finish` for a whole (not streamed) completion.
    fn finish_completion(
        &self,
        body: &ChatBody,
        history: Option<Arc<Turn>>,
        reply: Completion,
    ) -> ChatReply {
        let message = reply.choices.into_iter().next().map(|c| c.message);
        let (content, reasoning) = message
            .map(|m| {
                (
                    m.content.unwrap_or_default(),
                    m.reasoning_content.unwrap_or_default(),
                )
            })
            .unwrap_or_default();
        self.finish(body, history, content, reasoning, reply.usage)
    }

    pub async fn chat(&self, body: &ChatBody) -> Result<ChatReply, BackendError> {
        let (request, history) = self.completion_request(body, false)?;
        let reply: Completion = self
            .http
            .post("/v1/chat/completions", &request, Limit::Request)
            .await?;
        Ok(self.finish_completion(body, history, reply))
    }

    /// A streamed chat: OpenAI's `data:` chunks, ended by `[DONE]`.
    pub async fn chat_stream<F, Fut>(
        &self,
        body: &ChatBody,
        mut on_event: F,
    ) -> Result<ChatReply, BackendError>
    where
        F: FnMut(StreamEvent) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let (request, history) = self.completion_request(body, true)?;
        let (status, mut events) = match self
            .http
            .post_stream("/v1/chat/completions", &request)
            .await?
        {
            Opened::Events(status, events) => (status, events),
            Opened::Body(status, bytes) => {
                let reply: Completion = decode_reply(status, &bytes)?;
                return Ok(self.finish_completion(body, history, reply));
            }
        };
        let (mut message, mut reasoning, mut usage) = (String::new(), String::new(), None);
        while let Some(event) = events.next().await {
            let event = event.map_err(|e| self.http.stream_broke(e))?;
            if event.data.trim() == "[DONE]" {
                return Ok(self.finish(
                    body,
                    history,
                    message,
                    reasoning,
                    usage.unwrap_or_default(),
                ));
            }
            let chunk: Value = decode_reply(status, event.data.as_bytes())?;
            let chunk: Chunk =
                serde_json::from_value(chunk).map_err(|e| BackendError::Malformed {
                    status,
                    detail: format!("unexpected stream chunk: {e}"),
                })?;
            usage = chunk.usage.or(usage);
            for choice in chunk.choices {
                if let Some(text) = choice.delta.reasoning_content.filter(|t| !t.is_empty()) {
                    reasoning.push_str(&text);
                    on_event(StreamEvent::Reasoning(text)).await;
                }
                if let Some(text) = choice.delta.content.filter(|t| !t.is_empty()) {
                    message.push_str(&text);
                    on_event(StreamEvent::Message(text)).await;
                }
            }
        }
        Err(BackendError::Malformed {
            status,
            detail: "the event stream ended before [DONE]".into(),
        })
    }
}

/// Why a load with settings is refused.
pub fn no_load_settings() -> BackendError {
    BackendError::Unsupported {
        what: "llama-server does not take load settings on a load: set them in its --models-preset file (for example `c = 8192`)".into(),
    }
}

/// The pool's view of a router model.
fn to_model(model: RouterModel, size_bytes: u64) -> Model {
    let number = |flags: &[&str]| model.arg(flags).and_then(|v| v.parse().ok());
    // The context its child runs with (from the router's presets), listed loaded or not: what
    // `auto` can count on.
    let context_length: Option<u32> = number(&["-c", "--ctx-size"]);
    let loaded_instances = if model.is_loaded() {
        vec![LoadedInstance {
            id: model.id.clone(),
            config: InstanceConfig {
                context_length: context_length.unwrap_or(0),
                // Unset (or -1), llama-server picks its own: "n_parallel is set to auto,
                // using n_parallel = 4 and kv_unified = true".
                parallel: Some(
                    model
                        .arg(&["-np", "--parallel"])
                        .and_then(|v| v.parse::<i64>().ok())
                        .filter(|n| *n > 0)
                        .map_or(AUTO_PARALLEL, |n| u32::try_from(n).unwrap_or(u32::MAX)),
                ),
            },
        }]
    } else {
        Vec::new()
    };
    let kind = if model
        .status
        .args
        .iter()
        .any(|a| a == "--embedding" || a == "--embeddings")
    {
        ModelType::Embedding
    } else {
        ModelType::Llm
    };
    Model {
        kind,
        key: model.id,
        display_name: None,
        size_bytes,
        params_string: None,
        loaded_instances,
        max_context_length: context_length,
        capabilities: None,
    }
}

#[derive(Debug, Default, Deserialize)]
struct Usage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
}

#[derive(Deserialize)]
struct Completion {
    #[serde(default)]
    choices: Vec<CompletionChoice>,
    #[serde(default)]
    usage: Usage,
}

#[derive(Deserialize)]
struct CompletionChoice {
    message: CompletionMessage,
}

#[derive(Deserialize)]
struct CompletionMessage {
    content: Option<String>,
    reasoning_content: Option<String>,
}

#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Vec<ChunkChoice>,
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct ChunkChoice {
    #[serde(default)]
    delta: CompletionDelta,
}

#[derive(Default, Deserialize)]
struct CompletionDelta {
    content: Option<String>,
    reasoning_content: Option<String>,
}

/// The router's models in the pool's vocabulary, each sized by its file and the largest
/// resident memory its child has shown (remembered in `sizes`).
fn sized_models(listed: Vec<RouterModel>, sizes: &Mutex<HashMap<String, u64>>) -> Vec<Model> {
    let mut sizes = sizes.lock().unwrap_or_else(|e| e.into_inner());
    listed
        .into_iter()
        .map(|model| {
            let child = model
                .is_loaded()
                .then(|| find_child(&model.status.args))
                .flatten();
            // A relative model path is relative to the router's directory, which its child
            // shares; without a child, only an absolute path can be read.
            let file = model.file().map(std::path::PathBuf::from).and_then(|file| {
                match (&child, file.is_absolute()) {
                    (_, true) => Some(file),
                    (Some(child), false) => Some(child.cwd.join(file)),
                    (None, false) => None,
                }
            });
            let file_size = file
                .and_then(|f| std::fs::metadata(f).ok())
                .map(|m| m.len());
            let seen = sizes.entry(model.id.clone()).or_default();
            for size in [file_size, child.map(|c| c.resident_bytes)]
                .into_iter()
                .flatten()
            {
                *seen = (*seen).max(size);
            }
            let size_bytes = *seen;
            to_model(model, size_bytes)
        })
        .collect()
}

/// What lmsd can see of a model's child process.
#[derive(Debug)]
struct Child {
    resident_bytes: u64,
    cwd: std::path::PathBuf,
}

/// The router's child process that runs with `args` (its whole command line, which the
/// router reports with a real port once loaded), when this machine's process table shows it:
/// Linux, same machine, readable.
fn find_child(args: &[String]) -> Option<Child> {
    if args.is_empty() {
        return None;
    }
    let wanted: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let dir = entry.path();
        let Ok(cmdline) = std::fs::read(dir.join("cmdline")) else {
            continue;
        };
        let argv: Vec<&[u8]> = cmdline
            .split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .collect();
        if argv == wanted {
            let statm = std::fs::read_to_string(dir.join("statm")).ok()?;
            let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
            return Some(Child {
                resident_bytes: pages * rustix::param::page_size() as u64,
                cwd: std::fs::read_link(dir.join("cwd")).ok()?,
            });
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(input: &str, system: Option<&str>) -> ChatBody {
        ChatBody {
            model: "m".into(),
            input: input.into(),
            system_prompt: system.map(str::to_owned),
            temperature: None,
            max_output_tokens: None,
            previous_response_id: None,
            stream: false,
            store: true,
        }
    }

    #[test]
    fn a_continued_conversation_sends_its_whole_history_once() {
        let mut conversations = Conversations::default();
        let first = conversations.record(Turn {
            parent: None,
            system: Some("be brief".into()),
            user: "one".into(),
            assistant: "1".into(),
        });
        let second = conversations.record(Turn {
            parent: Some(conversations.get(&first).unwrap()),
            system: None,
            user: "two".into(),
            assistant: "2".into(),
        });
        let history = conversations.get(&second).unwrap();
        let sent = messages(Some(&history), &chat("three", None));
        let roles: Vec<(&str, &str)> = sent
            .iter()
            .map(|m| (m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
        assert_eq!(
            roles,
            [
                ("system", "be brief"),
                ("user", "one"),
                ("assistant", "1"),
                ("user", "two"),
                ("assistant", "2"),
                ("user", "three"),
            ]
        );
        // A branch from the first reply does not see the second exchange.
        let branch = messages(
            Some(&conversations.get(&first).unwrap()),
            &chat("again", None),
        );
        assert_eq!(branch.len(), 4);
    }

    #[test]
    fn only_the_newest_conversations_are_kept() {
        let mut conversations = Conversations::default();
        let turn = || Turn {
            parent: None,
            system: None,
            user: String::new(),
            assistant: String::new(),
        };
        let first = conversations.record(turn());
        for _ in 0..CONVERSATIONS_MAX {
            conversations.record(turn());
        }
        assert_eq!(conversations.by_response.len(), CONVERSATIONS_MAX);
        let Err(error) = conversations.get(&first) else {
            panic!("the oldest conversation was kept");
        };
        // Large replies are forgotten by size, long before their count says so.
        let big = || Turn {
            parent: None,
            system: None,
            user: "x".repeat(CONVERSATIONS_MAX_BYTES / 3),
            assistant: String::new(),
        };
        let ids: Vec<String> = (0..4).map(|_| conversations.record(big())).collect();
        assert!(conversations.bytes <= CONVERSATIONS_MAX_BYTES);
        assert!(conversations.get(&ids[0]).is_err());
        assert!(conversations.get(&ids[3]).is_ok());
        assert!(
            matches!(error, BackendError::ConversationLost { .. }),
            "{error}"
        );
    }

    #[test]
    fn reads_the_router_listing() {
        let listing: RouterModels = serde_json::from_str(
            r#"{"data":[{"id":"tiny-a","status":{"value":"loaded","args":["--port","40001","-m","/models/tiny-a.gguf","-c","1024","-np","4"]}},
                        {"id":"tiny-b","status":{"value":"loaded","args":["-m","/models/tiny-b.gguf","-c","2048"]}},
                        {"id":"gemma","status":{"value":"unloaded"}}]}"#,
        )
        .unwrap();
        let mut models = listing.data.into_iter();
        let tiny = to_model(models.next().unwrap(), 7);
        assert_eq!(tiny.key, "tiny-a");
        assert_eq!(tiny.size_bytes, 7);
        assert_eq!(tiny.loaded_instances[0].id, "tiny-a");
        assert_eq!(tiny.loaded_instances[0].config.context_length, 1024);
        assert_eq!(tiny.loaded_instances[0].config.parallel, Some(4));
        assert_eq!(tiny.max_context_length, Some(1024));
        let auto = to_model(models.next().unwrap(), 7);
        assert_eq!(auto.loaded_instances[0].config.parallel, Some(4));
        let gemma = to_model(models.next().unwrap(), 0);
        assert!(gemma.loaded_instances.is_empty());
        assert_eq!(gemma.max_context_length, None);
        assert_eq!(gemma.kind, ModelType::Llm);
    }
}
