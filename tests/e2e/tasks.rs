//! The agent's path: the queue (bounds, deadlines, priorities, cancel, disconnects), model choice,
//! sessions, embeddings, faults survived, and lmsd-ctl as a drop-in for the old scripts.

use std::collections::HashMap;
use std::time::Duration;

use lmstudio_sim::{Fault, Route, SimConfig, Times};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

use crate::support::*;

const GRANITE: &str = "ibm/granite-4-micro";
const QWEN: &str = "qwen/qwen3-4b";
const VL: &str = "qwen/qwen3-vl-4b";

fn terminal_by_id(replies: &[Value]) -> HashMap<String, Vec<&Value>> {
    let mut by_id: HashMap<String, Vec<&Value>> = HashMap::new();
    for reply in replies.iter().filter(|r| r["type"] != "event") {
        by_id
            .entry(reply["id"].as_str().unwrap_or("?").to_owned())
            .or_default()
            .push(reply);
    }
    by_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_tasks_over_three_models_with_room_for_two() {
    let mut config = SimConfig::zero_delay();
    config.token_delay = Duration::from_millis(1);
    let sim = start_sim(config).await;
    let daemon = TestDaemon::start_with(
        &sim.url(),
        "[pool]\nmemory_budget = \"6GB\"\nturn_hold = \"200ms\"\n",
        &[],
    )
    .await;
    let models = [GRANITE, QWEN, VL];
    let connections: Vec<_> = (0..10)
        .map(|c| {
            let socket = daemon.socket.clone();
            tokio::spawn(async move {
                let lines: Vec<String> = (0..20)
                    .map(|n| chat_line(&format!("c{c}-{n}"), models[(c + n) % 3], json!({})))
                    .collect();
                converse(&socket, &lines, 20).await
            })
        })
        .collect();
    let mut answered = 0;
    for connection in connections {
        let replies = connection.await.unwrap();
        for (id, terminals) in terminal_by_id(&replies) {
            assert_eq!(
                terminals.len(),
                1,
                "{id} answered {} times",
                terminals.len()
            );
            assert_eq!(terminals[0]["type"], "result", "{id}: {}", terminals[0]);
            answered += 1;
        }
    }
    assert_eq!(answered, 200);
    assert_eq!(sim.stats().chats, 200);
    assert!(
        sim.stats().max_in_flight <= 4,
        "an instance ran {} at once",
        sim.stats().max_in_flight
    );
    assert!(
        sim.peak_memory_bytes() <= 6_000_000_000,
        "peak {}",
        sim.peak_memory_bytes()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_says_so() {
    let sim = start_sim(SimConfig::zero_delay()).await;
    let daemon = TestDaemon::start_with(&sim.url(), "[tasks]\nmax_queue = 2\n", &[]).await;
    sim.inject(
        Route::Chat,
        Fault::Delay(Duration::from_millis(800)),
        Times::Always,
    );
    // Four run (the instance's slots), two wait, the rest find the queue full.
    let lines: Vec<String> = (0..9)
        .map(|n| chat_line(&format!("q{n}"), GRANITE, json!({})))
        .collect();
    let replies = converse(&daemon.socket, &lines, 9).await;
    let by_id = terminal_by_id(&replies);
    let full: Vec<_> = by_id
        .values()
        .filter(|r| r[0]["error"]["code"] == "queue_full")
        .collect();
    let done: Vec<_> = by_id
        .values()
        .filter(|r| r[0]["type"] == "result")
        .collect();
    assert_eq!(by_id.len(), 9);
    assert!(!full.is_empty(), "no queue_full among {replies:?}");
    assert_eq!(full.len() + done.len(), 9, "{replies:?}");
    assert!(full[0][0]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("max_queue"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_pass_while_running_and_while_queued() {
    let sim = start_sim(SimConfig::zero_delay()).await;
    let daemon = TestDaemon::start(&sim.url()).await;
    daemon.ctl_json(&["load", GRANITE]).await;

    sim.inject(
        Route::Chat,
        Fault::Delay(Duration::from_secs(3)),
        Times::Once,
    );
    let running = daemon
        .ctl(&["chat", GRANITE, "slow", "--timeout", "300ms"])
        .await;
    assert_eq!(running.code, 13, "{}", running.stderr);
    assert!(running.stderr.contains("deadline"), "{}", running.stderr);

    // Fill the four slots, then a fifth task waits in the queue past its deadline.
    sim.inject(
        Route::Chat,
        Fault::Delay(Duration::from_millis(1500)),
        Times::N(4),
    );
    let before = sim.stats().chat_requests;
    let busy: Vec<String> = (0..4)
        .map(|n| chat_line(&format!("b{n}"), GRANITE, json!({})))
        .collect();
    let socket = daemon.socket.clone();
    let blockers = tokio::spawn(async move { converse(&socket, &busy, 4).await });
    eventually("four chats running", || {
        sim.stats().chat_requests == before + 4
    })
    .await;
    let queued = daemon
        .ctl(&["chat", GRANITE, "waits", "--timeout", "300ms"])
        .await;
    assert_eq!(queued.code, 13, "{}", queued.stderr);
    assert_eq!(
        sim.stats().chat_requests,
        before + 4,
        "the queued task never reached LM Studio"
    );
    let blockers = blockers.await.unwrap();
    assert!(blockers.iter().filter(|r| r["type"] == "result").count() == 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_can_be_listed_and_cancelled() {
    let sim = start_sim(SimConfig::zero_delay()).await;
    let daemon = TestDaemon::start(&sim.url()).await;
    sim.inject(
        Route::Chat,
        Fault::Delay(Duration::from_secs(5)),
        Times::Once,
    );
    let socket = daemon.socket.clone();
    let slow = tokio::spawn(async move {
        run_ctl(
            &socket,
            &["chat", GRANITE, "slow", "--priority", "batch"],
            None,
        )
        .await
    });
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let task = loop {
        let tasks = daemon.ctl_json(&["tasks"]).await;
        if let Some(task) = tasks["tasks"].as_array().and_then(|t| t.first()).cloned() {
            break task;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the task never showed up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(task["model"], GRANITE);
    assert_eq!(task["priority"], "batch");
    let id = task["task_id"].as_str().unwrap();
    let cancel = daemon.ctl_json(&["cancel", id]).await;
    assert_eq!(cancel["cancelled"], true);
    let out = slow.await.unwrap();
    assert_eq!(out.code, 14, "{}", out.stderr);
    assert!(daemon.ctl_json(&["tasks"]).await["tasks"]
        .as_array()
        .unwrap()
        .is_empty());
    assert_eq!(daemon.ctl_json(&["cancel", id]).await["cancelled"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_cancels_its_tasks_but_a_half_close_still_gets_answers() {
    let sim = start_sim(SimConfig::zero_delay()).await;
    let daemon = TestDaemon::start(&sim.url()).await;
    sim.inject(
        Route::Chat,
        Fault::Delay(Duration::from_secs(5)),
        Times::Once,
    );
    let stream = tokio::net::UnixStream::connect(&daemon.socket)
        .await
        .unwrap();
    let (_read, mut write) = stream.into_split();
    write
        .write_all(chat_line("gone", GRANITE, json!({})).as_bytes())
        .await
        .unwrap();
    eventually("the chat to reach LM Studio", || {
        sim.stats().chat_requests == 1
    })
    .await;
    assert_eq!(
        daemon.ctl_json(&["tasks"]).await["tasks"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    drop(write);
    drop(_read);
    daemon.wait_for_status("the task to go", |_| true).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while !daemon.ctl_json(&["tasks"]).await["tasks"]
        .as_array()
        .unwrap()
        .is_empty()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the hung-up client's task was not cancelled"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Half-close: the client is done sending but still reading.
    let stream = tokio::net::UnixStream::connect(&daemon.socket)
        .await
        .unwrap();
    let (read, mut write) = stream.into_split();
    write
        .write_all(chat_line("half", GRANITE, json!({})).as_bytes())
        .await
        .unwrap();
    write.shutdown().await.unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(read));
    let reply: Value = loop {
        let line = lines.next_line().await.unwrap().expect("an answer");
        let reply: Value = serde_json::from_str(&line).unwrap();
        if reply["type"] != "event" {
            break reply;
        }
    };
    assert_eq!(reply["id"], "half");
    assert_eq!(reply["type"], "result");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_chooses_by_vision_context_and_kind() {
    let sim = start_sim(SimConfig::zero_delay()).await;
    let daemon = TestDaemon::start(&sim.url()).await;
    let vision = daemon
        .ctl_json(&["chat", "auto", "describe", "--vision"])
        .await;
    assert_eq!(vision["model"], VL, "{vision}");
    assert_eq!(vision["reason"], "fits in free memory without evicting");
    // Now loaded, it is chosen again for that reason.
    let again = daemon
        .ctl_json(&["chat", "auto", "describe", "--vision"])
        .await;
    assert_eq!(again["reason"], "a loaded instance meets the needs");

    let long = daemon
        .ctl_json(&["chat", "auto", "a long document", "--min-context", "200000"])
        .await;
    assert_eq!(long["model"], VL, "only the VL model has a 256k context");
    let thinker = daemon
        .ctl_json(&["chat", "auto", "think", "--reasoning"])
        .await;
    assert_eq!(thinker["model"], QWEN);

    let none = daemon
        .ctl(&["chat", "auto", "x", "--min-context", "999999"])
        .await;
    assert_eq!(none.code, 7, "{}", none.stderr);

    let embedded = daemon
        .ctl_json(&["embed", "auto", "first text", "second text"])
        .await;
    assert_eq!(embedded["model"], "text-embedding-nomic-embed-text-v1.5");
    let vectors = embedded["embeddings"].as_array().unwrap();
    assert_eq!(vectors.len(), 2);
    assert_ne!(vectors[0], vectors[1]);
    let plain = daemon
        .ctl(&[
            "embed",
            "text-embedding-nomic-embed-text-v1.5",
            "first text",
        ])
        .await;
    let first: Vec<f64> = serde_json::from_str(plain.stdout.trim()).unwrap();
    assert_eq!(json!(first), vectors[0], "equal texts embed equally");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_continues_across_a_daemon_restart() {
    let sim = start_sim(SimConfig::zero_delay()).await;
    let state = tempfile::tempdir().unwrap();
    let state_dir = state.path().to_str().unwrap().to_owned();
    let env = [("STATE_DIRECTORY", state_dir.as_str())];
    let first = TestDaemon::start_with(&sim.url(), "", &env).await;
    for turn in 1..=2 {
        let reply = first
            .ctl_json(&["chat", GRANITE, "go on", "--session", "review"])
            .await;
        assert!(
            reply["content"]
                .as_str()
                .unwrap()
                .contains(&format!("Simulated reply {turn}")),
            "{reply}"
        );
    }
    assert_eq!(first.terminate().await, Some(0));

    let second = TestDaemon::start_with(&sim.url(), "", &env).await;
    let reply = second
        .ctl_json(&["chat", GRANITE, "and then", "--session", "review"])
        .await;
    assert!(
        reply["content"]
            .as_str()
            .unwrap()
            .contains("Simulated reply 3"),
        "{reply}"
    );
    let sessions = second.ctl_json(&["sessions"]).await;
    assert_eq!(sessions["sessions"][0]["name"], "review");
    assert_eq!(sessions["sessions"][0]["turns"], 3);
    let forgot = second.ctl_json(&["sessions", "forget", "review"]).await;
    assert_eq!(forgot["forgotten"], "review");
    let fresh = second
        .ctl_json(&["chat", GRANITE, "anew", "--stateful"])
        .await;
    assert!(
        fresh["content"]
            .as_str()
            .unwrap()
            .contains("Simulated reply 1"),
        "{fresh}"
    );
    assert_eq!(
        second.ctl_json(&["sessions"]).await["sessions"][0]["name"],
        "default"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_are_survived_the_way_a_careful_script_would() {
    let mut config = SimConfig::zero_delay();
    config.memory_bytes = 5_000_000_000;
    let sim = start_sim(config).await;
    let daemon = TestDaemon::start(&sim.url()).await;

    // A burst of 5xx: retried with backoff.
    sim.inject(Route::Chat, Fault::Status(503), Times::N(2));
    let burst = daemon.ctl_json(&["chat", GRANITE, "hi"]).await;
    assert_eq!(burst["attempts"], 3);

    // An empty answer: the instance is reloaded once and the task retried.
    let loads = sim.stats().loads;
    sim.inject(Route::Chat, Fault::EmptyOutput, Times::Once);
    let empty = daemon.ctl_json(&["chat", GRANITE, "hi"]).await;
    assert_eq!(empty["content_source"], "message");
    assert_eq!(sim.stats().loads, loads + 1, "reloaded once");

    // The instance vanishes under a running task: reloaded, retried.
    sim.inject(
        Route::Chat,
        Fault::Delay(Duration::from_millis(500)),
        Times::Once,
    );
    let requests = sim.stats().chat_requests;
    let socket = daemon.socket.clone();
    let running =
        tokio::spawn(
            async move { run_ctl(&socket, &["--json", "chat", GRANITE, "hi"], None).await },
        );
    eventually("the chat to be held", || {
        sim.stats().chat_requests == requests + 1
    })
    .await;
    unload_outside(&sim, GRANITE).await;
    let out = running.await.unwrap();
    assert_eq!(out.code, 0, "{}", out.stderr);

    // LM Studio runs out of memory although lmsd's budget has room: an idle instance goes.
    daemon.ctl_json(&["load", QWEN]).await; // 2.5 GB
    let vl = daemon.ctl_json(&["chat", VL, "hi"]).await; // 3.3 GB more than LM Studio's 5 GB
    assert_eq!(vl["model"], VL);
    assert!(!sim.loaded_instances().contains(&QWEN.to_string()));

    // A missing model: named with what exists, or the prefer list takes over.
    let missing = daemon.ctl(&["chat", "nobody/nothing", "hi"]).await;
    assert_eq!(missing.code, 7);
    assert!(missing.stderr.contains(GRANITE), "{}", missing.stderr);
    let fallback = daemon
        .ctl_json(&["chat", "nobody/nothing", "hi", "--prefer", GRANITE])
        .await;
    assert_eq!(fallback["model"], GRANITE);
    assert_eq!(fallback["reason"], "fallback from the prefer list");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priorities_order_the_queue() {
    let sim = start_sim(SimConfig::zero_delay()).await;
    let daemon = TestDaemon::start(&sim.url()).await;
    daemon.ctl_json(&["load", GRANITE]).await;
    sim.inject(
        Route::Chat,
        Fault::Delay(Duration::from_millis(1500)),
        Times::N(4),
    );
    let busy: Vec<String> = (0..4)
        .map(|n| chat_line(&format!("b{n}"), GRANITE, json!({})))
        .collect();
    let socket = daemon.socket.clone();
    let blockers = tokio::spawn(async move { converse(&socket, &busy, 4).await });
    eventually("four chats running", || sim.stats().chat_requests == 4).await;
    // The batch task queues first and hears it is next...
    let stream = tokio::net::UnixStream::connect(&daemon.socket)
        .await
        .unwrap();
    let (read, mut write) = stream.into_split();
    write
        .write_all(chat_line("batch", GRANITE, json!({"priority": "batch"})).as_bytes())
        .await
        .unwrap();
    let mut batch_lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(read));
    let mut batch: Vec<Value> = Vec::new();
    while batch.iter().all(|r| r["event"] != "queued") {
        let line = batch_lines
            .next_line()
            .await
            .unwrap()
            .expect("a queued event");
        batch.push(serde_json::from_str(&line).unwrap());
    }
    // ...then an interactive one arrives and goes ahead of it.
    let interactive = converse(
        &daemon.socket,
        &[chat_line(
            "urgent",
            GRANITE,
            json!({"priority": "interactive"}),
        )],
        1,
    )
    .await;
    while batch.last().is_none_or(|r| r["type"] == "event") {
        let line = batch_lines
            .next_line()
            .await
            .unwrap()
            .expect("the batch answer");
        batch.push(serde_json::from_str(&line).unwrap());
    }
    let positions = |replies: &[Value]| -> Vec<u64> {
        replies
            .iter()
            .filter(|r| r["event"] == "queued")
            .map(|r| r["position"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(
        positions(&interactive),
        [1],
        "the interactive task goes first"
    );
    assert_eq!(
        positions(&batch).get(..2),
        Some(&[1, 2][..]),
        "the batch task steps back"
    );
    blockers.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_just_used_instance_is_held_for_the_agent_s_next_turn_unless_someone_waited_too_long() {
    let sim = start_sim(SimConfig::zero_delay()).await;
    let config = "[pool]\nmemory_budget = \"3GB\"\nturn_hold = \"2s\"\n";
    let daemon = TestDaemon::start_with(&sim.url(), config, &[]).await;
    chat(&daemon.socket, GRANITE).await.unwrap();
    let socket = daemon.socket.clone();
    let waiting = tokio::spawn(async move { chat(&socket, QWEN).await });
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while daemon.ctl_json(&["tasks"]).await["tasks"]
        .as_array()
        .unwrap()
        .is_empty()
    {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(sim.loaded_instances(), [GRANITE], "held for its turn");
    let qwen = waiting.await.unwrap().unwrap();
    assert!(
        qwen.task.queued_ms >= 1000,
        "it waited for the hold: {:?}",
        qwen.task
    );
    assert_eq!(sim.loaded_instances(), [QWEN]);

    // With max_wait short, a waiting task does not sit out a long hold.
    let sim = start_sim(SimConfig::zero_delay()).await;
    let impatient = TestDaemon::start_with(
        &sim.url(),
        "[pool]\nmemory_budget = \"3GB\"\nturn_hold = \"1h\"\n[tasks]\nmax_wait = \"300ms\"\n",
        &[],
    )
    .await;
    chat(&impatient.socket, GRANITE).await.unwrap();
    let swapped = chat(&impatient.socket, QWEN)
        .await
        .expect("the hold gives way after max_wait");
    assert_eq!(swapped.model_instance_id, QWEN);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_works_as_the_old_scripts_did() {
    let sim = start_sim(SimConfig::zero_delay()).await;
    let daemon = TestDaemon::start(&sim.url()).await;

    let selftest = daemon.ctl(&["selftest"]).await;
    assert_eq!(selftest.code, 0, "{}{}", selftest.stdout, selftest.stderr);
    for step in ["health", "load", "chat", "unload", "verify"] {
        assert!(selftest.stdout.contains(step), "{}", selftest.stdout);
    }
    assert!(sim.loaded_instances().is_empty());

    let log = daemon.dir.path().join("calls.jsonl");
    let log_arg = log.to_str().unwrap();
    assert_eq!(
        daemon
            .ctl(&[
                "chat",
                GRANITE,
                "secret prompt",
                "--log",
                log_arg,
                "--unload-after"
            ])
            .await
            .code,
        0
    );
    assert_eq!(
        daemon
            .ctl(&["chat", "nobody/x", "other", "--log", log_arg])
            .await
            .code,
        7
    );
    let lines: Vec<Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["outcome"], "ok");
    assert_eq!(lines[0]["instance"], GRANITE);
    assert!(lines[0]["usage"]["input_tokens"].is_number() && lines[0]["total_ms"].is_number());
    assert_eq!(lines[1]["outcome"], "model_not_found");
    assert!(
        !std::fs::read_to_string(&log)
            .unwrap()
            .contains("secret prompt"),
        "no prompt without --log-content"
    );
    eventually("--unload-after to unload", || {
        sim.loaded_instances().is_empty()
    })
    .await;

    daemon.ctl_json(&["load", GRANITE]).await;
    daemon.ctl_json(&["load", QWEN, "--pin"]).await;
    let all = daemon.ctl_json(&["unload", "--all"]).await;
    assert_eq!(all["unloaded"], json!([GRANITE]));
    assert_eq!(sim.loaded_instances(), [QWEN], "pinned models stay");

    let piped = daemon
        .ctl_with_stdin(
            &["chat", GRANITE, "-", "--keep"],
            "a long document\nfrom stdin",
        )
        .await;
    assert_eq!(piped.code, 0);
    assert_eq!(
        daemon.instance_of(GRANITE).await.ttl,
        lmsd_proto::Ttl::Never
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_model_gets_a_second_instance_when_allowed() {
    let mut config = SimConfig::zero_delay();
    config.token_delay = Duration::from_millis(5);
    let sim = start_sim(config).await;
    let daemon = TestDaemon::start_with(&sim.url(), "[pool]\nmax_instances = 2\n", &[]).await;
    let lines: Vec<String> = (0..16)
        .map(|n| chat_line(&format!("m{n}"), GRANITE, json!({})))
        .collect();
    let replies = converse(&daemon.socket, &lines, 16).await;
    assert!(
        replies.iter().filter(|r| r["type"] == "result").count() == 16,
        "{replies:?}"
    );
    let mut loaded = sim.loaded_instances();
    loaded.sort();
    assert_eq!(loaded, [GRANITE.to_string(), format!("{GRANITE}:2")]);
    assert_eq!(sim.stats().loads, 2);
    assert!(sim.stats().max_in_flight <= 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_memory_moves_on_to_smaller_models_only() {
    let mut config = SimConfig::zero_delay();
    config.memory_bytes = 3_000_000_000;
    let sim = start_sim(config).await;
    let daemon = TestDaemon::start(&sim.url()).await;
    let gemma = "google/gemma-3-12b";
    // VL (3.3 GB) does not fit LM Studio's 3 GB; Gemma is bigger still and is skipped.
    let reply = daemon
        .ctl_json(&["chat", VL, "hi", "--prefer", gemma, "--prefer", GRANITE])
        .await;
    assert_eq!(reply["model"], GRANITE);
    assert_eq!(reply["attempts"], 2, "VL, then Granite; never Gemma");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_savings_ledger_counts_tokens_at_paid_prices_across_restarts() {
    let sim = start_sim(SimConfig::zero_delay()).await;
    let state = tempfile::tempdir().unwrap();
    let state_dir = state.path().to_str().unwrap().to_owned();
    let env = [("STATE_DIRECTORY", state_dir.as_str())];
    let prices = "[savings]\ninput_usd_per_mtok = 1000000.0\noutput_usd_per_mtok = 2000000.0\n";
    let first = TestDaemon::start_with(&sim.url(), prices, &env).await;
    let a = first
        .ctl_json(&["chat", GRANITE, "one two three", "--tag", "coder"])
        .await;
    let b = first
        .ctl_json(&["chat", QWEN, "four", "--tag", "reviewer"])
        .await;
    assert_eq!(
        first
            .ctl(&["chat", "nobody/x", "five", "--tag", "coder"])
            .await
            .code,
        7
    );
    assert_eq!(first.terminate().await, Some(0));

    let second = TestDaemon::start_with(&sim.url(), prices, &env).await;
    let report = second.ctl_json(&["savings", "--by", "agent"]).await;
    let tokens = |r: &Value| {
        (
            r["usage"]["input_tokens"].as_u64().unwrap(),
            r["usage"]["total_output_tokens"].as_u64().unwrap(),
        )
    };
    let ((ai, ao), (bi, bo)) = (tokens(&a), tokens(&b));
    assert_eq!(
        report["tasks"], 2,
        "the failed task saved nothing: {report}"
    );
    assert_eq!(report["input_tokens"], ai + bi);
    assert_eq!(report["output_tokens"], ao + bo);
    // At a dollar per input token and two per output token, the sum is exact.
    let expected = (ai + bi) as f64 + 2.0 * (ao + bo) as f64;
    assert!(
        (report["usd_saved"].as_f64().unwrap() - expected).abs() < 1e-6,
        "{report}"
    );
    let groups: Vec<&str> = report["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["key"].as_str().unwrap())
        .collect();
    assert_eq!(groups, ["coder", "reviewer"]);
    let human = second
        .ctl(&["savings", "--by", "model", "--since", "1h"])
        .await;
    assert!(
        human.stdout.contains("2 tasks served locally") && human.stdout.contains(GRANITE),
        "{}",
        human.stdout
    );
    let ledger = std::fs::read_to_string(state.path().join("ledger.jsonl")).unwrap();
    assert!(!ledger.contains("one two three"), "no prompt in the ledger");
}

#[tokio::test]
async fn ledger_lines_reach_the_disk_while_lmsd_runs() {
    // Neither a `savings` request nor a shutdown flushes here: only the periodic writer can.
    let sim = start_sim(SimConfig::zero_delay()).await;
    let state = tempfile::tempdir().unwrap();
    let state_dir = state.path().to_str().unwrap().to_owned();
    let daemon =
        TestDaemon::start_with(&sim.url(), "", &[("STATE_DIRECTORY", state_dir.as_str())]).await;
    daemon
        .ctl_json(&["chat", GRANITE, "hello", "--tag", "writer"])
        .await;
    let ledger = state.path().join("ledger.jsonl");
    eventually("the ledger line on disk", || {
        std::fs::read_to_string(&ledger).is_ok_and(|text| text.contains("\"writer\""))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_tasks_loads_evictions_and_first_tokens() {
    let sim = start_sim(SimConfig::zero_delay()).await;
    let daemon = TestDaemon::start_with(
        &sim.url(),
        "[pool]\nmemory_budget = \"3GB\"\nturn_hold = \"0s\"\n",
        &[],
    )
    .await;
    assert_eq!(daemon.ctl(&["chat", GRANITE, "hi"]).await.code, 0);
    assert_eq!(daemon.ctl(&["chat", QWEN, "hi", "--stream"]).await.code, 0);
    assert_eq!(daemon.ctl(&["chat", "nobody/x", "hi"]).await.code, 7);
    let metrics = daemon.ctl(&["metrics"]).await.stdout;
    for line in [
        "lmsd_tasks_total{kind=\"chat\",outcome=\"ok\"} 2",
        "lmsd_tasks_total{kind=\"chat\",outcome=\"model_not_found\"} 1",
        "lmsd_loads_total 2",
        "lmsd_evictions_total{reason=\"memory\"} 1",
        "lmsd_first_token_seconds_count 1",
        "lmsd_memory_budget_bytes 3000000000",
        "lmsd_instances 1",
    ] {
        assert!(metrics.contains(line), "missing {line:?} in:\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_follow_loads_tasks_and_evictions() {
    let sim = start_sim(SimConfig::zero_delay()).await;
    let daemon = TestDaemon::start_with(
        &sim.url(),
        "[pool]\nmemory_budget = \"3GB\"\nturn_hold = \"0s\"\n",
        &[],
    )
    .await;
    let stream = tokio::net::UnixStream::connect(&daemon.socket)
        .await
        .unwrap();
    let (read, mut write) = stream.into_split();
    write
        .write_all(b"{\"v\":1,\"id\":\"ev\",\"type\":\"events\"}\n")
        .await
        .unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(read));
    // The subscription is live once it hears of a probe task; probe until it does.
    'live: loop {
        assert_eq!(
            daemon
                .ctl(&["embed", "text-embedding-nomic-embed-text-v1.5", "probe"])
                .await
                .code,
            0
        );
        while let Ok(Some(line)) =
            tokio::time::timeout(Duration::from_millis(500), lines.next_line())
                .await
                .unwrap_or(Ok(None))
        {
            if line.contains("task_finished") {
                break 'live;
            }
        }
    }
    assert_eq!(daemon.ctl(&["chat", GRANITE, "hi"]).await.code, 0);
    assert_eq!(daemon.ctl(&["chat", QWEN, "hi"]).await.code, 0);
    let mut seen: Vec<String> = Vec::new();
    while !seen
        .iter()
        .filter(|e| e.starts_with("task_finished"))
        .count()
        >= 2
    {
        let line = tokio::time::timeout(PATIENCE, lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let event: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(event["id"], "ev");
        let name = event["event"].as_str().unwrap().to_owned();
        seen.push(match name.as_str() {
            "unloaded" => format!(
                "unloaded {} {}",
                event["instance_id"].as_str().unwrap(),
                event["reason"].as_str().unwrap()
            ),
            "loaded" | "load_started" => format!("{name} {}", event["model"].as_str().unwrap()),
            other => other.to_owned(),
        });
        if seen
            .iter()
            .filter(|e| e.starts_with("task_finished"))
            .count()
            >= 2
        {
            break;
        }
    }
    let expected = [
        "task_queued".to_owned(),
        format!("load_started {GRANITE}"),
        format!("loaded {GRANITE}"),
        "task_started".to_owned(),
        "task_finished".to_owned(),
        "task_queued".to_owned(),
        format!("unloaded {GRANITE} memory"),
        format!("load_started {QWEN}"),
        format!("loaded {QWEN}"),
        "task_started".to_owned(),
        "task_finished".to_owned(),
    ];
    assert_eq!(seen, expected);

    // status --watch draws at once (and keeps going until interrupted).
    let mut watch = tokio::process::Command::new(ctl_bin())
        .args([
            "--socket",
            daemon.socket.to_str().unwrap(),
            "status",
            "--watch",
        ])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out =
        tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(watch.stdout.take().unwrap()));
    let mut drawn = String::new();
    while !drawn.contains("memory budget") {
        let line = tokio::time::timeout(PATIENCE, out.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        drawn.push_str(&line);
    }
    watch.kill().await.unwrap();
}
