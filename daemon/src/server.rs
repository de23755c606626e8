//! The socket server: binds the unix socket safely, reads request lines, runs each request as
//! its own task, and writes every reply on the connection it came from.

use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use interprocess::local_socket::tokio::{prelude::*, Listener, Stream};
use interprocess::local_socket::{GenericFilePath, ListenerOptions};
use interprocess::os::unix::local_socket::ListenerOptionsExt;
use lmsd_proto::codec::{write_line, Frame, LineReader, MAX_LINE};
use lmsd_proto::{parse_request, Envelope, ErrorCode, Outcome, Reply, Request, WireError};
use tokio::io::{BufReader, Interest};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::tasks::{self, Context, EventSink};

/// Replies waiting to be written on one connection. A client that stops reading holds up only
/// its own requests.
const REPLY_QUEUE: usize = 256;
/// Bytes read from a client at a time.
const READ_BUFFER: usize = 2048;

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("another lmsd is already serving on {0}; stop it first or choose another --socket")]
    InUse(PathBuf),
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("cannot create the socket directory {path}: {source}")]
    Dir { path: PathBuf, source: io::Error },
    #[error("cannot listen on {path}: {source}")]
    Listen { path: PathBuf, source: io::Error },
    #[error("the socket directory {0} is not private (it must be owned by this user, mode 0700); remove it or choose another --socket")]
    DirNotPrivate(PathBuf),
}

/// Binds the socket at `path`, in a 0700 directory (when lmsd creates it) with mode 0600. A stale
/// socket left by a crashed daemon is replaced; a live one is not. With `private_dir` (the
/// default location, in a shared `/tmp` on some systems) the directory must be this user's alone,
/// so that nobody can put a socket of theirs where clients look for lmsd's.
pub fn bind(path: &Path, private_dir: bool) -> Result<Listener, BindError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| BindError::Dir {
                path: dir.to_owned(),
                source,
            })?;
        if private_dir {
            use std::os::unix::fs::MetadataExt;
            let metadata = std::fs::metadata(dir).map_err(|source| BindError::Dir {
                path: dir.to_owned(),
                source,
            })?;
            if metadata.uid() != rustix::process::geteuid().as_raw() || metadata.mode() & 0o077 != 0
            {
                return Err(BindError::DirNotPrivate(dir.to_owned()));
            }
        }
    }
    if let Ok(metadata) = std::fs::symlink_metadata(path) {
        if !metadata.file_type().is_socket() {
            return Err(BindError::NotASocket(path.to_owned()));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(BindError::InUse(path.to_owned()));
        }
        tracing::info!(socket = %path.display(), "replacing a stale socket");
        std::fs::remove_file(path).map_err(|source| BindError::Listen {
            path: path.to_owned(),
            source,
        })?;
    }
    let listen_error = |source| BindError::Listen {
        path: path.to_owned(),
        source,
    };
    let name = path.to_fs_name::<GenericFilePath>().map_err(listen_error)?;
    ListenerOptions::new()
        .name(name)
        .mode(0o600)
        .create_tokio()
        .map_err(listen_error)
}

/// Who may use the daemon: its own user, and the users and group the config allows.
#[derive(Debug, Clone)]
pub struct PeerPolicy {
    pub own_uid: u32,
    pub allow_uids: Vec<u32>,
    pub allow_gid: Option<u32>,
}

impl PeerPolicy {
    /// Checks the connecting process's credentials (SO_PEERCRED); `Err` says why it is refused.
    fn check(&self, stream: &Stream) -> Result<(), String> {
        let creds = stream
            .peer_creds()
            .map_err(|e| format!("cannot read the peer's credentials: {e}"))?;
        let uid = creds.euid().ok_or("the peer's user is unknown")?;
        let in_group = self.allow_gid.is_some_and(|gid| {
            creds.egid() == Some(gid) || creds.groups().is_some_and(|groups| groups.contains(&gid))
        });
        if uid == self.own_uid || self.allow_uids.contains(&uid) || in_group {
            Ok(())
        } else {
            Err(format!(
                "user {uid} may not use this lmsd (it serves user {}); add the uid to [server] allow_uids to allow it",
                self.own_uid
            ))
        }
    }
}

/// How the server runs: limits, drain time and who may connect.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub max_connections: usize,
    pub grace: Duration,
    pub peers: PeerPolicy,
    /// A client that leaves a line unfinished, or does not read its replies, this long is cut off.
    pub client_timeout: Duration,
    /// A connection with nothing in flight and nothing received this long is closed.
    pub idle_timeout: Duration,
}

/// Writes one refusal line to a connection lmsd will not serve, and closes it.
fn refuse(connections: &TaskTracker, stream: Stream, error: WireError) {
    connections.spawn(async move {
        let (_, mut write) = tokio::io::split(stream);
        let refusal = Reply::error(None, error);
        let _ =
            tokio::time::timeout(Duration::from_secs(1), write_line(&mut write, &refusal)).await;
    });
}

/// Accepts connections until `shutdown`, then lets open requests finish for up to `grace`.
pub async fn serve(
    listener: Listener,
    ctx: Context,
    options: ServeOptions,
    shutdown: CancellationToken,
) {
    let connections = TaskTracker::new();
    // Cancelled when the shutdown grace runs out: the tasks still running are answered.
    let abort = CancellationToken::new();
    let slots = Arc::new(Semaphore::new(options.max_connections));
    let limits = Limits {
        client_timeout: options.client_timeout,
        idle_timeout: options.idle_timeout,
    };
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(stream) => stream,
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    continue;
                }
            },
        };
        if let Err(reason) = options.peers.check(&stream) {
            tracing::warn!(%reason, "connection refused");
            refuse(
                &connections,
                stream,
                WireError::new(ErrorCode::PermissionDenied, reason),
            );
            continue;
        }
        // At the limit a new client hears so at once, rather than hanging unserved.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(
                max = options.max_connections,
                "connection refused: at the connection limit"
            );
            let message = format!(
                "lmsd serves its maximum of {} connections; close idle ones or raise [server] max_connections",
                options.max_connections
            );
            refuse(
                &connections,
                stream,
                WireError::new(ErrorCode::QueueFull, message),
            );
            continue;
        };
        // On unix the local socket is a Unix stream socket: serve it as one, for readiness
        // checks (has the client hung up?) that the generic type does not offer.
        let interprocess::local_socket::tokio::Stream::UdSocket(stream) = stream;
        let stream = UnixStream::from(stream);
        let ctx = ctx.clone();
        let shutdown = shutdown.clone();
        let gone = abort.child_token();
        connections.spawn(async move {
            serve_connection(stream, ctx, shutdown, gone, limits).await;
            drop(slot);
        });
    }
    // Dropping the listener removes the socket file: new clients get "not running" at once.
    drop(listener);
    connections.close();
    if tokio::time::timeout(options.grace, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            grace_s = options.grace.as_secs(),
            "tasks still running after the shutdown grace; ending them"
        );
        abort.cancel();
        // Their `shutting_down` answers take a moment to be written.
        let _ = tokio::time::timeout(Duration::from_secs(2), connections.wait()).await;
    }
}

/// Per-connection time limits.
#[derive(Debug, Clone, Copy)]
struct Limits {
    client_timeout: Duration,
    idle_timeout: Duration,
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

async fn serve_connection(
    stream: UnixStream,
    ctx: Context,
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
                let ctx = ctx.clone();
                let sink = EventSink {
                    id: envelope.id.clone(),
                    replies: replies.clone(),
                };
                let cancel = gone.child_token();
                requests.spawn(async move {
                    let reply = dispatch(&ctx, envelope, &sink, cancel).await;
                    let _ = sink.replies.send(reply).await;
                });
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

/// Runs one request to its terminal reply.
async fn dispatch(
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
