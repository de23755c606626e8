//! lmsd against LM Studio as it really behaves, not as a simulator naturally would: each test
//! makes the simulator do what a real LM Studio 0.4.x does (by default, or as an injected fault
//! where it is intermittent) and checks that lmsd handles it. The numbers refer to the points
//! of the "real LM Studio" issue; the evidence for each is in the project's LM Studio notes.

use std::time::Duration;

use lmsd_proto::{InstanceState, LoadedBy};
use lmstudio_sim::{Fault, Route, SimConfig, SimFormat, SimModel, Times};
use serde_json::Value;

use crate::support::*;

const GRANITE: &str = "ibm/granite-4-micro"; // 2.1 GB
const QWEN: &str = "qwen/qwen3-4b"; // 2.5 GB
const QWEN_VL: &str = "qwen/qwen3-vl-4b"; // 3.3 GB
const NOMIC: &str = "text-embedding-nomic-embed-text-v1.5";

fn content(reply: &Value) -> &str {
    reply["content"].as_str().unwrap_or_default()
}

/// A copy of a catalogue model under another key.
fn model_like(config: &SimConfig, key: &str, as_key: &str) -> SimModel {
    let mut model = config
        .catalogue
        .iter()
        .find(|m| m.key == key)
        .cloned()
        .unwrap();
    model.key = as_key.into();
    model
}

/// How many log lines contain `needle`.
fn log_count(daemon: &TestDaemon, needle: &str) -> usize {
    daemon.logs().lines().filter(|l| l.contains(needle)).count()
}

// 1 -------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_continuation_sends_no_system_prompt_and_refuses_another_one() {
    // The simulator answers 500 to a continuation that carries a system prompt, as LM Studio
    // 0.4.20 does (bug tracker #2219).
    let sim = start_sim(SimConfig::zero_delay()).await;
    let daemon = TestDaemon::start(&sim.url()).await;
    let turn = |input: &'static str, system: &'static str| {
        vec!["chat", GRANITE, input, "--session", "s", "--system", system]
    };
    daemon.ctl_json(&turn("one", "Be brief.")).await;
    // The agent sends its system prompt on every turn, as agents do.
    let second = daemon.ctl_json(&turn("two", "Be brief.")).await;
    assert!(content(&second).contains("Simulated reply 2"), "{second}");
    let other = daemon.ctl(&turn("three", "Be verbose.")).await;
    assert_eq!(other.code, 4, "{}", other.stderr);
    assert!(
        other.stderr.contains("another system prompt")
            && other.stderr.contains("sessions forget s"),
        "{}",
        other.stderr
    );
    let third = daemon
        .ctl_json(&["chat", GRANITE, "three", "--session", "s"])
        .await;
    assert!(content(&third).contains("Simulated reply 3"), "{third}");

    // The same rule for an explicit previous_response_id.
    let kept = daemon
        .ctl_json(&["chat", GRANITE, "x", "--store", "--system", "A"])
        .await;
    let id = kept["response_id"].as_str().unwrap();
    let continued = ["chat", GRANITE, "y", "--previous-response-id", id];
    let same = daemon
        .ctl_json(&[&continued[..], &["--system", "A"]].concat())
        .await;
    assert!(content(&same).contains("Simulated reply 2"), "{same}");
    let changed = daemon
        .ctl(&[&continued[..], &["--system", "B"]].concat())
        .await;
    assert_eq!(changed.code, 4, "{}", changed.stderr);
}

// 2 -------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_engine_loses_a_session_once_and_its_next_turn_starts_afresh() {
    let mut sim = start_sim(SimConfig::zero_delay()).await;
    let daemon = TestDaemon::start(&sim.url()).await;
    let turn = ["chat", GRANITE, "go on", "--session", "work"];
    daemon.ctl_json(&turn).await;
    daemon.ctl_json(&turn).await;
    // LM Studio restarts: its stored chats are gone.
    sim.go_down().await;
    sim.come_back().await.unwrap();

    let lost = daemon.ctl(&turn).await;
    assert_eq!(lost.code, 15, "{}", lost.stderr);
    assert!(
        lost.stderr.contains("session_lost") && lost.stderr.contains("\"work\""),
        "{}",
        lost.stderr
    );
    let fresh = daemon.ctl_json(&turn).await;
    assert!(
        content(&fresh).contains("Simulated reply 1"),
        "a new conversation: {fresh}"
    );
    let again = daemon.ctl_json(&turn).await;
    assert!(content(&again).contains("Simulated reply 2"), "{again}");
}

// 3 -------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_temperature_outside_lm_studios_range_is_refused_with_the_range() {
    let sim = start_sim(SimConfig::zero_delay()).await;
    let daemon = TestDaemon::start(&sim.url()).await;
    let hot = daemon
        .ctl(&["chat", GRANITE, "x", "--temperature", "1.5"])
        .await;
    assert_eq!(hot.code, 4, "{}", hot.stderr);
    assert!(
        hot.stderr.contains("LM Studio's range, 0 to 1"),
        "{}",
        hot.stderr
    );
    assert_eq!(sim.stats().chat_requests, 0, "refused before the engine");
    daemon
        .ctl_json(&["chat", GRANITE, "x", "--temperature", "1"])
        .await;
}

// 4 -------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_on_a_connection_the_engine_closed_is_sent_again_and_a_load_never_rides_one() {
    let sim = start_sim(SimConfig {
        keep_alive_timeout: Duration::from_secs(1),
        ..SimConfig::zero_delay()
    })
    .await;
    let daemon = TestDaemon::start(&sim.url()).await;
    // The server's `Keep-Alive: timeout=1` is heeded.
    daemon.wait_for_log("keeping them shorter").await;

    // Polls meet connections closed under them, the race Node's idle close makes.
    sim.inject(Route::Models, Fault::CloseReused, Times::N(3));
    eventually("three polls on closed connections", || {
        sim.stats().closed_reused >= 3
    })
    .await;
    // Loads: any that rode a reused connection would be closed unanswered.
    sim.inject(Route::Load, Fault::CloseReused, Times::Always);
    let chat = daemon.ctl_json(&["chat", GRANITE, "hello"]).await;
    assert!(content(&chat).contains("Simulated reply"), "{chat}");
    assert_eq!(
        sim.stats().closed_reused,
        3,
        "no load rode a reused connection"
    );
    assert_eq!(sim.stats().loads, 1);
    let status = daemon.status().await;
    assert!(status.backend.reachable, "{:?}", status.backend);
    assert_eq!(
        log_count(&daemon, "cannot read the engine's models"),
        0,
        "{}",
        daemon.logs()
    );
}

// 5 -------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_that_do_not_say_how_many_tasks_they_take_get_one_at_a_time() {
    const MLX: &str = "mlx-community/granite-4-micro";
    let mut config = SimConfig {
        token_delay: Duration::from_millis(3),
        ..SimConfig::zero_delay()
    };
    let mut mlx = model_like(&config, GRANITE, MLX);
    mlx.format = SimFormat::Mlx;
    config.catalogue.push(mlx);
    let sim = start_sim(config).await;
    let daemon = TestDaemon::start(&sim.url()).await;

    // Embedding models never report `parallel` and serve one request at a time.
    let lines: Vec<String> = (0..6)
        .map(|n| {
            let line = serde_json::json!({"v": 1, "id": format!("e{n}"), "type": "embed", "model": NOMIC, "input": ["a text"]});
            format!("{line}\n")
        })
        .collect();
    let replies = converse(&daemon.socket, &lines, 6).await;
    assert!(
        replies
            .iter()
            .filter(|r| r["type"] != "event")
            .all(|r| r["type"] == "result"),
        "{replies:?}"
    );
    assert_eq!(sim.stats().max_in_flight, 1, "one embedding at a time");

    // An MLX model reports 1 and crashes on two predictions at once (bug tracker #2255),
    // including right after its load, before lmsd has read its listing.
    let lines: Vec<String> = (0..4)
        .map(|n| chat_line(&format!("c{n}"), MLX, serde_json::json!({})))
        .collect();
    let replies = converse(&daemon.socket, &lines, 4).await;
    let results = replies.iter().filter(|r| r["type"] == "result").count();
    assert_eq!(results, 4, "{replies:?}");
    assert_eq!(sim.stats().crashes, 0);
    assert_eq!(sim.stats().max_in_flight, 1);
}

// 6 -------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_with_less_context_than_asked_is_shown_and_spared_tasks_that_need_more() {
    let sim = start_sim(SimConfig::zero_delay()).await;
    let daemon = TestDaemon::start(&sim.url()).await;
    // MLX context auto-fit: the load succeeds with another context length.
    sim.inject(Route::Load, Fault::ContextAutoFit(4096), Times::Once);
    let load = daemon
        .ctl_json(&["load", QWEN, "--context-length", "16384"])
        .await;
    assert_eq!(load["context_length"], 4096, "{load}");
    daemon
        .wait_for_log("loaded another context length than lmsd asked for")
        .await;
    let instance = daemon.instance_of(QWEN).await;
    assert_eq!(
        (instance.context_length, instance.requested_context_length),
        (4096, Some(16384))
    );
    let shown = daemon.ctl(&["status"]).await;
    assert!(
        shown.stdout.contains("4096 (asked 16384)"),
        "{}",
        shown.stdout
    );

    // A task that needs more is not sent to it; reloading would only auto-fit again.
    let chats_before = sim.stats().chat_requests;
    let needs_more = daemon
        .ctl(&["chat", QWEN, "x", "--min-context", "8192"])
        .await;
    assert_eq!(needs_more.code, 16, "{}", needs_more.stderr);
    assert!(
        needs_more.stderr.contains("4096") && needs_more.stderr.contains("8192"),
        "{}",
        needs_more.stderr
    );
    // Nor is an input clearly longer than its context (30 KB of text: 5,000 tokens at least).
    let long = daemon
        .ctl_with_stdin(&["chat", QWEN, "-"], &"word ".repeat(6000))
        .await;
    assert_eq!(long.code, 16, "{}", long.stderr);
    assert_eq!(sim.stats().chat_requests, chats_before);
    // An overflow only the engine can see is context_exceeded too, with both sizes.
    let over = daemon
        .ctl_with_stdin(&["chat", QWEN, "-"], &"w ".repeat(4200))
        .await;
    assert_eq!(over.code, 16, "{}", over.stderr);
    assert!(
        over.stderr
            .contains("needs 4204 tokens; the instance has 4096"),
        "{}",
        over.stderr
    );

    // An instance lmsd loaded at the engine's default is reloaded with more for a task that
    // needs it; a model not loaded is loaded with enough.
    daemon.ctl_json(&["load", GRANITE]).await;
    let big = daemon
        .ctl_json(&["chat", GRANITE, "x", "--min-context", "20000"])
        .await;
    assert!(content(&big).contains("Simulated reply"), "{big}");
    assert_eq!(daemon.instance_of(GRANITE).await.context_length, 20480);
    let vl = daemon
        .ctl_json(&["chat", QWEN_VL, "x", "--min-context", "9000"])
        .await;
    assert!(content(&vl).contains("Simulated reply"), "{vl}");

    // What no load can give fails at once, rather than reloading until the deadline.
    let beyond = daemon
        .ctl(&["chat", GRANITE, "x", "--min-context", "200000"])
        .await;
    assert_eq!(beyond.code, 16, "{}", beyond.stderr);
    assert!(
        beyond.stderr.contains("largest context is 131072 tokens"),
        "{}",
        beyond.stderr
    );
    let self_defeating = daemon
        .ctl(&[
            "chat",
            QWEN_VL,
            "x",
            "--min-context",
            "30000",
            "--context-length",
            "8192",
        ])
        .await;
    assert_eq!(self_defeating.code, 16, "{}", self_defeating.stderr);
    assert!(
        self_defeating
            .stderr
            .contains("asks to load it with context_length 8192"),
        "{}",
        self_defeating.stderr
    );
}

// 7 -------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_that_fails_without_saying_why_makes_room_or_moves_to_a_smaller_model() {
    let sim = start_sim(SimConfig::zero_delay()).await;
    let daemon = TestDaemon::start_with(&sim.url(), "[pool]\nturn_hold = \"0s\"\n", &[]).await;
    daemon.ctl_json(&["chat", GRANITE, "warm"]).await;

    // A CUDA out-of-memory as LM Studio reports it: `model_load_failed`, no memory wording.
    // lmsd makes room as it would for one that said so, and loads once more.
    sim.inject(Route::Load, Fault::LoadFailed, Times::Once);
    let qwen = daemon.ctl_json(&["chat", QWEN, "hello"]).await;
    assert_eq!(qwen["model"], QWEN, "{qwen}");
    assert_eq!(sim.loaded_instances(), [QWEN], "granite made room");

    // With nothing left to give way, a task that allows a choice moves to a smaller model.
    daemon.ctl_json(&["pin", QWEN]).await;
    sim.inject(Route::Load, Fault::LoadFailed, Times::Once);
    let fallback = daemon
        .ctl_json(&["chat", QWEN_VL, "hello", "--prefer", GRANITE])
        .await;
    assert_eq!(fallback["model"], GRANITE, "{fallback}");

    // And a load that keeps failing is not sent again and again.
    daemon.ctl_json(&["unpin", QWEN]).await;
    sim.inject(Route::Load, Fault::LoadFailed, Times::Always);
    let before = sim.stats().load_requests;
    let failed = daemon.ctl(&["chat", QWEN_VL, "hello"]).await;
    assert_eq!(failed.code, 6, "{}", failed.stderr);
    assert!(
        failed.stderr.contains("failed to load the model"),
        "{}",
        failed.stderr
    );
    assert_eq!(sim.stats().load_requests - before, 1, "one load");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_instance_is_reloaded_once() {
    let sim = start_sim(SimConfig::zero_delay()).await;
    let daemon = TestDaemon::start(&sim.url()).await;
    daemon.ctl_json(&["load", GRANITE]).await;
    sim.inject(Route::Chat, Fault::Crash, Times::Once);
    let chat = daemon.ctl_json(&["chat", GRANITE, "hello"]).await;
    assert!(content(&chat).contains("Simulated reply"), "{chat}");
    assert_eq!(chat["attempts"], 2, "{chat}");
    assert_eq!(sim.stats().loads, 2, "reloaded");

    // Embeddings too; their crash comes as a plain string.
    daemon.ctl_json(&["load", NOMIC]).await;
    sim.inject(Route::Embeddings, Fault::Crash, Times::Once);
    let out = daemon.ctl(&["embed", NOMIC, "a text"]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
}

// 8 -------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_whose_reply_was_lost_is_adopted_not_repeated() {
    let sim = start_sim(SimConfig::zero_delay()).await;
    // A lost load is waited for up to request_timeout: an hour, so that one taken for lost by
    // mistake would show as a hang.
    let daemon = TestDaemon::start_with(&sim.url(), "request_timeout = \"1h\"\n", &[]).await;
    // An error page is an answer, not a lost reply: the load did not happen.
    sim.inject(Route::Load, Fault::Html500, Times::Always);
    let failed = daemon.ctl(&["chat", QWEN, "hello"]).await;
    assert_eq!(failed.code, 6, "{}", failed.stderr);
    sim.clear_faults();

    sim.inject(Route::Load, Fault::DropLoadReply, Times::Once);
    let chat = daemon
        .ctl_json(&["chat", GRANITE, "hello", "--ttl", "300ms"])
        .await;
    assert!(content(&chat).contains("Simulated reply"), "{chat}");
    assert_eq!(sim.stats().loads, 1, "no second load");
    daemon.wait_for_log("adopted its instance").await;
    // lmsd's own: its TTL applies, so it goes when idle.
    eventually("the adopted instance's TTL unloads it", || {
        sim.loaded_instances().is_empty()
    })
    .await;
}

// 9 -------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn just_in_time_loads_behind_lmsds_back_are_adopted_and_their_duplicates_unloaded() {
    // Loads that take a moment, so that racing just-in-time loads overlap (#1751).
    let sim = start_sim(SimConfig {
        load_bytes_per_sec: Some(20_000_000_000),
        ..SimConfig::zero_delay()
    })
    .await;
    // lmsd learns of the vanished instance only from the chats' replies.
    let daemon = TestDaemon::start_with(&sim.url(), "poll_interval = \"1h\"\n", &[]).await;
    daemon.ctl_json(&["load", GRANITE]).await;
    let lines: Vec<String> = (0..4)
        .map(|n| chat_line(&format!("c{n}"), GRANITE, serde_json::json!({})))
        .collect();
    // The race needs the chats to reach the engine while the first just-in-time load runs; on
    // a loaded machine they may come one after another, so the scene is played again (a few
    // times at most) until the engine raced.
    for attempt in 1.. {
        for instance in sim.loaded_instances() {
            assert!(sim.drop_instance(&instance));
        }
        let before = sim.stats().jit_loads;
        let replies = converse(&daemon.socket, &lines, 4).await;
        assert_eq!(
            replies.iter().filter(|r| r["type"] == "result").count(),
            4,
            "{replies:?}"
        );
        if sim.stats().jit_loads - before >= 2 {
            break;
        }
        assert!(attempt < 5, "the simulator never raced: {:?}", sim.stats());
        // Let lmsd settle on the instance the lone just-in-time load made before the next try.
        eventually("one instance left", || sim.loaded_instances().len() == 1).await;
    }
    eventually("one instance left", || {
        sim.loaded_instances() == [GRANITE.to_owned()]
    })
    .await;
    let status = daemon
        .wait_for_status("one instance, lmsd's", |s| {
            s.instances.len() == 1 && s.instances[0].loaded_by == LoadedBy::Lmsd
        })
        .await;
    assert_eq!(status.instances[0].state, InstanceState::Idle);
}

// 10 ------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_answered_by_another_model_are_no_answer() {
    const BGE: &str = "text-embedding-bge-small-en-v1.5";
    let mut config = SimConfig {
        // As lmsd's README advises.
        jit: false,
        ..SimConfig::zero_delay()
    };
    let bge = model_like(&config, NOMIC, BGE);
    config.catalogue.push(bge);
    let sim = start_sim(config).await;
    let daemon = TestDaemon::start_with(&sim.url(), "poll_interval = \"1h\"\n", &[]).await;
    daemon.ctl_json(&["load", NOMIC]).await;
    load_outside(&sim, BGE).await;
    // The instance lmsd uses goes; the engine answers with the one that is still loaded.
    assert!(sim.drop_instance(NOMIC));
    let embedded = daemon.ctl_json(&["embed", NOMIC, "hello"]).await;
    let vector: Vec<f64> = serde_json::from_value(embedded["embeddings"][0].clone()).unwrap();
    assert_eq!(
        vector,
        lmstudio_sim::embed_text(NOMIC, "hello"),
        "{embedded}"
    );
    assert_eq!(embedded["model_instance_id"], NOMIC);
}

// 11 ------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_shot_chats_leave_nothing_stored_on_the_engine() {
    let sim = start_sim(SimConfig::zero_delay()).await;
    let daemon = TestDaemon::start(&sim.url()).await;
    for _ in 0..3 {
        let chat = daemon.ctl_json(&["chat", GRANITE, "once"]).await;
        assert!(chat["response_id"].is_null(), "{chat}");
    }
    assert_eq!(sim.stored_responses(), 0);
    let kept = daemon.ctl_json(&["chat", GRANITE, "keep", "--store"]).await;
    assert!(kept["response_id"].as_str().unwrap().starts_with("resp_"));
    daemon
        .ctl_json(&["chat", GRANITE, "on", "--session", "s"])
        .await;
    assert_eq!(sim.stored_responses(), 2);
    // The front door's chats are one-shot.
    let port = free_port();
    drop(daemon);
    let daemon = TestDaemon::start_with(
        &sim.url(),
        &format!("[http]\nlisten = \"127.0.0.1:{port}\"\n"),
        &[],
    )
    .await;
    let reply: Value = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/v1/chat/completions"))
        .json(
            &serde_json::json!({"model": GRANITE, "messages": [{"role": "user", "content": "hi"}]}),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        reply["choices"][0]["message"]["content"].is_string(),
        "{reply}"
    );
    assert_eq!(sim.stored_responses(), 2);
    drop(daemon);
}

// 12 ------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unloading_an_instance_that_is_already_gone_succeeds() {
    let sim = start_sim(SimConfig::zero_delay()).await;
    let daemon = TestDaemon::start(&sim.url()).await;
    daemon.ctl_json(&["load", GRANITE]).await;
    // A TTL, auto-evict or crash took it a moment before, and LM Studio answers 400.
    sim.inject(Route::Unload, Fault::GoneBeforeUnload, Times::Once);
    let out = daemon.ctl_json(&["unload", GRANITE]).await;
    assert_eq!(out["unloaded"], serde_json::json!([GRANITE]), "{out}");
    assert!(daemon.status().await.instances.is_empty());
}

// 15 ------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_wait_out_an_engine_restart_and_an_engine_that_is_back_is_used() {
    let mut sim = start_sim(SimConfig::zero_delay()).await;
    let daemon = TestDaemon::start_with(
        &sim.url(),
        "poll_interval = \"1h\"\n[tasks]\noutage_wait = \"1s\"\n",
        &[],
    )
    .await;
    daemon.ctl_json(&["chat", GRANITE, "before"]).await;

    // Down for longer than outage_wait: the task says why, after waiting for it.
    sim.go_down().await;
    let down = daemon.ctl(&["chat", GRANITE, "down"]).await;
    assert_eq!(down.code, 5, "{}", down.stderr);
    assert!(!daemon.status().await.backend.reachable);

    // Back: with no poll due for an hour, the next task tries the engine itself.
    sim.come_back().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let back = daemon.ctl_json(&["chat", GRANITE, "back"]).await;
    assert!(content(&back).contains("Simulated reply"), "{back}");

    // A restart shorter than outage_wait: tasks sent meanwhile wait and are answered.
    sim.go_down().await;
    let socket = daemon.socket.clone();
    let during = tokio::spawn(async move {
        run_ctl(&socket, &["--json", "chat", GRANITE, "during"], None).await
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    sim.come_back().await.unwrap();
    let during = during.await.unwrap();
    assert_eq!(during.code, 0, "{}", during.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_refused_by_an_engine_that_went_down_unseen_waits_it_out_beyond_its_retries() {
    let mut sim = start_sim(SimConfig::zero_delay()).await;
    // One try for transient faults, and no poll to notice the outage first: only waiting out
    // the refusals themselves can answer this task.
    let daemon = TestDaemon::start_with(
        &sim.url(),
        "poll_interval = \"1h\"\n[tasks]\nretries = 1\noutage_wait = \"20s\"\n",
        &[],
    )
    .await;
    daemon.ctl_json(&["chat", GRANITE, "before"]).await;
    sim.go_down().await;
    let socket = daemon.socket.clone();
    let during = tokio::spawn(async move {
        run_ctl(&socket, &["--json", "chat", GRANITE, "during"], None).await
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    sim.come_back().await.unwrap();
    let during = during.await.unwrap();
    assert_eq!(during.code, 0, "{}", during.stderr);
}
