//! The test fixture: a real `lmsd` process on a temp socket, a simulator in the test process, and
//! helpers to talk to the daemon through `lmsd-ctl` or raw socket lines.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use lmsd_proto::{Client, Request, StatusReport};
use lmstudio_sim::{SimConfig, Simulator};
use serde_json::Value;
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

/// How long a test waits for something that should happen in milliseconds.
pub const PATIENCE: Duration = Duration::from_secs(15);

pub fn lmsd_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_lmsd"))
}

/// `lmsd` with its logs kept in `dir` (not the user's state directory).
pub fn lmsd_command(dir: &Path) -> Command {
    let mut command = Command::new(lmsd_bin());
    command
        .env("LOGS_DIRECTORY", dir.join("logs"))
        .env("STATE_DIRECTORY", dir.join("state"))
        .env_remove("LMSD_SOCKET")
        .env_remove("RUST_LOG")
        .kill_on_drop(true);
    command
}

/// `lmsd-ctl` sits beside `lmsd` in the target directory; `cargo test --workspace` builds both.
pub fn ctl_bin() -> PathBuf {
    let path = lmsd_bin().with_file_name("lmsd-ctl");
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test --workspace`, which builds it",
        path.display()
    );
    path
}

pub async fn start_sim(config: SimConfig) -> Simulator {
    Simulator::start(config, SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .await
        .expect("simulator starts")
}

/// A free loopback port, for a backend that is not there yet.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Waits until an lmsd on `socket` answers a status request (readiness, not a sleep).
pub async fn wait_until_serving(socket: &Path) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Ok(mut client) = Client::connect(socket).await {
            if client.call(Request::Status, |_| {}).await.is_ok() {
                return;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "lmsd did not start serving on {}",
            socket.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub struct TestDaemon {
    pub child: Child,
    pub socket: PathBuf,
    pub dir: TempDir,
    engine: Engine,
    url: String,
}

/// The engine a test daemon drives: its `[backend] kind` and its config section.
#[derive(Debug, Clone, Copy)]
pub enum Engine {
    LmStudio,
    LlamaServer,
}

/// The fixture's config: a temp socket and `server_extra` in `[server]`; the engine with a fast
/// poll and short timeouts in its section; then `extra`.
fn config_text(
    socket: &Path,
    engine: Engine,
    url: &str,
    server_extra: &str,
    extra: &str,
) -> String {
    // Defaults the test's own text does not set.
    let default = |text: &str, key: &str, value: &str| {
        if text.lines().any(|l| l.trim_start().starts_with(key)) {
            String::new()
        } else {
            format!("{key} = {value}\n")
        }
    };
    let server = default(server_extra, "shutdown_grace", "\"5s\"");
    let lmstudio: String = [
        ("poll_interval", "\"200ms\""),
        ("connect_timeout", "\"1s\""),
        ("control_timeout", "\"5s\""),
        ("request_timeout", "\"10s\""),
    ]
    .iter()
    .map(|(key, value)| default(extra.split("\n[").next().unwrap_or_default(), key, value))
    .collect();
    let section = match engine {
        Engine::LmStudio => "[lmstudio]",
        Engine::LlamaServer => "[backend]\nkind = \"llama-server\"\n\n[llama_server]",
    };
    format!("[server]\nsocket = {socket:?}\n{server}{server_extra}\n\n{section}\nurl = {url:?}\n{lmstudio}{extra}\n")
}

impl TestDaemon {
    /// Starts `lmsd` against `url` with a fast poll interval and waits until it answers.
    pub async fn start(url: &str) -> TestDaemon {
        Self::start_with(url, "", &[]).await
    }

    /// As `start`, with `extra` config text appended after the `[lmstudio]` section (more
    /// `[lmstudio]` keys, then other sections) and environment variables.
    pub async fn start_with(url: &str, extra: &str, env: &[(&str, &str)]) -> TestDaemon {
        Self::start_configured(url, "", extra, env).await
    }

    /// As `start_with`, with `server_extra` keys in the `[server]` section.
    pub async fn start_configured(
        url: &str,
        server_extra: &str,
        extra: &str,
        env: &[(&str, &str)],
    ) -> TestDaemon {
        Self::start_engine(Engine::LmStudio, url, server_extra, extra, env).await
    }

    /// As `start_configured`, against `engine` at `url`; `extra` follows the engine's section.
    pub async fn start_engine(
        engine: Engine,
        url: &str,
        server_extra: &str,
        extra: &str,
        env: &[(&str, &str)],
    ) -> TestDaemon {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("run/lmsd.sock");
        let config = dir.path().join("lmsd.toml");
        std::fs::write(
            &config,
            config_text(&socket, engine, url, server_extra, extra),
        )
        .expect("write config");
        let child = Command::new(lmsd_bin())
            .arg("--config")
            .arg(&config)
            // Sessions, ledger and instance records stay in the test's own directory, unless
            // the test shares one between daemons.
            .env("STATE_DIRECTORY", dir.path().join("state"))
            .envs(env.iter().copied())
            .env_remove("LMSD_SOCKET")
            .env_remove("RUST_LOG")
            .env("LOGS_DIRECTORY", dir.path().join("logs"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("lmsd starts");
        let daemon = TestDaemon {
            child,
            socket,
            dir,
            engine,
            url: url.to_owned(),
        };
        daemon.wait_ready().await;
        daemon
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("lmsd.toml")
    }

    /// Replaces the config file, as `start_configured` writes it.
    pub fn rewrite_config(&self, server_extra: &str, extra: &str) {
        std::fs::write(
            self.config_path(),
            config_text(&self.socket, self.engine, &self.url, server_extra, extra),
        )
        .expect("rewrite config");
    }

    /// Sends a signal (`HUP`, `TERM`, …) to the daemon.
    pub fn signal(&self, name: &str) {
        let pid = self.child.id().expect("running");
        let status = std::process::Command::new("kill")
            .args([format!("-{name}"), pid.to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
    }

    /// Everything in the daemon's log files so far.
    pub fn logs(&self) -> String {
        let mut text = String::new();
        if let Ok(entries) = std::fs::read_dir(self.dir.path().join("logs")) {
            for entry in entries.flatten() {
                text.push_str(&std::fs::read_to_string(entry.path()).unwrap_or_default());
            }
        }
        text
    }

    /// Waits until the log files contain `needle`.
    pub async fn wait_for_log(&self, needle: &str) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while !self.logs().contains(needle) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the log never said {needle:?}:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn wait_ready(&self) {
        wait_until_serving(&self.socket).await;
    }

    pub async fn client(&self) -> Client {
        Client::connect(&self.socket).await.expect("connects")
    }

    pub async fn status(&self) -> StatusReport {
        self.client()
            .await
            .status()
            .await
            .unwrap_or_else(|e| panic!("status failed: {e}"))
    }

    /// The status of `model`'s instance (the first, if it has several).
    pub async fn instance_of(&self, model: &str) -> lmsd_proto::InstanceStatus {
        let status = self.status().await;
        status
            .instances
            .into_iter()
            .find(|i| i.model == model)
            .unwrap_or_else(|| panic!("{model} has no instance"))
    }

    /// Polls status until `check` holds.
    pub async fn wait_for_status(
        &self,
        what: &str,
        check: impl Fn(&StatusReport) -> bool,
    ) -> StatusReport {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let status = self.status().await;
            if check(&status) {
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}: {status:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Runs `lmsd-ctl --socket SOCK ARGS…`.
    pub async fn ctl(&self, args: &[&str]) -> CtlOutput {
        run_ctl(&self.socket, args, None).await
    }

    /// As `ctl`, for a command that may take up to `patience` (real inference, say).
    pub async fn ctl_within(&self, args: &[&str], patience: Duration) -> CtlOutput {
        run_ctl_within(&self.socket, args, None, patience).await
    }

    pub async fn ctl_with_stdin(&self, args: &[&str], stdin: &str) -> CtlOutput {
        run_ctl(&self.socket, args, Some(stdin)).await
    }

    /// `lmsd-ctl --json ARGS…`, which must succeed; returns the parsed result.
    pub async fn ctl_json(&self, args: &[&str]) -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.ctl(&all).await;
        if out.code != 0 {
            let logs = self.logs();
            let tail: Vec<&str> = logs
                .lines()
                .rev()
                .take(40)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            panic!(
                "lmsd-ctl {args:?} failed ({}): {}\nlmsd's log ends:\n{}",
                out.code,
                out.stderr,
                tail.join("\n")
            );
        }
        serde_json::from_str(out.stdout.lines().last().unwrap_or_default())
            .unwrap_or_else(|e| panic!("lmsd-ctl {args:?} printed no JSON ({e}): {}", out.stdout))
    }

    /// Sends raw lines on one connection and reads `replies` terminal replies (events skipped).
    pub async fn raw(&self, payload: &[u8], replies: usize) -> Vec<Value> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .expect("connects");
        let (read, mut write) = stream.into_split();
        write.write_all(payload).await.expect("writes");
        let mut lines = BufReader::new(read).lines();
        let mut out = Vec::new();
        while out.len() < replies {
            let line = tokio::time::timeout(PATIENCE, lines.next_line())
                .await
                .expect("a reply in time")
                .expect("reads")
                .expect("a reply line before the connection closed");
            let reply: Value = serde_json::from_str(&line).expect("replies are JSON");
            if reply["type"] != "event" {
                out.push(reply);
            }
        }
        out
    }

    /// Sends SIGTERM and returns the exit code.
    pub async fn terminate(mut self) -> Option<i32> {
        self.signal("TERM");
        let status = tokio::time::timeout(PATIENCE, self.child.wait())
            .await
            .expect("lmsd exits in time")
            .expect("waits");
        status.code()
    }
}

pub struct CtlOutput {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

pub async fn run_ctl(socket: &Path, args: &[&str], stdin: Option<&str>) -> CtlOutput {
    run_ctl_within(socket, args, stdin, PATIENCE).await
}

pub async fn run_ctl_within(
    socket: &Path,
    args: &[&str],
    stdin: Option<&str>,
    patience: Duration,
) -> CtlOutput {
    let mut child = Command::new(ctl_bin())
        .arg("--socket")
        .arg(socket)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("lmsd-ctl starts");
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().expect("stdin");
        pipe.write_all(text.as_bytes()).await.expect("writes stdin");
    }
    let out = tokio::time::timeout(patience, child.wait_with_output())
        .await
        .expect("lmsd-ctl finishes in time")
        .expect("lmsd-ctl runs");
    CtlOutput {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Loads a model from outside lmsd, as LM Studio's GUI or `lms load` would.
pub async fn load_outside(sim: &Simulator, key: &str) -> String {
    let reply: Value = reqwest::Client::new()
        .post(format!("{}/api/v1/models/load", sim.url()))
        .json(&serde_json::json!({ "model": key }))
        .send()
        .await
        .expect("sim answers")
        .json()
        .await
        .expect("sim answers JSON");
    reply["instance_id"]
        .as_str()
        .expect("an instance id")
        .to_owned()
}

/// Polls `check` until it holds (bounded by [`PATIENCE`]).
pub async fn eventually(what: &str, check: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Unloads an instance from outside lmsd, as LM Studio's GUI would.
pub async fn unload_outside(sim: &Simulator, instance_id: &str) {
    let status = reqwest::Client::new()
        .post(format!("{}/api/v1/models/unload", sim.url()))
        .json(&serde_json::json!({ "instance_id": instance_id }))
        .send()
        .await
        .expect("sim answers")
        .status();
    assert!(
        status.is_success(),
        "outside unload of {instance_id} failed: {status}"
    );
}

/// One chat through the proto client on its own connection.
pub async fn chat(
    socket: &Path,
    model: &str,
) -> Result<lmsd_proto::ChatOutcome, lmsd_proto::ClientError> {
    let mut client = Client::connect(socket).await?;
    let request = lmsd_proto::ChatRequest {
        model: model.into(),
        input: "a task".into(),
        ..Default::default()
    };
    client.chat(request, |_| {}).await
}

/// A request line for the raw protocol.
pub fn chat_line(id: &str, model: &str, extra: serde_json::Value) -> String {
    let mut request =
        serde_json::json!({"v": 1, "id": id, "type": "chat", "model": model, "input": "a task"});
    if let (Some(request), serde_json::Value::Object(extra)) = (request.as_object_mut(), extra) {
        request.extend(extra);
    }
    format!("{request}\n")
}

/// Sends `lines` on one connection and reads every reply (events too) until `terminal`
/// results or errors have arrived.
pub async fn converse(socket: &Path, lines: &[String], terminal: usize) -> Vec<Value> {
    converse_within(socket, lines, terminal, PATIENCE).await
}

/// As `converse`, waiting up to `patience` for each reply.
pub async fn converse_within(
    socket: &Path,
    lines: &[String],
    terminal: usize,
    patience: Duration,
) -> Vec<Value> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .expect("connects");
    let (read, mut write) = stream.into_split();
    for line in lines {
        write.write_all(line.as_bytes()).await.expect("writes");
    }
    let mut replies = BufReader::new(read).lines();
    let mut out = Vec::new();
    let mut ended = 0;
    while ended < terminal {
        let line = tokio::time::timeout(patience, replies.next_line())
            .await
            .expect("replies in time")
            .expect("reads")
            .expect("the connection stays open until every answer");
        let reply: Value = serde_json::from_str(&line).expect("JSON replies");
        if reply["type"] != "event" {
            ended += 1;
        }
        out.push(reply);
    }
    out
}

/// Runs one of the Python client scripts (`tests/<name>/check.py`, the real `openai` or
/// `anthropic` package against the front door) and fails with its output unless it passed.
pub async fn python_client(name: &str, args: &[&str]) {
    python_script(
        &format!("{name}/check.py"),
        args,
        &format!("{name} client: ok"),
    )
    .await;
}

/// Runs `tests/<script>` with `args` and fails with its output unless it printed `ok`.
pub async fn python_script(script: &str, args: &[&str], ok: &str) {
    let path = format!("{}/../tests/{script}", env!("CARGO_MANIFEST_DIR"));
    let out = tokio::process::Command::new("python3")
        .arg(&path)
        .args(args)
        .output()
        .await
        .expect("python3 runs (CI installs the openai and anthropic packages)");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "{script} failed\nstdout: {stdout}\nstderr: {stderr}"
    );
    assert!(stdout.contains(ok), "{stdout}");
}
