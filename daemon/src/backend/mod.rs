//! The engines lmsd drives: LM Studio (REST API v1) and llama.cpp's `llama-server` in router
//! mode. The pool and the tasks speak LM Studio's vocabulary — models with loaded instances,
//! loads, chats with response ids — and each engine's client translates into it, so everything
//! above this module works the same on both.
//!
//! Every reply is checked for both its HTTP status and an `error` key in its body, because LM
//! Studio answers some errors with 200 and some with an HTML 500.

pub mod llama_server;
pub mod lmstudio;

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::{Config, EngineConfig, EngineKind, EngineSection};
pub use llama_server::LlamaServer;
pub use lmstudio::{
    ChatBody, ChatReply, ChatStats, InstanceConfig, LmStudio, LoadBody, LoadReply, LoadedInstance,
    Model, ModelType, OutputItem, StreamEvent, TextSource,
};

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
    /// order.
    pub async fn embeddings(
        &self,
        model: &str,
        input: &[String],
    ) -> Result<Vec<Vec<f64>>, BackendError> {
        self.http().embeddings(model, input).await
    }
}

// ---------------------------------------------------------------------------------------------
// Errors

/// A failed call to the engine, classified for retry and for the wire.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    #[error("the engine at {url} is unreachable: {detail}")]
    Unreachable { url: String, detail: String },
    #[error("the engine did not answer within {}", humantime::format_duration(*after))]
    Timeout { after: Duration },
    #[error("the engine rejected the API token: {message} (set token or token_file in [lmstudio] or [llama_server], or LMSD_LMSTUDIO_TOKEN / LMSD_LLAMA_SERVER_TOKEN)")]
    Unauthorized { message: String },
    #[error("the engine has no such model: {message}")]
    ModelNotFound { message: String },
    #[error("the engine could not load the model for lack of memory: {message}")]
    OutOfMemory { message: String },
    #[error("the engine answered HTTP {status}: {message}")]
    Api {
        status: u16,
        kind: Option<String>,
        message: String,
    },
    #[error("the engine sent an unreadable reply (HTTP {status}): {detail}")]
    Malformed { status: u16, detail: String },
    /// A continuation of a conversation lmsd kept for the engine (llama-server) and no longer
    /// has: lmsd restarted, or it was among the oldest.
    #[error("no conversation has response id {response_id:?}: on llama-server lmsd keeps conversations in memory (the newest {} replies, {} MiB of text), and they end when lmsd restarts", llama_server::CONVERSATIONS_MAX, llama_server::CONVERSATIONS_MAX_BYTES >> 20)]
    ConversationLost { response_id: String },
    /// A request the engine cannot serve (load settings on llama-server, say).
    #[error("{what}")]
    Unsupported { what: String },
}

impl BackendError {
    /// Worth retrying after a pause: the server may answer next time.
    pub fn is_transient(&self) -> bool {
        match self {
            BackendError::Unreachable { .. }
            | BackendError::Timeout { .. }
            | BackendError::Malformed { .. } => true,
            BackendError::Api { status, .. } => *status >= 500,
            BackendError::Unauthorized { .. }
            | BackendError::ModelNotFound { .. }
            | BackendError::OutOfMemory { .. }
            | BackendError::ConversationLost { .. }
            | BackendError::Unsupported { .. } => false,
        }
    }
}

/// Reads an error body: `{"error":{type,message,code?}}` or `{"error":"text"}`.
fn classify_error(status: u16, error: &Value) -> BackendError {
    let (kind, code, message) = match error {
        Value::String(message) => (None, None, message.clone()),
        Value::Object(fields) => {
            let text = |key: &str| fields.get(key).and_then(Value::as_str).map(str::to_owned);
            (
                text("type"),
                text("code"),
                text("message").unwrap_or_else(|| error.to_string()),
            )
        }
        other => (None, None, other.to_string()),
    };
    let lower = message.to_lowercase();
    if lower.contains("insufficient system resources")
        || lower.contains("out of memory")
        || lower.contains("not enough memory")
    {
        BackendError::OutOfMemory { message }
    } else if status == 401 || code.as_deref() == Some("invalid_api_key") {
        BackendError::Unauthorized { message }
    } else if status == 404
        // llama-server's router: a chat to a model it has unloaded, an unload of one it lacks.
        || lower.contains("model is not loaded")
        || lower.contains("model is not found")
        || kind.as_deref() == Some("model_not_found")
        || code.as_deref() == Some("model_not_found")
    {
        BackendError::ModelNotFound { message }
    } else {
        BackendError::Api {
            status,
            kind,
            message,
        }
    }
}

/// Checks status and body, and decodes the body as `T`.
fn decode_reply<T: DeserializeOwned>(status: u16, body: &[u8]) -> Result<T, BackendError> {
    // The common case in one pass: a success with no `"error"` anywhere in it (a reply type
    // whose fields are all optional would read an error body as a success, so any mention
    // takes the careful way below).
    if (200..300).contains(&status) && memchr::memmem::find(body, b"\"error\"").is_none() {
        if let Ok(reply) = serde_json::from_slice(body) {
            return Ok(reply);
        }
    }
    let value: Value = match serde_json::from_slice(body) {
        Ok(value) => value,
        Err(e) => {
            let looks_html = body.trim_ascii_start().starts_with(b"<");
            let detail = if looks_html {
                "an HTML page instead of JSON".to_owned()
            } else {
                format!("invalid JSON: {e}")
            };
            return Err(match status {
                401 => BackendError::Unauthorized { message: detail },
                404 => BackendError::ModelNotFound { message: detail },
                _ => BackendError::Malformed { status, detail },
            });
        }
    };
    if let Some(error) = value.get("error") {
        return Err(classify_error(status, error));
    }
    if !(200..300).contains(&status) {
        return Err(classify_error(
            status,
            &Value::String(format!("HTTP {status} without an error body")),
        ));
    }
    serde_json::from_value(value).map_err(|e| BackendError::Malformed {
        status,
        detail: format!("unexpected shape: {e}"),
    })
}

// ---------------------------------------------------------------------------------------------
// HTTP shared by the engines

/// The transport both engines' clients use: base URL, optional bearer token, timeouts.
#[derive(Clone)]
pub struct Http {
    client: reqwest::Client,
    /// The engine's URL as configured, for messages.
    base: String,
    /// The same, parsed once: each call only sets its path.
    url: reqwest::Url,
    token: Option<String>,
    control_timeout: Duration,
    request_timeout: Duration,
}

impl std::fmt::Debug for Http {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Http")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

/// Which limit a call runs under.
#[derive(Debug, Clone, Copy)]
pub enum Limit {
    /// Listing, unloading: quick calls.
    Control,
    /// Loads and chats, which can take minutes on large models.
    Request,
}

/// Server-sent events as they arrive.
pub type EventStream = futures_util::stream::BoxStream<
    'static,
    Result<eventsource_stream::Event, eventsource_stream::EventStreamError<reqwest::Error>>,
>;

/// A streamed call's response, with its HTTP status: events, or a plain body (an error, or a
/// server that ignored `stream`) for the caller to decode as its own reply type.
pub enum Opened {
    Events(u16, EventStream),
    Body(u16, Vec<u8>),
}

impl std::fmt::Debug for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Opened::Events(status, _) => write!(f, "Events(HTTP {status})"),
            Opened::Body(status, body) => write!(f, "Body(HTTP {status}, {} bytes)", body.len()),
        }
    }
}

impl Http {
    pub fn new<S: EngineSection>(
        config: &EngineConfig<S>,
        token: Option<String>,
    ) -> Result<Http, BackendError> {
        let unusable = |detail: String| BackendError::Unreachable {
            url: config.url.clone(),
            detail,
        };
        let client = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .pool_idle_timeout(Duration::from_secs(30))
            // The engines' APIs do not redirect; following costs time on every call.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| unusable(format!("cannot build an HTTP client: {e}")))?;
        let base = config.url.trim_end_matches('/').to_owned();
        let url = reqwest::Url::parse(&base).map_err(|e| unusable(format!("not a URL: {e}")))?;
        Ok(Http {
            client,
            base,
            url,
            token,
            control_timeout: config.control_timeout,
            request_timeout: config.request_timeout,
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn timeout(&self, limit: Limit) -> Duration {
        match limit {
            Limit::Control => self.control_timeout,
            Limit::Request => self.request_timeout,
        }
    }

    fn transport_error(&self, error: &reqwest::Error, timeout: Duration) -> BackendError {
        if error.is_timeout() {
            return BackendError::Timeout { after: timeout };
        }
        // The innermost cause says what happened ("Connection refused"), not reqwest's wrapper.
        let mut detail = error.to_string();
        let mut source = std::error::Error::source(error);
        while let Some(cause) = source {
            detail = cause.to_string();
            source = cause.source();
        }
        BackendError::Unreachable {
            url: self.base.clone(),
            detail,
        }
    }

    fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        limit: Limit,
    ) -> reqwest::RequestBuilder {
        // Parsing the whole URL on every call was a tenth of lmsd's work per chat.
        let mut url = self.url.clone();
        let prefix = self.url.path().trim_end_matches('/');
        url.set_path(&format!("{prefix}{path}"));
        let request = self
            .client
            .request(method, url)
            .timeout(self.timeout(limit));
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    async fn send<T: DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
        limit: Limit,
    ) -> Result<T, BackendError> {
        let timeout = self.timeout(limit);
        let response = request
            .send()
            .await
            .map_err(|e| self.transport_error(&e, timeout))?;
        let status = response.status().as_u16();
        let body = response
            .bytes()
            .await
            .map_err(|e| self.transport_error(&e, timeout))?;
        decode_reply(status, &body)
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, BackendError> {
        self.send(
            self.request(reqwest::Method::GET, path, Limit::Control),
            Limit::Control,
        )
        .await
    }

    pub async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
        limit: Limit,
    ) -> Result<T, BackendError> {
        self.send(
            self.request(reqwest::Method::POST, path, limit).json(body),
            limit,
        )
        .await
    }

    /// Posts `body` and opens the reply as a server-sent event stream.
    pub async fn post_stream(
        &self,
        path: &str,
        body: &impl Serialize,
    ) -> Result<Opened, BackendError> {
        use eventsource_stream::Eventsource;
        use futures_util::StreamExt;
        let timeout = self.timeout(Limit::Request);
        let response = self
            .request(reqwest::Method::POST, path, Limit::Request)
            .json(body)
            .send()
            .await
            .map_err(|e| self.transport_error(&e, timeout))?;
        let status = response.status().as_u16();
        let is_sse = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if is_sse {
            Ok(Opened::Events(
                status,
                response.bytes_stream().eventsource().boxed(),
            ))
        } else {
            let bytes = response
                .bytes()
                .await
                .map_err(|e| self.transport_error(&e, timeout))?;
            Ok(Opened::Body(status, bytes.to_vec()))
        }
    }

    /// The error for a broken event stream.
    pub fn stream_broke(&self, error: impl std::fmt::Display) -> BackendError {
        BackendError::Unreachable {
            url: self.base.clone(),
            detail: format!("the event stream broke: {error}"),
        }
    }

    /// `POST /v1/embeddings`, OpenAI's shape.
    pub async fn embeddings(
        &self,
        model: &str,
        input: &[String],
    ) -> Result<Vec<Vec<f64>>, BackendError> {
        #[derive(Deserialize)]
        struct Item {
            embedding: Vec<f64>,
            #[serde(default)]
            index: usize,
        }
        #[derive(Deserialize)]
        struct EmbeddingsReply {
            data: Vec<Item>,
        }
        let body = serde_json::json!({ "model": model, "input": input });
        let mut reply: EmbeddingsReply = self.post("/v1/embeddings", &body, Limit::Request).await?;
        if reply.data.len() != input.len() {
            return Err(BackendError::Malformed {
                status: 200,
                detail: format!("{} embeddings for {} inputs", reply.data.len(), input.len()),
            });
        }
        reply.data.sort_by_key(|item| item.index);
        Ok(reply.data.into_iter().map(|item| item.embedding).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    struct AllOptional {
        #[serde(default)]
        text: Option<String>,
    }

    #[test]
    fn an_error_body_is_an_error_even_where_the_reply_type_would_accept_it() {
        let error = decode_reply::<AllOptional>(200, br#"{"error":"model crashed"}"#);
        assert!(matches!(error, Err(BackendError::Api { status: 200, .. })));
        // A success that merely mentions the word takes the careful way and still succeeds.
        let reply: AllOptional = decode_reply(200, br#"{"text":"an \"error\" in prose"}"#).unwrap();
        assert_eq!(reply.text.as_deref(), Some("an \"error\" in prose"));
        let plain: AllOptional = decode_reply(200, br#"{"text":"fine"}"#).unwrap();
        assert_eq!(plain.text.as_deref(), Some("fine"));
    }
}
