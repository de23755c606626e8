//! lmsd in front of a real engine: llama.cpp's `llama-server` in router mode, with real models
//! (Gemma 3 270M and tiny random GGUF models), as `tests/real-engine/setup.sh` prepares them.
//!
//! The engine is required: without it these tests fail and say how to get it, unless
//! `LMSD_SKIP_REAL_ENGINE=1` is set, when they print that they were skipped.

use std::time::Duration;

use lmsd_proto::{ChatRequest, Outcome, Request};
use lmsd_real_engine::{EngineFiles, Router, GEMMA, TINY_A, TINY_B, TINY_C};
use serde_json::json;

use crate::reliability::load as load_from_clients;
use crate::support::*;

/// A router serving `models`; `None` when the engine is missing and the tests are skipped.
async fn router(models: &[&str]) -> Option<Router> {
    router_with(models, "").await
}

/// As `router`, with sections added to the router's preset file.
async fn router_with(models: &[&str], presets: &str) -> Option<Router> {
    let files = match EngineFiles::locate() {
        Ok(files) => files,
        Err(why) if std::env::var_os("LMSD_SKIP_REAL_ENGINE").is_some() => {
            eprintln!("SKIPPED (LMSD_SKIP_REAL_ENGINE is set): {why}");
            return None;
        }
        Err(why) => panic!("{why} (or set LMSD_SKIP_REAL_ENGINE=1 to skip these tests)"),
    };
    Some(Router::start_with(&files, models, presets).await.unwrap())
}

/// lmsd in front of `router`, with `extra` config after `[llama_server]`.
async fn daemon_for(router: &Router, extra: &str) -> TestDaemon {
    TestDaemon::start_engine(Engine::LlamaServer, &router.url(), "", extra, &[]).await
}

/// A short deterministic chat request.
fn chat_request(model: &str, input: &str) -> Request {
    Request::Chat(ChatRequest {
        model: model.into(),
        input: input.into(),
        temperature: Some(0.0),
        max_output_tokens: Some(12),
        ..Default::default()
    })
}

async fn chat_text(daemon: &TestDaemon, model: &str, input: &str) -> String {
    match daemon
        .client()
        .await
        .call(chat_request(model, input), |_| {})
        .await
    {
        Ok(Outcome::Chat(chat)) => chat.content,
        other => panic!("chat with {model} failed: {other:?}"),
    }
}

/// Chats that finished well, from lmsd's metrics.
async fn chats_done(daemon: &TestDaemon) -> u64 {
    let metrics = daemon.ctl(&["metrics"]).await.stdout;
    metrics
        .lines()
        .find_map(|line| line.strip_prefix("lmsd_tasks_total{kind=\"chat\",outcome=\"ok\"} "))
        .map_or(0, |n| n.trim().parse().unwrap_or(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_loads_chats_streams_and_unloads_on_llama_server() {
    let Some(router) = router(&[TINY_A, TINY_B]).await else {
        return;
    };
    let daemon = daemon_for(&router, "").await;

    let status = daemon.ctl_json(&["status"]).await;
    assert_eq!(status["backend"]["engine"], "llama-server");
    assert_eq!(status["backend"]["reachable"], true);
    let human = daemon.ctl(&["status"]).await.stdout;
    assert!(human.contains("llama-server http://"), "{human}");

    let models = daemon.ctl_json(&["models"]).await;
    let listed: Vec<(&str, u64)> = models["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["key"].as_str().unwrap(),
                m["size_bytes"].as_u64().unwrap(),
            )
        })
        .collect();
    let file_size = |model: &str| {
        std::fs::metadata(router.files().model_file(model))
            .unwrap()
            .len()
    };
    assert_eq!(
        listed,
        [(TINY_A, file_size(TINY_A)), (TINY_B, file_size(TINY_B))],
        "sizes before any load are the GGUF files'"
    );
    assert_eq!(
        models["models"][0]["max_context_length"], 512,
        "the context of the router's presets"
    );

    // Load: the router runs the model in a child process.
    let loaded = daemon.ctl_json(&["load", TINY_A]).await;
    assert_eq!(loaded["instance_id"], TINY_A);
    assert_eq!(router.loaded().await, [TINY_A]);
    assert_eq!(router.children_of(TINY_A).len(), 1, "one child process");

    // Load settings belong in the router's presets: refused for this task alone.
    let refused = daemon
        .ctl(&["chat", TINY_A, "hi", "--context-length", "4096"])
        .await;
    assert_eq!(refused.code, 4, "{}", refused.stderr);
    assert!(
        refused.stderr.contains("--models-preset"),
        "{}",
        refused.stderr
    );

    // Chat, plain and streamed: real tokens, and the same at temperature 0.
    let say = [
        "chat",
        TINY_A,
        "Say something.",
        "--temperature",
        "0",
        "--max-output-tokens",
        "12",
    ];
    let plain = daemon.ctl_json(&say).await;
    let text = plain["content"].as_str().unwrap();
    assert!(!text.is_empty());
    assert_eq!(plain["usage"]["total_output_tokens"], 12, "{plain}");
    assert!(plain["usage"]["input_tokens"].as_u64().unwrap() > 0);
    let streamed = daemon.ctl(&[&say[..], &["--stream"]].concat()).await;
    assert_eq!(streamed.code, 0, "{}", streamed.stderr);
    assert_eq!(streamed.stdout.trim_end(), text.trim_end());
    // A one-shot chat leaves no conversation behind.
    assert!(plain["response_id"].is_null(), "{plain}");
    // llama-server takes OpenAI's temperatures, up to 2.
    daemon
        .ctl_json(&[&say[..2], &["hot", "--temperature", "1.5"]].concat())
        .await;
    // Its child's --parallel is unset: llama-server's "auto" gives it 4 slots.
    let status = daemon.status().await;
    assert_eq!(status.instances[0].parallel, Some(4));
    assert_eq!(status.instances[0].context_length, 512);

    // An input clearly longer than the context is refused before it reaches the engine (a
    // reload would not help: the context is the preset's); one only the engine finds too long
    // is context_exceeded with llama.cpp's two sizes.
    let long = daemon
        .ctl_with_stdin(&["chat", TINY_A, "-"], &"word ".repeat(1000))
        .await;
    assert_eq!(long.code, 16, "{}", long.stderr);
    assert!(
        long.stderr.contains("largest context is 512 tokens"),
        "{}",
        long.stderr
    );
    let over = daemon
        .ctl_with_stdin(&["chat", TINY_A, "-"], &"w ".repeat(700))
        .await;
    assert_eq!(over.code, 16, "{}", over.stderr);
    assert!(
        over.stderr.contains("the instance has 512"),
        "{}",
        over.stderr
    );

    // The model's real memory, read from its child process, now sizes it for the budget.
    let models = daemon.ctl_json(&["models"]).await;
    let size = models["models"][0]["size_bytes"].as_u64().unwrap();
    assert!(
        size > file_size(TINY_A),
        "size {size} is still the file's, not the child's resident memory"
    );

    // Unload: the router lists it unloaded and its child process is gone.
    let unloaded = daemon.ctl_json(&["unload", TINY_A]).await;
    assert_eq!(unloaded["unloaded"], json!([TINY_A]), "{unloaded}");
    assert!(router.loaded().await.is_empty());
    eventually("the child process to exit", || {
        router.children_of(TINY_A).is_empty()
    })
    .await;
    let status = daemon.status().await;
    assert!(status.instances.is_empty(), "{:?}", status.instances);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_keep_the_conversation_that_llama_server_does_not() {
    let Some(router) = router(&[TINY_A]).await else {
        return;
    };
    let daemon = daemon_for(&router, "").await;
    let args = |input: &'static str, session: bool| {
        let mut args = vec![
            "chat",
            TINY_A,
            input,
            "--temperature",
            "0",
            "--max-output-tokens",
            "8",
        ];
        if session {
            args.extend(["--session", "s1"]);
        }
        args
    };
    let alone = daemon.ctl_json(&args("And then?", false)).await;
    daemon.ctl_json(&args("Once upon a time", true)).await;
    let continued = daemon.ctl_json(&args("And then?", true)).await;
    assert!(
        continued["usage"]["input_tokens"].as_u64() > alone["usage"]["input_tokens"].as_u64(),
        "the continued chat sent its history: {continued} vs {alone}"
    );

    // A response id lmsd does not hold is a clear error, not a chat without its history.
    let unknown = daemon
        .ctl(&[
            "chat",
            TINY_A,
            "hi",
            "--previous-response-id",
            "resp_lmsd_1_999999",
        ])
        .await;
    assert_eq!(unknown.code, 15, "{}", unknown.stderr);
    assert!(
        unknown.stderr.contains("session_lost")
            && unknown.stderr.contains("no longer has the conversation"),
        "{}",
        unknown.stderr
    );

    // Sessions outlive lmsd, its conversations on llama-server do not: the first message after a
    // restart says so and forgets the session, which the next message starts afresh.
    drop(daemon);
    let state = tempfile::tempdir().unwrap();
    let state_dir = state.path().to_str().unwrap();
    let env = [("STATE_DIRECTORY", state_dir)];
    let first = TestDaemon::start_engine(Engine::LlamaServer, &router.url(), "", "", &env).await;
    first.ctl_json(&args("Once upon a time", true)).await;
    first.terminate().await;
    let second = TestDaemon::start_engine(Engine::LlamaServer, &router.url(), "", "", &env).await;
    let lost = second.ctl(&args("And then?", true)).await;
    assert_eq!(lost.code, 15, "{}", lost.stderr);
    assert!(
        lost.stderr.contains("session \"s1\" lost its conversation"),
        "{}",
        lost.stderr
    );
    let fresh = second.ctl_json(&args("And then?", true)).await;
    assert_eq!(
        fresh["usage"]["input_tokens"], alone["usage"]["input_tokens"],
        "a fresh start sends no history"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_ttl_unloads_on_the_engine() {
    let Some(router) = router(&[TINY_A]).await else {
        return;
    };
    // No catalogue read comes to the rescue: the pool's clock alone must wake for the expiry.
    let daemon = daemon_for(
        &router,
        "poll_interval = \"1h\"\n\n[pool]\nidle_ttl = \"1s\"\nturn_hold = \"0s\"\n",
    )
    .await;
    chat_text(&daemon, TINY_A, "hello").await;
    assert_eq!(router.loaded().await, [TINY_A]);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !router.loaded().await.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the idle instance was never unloaded on the engine"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eventually("the child process to exit", || {
        router.children_of(TINY_A).is_empty()
    })
    .await;
    let status = daemon
        .wait_for_status("lmsd to finish the unload", |s| s.instances.is_empty())
        .await;
    assert_eq!(status.evictions[0].reason, "idle_ttl");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_for_two_tiny_models_evicts_for_the_third() {
    let Some(router) = router(&[TINY_A, TINY_B, TINY_C]).await else {
        return;
    };
    // Each instance counts its real memory (tens of MB for these models) plus 100 MiB: two fit
    // in 330 MiB, three do not.
    let daemon = daemon_for(
        &router,
        "\n[pool]\nmemory_budget = \"330MiB\"\ninstance_overhead = \"100MiB\"\nturn_hold = \"0s\"\n",
    )
    .await;
    chat_text(&daemon, TINY_A, "one").await;
    chat_text(&daemon, TINY_B, "two").await;
    assert_eq!(router.loaded().await, [TINY_A, TINY_B]);

    chat_text(&daemon, TINY_C, "three").await;
    // tiny-a is the least recently used of two idle instances: the pool evicts it.
    assert_eq!(router.loaded().await, [TINY_B, TINY_C]);
    assert!(router.children_of(TINY_A).is_empty());
    let status = daemon.status().await;
    assert!(
        status.memory.used_bytes <= status.memory.budget_bytes,
        "{:?}",
        status.memory
    );
    let evicted: Vec<(&str, &str)> = status
        .evictions
        .iter()
        .map(|e| (e.model.as_str(), e.reason.as_str()))
        .collect();
    assert_eq!(evicted, [(TINY_A, "memory")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_tasks_on_an_unloaded_model_make_one_load() {
    let Some(router) = router(&[TINY_B]).await else {
        return;
    };
    let daemon = daemon_for(&router, "").await;
    let tasks: Vec<_> = (0..20)
        .map(|n| {
            let socket = daemon.socket.clone();
            tokio::spawn(async move {
                let mut client = lmsd_proto::Client::connect(&socket).await.unwrap();
                let request = chat_request(TINY_B, &format!("task {n}"));
                match client.call(request, |_| {}).await {
                    Ok(Outcome::Chat(chat)) => chat.content,
                    other => panic!("task {n}: {other:?}"),
                }
            })
        })
        .collect();
    for task in tasks {
        assert!(!task.await.unwrap().is_empty());
    }
    let loads = router.spawns_of(TINY_B);
    assert_eq!(
        loads,
        1,
        "the router was asked to load more than once:\n{}",
        router.log()
    );
    let metrics = daemon.ctl(&["metrics"]).await.stdout;
    assert!(metrics.contains("lmsd_loads_total 1\n"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gemma_answers_a_real_prompt_in_english() {
    let Some(router) = router(&[GEMMA]).await else {
        return;
    };
    let daemon = daemon_for(&router, "request_timeout = \"120s\"\n").await;
    let ask = [
        "chat",
        GEMMA,
        "Write one sentence about the sea.",
        "--temperature",
        "0",
        "--max-output-tokens",
        "24",
    ];
    // Real inference on 2 shared cores: seconds, not milliseconds.
    let out = daemon.ctl_within(&ask, Duration::from_secs(120)).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    let text = out.stdout.trim();
    // English: several words of plain letters, some of them among the commonest.
    let words: Vec<String> = text
        .split_whitespace()
        .map(|w| {
            w.trim_matches(|c: char| !c.is_ascii_alphabetic())
                .to_lowercase()
        })
        .filter(|w| !w.is_empty() && w.chars().all(|c| c.is_ascii_alphabetic()))
        .collect();
    let common = [
        "the", "a", "an", "of", "is", "and", "to", "in", "it", "with",
    ];
    assert!(
        words.len() >= 5 && words.iter().any(|w| common.contains(&w.as_str())),
        "not English text: {text:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_killed_and_restarted_under_load() {
    let Some(router) = router(&[TINY_A, TINY_B]).await else {
        return;
    };
    let daemon = daemon_for(&router, "").await;
    daemon.ctl_json(&["load", TINY_A]).await;
    let socket = daemon.socket.clone();
    // Replies long enough that the kill lands while most tasks are still to come (and short
    // enough for a slot: 512 tokens of context over 4 slots).
    let clients = tokio::spawn(async move {
        load_from_clients(
            &socket,
            8,
            10,
            &[TINY_A, TINY_B],
            json!({"max_output_tokens": 96}),
            PATIENCE,
        )
        .await
    });
    // Once some tasks are done, kill the router and its children, then bring it back on the
    // same port.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let done_before_kill = loop {
        let done = chats_done(&daemon).await;
        if done >= 10 {
            break done;
        }
        assert!(tokio::time::Instant::now() < deadline, "no chat finished");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let stopped = router.kill();
    assert!(
        done_before_kill < 80,
        "every task was done before the engine died: the test saw no outage"
    );
    // Down for half a second: meanwhile tasks retry, or fail as backend_unreachable.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let router = stopped.restart().await.unwrap();

    let answers = clients.await.unwrap();
    assert_eq!(answers.len(), 80);
    let results = answers.values().filter(|r| r["type"] == "result").count();
    for reply in answers.values().filter(|r| r["type"] != "result") {
        assert!(
            reply["error"]["code"].is_string(),
            "not a typed error: {reply}"
        );
    }
    assert!(results >= 10, "{results} results");
    // lmsd converges to the restarted engine and serves again.
    daemon
        .wait_for_status("the engine back", |s| s.backend.reachable)
        .await;
    assert!(!chat_text(&daemon, TINY_B, "again").await.is_empty());
    drop(router);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unload_behind_lmsds_back_is_noticed_and_the_next_task_reloads() {
    let Some(router) = router(&[TINY_A]).await else {
        return;
    };
    let daemon = daemon_for(&router, "").await;
    chat_text(&daemon, TINY_A, "first").await;
    let unloaded = reqwest::Client::new()
        .post(format!("{}/models/unload", router.url()))
        .json(&json!({ "model": TINY_A }))
        .send()
        .await
        .unwrap();
    assert!(unloaded.status().is_success());
    daemon
        .wait_for_status("lmsd to notice the unload", |s| s.instances.is_empty())
        .await;
    assert!(!chat_text(&daemon, TINY_A, "second").await.is_empty());
    assert_eq!(router.loaded().await, [TINY_A]);
    assert_eq!(router.spawns_of(TINY_A), 2, "{}", router.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_on_a_model_the_router_runs_for_them() {
    let presets = format!("\n[{TINY_B}]\nembeddings = true\npooling = mean\n");
    let Some(router) = router_with(&[TINY_A, TINY_B], &presets).await else {
        return;
    };
    let daemon = daemon_for(&router, "").await;
    let models = daemon.ctl_json(&["models"]).await;
    let kinds: Vec<(&str, &str)> = models["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["key"].as_str().unwrap(), m["type"].as_str().unwrap()))
        .collect();
    assert_eq!(kinds, [(TINY_A, "llm"), (TINY_B, "embedding")]);

    let embedded = daemon
        .ctl_json(&["embed", "auto", "first text", "second text"])
        .await;
    assert_eq!(embedded["model"], TINY_B);
    let vectors = embedded["embeddings"].as_array().unwrap();
    assert_eq!(vectors.len(), 2);
    assert_eq!(vectors[0].as_array().unwrap().len(), 256, "tiny-b's width");
    assert_ne!(vectors[0], vectors[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gemma_keeps_a_schema_a_choice_and_a_json_object_under_constraint() {
    let Some(router) = router(&[GEMMA]).await else {
        return;
    };
    let daemon = daemon_for(&router, "request_timeout = \"120s\"\n").await;
    let ask = |input: &'static str, contract: &[&'static str]| {
        let mut args = vec![
            "--json",
            "chat",
            GEMMA,
            input,
            "--temperature",
            "0",
            // Constrained, a small model may pad with the white space the JSON grammar allows
            // (tabs, newlines) before each key: it needs room for that.
            "--max-output-tokens",
            "256",
        ];
        args.extend_from_slice(contract);
        args
    };
    let run = |args: Vec<&'static str>| {
        let daemon = &daemon;
        async move {
            let out = daemon.ctl_within(&args, Duration::from_secs(120)).await;
            assert_eq!(out.code, 0, "{args:?}: {}\n{}", out.stderr, out.stdout);
            serde_json::from_str::<serde_json::Value>(out.stdout.lines().last().unwrap()).unwrap()
        }
    };
    let city = run(ask(
        "Extract the city from: I live in Paris and work in a bakery.",
        &[
            "--schema",
            r#"{"type":"object","properties":{"city":{"type":"string","maxLength":24}},"required":["city"],"additionalProperties":false}"#,
        ],
    ))
    .await;
    assert!(city["json"]["city"].is_string(), "{city}");
    assert_eq!(city["contract"]["kind"], "schema");
    let label = run(ask(
        "Is this review positive or negative? 'I love it, it works perfectly.'",
        &["--choices", "positive,negative"],
    ))
    .await;
    let label = label["json"].as_str().unwrap_or_default().to_owned();
    assert!(
        ["positive", "negative"].contains(&label.as_str()),
        "{label}"
    );
    let object = run(ask(
        "Give the name and colour of the sea as JSON.",
        &[
            "--schema",
            r#"{"type":"object","properties":{"name":{"type":"string","maxLength":16},"colour":{"type":"string","maxLength":16}},"required":["name","colour"]}"#,
        ],
    ))
    .await;
    assert!(object["json"].is_object(), "{object}");
    let any = run(ask(
        "Describe the sea as a JSON object.",
        &["--json-object"],
    ))
    .await;
    assert!(any["json"].is_object(), "{any}");
    assert_eq!(any["contract"]["kind"], "json_object");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gemma_answers_the_openai_and_anthropic_clients_through_the_front_door() {
    let Some(router) = router(&[GEMMA]).await else {
        return;
    };
    let port = free_port();
    let extra = format!(
        "request_timeout = \"120s\"\n\n[http]\nlisten = \"127.0.0.1:{port}\"\napi_keys = [\"k-real\"]\n"
    );
    let daemon = daemon_for(&router, &extra).await;
    let root = format!("http://127.0.0.1:{port}");
    python_client(
        "openai",
        &[&format!("{root}/v1"), "k-real", "llama-server", GEMMA],
    )
    .await;
    python_client("anthropic", &[&root, "k-real", "llama-server", GEMMA]).await;
    // Every request was a task on the one instance lmsd loaded.
    let status = daemon.ctl(&["--json", "status"]).await;
    assert!(status.stdout.contains(GEMMA), "{}", status.stdout);
}
