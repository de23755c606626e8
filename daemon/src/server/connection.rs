//! One connection: its request lines in, each request run as its own task, its replies out on
//! one writer; time limits for clients that stall, and hang-up detection.

use super::dispatch::dispatch;
use super::*;

/// Per-connection time limits.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    pub(super) client_timeout: Duration,
    pub(super) idle_timeout: Duration,
}

/// How often a client that stopped sending is checked for having hung up entirely.
const HANGUP_CHECK: Duration = Duration::from_millis(200);

/// True when the peer has closed its end completely (not just its sending side).
fn hung_up(stream: &UnixStream) -> bool {
    use futures_util::FutureExt;
    stream
        .ready(Interest::WRITABLE)
        .now_or_never()
        .is_some_and(|ready| ready.map_or(true, |r| r.is_write_closed()))
}

pub(super) async fn serve_connection(
    stream: UnixStream,
    ctx: Arc<Context>,
    shutdown: CancellationToken,
    gone: CancellationToken,
    limits: Limits,
) {
    let (read, mut write) = stream.into_split();
    let (replies, mut outbox) = mpsc::channel::<Reply>(REPLY_QUEUE);
    // `gone`: cancelled when the client is gone (or the grace ran out); its tasks end with it.
    let writer = tokio::spawn({
        let gone = gone.clone();
        async move {
            while let Some(reply) = outbox.recv().await {
                match tokio::time::timeout(limits.client_timeout, write_line(&mut write, &reply))
                    .await
                {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => {
                        tracing::debug!(%error, "client went away; cancelling its tasks");
                        gone.cancel();
                        break;
                    }
                    Err(_) => {
                        tracing::warn!(
                            timeout_s = limits.client_timeout.as_secs(),
                            "client does not read its replies; cutting it off"
                        );
                        gone.cancel();
                        break;
                    }
                }
            }
        }
    });
    // Most request lines are small; a longer one just takes more reads. (The default 8 KiB, per
    // connection, was most of what an idle connection costs.)
    let mut lines = LineReader::new(BufReader::with_capacity(READ_BUFFER, read));
    let mut requests = JoinSet::new();
    // Once stopping, new requests are refused with `shutting_down` until the accepted ones end.
    let mut stopping = false;
    let mut last_activity = tokio::time::Instant::now();
    // Reading a line may start and stall inside one read: re-check the limits now and then.
    let mut recheck = tokio::time::interval(limits.client_timeout.min(limits.idle_timeout) / 4);
    recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let partial = lines.partial_since().map(tokio::time::Instant::from_std);
        let frame = tokio::select! {
            frame = lines.next_frame() => frame,
                        _ = gone.cancelled() => break,
            _ = recheck.tick() => continue,
            _ = tokio::time::sleep_until(partial.unwrap_or(last_activity) + limits.client_timeout), if partial.is_some() => {
                tracing::warn!(timeout_s = limits.client_timeout.as_secs(), "client left a request line unfinished; cutting it off");
                break;
            }
            _ = tokio::time::sleep_until(last_activity + limits.idle_timeout), if partial.is_none() && requests.is_empty() => {
                tracing::info!(idle_s = limits.idle_timeout.as_secs(), "closing an idle connection");
                break;
            }
            _ = shutdown.cancelled(), if !stopping => {
                stopping = true;
                continue;
            }
            // Reap finished requests so a long-lived connection does not accumulate them.
            _ = requests.join_next(), if !requests.is_empty() => continue,
            _ = std::future::ready(()), if stopping && requests.is_empty() => break,
        };
        last_activity = tokio::time::Instant::now();
        let line = match frame {
            Ok(Some(Frame::Line(line))) => line,
            Ok(Some(Frame::TooLong { len })) => {
                let error = WireError::bad_request(format!(
                    "request line of {len} bytes exceeds the limit of {MAX_LINE} bytes"
                ));
                if replies.send(Reply::error(None, error)).await.is_err() {
                    break;
                }
                continue;
            }
            Ok(None) => break,
            Err(error) => {
                tracing::debug!(%error, "connection read failed");
                break;
            }
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match parse_request(&line) {
            Err(rejection) => {
                if replies.send(rejection.into_reply()).await.is_err() {
                    break;
                }
            }
            Ok(envelope) if stopping => {
                let error = WireError::new(
                    ErrorCode::ShuttingDown,
                    "lmsd is shutting down and takes no new requests",
                );
                if replies
                    .send(Reply::error(Some(envelope.id), error))
                    .await
                    .is_err()
                {
                    break;
                }
            }
            Ok(envelope) => {
                let sink = EventSink {
                    id: envelope.id.clone(),
                    replies: replies.clone(),
                };
                requests.spawn(dispatch(ctx.clone(), envelope, sink, gone.child_token()));
            }
        }
    }
    // The client stopped sending. Accepted requests still get their answers (a client may
    // half-close and wait), unless it hangs up entirely: then its tasks are cancelled.
    let mut check = tokio::time::interval(HANGUP_CHECK);
    loop {
        tokio::select! {
            next = requests.join_next() => if next.is_none() { break },
            _ = check.tick(), if !gone.is_cancelled() => {
                if hung_up(lines.get_ref().get_ref().as_ref()) {
                    tracing::debug!("client hung up; cancelling its tasks");
                    gone.cancel();
                }
            }
        }
    }
    drop(replies);
    let _ = writer.await;
}
