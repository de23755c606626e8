//! Runs each request. Tasks (chat, embed) are registered, get a deadline and a priority, choose
//! their model (`auto` or a named one with fallbacks), wait in the pool's queue for a slot, and
//! survive LM Studio's faults the way a careful script would: retries with backoff on transient
//! errors, a reload when an instance vanished or answered nothing, the next candidate when a
//! model is missing or does not fit.

pub mod choice;
pub mod registry;
pub mod sessions;

use std::sync::Arc;
use std::time::{Duration, Instant};

use lmsd_proto::{
    BackendStatus, CancelOutcome, ChatOutcome, ChatRequest, ContentSource, DaemonInfo,
    EmbedOutcome, EmbedRequest, ErrorCode, Event, LoadOutcome, LoadRequest, ModelInfo, ModelKind,
    ModelList, PinOutcome, Reply, SessionList, StatusReport, TaskKind, TaskList, TaskOptions,
    TaskReport, Ttl, UnloadOutcome, UnloadRequest, Usage, WireError, PROTOCOL_VERSION,
};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::backend::{
    same_model, Backend, BackendError, ChatBody, ChatReply, Model, ModelType, StreamEvent,
    TextSource,
};
use crate::config::Config;
use crate::pool::{AcquireRequest, Lease, PoolError, PoolHandle, PoolProgress};
use choice::{Candidate, PoolView};
use registry::{Registry, TaskHandle};
use sessions::{Conversation, Sessions, SystemPrompt};

/// Why a request failed. Mapped to wire codes in one place: [`TaskError::to_wire`].
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("the engine answered with neither message nor reasoning text (instance {instance})")]
    EmptyReply { instance: String },
    #[error("no model meets the task's needs{0}; `lmsd-ctl models` lists what there is")]
    NoModel(String),
    #[error("the task's deadline passed after {0} ms")]
    DeadlineExceeded(u64),
    #[error("the task was cancelled")]
    Cancelled,
    /// The engine's conversation behind a session is gone (see
    /// [`BackendError::ConversationLost`]); the session is forgotten so it can start afresh.
    #[error("session {session:?} lost its conversation on {model} ({source}); lmsd has forgotten it, so the session's next message starts a new conversation")]
    SessionLost {
        session: String,
        model: String,
        source: BackendError,
    },
    /// A request lmsd refuses before it reaches the engine.
    #[error("{0}")]
    BadRequest(String),
}

fn backend_code(error: &BackendError) -> ErrorCode {
    match error {
        BackendError::Unreachable { .. }
        | BackendError::ReplyLost { .. }
        | BackendError::Timeout { .. } => ErrorCode::BackendUnreachable,
        BackendError::ModelNotFound { .. } => ErrorCode::ModelNotFound,
        BackendError::Unsupported { .. } => ErrorCode::BadRequest,
        BackendError::ConversationLost { .. } => ErrorCode::SessionLost,
        BackendError::ContextExceeded { .. } => ErrorCode::ContextExceeded,
        BackendError::OutOfMemory { .. } => ErrorCode::OutOfMemory,
        BackendError::Unauthorized { .. }
        | BackendError::LoadFailed { .. }
        | BackendError::InstanceGone { .. }
        | BackendError::Api { .. }
        | BackendError::Malformed { .. } => ErrorCode::BackendError,
    }
}

impl TaskError {
    pub fn to_wire(&self) -> WireError {
        let code = match self {
            TaskError::Backend(error) | TaskError::Pool(PoolError::Backend(error)) => {
                backend_code(error)
            }
            TaskError::Pool(PoolError::NotFound { .. }) | TaskError::NoModel(_) => {
                ErrorCode::ModelNotFound
            }
            TaskError::Pool(PoolError::BudgetExceeded { .. }) => ErrorCode::BudgetExceeded,
            TaskError::Pool(PoolError::Pinned { .. } | PoolError::Config(_))
            | TaskError::BadRequest(_) => ErrorCode::BadRequest,
            TaskError::Pool(
                PoolError::ContextTooSmall { .. } | PoolError::ContextUnavailable { .. },
            ) => ErrorCode::ContextExceeded,
            TaskError::Pool(PoolError::ShuttingDown) => ErrorCode::ShuttingDown,
            TaskError::Pool(PoolError::QueueFull(_)) => ErrorCode::QueueFull,
            TaskError::Pool(PoolError::DeadlineExceeded) | TaskError::DeadlineExceeded(_) => {
                ErrorCode::DeadlineExceeded
            }
            TaskError::Cancelled => ErrorCode::Cancelled,
            TaskError::SessionLost { .. } => ErrorCode::SessionLost,
            TaskError::Pool(PoolError::UnloadNotVerified { .. }) | TaskError::EmptyReply { .. } => {
                ErrorCode::BackendError
            }
        };
        WireError::new(code, self.to_string())
    }

    fn backend(&self) -> Option<&BackendError> {
        match self {
            TaskError::Backend(error) | TaskError::Pool(PoolError::Backend(error)) => Some(error),
            _ => None,
        }
    }

    /// Out of memory, or a failed load that may have been (LM Studio does not say).
    fn is_out_of_memory(&self) -> bool {
        matches!(self, TaskError::Pool(PoolError::BudgetExceeded { .. }))
            || self.backend().is_some_and(BackendError::may_be_memory)
    }

    /// Worth trying the next candidate model after this?
    fn next_candidate_may_help(&self) -> bool {
        matches!(
            self,
            TaskError::EmptyReply { .. }
                | TaskError::Pool(
                    PoolError::NotFound { .. }
                        | PoolError::BudgetExceeded { .. }
                        | PoolError::ContextTooSmall { .. }
                        | PoolError::ContextUnavailable { .. }
                )
        ) || self.backend().is_some_and(|error| {
            error.may_be_memory()
                || matches!(
                    error,
                    BackendError::ModelNotFound { .. }
                        | BackendError::InstanceGone { .. }
                        | BackendError::ContextExceeded { .. }
                )
        })
    }
}

/// Where a request's events go: its client's connection, under its id.
#[derive(Debug, Clone)]
pub struct EventSink {
    pub id: String,
    pub replies: mpsc::Sender<Reply>,
}

impl EventSink {
    pub async fn send(&self, event: Event) {
        let _ = self
            .replies
            .send(Reply::event(self.id.clone(), event))
            .await;
    }
}

/// What every request handler needs.
#[derive(Debug, Clone)]
pub struct Context {
    pub backend: Backend,
    pub pool: PoolHandle,
    pub reloader: Arc<crate::service::Reloader>,
    /// The config in force; reloads publish new ones.
    pub config: watch::Receiver<Arc<Config>>,
    pub registry: Arc<Registry>,
    pub sessions: Arc<Sessions>,
    pub ledger: Arc<crate::ledger::Ledger>,
    /// Metrics and the `events` stream.
    pub observers: crate::pool::Observers,
    /// Cancelled when lmsd begins to stop.
    pub stopping: CancellationToken,
    pub started: Instant,
    pub simulated: bool,
}

fn millis(duration: Duration) -> u64 {
    duration.as_millis().try_into().unwrap_or(u64::MAX)
}

pub async fn status(ctx: &Context) -> Result<StatusReport, TaskError> {
    let pool = ctx.pool.status().await?;
    Ok(StatusReport {
        daemon: DaemonInfo {
            version: env!("CARGO_PKG_VERSION").into(),
            protocol: PROTOCOL_VERSION,
            pid: std::process::id(),
            uptime_s: ctx.started.elapsed().as_secs(),
        },
        backend: BackendStatus {
            engine: ctx.backend.kind().name().to_owned(),
            url: ctx.backend.url().to_owned(),
            reachable: pool.reachable,
            simulated: ctx.simulated,
            last_error: pool.last_error.map(|e| e.to_string()),
            refreshed_ms_ago: pool.refreshed_ago.map(millis),
        },
        instances: pool.instances,
        memory: pool.memory,
        evictions: pool.evictions,
    })
}

fn model_info(model: &Model) -> Option<ModelInfo> {
    let kind = match model.kind {
        ModelType::Llm => ModelKind::Llm,
        ModelType::Embedding => ModelKind::Embedding,
        ModelType::Other => return None,
    };
    let caps = model.capabilities.clone().unwrap_or_default();
    Some(ModelInfo {
        key: model.key.clone(),
        kind,
        display_name: model
            .display_name
            .clone()
            .unwrap_or_else(|| model.key.clone()),
        size_bytes: model.size_bytes,
        params_string: model.params_string.clone(),
        max_context_length: model.max_context_length.unwrap_or(0),
        vision: caps.vision,
        reasoning: caps.reasoning.is_some(),
        tool_use: caps.trained_for_tool_use,
        loaded_instances: model
            .loaded_instances
            .iter()
            .map(|i| i.id.clone())
            .collect(),
    })
}

pub async fn models(ctx: &Context) -> Result<ModelList, TaskError> {
    let models = ctx.pool.models().await?;
    Ok(ModelList {
        models: models.iter().filter_map(model_info).collect(),
    })
}

pub async fn load(ctx: &Context, request: LoadRequest) -> Result<LoadOutcome, TaskError> {
    ctx.backend.accept_load_settings(
        request.context_length.is_some()
            || request.eval_batch_size.is_some()
            || request.flash_attention.is_some()
            || request.num_experts.is_some()
            || request.offload_kv_cache_to_gpu.is_some(),
    )?;
    Ok(ctx.pool.load(request).await?)
}

pub async fn unload(ctx: &Context, request: UnloadRequest) -> Result<UnloadOutcome, TaskError> {
    Ok(ctx.pool.unload(request).await?)
}

pub async fn pin(ctx: &Context, model: String, pinned: bool) -> Result<PinOutcome, TaskError> {
    Ok(ctx.pool.pin(model, pinned).await?)
}

pub fn tasks(ctx: &Context) -> TaskList {
    TaskList {
        tasks: ctx.registry.list(),
    }
}

pub fn cancel(ctx: &Context, task_id: String) -> CancelOutcome {
    let cancelled = ctx.registry.cancel(&task_id);
    if cancelled {
        tracing::info!(task = %task_id, "cancelled on request");
    }
    CancelOutcome { task_id, cancelled }
}

pub fn sessions(ctx: &Context, forget: Option<String>) -> SessionList {
    let forgotten = forget.filter(|name| ctx.sessions.forget(name));
    SessionList {
        sessions: ctx.sessions.list(),
        forgotten,
    }
}

/// A task in flight: its registration, deadline, options and the running account of its time.
struct Task<'a> {
    ctx: &'a Context,
    handle: TaskHandle,
    submitted: Instant,
    deadline: Instant,
    options: TaskOptions,
    retries: u32,
    sink: &'a EventSink,
    report: TaskReport,
    /// Time spent loading models for this task, if it waited for a load.
    load_time: Option<Duration>,
}

/// What a task does once it holds a slot: a chat or an embedding.
enum Work<'a> {
    Chat(&'a ChatRequest),
    Embed(&'a EmbedRequest),
}

enum Done {
    Chat(ChatReply),
    Embed(Vec<Vec<f64>>),
}

impl Done {
    /// A chat's text and where it came from; `None` for embeddings or an empty chat.
    fn text(&self) -> Option<(String, TextSource)> {
        match self {
            Done::Chat(reply) => reply.text(),
            Done::Embed(_) => None,
        }
    }
}

impl<'a> Task<'a> {
    fn start(
        ctx: &'a Context,
        kind: TaskKind,
        model: &str,
        options: TaskOptions,
        sink: &'a EventSink,
        cancel: CancellationToken,
    ) -> Self {
        let config = ctx.config.borrow().clone();
        let submitted = Instant::now();
        let deadline = submitted
            + options
                .timeout
                .map_or(config.tasks.default_timeout, |t| t.0);
        let handle = ctx
            .registry
            .register(kind, model, options.priority, deadline, cancel);
        ctx.observers.emit(Event::TaskQueued {
            task_id: handle.id.clone(),
            kind,
            model: model.to_owned(),
        });
        let mut options = options;
        options.prefer.extend(config.routing.prefer.iter().cloned());
        Task {
            ctx,
            report: TaskReport {
                task_id: handle.id.clone(),
                ..TaskReport::default()
            },
            handle,
            submitted,
            deadline,
            options,
            retries: config.tasks.retries,
            sink,
            load_time: None,
        }
    }

    /// The models to try, best first.
    async fn candidates(
        &self,
        requested: &str,
        embedding: bool,
    ) -> Result<Vec<Candidate>, TaskError> {
        let named = requested != "auto";
        if named && self.options.prefer.is_empty() {
            return Ok(vec![Candidate {
                model: requested.to_owned(),
                reason: "requested".into(),
                size_bytes: None,
            }]);
        }
        let mut status = self.ctx.pool.status().await?;
        if status.catalogue.is_empty() && !status.reachable {
            // Nothing to choose from yet: one fresh read, started now, decides.
            self.ctx.pool.models().await?;
            status = self.ctx.pool.status().await?;
        }
        let size_of = |key: &str| {
            status
                .catalogue
                .iter()
                .find(|m| m.key == key)
                .map(|m| m.size_bytes)
        };
        if named {
            let mut list = vec![Candidate {
                model: requested.to_owned(),
                reason: "requested".into(),
                size_bytes: size_of(requested),
            }];
            for key in self.options.prefer.iter().filter(|k| *k != requested) {
                list.push(Candidate {
                    model: key.clone(),
                    reason: "fallback from the prefer list".into(),
                    size_bytes: size_of(key),
                });
            }
            return Ok(list);
        }
        let view = PoolView {
            loaded: status
                .instances
                .iter()
                .filter(|i| !i.instance_id.is_empty())
                .map(|i| i.model.clone())
                .collect(),
            free_bytes: status.memory.free_bytes,
            budget_bytes: status.memory.budget_bytes,
            overhead: status.overhead_bytes,
        };
        let list = choice::choose(
            &status.catalogue,
            &view,
            &self.options.needs,
            &self.options.prefer,
            embedding,
        );
        if list.is_empty() {
            let kind = if embedding {
                " (an embedding model)"
            } else {
                ""
            };
            return Err(TaskError::NoModel(format!(
                "{kind} {:?}",
                self.options.needs
            )));
        }
        Ok(list)
    }

    /// Waits for a slot on `model`, forwarding queue positions and loads as events.
    async fn acquire(
        &mut self,
        model: &str,
        ttl: Option<Ttl>,
        context_length: Option<u32>,
        min_context: Option<u32>,
    ) -> Result<Lease, TaskError> {
        let (progress, mut heard) = mpsc::channel(16);
        let request = AcquireRequest {
            model: model.to_owned(),
            ttl,
            priority: self.options.priority,
            deadline: self.deadline,
            context_length,
            min_context,
            progress: Some(progress),
        };
        let started = Instant::now();
        let acquire = self.ctx.pool.acquire(request);
        tokio::pin!(acquire);
        let lease = loop {
            tokio::select! {
                lease = &mut acquire => break lease?,
                Some(event) = heard.recv() => match event {
                    PoolProgress::Queued { position } => {
                        self.sink.send(Event::Queued { task_id: self.handle.id.clone(), position }).await;
                    }
                    PoolProgress::Loading { model } => {
                        self.sink.send(Event::Load { model_instance_id: model, progress: 0.0 }).await;
                    }
                },
            }
        };
        let waited = started.elapsed();
        let load = lease.load_time.unwrap_or_default().min(waited);
        self.report.load_ms += millis(load);
        if let Some(loaded) = lease.load_time {
            self.load_time = Some(self.load_time.unwrap_or_default() + loaded);
        }
        self.report.queued_ms += millis(waited - load);
        if let Some(load) = lease.load_time {
            self.sink
                .send(Event::Load {
                    model_instance_id: lease.instance_id.clone(),
                    progress: 1.0,
                })
                .await;
            tracing::debug!(task = %self.handle.id, load_ms = millis(load), "loaded for this task");
        }
        self.handle.set_instance(Some(&lease.instance_id));
        self.ctx.observers.emit(Event::TaskStarted {
            task_id: self.handle.id.clone(),
            instance_id: lease.instance_id.clone(),
        });
        Ok(lease)
    }

    /// Runs the work on each candidate in turn until one answers.
    async fn run(
        &mut self,
        candidates: &[Candidate],
        work: &Work<'_>,
    ) -> Result<(Done, Answered), TaskError> {
        let mut last_error = None;
        // After a model ran out of memory, only smaller ones are worth a try.
        let mut smaller_than: Option<u64> = None;
        for candidate in candidates {
            if let (Some(limit), Some(size)) = (smaller_than, candidate.size_bytes) {
                if size >= limit {
                    continue;
                }
            }
            match self.run_on(candidate, work).await {
                Ok(done) => {
                    self.report.model = candidate.model.clone();
                    self.report.reason = candidate.reason.clone();
                    return Ok(done);
                }
                Err(error) if error.next_candidate_may_help() => {
                    if error.is_out_of_memory() {
                        smaller_than = candidate.size_bytes.or(smaller_than);
                    }
                    tracing::info!(task = %self.handle.id, model = %candidate.model, %error, "trying the next candidate");
                    last_error = Some(error);
                }
                Err(error) => return Err(error),
            }
        }
        Err(last_error.unwrap_or_else(|| TaskError::NoModel(String::new())))
    }

    /// Runs the work on one model, retrying transient faults with backoff, once reloading an
    /// instance that vanished or answered nothing.
    async fn run_on(
        &mut self,
        candidate: &Candidate,
        work: &Work<'_>,
    ) -> Result<(Done, Answered), TaskError> {
        let (ttl, context_length, min_context) = match work {
            Work::Chat(chat) => (
                if chat.unload_after {
                    Some(Ttl::After(Duration::ZERO))
                } else if chat.keep {
                    Some(Ttl::Never)
                } else {
                    chat.ttl
                },
                chat.context_length,
                context_needed(chat),
            ),
            Work::Embed(_) => (None, None, None),
        };
        let mut transient_tries = 0;
        let mut reloaded = false;
        let mut reread = false;
        loop {
            self.report.attempts += 1;
            // Boxed, like `perform` below: an async fn's state holds room for every future it
            // awaits, so a queued task would carry a running one's. Boxes exist only while used.
            let lease =
                match Box::pin(self.acquire(&candidate.model, ttl, context_length, min_context))
                    .await
                {
                    Ok(lease) => lease,
                    // The catalogue may be stale (a model downloaded a moment ago): read it again
                    // once before giving up on the name.
                    Err(TaskError::Pool(PoolError::NotFound { .. })) if !reread => {
                        reread = true;
                        let _ = self.ctx.pool.models().await;
                        continue;
                    }
                    Err(error) => return Err(error),
                };
            let instance = lease.instance_id.clone();
            let result = Box::pin(self.perform(&lease, candidate, work)).await;
            drop(lease);
            self.handle.set_instance(None);
            let error = match result {
                Ok(done) => {
                    return Ok((
                        done,
                        Answered {
                            instance,
                            load_time: self.load_time,
                        },
                    ))
                }
                Err(error) => error,
            };
            match &error {
                // The instance vanished under the task (outside unload, a crash, LM Studio
                // restart; or another model answered in its place), or answered nothing: reload
                // it once and try again.
                TaskError::Backend(
                    BackendError::ModelNotFound { .. } | BackendError::InstanceGone { .. },
                )
                | TaskError::EmptyReply { .. }
                    if !reloaded =>
                {
                    reloaded = true;
                    tracing::warn!(task = %self.handle.id, instance = %instance, %error, "reloading the instance and retrying");
                    if matches!(error, TaskError::EmptyReply { .. }) {
                        let unload = UnloadRequest {
                            instance_id: Some(instance),
                            ..UnloadRequest::default()
                        };
                        let _ = self.ctx.pool.unload(unload).await;
                    } else {
                        let _ = self.ctx.pool.models().await;
                    }
                }
                TaskError::Backend(backend)
                    if backend.is_transient() && transient_tries + 1 < self.retries =>
                {
                    transient_tries += 1;
                    self.ctx.pool.refresh_soon();
                    let pause = backoff(transient_tries);
                    tracing::warn!(task = %self.handle.id, %error, try_ = transient_tries, pause_ms = millis(pause), "transient engine error; retrying");
                    tokio::time::sleep(pause).await;
                }
                _ => {
                    self.ctx.pool.refresh_soon();
                    return Err(error);
                }
            }
        }
    }

    async fn perform(
        &self,
        lease: &Lease,
        candidate: &Candidate,
        work: &Work<'_>,
    ) -> Result<Done, TaskError> {
        match work {
            Work::Embed(embed) => {
                let (vectors, answered) = self
                    .ctx
                    .backend
                    .embeddings(&lease.instance_id, &embed.input)
                    .await?;
                match answered {
                    Some(answered) if !same_model(&lease.instance_id, &answered) => {
                        self.check_answered_by(&lease.instance_id, &answered)
                            .await?;
                    }
                    _ => {}
                }
                Ok(Done::Embed(vectors))
            }
            Work::Chat(chat) => {
                let continues = self.continues(chat, &candidate.model)?;
                let body = ChatBody {
                    model: lease.instance_id.clone(),
                    input: chat.input.clone(),
                    // The engine keeps the system prompt its conversation began with, and LM
                    // Studio refuses a continuation that sends one (`continues` checked it).
                    system_prompt: match continues {
                        Some(_) => None,
                        None => chat.system_prompt.clone(),
                    },
                    temperature: chat.temperature,
                    max_output_tokens: chat.max_output_tokens,
                    store: chat.store || chat.session.is_some() || continues.is_some(),
                    previous_response_id: continues.map(|c| c.response_id),
                    stream: chat.stream,
                };
                let reply = if chat.stream {
                    let mut first_token = true;
                    self.ctx
                        .backend
                        .chat_stream(&body, |event| {
                            if first_token && matches!(event, StreamEvent::Message(_)) {
                                first_token = false;
                                self.ctx
                                    .observers
                                    .metrics
                                    .first_token(self.submitted.elapsed().as_secs_f64());
                            }
                            self.sink.send(match event {
                                StreamEvent::LoadProgress {
                                    model_instance_id,
                                    progress,
                                } => Event::Load {
                                    model_instance_id,
                                    progress,
                                },
                                StreamEvent::Reasoning(content) => Event::Reasoning { content },
                                StreamEvent::Message(content) => Event::Delta { content },
                            })
                        })
                        .await
                } else {
                    self.ctx.backend.chat(&body).await
                };
                let reply = reply.map_err(|error| match (error, chat.session.as_deref()) {
                    (source @ BackendError::ConversationLost { .. }, Some(session))
                        if chat.previous_response_id.is_none() =>
                    {
                        self.ctx
                            .sessions
                            .forget_conversation(session, &candidate.model);
                        TaskError::SessionLost {
                            session: session.to_owned(),
                            model: candidate.model.clone(),
                            source,
                        }
                    }
                    (error, _) => TaskError::Backend(error),
                })?;
                if !same_model(&lease.instance_id, &reply.model_instance_id) {
                    return Err(TaskError::Backend(BackendError::InstanceGone {
                        message: format!(
                            "asked {:?} to chat, and {:?} answered",
                            lease.instance_id, reply.model_instance_id
                        ),
                    }));
                }
                if reply.stats.model_load_time_seconds.is_some() {
                    // lmsd loads before it chats, so the engine loaded this one itself (its
                    // just-in-time loading): the instance lmsd leased had gone.
                    tracing::warn!(task = %self.handle.id, instance = %reply.model_instance_id, "the engine loaded the model just in time behind lmsd; switch JIT loading off in LM Studio's server settings");
                    self.ctx.pool.engine_loaded(&lease.model);
                }
                if reply.text().is_none() {
                    return Err(TaskError::EmptyReply {
                        instance: reply.model_instance_id,
                    });
                }
                Ok(Done::Chat(reply))
            }
        }
    }

    /// The conversation a chat continues, if any (see [`Sessions::conversation`]). A system
    /// prompt other than the one that conversation began with is refused: the engine keeps the
    /// first, and would silently ignore (llama-server) or refuse (LM Studio) another.
    fn continues(
        &self,
        chat: &ChatRequest,
        model: &str,
    ) -> Result<Option<Conversation>, TaskError> {
        let Some(conversation) = self.ctx.sessions.conversation(
            chat.previous_response_id.as_deref(),
            chat.session.as_deref(),
            model,
        ) else {
            return Ok(None);
        };
        let asked = chat.system_prompt.as_deref();
        match (asked, conversation.began_with) {
            (None, _) => {}
            (Some(_), Some(began)) if began == SystemPrompt::of(asked) => {}
            (Some(_), Some(_)) => {
                return Err(TaskError::BadRequest(format!(
                    "this chat continues a conversation that began with another system prompt, and the engine keeps the first one; leave system_prompt out, or start a new conversation{}",
                    chat.session.as_deref().map_or(String::new(), |s| format!(" (`lmsd-ctl sessions forget {s}`, or another session name)"))
                )))
            }
            // A session recorded before lmsd kept its prompt: this one is taken as its prompt.
            (Some(_), None) if conversation.in_session => {}
            (Some(_), None) => {
                return Err(TaskError::BadRequest(
                    "a chat that continues a previous_response_id lmsd did not answer cannot carry a system_prompt: the engine keeps the one its conversation began with; leave it out".into(),
                ))
            }
        }
        Ok(Some(conversation))
    }

    /// An embedding reply that names another model than the leased instance's: when that is a
    /// different model the engine has, the instance is gone and another model answered (its
    /// vectors would poison an index); a name lmsd does not know is taken on trust.
    async fn check_answered_by(&self, asked: &str, answered: &str) -> Result<(), TaskError> {
        let status = self.ctx.pool.status().await?;
        let other_model = status.catalogue.iter().any(|m| {
            !same_model(asked, &m.key)
                && (same_model(answered, &m.key)
                    || m.loaded_instances.iter().any(|i| i.id == answered))
        });
        if other_model {
            return Err(TaskError::Backend(BackendError::InstanceGone {
                message: format!("asked {asked:?} for embeddings, and {answered:?} answered"),
            }));
        }
        tracing::debug!(
            asked,
            answered,
            "embedding reply names an unknown model; accepted"
        );
        Ok(())
    }

    fn finish(mut self) -> TaskReport {
        self.report.total_ms = millis(self.submitted.elapsed());
        self.report
    }
}

/// Tokens a text surely needs: no tokenizer averages more than this many bytes per token on
/// prose or code, so an input longer than this many bytes per token of an instance's context
/// cannot fit it.
const BYTES_PER_TOKEN_CEILING: usize = 6;

/// The context a chat needs of its instance: what `needs.min_context` says, or what its text
/// clearly takes, whichever is more.
fn context_needed(chat: &ChatRequest) -> Option<u32> {
    let text = chat.input.len() + chat.system_prompt.as_ref().map_or(0, String::len);
    let estimate = u32::try_from(text / BYTES_PER_TOKEN_CEILING).unwrap_or(u32::MAX);
    let needed = chat.options.needs.min_context.unwrap_or(0).max(estimate);
    (needed > 0).then_some(needed)
}

/// The instance a task's answer came from (its lease is already returned).
struct Answered {
    instance: String,
    /// Load time this task waited for, if any.
    load_time: Option<Duration>,
}

/// Exponential backoff with jitter: about 100 ms, 200 ms, 400 ms, … capped at 5 s.
fn backoff(try_number: u32) -> Duration {
    let base = 100u64.saturating_mul(1 << try_number.min(6)).min(5000);
    Duration::from_millis(base / 2 + fastrand::u64(..=base / 2))
}

/// Runs `work` until it ends, the task is cancelled, or its deadline passes.
async fn bounded<T>(
    stopping: &CancellationToken,
    cancel: &CancellationToken,
    deadline: Instant,
    submitted: Instant,
    work: impl std::future::Future<Output = Result<T, TaskError>>,
) -> Result<T, TaskError> {
    tokio::select! {
        biased;
                        _ = cancel.cancelled() => Err(if stopping.is_cancelled() {
            TaskError::Pool(PoolError::ShuttingDown)
        } else {
            TaskError::Cancelled
        }),
        _ = tokio::time::sleep_until(deadline.into()) => Err(TaskError::DeadlineExceeded(millis(submitted.elapsed()))),
        result = work => result,
    }
}

/// Registers a task, chooses its candidates and runs it to its end, its deadline or its
/// cancellation.
async fn run_task(
    ctx: &Context,
    kind: TaskKind,
    model: &str,
    options: TaskOptions,
    work: Work<'_>,
    sink: &EventSink,
    cancel: CancellationToken,
) -> Result<(Done, Answered, TaskReport), TaskError> {
    let mut task = Task::start(ctx, kind, model, options, sink, cancel.clone());
    let (deadline, submitted) = (task.deadline, task.submitted);
    let embedding = kind == TaskKind::Embed;
    let run = async {
        let candidates = task.candidates(model, embedding).await?;
        task.run(&candidates, &work).await
    };
    // Boxed: otherwise the task's future holds both `run` and the `bounded` that moves it.
    let result = Box::pin(bounded(&ctx.stopping, &cancel, deadline, submitted, run)).await;
    ctx.observers.emit(Event::TaskFinished {
        task_id: task.handle.id.clone(),
        outcome: result
            .as_ref()
            .map_or_else(|e| e.to_wire().code.to_string(), |_| "ok".to_owned()),
        total_ms: millis(submitted.elapsed()),
    });
    let (done, answered) = result?;
    Ok((done, answered, task.finish()))
}

/// Runs one chat task (deltas go out as events with `stream`) and enters it in the ledger.
pub async fn chat(
    ctx: &Context,
    request: ChatRequest,
    sink: &EventSink,
    cancel: CancellationToken,
) -> Result<ChatOutcome, TaskError> {
    ctx.backend
        .accept_load_settings(request.context_length.is_some())?;
    if let Some(temperature) = request.temperature {
        let (low, high) = ctx.backend.temperature_range();
        if !(low..=high).contains(&temperature) {
            return Err(TaskError::BadRequest(format!(
                "temperature {temperature} is outside {}'s range, {low} to {high}",
                ctx.backend.engine_name()
            )));
        }
    }
    let (model, tag) = (request.model.clone(), request.options.tag.clone());
    let result = run_chat(ctx, request, sink, cancel).await;
    let entry = match &result {
        Ok(outcome) => Ok((
            &outcome.task,
            outcome.usage.input_tokens,
            outcome.usage.total_output_tokens,
        )),
        Err(error) => Err(error),
    };
    record(ctx, "chat", &model, tag, entry);
    result
}

/// Runs one embedding task and enters it in the ledger.
pub async fn embed(
    ctx: &Context,
    request: EmbedRequest,
    sink: &EventSink,
    cancel: CancellationToken,
) -> Result<EmbedOutcome, TaskError> {
    let (model, tag) = (request.model.clone(), request.options.tag.clone());
    let result = run_embed(ctx, request, sink, cancel).await;
    record(
        ctx,
        "embed",
        &model,
        tag,
        result.as_ref().map(|outcome| (&outcome.task, 0, 0)),
    );
    result
}

/// One ledger line for a finished task: what it was, not what it said.
fn record(
    ctx: &Context,
    kind: &str,
    requested: &str,
    agent: Option<String>,
    result: Result<(&TaskReport, u64, u64), &TaskError>,
) {
    let (model, input_tokens, output_tokens, queued_ms, load_ms, total_ms, outcome) = match result {
        Ok((report, input, output)) => (
            report.model.clone(),
            input,
            output,
            report.queued_ms,
            report.load_ms,
            report.total_ms,
            "ok".to_owned(),
        ),
        Err(error) => (
            requested.to_owned(),
            0,
            0,
            0,
            0,
            0,
            error.to_wire().code.to_string(),
        ),
    };
    ctx.observers
        .metrics
        .task_finished(kind, &outcome, queued_ms, load_ms, total_ms);
    ctx.ledger.append(crate::ledger::Record {
        time: crate::ledger::now_s(),
        kind: kind.to_owned(),
        model,
        agent,
        input_tokens,
        output_tokens,
        queued_ms,
        load_ms,
        total_ms,
        outcome,
    });
}

/// An `events` subscription: everything the pool and the tasks report, until the client hangs
/// up or lmsd stops. It never succeeds; its end is the error that ended it.
pub async fn events(ctx: &Context, sink: &EventSink, cancel: CancellationToken) -> TaskError {
    let mut events = ctx.observers.events.subscribe();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return TaskError::Cancelled,
            _ = ctx.stopping.cancelled() => return TaskError::Pool(PoolError::ShuttingDown),
            event = events.recv() => match event {
                Ok(event) => sink.send(event).await,
                // A subscriber that cannot keep up misses events rather than slowing lmsd.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::debug!(missed, "events subscriber lagging");
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return TaskError::Pool(PoolError::ShuttingDown),
            },
        }
    }
}

/// The metrics, with the gauges read now.
pub async fn metrics(ctx: &Context) -> Result<lmsd_proto::MetricsText, TaskError> {
    let status = ctx.pool.status().await?;
    let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    ctx.observers
        .metrics
        .memory_used
        .set(gauge(status.memory.used_bytes));
    ctx.observers
        .metrics
        .memory_budget
        .set(gauge(status.memory.budget_bytes));
    ctx.observers
        .metrics
        .instances
        .set(gauge(status.instances.len() as u64));
    let queued = ctx
        .registry
        .list()
        .iter()
        .filter(|t| t.state == lmsd_proto::TaskState::Queued)
        .count();
    ctx.observers.metrics.queue_depth.set(gauge(queued as u64));
    Ok(lmsd_proto::MetricsText {
        text: ctx.observers.metrics.encode(),
    })
}

/// What the ledger's tasks would have cost at the configured paid prices.
pub fn savings(ctx: &Context, request: lmsd_proto::SavingsRequest) -> lmsd_proto::SavingsReport {
    let prices = {
        let config = ctx.config.borrow();
        crate::ledger::Prices {
            input_usd_per_mtok: config.savings.input_usd_per_mtok,
            output_usd_per_mtok: config.savings.output_usd_per_mtok,
        }
    };
    ctx.ledger
        .report(request.since.map(|s| s.0), request.by, prices)
}

async fn run_chat(
    ctx: &Context,
    request: ChatRequest,
    sink: &EventSink,
    cancel: CancellationToken,
) -> Result<ChatOutcome, TaskError> {
    let work = Work::Chat(&request);
    let (done, answered, report) = run_task(
        ctx,
        TaskKind::Chat,
        &request.model,
        request.options.clone(),
        work,
        sink,
        cancel,
    )
    .await?;
    let (Done::Chat(reply), Some((content, source))) = (&done, done.text()) else {
        return Err(TaskError::EmptyReply {
            instance: answered.instance,
        });
    };
    if let Some(response_id) = &reply.response_id {
        // The conversation's system prompt: the one it began with, or this chat's if it began
        // one (the session still names the turn this chat continued).
        let system = ctx
            .sessions
            .conversation(
                request.previous_response_id.as_deref(),
                request.session.as_deref(),
                &report.model,
            )
            .and_then(|c| c.began_with)
            .unwrap_or(SystemPrompt::of(request.system_prompt.as_deref()));
        match &request.session {
            Some(session) => ctx
                .sessions
                .record(session, &report.model, response_id, system),
            None => ctx.sessions.remember(response_id, system),
        }
    }
    Ok(ChatOutcome {
        content,
        content_source: match source {
            TextSource::Message => ContentSource::Message,
            TextSource::Reasoning => ContentSource::Reasoning,
        },
        model_instance_id: reply.model_instance_id.clone(),
        response_id: reply.response_id.clone(),
        usage: Usage {
            input_tokens: reply.stats.input_tokens,
            total_output_tokens: reply.stats.total_output_tokens,
            reasoning_output_tokens: reply.stats.reasoning_output_tokens,
            model_load_time_seconds: reply
                .stats
                .model_load_time_seconds
                .or(answered.load_time.map(|d| d.as_secs_f64())),
        },
        task: report,
    })
}

async fn run_embed(
    ctx: &Context,
    request: EmbedRequest,
    sink: &EventSink,
    cancel: CancellationToken,
) -> Result<EmbedOutcome, TaskError> {
    let work = Work::Embed(&request);
    let (done, answered, report) = run_task(
        ctx,
        TaskKind::Embed,
        &request.model,
        request.options.clone(),
        work,
        sink,
        cancel,
    )
    .await?;
    let Done::Embed(embeddings) = done else {
        return Err(TaskError::EmptyReply {
            instance: answered.instance,
        });
    };
    Ok(EmbedOutcome {
        model_instance_id: answered.instance,
        embeddings,
        task: report,
    })
}
