//! One request to its terminal reply: each request type to its handler in `tasks`.

use super::*;

/// Runs one request to its terminal reply.
pub(super) async fn dispatch(
    ctx: &Context,
    envelope: Envelope,
    sink: &EventSink,
    cancel: CancellationToken,
) -> Reply {
    let Envelope { id, request, .. } = envelope;
    let outcome = match request {
        Request::Status => tasks::status(ctx).await.map(Outcome::Status),
        Request::Models => tasks::models(ctx).await.map(Outcome::Models),
        Request::Load(load) => tasks::load(ctx, load).await.map(Outcome::Load),
        Request::Unload(unload) => tasks::unload(ctx, unload).await.map(Outcome::Unload),
        Request::Pin(pin) => tasks::pin(ctx, pin.model, true).await.map(Outcome::Pin),
        Request::Unpin(pin) => tasks::pin(ctx, pin.model, false).await.map(Outcome::Pin),
        Request::Chat(chat) => tasks::chat(ctx, chat, sink, cancel)
            .await
            .map(Outcome::Chat),
        Request::Embed(embed) => tasks::embed(ctx, embed, sink, cancel)
            .await
            .map(Outcome::Embed),
        Request::Tasks => Ok(Outcome::Tasks(tasks::tasks(ctx))),
        Request::Cancel(request) => Ok(Outcome::Cancel(tasks::cancel(ctx, request.task_id))),
        Request::Sessions(request) => Ok(Outcome::Sessions(tasks::sessions(ctx, request.forget))),
        Request::Savings(request) => Ok(Outcome::Savings(tasks::savings(ctx, request))),
        Request::Metrics => tasks::metrics(ctx).await.map(Outcome::Metrics),
        Request::Events => Err(tasks::events(ctx, sink, cancel).await),
        Request::Reload => {
            return match ctx.reloader.reload().await {
                Ok(outcome) => Reply::result(id, Outcome::Reload(outcome)),
                Err(message) => Reply::error(Some(id), WireError::bad_request(message)),
            }
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
