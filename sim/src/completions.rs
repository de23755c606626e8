//! `POST /v1/chat/completions`, LM Studio's OpenAI-compatible chat, as far as lmsd uses it: the
//! one endpoint with structured output. A `json_schema` answer is JSON that satisfies the
//! schema, made deterministically from it (an `enum` answers with the value the prompt names,
//! else the first); `json_object` is LM Studio's 400. Faults make a model that fails its
//! schema: prose, a fenced answer, cut-off JSON, a label outside the choices.
//!
//! Not simulated: streaming here (lmsd never streams a constrained chat), tools, logprobs.
// Helpers return `Err(Response)` to end a handler early; a large Err is fine in a test tool.
#![allow(clippy::result_large_err)]

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::api::{accept, error_response, load_instance, InFlight};
use crate::errors::ApiError;
use crate::faults::{Fault, Route};
use crate::state::{LoadSettings, Target};
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
}

#[derive(Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: Value,
}

/// What the answer must be, from `response_format`.
enum Format {
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
fn answer(format: &Format, prompt: &str, instance_id: &str, fault: Option<&Fault>) -> String {
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

fn text_of(content: &Value) -> String {
    match content {
        Value::String(text) => text.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
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
    if body.stream {
        return error_response(ApiError::invalid_request(
            "the simulator does not stream /v1/chat/completions",
        ));
    }
    if body.temperature.is_some_and(|t| !(0.0..=2.0).contains(&t)) {
        return error_response(ApiError::invalid_request(
            "'temperature' must be between 0 and 2",
        ));
    }
    match run(&shared, &body, &format, fault.as_ref()).await {
        Ok(reply) => axum::Json(reply).into_response(),
        Err(error) => error_response(error),
    }
}

async fn run(
    shared: &Arc<Shared>,
    body: &CompletionBody,
    format: &Format,
    fault: Option<&Fault>,
) -> Result<Value, ApiError> {
    let target = shared.lock().chat_target(&body.model)?;
    let instance_id = match target {
        Target::Loaded(id) => id,
        Target::NeedsLoad(key) => {
            let settings = LoadSettings::default();
            load_instance(shared, &key, settings, true, Route::Completions, |_| {})
                .await?
                .0
        }
    };
    let Some(_flight) = InFlight::begin(shared, &instance_id, true)? else {
        return Err(ApiError::model_not_found(&instance_id));
    };
    let prompt: Vec<String> = body.messages.iter().map(|m| text_of(&m.content)).collect();
    let prompt = prompt.join("\n");
    let user = body
        .messages
        .iter()
        .rev()
        .find(|m| m.role == "user")
        .map(|m| text_of(&m.content))
        .unwrap_or_default();
    let content = answer(format, &user, &instance_id, fault);
    {
        let mut state = shared.lock();
        state.stats.completions += 1;
        if body.temperature == Some(0.0) {
            state.stats.cold_completions += 1;
        }
    }
    let prompt_tokens = prompt.split_whitespace().count() + 4;
    let completion_tokens = content.split_whitespace().count();
    Ok(json!({
        "id": format!("chatcmpl-{:016x}", fastrand::u64(..)),
        "object": "chat.completion",
        "created": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        // LM Studio names the instance that answered.
        "model": instance_id,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content},
            "finish_reason": "stop",
        }],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }))
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
