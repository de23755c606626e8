//! The OpenAI-compatible front door (`[http] listen`): `GET /v1/models`,
//! `POST /v1/chat/completions` (plain and streamed) and `POST /v1/embeddings`, every request run
//! as a task through the same pool and queue as socket tasks. Agents that speak the OpenAI API
//! use lmsd without new code. A field lmsd cannot honour is refused with a 400 that names it,
//! never dropped: an agent that asked for a JSON schema or tools must not get free text back.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use lmsd_proto::{
    ChatOutcome, ChatRequest, EmbedRequest, ErrorCode, Event, ReplyBody, TaskOptions, WireError,
};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::tasks::{self, Context, EventSink};

#[derive(Clone)]
struct Front {
    ctx: Context,
    keys: Arc<Vec<String>>,
}

/// Serves the front door until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    ctx: Context,
    api_keys: Vec<String>,
    shutdown: CancellationToken,
) {
    let front = Front {
        ctx,
        keys: Arc::new(api_keys),
    };
    let app = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/metrics", get(metrics))
        .with_state(front);
    if let Err(error) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        tracing::warn!(%error, "the HTTP front door stopped");
    }
}

/// An error in OpenAI's shape, with the HTTP status its code calls for.
fn error(wire: WireError) -> Response {
    error_about(wire, None)
}

/// As [`error`], naming the request field at fault in `param`.
fn error_about(wire: WireError, param: Option<&str>) -> Response {
    let status = match wire.code {
        ErrorCode::BadRequest
        | ErrorCode::UnsupportedVersion
        | ErrorCode::SessionLost
        | ErrorCode::ContextExceeded => StatusCode::BAD_REQUEST,
        ErrorCode::ModelNotFound => StatusCode::NOT_FOUND,
        ErrorCode::PermissionDenied => StatusCode::UNAUTHORIZED,
        ErrorCode::QueueFull => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::BackendUnreachable | ErrorCode::BackendError | ErrorCode::OutputInvalid => {
            StatusCode::BAD_GATEWAY
        }
        ErrorCode::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        ErrorCode::OutOfMemory | ErrorCode::BudgetExceeded | ErrorCode::ShuttingDown => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        ErrorCode::Cancelled | ErrorCode::Internal | ErrorCode::Unknown => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    };
    let body = json!({"error": {"message": wire.message, "type": wire.code, "code": wire.code, "param": param}});
    (status, Json(body)).into_response()
}

fn authorize(front: &Front, headers: &HeaderMap) -> Result<(), WireError> {
    if front.keys.is_empty() {
        return Ok(());
    }
    let presented = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        Some(key) if front.keys.iter().any(|k| k == key) => Ok(()),
        _ => Err(WireError::new(
            ErrorCode::PermissionDenied,
            "a valid API key is required (Authorization: Bearer KEY, from [http] api_keys)",
        )),
    }
}

fn parse<T: for<'de> Deserialize<'de>>(body: &Bytes) -> Result<T, WireError> {
    serde_json::from_slice(body)
        .map_err(|e| WireError::bad_request(format!("invalid request body: {e}")))
}

/// Fields of OpenAI's requests that change nothing lmsd answers, so they may pass unread.
const HARMLESS: [&str; 6] = [
    "user",
    "metadata",
    "store",
    "service_tier",
    "prompt_cache_key",
    "safety_identifier",
];

/// Fields that change nothing at these values, which clients often send as defaults.
fn neutral(key: &str, value: &Value) -> bool {
    match key {
        "n" | "top_p" => value.as_f64() == Some(1.0),
        "frequency_penalty" | "presence_penalty" => value.as_f64() == Some(0.0),
        "logprobs" => value == &Value::Bool(false),
        "top_logprobs" => value.as_u64() == Some(0),
        // Without tools (which are refused), these choose nothing.
        "parallel_tool_calls" => value.is_boolean(),
        "tool_choice" => value == "none" || value == "auto",
        "response_format" => value.get("type").and_then(Value::as_str) == Some("text"),
        _ => false,
    }
}

/// Null, `[]` or `{}`: what a client sends for a field it does not use.
fn unset(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Array(items) => items.is_empty(),
        Value::Object(fields) => fields.is_empty(),
        _ => false,
    }
}

/// The first field of `rest` (what a body had beyond the fields lmsd reads) that lmsd cannot
/// honour, as a 400 naming it.
fn refuse_unsupported(rest: &serde_json::Map<String, Value>) -> Option<Response> {
    let unsupported = rest.iter().find(|(key, value)| {
        !HARMLESS.contains(&key.as_str()) && !neutral(key, value) && !unset(value)
    });
    unsupported.map(|(key, _)| {
        error_about(
            WireError::bad_request(format!(
                "lmsd's front door does not support {key:?} yet, and would have to ignore it; leave it out"
            )),
            Some(key),
        )
    })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn models(State(front): State<Front>, headers: HeaderMap) -> Response {
    if let Err(wire) = authorize(&front, &headers) {
        return error(wire);
    }
    match front.ctx.pool.status().await {
        Ok(status) => {
            let created = unix_now();
            let engine = front.ctx.backend.kind().name();
            let mut data: Vec<Value> = status
                .catalogue
                .iter()
                .map(|m| json!({"id": m.key, "object": "model", "created": created, "owned_by": engine}))
                .collect();
            data.push(
                json!({"id": "auto", "object": "model", "created": created, "owned_by": "lmsd"}),
            );
            Json(json!({"object": "list", "data": data})).into_response()
        }
        Err(e) => error(tasks::TaskError::from(e).to_wire()),
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

/// A content part: text only (images and audio are refused, not dropped).
#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

impl Content {
    fn text(&self) -> String {
        match self {
            Content::Text(text) => text.clone(),
            Content::Parts(parts) => parts
                .iter()
                .filter_map(|p| p.text.as_deref())
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }

    /// The first part that is not text.
    fn non_text(&self) -> Option<&str> {
        match self {
            Content::Text(_) => None,
            Content::Parts(parts) => parts
                .iter()
                .find(|p| p.kind != "text")
                .map(|p| p.kind.as_str()),
        }
    }
}

#[derive(Deserialize)]
struct Message {
    role: String,
    content: Option<Content>,
    /// Tool calls, names and the like: refused by name.
    #[serde(flatten)]
    rest: serde_json::Map<String, Value>,
}

#[derive(Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// The fields lmsd uses; anything else is in `rest`, and refused unless harmless.
#[derive(Deserialize)]
struct ChatCompletionBody {
    model: String,
    messages: Vec<Message>,
    #[serde(default)]
    stream: bool,
    temperature: Option<f64>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    stream_options: Option<StreamOptions>,
    response_format: Option<ResponseFormat>,
    #[serde(flatten)]
    rest: serde_json::Map<String, Value>,
}

/// OpenAI's `response_format`: a JSON Schema or any JSON object becomes the task's contract.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ResponseFormat {
    Text,
    JsonObject,
    JsonSchema { json_schema: JsonSchemaFormat },
}

#[derive(Deserialize)]
struct JsonSchemaFormat {
    /// Absent: any JSON value (OpenAI takes a name and no schema).
    schema: Option<Value>,
}

/// LM Studio's chat takes one input, no assistant turns: system messages become the system
/// prompt, a single user message is the input, and a longer conversation becomes a transcript.
fn chat_request(body: &ChatCompletionBody) -> Result<ChatRequest, WireError> {
    for message in &body.messages {
        if !["system", "developer", "user", "assistant"].contains(&message.role.as_str()) {
            return Err(WireError::bad_request(format!(
                "lmsd's front door does not support {:?} messages yet",
                message.role
            )));
        }
        if let Some(kind) = message.content.as_ref().and_then(Content::non_text) {
            return Err(WireError::bad_request(format!(
                "lmsd's front door takes text content only, not {kind:?} parts"
            )));
        }
        // A message echoed back from an earlier reply carries its empty extras (`refusal`,
        // `annotations`, `tool_calls`…): only set ones are refused.
        if let Some((key, _)) = message
            .rest
            .iter()
            .find(|(key, v)| !unset(v) && key.as_str() != "name")
        {
            return Err(WireError::bad_request(format!(
                "lmsd's front door does not support {key:?} in messages yet"
            )));
        }
    }
    let system: Vec<String> = body
        .messages
        .iter()
        .filter(|m| m.role == "system" || m.role == "developer")
        .filter_map(|m| m.content.as_ref().map(Content::text))
        .collect();
    let turns: Vec<&Message> = body
        .messages
        .iter()
        .filter(|m| m.role != "system" && m.role != "developer")
        .collect();
    let input = match turns.as_slice() {
        [] => {
            return Err(WireError::bad_request(
                "messages must hold at least one user message",
            ))
        }
        [only] if only.role == "user" => {
            only.content.as_ref().map(Content::text).unwrap_or_default()
        }
        many => many
            .iter()
            .map(|m| {
                let speaker = if m.role == "assistant" {
                    "Assistant"
                } else {
                    "User"
                };
                format!(
                    "{speaker}: {}",
                    m.content.as_ref().map(Content::text).unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join("\n\n"),
    };
    // The temperature goes to the engine as given, not mapped from OpenAI's 0–2: the task
    // refuses one outside the engine's range (LM Studio's is 0–1) and says so.
    let (schema, json_object) = match &body.response_format {
        None | Some(ResponseFormat::Text) => (None, false),
        Some(ResponseFormat::JsonObject) => (None, true),
        Some(ResponseFormat::JsonSchema { json_schema }) => {
            (Some(json_schema.schema.clone().unwrap_or(json!({}))), false)
        }
    };
    Ok(ChatRequest {
        model: body.model.clone(),
        input,
        system_prompt: (!system.is_empty()).then(|| system.join("\n\n")),
        temperature: body.temperature,
        max_output_tokens: body.max_completion_tokens.or(body.max_tokens),
        stream: body.stream,
        schema,
        json_object,
        options: TaskOptions::default(),
        ..ChatRequest::default()
    })
}

fn usage(outcome: &ChatOutcome) -> Value {
    let (prompt, completion) = (
        outcome.usage.input_tokens,
        outcome.usage.total_output_tokens,
    );
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

async fn chat_completions(State(front): State<Front>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(wire) = authorize(&front, &headers) {
        return error(wire);
    }
    let body: ChatCompletionBody = match parse(&body) {
        Ok(body) => body,
        Err(wire) => return error(wire),
    };
    if let Some(response) = refuse_unsupported(&body.rest) {
        return response;
    }
    let request = match chat_request(&body) {
        Ok(request) => request,
        Err(wire) => return error(wire),
    };
    if body.stream && (request.schema.is_some() || request.json_object) {
        return error_about(
            WireError::bad_request("a response_format answer is checked whole before it is sent, so it cannot stream: leave stream out"),
            Some("stream"),
        );
    }
    if body.stream {
        let include_usage = body.stream_options.unwrap_or_default().include_usage;
        return stream_chat(front.ctx, request, include_usage);
    }
    // No events to forward: with the receiver gone, the task's event sends return at once.
    let (replies, _) = mpsc::channel(1);
    let sink = EventSink {
        id: "http".into(),
        replies,
    };
    match tasks::chat(&front.ctx, &request, &sink, CancellationToken::new()).await {
        Ok(outcome) => {
            // A contract's answer as the JSON lmsd checked: a fence the model put around it is
            // gone, so the client's own parse (the openai package's `parse()`) takes it as is.
            let content = outcome
                .json
                .as_ref()
                .map_or_else(|| outcome.content.clone(), Value::to_string);
            Json(json!({
                "id": format!("chatcmpl-{}", outcome.task.task_id),
                "object": "chat.completion",
                "created": unix_now(),
                "model": outcome.task.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
                "usage": usage(&outcome),
            }))
            .into_response()
        }
        Err(e) => error(e.to_wire()),
    }
}

fn sse(value: &Value) -> Result<Bytes, Infallible> {
    Ok(Bytes::from(format!("data: {value}\n\n")))
}

/// Streams a chat as OpenAI chunks: the role, the content as it comes, the end, usage when
/// asked for, and `[DONE]`. A client that goes away cancels the task.
fn stream_chat(ctx: Context, request: ChatRequest, include_usage: bool) -> Response {
    let (out, body) = mpsc::channel::<Result<Bytes, Infallible>>(64);
    tokio::spawn(async move {
        let cancel = CancellationToken::new();
        let (replies, mut events) = mpsc::channel(64);
        let sink = EventSink {
            id: "http".into(),
            replies,
        };
        let (id, created) = (format!("chatcmpl-{}", unix_now()), unix_now());
        let model = request.model.clone();
        let chunk = |delta: Value, finish: Value| {
            json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
        };
        let _ = out
            .send(sse(&chunk(
                json!({"role": "assistant", "content": ""}),
                Value::Null,
            )))
            .await;
        let chat = tasks::chat(&ctx, &request, &sink, cancel.clone());
        tokio::pin!(chat);
        let forward = |reply: lmsd_proto::Reply| match reply.body {
            ReplyBody::Event(Event::Delta { content }) => {
                Some(sse(&chunk(json!({"content": content}), Value::Null)))
            }
            _ => None,
        };
        let result = loop {
            tokio::select! {
                // Deltas first: the answer's text must be out before its end.
                biased;
                Some(reply) = events.recv() => {
                    if let Some(piece) = forward(reply) {
                        if out.send(piece).await.is_err() {
                            cancel.cancel();
                        }
                    }
                }
                result = &mut chat => break result,
            }
        };
        while let Ok(reply) = events.try_recv() {
            if let Some(piece) = forward(reply) {
                let _ = out.send(piece).await;
            }
        }
        match result {
            Ok(outcome) => {
                let _ = out.send(sse(&chunk(json!({}), json!("stop")))).await;
                if include_usage {
                    let usage_chunk = json!({"id": id, "object": "chat.completion.chunk", "created": created,
                        "model": outcome.task.model, "choices": [], "usage": usage(&outcome)});
                    let _ = out.send(sse(&usage_chunk)).await;
                }
            }
            Err(e) => {
                let wire = e.to_wire();
                let _ = out.send(sse(&json!({"error": {"message": wire.message, "type": wire.code, "code": wire.code}}))).await;
            }
        }
        let _ = out.send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await;
    });
    let stream = futures_util::stream::unfold(body, |mut body| async move {
        body.recv().await.map(|item| (item, body))
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

#[derive(Deserialize)]
#[serde(untagged)]
enum EmbedInput {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, Default, PartialEq)]
#[serde(rename_all = "snake_case")]
enum EncodingFormat {
    #[default]
    Float,
    /// Little-endian f32s, base64: what OpenAI's Python client asks for by default.
    Base64,
}

#[derive(Deserialize)]
struct EmbeddingsBody {
    model: String,
    input: EmbedInput,
    #[serde(default)]
    encoding_format: EncodingFormat,
    /// `dimensions` among them: LM Studio answers it with empty vectors.
    #[serde(flatten)]
    rest: serde_json::Map<String, Value>,
}

/// A vector as OpenAI's `base64` encoding has it.
fn base64_vector(vector: &[f64]) -> String {
    use base64::Engine;
    let bytes: Vec<u8> = vector
        .iter()
        .flat_map(|x| (*x as f32).to_le_bytes())
        .collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

async fn embeddings(State(front): State<Front>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(wire) = authorize(&front, &headers) {
        return error(wire);
    }
    let body: EmbeddingsBody = match parse(&body) {
        Ok(body) => body,
        Err(wire) => return error(wire),
    };
    if let Some(response) = refuse_unsupported(&body.rest) {
        return response;
    }
    let base64 = body.encoding_format == EncodingFormat::Base64;
    let input = match body.input {
        EmbedInput::One(text) => vec![text],
        EmbedInput::Many(texts) => texts,
    };
    if input.is_empty() {
        return error(WireError::bad_request("input must hold at least one text"));
    }
    let (replies, _) = mpsc::channel(1);
    let sink = EventSink {
        id: "http".into(),
        replies,
    };
    let request = EmbedRequest {
        model: body.model,
        input,
        options: TaskOptions::default(),
    };
    match tasks::embed(&front.ctx, &request, &sink, CancellationToken::new()).await {
        Ok(outcome) => {
            let data: Vec<Value> = outcome
                .embeddings
                .iter()
                .enumerate()
                .map(|(index, embedding)| {
                    let embedding = if base64 {
                        json!(base64_vector(embedding))
                    } else {
                        json!(embedding)
                    };
                    json!({"object": "embedding", "embedding": embedding, "index": index})
                })
                .collect();
            Json(json!({"object": "list", "data": data, "model": outcome.task.model, "usage": {"prompt_tokens": 0, "total_tokens": 0}}))
                .into_response()
        }
        Err(e) => error(e.to_wire()),
    }
}

async fn metrics(State(front): State<Front>, headers: HeaderMap) -> Response {
    if let Err(wire) = authorize(&front, &headers) {
        return error(wire);
    }
    match tasks::metrics(&front.ctx).await {
        Ok(metrics) => (
            [("content-type", "text/plain; version=0.0.4")],
            metrics.text,
        )
            .into_response(),
        Err(e) => error(e.to_wire()),
    }
}
