//! Batch jobs end to end: swap-aware order with three models and memory for two, a SIGKILL
//! mid-job and every id once after the restart, cancel, delete that leaves nothing, invalid
//! lines refused by number, interactive tasks overtaking a running job, and OpenAI's Batch API
//! through the front door with the real `openai` client.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use lmstudio_sim::SimConfig;
use serde_json::{json, Value};

use crate::support::*;

const MODELS: [&str; 3] = ["ibm/granite-4-micro", "qwen/qwen3-4b", "qwen/qwen3-vl-4b"];

/// A job file of `n` lines in lmsd's form, the models taken in turn, labelling tickets.
fn job_file(dir: &std::path::Path, n: usize, models: &[&str], marker: &str) -> std::path::PathBuf {
    write_job(
        dir,
        n,
        models,
        marker,
        json!({"choices": ["bug", "feature"]}),
    )
}

/// As `job_file`, each line with `extra` fields.
fn write_job(
    dir: &std::path::Path,
    n: usize,
    models: &[&str],
    marker: &str,
    extra: Value,
) -> std::path::PathBuf {
    let text: Vec<String> = (0..n)
        .map(|i| {
            let mut line = json!({"id": format!("t{i}"), "input": format!("{marker} ticket {i}: it crashes"),
                   "model": models[i % models.len()]});
            if let (Some(line), Some(extra)) = (line.as_object_mut(), extra.as_object()) {
                line.extend(extra.clone());
            }
            line.to_string()
        })
        .collect();
    let path = dir.join("job.jsonl");
    std::fs::write(&path, text.join("\n")).unwrap();
    path
}

async fn submit(daemon: &TestDaemon, file: &std::path::Path) -> String {
    let out = daemon
        .ctl(&["--json", "batch", "submit", file.to_str().unwrap()])
        .await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    let job: Value = serde_json::from_str(&out.stdout).unwrap();
    job["job_id"].as_str().unwrap().to_owned()
}

async fn job(daemon: &TestDaemon, id: &str) -> Value {
    daemon.ctl_json(&["batch", "status", id]).await
}

async fn wait_for(daemon: &TestDaemon, id: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let job = job(daemon, id).await;
        if done(&job) {
            return job;
        }
        assert!(Instant::now() < deadline, "job never got there: {job}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The job's result lines by id.
async fn results(daemon: &TestDaemon, id: &str) -> Vec<Value> {
    let out = daemon.ctl(&["batch", "results", id]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    out.stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn counts_per_id(lines: &[Value]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for line in lines {
        *counts
            .entry(line["id"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    counts
}

/// Loads a job over three models with memory for two makes, in `order`.
async fn loads_in_order(order: &str) -> (u64, u64) {
    let sim = start_sim(SimConfig::zero_delay()).await;
    let extra = format!(
        "[pool]\nmemory_budget = \"6GB\"\nturn_hold = \"0s\"\n\n[batch]\norder = \"{order}\"\n"
    );
    let daemon = TestDaemon::start_with(&sim.url(), &extra, &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let id = submit(&daemon, &job_file(dir.path(), 30, &MODELS, "swap")).await;
    let done = wait_for(&daemon, &id, |j| j["state"] == "completed").await;
    assert_eq!(done["done"], 30, "{done}");
    let lines = results(&daemon, &id).await;
    assert!(counts_per_id(&lines).values().all(|n| *n == 1));
    assert_eq!(lines.len(), 30);
    (sim.stats().loads, done["loads"].as_u64().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_over_three_models_with_memory_for_two_swaps_once_per_model() {
    let (warm, warm_counted) = loads_in_order("warm").await;
    let (file, _) = loads_in_order("file").await;
    assert_eq!(warm, 3, "one load per model");
    assert_eq!(warm_counted, warm, "the job counts the loads it caused");
    assert!(file > warm, "the file's order swaps more: {file} loads");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_killed_mid_way_resumes_and_every_id_ends_once() {
    let mut config = SimConfig::zero_delay();
    config.token_delay = Duration::from_millis(15);
    let sim = start_sim(config).await;
    let state = tempfile::tempdir().unwrap();
    let env = [("STATE_DIRECTORY", state.path().to_str().unwrap())];
    let first = TestDaemon::start_with(&sim.url(), "", &env).await;
    let dir = tempfile::tempdir().unwrap();
    let id = submit(&first, &job_file(dir.path(), 40, &MODELS[..1], "resume")).await;
    let before = wait_for(&first, &id, |j| j["done"].as_u64() >= Some(8)).await;
    assert!(
        before["done"].as_u64() < Some(40),
        "killed mid-way: {before}"
    );
    first.signal("KILL");
    drop(first);
    let second = TestDaemon::start_with(&sim.url(), "", &env).await;
    let after = wait_for(&second, &id, |j| j["state"] == "completed").await;
    assert_eq!(
        (after["done"].as_u64(), after["failed"].as_u64()),
        (Some(40), Some(0)),
        "{after}"
    );
    let lines = results(&second, &id).await;
    assert_eq!(lines.len(), 40);
    let counts = counts_per_id(&lines);
    assert!(
        counts.len() == 40 && counts.values().all(|n| *n == 1),
        "{counts:?}"
    );
    assert!(
        lines.iter().all(|l| l["result"]["json"].is_string()),
        "{lines:?}"
    );
    // What ran twice is at most what was running at the kill (4 lines of a job at once).
    assert!(sim.stats().chats <= 44, "{:?}", sim.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_job_runs_no_more_and_a_deleted_one_leaves_nothing_behind() {
    let mut config = SimConfig::zero_delay();
    config.token_delay = Duration::from_millis(20);
    let sim = start_sim(config).await;
    let daemon = TestDaemon::start(&sim.url()).await;
    let dir = tempfile::tempdir().unwrap();
    let marker = "zebra-crossing-7421";
    let id = submit(&daemon, &job_file(dir.path(), 40, &MODELS[..1], marker)).await;
    wait_for(&daemon, &id, |j| j["done"].as_u64() >= Some(1)).await;
    let cancelled = daemon.ctl_json(&["batch", "cancel", &id]).await;
    assert_eq!(cancelled["state"], "cancelled", "{cancelled}");
    let ended = wait_for(&daemon, &id, |j| j["running"] == 0).await;
    let lines = results(&daemon, &id).await;
    let unrun = lines
        .iter()
        .filter(|l| l["error"]["code"] == "cancelled")
        .count();
    assert!(unrun > 0 && unrun < 40, "{ended}");
    assert_eq!(lines.len(), 40, "every id answered, run or not");

    let state = daemon.dir.path().join("state");
    let stored = |needle: &str| {
        std::fs::read_dir(&state).unwrap().flatten().any(|f| {
            f.file_name().to_string_lossy().starts_with("batch.sqlite")
                && std::fs::read(f.path())
                    .unwrap()
                    .windows(needle.len())
                    .any(|w| w == needle.as_bytes())
        })
    };
    assert!(
        stored(marker),
        "the job's inputs are kept until it is deleted"
    );
    let deleted = daemon.ctl(&["batch", "delete", &id]).await;
    assert_eq!(deleted.code, 0, "{}", deleted.stderr);
    let gone = daemon.ctl(&["batch", "status", &id]).await;
    assert_eq!(gone.code, 4, "{}", gone.stderr);
    assert!(
        !stored(marker),
        "a deleted job's prompts are nowhere in the store"
    );
    assert!(!daemon.logs().contains(marker), "nor in the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_lines_are_refused_by_number_unless_skipped() {
    let sim = start_sim(SimConfig::zero_delay()).await;
    let daemon = TestDaemon::start(&sim.url()).await;
    let text = [
        json!({"id": "a", "input": "fine"}).to_string(),
        "{broken".into(),
        json!({"id": "a", "input": "again"}).to_string(),
        json!({"id": "b", "input": "x", "choices": ["same", "same"]}).to_string(),
    ]
    .join("\n");
    let refused = daemon
        .ctl_with_stdin(&["batch", "submit", "-"], &text)
        .await;
    assert_eq!(refused.code, 4, "{}", refused.stderr);
    for line in ["line 2", "line 3", "line 4"] {
        assert!(refused.stderr.contains(line), "{}", refused.stderr);
    }
    assert!(daemon.ctl_json(&["batch", "list"]).await["jobs"]
        .as_array()
        .unwrap()
        .is_empty());
    let skipped = daemon
        .ctl_with_stdin(
            &["--json", "batch", "submit", "-", "--skip-invalid", "--wait"],
            &text,
        )
        .await;
    assert_eq!(skipped.code, 1, "some lines failed: {}", skipped.stderr);
    let job: Value = serde_json::from_str(skipped.stdout.lines().last().unwrap()).unwrap();
    assert_eq!(
        (job["done"].as_u64(), job["failed"].as_u64()),
        (Some(1), Some(2)),
        "{job}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interactive_tasks_overtake_a_running_job() {
    let mut config = SimConfig::zero_delay();
    config.token_delay = Duration::from_millis(40);
    let sim = start_sim(config).await;
    // Twice the model's 4 slots in the queue: an interactive task that waited its turn behind
    // them would wait two lines' time.
    let daemon = TestDaemon::start_with(&sim.url(), "[batch]\nconcurrency = 8\n", &[]).await;
    let dir = tempfile::tempdir().unwrap();
    // Summaries, not labels: each line's answer is a sentence, some 13 tokens long.
    let id = submit(
        &daemon,
        &write_job(dir.path(), 60, &MODELS[..1], "busy", json!({})),
    )
    .await;
    wait_for(&daemon, &id, |j| j["running"] == 8).await;
    let started = Instant::now();
    let chat = daemon
        .ctl_json(&["chat", MODELS[0], "urgent", "--priority", "interactive"])
        .await;
    let waited = started.elapsed();
    let job = job(&daemon, &id).await;
    assert_eq!(job["state"], "running", "the job was still running: {job}");
    // A line takes as long as this answer's tokens at 40 ms each. The interactive task waits
    // for the first slot that frees (about one line), not behind the 4 batch lines queued
    // before it (two lines).
    let line_ms = chat["usage"]["total_output_tokens"].as_u64().unwrap() * 40;
    assert!(
        chat["queued_ms"].as_u64().unwrap() < line_ms * 3 / 2,
        "{chat} (took {waited:?})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_client_runs_a_batch_through_the_front_door() {
    let mut config = SimConfig::zero_delay();
    config.token_delay = Duration::from_millis(5);
    let sim = start_sim(config).await;
    let port = free_port();
    let extra = format!("[http]\nlisten = \"127.0.0.1:{port}\"\napi_keys = [\"k-batch\"]\n");
    let daemon = TestDaemon::start_with(&sim.url(), &extra, &[]).await;
    let base = format!("http://127.0.0.1:{port}/v1");
    python_script(
        "openai/batch.py",
        &[&base, "k-batch", MODELS[0]],
        "openai batch client: ok",
    )
    .await;
    // The API's batches are lmsd's jobs, which lmsd-ctl sees too.
    let list = daemon.ctl_json(&["batch", "list"]).await;
    assert!(list["jobs"].as_array().unwrap().len() >= 2, "{list}");
}

/// A small filesystem of its own (tmpfs), for a disk that fills; `None` where this machine
/// cannot mount one (not root, or no such privilege).
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().ok()?;
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        mounted.then_some(SmallDisk { dir })
    }

    /// Takes every free byte, in a file `fill` names; deleting it frees them again.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let path = self.dir.path().join("filler");
        let mut file = std::fs::File::create(&path).unwrap();
        let block = vec![0u8; 64 * 1024];
        while file.write_all(&block).is_ok() {}
        let _ = file.write_all(&[0; 512]);
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_pauses_a_job_and_loses_nothing_done() {
    let Some(disk) = SmallDisk::mount("16m") else {
        eprintln!("SKIPPED: this machine cannot mount a tmpfs (needs root)");
        return;
    };
    let mut config = SimConfig::zero_delay();
    config.token_delay = Duration::from_millis(10);
    let sim = start_sim(config).await;
    let state = disk.dir.path().join("state");
    let env = [("STATE_DIRECTORY", state.to_str().unwrap())];
    let daemon = TestDaemon::start_with(&sim.url(), "", &env).await;
    let dir = tempfile::tempdir().unwrap();
    let id = submit(&daemon, &job_file(dir.path(), 60, &MODELS[..1], "disk")).await;
    wait_for(&daemon, &id, |j| j["done"].as_u64() >= Some(5)).await;
    let filler = disk.fill();
    let paused = wait_for(&daemon, &id, |j| j["state"] == "paused").await;
    assert!(
        paused["error"]
            .as_str()
            .unwrap_or_default()
            .contains("full"),
        "{paused}"
    );
    let done_when_paused = paused["done"].as_u64().unwrap();
    std::fs::remove_file(filler).unwrap();
    let after = wait_for(&daemon, &id, |j| j["state"] == "completed").await;
    assert_eq!(after["done"], 60, "{after}");
    assert!(done_when_paused <= 60);
    let lines = results(&daemon, &id).await;
    let counts = counts_per_id(&lines);
    assert!(
        counts.len() == 60 && counts.values().all(|n| *n == 1),
        "{counts:?}"
    );
}
