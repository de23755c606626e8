//! The HTTP transport both engines' clients share: base URL, optional token, timeouts, and the
//! care a long-lived client needs with a server's keep-alive. LM Studio's server (Express on
//! Node) closes a connection after 5 s idle (`Keep-Alive: timeout=5`); a pool that keeps idle
//! connections longer writes requests onto sockets the server is closing. So idle connections
//! are dropped before the server's timeout (read from its header), a request that fails on an
//! open connection before any reply arrived is sent once more, and loads — which must never be
//! sent twice — always go on a fresh connection.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::errors::{decode_reply, BackendError};
use crate::config::{EngineConfig, EngineSection};

/// How long lmsd keeps an idle connection to the engine until a reply says how long the server
/// does: under Node's default of 5 s.
const DEFAULT_IDLE: Duration = Duration::from_secs(4);
/// A request written onto a connection the server had closed fails within this: only such a
/// failure is worth sending again.
const STALE_SOCKET_FAILS_WITHIN: Duration = Duration::from_secs(1);

/// Which limit a call runs under.
#[derive(Debug, Clone, Copy)]
pub enum Limit {
    /// Listing, unloading: quick calls.
    Control,
    /// Loads and chats, which can take minutes on large models.
    Request,
}

/// Server-sent events as they arrive.
pub type EventStream = futures_util::stream::BoxStream<
    'static,
    Result<eventsource_stream::Event, eventsource_stream::EventStreamError<reqwest::Error>>,
>;

/// A streamed call's response, with its HTTP status: events, or a plain body (an error, or a
/// server that ignored `stream`) for the caller to decode as its own reply type.
pub enum Opened {
    Events(u16, EventStream),
    Body(u16, Vec<u8>),
}

impl std::fmt::Debug for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Opened::Events(status, _) => write!(f, "Events(HTTP {status})"),
            Opened::Body(status, body) => write!(f, "Body(HTTP {status}, {} bytes)", body.len()),
        }
    }
}

/// The pooled client, rebuilt when the server's keep-alive is shorter than its idle timeout.
struct Pooled {
    client: reqwest::Client,
    idle: Duration,
}

/// Whether a request may be sent again after it failed before any reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resend {
    /// Once, on a fresh connection: the request cannot have reached the server twice in a way
    /// that matters (a read, a chat, an unload that is verified anyway).
    Once,
    /// Never: a load sent twice makes a second instance (`key:2`).
    Never,
}

/// The transport both engines' clients use: base URL, optional bearer token, timeouts.
#[derive(Clone)]
pub struct Http {
    pooled: Arc<RwLock<Pooled>>,
    /// For loads: no idle connections, so a load never lands on a socket the server is closing.
    fresh: reqwest::Client,
    connect_timeout: Duration,
    /// The engine's URL as configured, for messages.
    base: String,
    /// The same, parsed once: each call only sets its path.
    url: reqwest::Url,
    token: Option<String>,
    control_timeout: Duration,
    request_timeout: Duration,
}

impl std::fmt::Debug for Http {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Http")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

fn build_client(
    connect_timeout: Duration,
    idle: Duration,
    max_idle: usize,
) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .connect_timeout(connect_timeout)
        .pool_idle_timeout(idle)
        .pool_max_idle_per_host(max_idle)
        // The engines' APIs do not redirect; following costs time on every call.
        .redirect(reqwest::redirect::Policy::none())
        .build()
}

/// The idle time to keep under a server's `Keep-Alive: timeout=N` (seconds): a second less, or
/// half of it when that is shorter.
fn idle_under(header: &str) -> Option<Duration> {
    let seconds: u64 = header.split(',').find_map(|part| {
        let (key, value) = part.split_once('=')?;
        (key.trim().eq_ignore_ascii_case("timeout"))
            .then(|| value.trim().parse().ok())
            .flatten()
    })?;
    let timeout = Duration::from_secs(seconds);
    Some(timeout.saturating_sub(Duration::from_secs(1).min(timeout / 2)))
}

impl Http {
    pub fn new<S: EngineSection>(
        config: &EngineConfig<S>,
        token: Option<String>,
    ) -> Result<Http, BackendError> {
        let unusable = |detail: String| BackendError::Unreachable {
            url: config.url.clone(),
            detail,
        };
        let build = |idle, max_idle| {
            build_client(config.connect_timeout, idle, max_idle)
                .map_err(|e| unusable(format!("cannot build an HTTP client: {e}")))
        };
        let base = config.url.trim_end_matches('/').to_owned();
        let url = reqwest::Url::parse(&base).map_err(|e| unusable(format!("not a URL: {e}")))?;
        Ok(Http {
            pooled: Arc::new(RwLock::new(Pooled {
                client: build(DEFAULT_IDLE, usize::MAX)?,
                idle: DEFAULT_IDLE,
            })),
            fresh: build(Duration::ZERO, 0)?,
            connect_timeout: config.connect_timeout,
            base,
            url,
            token,
            control_timeout: config.control_timeout,
            request_timeout: config.request_timeout,
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn timeout(&self, limit: Limit) -> Duration {
        match limit {
            Limit::Control => self.control_timeout,
            Limit::Request => self.request_timeout,
        }
    }

    fn client(&self) -> reqwest::Client {
        self.pooled
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .client
            .clone()
    }

    /// Follows the server's `Keep-Alive` header: idle connections must close on lmsd's side
    /// first. Rebuilding the client drops its pooled connections, which is what we want.
    fn heed_keep_alive(&self, headers: &reqwest::header::HeaderMap) {
        let Some(idle) = headers
            .get("keep-alive")
            .and_then(|v| v.to_str().ok())
            .and_then(idle_under)
        else {
            return;
        };
        if idle >= self.pooled.read().unwrap_or_else(|e| e.into_inner()).idle {
            return;
        }
        let mut pooled = self.pooled.write().unwrap_or_else(|e| e.into_inner());
        if idle < pooled.idle {
            if let Ok(client) = build_client(self.connect_timeout, idle, usize::MAX) {
                tracing::info!(
                    url = %self.base,
                    idle_ms = idle.as_millis() as u64,
                    "the engine closes idle connections sooner than lmsd kept them; keeping them shorter"
                );
                *pooled = Pooled { client, idle };
            }
        }
    }

    fn transport_error(&self, error: &reqwest::Error, timeout: Duration) -> BackendError {
        if error.is_timeout() {
            return BackendError::Timeout { after: timeout };
        }
        // The innermost cause says what happened ("Connection refused"), not reqwest's wrapper.
        let mut detail = error.to_string();
        let mut source = std::error::Error::source(error);
        while let Some(cause) = source {
            detail = cause.to_string();
            source = cause.source();
        }
        let url = self.base.clone();
        if error.is_connect() {
            BackendError::Unreachable { url, detail }
        } else {
            BackendError::ReplyLost { url, detail }
        }
    }

    fn request(
        &self,
        client: &reqwest::Client,
        method: reqwest::Method,
        path: &str,
        limit: Limit,
    ) -> reqwest::RequestBuilder {
        // Parsing the whole URL on every call was a tenth of lmsd's work per chat.
        let mut url = self.url.clone();
        let prefix = self.url.path().trim_end_matches('/');
        url.set_path(&format!("{prefix}{path}"));
        let request = client.request(method, url).timeout(self.timeout(limit));
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// Sends `request` and returns the response head. A request that failed on an open
    /// connection before any reply arrived (the server closed it as the request went out) is
    /// sent once more when `resend` allows; connect errors and timeouts are not.
    async fn open(
        &self,
        request: reqwest::RequestBuilder,
        limit: Limit,
        resend: Resend,
    ) -> Result<reqwest::Response, BackendError> {
        let timeout = self.timeout(limit);
        let again = match resend {
            Resend::Once => request.try_clone(),
            Resend::Never => None,
        };
        let sent = std::time::Instant::now();
        let response = match request.send().await {
            Ok(response) => response,
            // A socket the server had closed fails at once; a connection that broke later,
            // during a long generation, is not resent (that would be a second generation).
            Err(error) => match again {
                Some(again)
                    if !error.is_timeout()
                        && !error.is_connect()
                        && sent.elapsed() < STALE_SOCKET_FAILS_WITHIN =>
                {
                    tracing::debug!(url = %self.base, error = %self.transport_error(&error, timeout), "request failed before any reply; sending it once more");
                    again
                        .send()
                        .await
                        .map_err(|e| self.transport_error(&e, timeout))?
                }
                _ => return Err(self.transport_error(&error, timeout)),
            },
        };
        self.heed_keep_alive(response.headers());
        Ok(response)
    }

    async fn send<T: DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
        limit: Limit,
        resend: Resend,
    ) -> Result<T, BackendError> {
        let response = self.open(request, limit, resend).await?;
        let status = response.status().as_u16();
        let body = response
            .bytes()
            .await
            .map_err(|e| self.transport_error(&e, self.timeout(limit)))?;
        decode_reply(status, &body)
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, BackendError> {
        let request = self.request(&self.client(), reqwest::Method::GET, path, Limit::Control);
        self.send(request, Limit::Control, Resend::Once).await
    }

    pub async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
        limit: Limit,
    ) -> Result<T, BackendError> {
        let request = self.request(&self.client(), reqwest::Method::POST, path, limit);
        self.send(request.json(body), limit, Resend::Once).await
    }

    /// Posts a load, on a fresh connection and never twice: a load whose reply was lost may
    /// still finish on the engine, and sending it again would make a second instance.
    pub async fn post_load<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
    ) -> Result<T, BackendError> {
        let request = self.request(&self.fresh, reqwest::Method::POST, path, Limit::Request);
        self.send(request.json(body), Limit::Request, Resend::Never)
            .await
    }

    /// Posts `body` and opens the reply as a server-sent event stream.
    pub async fn post_stream(
        &self,
        path: &str,
        body: &impl Serialize,
    ) -> Result<Opened, BackendError> {
        use eventsource_stream::Eventsource;
        use futures_util::StreamExt;
        let request = self.request(&self.client(), reqwest::Method::POST, path, Limit::Request);
        let response = self
            .open(request.json(body), Limit::Request, Resend::Once)
            .await?;
        let status = response.status().as_u16();
        let is_sse = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if is_sse {
            Ok(Opened::Events(
                status,
                response.bytes_stream().eventsource().boxed(),
            ))
        } else {
            let bytes = response
                .bytes()
                .await
                .map_err(|e| self.transport_error(&e, self.timeout(Limit::Request)))?;
            Ok(Opened::Body(status, bytes.to_vec()))
        }
    }

    /// The error for a broken event stream.
    pub fn stream_broke(&self, error: impl std::fmt::Display) -> BackendError {
        // A parse error quotes the stream it could not read, which is the model's output: only
        // its first words may reach a log.
        let error = error.to_string();
        let said = error.split(" at: ").next().unwrap_or_default();
        BackendError::ReplyLost {
            url: self.base.clone(),
            detail: format!("the event stream broke: {}", super::errors::clipped(said)),
        }
    }

    /// `POST /v1/embeddings`, OpenAI's shape: the vectors in input order, and the model the
    /// reply says answered (see [`same_model`]).
    pub async fn embeddings(
        &self,
        model: &str,
        input: &[String],
    ) -> Result<(Vec<Vec<f64>>, Option<String>), BackendError> {
        #[derive(Deserialize)]
        struct Item {
            embedding: Vec<f64>,
            #[serde(default)]
            index: usize,
        }
        #[derive(Deserialize)]
        struct EmbeddingsReply {
            data: Vec<Item>,
            #[serde(default)]
            model: Option<String>,
        }
        let body = serde_json::json!({ "model": model, "input": input });
        let mut reply: EmbeddingsReply = self.post("/v1/embeddings", &body, Limit::Request).await?;
        if reply.data.len() != input.len() {
            return Err(BackendError::Malformed {
                status: 200,
                detail: format!("{} embeddings for {} inputs", reply.data.len(), input.len()),
            });
        }
        reply.data.sort_by_key(|item| item.index);
        Ok((
            reply.data.into_iter().map(|item| item.embedding).collect(),
            reply.model,
        ))
    }
}

/// Whether a reply's model name and the one asked for are the same model: LM Studio may add a
/// variant (`@q4_k_m`) or name another instance of it (`:2`), which serve the same weights.
/// LM Studio's compatible endpoints answer with whatever model is loaded when the named one is
/// gone (0.4.19): another model's reply is no answer (its vectors would silently poison an
/// index built with this one's).
pub fn same_model(asked: &str, answered: &str) -> bool {
    fn base(name: &str) -> &str {
        let name = name.split('@').next().unwrap_or(name);
        match name.rsplit_once(':') {
            Some((key, n)) if n.chars().all(|c| c.is_ascii_digit()) && !n.is_empty() => key,
            _ => name,
        }
    }
    asked == answered || base(asked).eq_ignore_ascii_case(base(answered))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_connections_close_before_the_server_closes_them() {
        assert_eq!(idle_under("timeout=5"), Some(Duration::from_secs(4)));
        assert_eq!(idle_under("timeout=1"), Some(Duration::from_millis(500)));
        assert_eq!(
            idle_under("max=100, timeout=30"),
            Some(Duration::from_secs(29))
        );
        assert_eq!(idle_under("max=100"), None);
        assert_eq!(idle_under("timeout=soon"), None);
    }

    #[test]
    fn a_variant_or_another_instance_is_the_same_model_another_key_is_not() {
        assert!(same_model("nomic-embed", "nomic-embed"));
        assert!(same_model("nomic-embed", "nomic-embed@q4_k_m"));
        assert!(same_model("nomic-embed:2", "nomic-embed"));
        assert!(!same_model("nomic-embed", "bge-small"));
        assert!(!same_model("qwen/qwen3-4b", "qwen/qwen3-vl-4b"));
    }
}
