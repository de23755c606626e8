//! P8: a batch job on the simulator (zero delay) — lines per second through the real runner
//! and store, what batching costs per line beside the same chats sent straight over the socket
//! at the same concurrency, lmsd's memory during the job, and loads with three models and
//! memory for two, warm-first against the file's order.

use std::time::{Duration, Instant};

use lmsd_proto::{
    BatchJob, BatchState, BatchStatusRequest, BatchSubmitRequest, ChatRequest, Client, Outcome,
    Request,
};
use serde::Serialize;

use crate::live::{at_simulator, start_sim, Daemon};

const MODELS: [&str; 3] = ["ibm/granite-4-micro", "qwen/qwen3-4b", "qwen/qwen3-vl-4b"];
/// `[batch] concurrency`, and the socket clients of the comparison.
const CONCURRENCY: usize = 4;

#[derive(Debug, Serialize)]
pub struct BatchRun {
    pub lines: usize,
    pub seconds: f64,
    pub lines_per_s: f64,
    /// The same chats as socket requests, `CONCURRENCY` at a time, one model.
    pub direct_chats_per_s: f64,
    /// What a line costs beyond its chat: store writes, scheduling, results.
    pub overhead_per_line_us: f64,
    pub peak_rss_mib: f64,
    /// Three models, memory for two: loads as lmsd orders the lines, and in the file's order.
    pub loads_warm: u64,
    pub loads_file_order: u64,
    pub swap_lines: usize,
}

/// A job of `n` lines, the models in turn.
fn job(n: usize, models: &[&str]) -> String {
    (0..n)
        .map(|i| {
            serde_json::json!({"id": i, "input": format!("Label ticket {i}: it crashes"), "model": models[i % models.len()]})
                .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

async fn status(client: &mut Client, id: &str) -> Result<BatchJob, String> {
    let request = Request::BatchStatus(BatchStatusRequest {
        job_id: Some(id.to_owned()),
    });
    match client
        .call(request, |_| {})
        .await
        .map_err(|e| e.to_string())?
    {
        Outcome::Batch(job) => Ok(job),
        other => Err(format!("unexpected {other:?}")),
    }
}

/// Runs a job to its end; its time and the daemon's peak RSS meanwhile.
async fn run_job(daemon: &Daemon, lines: String) -> Result<(BatchJob, Duration, u64), String> {
    let mut client = Client::connect(&daemon.socket)
        .await
        .map_err(|e| e.to_string())?;
    let started = Instant::now();
    let submit = Request::BatchSubmit(BatchSubmitRequest {
        lines,
        ..BatchSubmitRequest::default()
    });
    let id = match client
        .call(submit, |_| {})
        .await
        .map_err(|e| e.to_string())?
    {
        Outcome::Batch(job) => job.job_id,
        other => return Err(format!("unexpected {other:?}")),
    };
    let mut peak = 0;
    loop {
        peak = peak.max(daemon.rss_kib().unwrap_or(0));
        let job = status(&mut client, &id).await?;
        if job.state != BatchState::Running {
            return Ok((job, started.elapsed(), peak));
        }
        // As `lmsd-ctl batch submit --wait` polls (a status reads every line's state).
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `n` chats through the socket, `CONCURRENCY` clients at a time: chats per second.
async fn direct(daemon: &Daemon, n: usize) -> Result<f64, String> {
    let started = Instant::now();
    let mut workers = Vec::new();
    for worker in 0..CONCURRENCY {
        let socket = daemon.socket.clone();
        workers.push(tokio::spawn(async move {
            let mut client = Client::connect(&socket).await.map_err(|e| e.to_string())?;
            for i in (worker..n).step_by(CONCURRENCY) {
                let chat = Request::Chat(ChatRequest {
                    model: MODELS[0].into(),
                    input: format!("Label ticket {i}: it crashes"),
                    ..ChatRequest::default()
                });
                client.call(chat, |_| {}).await.map_err(|e| e.to_string())?;
            }
            Ok::<_, String>(())
        }));
    }
    for worker in workers {
        worker.await.map_err(|e| e.to_string())??;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// Loads the simulator made for a job over three models with memory for two.
async fn loads(order: &str, lines: usize) -> Result<u64, String> {
    let sim = start_sim().await?;
    let extra = format!("[batch]\norder = \"{order}\"\nconcurrency = {CONCURRENCY}\n");
    // Memory for two of the three (2.1, 2.5 and 3.3 GB).
    let pool = "memory_budget = \"6GB\"\nturn_hold = \"0s\"\n";
    let daemon = Daemon::start_with_pool(&at_simulator(&sim), &extra, pool).await?;
    run_job(&daemon, job(lines, &MODELS)).await?;
    Ok(sim.stats().loads)
}

pub async fn p8(lines: usize, swap_lines: usize) -> Result<BatchRun, String> {
    let sim = start_sim().await?;
    let extra = format!("[batch]\nconcurrency = {CONCURRENCY}\n");
    let daemon = Daemon::start(&at_simulator(&sim), &extra).await?;
    let (done, took, peak_kib) = run_job(&daemon, job(lines, &MODELS[..1])).await?;
    if done.done != lines as u64 {
        return Err(format!(
            "the job ended with {} of {lines} lines done",
            done.done
        ));
    }
    let lines_per_s = lines as f64 / took.as_secs_f64();
    let direct_chats_per_s = direct(&daemon, lines).await?;
    drop(daemon);
    let loads_warm = loads("warm", swap_lines).await?;
    let loads_file_order = loads("file", swap_lines).await?;
    Ok(BatchRun {
        lines,
        seconds: took.as_secs_f64(),
        lines_per_s,
        direct_chats_per_s,
        overhead_per_line_us: (1.0 / lines_per_s - 1.0 / direct_chats_per_s) * 1e6,
        peak_rss_mib: peak_kib as f64 / 1024.0,
        loads_warm,
        loads_file_order,
        swap_lines,
    })
}
