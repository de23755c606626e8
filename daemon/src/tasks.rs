//! Runs each request against LM Studio: status and catalogue, load, verified unload, chat.

use std::time::{Duration, Instant};

use lmsd_proto::{
    BackendStatus, ChatOutcome, ChatRequest, ContentSource, DaemonInfo, ErrorCode, Event,
    InstanceStatus, LoadOutcome, LoadRequest, ModelInfo, ModelKind, ModelList, StatusReport,
    UnloadOutcome, UnloadRequest, Usage, WireError, PROTOCOL_VERSION,
};

use crate::catalogue::{CatalogueHandle, CatalogueView};
use crate::lmstudio::{
    BackendError, ChatBody, LmStudio, LoadBody, Model, ModelType, StreamEvent, TextSource,
};

/// Rounds of unload-then-verify before lmsd gives up on an instance that will not go.
const UNLOAD_ROUNDS: u32 = 5;

/// Why a request failed. Mapped to wire codes in one place: [`TaskError::to_wire`].
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(
        "LM Studio has no model or loaded instance {name:?}; `lmsd-ctl models` lists the keys"
    )]
    NotFound { name: String },
    #[error("LM Studio still lists {remaining:?} after {rounds} rounds of unloading")]
    UnloadNotVerified { remaining: Vec<String>, rounds: u32 },
    #[error("LM Studio answered with neither message nor reasoning text (instance {instance})")]
    EmptyReply { instance: String },
}

impl TaskError {
    pub fn to_wire(&self) -> WireError {
        let code = match self {
            TaskError::Backend(error) => match error {
                BackendError::Unreachable { .. } | BackendError::Timeout { .. } => {
                    ErrorCode::BackendUnreachable
                }
                BackendError::ModelNotFound { .. } => ErrorCode::ModelNotFound,
                BackendError::OutOfMemory { .. } => ErrorCode::OutOfMemory,
                BackendError::Unauthorized { .. }
                | BackendError::Api { .. }
                | BackendError::Malformed { .. } => ErrorCode::BackendError,
            },
            TaskError::NotFound { .. } => ErrorCode::ModelNotFound,
            TaskError::UnloadNotVerified { .. } | TaskError::EmptyReply { .. } => {
                ErrorCode::BackendError
            }
        };
        WireError::new(code, self.to_string())
    }
}

/// What every request handler needs: the LM Studio client and the catalogue.
#[derive(Debug, Clone)]
pub struct Context {
    pub lmstudio: LmStudio,
    pub catalogue: CatalogueHandle,
    pub started: Instant,
    pub simulated: bool,
}

impl Context {
    /// Reports a backend error to the catalogue, which re-reads LM Studio's state after it.
    fn after_error<T>(&self, result: Result<T, BackendError>) -> Result<T, TaskError> {
        if result.is_err() {
            self.catalogue.refresh_soon();
        }
        result.map_err(TaskError::from)
    }

    /// A fresh catalogue, or the reason LM Studio could not be read.
    async fn fresh_models(&self) -> Result<CatalogueView, TaskError> {
        let view = self.catalogue.refresh().await;
        match (&view.last_error, view.reachable) {
            (_, true) => Ok(view),
            (Some(error), false) => Err(TaskError::Backend(error.clone())),
            (None, false) => Err(TaskError::Backend(BackendError::Unreachable {
                url: self.lmstudio.url().to_owned(),
                detail: "lmsd is stopping".into(),
            })),
        }
    }
}

pub fn status(ctx: &Context) -> StatusReport {
    let view = ctx.catalogue.view();
    let instances = view
        .models
        .iter()
        .flat_map(|model| {
            model
                .loaded_instances
                .iter()
                .map(|instance| InstanceStatus {
                    instance_id: instance.id.clone(),
                    model: model.key.clone(),
                    size_bytes: model.size_bytes,
                    context_length: instance.config.context_length,
                    parallel: instance.config.parallel,
                })
        })
        .collect();
    StatusReport {
        daemon: DaemonInfo {
            version: env!("CARGO_PKG_VERSION").into(),
            protocol: PROTOCOL_VERSION,
            pid: std::process::id(),
            uptime_s: ctx.started.elapsed().as_secs(),
        },
        backend: BackendStatus {
            url: ctx.lmstudio.url().to_owned(),
            reachable: view.reachable,
            simulated: ctx.simulated,
            last_error: view.last_error.map(|e| e.to_string()),
            refreshed_ms_ago: view
                .refreshed_at
                .map(|at| at.elapsed().as_millis().try_into().unwrap_or(u64::MAX)),
        },
        instances,
    }
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
    let view = ctx.fresh_models().await?;
    Ok(ModelList {
        models: view.models.iter().filter_map(model_info).collect(),
    })
}

/// Loads `request.model`, unless an instance is already loaded: LM Studio would make a second
/// instance (`key:2`) of a loaded model, which is never what a plain `load` means.
pub async fn load(ctx: &Context, request: LoadRequest) -> Result<LoadOutcome, TaskError> {
    let view = ctx.fresh_models().await?;
    let model = view
        .models
        .iter()
        .find(|m| m.key == request.model)
        .ok_or_else(|| TaskError::NotFound {
            name: request.model.clone(),
        })?;
    if let Some(instance) = model.loaded_instances.first() {
        return Ok(LoadOutcome {
            model: model.key.clone(),
            instance_id: instance.id.clone(),
            load_time_seconds: 0.0,
            context_length: Some(instance.config.context_length),
            already_loaded: true,
        });
    }
    let body = LoadBody {
        model: request.model.clone(),
        context_length: request.context_length,
        eval_batch_size: request.eval_batch_size,
        flash_attention: request.flash_attention,
        num_experts: request.num_experts,
        offload_kv_cache_to_gpu: request.offload_kv_cache_to_gpu,
        echo_load_config: true,
    };
    let started = Instant::now();
    let reply = ctx.after_error(ctx.lmstudio.load(&body).await)?;
    tracing::info!(model = %request.model, instance = %reply.instance_id, load_ms = started.elapsed().as_millis() as u64, "loaded");
    ctx.catalogue.refresh().await;
    Ok(LoadOutcome {
        model: request.model,
        instance_id: reply.instance_id,
        load_time_seconds: reply.load_time_seconds,
        context_length: reply.load_config.and_then(|c| c.context_length),
        already_loaded: false,
    })
}

/// The instance ids to unload this round: every loaded instance of the key, or the one instance.
fn unload_targets(models: &[Model], request: &UnloadRequest) -> Option<Vec<String>> {
    let instance_ids = |model: &Model| -> Vec<String> {
        model
            .loaded_instances
            .iter()
            .map(|i| i.id.clone())
            .collect()
    };
    if let Some(key) = &request.model {
        if let Some(model) = models.iter().find(|m| &m.key == key) {
            return Some(instance_ids(model));
        }
    }
    // An instance id, given as such or in place of a key (`lmsd-ctl unload qwen/qwen3-4b:2`).
    let wanted = request.instance_id.as_ref().or(request.model.as_ref())?;
    let known = models
        .iter()
        .flat_map(|m| &m.loaded_instances)
        .any(|i| &i.id == wanted);
    known.then(|| vec![wanted.clone()])
}

/// Unloads by instance id only (ids read from `loaded_instances`), then re-reads the catalogue
/// and repeats until LM Studio no longer lists them.
pub async fn unload(ctx: &Context, request: UnloadRequest) -> Result<UnloadOutcome, TaskError> {
    let name = request
        .model
        .clone()
        .or(request.instance_id.clone())
        .unwrap_or_default();
    let mut unloaded: Vec<String> = Vec::new();
    for round in 1..=UNLOAD_ROUNDS {
        let view = ctx.fresh_models().await?;
        let targets = match unload_targets(&view.models, &request) {
            Some(targets) => targets,
            // Gone: fine once we have unloaded it; unknown from the start is an error.
            None if round > 1 => Vec::new(),
            None => return Err(TaskError::NotFound { name }),
        };
        if targets.is_empty() {
            return Ok(UnloadOutcome {
                unloaded,
                rounds: round - 1,
            });
        }
        if round > 1 {
            tracing::warn!(model = %name, round, remaining = ?targets, "instances still loaded after unload; retrying");
            tokio::time::sleep(Duration::from_millis(50 * u64::from(round))).await;
        }
        for id in targets {
            match ctx.lmstudio.unload(&id).await {
                // Gone between our read and the unload: that is what we wanted.
                Ok(()) | Err(BackendError::ModelNotFound { .. }) => {
                    tracing::info!(instance = %id, "unloaded");
                    if !unloaded.contains(&id) {
                        unloaded.push(id);
                    }
                }
                Err(error) => return ctx.after_error(Err(error)),
            }
        }
    }
    let view = ctx.fresh_models().await?;
    match unload_targets(&view.models, &request) {
        Some(remaining) if !remaining.is_empty() => Err(TaskError::UnloadNotVerified {
            remaining,
            rounds: UNLOAD_ROUNDS,
        }),
        _ => Ok(UnloadOutcome {
            unloaded,
            rounds: UNLOAD_ROUNDS,
        }),
    }
}

/// Runs one chat turn; with `stream`, deltas go to `on_event` as they come.
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
    let body = ChatBody {
        model: request.model,
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
    let reply = ctx.after_error(result)?;
    let (content, source) = reply.text().ok_or_else(|| TaskError::EmptyReply {
        instance: reply.model_instance_id.clone(),
    })?;
    if reply.stats.model_load_time_seconds.is_some() {
        // LM Studio loaded the model just in time: the catalogue changed.
        ctx.catalogue.refresh_soon();
    }
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
            model_load_time_seconds: reply.stats.model_load_time_seconds,
        },
        total_ms: started.elapsed().as_millis().try_into().unwrap_or(u64::MAX),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalogue() -> Vec<Model> {
        serde_json::from_str(
            r#"[{"type":"llm","key":"a","loaded_instances":[{"id":"a","config":{"context_length":4096}},{"id":"a:2","config":{"context_length":8192}}]},
                {"type":"llm","key":"b","loaded_instances":[]}]"#,
        )
        .unwrap()
    }

    fn by_model(key: &str) -> UnloadRequest {
        UnloadRequest {
            model: Some(key.into()),
            instance_id: None,
        }
    }

    #[test]
    fn unload_of_a_key_targets_every_instance_by_its_id() {
        assert_eq!(
            unload_targets(&catalogue(), &by_model("a")),
            Some(vec!["a".into(), "a:2".into()])
        );
        assert_eq!(unload_targets(&catalogue(), &by_model("b")), Some(vec![]));
        assert_eq!(unload_targets(&catalogue(), &by_model("zzz")), None);
    }

    #[test]
    fn instance_ids_are_only_sent_when_read_from_loaded_instances() {
        let one = UnloadRequest {
            model: None,
            instance_id: Some("a:2".into()),
        };
        assert_eq!(unload_targets(&catalogue(), &one), Some(vec!["a:2".into()]));
        // Given in place of a key, an instance id still works.
        assert_eq!(
            unload_targets(&catalogue(), &by_model("a:2")),
            Some(vec!["a:2".into()])
        );
        // A key is never sent as an instance id: "b" is a key with no instance.
        let not_an_instance = UnloadRequest {
            model: None,
            instance_id: Some("b".into()),
        };
        assert_eq!(unload_targets(&catalogue(), &not_an_instance), None);
    }
}
