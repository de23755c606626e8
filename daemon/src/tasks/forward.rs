//! Requests in an agent's own wire format — OpenAI chat completions or Responses, Anthropic
//! Messages — run as tasks and relayed to the engine's endpoint for that format: queued,
//! leased, retried, cancelled and entered in the ledger like any chat. lmsd reads only what it
//! must of them: the model (set to the leased instance), the reply's model (another model's
//! answer is no answer), its usage, and under a contract the answer it checks.

use lmsd_proto::{TaskKind, TaskOptions, TaskReport, WireError};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::contract::Contract;
use super::runner::{run_task, Done, Task, Work};
use super::{record, Context, EventSink, TaskError};
use crate::backend::{same_model, BackendError, Endpoint, Frame};
use crate::pool::Lease;

/// A request to relay, read as far as lmsd must.
#[derive(Debug)]
pub struct ForwardRequest {
    pub endpoint: Endpoint,
    /// A model key or `auto` (aliases already resolved).
    pub model: String,
    /// The body as the agent sent it; `model` is set to the leased instance for each try.
    pub body: Value,
    /// Each event goes to `relay` as the engine sends it.
    pub stream: bool,
    /// Checked on a chat-completions answer (never streamed).
    pub contract: Option<Contract>,
    /// Needs (vision for images, tools) included.
    pub options: TaskOptions,
}

/// A relayed request's end: the engine's reply (under a contract, with the answer as the JSON
/// lmsd checked), or for a stream the last whole object it carried, if any.
#[derive(Debug)]
pub struct ForwardOutcome {
    pub reply: Value,
    pub usage: Tokens,
    pub task: TaskReport,
}

/// The tokens a reply says it read and wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tokens {
    pub input: u64,
    pub output: u64,
}

/// The contract a `response_format` asks for, and the body rewritten to the form both engines
/// constrain with: a JSON Schema (LM Studio answers `json_object` with a 400).
pub fn response_format_contract(body: &mut Value) -> Result<Option<Contract>, WireError> {
    let format = &body["response_format"];
    let contract = match format["type"].as_str() {
        None if format.is_null() => return Ok(None),
        Some("text") => return Ok(None),
        Some("json_object") => Contract::json_object(),
        // OpenAI takes a name without a schema: any JSON value.
        Some("json_schema") => {
            let schema = format.pointer("/json_schema/schema").cloned();
            Contract::schema(&schema.unwrap_or_else(|| json!({})))
                .map_err(WireError::bad_request)?
        }
        _ => {
            return Err(WireError::bad_request(format!(
            "response_format {format} is not one lmsd knows: use text, json_object or json_schema"
        )))
        }
    };
    let name = format
        .pointer("/json_schema/name")
        .filter(|n| n.is_string())
        .cloned()
        .unwrap_or_else(|| json!("answer"));
    body["response_format"] = json!({"type": "json_schema", "json_schema": {
        "name": name, "strict": true, "schema": contract.engine_schema(),
    }});
    Ok(Some(contract))
}

/// Runs one relayed request (a stream's events go to `relay`) and enters it in the ledger.
pub async fn forward(
    ctx: &Context,
    request: &ForwardRequest,
    relay: Option<&mpsc::Sender<Frame>>,
    cancel: CancellationToken,
) -> Result<ForwardOutcome, TaskError> {
    // No events to forward: a relayed request's client hears the engine's stream, not lmsd's.
    let (replies, _) = mpsc::channel(1);
    let sink = EventSink {
        id: "http".into(),
        replies,
    };
    if request.stream && request.contract.is_some() {
        return Err(TaskError::BadRequest(
            "an answer under a contract is checked whole before it is sent, so it cannot stream: leave stream out".into(),
        ));
    }
    let work = Work::Forward { request, relay };
    let result = run_task(
        ctx,
        TaskKind::Chat,
        &request.model,
        &request.options,
        work,
        &sink,
        cancel,
    )
    .await;
    let result = result.and_then(|(done, answered, task)| match done {
        Done::Forward { reply, usage } => Ok(ForwardOutcome { reply, usage, task }),
        _ => Err(TaskError::EmptyReply {
            instance: answered.instance,
        }),
    });
    let entry = match &result {
        Ok(outcome) => Ok((&outcome.task, outcome.usage.input, outcome.usage.output)),
        Err(error) => Err(error),
    };
    let kind = match request.endpoint {
        Endpoint::CountTokens => "count_tokens",
        _ => "chat",
    };
    record(
        ctx,
        kind,
        &request.model,
        request.options.tag.clone(),
        entry,
    );
    result
}

impl Task<'_> {
    /// Relays the request to the leased instance. An error after part of a stream went out is
    /// never retried: the client would hear that part twice.
    pub(super) async fn relay(
        &self,
        lease: &Lease,
        request: &ForwardRequest,
        relay: Option<&mpsc::Sender<Frame>>,
        cold: bool,
    ) -> Result<Done, TaskError> {
        let mut body = request.body.clone();
        body["model"] = json!(lease.instance_id);
        if cold {
            body["temperature"] = json!(0.0);
        }
        let backend = &self.ctx.backend;
        let (Some(relay), true) = (relay, request.stream) else {
            let reply = backend
                .relay(request.endpoint, &body)
                .await
                .map_err(refused_as_bad_request)?;
            check_answered_by(&lease.instance_id, model_of(request.endpoint, &reply))?;
            let usage = usage_of(request.endpoint, &reply);
            return Ok(Done::Forward { reply, usage });
        };
        if request.endpoint == Endpoint::ChatCompletions {
            // The usage chunk is how the ledger learns a stream's tokens; the front door drops
            // it again for a client that did not ask.
            if !body["stream_options"].is_object() {
                body["stream_options"] = json!({});
            }
            body["stream_options"]["include_usage"] = json!(true);
        }
        let mut usage = Tokens::default();
        let mut last = Value::Null;
        let mut relayed = false;
        let mut ended = false;
        let mut wrong_model = None;
        let result = backend
            .relay_stream(request.endpoint, &body, |frame| {
                let data: Value = serde_json::from_str(&frame.data).unwrap_or(Value::Null);
                if !relayed {
                    if let Err(error) = check_answered_by(
                        &lease.instance_id,
                        model_of_frame(request.endpoint, &data),
                    ) {
                        wrong_model = Some(error);
                    }
                }
                add_frame_usage(request.endpoint, &data, &mut usage);
                ended |= ends_stream(request.endpoint, &data);
                if let Some(whole) = whole_of_frame(request.endpoint, &data) {
                    last = whole.clone();
                }
                let stop = wrong_model.is_some();
                relayed |= !stop;
                let relay = relay.clone();
                async move { !stop && relay.send(frame).await.is_ok() }
            })
            .await;
        if let Some(error) = wrong_model {
            return Err(error);
        }
        // A client that left after the last event heard the whole answer.
        if relay.is_closed() && !ended {
            return Err(TaskError::Cancelled);
        }
        let result = match result {
            // A stream that stopped short of its last event is broken, however it stopped.
            Ok(done) if !(done || ended) => {
                Err(backend.stream_broke("it ended before its last event"))
            }
            other => other.map(drop),
        };
        match result {
            Ok(()) => Ok(Done::Forward { reply: last, usage }),
            Err(source) if relayed => Err(TaskError::StreamBroken { source }),
            Err(error) => Err(refused_as_bad_request(error)),
        }
    }
}

/// An engine's refusal of a body it was relayed (a 4xx lmsd did not classify) is the client's
/// bad request, with the engine's words: it would be refused again, by any model.
fn refused_as_bad_request(error: BackendError) -> TaskError {
    match error {
        BackendError::Api {
            status, message, ..
        } if (400..500).contains(&status) && status != 408 && status != 429 => {
            TaskError::BadRequest(format!("the engine refused the request: {message}"))
        }
        error => TaskError::Backend(error),
    }
}

/// The context a relayed request surely needs: its body's bytes over the most any tokenizer
/// packs into a token (images and the JSON around the text make this an overestimate of the
/// text, never of what fits).
pub(super) fn context_needed(request: &ForwardRequest) -> Option<u32> {
    if request.endpoint == Endpoint::CountTokens {
        return None;
    }
    let bytes = super::work::text_bytes(&request.body, 0);
    let needed = u32::try_from(bytes / super::work::BYTES_PER_TOKEN_CEILING).unwrap_or(u32::MAX);
    (needed > 0).then_some(needed)
}

/// The engines' compatible endpoints answer with whatever model is loaded when the one named is
/// gone (LM Studio 0.4.19): another model's reply is no answer.
fn check_answered_by(instance: &str, answered: Option<&str>) -> Result<(), TaskError> {
    match answered {
        Some(answered) if !same_model(instance, answered) => {
            Err(TaskError::Backend(BackendError::InstanceGone {
                message: format!("asked {instance:?}, and {answered:?} answered"),
            }))
        }
        _ => Ok(()),
    }
}

fn model_of(endpoint: Endpoint, reply: &Value) -> Option<&str> {
    match endpoint {
        Endpoint::CountTokens => None,
        _ => reply.get("model").and_then(Value::as_str),
    }
}

/// The model a stream's first frames name: a chat chunk's `model`, `message_start`'s
/// `message.model`, a Responses event's `response.model` (llama-server leaves it out).
fn model_of_frame(endpoint: Endpoint, data: &Value) -> Option<&str> {
    let pointer = match endpoint {
        Endpoint::ChatCompletions => "/model",
        Endpoint::Messages => "/message/model",
        Endpoint::Responses => "/response/model",
        Endpoint::CountTokens => return None,
    };
    data.pointer(pointer).and_then(Value::as_str)
}

fn number(value: &Value, pointer: &str) -> Option<u64> {
    value.pointer(pointer).and_then(Value::as_u64)
}

/// A whole reply's usage, in each format's own names.
pub fn usage_of(endpoint: Endpoint, reply: &Value) -> Tokens {
    let (input, output) = match endpoint {
        Endpoint::ChatCompletions => ("/usage/prompt_tokens", "/usage/completion_tokens"),
        Endpoint::Responses | Endpoint::Messages => ("/usage/input_tokens", "/usage/output_tokens"),
        // Tokens counted, not read: a count is no chat.
        Endpoint::CountTokens => return Tokens::default(),
    };
    Tokens {
        input: number(reply, input).unwrap_or(0),
        output: number(reply, output).unwrap_or(0),
    }
}

/// What a stream's frame says of usage: chat completions' usage chunk, `response.completed`'s
/// response, Anthropic's `message_start` (input) and `message_delta` (output so far).
fn add_frame_usage(endpoint: Endpoint, data: &Value, usage: &mut Tokens) {
    match endpoint {
        Endpoint::ChatCompletions if data.get("usage").is_some_and(Value::is_object) => {
            *usage = usage_of(endpoint, data);
        }
        Endpoint::Responses if responses_end(data) => {
            *usage = usage_of(endpoint, &data["response"]);
        }
        Endpoint::Messages => {
            if let Some(input) = number(data, "/message/usage/input_tokens") {
                usage.input = input;
            }
            if let Some(output) = number(data, "/usage/output_tokens") {
                usage.output = output;
            }
            if let Some(input) = number(data, "/usage/input_tokens") {
                usage.input = usage.input.max(input);
            }
        }
        _ => {}
    }
}

/// The whole reply a stream carries at its end, where the format has one: the Responses
/// object of `response.completed`.
fn whole_of_frame(endpoint: Endpoint, data: &Value) -> Option<&Value> {
    (endpoint == Endpoint::Responses && responses_end(data)).then(|| &data["response"])
}

/// The events a Responses stream ends with: the response whole, however it ended.
fn responses_end(data: &Value) -> bool {
    matches!(
        data["type"].as_str(),
        Some("response.completed" | "response.incomplete" | "response.failed")
    )
}

/// Whether a frame is the last of its format's stream (chat completions end with a bare
/// `[DONE]`, which the relay reads for itself).
fn ends_stream(endpoint: Endpoint, data: &Value) -> bool {
    match endpoint {
        Endpoint::Responses => responses_end(data),
        Endpoint::Messages => data["type"] == "message_stop",
        Endpoint::ChatCompletions | Endpoint::CountTokens => false,
    }
}

/// A chat-completions answer's text, which a contract checks.
pub(super) fn answer_of(reply: &Value) -> String {
    reply
        .pointer("/choices/0/message/content")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

/// The reply with its answer replaced by the JSON that kept the contract (a fence gone).
pub(super) fn with_answer(mut reply: Value, json: &Value) -> Value {
    if let Some(content) = reply.pointer_mut("/choices/0/message/content") {
        *content = json!(json.to_string());
    }
    reply
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_is_read_in_each_formats_own_names() {
        let chat = json!({"usage": {"prompt_tokens": 5, "completion_tokens": 7}});
        assert_eq!(
            usage_of(Endpoint::ChatCompletions, &chat),
            Tokens {
                input: 5,
                output: 7
            }
        );
        let responses = json!({"usage": {"input_tokens": 3, "output_tokens": 4}});
        assert_eq!(usage_of(Endpoint::Responses, &responses).output, 4);
        let mut streamed = Tokens::default();
        for frame in [
            json!({"type": "message_start", "message": {"usage": {"input_tokens": 9, "output_tokens": 1}}}),
            json!({"type": "content_block_delta", "delta": {"text": "hi"}}),
            json!({"type": "message_delta", "usage": {"output_tokens": 12}}),
        ] {
            add_frame_usage(Endpoint::Messages, &frame, &mut streamed);
        }
        assert_eq!(
            streamed,
            Tokens {
                input: 9,
                output: 12
            }
        );
    }

    #[test]
    fn another_models_answer_is_no_answer_and_an_unnamed_one_is_taken() {
        assert!(check_answered_by("qwen3:2", Some("qwen3")).is_ok());
        assert!(check_answered_by("qwen3", None).is_ok());
        assert!(matches!(
            check_answered_by("qwen3", Some("gemma")),
            Err(TaskError::Backend(BackendError::InstanceGone { .. }))
        ));
        let chunk = json!({"type": "message_start", "message": {"model": "gemma"}});
        assert_eq!(model_of_frame(Endpoint::Messages, &chunk), Some("gemma"));
    }

    #[test]
    fn an_engines_refusal_of_the_body_is_the_clients_bad_request() {
        let refusal = BackendError::Api {
            status: 400,
            kind: None,
            message: "bad tool".into(),
        };
        assert!(matches!(
            refused_as_bad_request(refusal),
            TaskError::BadRequest(_)
        ));
        let busy = BackendError::Api {
            status: 503,
            kind: None,
            message: "busy".into(),
        };
        assert!(matches!(
            refused_as_bad_request(busy),
            TaskError::Backend(_)
        ));
    }
}
