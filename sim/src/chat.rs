//! `POST /api/v1/chat`: validation as LM Studio's schema does it, JIT loads, stateful turns, the
//! SSE event order the docs promise, and the failures real servers show (a system prompt on a
//! continuation, context overflow, MLX crashes).
// Helpers return `Err(Response)` to end a handler early; a large Err is fine in a test tool.
#![allow(clippy::result_large_err)]

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::api::{accept, error_json, error_response, load_instance, pause, InFlight};
use crate::catalogue::SimModel;
use crate::errors::ApiError;
use crate::faults::{Fault, Route};
use crate::state::{LoadSettings, StoredResponse, Target};
use crate::Shared;

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

/// Tokens an image counts for in the prompt.
const IMAGE_TOKENS: u64 = 256;

/// Counts words (the simulator's tokens) of the input, a string or an array of items that are
/// `{"type":"text","content"}` or `{"type":"image","data_url"}` and nothing else (#2245).
fn input_words(input: &Value) -> Result<u64, ApiError> {
    let count = |text: &str| text.split_whitespace().count() as u64;
    match input {
        Value::String(text) => Ok(count(text)),
        Value::Array(items) => items.iter().enumerate().try_fold(0, |sum, (n, item)| {
            let required =
                |field: &str| ApiError::invalid_request(format!("'input.{n}.{field}' is required"));
            match item.get("type").and_then(Value::as_str) {
                Some("text") => match item.get("content") {
                    Some(Value::String(text)) => Ok(sum + count(text)),
                    _ => Err(required("content")),
                },
                Some("image") => match item.get("data_url") {
                    Some(Value::String(_)) => Ok(sum + IMAGE_TOKENS),
                    _ => Err(required("data_url")),
                },
                _ => Err(ApiError {
                    code: Some("invalid_union"),
                    param: Some("input"),
                    ..ApiError::invalid_request(
                        "Invalid discriminator value. Expected 'text' | 'image'",
                    )
                }),
            }
        }),
        _ => Err(ApiError::invalid_request(
            "'input' must be a string or an array",
        )),
    }
}

/// What the schema checks before anything runs; returns the prompt's words.
fn validate(body: &ChatBody) -> Result<u64, ApiError> {
    let words = input_words(&body.input)?;
    if body.temperature.is_some_and(|t| !(0.0..=1.0).contains(&t)) {
        return Err(ApiError {
            param: Some("temperature"),
            ..ApiError::invalid_request("'temperature' must be a number between 0 and 1")
        });
    }
    let system_words = body
        .system_prompt
        .as_deref()
        .map_or(0, |s| s.split_whitespace().count() as u64);
    Ok(words + system_words)
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

/// What a chat streams: SSE event name and data. The non-streaming path runs the same steps and
/// keeps only the final result.
type Emit = mpsc::Sender<(&'static str, Value)>;

async fn emit(tx: &Option<Emit>, name: &'static str, mut data: Value) {
    if let Some(tx) = tx {
        data["type"] = json!(name);
        let _ = tx.send((name, data)).await;
    }
}

/// Runs one chat. Events go out in the documented order: `chat.start` first, then any
/// `model_load.*`, `prompt_processing.*`, reasoning and message; the caller sends `chat.end`.
async fn run_chat(
    shared: Arc<Shared>,
    body: ChatBody,
    words: u64,
    tx: Option<Emit>,
    fault: Option<Fault>,
) -> Result<Value, ApiError> {
    let (target, start_id, generation) = {
        let state = shared.lock();
        let target = state.chat_target(&body.model);
        // For a JIT load, the id the instance is about to get.
        let start_id = match &target {
            Ok(Target::Loaded(id)) => id.clone(),
            Ok(Target::NeedsLoad(key)) => state.next_instance_id(key),
            Err(_) => body.model.clone(),
        };
        (target, start_id, state.generation)
    };
    emit(&tx, "chat.start", json!({"model_instance_id": start_id})).await;
    let previous = match &body.previous_response_id {
        None => None,
        Some(id) => Some(shared.lock().responses.get(id).cloned().ok_or_else(|| {
            ApiError::invalid_request(format!(
                "Could not find stored response for previous_response_id \"{id}\""
            ))
        })?),
    };
    let target = target?;
    if fault == Some(Fault::Crash) {
        if let Target::Loaded(id) = &target {
            shared.lock().crash(id);
        }
        return Err(ApiError::crashed());
    }
    let (instance_id, load_time) = match target {
        Target::Loaded(id) => (id, None),
        Target::NeedsLoad(key) => {
            emit(&tx, "model_load.start", json!({"model_instance_id": key})).await;
            let settings = LoadSettings {
                context_length: body.context_length,
                ..LoadSettings::default()
            };
            let progress_tx = tx.clone();
            let progress_key = key.clone();
            let on_progress = move |progress| {
                if let Some(tx) = &progress_tx {
                    let _ = tx.try_send(("model_load.progress", json!({"type": "model_load.progress", "model_instance_id": progress_key, "progress": progress})));
                }
            };
            let (id, load_time) =
                load_instance(&shared, &key, settings, true, Route::Chat, on_progress).await?;
            emit(
                &tx,
                "model_load.end",
                json!({"model_instance_id": id, "load_time_seconds": load_time.as_secs_f64()}),
            )
            .await;
            (id, Some(load_time))
        }
    };
    let Some(flight) = InFlight::begin(&shared, &instance_id, true)? else {
        return Err(ApiError::model_not_found(&instance_id));
    };
    if previous.is_some() && body.system_prompt.is_some() {
        // The stored chat already has its system message; the template rejects a second (#2219).
        return Err(ApiError::new(
            500,
            "unknown",
            "Only user, assistant and tool roles are supported, got system",
        ));
    }
    let input_tokens = words + 4 + previous.as_ref().map_or(0, |p| p.context_tokens);
    let (model, token_delay) = {
        let mut state = shared.lock();
        let (key, context_length) = state
            .instance(&instance_id)
            .map(|i| (i.key.clone(), i.context_length))
            .unwrap_or_default();
        if input_tokens > u64::from(context_length) {
            return Err(ApiError::context_overflow(input_tokens, context_length));
        }
        state.stats.chats += 1;
        (state.model(&key).cloned(), state.config.token_delay)
    };
    let model = model.ok_or_else(|| ApiError::model_not_found(&instance_id))?;
    emit(&tx, "prompt_processing.start", json!({})).await;
    emit(&tx, "prompt_processing.end", json!({})).await;

    let turn = previous.as_ref().map_or(1, |p| p.turn + 1);
    let (reasoning, message) = compose(&model, &instance_id, words, turn, body.max_output_tokens);
    let stall = fault == Some(Fault::StallStream) && tx.is_some();
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
            if flight.crashed() {
                return Err(ApiError::crashed());
            }
            emit(&tx, delta, json!({"content": token})).await;
        }
        emit(&tx, end, json!({})).await;
    }

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
        let mut state = shared.lock();
        // A chat that outlived LM Studio quitting leaves nothing in the new process's store.
        if state.generation == generation {
            let stored = StoredResponse {
                turn,
                context_tokens: input_tokens + output_tokens,
            };
            state.store_response(response_id.clone(), stored);
        }
        result["response_id"] = json!(response_id);
    }
    Ok(result)
}

pub(crate) async fn chat(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (fault, body): (_, ChatBody) = match accept(&shared, Route::Chat, &headers, &body).await {
        Ok(accepted) => accepted,
        Err(response) => return response,
    };
    let words = match validate(&body) {
        Ok(words) => words,
        Err(error) => return error_response(error),
    };
    if !body.stream {
        return match run_chat(shared, body, words, None, fault.clone()).await {
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
        let client = tx.clone();
        let tx = Some(tx);
        let run = async {
            match run_chat(shared, body, words, tx.clone(), fault).await {
                Ok(result) => emit(&tx, "chat.end", json!({"result": result})).await,
                Err(error) => {
                    // As LM Studio: an `error` event, then still `chat.end`.
                    emit(&tx, "error", json!({"error": error_json(&error)})).await;
                    emit(&tx, "chat.end", json!({"result": {"output": []}})).await;
                }
            }
        };
        // A client that goes away stops its chat, as LM Studio does (#1143).
        tokio::select! {
            _ = run => {}
            _ = client.closed() => {}
        }
    });
    let events = futures_util::stream::unfold(rx, |mut rx| async move {
        let (name, data) = rx.recv().await?;
        let event = SseEvent::default().event(name).data(data.to_string());
        Some((Ok::<_, Infallible>(event), rx))
    });
    Sse::new(events).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_items_are_text_with_content_or_image_with_data_url() {
        let words = |input: Value| input_words(&input);
        assert_eq!(words(json!("two words")), Ok(2));
        assert_eq!(
            words(
                json!([{"type": "text", "content": "a b c"}, {"type": "image", "data_url": "data:image/png;base64,AA"}])
            ),
            Ok(3 + IMAGE_TOKENS)
        );
        let message = words(json!([{"type": "message", "content": "hi"}])).unwrap_err();
        assert_eq!(
            (message.code, message.param, message.message.as_str()),
            (
                Some("invalid_union"),
                Some("input"),
                "Invalid discriminator value. Expected 'text' | 'image'"
            )
        );
        let text =
            words(json!([{"type": "text", "content": "ok"}, {"type": "text", "text": "hi"}]));
        assert_eq!(text.unwrap_err().message, "'input.1.content' is required");
        let image = words(json!([{"type": "image", "url": "x"}]));
        assert_eq!(image.unwrap_err().message, "'input.0.data_url' is required");
        assert_eq!(words(json!(7)).unwrap_err().status, 400);
    }
}
