//! Reading a request line: JSON, id, version, then the request, each refused with a reason.

use serde_json::{Map, Value};

use super::{Envelope, Reply, Request};
use crate::error::{ErrorCode, WireError};
use crate::PROTOCOL_VERSION;

/// A request line that could not be accepted: the error reply to send, with the id if one was
/// readable.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    pub id: Option<String>,
    pub error: WireError,
}

impl Rejection {
    pub fn into_reply(self) -> Reply {
        Reply::error(self.id, self.error)
    }
}

/// Parses one request line. Checks, in order: JSON object, `id`, `v`, then the request itself,
/// so that even a request of an unknown type is answered under its own id.
pub fn parse_request(line: &[u8]) -> Result<Envelope, Rejection> {
    let reject = |id: Option<String>, error: WireError| Rejection { id, error };
    let value: Value = serde_json::from_slice(line)
        .map_err(|e| reject(None, WireError::bad_request(format!("invalid JSON: {e}"))))?;
    let Value::Object(mut object) = value else {
        return Err(reject(
            None,
            WireError::bad_request("a request must be a JSON object"),
        ));
    };
    let id = match object.remove("id") {
        Some(Value::String(id)) => id,
        Some(_) => {
            return Err(reject(
                None,
                WireError::bad_request("\"id\" must be a string"),
            ))
        }
        None => return Err(reject(None, WireError::bad_request("missing \"id\""))),
    };
    let reject_for = |error: WireError| reject(Some(id.clone()), error);
    match object.remove("v") {
        Some(Value::Number(v)) if v.as_u64() == Some(u64::from(PROTOCOL_VERSION)) => {}
        Some(other) => {
            return Err(reject_for(WireError::new(
                    ErrorCode::UnsupportedVersion,
                format!(
                    "protocol version {other} is not supported; this lmsd speaks version {PROTOCOL_VERSION}"
                ),
            )))
        }
        None => {
            return Err(reject_for(WireError::bad_request(format!(
                "missing \"v\" (the protocol version, {PROTOCOL_VERSION})"
            ))))
        }
    }
    let request = request_from_object(object).map_err(reject_for)?;
    Ok(Envelope {
        v: PROTOCOL_VERSION,
        id,
        request,
    })
}

fn request_from_object(object: Map<String, Value>) -> Result<Request, WireError> {
    if !object.contains_key("type") {
        return Err(WireError::bad_request("missing \"type\""));
    }
    let request: Request = serde_json::from_value(Value::Object(object))
        .map_err(|e| WireError::bad_request(format!("invalid request: {e}")))?;
    request.validate()?;
    Ok(request)
}

impl Request {
    /// Checks what serde cannot: non-empty names, exactly one unload target.
    fn validate(&self) -> Result<(), WireError> {
        let non_empty = |field: &str, value: &str| {
            if value.trim().is_empty() {
                Err(WireError::bad_request(format!(
                    "\"{field}\" must not be empty"
                )))
            } else {
                Ok(())
            }
        };
        match self {
            Request::Status
            | Request::Models
            | Request::Reload
            | Request::Tasks
            | Request::Sessions(_)
            | Request::Savings(_)
            | Request::Fitness(_)
            | Request::Metrics
            | Request::Events
            | Request::BatchStatus(_) => Ok(()),
            Request::Cancel(cancel) => non_empty("task_id", &cancel.task_id),
            Request::BatchSubmit(submit) => non_empty("lines", &submit.lines),
            Request::BatchResults(job) | Request::BatchCancel(job) | Request::BatchDelete(job) => {
                non_empty("job_id", &job.job_id)
            }
            Request::Embed(embed) => {
                non_empty("model", &embed.model)?;
                if embed.input.is_empty() {
                    return Err(WireError::bad_request(
                        "\"input\" must hold at least one text",
                    ));
                }
                Ok(())
            }
            Request::Load(load) => non_empty("model", &load.model),
            Request::Pin(pin) | Request::Unpin(pin) => non_empty("model", &pin.model),
            Request::Unload(unload) => match (&unload.model, &unload.instance_id, unload.all) {
                (Some(model), None, false) => non_empty("model", model),
                (None, Some(instance), false) => non_empty("instance_id", instance),
                (None, None, true) => Ok(()),
                _ => Err(WireError::bad_request(
                    "unload takes exactly one of \"model\", \"instance_id\" or \"all\": true",
                )),
            },
            Request::Chat(chat) => {
                non_empty("model", &chat.model)?;
                if let Some(t) = chat.temperature {
                    if !(0.0..=2.0).contains(&t) {
                        return Err(WireError::bad_request(format!(
                            "\"temperature\" must be between 0 and 2, got {t}"
                        )));
                    }
                }
                match &chat.previous_response_id {
                    Some(prev) if !prev.starts_with("resp_") => Err(WireError::bad_request(
                        "\"previous_response_id\" must start with \"resp_\"",
                    )),
                    _ => Ok(()),
                }
            }
        }
    }
}
