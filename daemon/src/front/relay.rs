//! Runs a relayed request and answers its client: a whole reply, or the engine's stream as it
//! comes. A stream's HTTP status waits for its first event, so a request refused or failed
//! before the engine answered (a full queue, an unknown model, a body the engine refused) gets
//! a real error status in the caller's shape; an error after that is the format's own error
//! event. A client that hangs up cancels its task, queued or running.

use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use lmsd_proto::WireError;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::{Dialect, Front};
use crate::backend::Frame;
use crate::tasks::{self, ForwardOutcome, ForwardRequest, TaskError};

/// Runs a request whose reply comes whole. The task runs on its own, so that a client that
/// hangs up (dropping this future) cancels it and it still ends as tasks do: answered
/// `cancelled`, in the ledger and the metrics.
pub(super) async fn whole(
    front: &Front,
    request: ForwardRequest,
) -> Result<ForwardOutcome, WireError> {
    let cancel = CancellationToken::new();
    let _cancel_on_drop = cancel.clone().drop_guard();
    let ctx = front.ctx.clone();
    let task = tokio::spawn(async move { tasks::forward(&ctx, &request, None, cancel).await });
    match task.await {
        Ok(result) => result.map_err(|e| e.to_wire()),
        Err(_) => Err(WireError::new(
            lmsd_proto::ErrorCode::Internal,
            "the relay task failed",
        )),
    }
}

/// Which format a stream is in: what of the engine's events its client hears, and how it ends.
#[derive(Debug, Clone)]
pub(super) enum Shape {
    /// OpenAI chat chunks; lmsd always asks for the usage chunk (the ledger counts it), and
    /// passes it on only to a client that asked too.
    Chat {
        include_usage: bool,
    },
    /// The response a stream continues, which the engine did not see (lmsd sent it the
    /// conversation whole) and its events are to name.
    Responses {
        continues: Option<String>,
    },
    Messages,
}

impl Shape {
    fn dialect(&self) -> Dialect {
        match self {
            Shape::Chat { .. } | Shape::Responses { .. } => Dialect::OpenAi,
            Shape::Messages => Dialect::Anthropic,
        }
    }

    /// The last event of a stream in this format: once the client has it, it has the whole
    /// answer, and may hang up without cancelling what follows (the response kept, the ledger).
    fn ends(&self, frame: &Frame) -> bool {
        match self {
            Shape::Chat { .. } => false,
            Shape::Responses { .. } => matches!(
                frame.event.as_deref(),
                Some("response.completed" | "response.incomplete" | "response.failed")
            ),
            Shape::Messages => frame.event.as_deref() == Some("message_stop"),
        }
    }

    fn keeps(&self, frame: &Frame) -> bool {
        match self {
            Shape::Chat {
                include_usage: false,
            } => {
                // The usage-only chunk: no choices, a usage object.
                !(frame.data.contains("\"usage\"")
                    && serde_json::from_str::<Value>(&frame.data).is_ok_and(|chunk| {
                        chunk["usage"].is_object()
                            && chunk["choices"].as_array().is_some_and(Vec::is_empty)
                    }))
            }
            _ => true,
        }
    }

    /// A frame as the client is to hear it: a Responses event's response names the one it
    /// continues.
    fn edited(&self, mut frame: Frame) -> Frame {
        let Shape::Responses {
            continues: Some(previous),
        } = self
        else {
            return frame;
        };
        if !frame.data.contains("\"response\"") {
            return frame;
        }
        if let Ok(mut data) = serde_json::from_str::<Value>(&frame.data) {
            if let Some(response) = data.get_mut("response").and_then(Value::as_object_mut) {
                response.insert("previous_response_id".into(), json!(previous));
                frame.data = data.to_string();
            }
        }
        frame
    }

    /// What follows the last event of a stream that ended well.
    fn trailer(&self) -> &'static str {
        match self {
            Shape::Chat { .. } => "data: [DONE]\n\n",
            Shape::Responses { .. } | Shape::Messages => "",
        }
    }

    /// The format's own error event, for a stream that broke after it began.
    fn error_event(&self, wire: &WireError) -> String {
        let frame = match self {
            Shape::Chat { .. } => Frame {
                event: None,
                data: self.dialect().error_body(wire, None).to_string(),
            },
            Shape::Responses { .. } => Frame {
                event: Some("error".into()),
                data: json!({"type": "error", "code": wire.code, "message": wire.message, "param": null})
                    .to_string(),
            },
            Shape::Messages => Frame {
                event: Some("error".into()),
                data: self.dialect().error_body(wire, None).to_string(),
            },
        };
        frame.to_sse() + self.trailer()
    }
}

type Running = JoinHandle<Result<ForwardOutcome, TaskError>>;

/// A stream's state as its body is read: the first event (already taken), the rest as the task
/// sends them, then its end. The guard cancels the task if the client goes away first.
struct Tail {
    first: Option<Frame>,
    frames: mpsc::Receiver<Frame>,
    task: Option<Running>,
    shape: Shape,
    /// Disarmed once the last event is out.
    cancel_on_drop: Option<DropGuard>,
}

/// Runs a streamed request; `after` sees its outcome once it ended well (before the client
/// hears the end).
pub(super) async fn stream(
    front: &Front,
    shape: Shape,
    request: ForwardRequest,
    after: impl FnOnce(&ForwardOutcome) + Send + 'static,
) -> Response {
    let (sender, mut frames) = mpsc::channel::<Frame>(64);
    let cancel = CancellationToken::new();
    let guard = cancel.clone().drop_guard();
    let ctx = front.ctx.clone();
    let task: Running = tokio::spawn(async move {
        let result = tasks::forward(&ctx, &request, Some(&sender), cancel).await;
        drop(sender);
        if let Ok(outcome) = &result {
            after(outcome);
        }
        result
    });
    // The first event, or the task's end: a task that ended before any event (refused,
    // failed, or the engine said nothing) answers with a status of its own.
    let first = match frames.recv().await {
        Some(frame) => frame,
        None => {
            return match task.await {
                Ok(Err(error)) => shape.dialect().error(error.to_wire()),
                Ok(Ok(_)) => sse_response(Body::from(shape.trailer())),
                Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
            }
        }
    };
    let tail = Tail {
        first: Some(first),
        frames,
        task: Some(task),
        shape,
        cancel_on_drop: Some(guard),
    };
    let body = futures_util::stream::unfold(tail, |mut tail| async move {
        let piece = tail.next().await?;
        Some((Ok::<_, Infallible>(Bytes::from(piece)), tail))
    });
    sse_response(Body::from_stream(body))
}

fn sse_response(body: Body) -> Response {
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(body)
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

impl Tail {
    /// The next piece of the body, `None` at its end.
    async fn next(&mut self) -> Option<String> {
        loop {
            let frame = match self.first.take() {
                Some(frame) => Some(frame),
                None if self.task.is_some() => self.frames.recv().await,
                None => return None,
            };
            match frame {
                Some(frame) if self.shape.keeps(&frame) => {
                    if self.shape.ends(&frame) {
                        if let Some(guard) = self.cancel_on_drop.take() {
                            guard.disarm();
                        }
                    }
                    return Some(self.shape.edited(frame).to_sse());
                }
                Some(_) => continue,
                // Every event is out: the task's end decides how the stream ends.
                None => {
                    let ended = self.task.take()?.await;
                    let end = match ended {
                        Ok(Ok(_)) => self.shape.trailer().to_owned(),
                        Ok(Err(error)) => self.shape.error_event(&error.to_wire()),
                        Err(_) => self.shape.error_event(&WireError::new(
                            lmsd_proto::ErrorCode::Internal,
                            "the relay task failed",
                        )),
                    };
                    if end.is_empty() {
                        return None;
                    }
                    return Some(end);
                }
            }
        }
    }
}
