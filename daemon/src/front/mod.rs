//! The HTTP front door (`[http] listen`): the agents' own wire formats — OpenAI's chat
//! completions, Responses and embeddings, Anthropic's Messages — each request run as a task
//! through the same pool and queue as socket tasks, and relayed to the engine's endpoint of the
//! same format. Agents that speak either API use lmsd without new code.
//!
//! This file owns the router, keys, model names (aliases, and the 404 that lists what exists)
//! and errors in each caller's own shape; `relay` runs a request; one file per API.

mod batches;
mod dashboard;
mod messages;
mod openai;
mod relay;
mod responses;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use lmsd_proto::{ErrorCode, Needs, WireError};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::backend::same_model;
use crate::tasks::{self, Context};

/// The largest request body taken.
const MAX_BODY: usize = 64 << 20;

#[derive(Clone)]
struct Front {
    ctx: Context,
    keys: Arc<Vec<String>>,
    /// The Responses lmsd answered, kept for `previous_response_id` and `GET`.
    responses: Arc<responses::History>,
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
        responses: Arc::new(responses::History::default()),
    };
    let app = Router::new()
        .route("/", get(dashboard::page))
        .route("/dashboard.js", get(dashboard::script))
        .route("/lmsd", post(dashboard::request))
        .route("/events", get(dashboard::events))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/embeddings", post(openai::embeddings))
        .route("/v1/responses", post(responses::create))
        .route("/v1/responses/{id}", get(responses::get))
        .route("/v1/messages", post(messages::create))
        .route("/v1/messages/count_tokens", post(messages::count_tokens))
        .route("/v1/files", post(batches::upload).get(batches::files))
        .route(
            "/v1/files/{id}",
            get(batches::file).delete(batches::delete_file),
        )
        .route("/v1/files/{id}/content", get(batches::content))
        .route("/v1/batches", post(batches::create).get(batches::list))
        .route("/v1/batches/{id}", get(batches::get))
        .route("/v1/batches/{id}/cancel", post(batches::cancel))
        .route("/metrics", get(metrics))
        // Agents send long histories and screenshots: axum's 2 MB default is too small.
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(front);
    if let Err(error) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        tracing::warn!(%error, "the HTTP front door stopped");
    }
}

/// Whose error shape a reply takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dialect {
    /// `{"error": {"message", "type", "code", "param"}}`
    OpenAi,
    /// `{"type": "error", "error": {"type", "message"}}`
    Anthropic,
}

fn status_of(code: ErrorCode) -> StatusCode {
    match code {
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
    }
}

/// Anthropic's error type for an HTTP status.
fn anthropic_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        503 => "overloaded_error",
        _ => "api_error",
    }
}

impl Dialect {
    /// The error's body in this dialect (lmsd's stable code rides along as `code`).
    fn error_body(self, wire: &WireError, param: Option<&str>) -> Value {
        let overflow = wire.code == ErrorCode::ContextExceeded;
        match self {
            // OpenAI's clients (and agents' compaction) look for `context_length_exceeded`.
            Dialect::OpenAi => json!({"error": {
                "message": wire.message, "type": wire.code, "param": param,
                "code": if overflow { json!("context_length_exceeded") } else { json!(wire.code) },
            }}),
            // Anthropic's wording for it, which Claude Code reads as "compact the history".
            Dialect::Anthropic => json!({"type": "error", "error": {
                "type": anthropic_type(status_of(wire.code)), "code": wire.code,
                "message": if overflow { format!("prompt is too long: {}", wire.message) } else { wire.message.clone() },
            }}),
        }
    }

    fn error(self, wire: WireError) -> Response {
        self.error_about(wire, None)
    }

    /// As [`Dialect::error`], naming the request field at fault (OpenAI's `param`).
    fn error_about(self, wire: WireError, param: Option<&str>) -> Response {
        let mut body = self.error_body(&wire, param);
        if let Some(invalid) = &wire.invalid_output {
            // What broke the contract goes to the client, and only there.
            body["error"]["invalid_output"] = json!(invalid);
        }
        (status_of(wire.code), Json(body)).into_response()
    }
}

/// With `[http] api_keys` set, each request carries one: `Authorization: Bearer KEY` (OpenAI's
/// clients) or `x-api-key: KEY` (Anthropic's).
fn authorize(front: &Front, headers: &HeaderMap) -> Result<(), WireError> {
    if front.keys.is_empty() {
        return Ok(());
    }
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let presented = header("authorization")
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| header("x-api-key"));
    match presented {
        Some(key) if front.keys.iter().any(|k| k == key) => Ok(()),
        _ => Err(WireError::new(
            ErrorCode::PermissionDenied,
            "a valid API key is required (Authorization: Bearer KEY or x-api-key: KEY, from [http] api_keys)",
        )),
    }
}

/// A JSON object body, or the reason it is not one.
fn parse_object(body: &Bytes) -> Result<Value, WireError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| WireError::bad_request(format!("invalid request body: {e}")))?;
    if !value.is_object() {
        return Err(WireError::bad_request(
            "the request body must be a JSON object",
        ));
    }
    Ok(value)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What a request needs of its model, from what it carries.
#[derive(Debug, Clone, Copy, Default)]
struct Wants {
    images: bool,
    tools: bool,
}

/// The model a request names, as lmsd will run it: an alias resolved (`[routing] aliases`),
/// then checked against the catalogue — a name the engine lacks is a 404 that lists what there
/// is, and a model that cannot see images or was not trained for tools is refused when the
/// request needs it (when the engine says; llama-server does not).
async fn resolve_model(front: &Front, body: &Value, wants: Wants) -> Result<String, WireError> {
    let Some(asked) = body.get("model").and_then(Value::as_str) else {
        return Err(WireError::bad_request(
            "the request names no model (\"model\": a model key, an alias, or \"auto\")",
        ));
    };
    let model = {
        let config = front.ctx.config.borrow();
        config.routing.alias_for(asked).unwrap_or(asked).to_owned()
    };
    if model == "auto" {
        return Ok(model);
    }
    let status = front
        .ctx
        .pool
        .status()
        .await
        .map_err(|e| tasks::TaskError::from(e).to_wire())?;
    // Without a catalogue (the engine not yet read) the task itself finds out.
    if status.catalogue.is_empty() {
        return Ok(model);
    }
    let Some(found) = status.catalogue.iter().find(|m| same_model(&model, &m.key)) else {
        let keys: Vec<&str> = status.catalogue.iter().map(|m| m.key.as_str()).collect();
        let aliased = if model == asked {
            String::new()
        } else {
            format!(" (the alias {asked:?} maps to it)")
        };
        return Err(WireError::new(
            ErrorCode::ModelNotFound,
            format!(
                "no model {model:?} on this machine{aliased}; there are: {}, and \"auto\". Map other names in [routing] aliases",
                keys.join(", ")
            ),
        ));
    };
    if let Some(caps) = &found.capabilities {
        if wants.images && !caps.vision {
            return Err(WireError::bad_request(format!(
                "{model} cannot see images: send them to a vision model, or to \"auto\""
            )));
        }
        if wants.tools && !caps.trained_for_tool_use {
            return Err(WireError::bad_request(format!(
                "{model} was not trained for tool use: send tools to a model that was, or to \"auto\""
            )));
        }
    }
    Ok(found.key.clone())
}

impl Wants {
    fn needs(self) -> Needs {
        Needs {
            vision: self.images,
            tools: self.tools,
            ..Needs::default()
        }
    }
}

/// Whether a request offers tools the model may call: OpenAI's `tool_choice: "none"` and
/// Anthropic's `{"type": "none"}` offer none.
fn offers_tools(body: &Value) -> bool {
    body["tools"].as_array().is_some_and(|t| !t.is_empty())
        && body["tool_choice"] != "none"
        && body["tool_choice"]["type"] != "none"
}

/// Whether any content part in `items` (messages, or Responses input items) is of `kind`,
/// nested tool results included.
fn has_part(items: &Value, kind: &str) -> bool {
    let Some(items) = items.as_array() else {
        return false;
    };
    items.iter().any(|item| {
        let content = &item["content"];
        content
            .as_array()
            .is_some_and(|parts| parts.iter().any(|p| p["type"] == kind))
            || has_part(content, kind)
    })
}

async fn models(State(front): State<Front>, headers: HeaderMap) -> Response {
    if let Err(wire) = authorize(&front, &headers) {
        return Dialect::OpenAi.error(wire);
    }
    match front.ctx.pool.status().await {
        Ok(status) => {
            let created = unix_now();
            let engine = front.ctx.backend.kind().name();
            let model = |id: &str, owner: &str| json!({"id": id, "object": "model", "created": created, "owned_by": owner});
            let mut data: Vec<Value> = status
                .catalogue
                .iter()
                .map(|m| model(&m.key, engine))
                .collect();
            data.push(model("auto", "lmsd"));
            // Exact aliases are names a client may pick from the list; globs are not.
            let config = front.ctx.config.borrow().clone();
            for name in config.routing.aliases.keys() {
                if !name.contains(['*', '?', '[']) {
                    data.push(model(name, "lmsd alias"));
                }
            }
            Json(json!({"object": "list", "data": data})).into_response()
        }
        Err(e) => Dialect::OpenAi.error(tasks::TaskError::from(e).to_wire()),
    }
}

async fn metrics(State(front): State<Front>, headers: HeaderMap) -> Response {
    if let Err(wire) = authorize(&front, &headers) {
        return Dialect::OpenAi.error(wire);
    }
    match tasks::metrics(&front.ctx).await {
        Ok(metrics) => (
            [("content-type", "text/plain; version=0.0.4")],
            metrics.text,
        )
            .into_response(),
        Err(e) => Dialect::OpenAi.error(e.to_wire()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_parts_are_found_in_messages_and_in_tool_results() {
        let chat = json!([{"role": "user", "content": [{"type": "text", "text": "hi"},
                                                     {"type": "image_url", "image_url": {"url": "data:"}}]}]);
        assert!(has_part(&chat, "image_url"));
        assert!(!has_part(&chat, "image"));
        let nested = json!([{"role": "user", "content": [{"type": "tool_result",
            "content": [{"type": "image", "source": {}}]}]}]);
        assert!(has_part(&nested, "image"));
        assert!(!has_part(
            &json!([{"role": "user", "content": "plain"}]),
            "image"
        ));
    }

    #[test]
    fn errors_take_the_callers_shape() {
        let wire = WireError::new(ErrorCode::QueueFull, "full");
        let anthropic = Dialect::Anthropic.error_body(&wire, None);
        assert_eq!(anthropic["type"], "error");
        assert_eq!(anthropic["error"]["type"], "rate_limit_error");
        let openai = Dialect::OpenAi.error_body(&wire, Some("model"));
        assert_eq!(openai["error"]["code"], "queue_full");
        assert_eq!(openai["error"]["param"], "model");
    }
}
