//! OpenAI's `POST /v1/chat/completions` (relayed as sent: tools, tool calls, images and
//! multi-turn history included; `response_format` becomes a contract lmsd checks) and
//! `POST /v1/embeddings` (an embedding task).

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use lmsd_proto::{EmbedRequest, TaskOptions, WireError};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::relay::{self, Shape};
use super::{
    authorize, has_part, offers_tools, parse_object, resolve_model, Dialect, Front, Wants,
};
use crate::backend::Endpoint;
use crate::tasks::{self, response_format_contract, EventSink, ForwardRequest};

pub(super) async fn chat_completions(
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
    if body["messages"].as_array().is_none_or(|m| m.is_empty()) {
        return dialect.error_about(
            WireError::bad_request("messages must be a non-empty array of messages"),
            Some("messages"),
        );
    }
    let wants = Wants {
        images: has_part(&body["messages"], "image_url"),
        tools: offers_tools(&body),
    };
    let model = match resolve_model(&front, &body, wants).await {
        Ok(model) => model,
        Err(wire) => return dialect.error_about(wire, Some("model")),
    };
    let contract = match response_format_contract(&mut body) {
        Ok(contract) => contract,
        Err(wire) => return dialect.error_about(wire, Some("response_format")),
    };
    let stream = body["stream"].as_bool().unwrap_or(false);
    if stream && contract.is_some() {
        return dialect.error_about(
            WireError::bad_request("a response_format answer is checked whole before it is sent, so it cannot stream: leave stream out"),
            Some("stream"),
        );
    }
    let include_usage = body.pointer("/stream_options/include_usage") == Some(&json!(true));
    let request = ForwardRequest {
        endpoint: Endpoint::ChatCompletions,
        model,
        body,
        stream,
        contract,
        options: TaskOptions {
            needs: wants.needs(),
            ..TaskOptions::default()
        },
    };
    if stream {
        return relay::stream(&front, Shape::Chat { include_usage }, request, |_| {}).await;
    }
    match relay::whole(&front, request).await {
        Ok(outcome) => Json(outcome.reply).into_response(),
        Err(wire) => dialect.error(wire),
    }
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
}

/// The fields an embeddings body may have (`user` changes nothing lmsd answers). Others are
/// refused by name, `dimensions` among them: LM Studio answers it with empty vectors.
const EMBEDDINGS_FIELDS: [&str; 4] = ["model", "input", "encoding_format", "user"];

/// A vector as OpenAI's `base64` encoding has it.
fn base64_vector(vector: &[f64]) -> String {
    use base64::Engine;
    let bytes: Vec<u8> = vector
        .iter()
        .flat_map(|x| (*x as f32).to_le_bytes())
        .collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub(super) async fn embeddings(
    State(front): State<Front>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let dialect = Dialect::OpenAi;
    if let Err(wire) = authorize(&front, &headers) {
        return dialect.error(wire);
    }
    let body = match parse_object(&body) {
        Ok(body) => body,
        Err(wire) => return dialect.error(wire),
    };
    let unknown = body.as_object().and_then(|fields| {
        fields
            .keys()
            .find(|k| !EMBEDDINGS_FIELDS.contains(&k.as_str()))
    });
    if let Some(field) = unknown {
        return dialect.error_about(
            WireError::bad_request(format!(
                "lmsd's embeddings do not take {field:?}, and would have to ignore it; leave it out"
            )),
            Some(field),
        );
    }
    let body: EmbeddingsBody = match serde_json::from_value(body) {
        Ok(body) => body,
        Err(e) => {
            return dialect.error(WireError::bad_request(format!("invalid request body: {e}")))
        }
    };
    let base64 = body.encoding_format == EncodingFormat::Base64;
    let input = match body.input {
        EmbedInput::One(text) => vec![text],
        EmbedInput::Many(texts) => texts,
    };
    if input.is_empty() {
        return dialect.error(WireError::bad_request("input must hold at least one text"));
    }
    let model = match resolve_model(&front, &json!({"model": body.model}), Wants::default()).await {
        Ok(model) => model,
        Err(wire) => return dialect.error_about(wire, Some("model")),
    };
    let (replies, _) = mpsc::channel(1);
    let sink = EventSink {
        id: "http".into(),
        replies,
    };
    let request = EmbedRequest {
        model,
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
        Err(e) => dialect.error(e.to_wire()),
    }
}
