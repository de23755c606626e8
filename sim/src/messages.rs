//! `POST /v1/messages`, LM Studio's Anthropic-compatible chat (since 0.4.1): `system` as a
//! string or blocks, text, image, `tool_use` and `tool_result` blocks, custom `tools`, and
//! `stream` with Anthropic's event sequence. Not stateful, as the real one.
//!
//! Not simulated: `/v1/messages/count_tokens`, which LM Studio does not document (whether it
//! serves one is unknown); `stop_sequences` are accepted and never hit.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::api::{accept, error_response};
use crate::completions::Format;
use crate::faults::Route;
use crate::turn::{self, new_id, text_of, Ask, Said, Tool, ToolChoice};
use crate::Shared;

#[derive(Deserialize)]
struct MessagesBody {
    model: String,
    messages: Vec<Message>,
    #[serde(default)]
    system: Value,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    tools: Vec<Value>,
    #[serde(default)]
    tool_choice: Option<Value>,
}

#[derive(Deserialize)]
struct Message {
    role: String,
    content: Value,
}

/// The output of the tool result a message carries, if it carries one.
fn tool_result(content: &Value) -> Option<String> {
    let block = content
        .as_array()?
        .iter()
        .find(|b| b["type"] == "tool_result")?;
    Some(text_of(&block["content"]))
}

fn ask_of(body: &MessagesBody) -> Ask {
    let tools = body
        .tools
        .iter()
        .filter_map(|t| {
            Some(Tool {
                name: t["name"].as_str()?.to_owned(),
                parameters: t.get("input_schema").cloned().unwrap_or_else(|| json!({})),
            })
        })
        .collect();
    let tool_choice = match body.tool_choice.as_ref().and_then(|c| c["type"].as_str()) {
        Some("none") => ToolChoice::None,
        Some("any") => ToolChoice::Required,
        Some("tool") => ToolChoice::Named(
            body.tool_choice
                .as_ref()
                .and_then(|c| c["name"].as_str())
                .unwrap_or_default()
                .to_owned(),
        ),
        _ => ToolChoice::Auto,
    };
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
            .sum::<usize>()
            + text_of(&body.system).split_whitespace().count(),
        tools,
        tool_choice,
        tool_result: body.messages.last().and_then(|m| tool_result(&m.content)),
        format: Format::Text,
    }
}

fn block_of(said: &Said) -> Value {
    match said {
        Said::Text(text) => json!({"type": "text", "text": text}),
        Said::ToolCall {
            id,
            name,
            arguments,
        } => {
            json!({"type": "tool_use", "id": id.replacen("call_", "toolu_", 1), "name": name, "input": arguments})
        }
    }
}

pub(crate) async fn messages(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (_fault, body): (_, MessagesBody) =
        match accept(&shared, Route::Completions, &headers, &body).await {
            Ok(accepted) => accepted,
            Err(response) => return response,
        };
    let ask = ask_of(&body);
    let (instance_id, flight) = match turn::serve(&shared, &body.model, Route::Completions).await {
        Ok(served) => served,
        Err(error) => return error_response(error),
    };
    let said = turn::say(&ask, &instance_id, None);
    shared.lock().stats.messages += 1;
    let (input, output) = (ask.context_words + 4, said.tokens());
    let stop_reason = match said {
        Said::Text(_) => "end_turn",
        Said::ToolCall { .. } => "tool_use",
    };
    let block = block_of(&said);
    let message = |content: Value, stop: Value, written: usize| {
        json!({"id": new_id("msg_"), "type": "message", "role": "assistant", "model": instance_id,
            "content": content, "stop_reason": stop, "stop_sequence": null,
            "usage": {"input_tokens": input, "output_tokens": written}})
    };
    if !body.stream {
        turn::generate(&shared, &said).await;
        drop(flight);
        return axum::Json(message(json!([block]), json!(stop_reason), output)).into_response();
    }
    let mut events = vec![(
        "message_start",
        json!({"message": message(json!([]), Value::Null, 1)}),
    )];
    match &said {
        Said::Text(text) => {
            events.push((
                "content_block_start",
                json!({"index": 0, "content_block": {"type": "text", "text": ""}}),
            ));
            for piece in turn::pieces(text) {
                events.push((
                    "content_block_delta",
                    json!({"index": 0, "delta": {"type": "text_delta", "text": piece}}),
                ));
            }
        }
        Said::ToolCall { arguments, .. } => {
            let mut start = block.clone();
            start["input"] = json!({});
            events.push((
                "content_block_start",
                json!({"index": 0, "content_block": start}),
            ));
            let arguments = arguments.to_string();
            for piece in turn::pieces(&arguments) {
                events.push(("content_block_delta", json!({"index": 0, "delta": {"type": "input_json_delta", "partial_json": piece}})));
            }
        }
    }
    events.push(("content_block_stop", json!({"index": 0})));
    events.push((
        "message_delta",
        json!({"delta": {"stop_reason": stop_reason, "stop_sequence": null},
        "usage": {"output_tokens": output}}),
    ));
    events.push(("message_stop", json!({})));
    for (name, data) in &mut events {
        data["type"] = json!(*name);
    }
    turn::named_events(&shared, flight, events)
}
