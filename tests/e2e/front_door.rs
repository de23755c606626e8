//! The HTTP front door, driven by the real `openai` and `anthropic` Python packages.

use lmstudio_sim::SimConfig;

use crate::support::*;

/// A front door with a key and aliases, on the simulator.
async fn front_door(sim: &lmstudio_sim::Simulator, port: u16) -> TestDaemon {
    let extra = format!(
        "[http]\nlisten = \"127.0.0.1:{port}\"\napi_keys = [\"k-test\"]\n\n[routing.aliases]\n\"claude-*\" = \"auto\"\n\"gpt-5-mini\" = \"ibm/granite-4-micro\"\n"
    );
    TestDaemon::start_with(&sim.url(), &extra, &[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_client_works_against_the_front_door() {
    let sim = start_sim(SimConfig::zero_delay()).await;
    let port = free_port();
    let daemon = front_door(&sim, port).await;
    let base = format!("http://127.0.0.1:{port}/v1");
    python_client(
        "openai",
        &[&base, "k-test", "simulator", "ibm/granite-4-micro"],
    )
    .await;
    let stats = sim.stats();
    assert!(stats.responses > 0 && stats.completions > 0, "{stats:?}");
    let metrics = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .bearer_auth("k-test")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("lmsd_tasks_total{kind=\"chat\",outcome=\"ok\"}"),
        "{metrics}"
    );
    // Front-door tasks are tasks like any other: the log shows no prompt either.
    assert!(!daemon.logs().contains("stream please"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_anthropic_client_works_against_the_front_door() {
    let sim = start_sim(SimConfig::zero_delay()).await;
    let port = free_port();
    let daemon = front_door(&sim, port).await;
    let base = format!("http://127.0.0.1:{port}");
    python_client(
        "anthropic",
        &[&base, "k-test", "simulator", "ibm/granite-4-micro"],
    )
    .await;
    assert!(sim.stats().messages > 0);
    // Relayed requests are tasks: in the ledger, with the tokens the engine reported.
    let savings = daemon.ctl(&["--json", "savings"]).await;
    assert_eq!(savings.code, 0, "{}", savings.stderr);
    let report: serde_json::Value = serde_json::from_str(&savings.stdout).unwrap();
    assert!(report["tasks"].as_u64().unwrap() >= 7, "{report}");
    assert!(report["output_tokens"].as_u64().unwrap() > 0, "{report}");
    assert!(!daemon.logs().contains("stream please"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_front_door_beyond_loopback_needs_keys() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("lmsd.toml");
    std::fs::write(&config, "[http]\nlisten = \"0.0.0.0:1235\"\n").unwrap();
    let out = lmsd_command(dir.path())
        .arg("--check-config")
        .arg(&config)
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("api_keys"));
}

/// Running chat tasks, as `lmsd-ctl tasks` lists them.
async fn running_tasks(daemon: &TestDaemon) -> usize {
    let out = daemon.ctl(&["--json", "tasks"]).await;
    let list: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    list["tasks"].as_array().map_or(0, Vec::len)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_client_that_hangs_up_cancels_its_task() {
    let mut config = SimConfig::zero_delay();
    // Slow enough that the answer is still coming when the client leaves.
    config.token_delay = std::time::Duration::from_millis(200);
    let sim = start_sim(config).await;
    let port = free_port();
    let daemon = front_door(&sim, port).await;
    let url = format!("http://127.0.0.1:{port}/v1/messages");
    let body = serde_json::json!({"model": "ibm/granite-4-micro", "max_tokens": 64, "stream": true,
        "messages": [{"role": "user", "content": "a long answer, please"}]});
    let response = reqwest::Client::new()
        .post(&url)
        .header("x-api-key", "k-test")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    use futures_util::StreamExt;
    let first = stream.next().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("message_start"));
    assert_eq!(
        running_tasks(&daemon).await,
        1,
        "the relayed request is a task"
    );
    drop(stream);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while running_tasks(&daemon).await > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the task outlived its client"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let metrics = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .bearer_auth("k-test")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("lmsd_tasks_total{kind=\"chat\",outcome=\"cancelled\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_on_a_whole_reply_cancels_its_task_and_it_is_counted() {
    let mut config = SimConfig::zero_delay();
    config.token_delay = std::time::Duration::from_millis(200);
    let sim = start_sim(config).await;
    let port = free_port();
    let daemon = front_door(&sim, port).await;
    let body = serde_json::json!({"model": "ibm/granite-4-micro", "max_tokens": 64,
        "messages": [{"role": "user", "content": "a long answer, please"}]});
    let gave_up = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/v1/messages"))
        .header("x-api-key", "k-test")
        .timeout(std::time::Duration::from_millis(800))
        .json(&body)
        .send()
        .await;
    assert!(gave_up.is_err(), "the answer takes seconds: {gave_up:?}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let metrics = reqwest::Client::new()
            .get(format!("http://127.0.0.1:{port}/metrics"))
            .bearer_auth("k-test")
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if metrics.contains("lmsd_tasks_total{kind=\"chat\",outcome=\"cancelled\"} 1") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{metrics}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(running_tasks(&daemon).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_refused_before_its_first_event_gets_a_real_status() {
    let sim = start_sim(SimConfig::zero_delay()).await;
    let port = free_port();
    let _daemon = front_door(&sim, port).await;
    let post = |path: &str, body: serde_json::Value| {
        reqwest::Client::new()
            .post(format!("http://127.0.0.1:{port}{path}"))
            .bearer_auth("k-test")
            .json(&body)
            .send()
    };
    let unknown = post(
        "/v1/messages",
        serde_json::json!({"model": "nobody", "max_tokens": 8, "stream": true,
        "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await
    .unwrap();
    assert_eq!(unknown.status(), 404);
    let error: serde_json::Value = unknown.json().await.unwrap();
    assert_eq!(error["error"]["type"], "not_found_error", "{error}");
    // The engine's own refusal of a body (here, a bad role) is the client's 400, with its words.
    let refused = post(
        "/v1/chat/completions",
        serde_json::json!({"model": "ibm/granite-4-micro", "stream": true,
        "messages": [{"role": "user", "content": 7}], "temperature": 9}),
    )
    .await
    .unwrap();
    assert_eq!(refused.status(), 400);
    let error: serde_json::Value = refused.json().await.unwrap();
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("temperature"),
        "{error}"
    );
    // The usage chunk lmsd asks for (the ledger counts it) reaches only a client that asked.
    let plain = post(
        "/v1/chat/completions",
        serde_json::json!({"model": "ibm/granite-4-micro", "stream": true,
        "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await
    .unwrap()
    .text()
    .await
    .unwrap();
    assert!(!plain.contains("\"usage\""), "{plain}");
    assert!(plain.trim_end().ends_with("data: [DONE]"), "{plain}");
}
