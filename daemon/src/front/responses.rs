//! OpenAI's Responses API: `POST /v1/responses`, relayed to the engine's own `/v1/responses`
//! (both engines serve it), and `GET /v1/responses/{id}`.
//!
//! lmsd keeps the conversation itself: a `previous_response_id` is expanded into the input
//! items it continues before the request is relayed, on both engines. llama-server keeps no
//! responses (it refuses the field), and LM Studio's stored ones vanish on its restart (#1188)
//! and belong to whichever instance answered; lmsd's ids resolve whichever model serves the
//! next turn. They are kept in memory, bounded, and forgotten when lmsd restarts.
//!
//! `text.format` (a JSON Schema or any JSON object) is honoured by neither engine's Responses
//! endpoint (LM Studio #2403; llama-server ignores it), so such a request is translated to
//! chat completions, which both constrain, and its answer checked as a contract.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use lmsd_proto::{TaskOptions, WireError};
use serde_json::{json, Value};

use super::relay::{self, Shape};
use super::{
    authorize, has_part, offers_tools, parse_object, resolve_model, unix_now, Dialect, Front, Wants,
};
use crate::backend::Endpoint;
use crate::config::EngineKind;
use crate::tasks::ForwardRequest;

/// The most bytes of conversation lmsd keeps; the oldest responses go first.
const MAX_KEPT_BYTES: usize = 64 << 20;
/// The most responses kept.
const MAX_KEPT: usize = 10_000;

/// The responses lmsd answered: each with the input items it added to its conversation and its
/// output, and the one it continued.
#[derive(Debug, Default)]
pub(super) struct History {
    kept: Mutex<Kept>,
}

#[derive(Debug, Default)]
struct Kept {
    by_id: HashMap<String, Entry>,
    order: VecDeque<String>,
    bytes: usize,
}

#[derive(Debug)]
struct Entry {
    parent: Option<String>,
    /// This turn's input items, then its output items.
    items: Vec<Value>,
    response: Value,
    bytes: usize,
}

impl History {
    fn keep(&self, parent: Option<String>, mut items: Vec<Value>, response: &Value) {
        let Some(id) = response["id"].as_str().map(str::to_owned) else {
            return;
        };
        if let Some(output) = response["output"].as_array() {
            items.extend(output.iter().cloned());
        }
        let bytes =
            items.iter().map(|i| i.to_string().len()).sum::<usize>() + response.to_string().len();
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        // An id seen again (an engine that repeats them) replaces its entry; it is not
        // queued twice, and it may not continue itself.
        if parent.as_deref() == Some(id.as_str()) {
            return;
        }
        kept.bytes += bytes;
        if !kept.by_id.contains_key(&id) {
            kept.order.push_back(id.clone());
        }
        let entry = Entry {
            parent,
            items,
            response: response.clone(),
            bytes,
        };
        if let Some(old) = kept.by_id.insert(id, entry) {
            kept.bytes -= old.bytes;
        }
        while kept.bytes > MAX_KEPT_BYTES || kept.by_id.len() > MAX_KEPT {
            let Some(oldest) = kept.order.pop_front() else {
                break;
            };
            if let Some(gone) = kept.by_id.remove(&oldest) {
                kept.bytes -= gone.bytes;
            }
        }
    }

    /// The items of the conversation `id` ends, oldest first; `None` when it or any response
    /// it continues is not kept (a conversation is never continued with a gap in it).
    fn conversation(&self, id: &str) -> Option<Vec<Value>> {
        let kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        let mut turns = Vec::new();
        let mut next = Some(id);
        while let Some(id) = next {
            // A chain longer than what is kept has a loop in it.
            if turns.len() > kept.by_id.len() {
                return None;
            }
            let entry = kept.by_id.get(id)?;
            turns.push(&entry.items);
            next = entry.parent.as_deref();
        }
        Some(turns.into_iter().rev().flatten().cloned().collect())
    }

    fn response(&self, id: &str) -> Option<Value> {
        let kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        kept.by_id.get(id).map(|entry| entry.response.clone())
    }
}

fn not_found(id: &str, param: Option<&str>) -> Response {
    let body = json!({"error": {
        "message": format!("lmsd keeps no response {id:?}: it was not stored (store: false), lmsd restarted since, or it was the oldest of more than lmsd keeps"),
        "type": "invalid_request_error", "code": "previous_response_not_found", "param": param,
    }});
    (StatusCode::NOT_FOUND, Json(body)).into_response()
}

/// What of a Responses body lmsd cannot honour, by name: no background runs, no stored
/// conversations or prompts of OpenAI's, and only function tools (and LM Studio's remote MCP).
fn refusal(body: &Value, engine: EngineKind) -> Option<(String, &'static str)> {
    if body["background"] == true {
        return Some((
            "lmsd runs no background responses: leave background out, or use lmsd's batch jobs"
                .into(),
            "background",
        ));
    }
    for field in ["conversation", "prompt"] {
        if !body[field].is_null() {
            return Some((
                format!("lmsd does not keep OpenAI's {field} objects: send the input itself (previous_response_id continues a response lmsd answered)"),
                field,
            ));
        }
    }
    let tools = body["tools"].as_array().map_or(&[][..], Vec::as_slice);
    for tool in tools {
        let kind = tool["type"].as_str().unwrap_or("function");
        let served = kind == "function" || (kind == "mcp" && engine == EngineKind::Lmstudio);
        if !served {
            return Some((format!("lmsd's engines run function tools only, not {kind:?} tools (remote MCP tools on LM Studio only)"), "tools"));
        }
    }
    None
}

/// The input as items: a string is one user message.
fn input_items(input: &Value) -> Result<Vec<Value>, WireError> {
    match input {
        Value::String(text) => Ok(vec![json!({"role": "user", "content": text})]),
        Value::Array(items) => Ok(items.clone()),
        _ => Err(WireError::bad_request(
            "input must be a string or an array of input items",
        )),
    }
}

pub(super) async fn create(
    State(front): State<Front>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let dialect = Dialect::OpenAi;
    if let Err(wire) = authorize(&front, &headers) {
        return dialect.error(wire);
    }
    let mut body = match parse_object(&body) {
        Ok(body) => body,
        Err(wire) => return dialect.error(wire),
    };
    if let Some((why, field)) = refusal(&body, front.ctx.backend.kind()) {
        return dialect.error_about(WireError::bad_request(why), Some(field));
    }
    let new_items = match input_items(&body["input"]) {
        Ok(items) => items,
        Err(wire) => return dialect.error_about(wire, Some("input")),
    };
    let parent = body["previous_response_id"].as_str().map(str::to_owned);
    let mut items = match &parent {
        Some(id) => match front.responses.conversation(id) {
            Some(items) => items,
            None => return not_found(id, Some("previous_response_id")),
        },
        None => Vec::new(),
    };
    items.extend(new_items.iter().cloned());
    let wants = Wants {
        images: has_part(&json!(items), "input_image"),
        tools: offers_tools(&body),
    };
    let model = match resolve_model(&front, &body, wants).await {
        Ok(model) => model,
        Err(wire) => return dialect.error_about(wire, Some("model")),
    };
    let stream = body["stream"].as_bool().unwrap_or(false);
    let store = body["store"] != false;
    let options = TaskOptions {
        needs: wants.needs(),
        ..TaskOptions::default()
    };
    let format = body.pointer("/text/format/type").and_then(Value::as_str);
    if matches!(format, Some("json_schema" | "json_object")) {
        return constrained(&front, &body, items, new_items, parent, model, options).await;
    }
    if let Some(fields) = body.as_object_mut() {
        fields.remove("previous_response_id");
    }
    body["input"] = json!(items);
    let request = ForwardRequest {
        endpoint: Endpoint::Responses,
        model,
        body,
        stream,
        contract: None,
        options,
    };
    if stream {
        let history = front.responses.clone();
        let shape = Shape::Responses {
            continues: parent.clone(),
        };
        return relay::stream(&front, shape, request, move |outcome| {
            if store {
                history.keep(parent, new_items, &outcome.reply);
            }
        })
        .await;
    }
    match relay::whole(&front, request).await {
        Ok(mut outcome) => {
            // The engine saw the conversation whole; the client continued one.
            if let Some(reply) = outcome.reply.as_object_mut() {
                reply.insert("previous_response_id".into(), json!(parent));
            }
            if store {
                front.responses.keep(parent, new_items, &outcome.reply);
            }
            Json(outcome.reply).into_response()
        }
        Err(wire) => dialect.error(wire),
    }
}

/// A Responses request with `text.format`, run as a chat completion under a contract and
/// answered as a Responses object.
async fn constrained(
    front: &Front,
    body: &Value,
    items: Vec<Value>,
    new_items: Vec<Value>,
    parent: Option<String>,
    model: String,
    options: TaskOptions,
) -> Response {
    let dialect = Dialect::OpenAi;
    let refuse =
        |why: &str, field: &str| dialect.error_about(WireError::bad_request(why), Some(field));
    if body["stream"] == true {
        return refuse("an answer under text.format is checked whole before it is sent, so it cannot stream: leave stream out", "stream");
    }
    if body["tools"].as_array().is_some_and(|t| !t.is_empty()) {
        return refuse("text.format with tools: lmsd checks one answer against the format, and a tool call is not one; send them apart", "tools");
    }
    if let Some(field) = untranslated(body) {
        return refuse(
            &format!("lmsd runs a text.format request as a chat completion, which has no {field:?}; leave it out"),
            field,
        );
    }
    let mut chat = match chat_body(body, &items) {
        Ok(chat) => chat,
        Err(wire) => return dialect.error_about(wire, Some("input")),
    };
    let contract = match crate::tasks::response_format_contract(&mut chat) {
        Ok(contract) => contract,
        Err(wire) => return dialect.error_about(wire, Some("text")),
    };
    let request = ForwardRequest {
        endpoint: Endpoint::ChatCompletions,
        model,
        body: chat,
        stream: false,
        contract,
        options,
    };
    match relay::whole(front, request).await {
        Ok(outcome) => {
            let mut response = response_of(
                &outcome.reply,
                &outcome.task.task_id,
                &body["text"],
                outcome.usage,
            );
            response["previous_response_id"] = json!(parent);
            if body["store"] != false {
                front.responses.keep(parent, new_items, &response);
            }
            Json(response).into_response()
        }
        Err(wire) => dialect.error(wire),
    }
}

/// The fields a Responses request with `text.format` is translated with (or that change nothing
/// of its answer); any other would be dropped on the way to chat completions, so it is refused.
const TRANSLATED: [&str; 14] = [
    "model",
    "input",
    "instructions",
    "text",
    "max_output_tokens",
    "temperature",
    "top_p",
    "previous_response_id",
    "store",
    "stream",
    "metadata",
    "user",
    "tool_choice",
    "parallel_tool_calls",
];

fn untranslated(body: &Value) -> Option<&str> {
    body.as_object()?
        .iter()
        .find(|(key, value)| !value.is_null() && !TRANSLATED.contains(&key.as_str()))
        .map(|(key, _)| key.as_str())
}

/// A content part of a Responses message as a chat-completions part.
fn chat_part(part: &Value) -> Result<Value, WireError> {
    match part["type"].as_str() {
        Some("input_text" | "output_text" | "text") => {
            Ok(json!({"type": "text", "text": part["text"]}))
        }
        Some("input_image") => {
            Ok(json!({"type": "image_url", "image_url": {"url": part["image_url"]}}))
        }
        other => Err(WireError::bad_request(format!(
            "lmsd cannot send a {other:?} content part under text.format"
        ))),
    }
}

/// The chat-completions body for a Responses request: instructions as the system message,
/// each input item as the message it is (tool calls and their outputs included).
fn chat_body(body: &Value, items: &[Value]) -> Result<Value, WireError> {
    let mut messages = Vec::new();
    if let Some(instructions) = body["instructions"].as_str() {
        messages.push(json!({"role": "system", "content": instructions}));
    }
    for item in items {
        let kind = item["type"].as_str().unwrap_or("message");
        match kind {
            "message" => {
                let role = match item["role"].as_str() {
                    Some("developer") => "system",
                    Some(role) => role,
                    None => "user",
                };
                let content = match &item["content"] {
                    Value::Array(parts) => {
                        json!(parts.iter().map(chat_part).collect::<Result<Vec<_>, _>>()?)
                    }
                    other => other.clone(),
                };
                messages.push(json!({"role": role, "content": content}));
            }
            "function_call" => messages.push(json!({"role": "assistant", "content": null,
                "tool_calls": [{"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}]})),
            "function_call_output" => messages.push(
                json!({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]}),
            ),
            // A model's reasoning echoed back is not part of what it is asked.
            "reasoning" => {}
            other => {
                return Err(WireError::bad_request(format!(
                    "lmsd cannot send a {other:?} input item under text.format"
                )))
            }
        }
    }
    let format = &body["text"]["format"];
    let response_format = match format["type"].as_str() {
        Some("json_schema") => json!({"type": "json_schema", "json_schema": {
            "name": format["name"], "schema": format["schema"], "strict": format["strict"],
        }}),
        _ => json!({"type": "json_object"}),
    };
    let mut chat =
        json!({"model": body["model"], "messages": messages, "response_format": response_format});
    for (from, to) in [
        ("max_output_tokens", "max_tokens"),
        ("temperature", "temperature"),
        ("top_p", "top_p"),
    ] {
        if !body[from].is_null() {
            chat[to] = body[from].clone();
        }
    }
    Ok(chat)
}

/// A chat completion's answer as a Responses object.
fn response_of(chat: &Value, task_id: &str, text: &Value, usage: crate::tasks::Tokens) -> Value {
    let answer = chat
        .pointer("/choices/0/message/content")
        .cloned()
        .unwrap_or_else(|| json!(""));
    json!({
        "id": format!("resp_lmsd_{task_id}"),
        "object": "response",
        "created_at": unix_now(),
        "status": "completed",
        "model": chat["model"],
        "output": [{
            "type": "message", "id": format!("msg_lmsd_{task_id}"), "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": answer, "annotations": []}],
        }],
        "text": text,
        "usage": {"input_tokens": usage.input, "output_tokens": usage.output,
                  "total_tokens": usage.input + usage.output},
    })
}

pub(super) async fn get(
    State(front): State<Front>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(wire) = authorize(&front, &headers) {
        return Dialect::OpenAi.error(wire);
    }
    match front.responses.response(&id) {
        Some(response) => Json(response).into_response(),
        None => not_found(&id, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(id: &str, said: &str) -> Value {
        json!({"id": id, "output": [{"type": "message", "role": "assistant",
            "content": [{"type": "output_text", "text": said}]}]})
    }

    #[test]
    fn a_conversation_is_each_turns_input_then_output_oldest_first() {
        let history = History::default();
        history.keep(
            None,
            vec![json!({"role": "user", "content": "one"})],
            &response("r1", "1"),
        );
        history.keep(
            Some("r1".into()),
            vec![json!({"role": "user", "content": "two"})],
            &response("r2", "2"),
        );
        let items = history.conversation("r2").unwrap();
        let said: Vec<&str> = items
            .iter()
            .map(|i| {
                i["content"]
                    .as_str()
                    .or(i["content"][0]["text"].as_str())
                    .unwrap()
            })
            .collect();
        assert_eq!(said, ["one", "1", "two", "2"]);
        assert!(history.conversation("r3").is_none());
    }

    #[test]
    fn a_conversation_missing_a_turn_is_not_continued() {
        let history = History::default();
        history.keep(Some("gone".into()), vec![], &response("r2", "2"));
        assert!(history.conversation("r2").is_none());
        assert!(history.response("r2").is_some(), "it can still be read");
    }

    #[test]
    fn responses_items_become_chat_messages() {
        let body = json!({"model": "m", "instructions": "be brief", "max_output_tokens": 9,
            "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}}});
        let items = [
            json!({"role": "user", "content": [{"type": "input_text", "text": "hi"}]}),
            json!({"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}),
            json!({"type": "function_call_output", "call_id": "c1", "output": "sunny"}),
        ];
        let chat = chat_body(&body, &items).unwrap();
        assert_eq!(chat["messages"][0]["role"], "system");
        assert_eq!(chat["messages"][1]["content"][0]["text"], "hi");
        assert_eq!(chat["messages"][2]["tool_calls"][0]["id"], "c1");
        assert_eq!(chat["messages"][3]["role"], "tool");
        assert_eq!(chat["max_tokens"], 9);
        assert_eq!(chat["response_format"]["json_schema"]["name"], "x");
    }

    #[test]
    fn a_field_the_chat_translation_would_drop_is_named() {
        let plain = json!({"model": "m", "input": "x", "text": {"format": {}}, "metadata": {}});
        assert_eq!(untranslated(&plain), None);
        let reasoning = json!({"model": "m", "input": "x", "reasoning": {"effort": "low"}});
        assert_eq!(untranslated(&reasoning), Some("reasoning"));
    }

    #[test]
    fn what_lmsd_cannot_honour_is_named() {
        let lm = EngineKind::Lmstudio;
        assert!(refusal(&json!({"background": true}), lm).is_some());
        assert!(refusal(&json!({"tools": [{"type": "web_search"}]}), lm).is_some());
        assert!(refusal(&json!({"tools": [{"type": "mcp"}]}), lm).is_none());
        assert!(refusal(
            &json!({"tools": [{"type": "mcp"}]}),
            EngineKind::LlamaServer
        )
        .is_some());
        assert!(refusal(&json!({"tools": [{"type": "function", "name": "f"}]}), lm).is_none());
    }
}
