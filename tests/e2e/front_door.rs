//! The OpenAI-compatible front door, driven by the real `openai` Python package.

use lmstudio_sim::SimConfig;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_client_works_against_the_front_door() {
    let sim = start_sim(SimConfig::zero_delay()).await;
    let port = free_port();
    let extra = format!("[http]\nlisten = \"127.0.0.1:{port}\"\napi_keys = [\"k-test\"]\n");
    let daemon = TestDaemon::start_with(&sim.url(), &extra, &[]).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/openai/check.py");
    let out = tokio::process::Command::new("python3")
        .arg(script)
        .arg(format!("http://127.0.0.1:{port}/v1"))
        .arg("k-test")
        .output()
        .await
        .expect("python3 runs (CI installs the openai package)");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("openai client: ok"));
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
