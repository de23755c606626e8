//! A small client: connect to the daemon's socket, send a request, collect events and the result.

use std::path::{Path, PathBuf};

use interprocess::local_socket::tokio::{prelude::*, Stream};
use interprocess::local_socket::GenericFilePath;
use tokio::io::{BufReader, ReadHalf, WriteHalf};

use crate::codec::{write_line, Frame, LineReader};
use crate::error::WireError;
use crate::message::{
    ChatOutcome, ChatRequest, EmbedOutcome, EmbedRequest, Envelope, Event, LoadOutcome,
    LoadRequest, ModelList, Outcome, Reply, ReplyBody, Request, StatusReport, UnloadOutcome,
    UnloadRequest,
};
use crate::PROTOCOL_VERSION;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to lmsd at {path}: {source} (is lmsd running? start it with `lmsd`, or pass --socket)")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("connection to lmsd failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("lmsd closed the connection before answering")]
    Closed,
    #[error("lmsd sent a reply this client cannot read: {0}")]
    BadReply(String),
    /// The daemon answered with an error.
    #[error("{0}")]
    Remote(WireError),
}

/// One connection to lmsd. Requests on it run one after another; open several clients (or speak
/// the protocol directly) to have several in flight.
#[derive(Debug)]
pub struct Client {
    reader: LineReader<BufReader<ReadHalf<Stream>>>,
    writer: WriteHalf<Stream>,
    next_id: u64,
}

impl Client {
    pub async fn connect(path: &Path) -> Result<Self, ClientError> {
        let connect_error = |source| ClientError::Connect {
            path: path.to_owned(),
            source,
        };
        let name = path
            .to_fs_name::<GenericFilePath>()
            .map_err(connect_error)?;
        let stream = Stream::connect(name).await.map_err(connect_error)?;
        let (read, writer) = tokio::io::split(stream);
        Ok(Client {
            reader: LineReader::new(BufReader::new(read)),
            writer,
            next_id: 1,
        })
    }

    /// Sends `request` and waits for its result; events that come first go to `on_event`.
    pub async fn call(
        &mut self,
        request: Request,
        mut on_event: impl FnMut(&Event),
    ) -> Result<Outcome, ClientError> {
        let id = format!("c{}", self.next_id);
        self.next_id += 1;
        let envelope = Envelope {
            v: PROTOCOL_VERSION,
            id: id.clone(),
            request,
        };
        if let Err(error) = write_line(&mut self.writer, &envelope).await {
            // A daemon that refuses a connection writes why and closes before reading.
            if let Ok(Some(Frame::Line(line))) = self.reader.next_frame().await {
                if let Ok(Reply {
                    body: ReplyBody::Error { error },
                    ..
                }) = serde_json::from_slice(&line)
                {
                    return Err(ClientError::Remote(error));
                }
            }
            return Err(error.into());
        }
        loop {
            let line = match self.reader.next_frame().await? {
                Some(Frame::Line(line)) => line,
                Some(Frame::TooLong { len }) => {
                    return Err(ClientError::BadReply(format!(
                        "reply line of {len} bytes is too long"
                    )))
                }
                None => return Err(ClientError::Closed),
            };
            let reply: Reply =
                serde_json::from_slice(&line).map_err(|e| ClientError::BadReply(e.to_string()))?;
            // A reply without an id answers a line the daemon could not read at all: ours.
            if reply.id.as_deref().is_some_and(|reply_id| reply_id != id) {
                continue;
            }
            match reply.body {
                ReplyBody::Event(event) => on_event(&event),
                ReplyBody::Result(outcome) => return Ok(*outcome),
                ReplyBody::Error { error } => return Err(ClientError::Remote(error)),
            }
        }
    }

    /// Daemon, engine, instances and memory.
    pub async fn status(&mut self) -> Result<StatusReport, ClientError> {
        match self.call(Request::Status, |_| {}).await? {
            Outcome::Status(status) => Ok(status),
            other => Err(unexpected("status", &other)),
        }
    }

    /// The engine's catalogue, freshly read.
    pub async fn models(&mut self) -> Result<ModelList, ClientError> {
        match self.call(Request::Models, |_| {}).await? {
            Outcome::Models(list) => Ok(list),
            other => Err(unexpected("models", &other)),
        }
    }

    pub async fn load(&mut self, request: LoadRequest) -> Result<LoadOutcome, ClientError> {
        match self.call(Request::Load(request), |_| {}).await? {
            Outcome::Load(load) => Ok(load),
            other => Err(unexpected("load", &other)),
        }
    }

    pub async fn unload(&mut self, request: UnloadRequest) -> Result<UnloadOutcome, ClientError> {
        match self.call(Request::Unload(request), |_| {}).await? {
            Outcome::Unload(unload) => Ok(unload),
            other => Err(unexpected("unload", &other)),
        }
    }

    /// One chat turn; its events (deltas with `stream`, queue positions, loads) go to
    /// `on_event` as they come.
    pub async fn chat(
        &mut self,
        request: ChatRequest,
        on_event: impl FnMut(&Event),
    ) -> Result<ChatOutcome, ClientError> {
        match self.call(Request::Chat(request), on_event).await? {
            Outcome::Chat(chat) => Ok(chat),
            other => Err(unexpected("chat", &other)),
        }
    }

    pub async fn embed(&mut self, request: EmbedRequest) -> Result<EmbedOutcome, ClientError> {
        match self.call(Request::Embed(request), |_| {}).await? {
            Outcome::Embed(embed) => Ok(embed),
            other => Err(unexpected("embed", &other)),
        }
    }
}

/// A result of another kind than the request asked for.
fn unexpected(asked: &str, outcome: &Outcome) -> ClientError {
    let kind = serde_json::to_value(outcome)
        .ok()
        .and_then(|v| v.get("kind").and_then(|k| k.as_str()).map(str::to_owned))
        .unwrap_or_default();
    ClientError::BadReply(format!(
        "a {asked} request was answered with a {kind:?} result"
    ))
}
