//! LM Studio's REST API v1: typed requests and replies. These types are also the vocabulary
//! the pool and tasks speak with every engine (see the module above).

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::completions::{self, Completion};
use super::conversations::messages;
use super::{classify_error, decode_reply, BackendError, Http, Limit, Opened};
use lmsd_proto::LoadSettings;

// ---------------------------------------------------------------------------------------------
// Wire types. Lenient on input (optional fields default), exact on output (LM Studio's load body
// is strict: unknown keys are a 400).

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelType {
    Llm,
    Embedding,
    /// A type this lmsd does not know (LM Studio may add some).
    #[serde(other)]
    Other,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Model {
    #[serde(rename = "type")]
    pub kind: ModelType,
    pub key: String,
    #[serde(default)]
    pub display_name: Option<String>,
    #[serde(default)]
    pub size_bytes: u64,
    #[serde(default)]
    pub params_string: Option<String>,
    #[serde(default)]
    pub loaded_instances: Vec<LoadedInstance>,
    #[serde(default)]
    pub max_context_length: Option<u32>,
    #[serde(default)]
    pub capabilities: Option<Capabilities>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct LoadedInstance {
    pub id: String,
    pub config: InstanceConfig,
}

#[derive(Debug, Clone, Deserialize)]
pub struct InstanceConfig {
    pub context_length: u32,
    #[serde(default)]
    pub parallel: Option<u32>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Capabilities {
    #[serde(default)]
    pub vision: bool,
    #[serde(default)]
    pub trained_for_tool_use: bool,
    #[serde(default)]
    pub reasoning: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct ModelsReply {
    models: Vec<Model>,
}

/// Body of `POST /api/v1/models/load`: only documented keys, absent ones left out.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LoadBody {
    pub model: String,
    #[serde(flatten)]
    pub settings: LoadSettings,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub echo_load_config: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub struct LoadReply {
    /// `model_instance_id` in the docs before 0.4.0: an unreadable load reply would count as a
    /// lost one.
    #[serde(alias = "model_instance_id")]
    pub instance_id: String,
    #[serde(default)]
    pub load_time_seconds: f64,
    #[serde(default)]
    pub load_config: Option<LoadConfigEcho>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct LoadConfigEcho {
    pub context_length: Option<u32>,
}

/// Body of `POST /api/v1/chat`. Prompt text lives here: never log it.
#[derive(Clone, Default, Serialize)]
pub struct ChatBody {
    pub model: String,
    pub input: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system_prompt: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_output_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous_response_id: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub stream: bool,
    /// Keep the reply on the engine, so a later chat can continue it (LM Studio's default is
    /// true; lmsd asks for it only when a task continues or may be continued).
    pub store: bool,
    /// Constrain the answer to this JSON Schema. LM Studio's native chat has no structured
    /// output, so such a chat goes to `/v1/chat/completions`, which keeps no conversation.
    #[serde(skip)]
    pub schema: Option<Value>,
    /// Images (data URLs) beside the input, for a vision model.
    #[serde(skip)]
    pub images: Vec<String>,
}

/// The native chat's body: with images, `input` becomes LM Studio's item list
/// (`{"type":"text","content"}`, `{"type":"image","data_url"}`).
fn native(body: &ChatBody) -> Result<Value, BackendError> {
    let mut value = serde_json::to_value(body).map_err(|e| BackendError::Unsupported {
        what: format!("lmsd cannot encode this chat for LM Studio: {e}"),
    })?;
    if !body.images.is_empty() {
        let mut items = vec![serde_json::json!({"type": "text", "content": body.input})];
        items.extend(
            body.images
                .iter()
                .map(|url| serde_json::json!({"type": "image", "data_url": url})),
        );
        value["input"] = Value::Array(items);
    }
    Ok(value)
}

impl std::fmt::Debug for ChatBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatBody")
            .field("model", &self.model)
            .field("input_bytes", &self.input.len())
            .field("stream", &self.stream)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Deserialize)]
pub struct ChatReply {
    pub model_instance_id: String,
    #[serde(default)]
    pub output: Vec<OutputItem>,
    #[serde(default)]
    pub stats: ChatStats,
    #[serde(default)]
    pub response_id: Option<String>,
}

impl std::fmt::Debug for ChatReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatReply")
            .field("model_instance_id", &self.model_instance_id)
            .field("output_items", &self.output.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum OutputItem {
    Message {
        content: String,
    },
    Reasoning {
        content: String,
    },
    /// Tool calls and anything newer: not text for the agent.
    #[serde(other)]
    Other,
}

// Model output never reaches a log: Debug shows only the kind and length.
impl std::fmt::Debug for OutputItem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OutputItem::Message { content } => write!(f, "Message({} bytes)", content.len()),
            OutputItem::Reasoning { content } => write!(f, "Reasoning({} bytes)", content.len()),
            OutputItem::Other => f.write_str("Other"),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ChatStats {
    #[serde(default)]
    pub input_tokens: u64,
    #[serde(default)]
    pub total_output_tokens: u64,
    #[serde(default)]
    pub reasoning_output_tokens: u64,
    #[serde(default)]
    pub model_load_time_seconds: Option<f64>,
}

/// The text of a chat reply, as the scripts lmsd replaces read it: the message items joined, or
/// the reasoning when there is no message text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextSource {
    Message,
    Reasoning,
}

impl ChatReply {
    /// `None` when the reply has neither message nor reasoning text: an invalid reply.
    pub fn text(&self) -> Option<(String, TextSource)> {
        let join = |want_message: bool| -> String {
            self.output
                .iter()
                .filter_map(|item| match item {
                    OutputItem::Message { content } if want_message => Some(content.as_str()),
                    OutputItem::Reasoning { content } if !want_message => Some(content.as_str()),
                    _ => None,
                })
                .collect()
        };
        let message = join(true);
        if !message.trim().is_empty() {
            return Some((message, TextSource::Message));
        }
        let reasoning = join(false);
        (!reasoning.trim().is_empty()).then_some((reasoning, TextSource::Reasoning))
    }
}

/// What a streamed chat reports on the way.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    LoadProgress {
        model_instance_id: String,
        progress: f64,
    },
    Reasoning(String),
    Message(String),
}

// ---------------------------------------------------------------------------------------------
// Client

/// A cheap-to-clone client for one LM Studio server.
#[derive(Debug, Clone)]
pub struct LmStudio {
    http: Http,
}

impl LmStudio {
    pub fn new(http: Http) -> Self {
        LmStudio { http }
    }

    pub fn http(&self) -> &Http {
        &self.http
    }

    pub async fn models(&self) -> Result<Vec<Model>, BackendError> {
        let reply: ModelsReply = self.http.get("/api/v1/models").await?;
        Ok(reply.models)
    }

    pub async fn load(&self, body: &LoadBody) -> Result<LoadReply, BackendError> {
        self.http.post_load("/api/v1/models/load", body).await
    }

    /// Unloads one instance. `instance_id` must come from `loaded_instances[].id`.
    pub async fn unload(&self, instance_id: &str) -> Result<(), BackendError> {
        #[derive(Deserialize)]
        struct UnloadReply {}
        let body = serde_json::json!({ "instance_id": instance_id });
        let _: UnloadReply = self
            .http
            .post("/api/v1/models/unload", &body, Limit::Control)
            .await?;
        Ok(())
    }

    pub async fn chat(&self, body: &ChatBody) -> Result<ChatReply, BackendError> {
        if body.schema.is_some() {
            return self.chat_constrained(body).await;
        }
        self.http
            .post("/api/v1/chat", &native(body)?, Limit::Request)
            .await
            .map_err(|e| continuation_error(e, body))
    }

    /// A chat whose answer is constrained to `schema`, through the OpenAI-compatible endpoint:
    /// the only one of LM Studio's that honours a schema. It is stateless: no continuation, no
    /// stored reply (lmsd refuses a contract on a continued chat before it gets here).
    async fn chat_constrained(&self, body: &ChatBody) -> Result<ChatReply, BackendError> {
        // A fresh conversation: the system prompt, then the input.
        let request = completions::request(body, messages(None, body), false);
        let mut reply: Completion = self
            .http
            .post("/v1/chat/completions", &request, Limit::Request)
            .await?;
        let (message, reasoning) = reply.texts();
        // The instance that answered, which may not be the one named.
        let answered = reply.model.take().unwrap_or_else(|| body.model.clone());
        Ok(completions::reply(
            answered,
            message,
            reasoning,
            &reply.usage,
            None,
        ))
    }

    /// A streamed chat: SSE events go to `on_event` as they come; the result is `chat.end`'s.
    pub async fn chat_stream<F, Fut>(
        &self,
        body: &ChatBody,
        mut on_event: F,
    ) -> Result<ChatReply, BackendError>
    where
        F: FnMut(StreamEvent) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let mut streamed = body.clone();
        streamed.stream = true;
        let opened = self
            .http
            .post_stream("/api/v1/chat", &native(&streamed)?)
            .await
            .map_err(|e| continuation_error(e, body))?;
        let (status, mut events) = match opened {
            Opened::Events(status, events) => (status, events),
            Opened::Body(status, bytes) => {
                return decode_reply(status, &bytes).map_err(|e| continuation_error(e, body))
            }
        };
        let mut stream_error = None;
        while let Some(event) = events.next().await {
            let event = event.map_err(|e| self.http.stream_broke(e))?;
            let data: Value =
                serde_json::from_str(&event.data).map_err(|e| BackendError::Malformed {
                    status,
                    detail: format!("invalid JSON in {:?} event: {e}", event.event),
                })?;
            let text = |key: &str| {
                data.get(key)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned()
            };
            match event_name(&event.event, &data) {
                "model_load.progress" => {
                    let progress = data.get("progress").and_then(Value::as_f64).unwrap_or(0.0);
                    on_event(StreamEvent::LoadProgress {
                        model_instance_id: text("model_instance_id"),
                        progress,
                    })
                    .await;
                }
                "reasoning.delta" => on_event(StreamEvent::Reasoning(text("content"))).await,
                "message.delta" => on_event(StreamEvent::Message(text("content"))).await,
                "error" => {
                    stream_error = Some(classify_error(status, data.get("error").unwrap_or(&data)))
                }
                "chat.end" => {
                    if let Some(error) = stream_error {
                        return Err(continuation_error(error, body));
                    }
                    let result = data.get("result").cloned().unwrap_or(Value::Null);
                    return serde_json::from_value(result).map_err(|e| BackendError::Malformed {
                        status,
                        detail: format!("unexpected chat.end result: {e}"),
                    });
                }
                _ => {}
            }
        }
        Err(stream_error.unwrap_or(BackendError::Malformed {
            status,
            detail: "the event stream ended before chat.end".into(),
        }))
    }
}

/// An SSE event's name: its `event:` line, or — for a frame without one, which SSE names
/// `message` — the `type` every LM Studio payload carries.
fn event_name<'a>(event: &'a str, data: &'a Value) -> &'a str {
    match event {
        "" | "message" => data.get("type").and_then(Value::as_str).unwrap_or_default(),
        name => name,
    }
}

/// On a continuation, an error saying the stored response is gone is a lost conversation.
fn continuation_error(error: BackendError, body: &ChatBody) -> BackendError {
    match &body.previous_response_id {
        Some(id) => error.for_continuation(id),
        None => error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The documented examples of shared/lmstudio-api.md, verbatim.
    const MODELS_EXAMPLE: &str = r#"{"models":[{"type":"llm","publisher":"google","key":"google/gemma-4-26b-a4b","display_name":"Gemma 4 26B A4B",
 "architecture":"gemma4","quantization":{"name":"Q4_K_M","bits_per_weight":4},"size_bytes":17990911801,
 "params_string":"26B-A4B","loaded_instances":[{"id":"google/gemma-4-26b-a4b","config":{"context_length":4096,
 "eval_batch_size":512,"parallel":4,"flash_attention":true,"num_experts":8,"offload_kv_cache_to_gpu":true}}],
 "max_context_length":262144,"format":"gguf","capabilities":{"vision":true,"trained_for_tool_use":true,
 "reasoning":{"allowed_options":["off","on"],"default":"on"}},"description":null,
 "variants":["google/gemma-4-26b-a4b@q4_k_m"],"selected_variant":"google/gemma-4-26b-a4b@q4_k_m"},
 {"type":"embedding","publisher":"gaianet","key":"text-embedding-nomic-embed-text-v1.5-embedding",
  "display_name":"Nomic Embed Text v1.5","quantization":{"name":"F16","bits_per_weight":16},
  "size_bytes":274290560,"params_string":null,"loaded_instances":[],"max_context_length":2048,"format":"gguf"}]}"#;

    #[test]
    fn parses_the_documented_model_list() {
        let models = decode_reply::<ModelsReply>(200, MODELS_EXAMPLE.as_bytes())
            .unwrap()
            .models;
        assert_eq!(models.len(), 2);
        let gemma = &models[0];
        assert_eq!(gemma.kind, ModelType::Llm);
        assert_eq!(gemma.size_bytes, 17_990_911_801);
        assert_eq!(gemma.loaded_instances[0].id, "google/gemma-4-26b-a4b");
        assert_eq!(gemma.loaded_instances[0].config.context_length, 4096);
        assert_eq!(gemma.loaded_instances[0].config.parallel, Some(4));
        let caps = gemma.capabilities.as_ref().unwrap();
        assert!(caps.vision && caps.reasoning.is_some());
        let nomic = &models[1];
        assert_eq!(nomic.kind, ModelType::Embedding);
        assert!(nomic.capabilities.is_none() && nomic.loaded_instances.is_empty());
    }

    #[test]
    fn parses_the_documented_load_reply() {
        let reply: LoadReply = decode_reply(
            200,
            br#"{"type":"llm","instance_id":"openai/gpt-oss-20b","load_time_seconds":9.099,"status":"loaded","load_config":{"context_length":16384,"eval_batch_size":512,"flash_attention":true,"offload_kv_cache_to_gpu":true,"num_experts":4}}"#,
        )
        .unwrap();
        assert_eq!(reply.instance_id, "openai/gpt-oss-20b");
        assert_eq!(reply.load_config.unwrap().context_length, Some(16384));
        // The pre-0.4.0 name of the id.
        let beta: LoadReply = decode_reply(
            200,
            br#"{"type":"llm","model_instance_id":"m","load_time_seconds":1.0,"status":"loaded"}"#,
        )
        .unwrap();
        assert_eq!(beta.instance_id, "m");
    }

    #[test]
    fn parses_the_documented_chat_reply_and_falls_back_to_reasoning() {
        let reply: ChatReply = decode_reply(
            200,
            br#"{"model_instance_id":"qwen/qwen3-vl-4b","output":[{"type":"message","content":"Hello"}],"stats":{"input_tokens":17,"total_output_tokens":50,"reasoning_output_tokens":0,"tokens_per_second":51.04,"time_to_first_token_seconds":0.814},"response_id":"resp_0182"}"#,
        )
        .unwrap();
        assert_eq!(reply.text(), Some(("Hello".into(), TextSource::Message)));
        assert_eq!(reply.stats.input_tokens, 17);
        assert_eq!(reply.response_id.as_deref(), Some("resp_0182"));

        let thinking: ChatReply = serde_json::from_str(
            r#"{"model_instance_id":"m","output":[{"type":"reasoning","content":"Let me think"},{"type":"tool_call","tool":"x","arguments":{},"output":"","provider_info":{"type":"plugin"}}]}"#,
        )
        .unwrap();
        assert_eq!(
            thinking.text(),
            Some(("Let me think".into(), TextSource::Reasoning))
        );
        let empty: ChatReply =
            serde_json::from_str(r#"{"model_instance_id":"m","output":[]}"#).unwrap();
        assert_eq!(empty.text(), None);
    }

    #[test]
    fn classifies_documented_and_observed_errors() {
        let auth = decode_reply::<ModelsReply>(401, br#"{"error":{"type":"invalid_request","code":"invalid_api_key","message":"An LM Studio API token is required"}}"#).unwrap_err();
        assert!(matches!(auth, BackendError::Unauthorized { .. }) && !auth.is_transient());

        let validation = decode_reply::<LoadReply>(400, br#"{"error":{"type":"invalid_request","message":"\"model\" is required","code":"missing_required_parameter","param":"model"}}"#).unwrap_err();
        assert!(
            matches!(validation, BackendError::Api { status: 400, .. })
                && !validation.is_transient()
        );

        let not_found = decode_reply::<ChatReply>(404, br#"{"error":{"message":"Model \"default\" not found.","type":"invalid_request_error","param":"model","code":"model_not_found"}}"#).unwrap_err();
        assert!(matches!(not_found, BackendError::ModelNotFound { .. }));

        let unknown_route = decode_reply::<LoadReply>(
            200,
            br#"{"error":"Unexpected endpoint or method. (POST /v1/models/load)"}"#,
        )
        .unwrap_err();
        assert!(
            matches!(unknown_route, BackendError::Api { status: 200, .. })
                && !unknown_route.is_transient()
        );

        let html =
            decode_reply::<ModelsReply>(500, b"<!DOCTYPE html><html>Internal Server Error</html>")
                .unwrap_err();
        assert!(matches!(html, BackendError::Malformed { status: 500, .. }) && html.is_transient());

        let truncated = decode_reply::<ModelsReply>(200, br#"{"models": [{"#).unwrap_err();
        assert!(truncated.is_transient());

        let server = decode_reply::<ModelsReply>(
            503,
            br#"{"error":{"type":"internal_error","message":"busy"}}"#,
        )
        .unwrap_err();
        assert!(server.is_transient());

        let oom = decode_reply::<LoadReply>(500, br#"{"error":{"type":"internal_error","message":"Failed to load model. Error: Model loading was stopped due to insufficient system resources."}}"#).unwrap_err();
        assert!(matches!(oom, BackendError::OutOfMemory { .. }) && !oom.is_transient());
    }

    #[test]
    fn an_event_without_its_name_is_read_by_its_type() {
        let data = serde_json::json!({"type": "message.delta", "content": "Hi"});
        assert_eq!(event_name("message.delta", &data), "message.delta");
        assert_eq!(event_name("", &data), "message.delta");
        assert_eq!(event_name("message", &data), "message.delta");
        assert_eq!(event_name("chat.end", &data), "chat.end");
        assert_eq!(event_name("", &serde_json::json!({})), "");
    }

    #[test]
    fn parses_the_documented_embeddings_reply() {
        #[derive(Deserialize)]
        struct Item {
            embedding: Vec<f64>,
        }
        #[derive(Deserialize)]
        struct Reply {
            data: Vec<Item>,
        }
        let reply: Reply = decode_reply(
            200,
            br#"{"object":"list","data":[{"object":"embedding","embedding":[0.1,-0.2],"index":0}],"model":"text-embedding-nomic-embed-text-v1.5@q4_k_m","usage":{"prompt_tokens":0,"total_tokens":0}}"#,
        )
        .unwrap();
        assert_eq!(reply.data[0].embedding, [0.1, -0.2]);
    }

    #[test]
    fn load_body_sends_only_set_keys() {
        let body = LoadBody {
            model: "m".into(),
            settings: LoadSettings {
                context_length: Some(8192),
                ..LoadSettings::default()
            },
            ..LoadBody::default()
        };
        assert_eq!(
            serde_json::to_string(&body).unwrap(),
            r#"{"model":"m","context_length":8192}"#
        );
    }
}
