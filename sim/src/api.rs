//! The HTTP face of the simulator: LM Studio's v1 routes, its JSON shapes and its quirks.
// Helpers return `Err(Response)` to end a handler early; a large Err is fine in a test tool.
#![allow(clippy::result_large_err)]

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::catalogue::{SimModel, SimModelKind};
use crate::faults::{take_fault, Fault, Route};
use crate::state::{ApiError, ChatTarget, LoadSettings, StoredResponse, DEFAULT_PARALLEL};
use crate::Shared;

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/api/v1/models", get(list_models))
        .route("/api/v1/models/load", post(load))
        .route("/api/v1/models/unload", post(unload))
        .route("/api/v1/chat", post(chat))
        .route("/v1/embeddings", post(embeddings))
        .fallback(unknown_route)
        .with_state(shared)
}

fn error_response(error: ApiError) -> Response {
    let mut body = json!({"type": error.kind, "message": error.message});
    if let Some(code) = error.code {
        body["code"] = json!(code);
    }
    let status = StatusCode::from_u16(error.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, axum::Json(json!({ "error": body }))).into_response()
}

/// Auth and injected faults, checked before every route. `Ok(Some(fault))` hands a
/// route-specific fault (such as an ignored unload) to the handler.
async fn guard(
    shared: &Shared,
    route: Route,
    headers: &HeaderMap,
) -> Result<Option<Fault>, Response> {
    let (token, fault) = {
        let mut state = shared.lock();
        let token = state.config.auth_token.clone();
        if route == Route::Chat {
            state.stats.chat_requests += 1;
        }
        (token, take_fault(&mut state.faults, route))
    };
    if let Some(token) = token {
        let presented = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if presented != Some(token.as_str()) {
            let body = json!({"error": {"type": "invalid_request", "code": "invalid_api_key",
                "message": "An LM Studio API token is required to make requests to this server, but none was provided using the Authorization header using the 'Bearer' scheme (i.e., 'Authorization: Bearer $LM_API_TOKEN')."}});
            return Err((StatusCode::UNAUTHORIZED, axum::Json(body)).into_response());
        }
    }
    match fault {
        None => Ok(None),
        Some(Fault::Delay(delay)) => {
            tokio::time::sleep(delay).await;
            Ok(None)
        }
        Some(Fault::Status(status)) => Err(error_response(ApiError {
            status,
            kind: "internal_error",
            message: format!("Injected failure with status {status}"),
            code: None,
        })),
        Some(Fault::ErrorWith200) => Err(error_response(ApiError {
            status: 200,
            kind: "unknown",
            message: "Injected failure answered with 200".into(),
            code: None,
        })),
        Some(Fault::Html500) => Err((
            StatusCode::INTERNAL_SERVER_ERROR,
            [("content-type", "text/html; charset=utf-8")],
            "<!DOCTYPE html>\n<html><head><title>Error</title></head><body><pre>Internal Server Error</pre></body></html>",
        )
            .into_response()),
        Some(Fault::MalformedJson) => Err((
            StatusCode::OK,
            [("content-type", "application/json")],
            r#"{"models": [{"type": "llm", "key": "#,
        )
            .into_response()),
        Some(Fault::DropConnection) => {
            // A body that fails at once: the server aborts the connection mid-response.
            let broken = futures_util::stream::once(async {
                Err::<Bytes, _>(std::io::Error::other("simulated dropped connection"))
            });
            Err(Body::from_stream(broken).into_response())
        }
                        Some(fault @ (Fault::IgnoreUnload | Fault::EmptyOutput | Fault::StallStream)) => Ok(Some(fault)),
    }
}

/// Sleeps, except for zero: tokio rounds any sleep up to its 1 ms timer tick, which would make
/// zero-delay mode cost a millisecond per token.
async fn pause(duration: Duration) {
    if !duration.is_zero() {
        tokio::time::sleep(duration).await;
    }
}

/// Parses a request body strictly, answering as LM Studio's validator does.
fn parse_body<T: for<'de> Deserialize<'de>>(body: &Bytes) -> Result<T, Response> {
    serde_json::from_slice(body).map_err(|e| {
        let message = match e.classify() {
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
                format!("Invalid JSON in request body: {e}")
            }
            _ => e
                .to_string()
                .replace("unknown field", "Unrecognized key(s) in object:"),
        };
        error_response(ApiError::invalid_request(message))
    })
}

async fn unknown_route(method: Method, uri: Uri) -> Response {
    axum::Json(
        json!({"error": format!("Unexpected endpoint or method. ({method} {})", uri.path())}),
    )
    .into_response()
}

fn model_json(model: &SimModel, instances: &[Value]) -> Value {
    let mut entry = json!({
        "type": model.kind,
        "publisher": model.publisher,
        "key": model.key,
        "display_name": model.display_name,
        "quantization": {"name": model.quantization, "bits_per_weight": if model.quantization == "F16" { 16 } else { 4 }},
        "size_bytes": model.size_bytes,
        "params_string": model.params_string,
        "loaded_instances": instances,
        "max_context_length": model.max_context_length,
        "format": "gguf",
    });
    if model.kind == SimModelKind::Llm {
        entry["architecture"] = json!(model.architecture);
        let mut capabilities =
            json!({"vision": model.vision, "trained_for_tool_use": model.tool_use});
        if model.reasoning {
            capabilities["reasoning"] = json!({"allowed_options": ["off", "on"], "default": "on"});
        }
        entry["capabilities"] = capabilities;
        entry["description"] = Value::Null;
    }
    entry
}

async fn list_models(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if let Err(response) = guard(&shared, Route::Models, &headers).await {
        return response;
    }
    let state = shared.lock();
    let models: Vec<Value> = state
        .config
        .catalogue
        .iter()
        .map(|model| {
            let instances: Vec<Value> = state
                .instances
                .iter()
                .filter(|i| i.key == model.key)
                .map(|i| {
                    let mut config = json!({"context_length": i.context_length});
                    if i.kind == SimModelKind::Llm {
                        config["eval_batch_size"] =
                            json!(i.settings.eval_batch_size.unwrap_or(512));
                        config["parallel"] = json!(DEFAULT_PARALLEL);
                        config["flash_attention"] =
                            json!(i.settings.flash_attention.unwrap_or(true));
                        config["offload_kv_cache_to_gpu"] =
                            json!(i.settings.offload_kv_cache_to_gpu.unwrap_or(true));
                        if let Some(experts) = i.settings.num_experts {
                            config["num_experts"] = json!(experts);
                        }
                    }
                    json!({"id": i.id, "config": config})
                })
                .collect();
            model_json(model, &instances)
        })
        .collect();
    axum::Json(json!({ "models": models })).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoadBody {
    model: String,
    context_length: Option<u32>,
    eval_batch_size: Option<u32>,
    flash_attention: Option<bool>,
    num_experts: Option<u32>,
    offload_kv_cache_to_gpu: Option<bool>,
    #[serde(default)]
    echo_load_config: bool,
}

/// Reserves memory, waits the load time (reporting progress), and creates the instance.
async fn load_instance(
    shared: &Shared,
    key: &str,
    settings: LoadSettings,
    jit: bool,
    mut on_progress: impl FnMut(f64),
) -> Result<(String, Duration), ApiError> {
    let (ticket, load_time) = {
        let mut state = shared.lock();
        let ticket = state.begin_load(key, settings, jit)?;
        let load_time = state.config.load_time(ticket.size_bytes);
        (ticket, load_time)
    };
    const STEPS: u32 = 4;
    for step in 1..=STEPS {
        pause(load_time / STEPS).await;
        on_progress(f64::from(step) / f64::from(STEPS));
    }
    let id = shared.lock().finish_load(ticket, Instant::now());
    Ok((id, load_time))
}

async fn load(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(response) = guard(&shared, Route::Load, &headers).await {
        return response;
    }
    let body: LoadBody = match parse_body(&body) {
        Ok(body) => body,
        Err(response) => return response,
    };
    let settings = LoadSettings {
        context_length: body.context_length,
        eval_batch_size: body.eval_batch_size,
        flash_attention: body.flash_attention,
        num_experts: body.num_experts,
        offload_kv_cache_to_gpu: body.offload_kv_cache_to_gpu,
    };
    let kind = shared.lock().model(&body.model).map(|m| m.kind);
    match load_instance(&shared, &body.model, settings.clone(), false, |_| {}).await {
        Err(error) => error_response(error),
        Ok((instance_id, load_time)) => {
            let mut reply = json!({
                "type": kind.unwrap_or(SimModelKind::Llm),
                "instance_id": instance_id,
                "load_time_seconds": load_time.as_secs_f64(),
                "status": "loaded",
            });
            if body.echo_load_config {
                let context_length = shared
                    .lock()
                    .instances
                    .iter()
                    .find(|i| i.id == instance_id)
                    .map(|i| i.context_length);
                reply["load_config"] = json!({"context_length": context_length});
            }
            axum::Json(reply).into_response()
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UnloadBody {
    instance_id: String,
}

async fn unload(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let fault = match guard(&shared, Route::Unload, &headers).await {
        Ok(fault) => fault,
        Err(response) => return response,
    };
    let body: UnloadBody = match parse_body(&body) {
        Ok(body) => body,
        Err(response) => return response,
    };
    let result = if fault == Some(Fault::IgnoreUnload) {
        Ok(())
    } else {
        shared.lock().unload(&body.instance_id)
    };
    match result {
        Ok(()) => axum::Json(json!({"instance_id": body.instance_id})).into_response(),
        Err(error) => error_response(error),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // sampling fields are accepted, as LM Studio does, but do not shape fake text
struct ChatBody {
    model: String,
    input: Value,
    system_prompt: Option<String>,
    integrations: Option<Value>,
    #[serde(default)]
    stream: bool,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<u32>,
    min_p: Option<f64>,
    repeat_penalty: Option<f64>,
    max_output_tokens: Option<u32>,
    reasoning: Option<String>,
    context_length: Option<u32>,
    store: Option<bool>,
    previous_response_id: Option<String>,
}

/// Counts words of the input, which is a string or an array of `{type, content}` items.
fn input_words(input: &Value) -> Result<u64, ApiError> {
    let count = |text: &str| text.split_whitespace().count() as u64;
    match input {
        Value::String(text) => Ok(count(text)),
        Value::Array(items) => items.iter().enumerate().try_fold(0, |sum, (n, item)| {
            match (
                item.get("type").and_then(Value::as_str),
                item.get("content"),
            ) {
                (Some("image"), _) => Ok(sum + 256),
                (_, Some(Value::String(text))) => Ok(sum + count(text)),
                _ => Err(ApiError::invalid_request(format!(
                    "'input.{n}.content' is required"
                ))),
            }
        }),
        _ => Err(ApiError::invalid_request(
            "'input' must be a string or an array",
        )),
    }
}

/// The fake answer: reasoning (for reasoning models) spends the output budget first, as real
/// reasoning models do, so a small `max_output_tokens` can leave the message empty.
fn compose(
    model: &SimModel,
    instance_id: &str,
    words: u64,
    turn: u32,
    budget: Option<u32>,
) -> (Vec<String>, Vec<String>) {
    let reasoning_text = if model.reasoning {
        "The user wants a short answer. I will reply plainly and say that this is a simulation."
    } else {
        ""
    };
    let message_text = format!(
        "Simulated reply {turn} from {instance_id}: your {words}-word prompt was received, and this sentence stands in for a real model's answer."
    );
    let mut budget = budget.map_or(usize::MAX, |b| b as usize);
    let mut take = |text: &str| -> Vec<String> {
        let tokens: Vec<String> = text
            .split_inclusive(' ')
            .take(budget)
            .map(str::to_owned)
            .collect();
        budget -= tokens.len();
        tokens
    };
    let reasoning = take(reasoning_text);
    let message = take(&message_text);
    (reasoning, message)
}

#[derive(Deserialize)]
struct EmbeddingsBody {
    model: String,
    input: Value,
}

/// A deterministic unit vector per text: equal texts embed equally.
fn embed_text(text: &str) -> Vec<f64> {
    let mut vector: Vec<f64> = (0..8u64)
        .map(|i| {
            let hash = text.bytes().fold(1469598103934665603u64 ^ i, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(1099511628211)
            });
            (hash % 2000) as f64 / 1000.0 - 1.0
        })
        .collect();
    let norm = vector.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-9);
    vector.iter_mut().for_each(|x| *x /= norm);
    vector
}

async fn embeddings(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(response) = guard(&shared, Route::Embeddings, &headers).await {
        return response;
    }
    let body: EmbeddingsBody = match parse_body(&body) {
        Ok(body) => body,
        Err(response) => return response,
    };
    let texts: Vec<String> = match body.input {
        Value::String(text) => vec![text],
        Value::Array(items) => items
            .into_iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => {
            return error_response(ApiError::invalid_request(
                "'input' must be a string or an array of strings",
            ))
        }
    };
    let (instance, kind) = {
        let state = shared.lock();
        let instance = state
            .instances
            .iter()
            .find(|i| i.id == body.model || i.key == body.model);
        (
            instance.map(|i| i.id.clone()),
            instance
                .map(|i| i.kind)
                .or(state.model(&body.model).map(|m| m.kind)),
        )
    };
    match (instance, kind) {
        (_, None) => error_response(ApiError::model_not_found(&body.model)),
        (_, Some(SimModelKind::Llm)) => {
            error_response(ApiError::invalid_request(format!("\"{}\" is not an embedding model", body.model)))
        }
        (None, Some(_)) => error_response(ApiError::invalid_request("No models loaded. Please load a model in the developer page or use the 'lms load' command.")),
        (Some(instance), Some(_)) => {
            let _in_flight = InFlight::begin(&shared, &instance);
            shared.lock().stats.embeddings += 1;
            let data: Vec<Value> = texts
                .iter()
                .enumerate()
                .map(|(index, text)| json!({"object": "embedding", "embedding": embed_text(text), "index": index}))
                .collect();
            axum::Json(json!({"object": "list", "data": data, "model": instance, "usage": {"prompt_tokens": 0, "total_tokens": 0}})).into_response()
        }
    }
}

/// Decrements the instance's in-flight count and restarts its idle clock when the chat ends,
/// however it ends.
struct InFlight {
    shared: Arc<Shared>,
    instance_id: String,
}

impl InFlight {
    fn begin(shared: &Arc<Shared>, instance_id: &str) -> Option<Self> {
        let mut state = shared.lock();
        let instance = state.instance_mut(instance_id)?;
        instance.in_flight += 1;
        instance.last_used = Instant::now();
        let in_flight = instance.in_flight;
        state.stats.max_in_flight = state.stats.max_in_flight.max(in_flight);
        Some(InFlight {
            shared: shared.clone(),
            instance_id: instance_id.to_owned(),
        })
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(instance) = self.shared.lock().instance_mut(&self.instance_id) {
            instance.in_flight = instance.in_flight.saturating_sub(1);
            instance.last_used = Instant::now();
        }
    }
}

/// What a chat streams: SSE event name and data. The non-streaming path runs the same steps and
/// keeps only the final result.
type Emit = mpsc::Sender<(&'static str, Value)>;

async fn emit(tx: &Option<Emit>, name: &'static str, mut data: Value) {
    if let Some(tx) = tx {
        data["type"] = json!(name);
        let _ = tx.send((name, data)).await;
    }
}

/// Runs one chat; with `stall`, a streamed answer stops after two tokens and never ends.
async fn run_chat(
    shared: Arc<Shared>,
    body: ChatBody,
    tx: Option<Emit>,
    stall: bool,
) -> Result<Value, ApiError> {
    let words = input_words(&body.input)?
        + body
            .system_prompt
            .as_deref()
            .map_or(0, |s| s.split_whitespace().count() as u64);
    let previous = match &body.previous_response_id {
        None => None,
        Some(id) => Some(shared.lock().responses.get(id).cloned().ok_or_else(|| {
            ApiError::invalid_request(format!(
                "Could not find stored response for previous_response_id \"{id}\""
            ))
        })?),
    };
    let target = shared.lock().chat_target(&body.model)?;
    let (instance_id, load_time) = match target {
        ChatTarget::Loaded(id) => (id, None),
        ChatTarget::NeedsLoad(key) => {
            emit(&tx, "model_load.start", json!({"model_instance_id": key})).await;
            let settings = LoadSettings {
                context_length: body.context_length,
                ..LoadSettings::default()
            };
            let progress_tx = tx.clone();
            let progress_key = key.clone();
            let (id, load_time) = load_instance(&shared, &key, settings, true, move |progress| {
                if let Some(tx) = &progress_tx {
                    let _ = tx.try_send(("model_load.progress", json!({"type": "model_load.progress", "model_instance_id": progress_key, "progress": progress})));
                }
            })
            .await?;
            emit(
                &tx,
                "model_load.end",
                json!({"model_instance_id": id, "load_time_seconds": load_time.as_secs_f64()}),
            )
            .await;
            (id, Some(load_time))
        }
    };
    let Some(_in_flight) = InFlight::begin(&shared, &instance_id) else {
        return Err(ApiError::model_not_found(&instance_id));
    };
    let (model, token_delay) = {
        let mut state = shared.lock();
        state.stats.chats += 1;
        let key = state
            .instances
            .iter()
            .find(|i| i.id == instance_id)
            .map(|i| i.key.clone())
            .unwrap_or_default();
        (state.model(&key).cloned(), state.config.token_delay)
    };
    let model = model.ok_or_else(|| ApiError::model_not_found(&instance_id))?;
    emit(&tx, "chat.start", json!({"model_instance_id": instance_id})).await;
    emit(&tx, "prompt_processing.start", json!({})).await;
    emit(&tx, "prompt_processing.end", json!({})).await;

    let turn = previous.as_ref().map_or(1, |p| p.turn + 1);
    let (reasoning, message) = compose(&model, &instance_id, words, turn, body.max_output_tokens);
    let started = Instant::now();
    for (tokens, prefix) in [(&reasoning, "reasoning"), (&message, "message")] {
        if tokens.is_empty() {
            continue;
        }
        let (start, delta, end) = if prefix == "reasoning" {
            ("reasoning.start", "reasoning.delta", "reasoning.end")
        } else {
            ("message.start", "message.delta", "message.end")
        };
        emit(&tx, start, json!({})).await;
        for (n, token) in tokens.iter().enumerate() {
            if stall && n == 2 {
                // The stream stops here and never ends, like a wedged server.
                std::future::pending::<()>().await;
            }
            pause(token_delay).await;
            emit(&tx, delta, json!({"content": token})).await;
        }
        emit(&tx, end, json!({})).await;
    }

    let input_tokens = words + 4 + previous.as_ref().map_or(0, |p| p.context_tokens);
    let output_tokens = (reasoning.len() + message.len()) as u64;
    let mut output = Vec::new();
    if !reasoning.is_empty() {
        output.push(json!({"type": "reasoning", "content": reasoning.concat()}));
    }
    if !message.is_empty() {
        output.push(json!({"type": "message", "content": message.concat()}));
    }
    let elapsed = started.elapsed().as_secs_f64().max(1e-6);
    let mut stats = json!({
        "input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "reasoning_output_tokens": reasoning.len(),
        "tokens_per_second": output_tokens as f64 / elapsed,
        "time_to_first_token_seconds": token_delay.as_secs_f64(),
    });
    if let Some(load_time) = load_time {
        stats["model_load_time_seconds"] = json!(load_time.as_secs_f64());
    }
    let mut result = json!({"model_instance_id": instance_id, "output": output, "stats": stats});
    if body.store != Some(false) {
        let response_id = format!(
            "resp_{:016x}{:016x}{:016x}",
            fastrand::u64(..),
            fastrand::u64(..),
            fastrand::u64(..)
        );
        shared.lock().responses.insert(
            response_id.clone(),
            StoredResponse {
                turn,
                context_tokens: input_tokens + output_tokens,
            },
        );
        result["response_id"] = json!(response_id);
    }
    Ok(result)
}

async fn chat(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let fault = match guard(&shared, Route::Chat, &headers).await {
        Ok(fault) => fault,
        Err(response) => return response,
    };
    let body: ChatBody = match parse_body(&body) {
        Ok(body) => body,
        Err(response) => return response,
    };
    if !body.stream {
        return match run_chat(shared, body, None, false).await {
            Ok(mut result) => {
                if fault == Some(Fault::EmptyOutput) {
                    result["output"] = json!([]);
                }
                axum::Json(result).into_response()
            }
            Err(error) => error_response(error),
        };
    }
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let tx = Some(tx);
        let result = run_chat(shared, body, tx.clone(), fault == Some(Fault::StallStream)).await;
        match result {
            Ok(result) => emit(&tx, "chat.end", json!({"result": result})).await,
            Err(error) => {
                // As LM Studio: an `error` event, then still `chat.end`.
                emit(
                    &tx,
                    "error",
                    json!({"error": {"type": error.kind, "message": error.message}}),
                )
                .await;
                emit(&tx, "chat.end", json!({"result": {"output": []}})).await;
            }
        }
    });
    let events = futures_util::stream::unfold(rx, |mut rx| async move {
        let (name, data) = rx.recv().await?;
        let event = SseEvent::default().event(name).data(data.to_string());
        Some((Ok::<_, Infallible>(event), rx))
    });
    Sse::new(events).into_response()
}
