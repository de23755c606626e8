//! Runs each request. Tasks (chat, embed) are registered, get a deadline and a priority, choose
//! their model (`auto` or a named one with fallbacks), wait in the pool's queue for a slot, and
//! survive LM Studio's faults the way a careful script would: retries with backoff on transient
//! errors, a reload when an instance vanished or answered nothing, the next candidate when a
//! model is missing or does not fit.

pub mod choice;
pub mod registry;
pub mod sessions;

mod contract;
mod errors;
mod forward;
mod runner;
mod work;

use std::sync::Arc;
use std::time::{Duration, Instant};

use lmsd_proto::{
    BackendStatus, CancelOutcome, ChatOutcome, ChatRequest, ContentSource, ContractReport,
    DaemonInfo, EmbedOutcome, EmbedRequest, Event, LoadOutcome, LoadRequest, ModelInfo, ModelKind,
    ModelList, PinOutcome, Reply, SessionList, StatusReport, TaskKind, TaskList, TaskReport,
    UnloadOutcome, UnloadRequest, Usage, PROTOCOL_VERSION,
};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::backend::{Backend, Model, ModelType, TextSource};
use crate::config::Config;
use crate::pool::{PoolError, PoolHandle};

pub use contract::Contract;
pub use errors::TaskError;
pub use forward::{forward, response_format_contract, ForwardOutcome, ForwardRequest, Tokens};
use registry::Registry;
use runner::{run_task, Done, Work};
use sessions::Sessions;
pub use work::text_bytes;

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

    /// Sends `event` if the client's queue has room, without waiting; drops it otherwise.
    pub fn offer(&self, event: Event) {
        let _ = self.replies.try_send(Reply::event(self.id.clone(), event));
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
    /// Batch jobs: their store and the ones running.
    pub batches: Arc<crate::batch::Batches>,
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
    ctx.backend
        .accept_load_settings(!request.settings.is_empty())?;
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

/// Runs one chat task (deltas go out as events with `stream`) and enters it in the ledger.
pub async fn chat(
    ctx: &Context,
    request: &ChatRequest,
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
    request: &EmbedRequest,
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
        contract: None,
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
    request: &ChatRequest,
    sink: &EventSink,
    cancel: CancellationToken,
) -> Result<ChatOutcome, TaskError> {
    if let Some(bad) = request
        .images
        .iter()
        .find(|url| !(url.starts_with("data:image/") && url.contains(";base64,")))
    {
        let start: String = bad.chars().take(40).collect();
        return Err(TaskError::BadRequest(format!(
            "an image must be a data URL such as data:image/png;base64,…; got {start:?}"
        )));
    }
    let contract = Contract::of(request).map_err(TaskError::BadRequest)?;
    if request.check_only && contract.is_none() {
        return Err(TaskError::BadRequest(
            "check_only needs a contract to check: schema, choices or json_object".into(),
        ));
    }
    if let Some(contract) = &contract {
        if !request.check_only {
            ctx.backend.accept_contract(
                request.session.is_some()
                    || request.previous_response_id.is_some()
                    || request.store,
            )?;
        }
        if request.stream {
            return Err(TaskError::BadRequest(format!(
                "a chat with a {} contract is checked whole before it is answered, so it cannot stream: leave stream out",
                contract.kind()
            )));
        }
    }
    let work = Work::Chat {
        chat: request,
        contract: contract.as_ref(),
    };
    let (done, answered, report) = run_task(
        ctx,
        TaskKind::Chat,
        &request.model,
        &request.options,
        work,
        sink,
        cancel,
    )
    .await?;
    let (
        Done::Chat {
            reply,
            system,
            json,
        },
        Some((content, source)),
    ) = (&done, done.text())
    else {
        return Err(TaskError::EmptyReply {
            instance: answered.instance,
        });
    };
    if let Some(response_id) = &reply.response_id {
        match &request.session {
            Some(session) => ctx
                .sessions
                .record(session, &report.model, response_id, *system),
            None => ctx.sessions.remember(response_id, *system),
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
        json: json.clone(),
        contract: contract.map(|contract| ContractReport {
            kind: contract.kind(),
            passed: true,
            attempts: answered.answers,
        }),
        task: report,
    })
}

async fn run_embed(
    ctx: &Context,
    request: &EmbedRequest,
    sink: &EventSink,
    cancel: CancellationToken,
) -> Result<EmbedOutcome, TaskError> {
    let work = Work::Embed(request);
    let (done, answered, report) = run_task(
        ctx,
        TaskKind::Embed,
        &request.model,
        &request.options,
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
