//! OpenAI's chat-completions wire shapes, spoken by llama-server for every chat and by LM Studio
//! for a chat with a contract (its native chat has no structured output): the replies, and the
//! `response_format` that constrains an answer to a JSON Schema.

use serde::Deserialize;
use serde_json::{json, Value};

/// A user message's `content`: the text, or with images OpenAI's parts (`text`, then an
/// `image_url` per image).
pub(super) fn user_content(body: &super::ChatBody) -> Value {
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
pub(super) fn response_format(schema: &Value) -> Value {
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
