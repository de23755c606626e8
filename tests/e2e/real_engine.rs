//! lmsd in front of a real engine: llama.cpp's `llama-server` in router mode, with real models
//! (Gemma 3 270M and tiny random GGUF models), as `tests/real-engine/setup.sh` prepares them.
//!
//! The engine is required: without it these tests fail and say how to get it, unless
//! `LMSD_SKIP_REAL_ENGINE=1` is set, when they print that they were skipped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use lmsd_proto::{ChatRequest, Outcome, Request};
use serde_json::{json, Value};
use tempfile::TempDir;

use crate::reliability::load as load_from_clients;
use crate::support::*;

const TINY_A: &str = "tiny-a";
const TINY_B: &str = "tiny-b";
const TINY_C: &str = "tiny-c";
const GEMMA: &str = "gemma-3-270m-q4_k_m";

/// Where `setup.sh` put the engine and the models.
#[derive(Clone)]
struct EngineFiles {
    server: PathBuf,
    models: PathBuf,
}

fn engine_files() -> Option<EngineFiles> {
    let dir = std::env::var_os("LMSD_REAL_ENGINE_DIR")
        .map(PathBuf::from)
        .or_else(|| {
            let cache = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
            Some(cache.join("lmsd/real-engine"))
        });
    let files = dir.map(|dir| EngineFiles {
        server: dir.join("llama-server/llama-server"),
        models: dir.join("models"),
    });
    match files {
        Some(files) if files.server.exists() && files.models.join("tiny-a.gguf").exists() => {
            Some(files)
        }
        _ if std::env::var_os("LMSD_SKIP_REAL_ENGINE").is_some() => {
            eprintln!("SKIPPED: the real engine is not set up and LMSD_SKIP_REAL_ENGINE is set");
            None
        }
        _ => panic!(
            "the real engine (llama-server and its models) is not set up: run tests/real-engine/setup.sh, or set LMSD_SKIP_REAL_ENGINE=1 to skip the real-engine tests"
        ),
    }
}

/// A router-mode `llama-server` serving some of the models, in its own process group so that
/// it and its per-model children can be killed together.
struct Router {
    child: Child,
    files: EngineFiles,
    dir: TempDir,
    port: u16,
}

impl Router {
    /// Starts a router serving `models`; `None` when the real-engine tests are skipped.
    async fn start(models: &[&str]) -> Option<Router> {
        let files = engine_files()?;
        let dir = tempfile::tempdir().expect("temp dir");
        let models_dir = dir.path().join("models");
        std::fs::create_dir(&models_dir).expect("models dir");
        for model in models {
            let file = format!("{model}.gguf");
            std::os::unix::fs::symlink(files.models.join(&file), models_dir.join(&file))
                .expect("link the model");
        }
        // Gemma 3 270M is a base model without a chat template of its own. (A preset section
        // alone makes the router list a model, so it is written only when Gemma is served.)
        let mut presets = String::from("version = 1\n\n[*]\nc = 512\nt = 2\n");
        if models.contains(&GEMMA) {
            presets.push_str(&format!("\n[{GEMMA}]\nchat-template = gemma\n"));
        }
        std::fs::write(dir.path().join("presets.ini"), presets).expect("presets");
        Some(Router::spawn(files, dir, free_port()).await)
    }

    async fn spawn(files: EngineFiles, dir: TempDir, port: u16) -> Router {
        use std::os::unix::process::CommandExt;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.path().join("router.log"))
            .expect("router log");
        let child = Command::new(&files.server)
            .arg("--models-dir")
            .arg(dir.path().join("models"))
            .arg("--models-preset")
            .arg(dir.path().join("presets.ini"))
            .args(["--models-max", "16", "--no-models-autoload"])
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("llama-server starts");
        let router = Router {
            child,
            files,
            dir,
            port,
        };
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while router.try_listing().await.is_none() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "llama-server did not start answering:\n{}",
                router.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        router
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    async fn try_listing(&self) -> Option<Value> {
        let reply = reqwest::get(format!("{}/models", self.url())).await.ok()?;
        reply.json().await.ok()
    }

    /// The router's own view: model id → status (`loaded`, `unloaded`, …).
    async fn statuses(&self) -> Vec<(String, String)> {
        let listing = self.try_listing().await.expect("the router answers");
        listing["data"]
            .as_array()
            .expect("a model list")
            .iter()
            .map(|m| {
                (
                    m["id"].as_str().unwrap_or_default().to_owned(),
                    m["status"]["value"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    }

    async fn loaded(&self) -> Vec<String> {
        let mut loaded: Vec<String> = self
            .statuses()
            .await
            .into_iter()
            .filter(|(_, status)| status == "loaded")
            .map(|(id, _)| id)
            .collect();
        loaded.sort();
        loaded
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("router.log")).unwrap_or_default()
    }

    /// Processes running `model`'s file from this router's models directory: its children.
    fn children_of(&self, model: &str) -> Vec<u32> {
        let file = self.dir.path().join("models").join(format!("{model}.gguf"));
        processes_mentioning(&file)
    }

    /// SIGKILL to the router and its children; returns the files and port to restart with.
    fn kill(mut self) -> (EngineFiles, TempDir, u16) {
        self.kill_group();
        let _ = self.child.wait();
        let files = self.files.clone();
        let port = self.port;
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("temp dir"));
        (files, dir, port)
    }

    fn kill_group(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .status();
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        self.kill_group();
        let _ = self.child.wait();
    }
}

/// Pids whose command line names `path`.
fn processes_mentioning(path: &Path) -> Vec<u32> {
    let wanted = path.as_os_str().as_encoded_bytes();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if cmdline.split(|&b| b == 0).any(|arg| arg == wanted) {
            pids.push(pid);
        }
    }
    pids
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
    let Some(router) = Router::start(&[TINY_A, TINY_B]).await else {
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
        std::fs::metadata(router.files.models.join(format!("{model}.gguf")))
            .unwrap()
            .len()
    };
    assert_eq!(
        listed,
        [(TINY_A, file_size(TINY_A)), (TINY_B, file_size(TINY_B))],
        "sizes before any load are the GGUF files'"
    );

    // Load: the router runs the model in a child process.
    let loaded = daemon.ctl_json(&["load", TINY_A]).await;
    assert_eq!(loaded["instance_id"], TINY_A);
    assert_eq!(router.loaded().await, [TINY_A]);
    assert_eq!(router.children_of(TINY_A).len(), 1, "one child process");

    // Chat, plain and streamed: real tokens, and the same at temperature 0.
    let plain = daemon
        .ctl_json(&[
            "chat",
            TINY_A,
            "Say something.",
            "--temperature",
            "0",
            "--max-output-tokens",
            "12",
        ])
        .await;
    let text = plain["content"].as_str().unwrap();
    assert!(!text.is_empty());
    assert_eq!(plain["usage"]["total_output_tokens"], 12, "{plain}");
    assert!(plain["usage"]["input_tokens"].as_u64().unwrap() > 0);
    let streamed = daemon
        .ctl(&[
            "chat",
            TINY_A,
            "Say something.",
            "--temperature",
            "0",
            "--max-output-tokens",
            "12",
            "--stream",
        ])
        .await;
    assert_eq!(streamed.code, 0, "{}", streamed.stderr);
    assert_eq!(streamed.stdout.trim_end(), text.trim_end());

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
    let Some(router) = Router::start(&[TINY_A]).await else {
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
    assert_eq!(unknown.code, 4, "{}", unknown.stderr);
    assert!(
        unknown.stderr.contains("no conversation has response id"),
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
    assert_eq!(lost.code, 4, "{}", lost.stderr);
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
    let Some(router) = Router::start(&[TINY_A]).await else {
        return;
    };
    let daemon = daemon_for(&router, "\n[pool]\nidle_ttl = \"1s\"\nturn_hold = \"0s\"\n").await;
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
    let Some(router) = Router::start(&[TINY_A, TINY_B, TINY_C]).await else {
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
    let Some(router) = Router::start(&[TINY_B]).await else {
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
    let loads = router
        .log()
        .matches(&format!("spawning server instance with name={TINY_B} "))
        .count();
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
    let Some(router) = Router::start(&[GEMMA]).await else {
        return;
    };
    let daemon = daemon_for(&router, "request_timeout = \"60s\"\n").await;
    let out = daemon
        .ctl(&[
            "chat",
            GEMMA,
            "Write one sentence about the sea.",
            "--temperature",
            "0",
            "--max-output-tokens",
            "40",
        ])
        .await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    let text = out.stdout.trim();
    let words: Vec<&str> = text
        .split_whitespace()
        .filter(|w| {
            w.chars()
                .all(|c| c.is_ascii_alphabetic() || ".,;:!?'\"-".contains(c))
        })
        .collect();
    assert!(
        words.len() >= 5
            && words
                .iter()
                .any(|w| ["the", "a", "of", "is", "and", "to"].contains(
                    &w.to_lowercase()
                        .trim_matches(|c: char| !c.is_ascii_alphabetic())
                )),
        "not English text: {text:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_killed_and_restarted_under_load() {
    let Some(router) = Router::start(&[TINY_A, TINY_B]).await else {
        return;
    };
    let daemon = daemon_for(&router, "").await;
    daemon.ctl_json(&["load", TINY_A]).await;
    let socket = daemon.socket.clone();
    let clients = tokio::spawn(async move {
        load_from_clients(
            &socket,
            8,
            10,
            &[TINY_A, TINY_B],
            json!({"max_output_tokens": 64}),
            PATIENCE,
        )
        .await
    });
    // Once some tasks are done, kill the router and its children, then bring it back on the
    // same port.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while chats_done(&daemon).await < 10 {
        assert!(tokio::time::Instant::now() < deadline, "no chat finished");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (files, dir, port) = router.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let router = Router::spawn(files, dir, port).await;

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
