//! `POST /v1/responses`, LM Studio's OpenAI Responses API (since 0.3.29): `input` as a string
//! or items (messages, function calls and their outputs), `instructions`, function `tools`,
//! `stream` with OpenAI's event sequence, and stateful: a stored response continues with
//! `previous_response_id`, an unknown one is `previous_response_not_found`.
//!
//! As the real server (#2403), `text.format` is not honoured: the answer is plain text.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::api::{accept, error_response};
use crate::completions::Format;
use crate::errors::ApiError;
use crate::faults::Route;
use crate::state::StoredResponse;
use crate::turn::{self, new_id, text_of, unix_now, Ask, Said, Tool, ToolChoice};
use crate::Shared;

/// The body, leniently, as the compatible endpoints read it.
#[derive(Deserialize)]
struct ResponsesBody {
    model: String,
    input: Value,
    #[serde(default)]
    instructions: Option<String>,
    #[serde(default)]
    previous_response_id: Option<String>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    store: Option<bool>,
    #[serde(default)]
    tools: Vec<Value>,
    #[serde(default)]
    tool_choice: Option<Value>,
}

fn ask_of(body: &ResponsesBody) -> Result<Ask, ApiError> {
    let items = match &body.input {
        Value::String(text) => vec![json!({"role": "user", "content": text})],
        Value::Array(items) => items.clone(),
        _ => {
            return Err(ApiError::invalid_request(
                "'input' must be a string or an array",
            ))
        }
    };
    let text_of_item = |item: &Value| match item["type"].as_str() {
        Some("function_call_output") => item["output"].as_str().unwrap_or_default().to_owned(),
        Some("function_call") => item["arguments"].as_str().unwrap_or_default().to_owned(),
        _ => text_of(&item["content"]),
    };
    let tools = body
        .tools
        .iter()
        .filter(|t| t["type"] == "function")
        .filter_map(|t| {
            Some(Tool {
                name: t["name"].as_str()?.to_owned(),
                parameters: t.get("parameters").cloned().unwrap_or_else(|| json!({})),
            })
        })
        .collect();
    let tool_choice = match &body.tool_choice {
        Some(Value::String(c)) if c == "none" => ToolChoice::None,
        Some(Value::String(c)) if c == "required" => ToolChoice::Required,
        Some(choice) => match choice["name"].as_str() {
            Some(name) => ToolChoice::Named(name.to_owned()),
            None => ToolChoice::Auto,
        },
        None => ToolChoice::Auto,
    };
    let last = items.last();
    Ok(Ask {
        prompt: items
            .iter()
            .rev()
            .find(|i| i["role"] == "user")
            .map(|i| text_of(&i["content"]))
            .unwrap_or_default(),
        context_words: items
            .iter()
            .map(|i| text_of_item(i).split_whitespace().count())
            .sum::<usize>()
            + body
                .instructions
                .as_deref()
                .map_or(0, |i| i.split_whitespace().count()),
        tools,
        tool_choice,
        tool_result: last
            .filter(|i| i["type"] == "function_call_output")
            .map(text_of_item),
        format: Format::Text,
    })
}

/// The output item for what the model said.
fn item_of(said: &Said, item_id: &str) -> Value {
    match said {
        Said::Text(text) => json!({"type": "message", "id": item_id, "status": "completed",
            "role": "assistant", "content": [{"type": "output_text", "text": text, "annotations": []}]}),
        Said::ToolCall {
            id,
            name,
            arguments,
        } => json!({"type": "function_call", "id": item_id,
            "call_id": id, "name": name, "arguments": arguments.to_string(), "status": "completed"}),
    }
}

pub(crate) async fn responses(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (_fault, body): (_, ResponsesBody) =
        match accept(&shared, Route::Completions, &headers, &body).await {
            Ok(accepted) => accepted,
            Err(response) => return response,
        };
    let mut ask = match ask_of(&body) {
        Ok(ask) => ask,
        Err(error) => return error_response(error),
    };
    let previous = match &body.previous_response_id {
        None => None,
        Some(id) => match shared.lock().responses.get(id).cloned() {
            Some(stored) => Some(stored),
            None => {
                let mut error =
                    ApiError::invalid_request(format!("Prediction history node {id} not found"));
                error.code = Some("previous_response_not_found");
                return error_response(error);
            }
        },
    };
    ask.context_words += previous.as_ref().map_or(0, |p| p.context_tokens as usize);
    let (instance_id, flight) = match turn::serve(&shared, &body.model, Route::Completions).await {
        Ok(served) => served,
        Err(error) => return error_response(error),
    };
    let said = turn::say(&ask, &instance_id, None);
    let (id, item_id) = (new_id("resp_"), new_id("msg_"));
    let (input, output) = (ask.context_words as u64 + 4, said.tokens() as u64);
    {
        let mut state = shared.lock();
        state.stats.responses += 1;
        if body.store != Some(false) {
            let turn = previous.as_ref().map_or(1, |p| p.turn + 1);
            let context_tokens = input + output;
            state.responses.insert(
                id.clone(),
                StoredResponse {
                    turn,
                    context_tokens,
                },
            );
            state.stats.stored_responses += 1;
        }
    }
    // Output tokens are reported once the response is complete.
    let response = |status: &str, items: Value| {
        let written = if status == "completed" { output } else { 0 };
        json!({"id": id, "object": "response", "created_at": unix_now(), "status": status,
            "model": instance_id, "output": items, "previous_response_id": body.previous_response_id,
            "usage": {"input_tokens": input, "output_tokens": written, "total_tokens": input + written}})
    };
    let item = item_of(&said, &item_id);
    if !body.stream {
        turn::generate(&shared, &said).await;
        drop(flight);
        return axum::Json(response("completed", json!([item]))).into_response();
    }
    let mut events = vec![
        (
            "response.created",
            json!({"response": response("in_progress", json!([]))}),
        ),
        (
            "response.in_progress",
            json!({"response": response("in_progress", json!([]))}),
        ),
    ];
    match &said {
        Said::Text(text) => {
            let mut added = item.clone();
            added["content"] = json!([]);
            added["status"] = json!("in_progress");
            events.push((
                "response.output_item.added",
                json!({"output_index": 0, "item": added}),
            ));
            events.push(("response.content_part.added", json!({"item_id": item_id, "output_index": 0,
                "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": []}})));
            for piece in turn::pieces(text) {
                events.push((
                    "response.output_text.delta",
                    json!({"item_id": item_id,
                    "output_index": 0, "content_index": 0, "delta": piece}),
                ));
            }
            events.push((
                "response.output_text.done",
                json!({"item_id": item_id, "output_index": 0,
                "content_index": 0, "text": text}),
            ));
            events.push((
                "response.content_part.done",
                json!({"item_id": item_id, "output_index": 0,
                "content_index": 0, "part": item["content"][0]}),
            ));
        }
        Said::ToolCall { arguments, .. } => {
            let mut added = item.clone();
            added["arguments"] = json!("");
            added["status"] = json!("in_progress");
            events.push((
                "response.output_item.added",
                json!({"output_index": 0, "item": added}),
            ));
            let arguments = arguments.to_string();
            for piece in turn::pieces(&arguments) {
                events.push((
                    "response.function_call_arguments.delta",
                    json!({"item_id": item_id,
                    "output_index": 0, "delta": piece}),
                ));
            }
            events.push((
                "response.function_call_arguments.done",
                json!({"item_id": item_id,
                "output_index": 0, "arguments": arguments}),
            ));
        }
    }
    events.push((
        "response.output_item.done",
        json!({"output_index": 0, "item": item}),
    ));
    events.push((
        "response.completed",
        json!({"response": response("completed", json!([item]))}),
    ));
    for (number, (name, data)) in events.iter_mut().enumerate() {
        data["type"] = json!(*name);
        data["sequence_number"] = json!(number);
    }
    turn::named_events(&shared, flight, events)
}
