//! The socket server: binds the unix socket safely, accepts connections (checking each peer),
//! and hands each to `connection`, which reads its request lines, runs each request as its own
//! task through `dispatch`, and writes every reply on the connection it came from.

mod connection;
mod dispatch;
pub(crate) use dispatch::answer;

use connection::{serve_connection, Limits};

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
    // One context for all: a request's task holds a pointer to it, not a copy.
    let ctx = Arc::new(ctx);
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
