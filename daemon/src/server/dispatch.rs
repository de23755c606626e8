//! One request to its terminal reply: each request type to its handler in `tasks`.

use std::future::Future;
use std::sync::Arc;

use super::*;
use lmsd_proto::{BatchDeleted, BatchJobList, BatchResults, Event};

/// Runs one request to its terminal reply and sends it to the client.
///
/// Not an `async fn`, and the chat and embed requests are lent to their handlers: an async
/// fn holds its arguments twice (as given, and moved into its body), and a queued task's
/// future is most of what it costs while it waits.
pub(super) fn dispatch(
    ctx: Arc<Context>,
    envelope: Envelope,
    sink: EventSink,
    cancel: CancellationToken,
) -> impl Future<Output = ()> {
    let Envelope { id, request, .. } = envelope;
    async move {
        let reply = answer(&ctx, id, &request, &sink, cancel).await;
        let _ = sink.replies.send(reply).await;
    }
}

/// A job's results: each line an event (none dropped: the client's queue is waited on), then
/// their count.
async fn batch_results(
    ctx: &Context,
    job: &str,
    sink: &EventSink,
) -> Result<Outcome, tasks::TaskError> {
    let mut lines = Vec::new();
    let count = ctx.batches.results(job, |line| lines.push(line))?;
    for line in lines {
        sink.send(Event::BatchLine { line }).await;
    }
    Ok(Outcome::BatchResults(BatchResults {
        job_id: job.to_owned(),
        lines: count,
    }))
}

/// The terminal reply to one request (the front door's dashboard asks through it too).
pub(crate) async fn answer(
    ctx: &Context,
    id: String,
    request: &Request,
    sink: &EventSink,
    cancel: CancellationToken,
) -> Reply {
    let outcome = match request {
        Request::Status => tasks::status(ctx).await.map(Outcome::Status),
        Request::Models => tasks::models(ctx).await.map(Outcome::Models),
        Request::Load(load) => tasks::load(ctx, load.clone()).await.map(Outcome::Load),
        Request::Unload(unload) => tasks::unload(ctx, unload.clone())
            .await
            .map(Outcome::Unload),
        Request::Pin(pin) => tasks::pin(ctx, pin.model.clone(), true)
            .await
            .map(Outcome::Pin),
        Request::Unpin(pin) => tasks::pin(ctx, pin.model.clone(), false)
            .await
            .map(Outcome::Pin),
        Request::Chat(chat) => tasks::chat(ctx, chat, sink, cancel)
            .await
            .map(Outcome::Chat),
        Request::Embed(embed) => tasks::embed(ctx, embed, sink, cancel)
            .await
            .map(Outcome::Embed),
        Request::Tasks => Ok(Outcome::Tasks(tasks::tasks(ctx))),
        Request::Cancel(cancel) => Ok(Outcome::Cancel(tasks::cancel(ctx, cancel.task_id.clone()))),
        Request::Sessions(sessions) => Ok(Outcome::Sessions(tasks::sessions(
            ctx,
            sessions.forget.clone(),
        ))),
        Request::Savings(savings) => Ok(Outcome::Savings(tasks::savings(ctx, savings.clone()))),
        Request::Fitness(fitness) => Ok(Outcome::Fitness(
            ctx.ledger.fitness(fitness.since.map(|s| s.0)),
        )),
        Request::Metrics => tasks::metrics(ctx).await.map(Outcome::Metrics),
        Request::Events => Err(tasks::events(ctx, sink, cancel).await),
        // Boxed, as the reload below: rare, and large beside a queued chat.
        Request::BatchSubmit(submit) => Box::pin(ctx.batches.submit(submit.clone(), None))
            .await
            .map(Outcome::Batch),
        Request::BatchStatus(status) => match &status.job_id {
            Some(job) => ctx.batches.status(job).map(Outcome::Batch),
            None => ctx
                .batches
                .list()
                .map(|jobs| Outcome::BatchList(BatchJobList { jobs })),
        },
        Request::BatchResults(job) => Box::pin(batch_results(ctx, &job.job_id, sink)).await,
        Request::BatchCancel(job) => ctx.batches.cancel(&job.job_id).map(Outcome::Batch),
        Request::BatchDelete(job) => ctx.batches.delete(&job.job_id).map(|deleted| {
            Outcome::BatchDeleted(BatchDeleted {
                job_id: job.job_id.clone(),
                deleted,
            })
        }),
        Request::Reload => {
            // Boxed: rare, and its future is the largest; every queued task would hold its room.
            return match Box::pin(ctx.reloader.reload()).await {
                Ok(outcome) => Reply::result(id, Outcome::Reload(outcome)),
                Err(message) => Reply::error(Some(id), WireError::bad_request(message)),
            };
        }
    };
    match outcome {
        Ok(outcome) => Reply::result(id, outcome),
        Err(error) => {
            let wire = error.to_wire();
            if matches!(
                wire.code,
                ErrorCode::BackendUnreachable | ErrorCode::BackendError | ErrorCode::Internal
            ) {
                tracing::warn!(request = %id, code = %wire.code, %error, "request failed");
            }
            Reply::error(Some(id), wire)
        }
    }
}
