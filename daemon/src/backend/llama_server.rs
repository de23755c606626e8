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
//!   that continues one sends the whole conversation again (`conversations.rs`). They live in
//!   memory and end when lmsd stops.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};

use super::completions::{self, Chunk, Completion, Usage};
use super::conversations::{messages, Conversations, Turn};
use super::{
    decode_reply, BackendError, ChatBody, ChatReply, Http, InstanceConfig, Limit, LoadBody,
    LoadReply, LoadedInstance, Model, ModelType, Opened, StreamEvent,
};

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
        if !body.settings.is_empty() {
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
        let request = completions::request(body, messages(history.as_ref(), body), stream);
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
        completions::reply(body.model.clone(), message, reasoning, &usage, response_id)
    }

    /// `finish` for a whole (not streamed) completion.
    fn finish_completion(
        &self,
        body: &ChatBody,
        history: Option<Arc<Turn>>,
        mut reply: Completion,
    ) -> ChatReply {
        let (content, reasoning) = reply.texts();
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
