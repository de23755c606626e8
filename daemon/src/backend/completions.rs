//! OpenAI's chat-completions wire shapes, spoken by llama-server for every chat and by LM Studio
//! for a chat with a contract (its native chat has no structured output): the request, with the
//! `response_format` that constrains an answer to a JSON Schema, and the replies in the pool's
//! vocabulary.

use serde::Deserialize;
use serde_json::{json, Value};

use super::{ChatBody, ChatReply, ChatStats, OutputItem};

/// The request for `body` with these `messages`: its sampling settings, and its schema as
/// `response_format`.
pub(super) fn request(body: &ChatBody, messages: Vec<Value>, stream: bool) -> Value {
    let mut request = json!({
        "model": body.model,
        "messages": messages,
        "stream": stream,
    });
    if let Some(temperature) = body.temperature {
        request["temperature"] = json!(temperature);
    }
    if let Some(max_tokens) = body.max_output_tokens {
        request["max_tokens"] = json!(max_tokens);
    }
    if let Some(schema) = &body.schema {
        request["response_format"] = response_format(schema);
    }
    if stream {
        request["stream_options"] = json!({ "include_usage": true });
    }
    request
}

/// A completion's text in the pool's vocabulary: the reasoning (if any), then the message.
pub(super) fn reply(
    model_instance_id: String,
    message: String,
    reasoning: String,
    usage: &Usage,
    response_id: Option<String>,
) -> ChatReply {
    let mut output = Vec::with_capacity(2);
    if !reasoning.is_empty() {
        output.push(OutputItem::Reasoning { content: reasoning });
    }
    output.push(OutputItem::Message { content: message });
    ChatReply {
        model_instance_id,
        output,
        stats: ChatStats {
            input_tokens: usage.prompt_tokens,
            total_output_tokens: usage.completion_tokens,
            ..ChatStats::default()
        },
        response_id,
    }
}

impl Completion {
    /// The first choice's message and reasoning (empty when absent).
    pub(super) fn texts(&mut self) -> (String, String) {
        let message = self.choices.drain(..).next().map(|c| c.message);
        message
            .map(|m| {
                (
                    m.content.unwrap_or_default(),
                    m.reasoning_content.unwrap_or_default(),
                )
            })
            .unwrap_or_default()
    }
}

/// A user message's `content`: the text, or with images OpenAI's parts (`text`, then an
/// `image_url` per image).
pub(super) fn user_content(body: &ChatBody) -> Value {
    if body.images.is_empty() {
        return json!(body.input);
    }
    let mut parts = vec![json!({"type": "text", "text": body.input})];
    parts.extend(
        body.images
            .iter()
            .map(|url| json!({"type": "image_url", "image_url": {"url": url}})),
    );
    Value::Array(parts)
}

/// `response_format` for an answer constrained to `schema`: OpenAI's `json_schema` form, which
/// both engines take (LM Studio refuses `json_object`).
fn response_format(schema: &Value) -> Value {
    json!({
        "type": "json_schema",
        "json_schema": {"name": "answer", "strict": true, "schema": schema},
    })
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct Usage {
    #[serde(default)]
    pub(super) prompt_tokens: u64,
    #[serde(default)]
    pub(super) completion_tokens: u64,
}

#[derive(Deserialize)]
pub(super) struct Completion {
    /// The instance that answered (LM Studio: its instance id).
    #[serde(default)]
    pub(super) model: Option<String>,
    #[serde(default)]
    pub(super) choices: Vec<CompletionChoice>,
    #[serde(default)]
    pub(super) usage: Usage,
}

#[derive(Deserialize)]
pub(super) struct CompletionChoice {
    pub(super) message: CompletionMessage,
}

#[derive(Deserialize)]
pub(super) struct CompletionMessage {
    pub(super) content: Option<String>,
    // LM Studio names it `reasoning`; llama-server `reasoning_content`.
    #[serde(alias = "reasoning")]
    pub(super) reasoning_content: Option<String>,
}

#[derive(Deserialize)]
pub(super) struct Chunk {
    #[serde(default)]
    pub(super) choices: Vec<ChunkChoice>,
    pub(super) usage: Option<Usage>,
}

#[derive(Deserialize)]
pub(super) struct ChunkChoice {
    #[serde(default)]
    pub(super) delta: CompletionDelta,
}

#[derive(Default, Deserialize)]
pub(super) struct CompletionDelta {
    pub(super) content: Option<String>,
    // LM Studio names it `reasoning`; llama-server `reasoning_content`.
    #[serde(alias = "reasoning")]
    pub(super) reasoning_content: Option<String>,
}
