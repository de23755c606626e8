//! Relaying the agents' own wire formats — OpenAI chat completions and Responses, Anthropic
//! Messages — to the engine's endpoint of the same name, which LM Studio (0.4.1+) and
//! llama-server both serve. lmsd sends the body it was given (with `model` set to the leased
//! instance) and hands back the reply, or each server-sent event as it arrives.

use futures_util::StreamExt;
use serde_json::Value;

use super::errors::{decode_reply, BackendError};
use super::http::{Http, Limit, Opened};

/// An engine endpoint a request is relayed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Responses,
    Messages,
    /// Anthropic's `POST /v1/messages/count_tokens` (llama-server; LM Studio documents none).
    CountTokens,
}

impl Endpoint {
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "/v1/chat/completions",
            Endpoint::Responses => "/v1/responses",
            Endpoint::Messages => "/v1/messages",
            Endpoint::CountTokens => "/v1/messages/count_tokens",
        }
    }
}

/// One server-sent event of a relayed stream: its name (`None` for an unnamed one, as OpenAI's
/// chat chunks are) and its data.
#[derive(Debug, Clone)]
pub struct Frame {
    pub event: Option<String>,
    pub data: String,
}

impl Frame {
    /// The frame as it goes on the wire (data of several lines as several `data:` lines).
    pub fn to_sse(&self) -> String {
        let mut out = String::with_capacity(self.data.len() + 32);
        if let Some(event) = &self.event {
            out.push_str(&format!("event: {event}\n"));
        }
        for line in self.data.split('\n') {
            out.push_str("data: ");
            out.push_str(line);
            out.push('\n');
        }
        out.push('\n');
        out
    }
}

impl Http {
    /// Posts `body` to `endpoint` and returns the engine's reply; an error reply (by status or
    /// by an `error` key) is a [`BackendError`].
    pub async fn relay(&self, endpoint: Endpoint, body: &Value) -> Result<Value, BackendError> {
        self.post(endpoint.path(), body, Limit::Request).await
    }

    /// Posts `body` (which asks for a stream) to `endpoint` and gives each event to `on_frame`
    /// as it arrives, until the stream ends or `on_frame` says stop (`false`: the client went
    /// away). True when it ended with OpenAI's `[DONE]` (or as a whole reply). An engine that
    /// answered with a plain body instead is an error when the body is one; a plain success is
    /// handed on as a single unnamed frame.
    pub async fn relay_stream<F, Fut>(
        &self,
        endpoint: Endpoint,
        body: &Value,
        mut on_frame: F,
    ) -> Result<bool, BackendError>
    where
        F: FnMut(Frame) -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let mut events = match self.post_stream(endpoint.path(), body).await? {
            Opened::Events(status, events) if (200..300).contains(&status) => events,
            Opened::Events(status, _) => {
                return Err(BackendError::Api {
                    status,
                    kind: None,
                    message: format!("HTTP {status} with an event stream"),
                });
            }
            Opened::Body(status, body) => {
                let reply: Value = decode_reply(status, &body)?;
                on_frame(Frame {
                    event: None,
                    data: reply.to_string(),
                })
                .await;
                return Ok(true);
            }
        };
        while let Some(event) = events.next().await {
            let event = event.map_err(|e| self.stream_broke(e))?;
            // OpenAI's chat stream ends with a bare `[DONE]`; it is the relay's to send.
            if event.data == "[DONE]" {
                return Ok(true);
            }
            let frame = Frame {
                event: (!event.event.is_empty() && event.event != "message").then_some(event.event),
                data: event.data,
            };
            if !on_frame(frame).await {
                break;
            }
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_goes_out_as_it_came_with_its_lines_kept_apart() {
        let named = Frame {
            event: Some("message_stop".into()),
            data: "{}".into(),
        };
        assert_eq!(named.to_sse(), "event: message_stop\ndata: {}\n\n");
        let two_lines = Frame {
            event: None,
            data: "a\nb".into(),
        };
        assert_eq!(two_lines.to_sse(), "data: a\ndata: b\n\n");
    }
}
