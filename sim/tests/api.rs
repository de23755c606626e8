//! The simulator over HTTP: LM Studio's documented shapes and observed quirks (models, load,
//! unload, auth, embeddings, and the basics of chat; `chat.rs` and `wire.rs` have the rest).
// In test helpers a failed unwrap is a failed test, which is what it should be.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use lmstudio_sim::{embed_text, Fault, Route, SimConfig, SimFormat, Simulator, Times};
use serde_json::{json, Value};
use support::{eventually, model, models, post, sim, sse_events, GRANITE, NOMIC, QWEN};

#[tokio::test]
async fn unknown_routes_answer_200_with_an_error_string() {
    let sim = sim(SimConfig::zero_delay()).await;
    let (status, body) = post(&sim, "/v1/models/unload", json!({"instance_id": "x"})).await;
    assert_eq!(status, 200);
    assert_eq!(
        body["error"],
        "Unexpected endpoint or method. (POST /v1/models/unload)"
    );
}

#[tokio::test]
async fn load_is_strict_and_a_second_load_makes_key_2() {
    let sim = sim(SimConfig::zero_delay()).await;
    let (status, body) = post(
        &sim,
        "/api/v1/models/load",
        json!({"model": "qwen/qwen3-4b", "ttl": 60}),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["type"], "invalid_request");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("Unrecognized key(s) in object"));

    let (status, first) = post(
        &sim,
        "/api/v1/models/load",
        json!({"model": "qwen/qwen3-4b", "echo_load_config": true}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(first["instance_id"], "qwen/qwen3-4b");
    assert_eq!(first["status"], "loaded");
    assert_eq!(first["load_config"]["context_length"], 4096);
    let (_, second) = post(
        &sim,
        "/api/v1/models/load",
        json!({"model": "qwen/qwen3-4b"}),
    )
    .await;
    assert_eq!(second["instance_id"], "qwen/qwen3-4b:2");

    let listed = models(&sim).await;
    let qwen = listed["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["key"] == "qwen/qwen3-4b")
        .unwrap();
    let ids: Vec<&str> = qwen["loaded_instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["qwen/qwen3-4b", "qwen/qwen3-4b:2"]);
    assert_eq!(qwen["loaded_instances"][0]["config"]["parallel"], 4);

    // Unload takes an instance id; the model stays listed with no instances.
    let (status, body) = post(
        &sim,
        "/api/v1/models/unload",
        json!({"instance_id": "qwen/qwen3-4b:2"}),
    )
    .await;
    assert_eq!(
        (status, body),
        (200, json!({"instance_id": "qwen/qwen3-4b:2"}))
    );
    let (status, body) = post(
        &sim,
        "/api/v1/models/unload",
        json!({"instance_id": "qwen/qwen3-4b:2"}),
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["type"], "model_not_found");
}

#[tokio::test]
async fn auth_when_required() {
    let mut config = SimConfig::zero_delay();
    config.auth_token = Some("sk-lm-x:y".into());
    let sim = sim(config).await;
    let response = reqwest::get(format!("{}/api/v1/models", sim.url()))
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 401);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_api_key");
    let ok = reqwest::Client::new()
        .get(format!("{}/api/v1/models", sim.url()))
        .bearer_auth("sk-lm-x:y")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status().as_u16(), 200);
}

#[tokio::test]
async fn memory_runs_out() {
    let mut config = SimConfig::zero_delay();
    config.memory_bytes = 5_000_000_000;
    let sim = sim(config).await;
    let (status, _) = post(
        &sim,
        "/api/v1/models/load",
        json!({"model": "qwen/qwen3-4b"}),
    )
    .await;
    assert_eq!(status, 200);
    let (status, body) = post(
        &sim,
        "/api/v1/models/load",
        json!({"model": "qwen/qwen3-vl-4b"}),
    )
    .await;
    assert_eq!(status, 500);
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("insufficient system resources"));
    assert_eq!(sim.peak_memory_bytes(), 2_500_000_000);
}

#[tokio::test]
async fn streamed_chat_loads_just_in_time_and_runs_start_to_end() {
    let sim = sim(SimConfig::zero_delay()).await;
    let text = reqwest::Client::new()
        .post(format!("{}/api/v1/chat", sim.url()))
        .json(&json!({"model": "ibm/granite-4-micro", "input": "hello", "stream": true}))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let events = sse_events(&text);
    let names: Vec<&str> = events.iter().map(|(name, _)| name.as_str()).collect();
    // The docs' order: chat.start first, the JIT load inside the chat, chat.end last.
    assert_eq!(
        names[..4],
        [
            "chat.start",
            "model_load.start",
            "model_load.progress",
            "model_load.progress"
        ]
    );
    let position = |name: &str| names.iter().position(|n| *n == name).unwrap();
    assert!(position("model_load.end") < position("prompt_processing.start"));
    assert!(position("prompt_processing.end") < position("message.start"));
    assert!(names.contains(&"message.delta"));
    assert_eq!(names.last(), Some(&"chat.end"));
    assert_eq!(events[0].1["model_instance_id"], "ibm/granite-4-micro");
    for (name, data) in &events {
        assert_eq!(
            data["type"],
            name.as_str(),
            "every data object names its event"
        );
    }
    assert_eq!(sim.stats().jit_loads, 1);
}

#[tokio::test]
async fn jit_instances_expire_after_their_idle_ttl() {
    let mut config = SimConfig::zero_delay();
    config.jit_ttl = Duration::from_millis(200);
    let sim = sim(config).await;
    let (status, reply) = post(
        &sim,
        "/api/v1/chat",
        json!({"model": "ibm/granite-4-micro", "input": "hi", "store": false}),
    )
    .await;
    assert_eq!(status, 200);
    assert!(
        reply.get("response_id").is_none(),
        "store:false keeps no response"
    );
    assert!(reply["stats"]["model_load_time_seconds"].is_number());
    assert_eq!(sim.loaded_instances(), ["ibm/granite-4-micro"]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !sim.loaded_instances().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the JIT instance never expired"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(sim.stats().unloads, 1);
}

#[tokio::test]
async fn an_unknown_previous_response_is_an_error() {
    let sim = sim(SimConfig::zero_delay()).await;
    let (status, body) = post(
        &sim,
        "/api/v1/chat",
        json!({"model": "ibm/granite-4-micro", "input": "hi", "previous_response_id": "resp_nope"}),
    )
    .await;
    assert_eq!(status, 400);
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("resp_nope"));
}

fn with_mlx_model(mut config: SimConfig) -> SimConfig {
    let mut mlx = lmstudio_sim::default_catalogue()[0].clone();
    mlx.key = MLX.into();
    mlx.format = SimFormat::Mlx;
    config.catalogue.push(mlx);
    config
}

const MLX: &str = "mlx-community/granite-4-micro-mlx";

#[tokio::test]
async fn the_listing_reports_format_and_parallel_per_engine() {
    let sim = sim(with_mlx_model(SimConfig::zero_delay())).await;
    for key in [GRANITE, MLX, NOMIC] {
        let (status, _) = post(&sim, "/api/v1/models/load", json!({ "model": key })).await;
        assert_eq!(status, 200);
    }
    let granite = model(&sim, GRANITE).await;
    assert_eq!(granite["format"], "gguf");
    assert_eq!(granite["loaded_instances"][0]["config"]["parallel"], 4);
    let mlx = model(&sim, MLX).await;
    assert_eq!(mlx["format"], "mlx");
    assert_eq!(mlx["loaded_instances"][0]["config"]["parallel"], 1);
    let nomic = model(&sim, NOMIC).await;
    let config = nomic["loaded_instances"][0]["config"].as_object().unwrap();
    assert_eq!(config.keys().collect::<Vec<_>>(), ["context_length"]);
}

#[tokio::test]
async fn auth_takes_x_api_key_as_well_as_bearer() {
    let mut config = SimConfig::zero_delay();
    config.auth_token = Some("sk-lm-x:y".into());
    let sim = sim(config).await;
    let get = |key: &'static str| {
        reqwest::Client::new()
            .get(format!("{}/api/v1/models", sim.url()))
            .header("x-api-key", key)
            .send()
    };
    assert_eq!(get("sk-lm-x:y").await.unwrap().status().as_u16(), 200);
    assert_eq!(get("wrong").await.unwrap().status().as_u16(), 401);
}

#[tokio::test]
async fn a_load_goes_on_when_its_client_disconnects() {
    let mut config = SimConfig::zero_delay();
    // Qwen (2.5 GB) takes half a second; memory for one Qwen only.
    config.load_bytes_per_sec = Some(5_000_000_000);
    config.memory_bytes = 3_000_000_000;
    let sim = sim(config).await;
    let gave_up = reqwest::Client::new()
        .post(format!("{}/api/v1/models/load", sim.url()))
        .timeout(Duration::from_millis(100))
        .json(&json!({ "model": QWEN }))
        .send()
        .await;
    assert!(gave_up.is_err(), "the client gives up before the load ends");
    eventually("the load to finish", || sim.loaded_instances() == [QWEN]).await;
    assert_eq!(sim.stats().loads, 1);
    // Nothing stays reserved: after an unload, the same load fits again.
    let (status, _) = post(&sim, "/api/v1/models/unload", json!({"instance_id": QWEN})).await;
    assert_eq!(status, 200);
    let (status, body) = post(&sim, "/api/v1/models/load", json!({ "model": QWEN })).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn injected_auto_fit_decides_the_loaded_context() {
    let sim = sim(SimConfig::zero_delay()).await;
    sim.inject(Route::Load, Fault::ContextAutoFit(40192), Times::Once);
    // A chat's JIT load does not use up a fault meant for loads.
    let (status, _) = post(
        &sim,
        "/api/v1/chat",
        json!({"model": GRANITE, "input": "hi"}),
    )
    .await;
    assert_eq!(status, 200);
    let granite = model(&sim, GRANITE).await;
    assert_eq!(
        granite["loaded_instances"][0]["config"]["context_length"],
        4096
    );
    let body = json!({"model": QWEN, "context_length": 8192, "echo_load_config": true});
    let (status, reply) = post(&sim, "/api/v1/models/load", body.clone()).await;
    assert_eq!(status, 200);
    assert_eq!(reply["load_config"]["context_length"], 40192);
    let qwen = model(&sim, QWEN).await;
    assert_eq!(
        qwen["loaded_instances"][0]["config"]["context_length"],
        40192
    );
    let (_, again) = post(&sim, "/api/v1/models/load", body).await;
    assert_eq!(again["load_config"]["context_length"], 8192, "used up");

    sim.inject(Route::Chat, Fault::ContextAutoFit(2048), Times::Once);
    let chat = json!({"model": "qwen/qwen3-vl-4b", "input": "hi", "context_length": 16384});
    let (status, _) = post(&sim, "/api/v1/chat", chat).await;
    assert_eq!(status, 200);
    let vl = model(&sim, "qwen/qwen3-vl-4b").await;
    assert_eq!(vl["loaded_instances"][0]["config"]["context_length"], 2048);
}

#[tokio::test]
async fn an_injected_load_failure_says_nothing_about_memory_and_loads_nothing() {
    let mut config = SimConfig::zero_delay();
    config.memory_bytes = 3_000_000_000;
    let sim = sim(config).await;
    sim.inject(Route::Load, Fault::LoadFailed, Times::Once);
    let (status, body) = post(&sim, "/api/v1/models/load", json!({ "model": QWEN })).await;
    assert_eq!(status, 500);
    assert_eq!(
        body,
        json!({"error": {"type": "model_load_failed", "message": "Error loading model. (Exit code: null). Unknown error. Try a different model and/or config."}})
    );
    assert!(sim.loaded_instances().is_empty());
    assert_eq!(sim.stats().loads, 0);
    let (status, _) = post(&sim, "/api/v1/models/load", json!({ "model": QWEN })).await;
    assert_eq!(status, 200, "no memory stays reserved");
}

#[tokio::test]
async fn unloading_an_instance_that_just_went_away_can_be_a_400() {
    let sim = sim(SimConfig::zero_delay()).await;
    post(&sim, "/api/v1/models/load", json!({ "model": QWEN })).await;
    sim.inject(Route::Unload, Fault::GoneBeforeUnload, Times::Once);
    let (status, body) = post(&sim, "/api/v1/models/unload", json!({"instance_id": QWEN})).await;
    assert_eq!(status, 400);
    assert_eq!(
        body,
        json!({"error": {"type": "invalid_request", "message": "No model found with instance_id \"qwen/qwen3-4b\""}})
    );
    assert!(sim.loaded_instances().is_empty());
    assert_eq!(sim.stats().unloads, 0);

    post(&sim, "/api/v1/models/load", json!({ "model": QWEN })).await;
    assert!(sim.drop_instance(QWEN));
    assert!(!sim.drop_instance(QWEN));
    let (status, body) = post(&sim, "/api/v1/models/unload", json!({"instance_id": QWEN})).await;
    assert_eq!(
        (status, &body["error"]["type"]),
        (404, &json!("model_not_found"))
    );
}

async fn embed(sim: &Simulator, model: &str, input: Value) -> (u16, Value) {
    post(
        sim,
        "/v1/embeddings",
        json!({ "model": model, "input": input }),
    )
    .await
}

#[tokio::test]
async fn embeddings_jit_load_their_model_and_vectors_depend_on_it() {
    let mut config = SimConfig::zero_delay();
    config.jit_ttl = Duration::from_millis(300);
    let sim = sim(config).await;
    let (status, body) = embed(&sim, NOMIC, json!(["one", "two"])).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["model"], NOMIC);
    assert_eq!(
        body["data"][1]["embedding"],
        json!(embed_text(NOMIC, "two"))
    );
    assert_eq!((sim.stats().jit_loads, sim.stats().embeddings), (1, 1));
    assert_ne!(
        embed_text(NOMIC, "two"),
        embed_text("other/embedder", "two")
    );
    // An LLM stays a 400, loaded or not.
    let (status, _) = embed(&sim, GRANITE, json!("x")).await;
    assert_eq!(status, 400);
    // JIT-loaded, so the JIT TTL applies.
    eventually("the JIT TTL", || sim.loaded_instances().is_empty()).await;
}

#[tokio::test]
async fn embeddings_for_a_name_not_loaded_are_served_by_the_loaded_model() {
    let mut config = SimConfig::zero_delay();
    config.jit = false;
    let sim = sim(config).await;
    let (status, body) = embed(&sim, NOMIC, json!("x")).await;
    assert_eq!(status, 400);
    assert_eq!(
        body["error"]["message"],
        "No models loaded. Please load a model in the developer page or use the 'lms load' command."
    );
    post(&sim, "/api/v1/models/load", json!({ "model": NOMIC })).await;
    for name in [format!("{NOMIC}:2"), "someone/else".to_string()] {
        let (status, body) = embed(&sim, &name, json!("x")).await;
        assert_eq!(status, 200);
        assert_eq!(
            body["model"], NOMIC,
            "the reply names the instance that served"
        );
        assert_eq!(body["data"][0]["embedding"], json!(embed_text(NOMIC, "x")));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedding_instance_serves_one_request_at_a_time() {
    let mut config = SimConfig::zero_delay();
    config.embed_delay = Duration::from_millis(100);
    let sim = sim(config).await;
    post(&sim, "/api/v1/models/load", json!({ "model": NOMIC })).await;
    let started = std::time::Instant::now();
    let requests = (0..4).map(|n| embed(&sim, NOMIC, json!(format!("text {n}"))));
    let replies = futures_util::future::join_all(requests).await;
    assert!(replies.iter().all(|(status, _)| *status == 200));
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "one after another"
    );
    assert_eq!(
        sim.stats().max_in_flight,
        4,
        "all four were in flight at once"
    );
    assert_eq!(sim.stats().embeddings, 4);
}

#[tokio::test]
async fn an_injected_crash_on_embeddings_removes_the_instance() {
    let sim = sim(SimConfig::zero_delay()).await;
    post(&sim, "/api/v1/models/load", json!({ "model": NOMIC })).await;
    sim.inject(Route::Embeddings, Fault::Crash, Times::Once);
    let (status, body) = embed(&sim, NOMIC, json!("x")).await;
    assert_eq!(status, 400);
    assert_eq!(
        body,
        json!({"error": "The model has crashed without additional information. (Exit code: null)"})
    );
    assert!(sim.loaded_instances().is_empty());
    assert_eq!(sim.stats().crashes, 1);
}
