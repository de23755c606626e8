//! The HTTP face of the simulator: LM Studio's v1 routes, its JSON shapes and its quirks. The
//! models, load and unload routes live here, with what every route shares (auth, faults, errors,
//! in-flight counts); chat and embeddings have their own files.
// Helpers return `Err(Response)` to end a handler early; a large Err is fine in a test tool.
#![allow(clippy::result_large_err)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::catalogue::{SimFormat, SimModel, SimModelKind};
use crate::errors::ApiError;
use crate::faults::{take_fault, take_fault_where, Fault, Route};
use crate::server::CloseWithoutReply;
use crate::state::{LoadSettings, GGUF_PARALLEL, MLX_PARALLEL};
use crate::{chat, embeddings, Shared};

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/api/v1/models", get(list_models))
        .route("/api/v1/models/load", post(load))
        .route("/api/v1/models/unload", post(unload))
        .route("/api/v1/chat", post(chat::chat))
        .route(
            "/v1/chat/completions",
            post(crate::completions::completions),
        )
        .route("/v1/responses", post(crate::responses::responses))
        .route("/v1/messages", post(crate::messages::messages))
        .route("/v1/embeddings", post(embeddings::embeddings))
        .fallback(unknown_route)
        .with_state(shared)
}

pub(crate) fn error_json(error: &ApiError) -> Value {
    let mut body = json!({"type": error.kind, "message": error.message});
    if let Some(code) = error.code {
        body["code"] = json!(code);
    }
    if let Some(param) = error.param {
        body["param"] = json!(param);
    }
    body
}

pub(crate) fn error_response(error: ApiError) -> Response {
    let status = StatusCode::from_u16(error.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, axum::Json(json!({ "error": error_json(&error) }))).into_response()
}

/// The token a request presents: `Authorization: Bearer T` or `x-api-key: T`, both accepted.
fn presented_token(headers: &HeaderMap) -> Option<&str> {
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    bearer.or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))
}

/// Auth and injected faults, checked before every route. `Ok(Some(fault))` hands a
/// route-specific fault (such as an ignored unload) to the handler.
pub(crate) async fn guard(
    shared: &Shared,
    route: Route,
    headers: &HeaderMap,
) -> Result<Option<Fault>, Response> {
    let (token, fault) = {
        let mut state = shared.lock();
        let token = state.config.auth_token.clone();
        if route == Route::Load {
            state.stats.load_requests += 1;
        }
        if route == Route::Chat {
            state.stats.chat_requests += 1;
        }
        (token, take_fault(&mut state.faults, route))
    };
    if let Some(token) = token {
        if presented_token(headers) != Some(token.as_str()) {
            let body = json!({"error": {"type": "invalid_request", "code": "invalid_api_key",
                "message": "An LM Studio API token is required to make requests to this server, but none was provided using the Authorization header using the 'Bearer' scheme (i.e., 'Authorization: Bearer $LM_API_TOKEN')."}});
            return Err((StatusCode::UNAUTHORIZED, axum::Json(body)).into_response());
        }
    }
    match fault {
        None => Ok(None),
        Some(Fault::Delay(delay)) => {
            tokio::time::sleep(delay).await;
            Ok(None)
        }
        Some(Fault::Status(status)) => Err(error_response(ApiError::new(
            status,
            "internal_error",
            format!("Injected failure with status {status}"),
        ))),
        Some(Fault::ErrorWith200) => Err(error_response(ApiError::new(
            200,
            "unknown",
            "Injected failure answered with 200",
        ))),
        Some(Fault::Html500) => Err((
            StatusCode::INTERNAL_SERVER_ERROR,
            [("content-type", "text/html; charset=utf-8")],
            "<!DOCTYPE html>\n<html><head><title>Error</title></head><body><pre>Internal Server Error</pre></body></html>",
        )
            .into_response()),
        Some(Fault::MalformedJson) => Err((
            StatusCode::OK,
            [("content-type", "application/json")],
            r#"{"models": [{"type": "llm", "key": "#,
        )
            .into_response()),
        Some(Fault::DropConnection) => {
            // A body that fails at once: the server aborts the connection mid-response.
            let broken = futures_util::stream::once(async {
                Err::<Bytes, _>(std::io::Error::other("simulated dropped connection"))
            });
            Err(Body::from_stream(broken).into_response())
        }
        // The handler acts on the rest; a fault meant for another route does nothing here.
        Some(fault) => Ok(Some(fault)),
    }
}

/// Sleeps, except for zero: tokio rounds any sleep up to its 1 ms timer tick, which would make
/// zero-delay mode cost a millisecond per token.
pub(crate) async fn pause(duration: Duration) {
    if !duration.is_zero() {
        tokio::time::sleep(duration).await;
    }
}

/// Parses a request body strictly, answering as LM Studio's validator does.
/// What every POST route checks first: auth and faults (see [`guard`]), then its body, parsed
/// strictly.
pub(crate) async fn accept<T: for<'de> Deserialize<'de>>(
    shared: &Shared,
    route: Route,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<(Option<Fault>, T), Response> {
    let fault = guard(shared, route, headers).await?;
    Ok((fault, parse_body(body)?))
}

pub(crate) fn parse_body<T: for<'de> Deserialize<'de>>(body: &Bytes) -> Result<T, Response> {
    serde_json::from_slice(body).map_err(|e| {
        let message = match e.classify() {
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
                format!("Invalid JSON in request body: {e}")
            }
            _ => e
                .to_string()
                .replace("unknown field", "Unrecognized key(s) in object:"),
        };
        error_response(ApiError::invalid_request(message))
    })
}

async fn unknown_route(method: Method, uri: Uri) -> Response {
    axum::Json(
        json!({"error": format!("Unexpected endpoint or method. ({method} {})", uri.path())}),
    )
    .into_response()
}

fn model_json(model: &SimModel, instances: &[Value]) -> Value {
    let mut entry = json!({
        "type": model.kind,
        "publisher": model.publisher,
        "key": model.key,
        "display_name": model.display_name,
        "quantization": {"name": model.quantization, "bits_per_weight": if model.quantization == "F16" { 16 } else { 4 }},
        "size_bytes": model.size_bytes,
        "params_string": model.params_string,
        "loaded_instances": instances,
        "max_context_length": model.max_context_length,
        "format": model.format,
    });
    if model.kind == SimModelKind::Llm {
        entry["architecture"] = json!(model.architecture);
        let mut capabilities =
            json!({"vision": model.vision, "trained_for_tool_use": model.tool_use});
        if model.reasoning {
            capabilities["reasoning"] = json!({"allowed_options": ["off", "on"], "default": "on"});
        }
        entry["capabilities"] = capabilities;
        entry["description"] = Value::Null;
    }
    entry
}

async fn list_models(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if let Err(response) = guard(&shared, Route::Models, &headers).await {
        return response;
    }
    let state = shared.lock();
    let models: Vec<Value> = state
        .config
        .catalogue
        .iter()
        .map(|model| {
            let instances: Vec<Value> = state
                .instances
                .iter()
                .filter(|i| i.key == model.key)
                .map(|i| {
                    // Embedding instances have no parallel (or other LLM) keys, by design.
                    let mut config = json!({"context_length": i.context_length});
                    if i.kind == SimModelKind::Llm {
                        let parallel = match i.format {
                            SimFormat::Gguf => GGUF_PARALLEL,
                            SimFormat::Mlx => MLX_PARALLEL,
                        };
                        config["eval_batch_size"] =
                            json!(i.settings.eval_batch_size.unwrap_or(512));
                        config["parallel"] = json!(parallel);
                        config["flash_attention"] =
                            json!(i.settings.flash_attention.unwrap_or(true));
                        config["offload_kv_cache_to_gpu"] =
                            json!(i.settings.offload_kv_cache_to_gpu.unwrap_or(true));
                        if let Some(experts) = i.settings.num_experts {
                            config["num_experts"] = json!(experts);
                        }
                    }
                    json!({"id": i.id, "config": config})
                })
                .collect();
            model_json(model, &instances)
        })
        .collect();
    axum::Json(json!({ "models": models })).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoadBody {
    model: String,
    context_length: Option<u32>,
    eval_batch_size: Option<u32>,
    flash_attention: Option<bool>,
    num_experts: Option<u32>,
    offload_kv_cache_to_gpu: Option<bool>,
    #[serde(default)]
    echo_load_config: bool,
}

/// Reserves memory, waits the load time (reporting progress), and creates the instance. An
/// injected `ContextAutoFit` on `route` decides the context. The waiting runs in its own task:
/// a load goes on when the request that asked for it goes away, as LM Studio's does (and its
/// reserved memory is never stranded).
pub(crate) async fn load_instance(
    shared: &Arc<Shared>,
    key: &str,
    settings: LoadSettings,
    jit: bool,
    route: Route,
    mut on_progress: impl FnMut(f64) + Send + 'static,
) -> Result<(String, Duration), ApiError> {
    let (ticket, load_time) = {
        let mut state = shared.lock();
        let mut ticket = state.begin_load(key, settings, jit)?;
        let auto_fit = take_fault_where(&mut state.faults, route, |f| {
            matches!(f, Fault::ContextAutoFit(_))
        });
        if let Some(Fault::ContextAutoFit(context_length)) = auto_fit {
            ticket.context_override = Some(context_length);
        }
        let load_time = state.config.load_time(ticket.size_bytes);
        (ticket, load_time)
    };
    let shared = shared.clone();
    let loading = tokio::spawn(async move {
        const STEPS: u32 = 4;
        for step in 1..=STEPS {
            pause(load_time / STEPS).await;
            on_progress(f64::from(step) / f64::from(STEPS));
        }
        let id = shared.lock().finish_load(ticket, Instant::now())?;
        Ok((id, load_time))
    });
    loading
        .await
        .unwrap_or_else(|_| Err(ApiError::load_failed()))
}

async fn load(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let (fault, body): (_, LoadBody) = match accept(&shared, Route::Load, &headers, &body).await {
        Ok(accepted) => accepted,
        Err(response) => return response,
    };
    let settings = LoadSettings {
        context_length: body.context_length,
        eval_batch_size: body.eval_batch_size,
        flash_attention: body.flash_attention,
        num_experts: body.num_experts,
        offload_kv_cache_to_gpu: body.offload_kv_cache_to_gpu,
    };
    if fault == Some(Fault::LoadFailed) {
        // The checks a real load passes (model, context, guardrail), then the engine dies.
        let mut state = shared.lock();
        return match state.begin_load(&body.model, settings, false) {
            Ok(ticket) => {
                state.cancel_load(ticket);
                error_response(ApiError::load_failed())
            }
            Err(error) => error_response(error),
        };
    }
    let kind = shared.lock().model(&body.model).map(|m| m.kind);
    let loaded = load_instance(&shared, &body.model, settings, false, Route::Load, |_| {}).await;
    if fault == Some(Fault::DropLoadReply) {
        return CloseWithoutReply::response();
    }
    match loaded {
        Err(error) => error_response(error),
        Ok((instance_id, load_time)) => {
            let mut reply = json!({
                "type": kind.unwrap_or(SimModelKind::Llm),
                "instance_id": instance_id,
                "load_time_seconds": load_time.as_secs_f64(),
                "status": "loaded",
            });
            if body.echo_load_config {
                let context_length = shared
                    .lock()
                    .instance(&instance_id)
                    .map(|i| i.context_length);
                reply["load_config"] = json!({"context_length": context_length});
            }
            axum::Json(reply).into_response()
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UnloadBody {
    instance_id: String,
}

async fn unload(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let (fault, body): (_, UnloadBody) = match accept(&shared, Route::Unload, &headers, &body).await
    {
        Ok(accepted) => accepted,
        Err(response) => return response,
    };
    let result = match fault {
        Some(Fault::IgnoreUnload) => Ok(()),
        Some(Fault::GoneBeforeUnload) => {
            // Gone a moment earlier (TTL, auto-evict, crash); the answer real servers might give
            // for an unknown id, where the default is a 404.
            shared.lock().remove_instance(&body.instance_id);
            Err(ApiError::invalid_request(format!(
                "No model found with instance_id \"{}\"",
                body.instance_id
            )))
        }
        _ => shared.lock().unload(&body.instance_id),
    };
    match result {
        Ok(()) => axum::Json(json!({"instance_id": body.instance_id})).into_response(),
        Err(error) => error_response(error),
    }
}

/// Counts a request as in flight on its instance and restarts the instance's idle clock when it
/// ends, however it ends. Held by serial, so that a later instance with the same id is never
/// touched.
#[derive(Debug)]
pub(crate) struct InFlight {
    shared: Arc<Shared>,
    pub serial: u64,
}

impl InFlight {
    /// `None` when the instance is gone. A chat on a busy MLX instance crashes it: `Err`.
    pub fn begin(
        shared: &Arc<Shared>,
        instance_id: &str,
        prediction: bool,
    ) -> Result<Option<Self>, ApiError> {
        let mut state = shared.lock();
        let Some(instance) = state.instance_mut(instance_id) else {
            return Ok(None);
        };
        let crashes = prediction
            && instance.format == SimFormat::Mlx
            && instance.kind == SimModelKind::Llm
            && instance.in_flight > 0;
        instance.in_flight += 1;
        instance.last_used = Instant::now();
        let (in_flight, serial) = (instance.in_flight, instance.serial);
        state.stats.max_in_flight = state.stats.max_in_flight.max(in_flight);
        if crashes {
            // Two concurrent predictions take an MLX model down (#2255), both of them with it.
            state.crash(instance_id);
            return Err(ApiError::crashed());
        }
        Ok(Some(InFlight {
            shared: shared.clone(),
            serial,
        }))
    }

    /// Whether the instance crashed under this request.
    pub fn crashed(&self) -> bool {
        self.shared.lock().crashed.contains(&self.serial)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(instance) = self.shared.lock().instance_by_serial_mut(self.serial) {
            instance.in_flight = instance.in_flight.saturating_sub(1);
            instance.last_used = Instant::now();
        }
    }
}
