//! The simulator over HTTP: LM Studio's documented shapes and observed quirks.
// In test helpers a failed unwrap is a failed test, which is what it should be.
#![allow(clippy::unwrap_used)]

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use lmstudio_sim::{SimConfig, Simulator};
use serde_json::{json, Value};

async fn sim(config: SimConfig) -> Simulator {
    Simulator::start(config, SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .await
        .unwrap()
}

async fn post(sim: &Simulator, path: &str, body: Value) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(format!("{}{path}", sim.url()))
        .bearer_auth("lmstudio")
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

async fn models(sim: &Simulator) -> Value {
    reqwest::get(format!("{}/api/v1/models", sim.url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

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
    let events: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(events.first(), Some(&"model_load.start"));
    assert!(events.contains(&"model_load.end") && events.contains(&"message.delta"));
    assert_eq!(
        events
            .iter()
            .position(|e| *e == "chat.start")
            .map(|p| p > 0),
        Some(true)
    );
    assert_eq!(events.last(), Some(&"chat.end"));
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
