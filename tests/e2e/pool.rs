//! The warm pool end to end: idle TTL, memory budget, busy and pinned instances, one load per
//! model, outside loads. Budgets are checked against the simulator's own peak accounting.

use std::time::Duration;

use lmsd_proto::{InstanceState, LoadedBy};
use lmstudio_sim::{Fault, Route, SimConfig, Simulator, Times};

use crate::support::*;

const GRANITE: &str = "ibm/granite-4-micro"; // 2.1 GB
const QWEN: &str = "qwen/qwen3-4b"; // 2.5 GB
const VL: &str = "qwen/qwen3-vl-4b"; // 3.3 GB

fn loaded(sim: &Simulator) -> Vec<String> {
    let mut ids = sim.loaded_instances();
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_instances_expire_after_their_ttl_but_never_while_busy() {
    let sim = start_sim(SimConfig::zero_delay()).await;
    let daemon = TestDaemon::start_with(&sim.url(), "[pool]\nidle_ttl = \"300ms\"\n", &[]).await;

    sim.inject(
        Route::Chat,
        Fault::Delay(Duration::from_millis(1200)),
        Times::Once,
    );
    let socket = daemon.socket.clone();
    let running = tokio::spawn(async move { chat(&socket, GRANITE).await });
    eventually("the chat to reach LM Studio", || {
        sim.stats().chat_requests == 1
    })
    .await;
    // Twice the TTL passes while the chat runs: the instance must stay.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(loaded(&sim), [GRANITE]);
    let status = daemon.status().await;
    assert_eq!(status.instances[0].state, InstanceState::Busy);
    assert_eq!(status.instances[0].in_flight, 1);
    running.await.unwrap().expect("the chat succeeds");

    eventually("the idle instance to expire", || {
        sim.loaded_instances().is_empty()
    })
    .await;
    let status = daemon
        .wait_for_status("the eviction to show", |s| !s.evictions.is_empty())
        .await;
    assert_eq!(status.evictions[0].instance_id, GRANITE);
    assert_eq!(status.evictions[0].reason, "idle_ttl");

    // A task's own TTL wins: "never" keeps it past the pool's 300 ms.
    let out = daemon
        .ctl(&["chat", GRANITE, "keep me", "--ttl", "never"])
        .await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(loaded(&sim), [GRANITE]);
    let status = daemon.status().await;
    assert_eq!(status.instances[0].ttl_left_s, None);
    assert_eq!(status.instances[0].ttl, lmsd_proto::Ttl::Never);
    // And "0" unloads as soon as the task ends.
    assert_eq!(
        daemon
            .ctl(&["chat", GRANITE, "then go", "--ttl", "0"])
            .await
            .code,
        0
    );
    eventually("a zero TTL to unload at once", || {
        sim.loaded_instances().is_empty()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_budget_is_never_exceeded_and_the_least_valuable_idle_instance_goes() {
    let sim = start_sim(SimConfig::zero_delay()).await;
    let daemon = TestDaemon::start_with(
        &sim.url(),
        "[pool]\nmemory_budget = \"6GB\"\nturn_hold = \"0s\"\n",
        &[],
    )
    .await;
    chat(&daemon.socket, GRANITE).await.unwrap();
    // Qwen is used three times, Granite once and longer ago: Granite is cheaper to lose.
    for _ in 0..3 {
        chat(&daemon.socket, QWEN).await.unwrap();
    }
    chat(&daemon.socket, VL).await.unwrap();
    assert_eq!(loaded(&sim), [QWEN, VL]);
    assert!(
        sim.peak_memory_bytes() <= 6_000_000_000,
        "peak {}",
        sim.peak_memory_bytes()
    );
    let status = daemon.status().await;
    assert_eq!(status.evictions[0].instance_id, GRANITE);
    assert_eq!(status.evictions[0].reason, "memory");
    assert_eq!(status.memory.budget_bytes, 6_000_000_000);
    assert_eq!(status.memory.used_bytes, 2_500_000_000 + 3_300_000_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_instance_is_never_evicted_the_load_waits_for_it() {
    let sim = start_sim(SimConfig::zero_delay()).await;
    let daemon = TestDaemon::start_with(
        &sim.url(),
        "[pool]\nmemory_budget = \"5GB\"\nturn_hold = \"0s\"\n",
        &[],
    )
    .await;
    sim.inject(
        Route::Chat,
        Fault::Delay(Duration::from_millis(1000)),
        Times::Once,
    );
    let socket = daemon.socket.clone();
    let busy = tokio::spawn(async move { chat(&socket, GRANITE).await });
    eventually("the Granite chat to run", || sim.stats().chat_requests == 1).await;

    // 2.1 + 3.3 GB > 5 GB: the VL load must wait for Granite's chat, then evict it.
    let vl = chat(&daemon.socket, VL)
        .await
        .expect("the VL chat succeeds after waiting");
    let granite = busy.await.unwrap().expect("the busy chat was not cut off");
    assert_eq!(granite.model_instance_id, GRANITE);
    assert_eq!(vl.model_instance_id, VL);
    assert_eq!(loaded(&sim), [VL]);
    assert!(
        sim.peak_memory_bytes() <= 5_000_000_000,
        "peak {}",
        sim.peak_memory_bytes()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_model_survives_pressure_outside_unloads_and_restarts() {
    let sim = start_sim(SimConfig::zero_delay()).await;
    let addr = sim.addr();
    let config =
        format!("[pool]\nmemory_budget = \"6GB\"\nturn_hold = \"0s\"\n\n[models.\"{GRANITE}\"]\npinned = true\n");
    let daemon = TestDaemon::start_with(&sim.url(), &config, &[]).await;
    eventually("the pin to load at start", || {
        sim.loaded_instances() == [GRANITE]
    })
    .await;

    chat(&daemon.socket, QWEN).await.unwrap();
    chat(&daemon.socket, VL).await.unwrap();
    assert_eq!(
        loaded(&sim),
        [GRANITE, VL],
        "Qwen, not the pinned Granite, made room"
    );
    assert!(sim.peak_memory_bytes() <= 6_000_000_000);

    let refused = daemon.ctl(&["unload", GRANITE]).await;
    assert_eq!(refused.code, 4, "{}", refused.stderr);
    assert!(refused.stderr.contains("unpin"), "{}", refused.stderr);

    unload_outside(&sim, GRANITE).await;
    eventually("the pin to come back after an outside unload", || {
        sim.loaded_instances().contains(&GRANITE.to_string())
    })
    .await;

    sim.stop().await;
    let sim = Simulator::start(SimConfig::zero_delay(), addr)
        .await
        .expect("restarts on its port");
    eventually("the pin to come back after a restart", || {
        sim.loaded_instances() == [GRANITE]
    })
    .await;
    let status = daemon
        .wait_for_status("the restarted backend", |s| s.instances.len() == 1)
        .await;
    assert!(status.instances[0].pinned);

    assert_eq!(daemon.ctl(&["unpin", GRANITE]).await.code, 0);
    assert_eq!(daemon.ctl(&["unload", GRANITE]).await.code, 0);
    assert!(sim.loaded_instances().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_tasks_on_an_unloaded_model_make_one_load() {
    let mut config = SimConfig::zero_delay();
    // A quarter-second load, so that every task arrives while it runs.
    config.load_bytes_per_sec = Some(10_000_000_000);
    let sim = start_sim(config).await;
    let daemon = TestDaemon::start(&sim.url()).await;
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let socket = daemon.socket.clone();
            tokio::spawn(async move { chat(&socket, QWEN).await })
        })
        .collect();
    for task in tasks {
        let chat = task.await.unwrap().expect("every task is answered");
        assert_eq!(chat.model_instance_id, QWEN);
    }
    assert_eq!(sim.stats().loads, 1);
    assert_eq!(sim.loaded_instances(), [QWEN]);
    assert_eq!(sim.stats().chats, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outside_loads_count_against_the_budget_and_are_left_alone() {
    let sim = start_sim(SimConfig::zero_delay()).await;
    let daemon = TestDaemon::start_with(
        &sim.url(),
        "[pool]\nmemory_budget = \"6GB\"\nturn_hold = \"0s\"\n",
        &[],
    )
    .await;
    load_outside(&sim, VL).await;
    let status = daemon
        .wait_for_status("the outside load", |s| s.instances.len() == 1)
        .await;
    assert_eq!(status.instances[0].loaded_by, LoadedBy::Outside);
    assert_eq!(status.memory.used_bytes, 3_300_000_000);

    chat(&daemon.socket, QWEN).await.unwrap(); // 5.8 GB: fits
    chat(&daemon.socket, GRANITE).await.unwrap(); // needs room: Qwen goes, the outside VL stays
    assert_eq!(loaded(&sim), [GRANITE, VL]);
    assert!(sim.peak_memory_bytes() <= 6_000_000_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_exceeded_names_what_holds_the_memory() {
    let sim = start_sim(SimConfig::zero_delay()).await;
    let config = format!(
        "[pool]\nmemory_budget = \"5GB\"\nturn_hold = \"0s\"\n\n[models.\"{VL}\"]\npinned = true\n"
    );
    let daemon = TestDaemon::start_with(&sim.url(), &config, &[]).await;
    eventually("the pin to load", || sim.loaded_instances() == [VL]).await;

    let out = daemon.ctl(&["chat", QWEN, "hi"]).await;
    assert_eq!(out.code, 10, "{}", out.stderr);
    assert!(
        out.stderr.contains("budget_exceeded") && out.stderr.contains(VL),
        "{}",
        out.stderr
    );

    let too_big = daemon.ctl(&["--json", "load", "openai/gpt-oss-20b"]).await;
    assert_eq!(too_big.code, 10, "{}", too_big.stderr);
    assert!(
        too_big.stdout.contains("\"budget_exceeded\""),
        "{}",
        too_big.stdout
    );
    assert_eq!(sim.loaded_instances(), [VL]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pins_that_cannot_fit_are_a_config_error_at_start() {
    let sim = start_sim(SimConfig::zero_delay()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("lmsd.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nsocket = {:?}\n[lmstudio]\nurl = {:?}\n[pool]\nmemory_budget = \"4GB\"\nturn_hold = \"0s\"\n[models.\"{QWEN}\"]\npinned = true\n[models.\"{GRANITE}\"]\npinned = true\n",
            dir.path().join("lmsd.sock"),
            sim.url()
        ),
    )
    .unwrap();
    let out = lmsd_command(dir.path())
        .arg("--config")
        .arg(&config)
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("pinned models need"), "{stderr}");
}
