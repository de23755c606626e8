//! `POST /v1/chat/completions`, LM Studio's OpenAI-compatible chat: the one endpoint with
//! structured output. A `json_schema` answer is JSON that satisfies the schema, made
//! deterministically from it (an `enum` answers with the value the prompt names, else the
//! first); `json_object` is LM Studio's 400. Faults make a model that fails its schema: prose,
//! a fenced answer, cut-off JSON, a label outside the choices. Tools are called as `turn` says;
//! streams are OpenAI's chunks, with the usage chunk when `stream_options.include_usage`.
//!
//! Not simulated: logprobs, `n` above 1.
// Helpers return `Err(Response)` to end a handler early; a large Err is fine in a test tool.
#![allow(clippy::result_large_err)]

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use crate::api::{accept, error_response, pause};
use crate::errors::ApiError;
use crate::faults::{Fault, Route};
use crate::turn::{self, pieces, text_of, Ask, Said, Tool, ToolChoice};
use crate::Shared;

/// The body, leniently: LM Studio's compatible endpoints ignore keys they do not know.
#[derive(Deserialize)]
struct CompletionBody {
    model: String,
    messages: Vec<Message>,
    #[serde(default)]
    stream: bool,
    temperature: Option<f64>,
    response_format: Option<Value>,
    #[serde(default)]
    tools: Vec<Value>,
    tool_choice: Option<Value>,
    #[serde(default)]
    stream_options: Option<Value>,
}

#[derive(Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: Value,
}

/// What the answer must be, from `response_format`.
#[derive(Debug)]
pub(crate) enum Format {
    Text,
    Schema(Value),
}

fn format_of(body: &CompletionBody) -> Result<Format, Response> {
    let Some(format) = &body.response_format else {
        return Ok(Format::Text);
    };
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(Format::Text),
        Some("json_schema") => {
            let schema = format
                .pointer("/json_schema/schema")
                .cloned()
                .unwrap_or_else(|| json!({}));
            Ok(Format::Schema(schema))
        }
        // LM Studio's words, as a bare string (0.4.19).
        _ => Err((
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"error": "'response_format.type' must be 'json_schema' or 'text'"})),
        )
            .into_response()),
    }
}

/// A value that satisfies `schema`, the same for the same schema and prompt.
pub fn sample(schema: &Value, prompt: &str) -> Value {
    if let Some(value) = schema.get("const") {
        return value.clone();
    }
    if let Some(Value::Array(values)) = schema.get("enum") {
        let named = values
            .iter()
            .find(|v| v.as_str().is_some_and(|label| mentions(prompt, label)));
        return named.or(values.first()).cloned().unwrap_or(Value::Null);
    }
    for key in ["anyOf", "oneOf", "allOf"] {
        if let Some(first) = schema.get(key).and_then(|v| v.get(0)) {
            return sample(first, prompt);
        }
    }
    let kind = match schema.get("type") {
        Some(Value::String(kind)) => kind.as_str(),
        Some(Value::Array(kinds)) => kinds
            .iter()
            .filter_map(Value::as_str)
            .find(|k| *k != "null")
            .unwrap_or("null"),
        _ if schema.get("properties").is_some() => "object",
        _ => "string",
    };
    let bound = |key: &str| schema.get(key).and_then(Value::as_f64);
    match kind {
        "object" => {
            let mut object = Map::new();
            if let Some(Value::Object(properties)) = schema.get("properties") {
                for (name, property) in properties {
                    object.insert(name.clone(), sample(property, prompt));
                }
            } else {
                object.insert("answer".into(), json!("Simulated answer"));
            }
            Value::Object(object)
        }
        "array" => {
            let items = schema.get("items").cloned().unwrap_or_else(|| json!({}));
            let count = schema.get("minItems").and_then(Value::as_u64).unwrap_or(1);
            Value::Array((0..count.max(1)).map(|_| sample(&items, prompt)).collect())
        }
        "integer" => {
            let low = bound("minimum").unwrap_or(0.0).ceil();
            json!(bound("maximum").map_or(low, |high| low.min(high)) as i64)
        }
        "number" => json!(bound("minimum").unwrap_or(0.5)),
        "boolean" => json!(true),
        "null" => Value::Null,
        _ => {
            let text = match schema.get("format").and_then(Value::as_str) {
                Some("date") => "2026-01-01".to_owned(),
                Some("date-time") => "2026-01-01T00:00:00Z".to_owned(),
                Some("email") => "someone@example.com".to_owned(),
                _ => "Simulated text".to_owned(),
            };
            let min = schema.get("minLength").and_then(Value::as_u64).unwrap_or(0) as usize;
            json!(format!("{text:.<min$}"))
        }
    }
}

/// Whether `prompt` names `label` as a word of its own, case aside.
fn mentions(prompt: &str, label: &str) -> bool {
    let prompt = prompt.to_lowercase();
    let label = label.to_lowercase();
    prompt.match_indices(&label).any(|(at, _)| {
        let before = prompt[..at].chars().next_back();
        let after = prompt[at + label.len()..].chars().next();
        !before.is_some_and(char::is_alphanumeric) && !after.is_some_and(char::is_alphanumeric)
    })
}

/// The answer's text, as a model under `fault` would give it.
pub(crate) fn answer(
    format: &Format,
    prompt: &str,
    instance_id: &str,
    fault: Option<&Fault>,
) -> String {
    let Format::Schema(schema) = format else {
        return format!("Simulated reply from {instance_id}: this sentence stands in for a real model's answer.");
    };
    let value = sample(schema, prompt);
    match fault {
        Some(Fault::Prose) => format!("Sure! Here is what you asked for: {value}"),
        Some(Fault::Fenced) => format!("```json\n{value}\n```"),
        Some(Fault::InvalidJson) => {
            let text = value.to_string();
            let half = text.chars().count() / 2;
            text.chars().take(half).collect()
        }
        Some(Fault::OffLabel) => off_label(schema, value).to_string(),
        _ => value.to_string(),
    }
}

/// `value` with its label (a top-level `enum`, or the first property with one) replaced by one
/// the schema does not list; `null` when the schema has no labels.
fn off_label(schema: &Value, mut value: Value) -> Value {
    let unlisted = json!("none of these");
    if schema.get("enum").is_some() {
        return unlisted;
    }
    let labelled = schema
        .get("properties")
        .and_then(Value::as_object)
        .and_then(|p| p.iter().find(|(_, s)| s.get("enum").is_some()))
        .map(|(name, _)| name.clone());
    match (labelled, value.as_object_mut()) {
        (Some(name), Some(object)) => {
            object.insert(name, unlisted);
            value
        }
        _ => Value::Null,
    }
}

/// What a chat-completions body asks of the model's turn.
fn ask_of(body: &CompletionBody, format: Format) -> Ask {
    let tools = body
        .tools
        .iter()
        .filter_map(|tool| {
            Some(Tool {
                name: tool.pointer("/function/name")?.as_str()?.to_owned(),
                parameters: tool
                    .pointer("/function/parameters")
                    .cloned()
                    .unwrap_or_else(|| json!({})),
            })
        })
        .collect();
    let tool_choice = match &body.tool_choice {
        Some(Value::String(choice)) if choice == "none" => ToolChoice::None,
        Some(Value::String(choice)) if choice == "required" => ToolChoice::Required,
        Some(choice) => match choice.pointer("/function/name").and_then(Value::as_str) {
            Some(name) => ToolChoice::Named(name.to_owned()),
            None => ToolChoice::Auto,
        },
        None => ToolChoice::Auto,
    };
    let last = body.messages.last();
    Ask {
        prompt: body
            .messages
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .map(|m| text_of(&m.content))
            .unwrap_or_default(),
        context_words: body
            .messages
            .iter()
            .map(|m| text_of(&m.content).split_whitespace().count())
            .sum(),
        tools,
        tool_choice,
        tool_result: last
            .filter(|m| m.role == "tool")
            .map(|m| text_of(&m.content)),
        format,
    }
}

pub(crate) async fn completions(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (fault, body): (_, CompletionBody) =
        match accept(&shared, Route::Completions, &headers, &body).await {
            Ok(accepted) => accepted,
            Err(response) => return response,
        };
    let format = match format_of(&body) {
        Ok(format) => format,
        Err(response) => return response,
    };
    if body.temperature.is_some_and(|t| !(0.0..=2.0).contains(&t)) {
        return error_response(ApiError::invalid_request(
            "'temperature' must be between 0 and 2",
        ));
    }
    let (instance_id, flight) = match turn::serve(&shared, &body.model, Route::Completions).await {
        Ok(served) => served,
        Err(error) => return error_response(error),
    };
    let ask = ask_of(&body, format);
    let said = turn::say(&ask, &instance_id, fault.as_ref());
    {
        let mut state = shared.lock();
        state.stats.completions += 1;
        if body.temperature == Some(0.0) {
            state.stats.cold_completions += 1;
        }
    }
    let usage = |said: &Said| {
        let (prompt, completion) = (ask.context_words + 4, said.tokens());
        json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
    };
    let id = format!("chatcmpl-{:016x}", fastrand::u64(..));
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if !body.stream {
        let (message, finish) = match &said {
            Said::Text(text) => (json!({"role": "assistant", "content": text}), "stop"),
            Said::ToolCall {
                id,
                name,
                arguments,
            } => (
                json!({"role": "assistant", "content": null, "tool_calls": [{"id": id, "type": "function",
                    "function": {"name": name, "arguments": arguments.to_string()}}]}),
                "tool_calls",
            ),
        };
        turn::generate(&shared, &said).await;
        drop(flight);
        return axum::Json(json!({
            "id": id,
            "object": "chat.completion",
            "created": created,
            // LM Studio names the instance that answered.
            "model": instance_id,
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": usage(&said),
        }))
        .into_response();
    }
    let include_usage = body
        .stream_options
        .as_ref()
        .and_then(|o| o.get("include_usage"))
        == Some(&json!(true));
    let (tx, rx) = mpsc::channel::<Value>(64);
    let delay = turn::token_delay(&shared);
    let usage = usage(&said);
    tokio::spawn(async move {
        let _flight = flight;
        let chunk = |delta: Value, finish: Value| {
            json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": instance_id,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
        };
        let mut out = vec![chunk(
            json!({"role": "assistant", "content": ""}),
            Value::Null,
        )];
        let finish = match &said {
            Said::Text(text) => {
                out.extend(pieces(text).map(|p| chunk(json!({"content": p}), Value::Null)));
                "stop"
            }
            Said::ToolCall {
                id,
                name,
                arguments,
            } => {
                let arguments = arguments.to_string();
                out.push(chunk(
                    json!({"tool_calls": [{"index": 0, "id": id, "type": "function",
                    "function": {"name": name, "arguments": ""}}]}),
                    Value::Null,
                ));
                out.extend(pieces(&arguments).map(|p| {
                    chunk(
                        json!({"tool_calls": [{"index": 0, "function": {"arguments": p}}]}),
                        Value::Null,
                    )
                }));
                "tool_calls"
            }
        };
        out.push(chunk(json!({}), json!(finish)));
        if include_usage {
            out.push(
                json!({"id": id, "object": "chat.completion.chunk", "created": created,
                "model": instance_id, "choices": [], "usage": usage}),
            );
        }
        for chunk in out {
            pause(delay).await;
            if tx.send(chunk).await.is_err() {
                return;
            }
        }
    });
    let events = futures_util::stream::unfold((rx, false), |(mut rx, done)| async move {
        if done {
            return None;
        }
        Some(match rx.recv().await {
            Some(chunk) => (
                Ok::<_, Infallible>(SseEvent::default().data(chunk.to_string())),
                (rx, false),
            ),
            None => (Ok(SseEvent::default().data("[DONE]")), (rx, true)),
        })
    });
    Sse::new(events).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_satisfy_their_schema_and_labels_follow_the_prompt() {
        let person = json!({
            "type": "object",
            "properties": {
                "name": {"type": "string", "minLength": 20},
                "age": {"type": "integer", "minimum": 18},
                "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2},
                "kind": {"enum": ["cat", "dog"]},
            },
            "required": ["name", "age"],
        });
        let value = sample(&person, "my dog barks");
        assert_eq!(value["age"], 18);
        assert_eq!(value["kind"], "dog");
        assert_eq!(value["tags"].as_array().map(Vec::len), Some(2));
        assert!(value["name"].as_str().unwrap().len() >= 20);
        let labels = json!({"type": "string", "enum": ["bug", "feature"]});
        assert_eq!(sample(&labels, "A FEATURE request"), "feature");
        assert_eq!(
            sample(&labels, "debugging notes"),
            "bug",
            "the first, as no word matches"
        );
    }
}
