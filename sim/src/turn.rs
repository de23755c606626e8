//! One simulated model turn, behind LM Studio's three compatible chat formats (OpenAI chat
//! completions and Responses, Anthropic Messages): the instance that serves it (JIT-loaded
//! like the real server), and what the model says — text, the JSON a schema asks for, or a call
//! to a tool it was offered.
//!
//! A model calls a tool when the request requires one, names one in its tool choice, or when
//! the user's last message names the tool; after a tool result it answers in text that quotes
//! the result. Deterministic, so tests can round-trip tool calls.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::api::{load_instance, InFlight};
use crate::completions::{answer, sample, Format};
use crate::errors::ApiError;
use crate::faults::{Fault, Route};
use crate::state::{LoadSettings, Target};
use crate::Shared;

/// A tool a request offers.
#[derive(Debug, Clone)]
pub(crate) struct Tool {
    pub name: String,
    /// Its parameters' JSON Schema.
    pub parameters: Value,
}

/// Whether and which tool the model must call.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ToolChoice {
    /// The model decides (it calls a tool its prompt names).
    Auto,
    None,
    /// Some tool, the first offered.
    Required,
    Named(String),
}

/// What a turn is asked, read from any of the formats.
#[derive(Debug)]
pub(crate) struct Ask {
    /// The user's last message.
    pub prompt: String,
    /// Words of everything the model reads, for usage.
    pub context_words: usize,
    pub tools: Vec<Tool>,
    pub tool_choice: ToolChoice,
    /// The output of a tool, when the last input is a tool's result.
    pub tool_result: Option<String>,
    pub format: Format,
}

/// What the model says.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Said {
    Text(String),
    ToolCall {
        id: String,
        name: String,
        arguments: Value,
    },
}

impl Said {
    /// Output tokens, roughly: a word each.
    pub fn tokens(&self) -> usize {
        match self {
            Said::Text(text) => text.split_whitespace().count(),
            Said::ToolCall { arguments, .. } => arguments.to_string().len() / 4 + 1,
        }
    }
}

/// The model's answer to `ask`.
pub(crate) fn say(ask: &Ask, instance_id: &str, fault: Option<&Fault>) -> Said {
    if let Some(output) = &ask.tool_result {
        return Said::Text(format!(
            "Simulated reply from {instance_id}: the tool answered {output}."
        ));
    }
    let chosen = match &ask.tool_choice {
        ToolChoice::None => None,
        ToolChoice::Required => ask.tools.first(),
        ToolChoice::Named(name) => ask.tools.iter().find(|t| &t.name == name),
        ToolChoice::Auto => ask.tools.iter().find(|t| ask.prompt.contains(&t.name)),
    };
    match chosen {
        Some(tool) => Said::ToolCall {
            id: new_id("call_"),
            name: tool.name.clone(),
            arguments: sample(&tool.parameters, &ask.prompt),
        },
        None => Said::Text(answer(&ask.format, &ask.prompt, instance_id, fault)),
    }
}

/// The instance a compatible request naming `model` runs on (a loaded one, or JIT-loaded as
/// the real server does), held in flight while the guard lives.
pub(crate) async fn serve(
    shared: &Arc<Shared>,
    model: &str,
    route: Route,
) -> Result<(String, InFlight), ApiError> {
    let target = shared.lock().chat_target(model)?;
    let instance_id = match target {
        Target::Loaded(id) => id,
        Target::NeedsLoad(key) => {
            load_instance(shared, &key, LoadSettings::default(), true, route, |_| {})
                .await?
                .0
        }
    };
    let Some(flight) = InFlight::begin(shared, &instance_id, true)? else {
        return Err(ApiError::model_not_found(&instance_id));
    };
    Ok((instance_id, flight))
}

/// Waits as long as generating `said` takes (a whole reply is not instant either).
pub(crate) async fn generate(shared: &Shared, said: &Said) {
    let delay = token_delay(shared);
    crate::api::pause(delay * said.tokens() as u32).await;
}

/// The simulated time per token.
pub(crate) fn token_delay(shared: &Shared) -> Duration {
    shared.lock().config.token_delay
}

/// A text in the pieces a stream sends: each word with the space after it.
pub(crate) fn pieces(text: &str) -> impl Iterator<Item = &str> {
    text.split_inclusive(' ')
}

/// The text of a message's content in any of the formats: a string, or its text parts.
pub(crate) fn text_of(content: &Value) -> String {
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

/// A stream of named events (Responses, Messages), sent a token's time apart; the instance
/// stays in flight until the last is out or the client goes away.
pub(crate) fn named_events(
    shared: &Shared,
    flight: InFlight,
    events: Vec<(&'static str, Value)>,
) -> axum::response::Response {
    use axum::response::sse::{Event, Sse};
    use axum::response::IntoResponse;
    let delay = token_delay(shared);
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        let _flight = flight;
        for event in events {
            crate::api::pause(delay).await;
            if tx.send(event).await.is_err() {
                return;
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        let (name, data) = rx.recv().await?;
        let event = Event::default().event(name).data(data.to_string());
        Some((Ok::<_, std::convert::Infallible>(event), rx))
    });
    Sse::new(stream).into_response()
}

/// A fresh id with `prefix`, as the real server makes them.
pub(crate) fn new_id(prefix: &str) -> String {
    format!("{prefix}{:024x}", fastrand::u128(..1 << 96))
}

pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ask(prompt: &str, choice: ToolChoice) -> Ask {
        Ask {
            prompt: prompt.into(),
            context_words: 3,
            tools: vec![Tool {
                name: "get_weather".into(),
                parameters: json!({"type": "object", "properties": {"city": {"type": "string"}}}),
            }],
            tool_choice: choice,
            tool_result: None,
            format: Format::Text,
        }
    }

    #[test]
    fn a_tool_is_called_when_named_or_required_and_a_result_is_answered_in_text() {
        let called = say(
            &ask("use get_weather for Paris", ToolChoice::Auto),
            "m",
            None,
        );
        assert!(matches!(called, Said::ToolCall { ref name, .. } if name == "get_weather"));
        let plain = say(&ask("hello", ToolChoice::Auto), "m", None);
        assert!(matches!(plain, Said::Text(_)));
        let required = say(&ask("hello", ToolChoice::Required), "m", None);
        assert!(matches!(required, Said::ToolCall { .. }));
        let refused = say(&ask("use get_weather", ToolChoice::None), "m", None);
        assert!(matches!(refused, Said::Text(_)));
        let mut after = ask("use get_weather", ToolChoice::Auto);
        after.tool_result = Some("sunny".into());
        assert_eq!(
            say(&after, "m", None),
            Said::Text("Simulated reply from m: the tool answered sunny.".into())
        );
    }
}
