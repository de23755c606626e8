//! `POST /v1/embeddings`: deterministic vectors per model and text, one request at a time per
//! instance, JIT loads, and the OpenAI-compatible habit of answering with whatever embedding
//! model is loaded.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::api::{accept, error_response, load_instance, pause, InFlight};
use crate::errors::{ApiError, CRASH_MESSAGE};
use crate::faults::{Fault, Route};
use crate::state::{LoadSettings, Target};
use crate::Shared;

#[derive(Deserialize)]
struct EmbeddingsBody {
    model: String,
    input: Value,
}

const FNV_OFFSET: u64 = 1469598103934665603;
const FNV_PRIME: u64 = 1099511628211;

fn fnv(seed: u64, bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes
        .into_iter()
        .fold(seed, |h, b| (h ^ u64::from(b)).wrapping_mul(FNV_PRIME))
}

/// The vector the simulator gives `text` on model `model_key` (a key, not an instance id): a
/// deterministic unit vector (to six decimals, which JSON carries exactly), equal for equal
/// (model, text), of 8 to 12 dimensions depending on the model, so that vectors from different
/// models do not pass for each other.
pub fn embed_text(model_key: &str, text: &str) -> Vec<f64> {
    let dimensions = 8 + (fnv(FNV_OFFSET, model_key.bytes()) % 5) as usize;
    // A separator no text byte can fake: the key's bytes, 0xff (never in UTF-8), the text's.
    let bytes = || model_key.bytes().chain([0xff]).chain(text.bytes());
    let mut vector: Vec<f64> = (0..dimensions as u64)
        .map(|i| (fnv(FNV_OFFSET ^ i, bytes()) % 2000) as f64 / 1000.0 - 1.0)
        .collect();
    let norm = vector.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-9);
    // Six decimals: a value that survives a JSON round trip exactly, whatever the parser.
    vector
        .iter_mut()
        .for_each(|x| *x = (*x / norm * 1e6).round() / 1e6);
    vector
}

pub(crate) async fn embeddings(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (fault, body): (_, EmbeddingsBody) =
        match accept(&shared, Route::Embeddings, &headers, &body).await {
            Ok(accepted) => accepted,
            Err(response) => return response,
        };
    let texts: Vec<String> = match body.input {
        Value::String(text) => vec![text],
        Value::Array(items) => items
            .into_iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => {
            return error_response(ApiError::invalid_request(
                "'input' must be a string or an array of strings",
            ))
        }
    };
    let target = shared.lock().embedding_target(&body.model);
    let target = match target {
        Ok(target) => target,
        Err(error) => return error_response(error),
    };
    if fault == Some(Fault::Crash) {
        if let Target::Loaded(id) = &target {
            shared.lock().crash(id);
        }
        // The compatible endpoints give this one as a plain string.
        let body = json!({ "error": CRASH_MESSAGE });
        return (StatusCode::BAD_REQUEST, axum::Json(body)).into_response();
    }
    let instance_id = match target {
        Target::Loaded(id) => id,
        Target::NeedsLoad(key) => {
            let settings = LoadSettings::default();
            let loaded =
                load_instance(&shared, &key, settings, true, Route::Embeddings, |_| {}).await;
            match loaded {
                Ok((id, _)) => id,
                Err(error) => return error_response(error),
            }
        }
    };
    // In flight from arrival, waiting or not: a test sees how many a client sent at once.
    let flight = match InFlight::begin(&shared, &instance_id, false) {
        Ok(Some(flight)) => flight,
        Ok(None) => return error_response(ApiError::model_not_found(&instance_id)),
        Err(error) => return error_response(error),
    };
    let (serve_lock, key, delay) = {
        let state = shared.lock();
        let Some(instance) = state.instance(&instance_id) else {
            return error_response(ApiError::model_not_found(&instance_id));
        };
        (
            instance.serve_lock.clone(),
            instance.key.clone(),
            state.config.embed_delay,
        )
    };
    // One at a time per instance, as LM Studio serves embeddings (#1152, #1487).
    let _serving = serve_lock.lock().await;
    pause(delay).await;
    if flight.crashed() {
        let body = json!({ "error": CRASH_MESSAGE });
        return (StatusCode::BAD_REQUEST, axum::Json(body)).into_response();
    }
    shared.lock().stats.embeddings += 1;
    let data: Vec<Value> = texts
        .iter()
        .enumerate()
        .map(|(index, text)| json!({"object": "embedding", "embedding": embed_text(&key, text), "index": index}))
        .collect();
    axum::Json(json!({"object": "list", "data": data, "model": instance_id, "usage": {"prompt_tokens": 0, "total_tokens": 0}})).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectors_are_unit_length_and_differ_per_model_and_text() {
        let a = embed_text("text-embedding-nomic-embed-text-v1.5", "hello");
        assert_eq!(
            a,
            embed_text("text-embedding-nomic-embed-text-v1.5", "hello")
        );
        assert_ne!(
            a,
            embed_text("text-embedding-nomic-embed-text-v1.5", "hullo")
        );
        assert_ne!(a, embed_text("other/embedder", "hello"));
        assert!((8..=12).contains(&a.len()));
        let norm: f64 = a.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5);
        let dims: std::collections::HashSet<usize> = ["a", "b", "c", "d", "e", "f", "g"]
            .iter()
            .map(|k| embed_text(k, "x").len())
            .collect();
        assert!(dims.len() > 1, "dimensions depend on the model");
    }
}
