//! Helpers the simulator's HTTP tests share: a simulator on a free port, JSON posts, SSE frames.
// In test helpers a failed unwrap is a failed test, which is what it should be.
#![allow(clippy::unwrap_used, dead_code)]

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use lmstudio_sim::{SimConfig, Simulator};
use serde_json::Value;

pub const GRANITE: &str = "ibm/granite-4-micro";
pub const QWEN: &str = "qwen/qwen3-4b";
pub const NOMIC: &str = "text-embedding-nomic-embed-text-v1.5";

pub async fn sim(config: SimConfig) -> Simulator {
    Simulator::start(config, SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .await
        .unwrap()
}

pub async fn post(sim: &Simulator, path: &str, body: Value) -> (u16, Value) {
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

/// A streamed chat's SSE text.
pub async fn stream(sim: &Simulator, body: Value) -> String {
    reqwest::Client::new()
        .post(format!("{}/api/v1/chat", sim.url()))
        .json(&body)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// SSE frames as (event name, data).
pub fn sse_events(text: &str) -> Vec<(String, Value)> {
    text.split("\n\n")
        .filter_map(|frame| {
            let name = frame.lines().find_map(|l| l.strip_prefix("event: "))?;
            let data = frame.lines().find_map(|l| l.strip_prefix("data: "))?;
            Some((name.to_owned(), serde_json::from_str(data).unwrap()))
        })
        .collect()
}

pub async fn models(sim: &Simulator) -> Value {
    reqwest::get(format!("{}/api/v1/models", sim.url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The listing's entry for `key`.
pub async fn model(sim: &Simulator, key: &str) -> Value {
    let listed = models(sim).await;
    listed["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["key"] == key)
        .unwrap()
        .clone()
}

/// Waits up to 5 s for `done`.
pub async fn eventually(what: &str, done: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
