//! P1, P2, P3, P5: the real `lmsd` binary in front of the simulator (zero-delay mode), measured
//! against the simulator called directly, in the same run.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use lmsd_proto::{ChatRequest, Client, Outcome, Request, StatusReport};
use lmstudio_sim::{Fault, Route, SimConfig, Simulator, Times};
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, Command};

pub const MODEL: &str = "ibm/granite-4-micro";

/// p50/p99 of a set of samples, in microseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Spread {
    pub p50_us: f64,
    pub p99_us: f64,
    pub samples: usize,
}

impl Spread {
    pub fn of(mut samples: Vec<Duration>) -> Self {
        samples.sort();
        let at = |q: usize| {
            samples
                .get(samples.len() * q / 100)
                .map_or(0.0, |d| d.as_secs_f64() * 1e6)
        };
        Spread {
            p50_us: at(50),
            p99_us: at(99),
            samples: samples.len(),
        }
    }
}

/// The binaries sit beside this one (`cargo build --release --bins` puts them there).
pub fn binary(name: &str) -> Result<PathBuf, String> {
    let dir = std::env::current_exe().map_err(|e| e.to_string())?;
    let path = dir.with_file_name(name);
    if path.exists() {
        Ok(path)
    } else {
        Err(format!(
            "{} is missing: build it first (cargo build --release --bins)",
            path.display()
        ))
    }
}

pub struct Daemon {
    pub child: Child,
    pub socket: PathBuf,
    _dir: tempfile::TempDir,
}

/// The config section that points lmsd at the simulator.
pub fn at_simulator(sim: &Simulator) -> String {
    format!("[lmstudio]\nurl = {:?}\n", sim.url())
}

impl Daemon {
    /// Starts lmsd with `engine` (the config of the engine it drives) and `extra` config.
    pub async fn start(engine: &str, extra: &str) -> Result<Daemon, String> {
        Self::start_with_pool(engine, extra, "memory_budget = \"64GiB\"\n").await
    }

    /// As `start`, with `pool` as the `[pool]` section's keys.
    pub async fn start_with_pool(engine: &str, extra: &str, pool: &str) -> Result<Daemon, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let socket = dir.path().join("lmsd.sock");
        let config = dir.path().join("lmsd.toml");
        let text = format!(
            "[server]\nsocket = {socket:?}\nmax_connections = 4096\n{engine}[pool]\n{pool}[tasks]\nmax_queue = 100000\n[log]\nlevel = \"warn\"\n{extra}",
        );
        std::fs::write(&config, text).map_err(|e| e.to_string())?;
        let child = Command::new(binary("lmsd")?)
            .arg("--config")
            .arg(&config)
            .env("LOGS_DIRECTORY", dir.path().join("logs"))
            .env("STATE_DIRECTORY", dir.path().join("state"))
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start lmsd: {e}"))?;
        wait_until_serving(&socket, Duration::from_secs(10)).await?;
        Ok(Daemon {
            child,
            socket,
            _dir: dir,
        })
    }

    /// Voluntary context switches of all its threads so far: how often it woke up.
    pub fn context_switches(&self) -> Option<u64> {
        let tasks = std::fs::read_dir(format!("/proc/{}/task", self.child.id()?)).ok()?;
        let mut total = 0;
        for task in tasks.flatten() {
            let status = std::fs::read_to_string(task.path().join("status")).ok()?;
            total += status
                .lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|v| v.trim().parse::<u64>().ok())?;
        }
        Some(total)
    }

    pub fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()?)).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }
}

/// Polls until lmsd answers a status request; returns how long that took.
pub async fn wait_until_serving(socket: &Path, limit: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    loop {
        if let Ok(mut client) = Client::connect(socket).await {
            if client.call(Request::Status, |_| {}).await.is_ok() {
                return Ok(started.elapsed());
            }
        }
        if started.elapsed() > limit {
            return Err("lmsd did not start serving".into());
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
}

pub async fn start_sim() -> Result<Simulator, String> {
    Simulator::start(SimConfig::zero_delay(), ([127, 0, 0, 1], 0).into())
        .await
        .map_err(|e| e.to_string())
}

pub fn chat_request() -> Request {
    Request::Chat(ChatRequest {
        model: MODEL.into(),
        input: "Summarise: the quick brown fox".into(),
        ..ChatRequest::default()
    })
}

/// One chat through lmsd; a typed error from lmsd fails the measurement.
pub async fn chat_through(client: &mut Client, request: Request) -> Result<(), String> {
    client
        .call(request, |_| {})
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

fn direct_body() -> serde_json::Value {
    serde_json::json!({ "model": MODEL, "input": "Summarise: the quick brown fox" })
}

#[derive(Debug, Serialize)]
pub struct DispatchOverhead {
    pub direct: Spread,
    pub via_lmsd: Spread,
    pub overhead_p50_us: f64,
    pub overhead_p99_us: f64,
}

/// P1: one chat at a time, straight to the simulator with a kept-alive client, then through lmsd.
pub async fn p1(
    sim: &Simulator,
    daemon: &Daemon,
    samples: usize,
) -> Result<DispatchOverhead, String> {
    let direct = reqwest::Client::new()
        .post(format!("{}/api/v1/chat", sim.url()))
        .json(&direct_body());
    dispatch_overhead(direct, chat_request(), daemon, samples).await
}

/// P1's measurement: the same chat sent straight to the engine (`direct`, on a kept-alive HTTP
/// client) and through lmsd (`via`), one at a time, `samples` of each, interleaved so that both
/// paths see the same machine noise.
pub async fn dispatch_overhead(
    direct: reqwest::RequestBuilder,
    via: Request,
    daemon: &Daemon,
    samples: usize,
) -> Result<DispatchOverhead, String> {
    let send_direct = || async {
        let request = direct
            .try_clone()
            .ok_or("the direct request cannot be repeated")?;
        let response = request.send().await.map_err(|e| e.to_string())?;
        if !response.status().is_success() {
            return Err(format!("the engine answered {}", response.status()));
        }
        response.bytes().await.map(drop).map_err(|e| e.to_string())
    };
    let mut client = Client::connect(&daemon.socket)
        .await
        .map_err(|e| e.to_string())?;
    // Warm both paths: the model loaded, connections open.
    chat_through(&mut client, via.clone()).await?;
    send_direct().await?;
    let mut direct_times = Vec::with_capacity(samples);
    let mut via_times = Vec::with_capacity(samples);
    for _ in 0..samples {
        let started = Instant::now();
        send_direct().await?;
        direct_times.push(started.elapsed());
        let started = Instant::now();
        chat_through(&mut client, via.clone()).await?;
        via_times.push(started.elapsed());
    }
    let (direct, via_lmsd) = (Spread::of(direct_times), Spread::of(via_times));
    Ok(DispatchOverhead {
        overhead_p50_us: via_lmsd.p50_us - direct.p50_us,
        overhead_p99_us: via_lmsd.p99_us - direct.p99_us,
        direct,
        via_lmsd,
    })
}

#[derive(Debug, Serialize)]
pub struct FrontDoor {
    pub socket: Spread,
    /// Each of the front door's wire formats, the same chat in it.
    pub apis: Vec<FrontDoorApi>,
}

#[derive(Debug, Serialize)]
pub struct FrontDoorApi {
    pub api: &'static str,
    pub spread: Spread,
    pub minus_socket_p50_us: f64,
}

/// The same short chat in each front-door format: path and body.
fn front_door_requests() -> [(&'static str, &'static str, serde_json::Value); 3] {
    let prompt = "Summarise: the quick brown fox";
    [
        (
            "chat completions",
            "/v1/chat/completions",
            serde_json::json!({"model": MODEL, "messages": [{"role": "user", "content": prompt}]}),
        ),
        (
            "responses",
            "/v1/responses",
            serde_json::json!({"model": MODEL, "input": prompt, "store": false}),
        ),
        (
            "messages",
            "/v1/messages",
            serde_json::json!({"model": MODEL, "max_tokens": 64, "messages": [{"role": "user", "content": prompt}]}),
        ),
    ]
}

/// P6: the same chat through each of the front door's formats and through the socket,
/// interleaved so that each sees the same machine.
pub async fn p6(daemon: &Daemon, port: u16, samples: usize) -> Result<FrontDoor, String> {
    let http = reqwest::Client::new();
    let requests = front_door_requests();
    let mut client = Client::connect(&daemon.socket)
        .await
        .map_err(|e| e.to_string())?;
    let mut via_socket = Vec::with_capacity(samples);
    let mut via_http: Vec<Vec<Duration>> = requests
        .iter()
        .map(|_| Vec::with_capacity(samples))
        .collect();
    for _ in 0..samples {
        let started = Instant::now();
        chat_through(&mut client, chat_request()).await?;
        via_socket.push(started.elapsed());
        for ((_, path, body), times) in requests.iter().zip(&mut via_http) {
            let started = Instant::now();
            let response = http
                .post(format!("http://127.0.0.1:{port}{path}"))
                .json(body)
                .send()
                .await
                .map_err(|e| e.to_string())?;
            if !response.status().is_success() {
                return Err(format!("{path} answered {}", response.status()));
            }
            response.bytes().await.map_err(|e| e.to_string())?;
            times.push(started.elapsed());
        }
    }
    let socket = Spread::of(via_socket);
    let apis = requests
        .iter()
        .zip(via_http)
        .map(|((api, _, _), times)| {
            let spread = Spread::of(times);
            FrontDoorApi {
                api,
                minus_socket_p50_us: spread.p50_us - socket.p50_us,
                spread,
            }
        })
        .collect();
    Ok(FrontDoor { socket, apis })
}

#[derive(Debug, Serialize)]
pub struct Throughput {
    pub clients: usize,
    pub seconds: f64,
    pub status_per_s: f64,
    pub chats_per_s_via_lmsd: f64,
    pub chats_per_s_direct: f64,
}

/// Runs `clients` workers made by `make` and returns their total count per second.
async fn rate<F, Fut>(clients: usize, make: F) -> Result<f64, String>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<u64, String>> + Send + 'static,
{
    let started = Instant::now();
    let workers: Vec<_> = (0..clients).map(|_| tokio::spawn(make())).collect();
    let mut total = 0;
    for worker in workers {
        total += worker.await.map_err(|e| e.to_string())??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

/// P2: many clients in flight for a fixed window: status requests, then chats, through lmsd; and
/// chats straight to the simulator.
pub async fn p2(
    sim: &Simulator,
    daemon: &Daemon,
    clients: usize,
    window: Duration,
) -> Result<Throughput, String> {
    let socket = daemon.socket.clone();
    let status_per_s = rate(clients, || {
        let socket = socket.clone();
        async move {
            let mut client = Client::connect(&socket).await.map_err(|e| e.to_string())?;
            let end = Instant::now() + window;
            let mut n = 0;
            while Instant::now() < end {
                client
                    .call(Request::Status, |_| {})
                    .await
                    .map_err(|e| e.to_string())?;
                n += 1;
            }
            Ok(n)
        }
    })
    .await?;
    let chats_per_s_via_lmsd = rate(clients, || {
        let socket = socket.clone();
        async move {
            let mut client = Client::connect(&socket).await.map_err(|e| e.to_string())?;
            let end = Instant::now() + window;
            let mut n = 0;
            while Instant::now() < end {
                chat_through(&mut client, chat_request()).await?;
                n += 1;
            }
            Ok(n)
        }
    })
    .await?;
    let http = reqwest::Client::new();
    let url = format!("{}/api/v1/chat", sim.url());
    let chats_per_s_direct = rate(clients, || {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let end = Instant::now() + window;
            let mut n = 0;
            while Instant::now() < end {
                let response = http
                    .post(&url)
                    .json(&direct_body())
                    .send()
                    .await
                    .map_err(|e| e.to_string())?;
                response.bytes().await.map_err(|e| e.to_string())?;
                n += 1;
            }
            Ok(n)
        }
    })
    .await?;
    Ok(Throughput {
        clients,
        seconds: window.as_secs_f64(),
        status_per_s,
        chats_per_s_via_lmsd,
        chats_per_s_direct,
    })
}

#[derive(Debug, Serialize)]
pub struct Memory {
    pub idle_rss_mib: f64,
    /// Times per second an idle lmsd (a model loaded, nothing to do) wakes up.
    pub idle_wakeups_per_s: f64,
    pub loaded_rss_mib: f64,
    pub connections: usize,
    pub queued_tasks: usize,
}

/// P3: daemon RSS idle, then with many clients connected and their tasks queued behind a stalled
/// model.
pub async fn p3(
    sim: &Simulator,
    connections: usize,
    tasks_each: usize,
    idle_window: Duration,
) -> Result<Memory, String> {
    let daemon = Daemon::start(&at_simulator(sim), "").await?;
    let mib = |kib: Option<u64>| kib.map_or(f64::NAN, |k| k as f64 / 1024.0);
    let mut client = Client::connect(&daemon.socket)
        .await
        .map_err(|e| e.to_string())?;
    chat_through(&mut client, chat_request()).await?;
    let idle_rss_mib = mib(daemon.rss_kib());
    // After the chat's own aftermath (the ledger's write), count wake-ups while nothing happens.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = daemon.context_switches();
    tokio::time::sleep(idle_window).await;
    let idle_wakeups_per_s = match (before, daemon.context_switches()) {
        (Some(before), Some(after)) => (after - before) as f64 / idle_window.as_secs_f64(),
        _ => f64::NAN,
    };
    sim.inject(
        Route::Chat,
        Fault::Delay(Duration::from_secs(600)),
        Times::Always,
    );
    let mut streams = Vec::with_capacity(connections);
    for c in 0..connections {
        let mut stream = tokio::net::UnixStream::connect(&daemon.socket)
            .await
            .map_err(|e| e.to_string())?;
        let mut lines = String::new();
        for t in 0..tasks_each {
            lines.push_str(&format!(
                "{{\"v\":1,\"id\":\"c{c}t{t}\",\"type\":\"chat\",\"model\":\"{MODEL}\",\"input\":\"x\"}}\n"
            ));
        }
        stream
            .write_all(lines.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        streams.push(stream);
    }
    let wanted = connections * tasks_each;
    let deadline = Instant::now() + Duration::from_secs(60);
    let queued = loop {
        let listed = match client.call(Request::Tasks, |_| {}).await {
            Ok(Outcome::Tasks(list)) => list.tasks.len(),
            _ => 0,
        };
        if listed >= wanted || Instant::now() > deadline {
            break listed;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let loaded_rss_mib = mib(daemon.rss_kib());
    drop(streams);
    sim.clear_faults();
    Ok(Memory {
        idle_rss_mib,
        idle_wakeups_per_s,
        loaded_rss_mib,
        connections,
        queued_tasks: queued,
    })
}

#[derive(Debug, Serialize)]
pub struct Startup {
    pub socket_ready: Spread,
    pub ctl_status_wall: Spread,
}

/// P5: time from spawning `lmsd` to its socket answering, and the wall time of a whole
/// `lmsd-ctl status` process.
pub async fn p5(sim: &Simulator, starts: usize, ctl_runs: usize) -> Result<Startup, String> {
    let mut ready = Vec::new();
    for _ in 0..starts {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let socket = dir.path().join("s.sock");
        let started = Instant::now();
        let mut child = Command::new(binary("lmsd")?)
            .args([
                "--socket",
                socket.to_str().unwrap_or_default(),
                "--lmstudio-url",
                &sim.url(),
            ])
            .env("LOGS_DIRECTORY", dir.path().join("logs"))
            // Never the user's own state (ledger, sessions): each daemon its own.
            .env("STATE_DIRECTORY", dir.path().join("state"))
            .env_remove("RUST_LOG")
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| e.to_string())?;
        wait_until_serving(&socket, Duration::from_secs(10)).await?;
        ready.push(started.elapsed());
        let _ = child.kill().await;
    }
    let daemon = Daemon::start(&at_simulator(sim), "").await?;
    let ctl = binary("lmsd-ctl")?;
    let mut walls = Vec::new();
    for _ in 0..ctl_runs {
        let started = Instant::now();
        let out = Command::new(&ctl)
            .arg("--socket")
            .arg(&daemon.socket)
            .arg("status")
            .output()
            .await
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err("lmsd-ctl status failed".into());
        }
        walls.push(started.elapsed());
    }
    Ok(Startup {
        socket_ready: Spread::of(ready),
        ctl_status_wall: Spread::of(walls),
    })
}

/// The backend as lmsd sees it, to check the bench ran against what it thinks.
pub async fn status(daemon: &Daemon) -> Result<StatusReport, String> {
    let mut client = Client::connect(&daemon.socket)
        .await
        .map_err(|e| e.to_string())?;
    match client.call(Request::Status, |_| {}).await {
        Ok(Outcome::Status(status)) => Ok(status),
        other => Err(format!("status failed: {other:?}")),
    }
}
