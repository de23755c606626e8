//! The engines lmsd drives: LM Studio (REST API v1) and llama.cpp's `llama-server` in router
//! mode. The pool and the tasks speak LM Studio's vocabulary — models with loaded instances,
//! loads, chats with response ids — and each engine's client translates into it, so everything
//! above this module works the same on both.
//!
//! `errors` classifies what goes wrong, `http` is the transport both share.

mod completions;
mod conversations;
mod errors;
mod http;
pub mod llama_server;
pub mod lmstudio;
mod relay;

use crate::config::{Config, EngineKind};
pub use errors::BackendError;
use errors::{classify_error, decode_reply};
pub use http::{same_model, Http, Limit, Opened};
pub use llama_server::LlamaServer;
pub use lmstudio::{
    ChatBody, ChatReply, ChatStats, InstanceConfig, LmStudio, LoadBody, LoadReply, LoadedInstance,
    Model, ModelType, OutputItem, StreamEvent, TextSource,
};
pub use relay::{Endpoint, Frame};

/// A cheap-to-clone client for the configured engine.
#[derive(Debug, Clone)]
pub enum Backend {
    LmStudio(LmStudio),
    LlamaServer(LlamaServer),
}

impl Backend {
    /// The client for `[backend] kind`, with its section's URL, timeouts and token.
    pub fn from_config(config: &Config) -> Result<Backend, crate::StartError> {
        Ok(match config.backend.kind {
            EngineKind::Lmstudio => Backend::LmStudio(LmStudio::new(Http::new(
                &config.lmstudio,
                config.lmstudio.token()?,
            )?)),
            EngineKind::LlamaServer => Backend::LlamaServer(LlamaServer::new(Http::new(
                &config.llama_server,
                config.llama_server.token()?,
            )?)),
        })
    }

    pub fn kind(&self) -> EngineKind {
        match self {
            Backend::LmStudio(_) => EngineKind::Lmstudio,
            Backend::LlamaServer(_) => EngineKind::LlamaServer,
        }
    }

    /// The transport, which both clients share in kind.
    fn http(&self) -> &Http {
        match self {
            Backend::LmStudio(engine) => engine.http(),
            Backend::LlamaServer(engine) => engine.http(),
        }
    }

    pub fn url(&self) -> &str {
        self.http().base()
    }

    /// The catalogue with each model's loaded instances.
    pub async fn models(&self) -> Result<Vec<Model>, BackendError> {
        match self {
            Backend::LmStudio(engine) => engine.models().await,
            Backend::LlamaServer(engine) => engine.models().await,
        }
    }

    /// Refuses a request's load settings (context length and the like) when the engine takes
    /// none: before the request is queued, so that it fails alone, not the tasks that share its
    /// load.
    pub fn accept_load_settings(&self, any: bool) -> Result<(), BackendError> {
        match self {
            Backend::LlamaServer(_) if any => Err(llama_server::no_load_settings()),
            _ => Ok(()),
        }
    }

    /// Whether a chat with a contract can run here. LM Studio constrains answers only on its
    /// stateless `/v1/chat/completions`, so there a contract cannot continue or keep a
    /// conversation; llama-server's conversations are lmsd's own, and go on with any chat.
    pub fn accept_contract(&self, conversation: bool) -> Result<(), BackendError> {
        match self {
            Backend::LmStudio(_) if conversation => Err(BackendError::Unsupported {
                what: "a chat with a contract (schema, choices, json_object) runs on LM Studio's /v1/chat/completions, which keeps no conversation: send it without session, previous_response_id or store (or with check_only, unconstrained)".into(),
            }),
            _ => Ok(()),
        }
    }

    /// Loads an instance and returns once it can serve.
    pub async fn load(&self, body: &LoadBody) -> Result<LoadReply, BackendError> {
        match self {
            Backend::LmStudio(engine) => engine.load(body).await,
            Backend::LlamaServer(engine) => engine.load(body).await,
        }
    }

    /// Unloads one instance. `instance_id` must come from `loaded_instances[].id`.
    pub async fn unload(&self, instance_id: &str) -> Result<(), BackendError> {
        match self {
            Backend::LmStudio(engine) => engine.unload(instance_id).await,
            Backend::LlamaServer(engine) => engine.unload(instance_id).await,
        }
    }

    pub async fn chat(&self, body: &ChatBody) -> Result<ChatReply, BackendError> {
        match self {
            Backend::LmStudio(engine) => engine.chat(body).await,
            Backend::LlamaServer(engine) => engine.chat(body).await,
        }
    }

    /// A streamed chat: text goes to `on_event` as it comes; the result is the whole reply.
    pub async fn chat_stream<F, Fut>(
        &self,
        body: &ChatBody,
        on_event: F,
    ) -> Result<ChatReply, BackendError>
    where
        F: FnMut(StreamEvent) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        match self {
            Backend::LmStudio(engine) => engine.chat_stream(body, on_event).await,
            Backend::LlamaServer(engine) => engine.chat_stream(body, on_event).await,
        }
    }

    /// Embeds `input` with an embedding model (a key or an instance id), through the engine's
    /// OpenAI-compatible endpoint, which both engines serve alike. Vectors come back in input
    /// order, with the name of the model the reply says answered.
    pub async fn embeddings(
        &self,
        model: &str,
        input: &[String],
    ) -> Result<(Vec<Vec<f64>>, Option<String>), BackendError> {
        self.http().embeddings(model, input).await
    }

    /// Relays a request in an agent's wire format to the engine's endpoint for it.
    pub async fn relay(
        &self,
        endpoint: Endpoint,
        body: &serde_json::Value,
    ) -> Result<serde_json::Value, BackendError> {
        self.http().relay(endpoint, body).await
    }

    /// As [`Backend::relay`], streamed: each event goes to `on_frame` as it comes.
    pub async fn relay_stream<F, Fut>(
        &self,
        endpoint: Endpoint,
        body: &serde_json::Value,
        on_frame: F,
    ) -> Result<bool, BackendError>
    where
        F: FnMut(Frame) -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        self.http().relay_stream(endpoint, body, on_frame).await
    }

    /// The error for a stream that broke, or ended short of its last event.
    pub fn stream_broke(&self, why: &str) -> BackendError {
        self.http().stream_broke(why)
    }

    /// The `temperature` range the engine's chat takes: LM Studio's `/api/v1/chat` documents
    /// 0–1 (not OpenAI's 0–2); llama-server takes OpenAI's.
    pub fn temperature_range(&self) -> (f64, f64) {
        match self {
            Backend::LmStudio(_) => (0.0, 1.0),
            Backend::LlamaServer(_) => (0.0, 2.0),
        }
    }

    /// The engine's name for people.
    pub fn engine_name(&self) -> &'static str {
        match self {
            Backend::LmStudio(_) => "LM Studio",
            Backend::LlamaServer(_) => "llama-server",
        }
    }
}
