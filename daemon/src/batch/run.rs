//! One line of a job, run as a task at `batch` priority and ended in the store: done with its
//! result, failed with its typed error, or back to pending when lmsd is stopping (it runs
//! again at the next start). And a stored line as a result line.

use lmsd_proto::{EmbedRequest, ErrorCode, Event, Priority, TaskOptions, WireError};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::lines::LineTask;
use super::store::{Claimed, LineRow};
use crate::backend::Endpoint;
use crate::tasks::{self, Context, EventSink, ForwardRequest, TaskError};

/// How a line ended.
enum End {
    Done {
        result: Value,
        tokens: (u64, u64),
    },
    Failed(WireError),
    /// Not run to its end (lmsd is stopping): pending again.
    Requeue,
}

fn batch_options() -> TaskOptions {
    TaskOptions {
        priority: Priority::Batch,
        tag: Some("batch".into()),
        ..TaskOptions::default()
    }
}

/// Starts a claimed line in the background; it ends itself in the store and wakes the runner.
pub(super) fn start(ctx: &Context, job: &str, line: Claimed) {
    let (ctx, job) = (ctx.clone(), job.to_owned());
    let cancel = {
        let mut runs = ctx.batches.runs();
        let Some(run) = runs.get_mut(&job) else {
            return;
        };
        *run.in_flight.entry(line.model.clone()).or_default() += 1;
        run.cancel.child_token()
    };
    tokio::spawn(async move {
        let end = match serde_json::from_str::<LineTask>(&line.task) {
            Ok(task) => run(&ctx, task, cancel).await,
            Err(e) => End::Failed(WireError::new(
                ErrorCode::Internal,
                format!("the stored line cannot be read: {e}"),
            )),
        };
        finish(&ctx, &job, &line, end);
        ctx.batches.wake.notify_one();
    });
}

/// Writes a line's end, counts it, and tells the `events` subscribers.
fn finish(ctx: &Context, job: &str, line: &Claimed, end: End) {
    let store = match ctx.batches.store() {
        Ok(store) => store,
        Err(_) => return,
    };
    // The runs' lock is not held across the write: other jobs' lines and the status readers
    // need it, and a write can wait on a long read of the store.
    let loads = ctx.batches.runs().get(job).map_or(0, |r| r.loads);
    let written = match &end {
        End::Done { result, tokens } => {
            store.finish(job, line.seq, Ok(&result.to_string()), *tokens, loads)
        }
        End::Failed(error) => store.finish(
            job,
            line.seq,
            Err(&serde_json::to_string(error).unwrap_or_default()),
            (0, 0),
            loads,
        ),
        End::Requeue => store.requeue(job, line.seq),
    };
    let mut runs = ctx.batches.runs();
    let Some(run) = runs.get_mut(job) else {
        return;
    };
    if let Some(n) = run.in_flight.get_mut(&line.model) {
        *n = n.saturating_sub(1);
    }
    if matches!(end, End::Requeue) || written.is_err() {
        // A line back to pending (or left running to be): the counts are read again.
        run.pending = None;
        run.pending_stale = true;
    }
    match written {
        Err(error) => {
            // Nothing is lost: the line is still `running` in the store and runs again when
            // the job resumes.
            tracing::error!(job = %job, %error, "batch job paused");
            run.paused = Some(error.to_string());
        }
        Ok(()) => {
            match end {
                End::Done { .. } => run.done += 1,
                End::Failed(_) => run.failed += 1,
                End::Requeue => return,
            }
            run.finished += 1;
            ctx.observers.emit(Event::BatchProgress {
                job_id: job.to_owned(),
                done: run.done,
                failed: run.failed,
                total: run.total,
            });
        }
    }
}

/// Runs one line's task to its end.
async fn run(ctx: &Context, task: LineTask, cancel: CancellationToken) -> End {
    // A line's events have no one to go to.
    let (replies, _) = mpsc::channel(1);
    let sink = EventSink {
        id: "batch".into(),
        replies,
    };
    let result: Result<(Value, (u64, u64)), TaskError> = match task {
        LineTask::Chat { request } => {
            tasks::chat(ctx, &request, &sink, cancel)
                .await
                .map(|outcome| {
                    let tokens = (
                        outcome.usage.input_tokens,
                        outcome.usage.total_output_tokens,
                    );
                    (serde_json::to_value(outcome).unwrap_or_default(), tokens)
                })
        }
        LineTask::ChatCompletion { mut body } => {
            let model = model_of(ctx, &body);
            match tasks::response_format_contract(&mut body) {
                Err(wire) => return End::Failed(wire),
                Ok(contract) => {
                    let request = ForwardRequest {
                        endpoint: Endpoint::ChatCompletions,
                        model,
                        body,
                        stream: false,
                        contract,
                        options: batch_options(),
                    };
                    tasks::forward(ctx, &request, None, cancel)
                        .await
                        .map(|outcome| (outcome.reply, (outcome.usage.input, outcome.usage.output)))
                }
            }
        }
        LineTask::Embedding { body } => {
            let input = match &body["input"] {
                Value::String(text) => vec![text.clone()],
                Value::Array(texts) => texts
                    .iter()
                    .filter_map(|t| t.as_str().map(str::to_owned))
                    .collect(),
                _ => Vec::new(),
            };
            let request = EmbedRequest {
                model: model_of(ctx, &body),
                input,
                options: batch_options(),
            };
            tasks::embed(ctx, &request, &sink, cancel).await.map(|outcome| {
                let data: Vec<Value> = outcome
                    .embeddings
                    .iter()
                    .enumerate()
                    .map(|(index, e)| json!({"object": "embedding", "embedding": e, "index": index}))
                    .collect();
                let reply = json!({"object": "list", "data": data, "model": outcome.task.model,
                    "usage": {"prompt_tokens": 0, "total_tokens": 0}});
                (reply, (0, 0))
            })
        }
    };
    match result {
        Ok((result, tokens)) => End::Done { result, tokens },
        Err(error) => {
            let wire = error.to_wire();
            // Stopping, lmsd leaves the line for its next start, not failed.
            if wire.code == ErrorCode::ShuttingDown || ctx.stopping.is_cancelled() {
                End::Requeue
            } else {
                End::Failed(wire)
            }
        }
    }
}

/// An OpenAI line's model, through `[routing] aliases` as on the front door.
fn model_of(ctx: &Context, body: &Value) -> String {
    let asked = body["model"].as_str().unwrap_or("auto");
    let config = ctx.config.borrow();
    config.routing.alias_for(asked).unwrap_or(asked).to_owned()
}

/// A stored line as `batch results` gives it: `id`, then `result` and `usage`, or `error`,
/// or `state` for a line not yet ended.
pub(super) fn result_line(line: &LineRow) -> Value {
    let parse = LineRow::json;
    match line.state.as_str() {
        "done" => json!({"id": line.custom_id, "result": parse(&line.result),
            "usage": {"input_tokens": line.input_tokens, "output_tokens": line.output_tokens}}),
        "failed" => json!({"id": line.custom_id, "error": parse(&line.error)}),
        "cancelled" => json!({"id": line.custom_id, "error": {"code": "cancelled",
            "message": "the job was cancelled before this line ran"}}),
        state => json!({"id": line.custom_id, "state": state}),
    }
}
