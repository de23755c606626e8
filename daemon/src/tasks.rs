//! Runs each request: status and catalogue from the pool, loads and verified unloads through
//! the pool, and chats on an instance the pool leases.

use std::time::Instant;

use lmsd_proto::{
    BackendStatus, ChatOutcome, ChatRequest, ContentSource, DaemonInfo, ErrorCode, Event,
    LoadOutcome, LoadRequest, ModelInfo, ModelKind, ModelList, PinOutcome, StatusReport,
    UnloadOutcome, UnloadRequest, Usage, WireError, PROTOCOL_VERSION,
};

use crate::lmstudio::{
    BackendError, ChatBody, LmStudio, Model, ModelType, StreamEvent, TextSource,
};
use crate::pool::{PoolError, PoolHandle};

/// Why a request failed. Mapped to wire codes in one place: [`TaskError::to_wire`].
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("LM Studio answered with neither message nor reasoning text (instance {instance})")]
    EmptyReply { instance: String },
}

fn backend_code(error: &BackendError) -> ErrorCode {
    match error {
        BackendError::Unreachable { .. } | BackendError::Timeout { .. } => {
            ErrorCode::BackendUnreachable
        }
        BackendError::ModelNotFound { .. } => ErrorCode::ModelNotFound,
        BackendError::OutOfMemory { .. } => ErrorCode::OutOfMemory,
        BackendError::Unauthorized { .. }
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
            TaskError::Pool(PoolError::NotFound { .. }) => ErrorCode::ModelNotFound,
            TaskError::Pool(PoolError::BudgetExceeded { .. }) => ErrorCode::BudgetExceeded,
            TaskError::Pool(PoolError::Pinned { .. } | PoolError::Config(_)) => {
                ErrorCode::BadRequest
            }
            TaskError::Pool(PoolError::ShuttingDown) => ErrorCode::ShuttingDown,
            TaskError::Pool(PoolError::UnloadNotVerified { .. }) | TaskError::EmptyReply { .. } => {
                ErrorCode::BackendError
            }
        };
        WireError::new(code, self.to_string())
    }
}

/// What every request handler needs.
#[derive(Debug, Clone)]
pub struct Context {
    pub lmstudio: LmStudio,
    pub pool: PoolHandle,
    pub reloader: std::sync::Arc<crate::service::Reloader>,
    pub started: Instant,
    pub simulated: bool,
}

fn millis(duration: std::time::Duration) -> u64 {
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
            url: ctx.lmstudio.url().to_owned(),
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
    Ok(ctx.pool.load(request).await?)
}

pub async fn unload(ctx: &Context, request: UnloadRequest) -> Result<UnloadOutcome, TaskError> {
    Ok(ctx.pool.unload(request).await?)
}

pub async fn pin(ctx: &Context, model: String, pinned: bool) -> Result<PinOutcome, TaskError> {
    Ok(ctx.pool.pin(model, pinned).await?)
}

/// Runs one chat turn on a leased instance; with `stream`, deltas go to `on_event` as they come.
pub async fn chat<F, Fut>(
    ctx: &Context,
    request: ChatRequest,
    mut on_event: F,
) -> Result<ChatOutcome, TaskError>
where
    F: FnMut(Event) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let started = Instant::now();
    let lease = ctx.pool.acquire(&request.model, request.ttl).await?;
    let body = ChatBody {
        model: lease.instance_id.clone(),
        input: request.input,
        system_prompt: request.system_prompt,
        temperature: request.temperature,
        max_output_tokens: request.max_output_tokens,
        previous_response_id: request.previous_response_id,
        stream: request.stream,
    };
    let result = if request.stream {
        ctx.lmstudio
            .chat_stream(&body, |event| {
                on_event(match event {
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
        ctx.lmstudio.chat(&body).await
    };
    let load_time = lease.load_time;
    drop(lease);
    let reply = result.inspect_err(|_| ctx.pool.refresh_soon())?;
    let (content, source) = reply.text().ok_or_else(|| TaskError::EmptyReply {
        instance: reply.model_instance_id.clone(),
    })?;
    Ok(ChatOutcome {
        content,
        content_source: match source {
            TextSource::Message => ContentSource::Message,
            TextSource::Reasoning => ContentSource::Reasoning,
        },
        model_instance_id: reply.model_instance_id,
        response_id: reply.response_id,
        usage: Usage {
            input_tokens: reply.stats.input_tokens,
            total_output_tokens: reply.stats.total_output_tokens,
            reasoning_output_tokens: reply.stats.reasoning_output_tokens,
            model_load_time_seconds: reply
                .stats
                .model_load_time_seconds
                .or(load_time.map(|d| d.as_secs_f64())),
        },
        total_ms: millis(started.elapsed()),
    })
}
