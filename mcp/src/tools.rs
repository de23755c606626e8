//! The tools agents call: `local_task`, `local_embed`, `local_models`, `local_status`,
//! `local_savings` (and in `batch`, `local_batch` and `local_batch_status`) — each one or a
//! few requests to lmsd over its socket, answered with a
//! receipt, or with a one-line error that tells the agent what to do instead.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use lmsd_proto::{
    ChatOutcome, ChatRequest, Client, ClientError, EmbedRequest, ErrorCode, Event, ModelKind,
    Outcome, Request, SavingsReport, SavingsRequest, TaskOptions, WireDuration,
};
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{
    CallToolResult, ContentBlock, Implementation, ProgressNotificationParam, RequestMetaObject,
    ServerCapabilities, ServerConfig,
};
use rmcp::{tool, tool_handler, tool_router, ErrorData, Peer, RoleServer, ServerHandler};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::files::{Access, Content};

/// How often a call that is still waiting says so (MCP clients give up on silent calls).
const HEARTBEAT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct LocalTools {
    socket: PathBuf,
    /// Where files may be read when the client names no roots: the directory lmsd-mcp started
    /// in, then the `--allow-dir`s.
    files: Access,
    /// The `--allow-dir`s alone, added to the client's roots when it names them.
    allowed: Vec<PathBuf>,
    today: std::sync::Arc<tokio::sync::Mutex<Option<Today>>>,
    tool_router: ToolRouter<Self>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct TaskParams {
    /// What to do, e.g. "Summarise in three bullets" or "Extract the invoice fields".
    pub instruction: String,
    /// Text to work on.
    pub text: Option<String>,
    /// Files to work on (paths or globs under the allowed directories). lmsd-mcp reads them
    /// itself: their contents never enter your context.
    pub files: Option<Vec<String>>,
    /// A model key from local_models, or "auto" (the default: lmsd chooses).
    pub model: Option<String>,
    /// System prompt.
    pub system: Option<String>,
    pub max_output_tokens: Option<u32>,
    pub temperature: Option<f64>,
    /// Continue the conversation kept under this name.
    pub session: Option<String>,
    /// The answer must be JSON valid against this JSON Schema (returned as structured content).
    pub schema: Option<Value>,
    /// The answer must be exactly one of these labels.
    pub choices: Option<Vec<String>>,
    /// Send image files (png, jpg, webp, gif) among `files` as images, to a vision model.
    pub vision: Option<bool>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct EmbedParams {
    /// Texts to embed.
    pub texts: Vec<String>,
    /// With a query: the texts come back ranked by similarity to it, not as vectors.
    pub query: Option<String>,
    /// An embedding model's key, or "auto" (the default).
    pub model: Option<String>,
}

/// What a failed call tells the agent: one line, with what to do.
pub(crate) fn failure(error: &ClientError) -> CallToolResult {
    let line = match error {
        ClientError::Connect { .. } => "lmsd is not running — do this task yourself".to_owned(),
        ClientError::Remote(wire) => {
            let advice = match wire.code {
                ErrorCode::BackendUnreachable => "the local engine is down — do this task yourself",
                ErrorCode::ModelNotFound => {
                    "no local model fits — name one from local_models, or do it yourself"
                }
                ErrorCode::OutOfMemory | ErrorCode::BudgetExceeded => {
                    "no memory for that model — try a smaller one, or do it yourself"
                }
                ErrorCode::DeadlineExceeded | ErrorCode::QueueFull => {
                    "lmsd is too busy — do this task yourself"
                }
                ErrorCode::OutputInvalid => {
                    "no local model kept the schema or choices — do this task yourself"
                }
                ErrorCode::BadRequest => "fix the call",
                _ => "do this task yourself",
            };
            let problems = wire
                .invalid_output
                .as_ref()
                .map(|i| format!(" ({})", i.errors.join("; ")))
                .unwrap_or_default();
            format!("{advice}: {} {}{problems}", wire.code, wire.message)
        }
        other => format!("lmsd failed ({other}) — do this task yourself"),
    };
    CallToolResult::error(vec![ContentBlock::text(line)])
}

pub(crate) fn refused(line: String) -> CallToolResult {
    CallToolResult::error(vec![ContentBlock::text(line)])
}

/// Sends MCP progress for a call that has a progress token: lmsd's queue and load events as
/// they come, and a heartbeat while nothing else happens.
struct Progress {
    peer: Peer<RoleServer>,
    meta: RequestMetaObject,
    started: Instant,
    step: f64,
}

impl Progress {
    async fn say(&mut self, message: String) {
        let Some(token) = self.meta.get_progress_token() else {
            return;
        };
        self.step += 1.0;
        let _ = self
            .peer
            .notify_progress(ProgressNotificationParam::new(token, self.step).with_message(message))
            .await;
    }
}

fn describe(event: &Event) -> Option<String> {
    match event {
        Event::Queued { position, .. } => Some(format!("queued at position {position}")),
        Event::Load {
            model_instance_id,
            progress,
        } if *progress == 0.0 => Some(format!("loading {model_instance_id}")),
        Event::Load {
            model_instance_id, ..
        } => Some(format!("{model_instance_id} loaded; generating")),
        _ => None,
    }
}

impl LocalTools {
    pub fn new(socket: PathBuf, files: Access, allowed: Vec<PathBuf>) -> Self {
        LocalTools {
            socket,
            files,
            allowed,
            today: Default::default(),
            tool_router: Self::tool_router() + Self::batch_router(),
        }
    }

    /// The directories this call may read: the client's MCP roots when it offers them (and
    /// lists any on disk), with the `--allow-dir`s; else the defaults.
    // Roots are deprecated by the 2026 spec (SEP-2577), and still what today's agents send.
    #[allow(deprecated)]
    pub(crate) async fn access_for(&self, peer: &Peer<RoleServer>) -> Access {
        let offers_roots = peer
            .peer_info()
            .is_some_and(|info| info.capabilities.roots.is_some());
        if !offers_roots {
            return self.files.clone();
        }
        let Ok(listed) = peer.list_roots().await else {
            return self.files.clone();
        };
        let mut roots: Vec<PathBuf> = listed
            .roots
            .iter()
            .filter_map(|root| crate::files::path_of_file_uri(&root.uri))
            .filter_map(|path| path.canonicalize().ok())
            .collect();
        if roots.is_empty() {
            return self.files.clone();
        }
        roots.extend(self.allowed.iter().cloned());
        Access {
            roots,
            max_bytes: self.files.max_bytes,
        }
    }

    pub(crate) async fn connect(&self) -> Result<Client, ClientError> {
        Client::connect(&self.socket).await
    }

    /// One request, its events turned into progress, until it ends or the client cancels the
    /// call (then the connection closes, and lmsd cancels the task of a client that hung up).
    async fn call(
        &self,
        request: Request,
        mut progress: Progress,
        cancel: CancellationToken,
    ) -> Result<Outcome, ClientError> {
        let mut client = self.connect().await?;
        let (events, mut heard) = tokio::sync::mpsc::unbounded_channel();
        let answer = client.call(request, move |event| {
            if let Some(text) = describe(event) {
                let _ = events.send(text);
            }
        });
        tokio::pin!(answer);
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        heartbeat.tick().await;
        loop {
            tokio::select! {
                outcome = &mut answer => return outcome,
                Some(text) = heard.recv() => progress.say(text).await,
                _ = heartbeat.tick() => {
                    let waited = progress.started.elapsed().as_secs();
                    progress.say(format!("still running ({waited} s)")).await;
                }
                _ = cancel.cancelled() => {
                    return Err(ClientError::Remote(lmsd_proto::WireError::new(
                        ErrorCode::Cancelled,
                        "the call was cancelled",
                    )))
                }
            }
        }
    }

    /// Tokens, time, and what the task saved, with today's total. The day's sums come from
    /// lmsd's ledger at most every `TODAY_REFRESH` (reading it costs a file read in lmsd); in
    /// between, this server adds what its own tasks saved.
    async fn receipt(&self, chat: &ChatOutcome) -> String {
        let (input, output) = (chat.usage.input_tokens, chat.usage.total_output_tokens);
        let stale = {
            let today = self.today.lock().await;
            today
                .as_ref()
                .is_none_or(|t| t.read.elapsed() > TODAY_REFRESH)
        };
        if stale {
            if let Some(report) = self.read_today().await {
                *self.today.lock().await = Some(Today {
                    read: Instant::now(),
                    input_usd_per_mtok: report.input_usd_per_mtok,
                    output_usd_per_mtok: report.output_usd_per_mtok,
                    // The task just answered is in the ledger already, or will be in a moment.
                    usd_saved: report.totals.usd_saved,
                    counted_since_read: stale,
                });
            }
        }
        let mut today = self.today.lock().await;
        let money = match today.as_mut() {
            Some(today) => {
                let saved = (input as f64 * today.input_usd_per_mtok
                    + output as f64 * today.output_usd_per_mtok)
                    / 1e6;
                if !std::mem::take(&mut today.counted_since_read) {
                    today.usd_saved += saved;
                }
                format!(" — saved ≈ ${saved:.4} (today ${:.2})", today.usd_saved)
            }
            None => String::new(),
        };
        format!(
            "ran locally on {}: {input} tokens in, {output} out, {:.1} s{money}",
            chat.task.model,
            chat.task.total_ms as f64 / 1000.0
        )
    }

    async fn read_today(&self) -> Option<SavingsReport> {
        let mut client = self.connect().await.ok()?;
        let request = SavingsRequest {
            since: Some(WireDuration(Duration::from_secs(86_400))),
            by: None,
        };
        match client.call(Request::Savings(request), |_| {}).await {
            Ok(Outcome::Savings(report)) => Some(report),
            _ => None,
        }
    }
}

/// The day's savings as last read from lmsd, with this server's tasks added since.
#[derive(Debug)]
struct Today {
    read: Instant,
    input_usd_per_mtok: f64,
    output_usd_per_mtok: f64,
    usd_saved: f64,
    /// The read already counts the task that prompted it.
    counted_since_read: bool,
}

/// How often a receipt re-reads the day's savings from lmsd.
const TODAY_REFRESH: Duration = Duration::from_secs(30);

#[tool_router]
impl LocalTools {
    /// Run a task on a local model instead of doing it yourself: summaries, extraction,
    /// classification, rewrites, first-pass review, anything private. Give files by path to
    /// keep their contents out of your context. With `schema` or `choices` the answer is
    /// checked JSON or one label.
    #[tool(name = "local_task")]
    async fn local_task(
        &self,
        Parameters(params): Parameters<TaskParams>,
        meta: RequestMetaObject,
        peer: Peer<RoleServer>,
        cancel: CancellationToken,
    ) -> Result<CallToolResult, ErrorData> {
        let mut input = params.instruction.clone();
        if let Some(text) = &params.text {
            input.push_str("\n\n");
            input.push_str(text);
        }
        let vision = params.vision.unwrap_or(false);
        let mut images = Vec::new();
        if let Some(patterns) = params.files.as_ref().filter(|p| !p.is_empty()) {
            match self.access_for(&peer).await.read_all(patterns, vision) {
                Ok(read) => {
                    for file in read {
                        match file.content {
                            Content::Text(text) => {
                                input.push_str(&format!("\n\n--- {} ---\n{text}", file.path))
                            }
                            Content::Image(url) => images.push(url),
                        }
                    }
                }
                Err(why) => return Ok(refused(format!("fix the call: {why}"))),
            }
        }
        let has_schema = params.schema.is_some();
        let request = ChatRequest {
            model: params.model.unwrap_or_else(|| "auto".into()),
            input,
            images,
            system_prompt: params.system,
            temperature: params.temperature,
            max_output_tokens: params.max_output_tokens,
            session: params.session,
            schema: params.schema,
            choices: params.choices.unwrap_or_default(),
            options: TaskOptions {
                tag: Some("mcp".into()),
                needs: lmsd_proto::Needs {
                    vision,
                    ..lmsd_proto::Needs::default()
                },
                ..TaskOptions::default()
            },
            ..ChatRequest::default()
        };
        let progress = Progress {
            peer,
            meta,
            started: Instant::now(),
            step: 0.0,
        };
        let chat = match self.call(Request::Chat(request), progress, cancel).await {
            Ok(Outcome::Chat(chat)) => chat,
            Ok(other) => return Ok(refused(format!("lmsd answered with {other:?}"))),
            Err(error) => return Ok(failure(&error)),
        };
        let receipt = self.receipt(&chat).await;
        let answer = match &chat.json {
            Some(Value::String(label)) if !has_schema => label.clone(),
            Some(value) => value.to_string(),
            None => chat.content.clone(),
        };
        let mut result = CallToolResult::success(vec![
            ContentBlock::text(answer),
            ContentBlock::text(receipt),
        ]);
        if let (true, Some(value)) = (has_schema, &chat.json) {
            result.structured_content = Some(value.clone());
        }
        Ok(result)
    }

    /// Embed texts on a local model; with `query`, get the texts ranked by similarity to it
    /// (search, deduplication, grouping) without reading them yourself.
    #[tool(name = "local_embed")]
    async fn local_embed(
        &self,
        Parameters(params): Parameters<EmbedParams>,
        meta: RequestMetaObject,
        peer: Peer<RoleServer>,
        cancel: CancellationToken,
    ) -> Result<CallToolResult, ErrorData> {
        if params.texts.is_empty() {
            return Ok(refused("fix the call: texts is empty".into()));
        }
        let mut input = params.texts.clone();
        if let Some(query) = &params.query {
            input.insert(0, query.clone());
        }
        let request = EmbedRequest {
            model: params.model.unwrap_or_else(|| "auto".into()),
            input,
            options: TaskOptions {
                tag: Some("mcp".into()),
                ..TaskOptions::default()
            },
        };
        let progress = Progress {
            peer,
            meta,
            started: Instant::now(),
            step: 0.0,
        };
        let embedded = match self.call(Request::Embed(request), progress, cancel).await {
            Ok(Outcome::Embed(embedded)) => embedded,
            Ok(other) => return Ok(refused(format!("lmsd answered with {other:?}"))),
            Err(error) => return Ok(failure(&error)),
        };
        let Some(_query) = &params.query else {
            let vectors = json!({ "embeddings": embedded.embeddings });
            let mut result = CallToolResult::success(vec![ContentBlock::text(format!(
                "{} vectors of {} dimensions from {}",
                embedded.embeddings.len(),
                embedded.embeddings.first().map_or(0, Vec::len),
                embedded.task.model
            ))]);
            result.structured_content = Some(vectors);
            return Ok(result);
        };
        let Some((query, texts)) = embedded.embeddings.split_first() else {
            return Ok(refused("lmsd answered with no vectors".into()));
        };
        let mut ranked: Vec<(f64, &String)> = texts
            .iter()
            .map(|v| cosine(query, v))
            .zip(&params.texts)
            .collect();
        ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
        let lines: Vec<String> = ranked
            .iter()
            .map(|(score, text)| format!("{score:.3}  {text}"))
            .collect();
        let mut result = CallToolResult::success(vec![ContentBlock::text(lines.join("\n"))]);
        result.structured_content = Some(json!({
            "ranked": ranked.iter().map(|(score, text)| json!({"score": score, "text": text})).collect::<Vec<_>>()
        }));
        Ok(result)
    }

    /// The local models: which exist, which are loaded, what they can do, their sizes.
    #[tool(name = "local_models")]
    async fn local_models(&self) -> Result<CallToolResult, ErrorData> {
        let list = match self.connect().await {
            Ok(mut client) => client.models().await,
            Err(error) => Err(error),
        };
        let list = match list {
            Ok(list) => list,
            Err(error) => return Ok(failure(&error)),
        };
        let lines: Vec<String> = list
            .models
            .iter()
            .map(|m| {
                let mut traits = vec![
                    match m.kind {
                        ModelKind::Llm => "llm".to_owned(),
                        ModelKind::Embedding => "embedding".to_owned(),
                    },
                    format!("{:.1} GB", m.size_bytes as f64 / 1e9),
                    format!("context {}", m.max_context_length),
                ];
                for (has, name) in [
                    (m.vision, "vision"),
                    (m.reasoning, "reasoning"),
                    (m.tool_use, "tools"),
                ] {
                    if has {
                        traits.push(name.to_owned());
                    }
                }
                if !m.loaded_instances.is_empty() {
                    traits.push("loaded".to_owned());
                }
                format!("{} ({})", m.key, traits.join(", "))
            })
            .collect();
        Ok(CallToolResult::success(vec![ContentBlock::text(
            lines.join("\n"),
        )]))
    }

    /// Whether lmsd and its engine are up, what is loaded, memory in use, tasks waiting.
    #[tool(name = "local_status")]
    async fn local_status(&self) -> Result<CallToolResult, ErrorData> {
        let status = match self.connect().await {
            Ok(mut client) => client.status().await,
            Err(error) => Err(error),
        };
        let status = match status {
            Ok(status) => status,
            Err(error) => return Ok(failure(&error)),
        };
        let engine = if status.backend.reachable {
            "up"
        } else {
            "DOWN"
        };
        let simulated = if status.backend.simulated {
            " (SIMULATED: fake replies)"
        } else {
            ""
        };
        let mut lines = vec![format!(
            "engine {} {engine}{simulated}; memory {:.1} of {:.1} GB used",
            status.backend.url,
            status.memory.used_bytes as f64 / 1e9,
            status.memory.budget_bytes as f64 / 1e9
        )];
        for instance in &status.instances {
            let state = format!("{:?}", instance.state).to_lowercase();
            lines.push(format!(
                "{} {state}, {} tasks",
                instance.model, instance.in_flight
            ));
        }
        Ok(CallToolResult::success(vec![ContentBlock::text(
            lines.join("\n"),
        )]))
    }

    /// What offloading saved: tokens served locally and their cost at paid prices, today and
    /// in all.
    #[tool(name = "local_savings")]
    async fn local_savings(&self) -> Result<CallToolResult, ErrorData> {
        let mut lines = Vec::new();
        for (name, since) in [
            ("today", Some(Duration::from_secs(86_400))),
            ("in all", None),
        ] {
            let report = match self.connect().await {
                Ok(mut client) => {
                    let request = SavingsRequest {
                        since: since.map(WireDuration),
                        by: None,
                    };
                    client.call(Request::Savings(request), |_| {}).await
                }
                Err(error) => Err(error),
            };
            match report {
                Ok(Outcome::Savings(report)) => lines.push(format!(
                    "{name}: {} tasks, {} tokens in, {} out, saved ${:.2}",
                    report.totals.tasks,
                    report.totals.input_tokens,
                    report.totals.output_tokens,
                    report.totals.usd_saved
                )),
                Ok(_) => {}
                Err(error) => return Ok(failure(&error)),
            }
        }
        Ok(CallToolResult::success(vec![ContentBlock::text(
            lines.join("\n"),
        )]))
    }
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let denominator = norm(a) * norm(b);
    if denominator == 0.0 {
        0.0
    } else {
        dot / denominator
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for LocalTools {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("lmsd-mcp", env!("CARGO_PKG_VERSION")))
            .with_instructions(
                "Offload work to local models through lmsd: local_task for summaries, extraction, classification, rewrites and private text; results carry a receipt of what ran locally.",
            )
    }
}
