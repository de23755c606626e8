//! End-to-end tests: the real `lmsd` binary on a temp socket against the LM Studio simulator,
//! driven through `lmsd-ctl` and raw protocol lines.
// Helpers here are test code too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod batch;
mod contracts;
mod dashboard;
mod fidelity;
mod front_door;
mod mcp;
mod pool;
mod real_engine;
mod reliability;
mod service;
mod skill;
mod support;
mod tasks;
mod vision;

use std::time::Duration;

use lmsd_proto::{ChatRequest, ClientError, Event, Outcome, Request};
use lmstudio_sim::{Fault, Route, SimConfig, Times};
use serde_json::Value;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_models_reflect_lm_studio() {
    let sim = start_sim(SimConfig::zero_delay()).await;
    let daemon = TestDaemon::start(&sim.url()).await;

    let status = daemon.ctl_json(&["status"]).await;
    assert_eq!(status["backend"]["url"], sim.url());
    assert_eq!(status["backend"]["reachable"], true);
    assert_eq!(status["backend"]["simulated"], false);
    assert_eq!(status["instances"], Value::Array(vec![]));

    let human = daemon.ctl(&["status"]).await;
    assert_eq!(human.code, 0);
    assert!(
        human.stdout.contains("reachable") && human.stdout.contains("no instances loaded"),
        "{}",
        human.stdout
    );

    let table = daemon.ctl(&["models"]).await.stdout;
    assert!(
        table.contains("KEY") && table.contains("qwen/qwen3-4b") && table.contains("reasoning"),
        "{table}"
    );
    let models = daemon.ctl_json(&["models"]).await;
    let keys: Vec<&str> = models["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["key"].as_str().unwrap())
        .collect();
    assert!(keys.len() >= 5, "{keys:?}");
    assert!(
        keys.contains(&"qwen/qwen3-4b") && keys.contains(&"text-embedding-nomic-embed-text-v1.5")
    );
    let embedding = models["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["type"] == "embedding")
        .unwrap();
    assert_eq!(embedding["vision"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_is_explicit_idempotent_and_applies_settings() {
    let sim = start_sim(SimConfig::zero_delay()).await;
    let daemon = TestDaemon::start(&sim.url()).await;

    let load = daemon
        .ctl_json(&["load", "qwen/qwen3-4b", "--context-length", "8192"])
        .await;
    assert_eq!(load["instance_id"], "qwen/qwen3-4b");
    assert_eq!(load["context_length"], 8192);
    assert_eq!(load["already_loaded"], false);
    assert_eq!(sim.loaded_instances(), ["qwen/qwen3-4b"]);

    // A second load must not make a `key:2` instance.
    let again = daemon.ctl_json(&["load", "qwen/qwen3-4b"]).await;
    assert_eq!(again["already_loaded"], true);
    assert_eq!(sim.loaded_instances(), ["qwen/qwen3-4b"]);
    assert_eq!(sim.stats().loads, 1);

    let status = daemon.ctl_json(&["status"]).await;
    let instance = &status["instances"][0];
    assert_eq!(instance["instance_id"], "qwen/qwen3-4b");
    assert_eq!(instance["model"], "qwen/qwen3-4b");
    assert_eq!(instance["size_bytes"], 2_500_000_000u64);
    assert_eq!(instance["context_length"], 8192);

    let missing = daemon.ctl(&["load", "nobody/no-such-model"]).await;
    assert_eq!(missing.code, 7, "{}", missing.stderr);
    assert!(
        missing.stderr.contains("it has: ibm/granite-4-micro"),
        "the error names the models that exist: {}",
        missing.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_plain_streamed_and_continued() {
    let sim = start_sim(SimConfig::zero_delay()).await;
    let daemon = TestDaemon::start(&sim.url()).await;

    let first = daemon
        .ctl_json(&[
            "chat",
            "ibm/granite-4-micro",
            "Summarise this in one line",
            "--temperature",
            "0.2",
            // Keep the reply on the engine, to continue it below.
            "--store",
        ])
        .await;
    let content = first["content"].as_str().unwrap();
    assert!(content.contains("Simulated reply 1"), "{content}");
    assert_eq!(first["content_source"], "message");
    assert_eq!(first["model_instance_id"], "ibm/granite-4-micro");
    assert!(first["response_id"].as_str().unwrap().starts_with("resp_"));
    assert_eq!(first["usage"]["input_tokens"], 5 + 4);
    assert!(first["usage"]["total_output_tokens"].as_u64().unwrap() > 0);
    // The model was not loaded: LM Studio loaded it just in time and said how long it took.
    assert!(first["usage"]["model_load_time_seconds"].is_number());

    let previous = first["response_id"].as_str().unwrap();
    let second = daemon
        .ctl_json(&[
            "chat",
            "ibm/granite-4-micro",
            "And now in French",
            "--previous-response-id",
            previous,
        ])
        .await;
    assert!(
        second["content"]
            .as_str()
            .unwrap()
            .contains("Simulated reply 2"),
        "{second}"
    );
    assert!(second["usage"]["input_tokens"].as_u64() > first["usage"]["input_tokens"].as_u64());
    assert!(second["usage"]["model_load_time_seconds"].is_null());

    // Streamed through the proto client: deltas arrive as events and add up to the content.
    let mut client = daemon.client().await;
    let mut deltas = String::new();
    let request = Request::Chat(ChatRequest {
        model: "ibm/granite-4-micro".into(),
        input: "stream please".into(),
        stream: true,
        ..ChatRequest::default()
    });
    let outcome = client
        .call(request, |event| {
            if let Event::Delta { content } = event {
                deltas.push_str(content);
            }
        })
        .await
        .expect("streamed chat succeeds");
    let Outcome::Chat(chat) = outcome else {
        panic!("not a chat result")
    };
    assert!(deltas.len() > 10);
    assert_eq!(deltas, chat.content);

    // And through lmsd-ctl --stream, with the task read from stdin.
    let out = daemon
        .ctl_with_stdin(
            &["chat", "ibm/granite-4-micro", "-", "--stream"],
            "a document from stdin",
        )
        .await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains("your 4-word prompt"), "{}", out.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_message_falls_back_to_reasoning() {
    let sim = start_sim(SimConfig::zero_delay()).await;
    let daemon = TestDaemon::start(&sim.url()).await;
    // The reasoning model spends a 5-token budget on thinking and never reaches its message.
    let reply = daemon
        .ctl_json(&[
            "chat",
            "qwen/qwen3-4b",
            "Think first",
            "--max-output-tokens",
            "5",
        ])
        .await;
    assert_eq!(reply["content_source"], "reasoning");
    assert!(reply["content"]
        .as_str()
        .unwrap()
        .starts_with("The user wants"));
    assert_eq!(reply["usage"]["reasoning_output_tokens"], 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unload_of_a_key_removes_every_instance_by_id_and_verifies() {
    let sim = start_sim(SimConfig::zero_delay()).await;
    let daemon = TestDaemon::start(&sim.url()).await;
    daemon.ctl_json(&["load", "qwen/qwen3-4b"]).await;
    // A second instance appears from outside lmsd, as LM Studio's JIT race makes them.
    assert_eq!(load_outside(&sim, "qwen/qwen3-4b").await, "qwen/qwen3-4b:2");
    daemon
        .wait_for_status("both instances", |s| s.instances.len() == 2)
        .await;

    let unload = daemon.ctl_json(&["unload", "qwen/qwen3-4b"]).await;
    let mut unloaded: Vec<&str> = unload["unloaded"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    unloaded.sort();
    assert_eq!(unloaded, ["qwen/qwen3-4b", "qwen/qwen3-4b:2"]);
    assert!(sim.loaded_instances().is_empty());
    assert_eq!(daemon.status().await.instances.len(), 0);

    // LM Studio claims an unload but keeps the instance: lmsd sees it still listed and retries.
    daemon.ctl_json(&["load", "ibm/granite-4-micro"]).await;
    sim.inject(Route::Unload, Fault::IgnoreUnload, Times::Once);
    let unload = daemon.ctl_json(&["unload", "ibm/granite-4-micro"]).await;
    assert_eq!(unload["rounds"], 2);
    assert!(sim.loaded_instances().is_empty());

    // One instance by id leaves the other.
    daemon.ctl_json(&["load", "ibm/granite-4-micro"]).await;
    load_outside(&sim, "ibm/granite-4-micro").await;
    daemon
        .wait_for_status("two instances", |s| s.instances.len() == 2)
        .await;
    daemon
        .ctl_json(&["unload", "--instance", "ibm/granite-4-micro:2"])
        .await;
    assert_eq!(sim.loaded_instances(), ["ibm/granite-4-micro"]);

    let nothing = daemon.ctl(&["unload", "no/such-model"]).await;
    assert_eq!(nothing.code, 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_down_at_start_then_up() {
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let daemon = TestDaemon::start_with(&url, "[tasks]\noutage_wait = \"300ms\"\n", &[]).await;

    let status = daemon.status().await;
    assert!(!status.backend.reachable);
    assert!(status.backend.last_error.unwrap().contains("unreachable"));
    let models = daemon.ctl(&["models"]).await;
    assert_eq!(models.code, 5, "{}", models.stderr);
    // A task waits out `[tasks] outage_wait` (the fixture's is short), then says why it failed.
    let chat = daemon.ctl(&["chat", "ibm/granite-4-micro", "hello"]).await;
    assert_eq!(chat.code, 5, "{}", chat.stderr);

    let sim =
        lmstudio_sim::Simulator::start(SimConfig::zero_delay(), ([127, 0, 0, 1], port).into())
            .await
            .expect("simulator takes the port");
    daemon
        .wait_for_status("LM Studio reachable", |s| s.backend.reachable)
        .await;
    assert_eq!(daemon.ctl(&["models"]).await.code, 0);
    drop(sim);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_is_a_clear_error_and_the_env_token_wins() {
    let mut config = SimConfig::zero_delay();
    config.auth_token = Some("sk-lm-abc:right".into());
    let sim = start_sim(config).await;

    let wrong = TestDaemon::start_with(&sim.url(), "token = \"sk-lm-abc:wrong\"", &[]).await;
    let models = wrong.ctl(&["models"]).await;
    assert_eq!(models.code, 6, "{}", models.stderr);
    assert!(
        models.stderr.contains("API token") && models.stderr.contains("LMSD_LMSTUDIO_TOKEN"),
        "{}",
        models.stderr
    );
    let status = wrong.status().await;
    assert!(!status.backend.reachable);
    assert!(
        !status.backend.last_error.unwrap().contains("wrong"),
        "the token must not be echoed"
    );

    let right = TestDaemon::start_with(
        &sim.url(),
        "token = \"sk-lm-abc:wrong\"",
        &[("LMSD_LMSTUDIO_TOKEN", "sk-lm-abc:right")],
    )
    .await;
    assert_eq!(right.ctl(&["models"]).await.code, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_faults_map_to_typed_errors() {
    let mut config = SimConfig::zero_delay();
    config.memory_bytes = 10_000_000_000;
    let sim = start_sim(config).await;
    let daemon = TestDaemon::start(&sim.url()).await;

    // A fault that lasts: retried ([tasks] retries = 3), then reported with its class.
    sim.inject(Route::Chat, Fault::Html500, Times::Always);
    let html = daemon
        .ctl(&["--json", "chat", "ibm/granite-4-micro", "hi"])
        .await;
    assert_eq!(html.code, 6, "{}", html.stderr);
    assert!(html.stderr.contains("HTML"), "{}", html.stderr);
    let error: Value = serde_json::from_str(html.stdout.lines().last().unwrap()).unwrap();
    assert_eq!(error["error"]["code"], "backend_error");
    sim.clear_faults();

    // 200 with an error body is an answer (not retried); malformed JSON and a dropped connection
    // are transient and retried until the tries run out.
    for (fault, exit_code) in [
        (Fault::ErrorWith200, 6),
        (Fault::MalformedJson, 6),
        (Fault::DropConnection, 5),
    ] {
        sim.inject(Route::Chat, fault.clone(), Times::Always);
        let out = daemon.ctl(&["chat", "ibm/granite-4-micro", "hi"]).await;
        assert_eq!(out.code, exit_code, "{fault:?}: {}", out.stderr);
        sim.clear_faults();
    }

    // A passing fault is absorbed: the retry answers.
    sim.inject(Route::Chat, Fault::Html500, Times::Once);
    let recovered = daemon
        .ctl_json(&["chat", "ibm/granite-4-micro", "hi"])
        .await;
    assert_eq!(recovered["attempts"], 2);

    let missing = daemon.ctl(&["chat", "nobody/nothing", "hi"]).await;
    assert_eq!(missing.code, 7, "{}", missing.stderr);

    // 12.1 GB does not fit in 10 GB.
    let oom = daemon.ctl(&["load", "openai/gpt-oss-20b"]).await;
    assert_eq!(oom.code, 8, "{}", oom.stderr);
    assert!(oom.stderr.contains("memory"), "{}", oom.stderr);

    // After all that, a normal chat still works.
    assert_eq!(
        daemon
            .ctl(&["chat", "ibm/granite-4-micro", "hi"])
            .await
            .code,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_lines_get_errors_and_the_connection_survives() {
    let sim = start_sim(SimConfig::zero_delay()).await;
    let daemon = TestDaemon::start(&sim.url()).await;

    let mut payload = Vec::new();
    payload.extend_from_slice(b"{not json\n");
    payload.extend_from_slice(b"{\"v\":1,\"id\":\"\xff\xfe\",\"type\":\"status\"}\n");
    payload.extend_from_slice(b"{\"v\":9,\"id\":\"old\",\"type\":\"status\"}\n");
    payload.extend_from_slice(b"{\"v\":1,\"id\":\"typo\",\"type\":\"chat\",\"model\":\"m\",\"input\":\"x\",\"max_tokens\":3}\n");
    payload.extend_from_slice(b"{\"v\":1,\"id\":\"what\",\"type\":\"frobnicate\"}\n");
    payload.extend(std::iter::repeat_n(b'x', 5 * 1024 * 1024));
    payload.push(b'\n');
    payload.extend_from_slice(b"{\"v\":1,\"id\":\"ok\",\"type\":\"status\"}\n");
    let replies = daemon.raw(&payload, 7).await;

    let code = |r: &Value| r["error"]["code"].as_str().unwrap_or("").to_owned();
    assert_eq!(
        (replies[0]["id"].clone(), code(&replies[0])),
        (Value::Null, "bad_request".into())
    );
    assert_eq!(code(&replies[1]), "bad_request");
    assert_eq!(
        (replies[2]["id"].as_str(), code(&replies[2]).as_str()),
        (Some("old"), "unsupported_version")
    );
    assert_eq!(replies[3]["id"], "typo");
    assert!(replies[3]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("max_tokens"));
    assert_eq!(
        (replies[4]["id"].as_str(), code(&replies[4]).as_str()),
        (Some("what"), "bad_request")
    );
    assert_eq!(code(&replies[5]), "bad_request");
    assert!(replies[5]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("exceeds"));
    assert_eq!(replies[6]["id"], "ok");
    assert_eq!(replies[6]["type"], "result");
    assert_eq!(replies[6]["kind"], "status");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_on_one_connection_run_concurrently() {
    let sim = start_sim(SimConfig::zero_delay()).await;
    let daemon = TestDaemon::start(&sim.url()).await;
    sim.inject(
        Route::Chat,
        Fault::Delay(Duration::from_millis(700)),
        Times::Once,
    );
    let payload = b"{\"v\":1,\"id\":\"slow\",\"type\":\"chat\",\"model\":\"ibm/granite-4-micro\",\"input\":\"hi\"}\n{\"v\":1,\"id\":\"fast\",\"type\":\"status\"}\n";
    let replies = daemon.raw(payload, 2).await;
    assert_eq!(replies[0]["id"], "fast");
    assert_eq!(replies[1]["id"], "slow");
    assert_eq!(replies[1]["kind"], "chat");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_daemon_per_socket_and_stale_sockets_are_replaced() {
    let sim = start_sim(SimConfig::zero_delay()).await;
    let daemon = TestDaemon::start(&sim.url()).await;
    let mode = |path: &std::path::Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    };
    assert_eq!(mode(&daemon.socket), 0o600);
    assert_eq!(mode(daemon.socket.parent().unwrap()), 0o700);

    let second = lmsd_command(daemon.dir.path())
        .args([
            "--socket",
            daemon.socket.to_str().unwrap(),
            "--lmstudio-url",
            &sim.url(),
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(second.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        stderr.contains("another lmsd is already serving"),
        "{stderr}"
    );
    // The first one is untouched.
    assert!(daemon.status().await.backend.reachable);

    // A socket left behind by a crashed daemon: bound, never removed, nobody listening.
    let stale = daemon.dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let mut replacement = lmsd_command(daemon.dir.path())
        .args([
            "--socket",
            stale.to_str().unwrap(),
            "--lmstudio-url",
            &sim.url(),
        ])
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_until_serving(&stale).await;
    replacement.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_running_chat_finish_and_removes_the_socket() {
    let sim = start_sim(SimConfig::zero_delay()).await;
    let daemon = TestDaemon::start(&sim.url()).await;
    sim.inject(
        Route::Chat,
        Fault::Delay(Duration::from_millis(800)),
        Times::Once,
    );
    let mut client = daemon.client().await;
    let chat = tokio::spawn(async move {
        let request = Request::Chat(ChatRequest {
            model: "ibm/granite-4-micro".into(),
            input: "slow".into(),
            ..Default::default()
        });
        client.call(request, |_| {}).await
    });
    // Wait until the chat has reached the simulator (where it is held by the injected delay).
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while sim.stats().chat_requests == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the chat never reached the simulator"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let socket = daemon.socket.clone();
    let code = daemon.terminate().await;
    assert_eq!(code, Some(0));
    let outcome = chat.await.unwrap();
    assert!(matches!(outcome, Ok(Outcome::Chat(_))), "{outcome:?}");
    assert!(!socket.exists(), "the socket is removed on exit");
    match lmsd_proto::Client::connect(&socket).await {
        Err(ClientError::Connect { .. }) => {}
        other => panic!("expected a connect error, got {other:?}"),
    }
}
