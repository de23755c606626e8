//! Reliability: every accepted task ends with exactly one answer, whatever LM Studio or a client
//! does; lmsd stays up, converges to LM Studio's real state, and survives its own SIGKILL.

use std::collections::HashMap;
use std::time::Duration;

use lmsd_proto::LoadedBy;
use lmstudio_sim::{Fault, Route, SimConfig, Simulator, Times};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::support::*;

const GRANITE: &str = "ibm/granite-4-micro";
const QWEN: &str = "qwen/qwen3-4b";
const VL: &str = "qwen/qwen3-vl-4b";

/// The invariant: each id sent got exactly one terminal reply.
fn assert_each_answered_once(sent: &[String], replies: &[Value]) -> HashMap<String, Value> {
    let mut terminal: HashMap<String, Vec<&Value>> = HashMap::new();
    for reply in replies.iter().filter(|r| r["type"] != "event") {
        terminal
            .entry(reply["id"].as_str().unwrap_or("?").to_owned())
            .or_default()
            .push(reply);
    }
    for id in sent {
        let answers = terminal.get(id).map_or(0, Vec::len);
        assert_eq!(answers, 1, "task {id} got {answers} answers");
    }
    assert_eq!(terminal.len(), sent.len(), "answers for ids never sent");
    terminal
        .into_iter()
        .map(|(id, mut v)| (id, v.remove(0).clone()))
        .collect()
}

/// Sends chats (with `extra` request fields) on `connections` connections, `each` per
/// connection, and checks the invariant.
pub async fn load(
    socket: &std::path::Path,
    connections: usize,
    each: usize,
    models: &[&str],
    extra: Value,
    patience: Duration,
) -> HashMap<String, Value> {
    let models: Vec<String> = models.iter().map(|m| m.to_string()).collect();
    let workers: Vec<_> = (0..connections)
        .map(|c| {
            let socket = socket.to_owned();
            let models = models.clone();
            let extra = extra.clone();
            tokio::spawn(async move {
                let ids: Vec<String> = (0..each).map(|n| format!("c{c}-{n}")).collect();
                let lines: Vec<String> = ids
                    .iter()
                    .enumerate()
                    .map(|(n, id)| chat_line(id, &models[(c + n) % models.len()], extra.clone()))
                    .collect();
                let replies = converse_within(&socket, &lines, each, patience).await;
                assert_each_answered_once(&ids, &replies)
            })
        })
        .collect();
    let mut all = HashMap::new();
    for worker in workers {
        all.extend(worker.await.unwrap());
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_clients_times_twenty_tasks_each_answered_once() {
    let sim = start_sim(SimConfig::zero_delay()).await;
    let config = "[pool]\nmemory_budget = \"6GB\"\nturn_hold = \"100ms\"\n[tasks]\nmax_queue = 4000\nmax_wait = \"1s\"\n";
    let daemon = TestDaemon::start_with(&sim.url(), config, &[]).await;
    let answers = load(
        &daemon.socket,
        100,
        20,
        &[GRANITE, QWEN, VL],
        json!({}),
        PATIENCE,
    )
    .await;
    let failed: Vec<&Value> = answers.values().filter(|r| r["type"] != "result").collect();
    assert!(
        failed.is_empty(),
        "{} failed, e.g. {}",
        failed.len(),
        failed[0]
    );
    assert!(sim.stats().max_in_flight <= 4);
    assert!(sim.peak_memory_bytes() <= 6_000_000_000);
}

/// The full-size load of the reliability issue: run with `cargo test --release -p lmsd --test
/// e2e -- --ignored --nocapture full_size_load`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "minutes long: the full-size load, run by hand"]
async fn full_size_load() {
    let mut config = SimConfig::zero_delay();
    config.token_delay = Duration::from_micros(50);
    let sim = start_sim(config).await;
    let daemon = TestDaemon::start_configured(
        &sim.url(),
        "max_connections = 2000",
                "[pool]\nmemory_budget = \"6GB\"\nturn_hold = \"100ms\"\n[tasks]\nmax_queue = 200000\nmax_wait = \"2s\"\n",
        &[],
    )
    .await;
    let started = std::time::Instant::now();
    let rss = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .map(|v| v.trim().to_owned())
            })
            .unwrap_or_default()
    };
    let pid = daemon.child.id().unwrap();
    let peak = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                *peak.lock().unwrap() = rss(pid);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    let answers = load(
        &daemon.socket,
        1000,
        100,
        &[GRANITE, QWEN, VL],
        json!({}),
        Duration::from_secs(300),
    )
    .await;
    sampler.abort();
    let ok = answers.values().filter(|r| r["type"] == "result").count();
    eprintln!(
        "full-size load: {} answered ({} results) in {:.1} s; lmsd RSS near the end {}; after {}",
        answers.len(),
        ok,
        started.elapsed().as_secs_f64(),
        peak.lock().unwrap(),
        rss(pid)
    );
    assert_eq!(answers.len(), 100_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_lmsd_adopts_its_instances_keeps_sessions_and_clients_carry_on() {
    let sim = start_sim(SimConfig::zero_delay()).await;
    let state = tempfile::tempdir().unwrap();
    let state_dir = state.path().to_str().unwrap().to_owned();
    let env = [("STATE_DIRECTORY", state_dir.as_str())];
    let mut first = TestDaemon::start_with(&sim.url(), "[pool]\nidle_ttl = \"1h\"\n", &env).await;
    let reply = first
        .ctl_json(&["chat", GRANITE, "hello", "--session", "work"])
        .await;
    assert!(reply["content"].as_str().unwrap().contains("reply 1"));
    first.signal("KILL");
    first.child.wait().await.unwrap();

    // While lmsd is down, clients are told so, with their own exit code.
    let down = run_ctl(&first.socket, &["status"], None).await;
    assert_eq!(down.code, 3, "{}", down.stderr);
    assert!(down.stderr.contains("is lmsd running?"), "{}", down.stderr);

    // The new lmsd adopts the instance: with a short TTL now, it unloads it as its own.
    let second = TestDaemon::start_with(&sim.url(), "[pool]\nidle_ttl = \"500ms\"\n", &env).await;
    let status = second
        .wait_for_status("the adopted instance", |s| !s.instances.is_empty())
        .await;
    assert_eq!(status.instances[0].loaded_by, LoadedBy::Lmsd);
    eventually("the adopted instance to expire", || {
        sim.loaded_instances().is_empty()
    })
    .await;
    let again = second
        .ctl_json(&["chat", GRANITE, "and on", "--session", "work"])
        .await;
    assert!(
        again["content"].as_str().unwrap().contains("reply 2"),
        "the session carried on: {again}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backend_killed_mid_load_and_mid_chat_then_restarted() {
    let mut config = SimConfig::zero_delay();
    config.load_bytes_per_sec = Some(3_000_000_000); // Granite loads in 0.7 s
    let sim = start_sim(config.clone()).await;
    let addr = sim.addr();
    let daemon = TestDaemon::start(&sim.url()).await;

    // Mid-load.
    let socket = daemon.socket.clone();
    let loading = tokio::spawn(async move {
        converse(&socket, &[chat_line("mid-load", GRANITE, json!({}))], 1).await
    });
    daemon
        .wait_for_status("the load to start", |s| !s.instances.is_empty())
        .await;
    sim.stop().await;
    let sim = Simulator::start(config.clone(), addr).await.unwrap();
    let replies = loading.await.unwrap();
    assert_each_answered_once(&["mid-load".into()], &replies);

    // Mid-chat.
    daemon.ctl_json(&["load", GRANITE]).await;
    sim.inject(
        Route::Chat,
        Fault::Delay(Duration::from_secs(3)),
        Times::Once,
    );
    let socket = daemon.socket.clone();
    let chatting = tokio::spawn(async move {
        converse(&socket, &[chat_line("mid-chat", GRANITE, json!({}))], 1).await
    });
    eventually("the chat to run", || sim.stats().chat_requests == 1).await;
    sim.stop().await;
    let sim = Simulator::start(config, addr).await.unwrap();
    let replies = chatting.await.unwrap();
    assert_each_answered_once(&["mid-chat".into()], &replies);

    // lmsd converges to the restarted, empty backend and serves again.
    daemon
        .wait_for_status("convergence", |s| {
            s.backend.reachable && s.instances.len() == sim.loaded_instances().len()
        })
        .await;
    assert_eq!(daemon.ctl(&["chat", GRANITE, "hi"]).await.code, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_that_never_come_and_streams_that_stall_time_out() {
    let sim = start_sim(SimConfig::zero_delay()).await;
    let extra = "request_timeout = \"400ms\"\n[tasks]\nretries = 2\n";
    let daemon = TestDaemon::start_with(&sim.url(), extra, &[]).await;
    daemon.ctl_json(&["load", GRANITE]).await;

    sim.inject(
        Route::Chat,
        Fault::Delay(Duration::from_secs(30)),
        Times::Always,
    );
    let hung = daemon.ctl(&["chat", GRANITE, "hi"]).await;
    assert_eq!(hung.code, 5, "{}", hung.stderr);
    assert!(
        hung.stderr.contains("did not answer within"),
        "{}",
        hung.stderr
    );
    sim.clear_faults();

    sim.inject(Route::Chat, Fault::StallStream, Times::Always);
    let stalled = daemon.ctl(&["chat", GRANITE, "hi", "--stream"]).await;
    assert_eq!(stalled.code, 5, "{}", stalled.stderr);
    sim.clear_faults();
    assert_eq!(
        daemon.ctl(&["chat", GRANITE, "hi"]).await.code,
        0,
        "lmsd is still fine"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_deleted_under_a_running_daemon() {
    let sim = start_sim(SimConfig::zero_delay()).await;
    let daemon = TestDaemon::start(&sim.url()).await;
    assert_eq!(daemon.ctl(&["chat", QWEN, "hi"]).await.code, 0);
    sim.remove_model(QWEN);
    let gone = daemon.ctl(&["chat", QWEN, "hi"]).await;
    assert_eq!(gone.code, 7, "{}", gone.stderr);
    assert!(
        gone.stderr.contains(GRANITE) && !gone.stderr.contains("it has: qwen/qwen3-4b"),
        "{}",
        gone.stderr
    );
    daemon
        .wait_for_status("the instance to go", |s| s.instances.is_empty())
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_stall_or_never_read_are_cut_off_without_blocking_others() {
    let sim = start_sim(SimConfig::zero_delay()).await;
    let daemon = TestDaemon::start_configured(&sim.url(), "client_timeout = \"1s\"", "", &[]).await;

    // Half a line, then nothing.
    let mut half = tokio::net::UnixStream::connect(&daemon.socket)
        .await
        .unwrap();
    half.write_all(b"{\"v\":1,\"id\":\"half\",").await.unwrap();
    // One that sends a flood of requests and never reads a reply.
    let mut deaf = tokio::net::UnixStream::connect(&daemon.socket)
        .await
        .unwrap();
    let flood: String = (0..5000)
        .map(|n| format!("{{\"v\":1,\"id\":\"d{n}\",\"type\":\"status\"}}\n"))
        .collect();
    deaf.write_all(flood.as_bytes()).await.unwrap();

    // Meanwhile others are served.
    for _ in 0..5 {
        assert_eq!(daemon.ctl(&["status"]).await.code, 0);
    }
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(PATIENCE, half.read_to_end(&mut rest)).await;
    assert!(
        matches!(closed, Ok(Ok(0))),
        "the half-line client was cut off"
    );
    daemon.wait_for_log("left a request line unfinished").await;
    daemon.wait_for_log("does not read its replies").await;
    assert_eq!(daemon.ctl(&["status"]).await.code, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_flood_is_refused_with_a_reason_and_idle_connections_are_closed() {
    let sim = start_sim(SimConfig::zero_delay()).await;
    let daemon = TestDaemon::start_configured(
        &sim.url(),
        "max_connections = 20\nidle_timeout = \"1s\"",
        "",
        &[],
    )
    .await;
    let mut held = Vec::new();
    for n in 0..20 {
        // Each is served once, so all twenty are surely accepted before the next client comes.
        let mut stream = tokio::net::UnixStream::connect(&daemon.socket)
            .await
            .unwrap();
        stream
            .write_all(format!("{{\"v\":1,\"id\":\"h{n}\",\"type\":\"status\"}}\n").as_bytes())
            .await
            .unwrap();
        let mut reply = vec![0u8; 1];
        stream.read_exact(&mut reply).await.unwrap();
        held.push(stream);
    }
    // One more is refused at once.
    let refused = daemon.ctl(&["status"]).await;
    assert_eq!(refused.code, 12, "{}", refused.stderr);
    assert!(
        refused.stderr.contains("max_connections"),
        "{}",
        refused.stderr
    );
    // The idle twenty are closed after the idle timeout, and others get in again.
    for stream in &mut held {
        // The rest of the status reply, then the end.
        let mut lines = BufReader::new(stream).lines();
        let rest = tokio::time::timeout(PATIENCE, lines.next_line()).await;
        assert!(matches!(rest, Ok(Ok(Some(_)))));
        let end = tokio::time::timeout(PATIENCE, lines.next_line()).await;
        assert!(matches!(end, Ok(Ok(None))), "an idle connection was closed");
    }
    assert_eq!(daemon.ctl(&["status"]).await.code, 0);
    daemon.wait_for_log("closing an idle connection").await;
}
