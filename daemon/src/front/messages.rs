//! Anthropic's Messages API: `POST /v1/messages`, relayed to the engine's own `/v1/messages`
//! (LM Studio since 0.4.1, llama-server), plain or streamed, tools and images included; and
//! `POST /v1/messages/count_tokens`. Errors come in Anthropic's shape. Anthropic's SDKs take
//! the server's root as their base URL (`ANTHROPIC_BASE_URL=http://127.0.0.1:1235`).

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use lmsd_proto::{TaskOptions, WireError};
use serde_json::{json, Value};

use super::relay::{self, Shape};
use super::{
    authorize, has_part, offers_tools, parse_object, resolve_model, Dialect, Front, Wants,
};
use crate::backend::Endpoint;
use crate::config::EngineKind;
use crate::tasks::ForwardRequest;

const DIALECT: Dialect = Dialect::Anthropic;

/// What of a Messages body lmsd cannot honour, by name: Anthropic's server-side tools (web
/// search, code execution…: a custom tool has no `type`, or `"custom"`), its MCP connector,
/// containers, and structured outputs, which neither engine is documented to constrain.
fn refusal(body: &Value) -> Option<String> {
    for field in ["output_format", "mcp_servers", "container"] {
        if !body[field].is_null() {
            return Some(format!("lmsd's engines do not honour Anthropic's {field}, and lmsd would have to ignore it; leave it out"));
        }
    }
    let tools = body["tools"].as_array().map_or(&[][..], Vec::as_slice);
    tools.iter().find_map(|tool| match tool["type"].as_str() {
        None | Some("custom") => None,
        Some(kind) => Some(format!(
            "lmsd's engines run your own tools only, not Anthropic's server tool {kind:?}"
        )),
    })
}

/// The text of a `system` value or a message's content: a string, or its text blocks.
fn text_of(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        Value::Array(blocks) => blocks
            .iter()
            .filter_map(|b| b["text"].as_str())
            .collect::<Vec<_>>()
            .join("\n\n"),
        _ => String::new(),
    }
}

/// System-role entries in `messages` (Claude Code sends them) moved into `system`, where the
/// Messages API has it: engines differ on them in `messages` (LM Studio fixed them in 0.4.15,
/// llmster later, #2204).
fn hoist_system(body: &mut Value) {
    let Some(messages) = body["messages"].as_array_mut() else {
        return;
    };
    let (system, rest): (Vec<Value>, Vec<Value>) =
        messages.drain(..).partition(|m| m["role"] == "system");
    *messages = rest;
    if system.is_empty() {
        return;
    }
    let moved = system
        .iter()
        .map(|m| text_of(&m["content"]))
        .filter(|t| !t.is_empty());
    // Blocks stay blocks (with their cache_control); the moved text is added as more.
    body["system"] = match body["system"].take() {
        Value::Array(mut blocks) => {
            blocks.extend(moved.map(|text| json!({"type": "text", "text": text})));
            Value::Array(blocks)
        }
        other => {
            let mut parts: Vec<String> = vec![text_of(&other)];
            parts.extend(moved);
            parts.retain(|p| !p.is_empty());
            json!(parts.join("\n\n"))
        }
    };
}

/// A body read as far as lmsd must, or the error response for it.
/// `for_count`: a token count, which needs nothing of the model but its tokenizer.
async fn prepare(
    front: &Front,
    headers: &HeaderMap,
    body: &Bytes,
    for_count: bool,
) -> Result<(Value, String, Wants), Response> {
    authorize(front, headers).map_err(|wire| DIALECT.error(wire))?;
    let mut body = parse_object(body).map_err(|wire| DIALECT.error(wire))?;
    if let Some(why) = refusal(&body) {
        return Err(DIALECT.error(WireError::bad_request(why)));
    }
    hoist_system(&mut body);
    if body["messages"].as_array().is_none_or(|m| m.is_empty()) {
        return Err(DIALECT.error(WireError::bad_request(
            "messages must hold at least one user or assistant message",
        )));
    }
    let wants = if for_count {
        Wants::default()
    } else {
        Wants {
            images: has_part(&body["messages"], "image"),
            tools: offers_tools(&body),
        }
    };
    let model = resolve_model(front, &body, wants)
        .await
        .map_err(|wire| DIALECT.error(wire))?;
    Ok((body, model, wants))
}

pub(super) async fn create(
    State(front): State<Front>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (body, model, wants) = match prepare(&front, &headers, &body, false).await {
        Ok(prepared) => prepared,
        Err(response) => return response,
    };
    let stream = body["stream"].as_bool().unwrap_or(false);
    let request = ForwardRequest {
        endpoint: Endpoint::Messages,
        model,
        body,
        stream,
        contract: None,
        options: TaskOptions {
            needs: wants.needs(),
            ..TaskOptions::default()
        },
    };
    if stream {
        return relay::stream(&front, Shape::Messages, request, |_| {}).await;
    }
    match relay::whole(&front, request).await {
        Ok(outcome) => Json(outcome.reply).into_response(),
        Err(wire) => DIALECT.error(wire),
    }
}

/// What an image counts as in the estimate: about 1,500 tokens' worth.
const IMAGE_BYTES: usize = 1_500 * BYTES_PER_TOKEN;

/// Bytes per token of the estimate lmsd gives where the engine counts none: about what
/// English prose and code average.
const BYTES_PER_TOKEN: usize = 4;

/// llama-server counts with the model's own tokenizer (a task: the model must be loaded);
/// LM Studio documents no count, so lmsd estimates from the text's length, without the
/// engine, and says so in the `x-lmsd-estimate` header.
pub(super) async fn count_tokens(
    State(front): State<Front>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (body, model, wants) = match prepare(&front, &headers, &body, true).await {
        Ok(prepared) => prepared,
        Err(response) => return response,
    };
    if front.ctx.backend.kind() == EngineKind::Lmstudio {
        let text = [&body["system"], &body["messages"], &body["tools"]]
            .iter()
            .map(|v| crate::tasks::text_bytes(v, IMAGE_BYTES))
            .sum::<usize>();
        let tokens = text.div_ceil(BYTES_PER_TOKEN);
        return (
            [("x-lmsd-estimate", "bytes/4")],
            Json(json!({"input_tokens": tokens})),
        )
            .into_response();
    }
    let request = ForwardRequest {
        endpoint: Endpoint::CountTokens,
        model,
        body,
        stream: false,
        contract: None,
        options: TaskOptions {
            needs: wants.needs(),
            ..TaskOptions::default()
        },
    };
    match relay::whole(&front, request).await {
        Ok(outcome) => Json(outcome.reply).into_response(),
        Err(wire) => DIALECT.error(wire),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_entries_join_the_system_prompt() {
        let mut body = json!({"system": [{"type": "text", "text": "Be brief."}], "messages": [
            {"role": "system", "content": "Use British spelling."},
            {"role": "user", "content": "hi"},
        ]});
        hoist_system(&mut body);
        let texts: Vec<&str> = body["system"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["text"].as_str().unwrap())
            .collect();
        assert_eq!(
            texts,
            ["Be brief.", "Use British spelling."],
            "blocks stay blocks"
        );
        let mut plain_system = json!({"system": "Be brief.", "messages": [
            {"role": "system", "content": "Use British spelling."},
            {"role": "user", "content": "hi"},
        ]});
        hoist_system(&mut plain_system);
        assert_eq!(plain_system["system"], "Be brief.\n\nUse British spelling.");
        assert_eq!(body["messages"].as_array().unwrap().len(), 1);
        let mut plain = json!({"system": [{"type": "text", "text": "kept as blocks"}],
            "messages": [{"role": "user", "content": "hi"}]});
        hoist_system(&mut plain);
        assert!(
            plain["system"].is_array(),
            "left alone without system entries"
        );
    }

    #[test]
    fn server_tools_and_structured_outputs_are_refused_by_name() {
        assert!(refusal(&json!({"tools": [{"name": "f", "input_schema": {}}]})).is_none());
        let search = refusal(&json!({"tools": [{"type": "web_search_20250305"}]})).unwrap();
        assert!(search.contains("web_search_20250305"));
        assert!(refusal(&json!({"output_format": {"type": "json_schema"}})).is_some());
    }
}
