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
