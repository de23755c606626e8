//! `lmsd-bench`: lmsd's benchmarks. Starts the simulator (zero-delay) and the real `lmsd`
//! binary, runs each measurement against a baseline taken in the same run, prints a table and
//! writes JSON.

mod batch;
mod engine;
mod live;
mod mcp;
mod replay;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use serde_json::json;

/// Measures lmsd: P1 dispatch overhead, P2 throughput, P3 memory, P4 pool policy quality,
/// P5 start-up and CLI time, P6 the front door, P7 lmsd-mcp, P8 batch jobs. Build first: `cargo build
/// --release --bins`.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// A few seconds instead of a few minutes: small samples, for CI to keep the harness alive.
    #[arg(long)]
    quick: bool,
    /// Write the results as JSON here.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Seed of the P4 traces.
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

fn raise_fd_limit() {
    if let Ok(limit) = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .maximum
        .ok_or(())
    {
        let _ = rustix::process::setrlimit(
            rustix::process::Resource::Nofile,
            rustix::process::Rlimit {
                current: Some(limit),
                maximum: Some(limit),
            },
        );
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    raise_fd_limit();
    match run(&args).await {
        Ok(results) => {
            if let Some(path) = &args.json {
                if let Err(error) = std::fs::write(
                    path,
                    serde_json::to_string_pretty(&results).unwrap_or_default(),
                ) {
                    eprintln!("lmsd-bench: cannot write {}: {error}", path.display());
                    return ExitCode::FAILURE;
                }
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("lmsd-bench: {error}");
            ExitCode::FAILURE
        }
    }
}

fn print_p1(engine: &str, direct: &str, p1: &live::DispatchOverhead) {
    println!(
        "P1 dispatch overhead on {engine}, 1 chat in flight ({} samples each, interleaved)",
        p1.direct.samples
    );
    println!(
        "  {direct:<24}p50 {:>8.1} us   p99 {:>8.1} us",
        p1.direct.p50_us, p1.direct.p99_us
    );
    println!(
        "  {:<24}p50 {:>8.1} us   p99 {:>8.1} us",
        "through lmsd", p1.via_lmsd.p50_us, p1.via_lmsd.p99_us
    );
    println!(
        "  {:<24}p50 {:>8.1} us   p99 {:>8.1} us   (targets <= 100 us, <= 1000 us: {}, {})\n",
        "lmsd adds",
        p1.overhead_p50_us,
        p1.overhead_p99_us,
        verdict(p1.overhead_p50_us <= 100.0),
        verdict(p1.overhead_p99_us <= 1000.0)
    );
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "MISSED"
    }
}

async fn run(args: &Args) -> Result<serde_json::Value, String> {
    let (p1_samples, clients, window, conns, tasks_each, starts, ctl_runs, trace_len) =
        if args.quick {
            (50, 4, Duration::from_millis(200), 20, 5, 2, 3, 300)
        } else {
            (3000, 32, Duration::from_secs(3), 1000, 10, 10, 50, 4000)
        };
    // A real chat takes milliseconds, not microseconds: fewer samples say as much.
    let p1_engine_samples = if args.quick { 20 } else { 500 };
    let idle_window = Duration::from_secs(if args.quick { 1 } else { 10 });
    let sim = live::start_sim().await?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let daemon = live::Daemon::start(
        &live::at_simulator(&sim),
        &format!("[http]\nlisten = \"127.0.0.1:{port}\"\n"),
    )
    .await?;
    let status = live::status(&daemon).await?;
    println!(
        "lmsd-bench: lmsd {} in front of the simulator at {} (zero-delay)\n",
        status.daemon.version, status.backend.url
    );

    let p1 = live::p1(&sim, &daemon, p1_samples).await?;
    print_p1("simulator (zero-delay)", "direct to simulator", &p1);
    let p1_engine = engine::p1(p1_engine_samples).await?;
    if let Some((url, p1)) = &p1_engine {
        print_p1(
            &format!("llama-server at {url}, tiny-a, 8 tokens"),
            "direct to llama-server",
            p1,
        );
    }

    let p2 = live::p2(&sim, &daemon, clients, window).await?;
    println!(
        "P2 throughput, {} clients for {:.1} s each",
        p2.clients, p2.seconds
    );
    println!(
        "  status through lmsd   {:>9.0} /s   (target >= 20000: {})",
        p2.status_per_s,
        verdict(p2.status_per_s >= 20_000.0)
    );
    println!(
        "  chats through lmsd    {:>9.0} /s   (target >= 5000: {})",
        p2.chats_per_s_via_lmsd,
        verdict(p2.chats_per_s_via_lmsd >= 5_000.0)
    );
    println!(
        "  chats direct          {:>9.0} /s   (lmsd at {:.0}% of direct)\n",
        p2.chats_per_s_direct,
        100.0 * p2.chats_per_s_via_lmsd / p2.chats_per_s_direct.max(1.0)
    );
    let p6 = live::p6(&daemon, port, p1_samples).await?;
    println!("P6 front door: the same chat in each HTTP format and via the socket (p50)");
    println!("  socket                {:>8.1} us", p6.socket.p50_us);
    for api in &p6.apis {
        println!(
            "  {:<21} {:>8.1} us   adds {:>6.1} us",
            api.api, api.spread.p50_us, api.minus_socket_p50_us
        );
    }
    println!();
    let p7 = mcp::p7(&daemon, p1_samples.min(500)).await?;
    println!("P7 MCP: the same chat via lmsd-mcp's local_task and via the socket (p50)");
    println!(
        "  socket {:>8.1} us   MCP {:>8.1} us   MCP adds {:>6.1} us\n",
        p7.socket.p50_us, p7.mcp.p50_us, p7.mcp_minus_socket_p50_us
    );
    drop(daemon);

    let p3 = live::p3(&sim, conns, tasks_each, idle_window).await?;
    println!("P3 memory (VmRSS)");
    println!(
        "  idle                  {:>8.1} MiB   (target <= 15: {})",
        p3.idle_rss_mib,
        verdict(p3.idle_rss_mib <= 15.0)
    );
    println!(
        "  idle wake-ups         {:>8.1} /s    (a model loaded, nothing to do; catalogue read every 5 s)",
        p3.idle_wakeups_per_s
    );
    println!(
        "  {} clients, {} queued tasks {:>6.1} MiB   (target <= 64: {})\n",
        p3.connections,
        p3.queued_tasks,
        p3.loaded_rss_mib,
        verdict(p3.loaded_rss_mib <= 64.0)
    );

    println!("P4 pool policy quality: {trace_len} requests per trace, seed {}, replayed in simulated time", args.seed);
    let mut p4 = serde_json::Map::new();
    for trace in replay::traces(trace_len, args.seed) {
        println!("  {}", trace.name);
        let outcomes: Vec<(replay::Policy, replay::Outcome)> = replay::Policy::ALL
            .iter()
            .map(|p| (*p, replay::replay(&trace, *p)))
            .collect();
        let belady = outcomes
            .iter()
            .filter(|(p, _)| matches!(p, replay::Policy::Belady | replay::Policy::BeladySize))
            .map(|(_, o)| o.load_seconds)
            .fold(f64::INFINITY, f64::min);
        let outcome_of = |wanted: replay::Policy| {
            outcomes
                .iter()
                .find(|(p, _)| *p == wanted)
                .map(|(_, o)| o.clone())
        };
        let (Some(lmsd), Some(lru), Some(pool_lru)) = (
            outcome_of(replay::Policy::Lmsd),
            outcome_of(replay::Policy::Lru),
            outcome_of(replay::Policy::PoolLru),
        ) else {
            continue;
        };
        for (policy, outcome) in &outcomes {
            println!(
                "    {:<30} {:>9.0} load-s  {:>5} loads  p99 wait {:>6.1} s  {:>5.2}x best Belady",
                policy.name(),
                outcome.load_seconds,
                outcome.loads,
                outcome.p99_wait_s,
                outcome.load_seconds / belady.max(1e-9)
            );
        }
        // Against LRU both as a cache and as the same queueing pool with LRU's choice of victim
        // (Ollama's order coincides with LRU's on these traces).
        let fewer = lmsd.load_seconds < lru.load_seconds.min(pool_lru.load_seconds);
        let no_slower = lmsd.p99_wait_s <= lru.p99_wait_s.max(pool_lru.p99_wait_s);
        let no_slower_in_the_pool = lmsd.p99_wait_s <= pool_lru.p99_wait_s;
        println!(
            "    targets: fewer load-s than LRU: {}; p99 wait no worse than LRU's: {} (than LRU through the pool: {}); <= 1.05x best Belady: {}",
            verdict(fewer),
            verdict(no_slower),
            verdict(no_slower_in_the_pool),
            verdict(lmsd.load_seconds <= 1.05 * belady)
        );
        if let Some(beyond) = lmsd.p99_interactive_beyond_load_s {
            println!(
                "    interactive tasks through lmsd: p99 wait beyond their load {beyond:.1} s (target <= 2 s: {}; LRU through the pool: {:.1} s)",
                verdict(beyond <= 2.0),
                pool_lru.p99_interactive_beyond_load_s.unwrap_or(0.0)
            );
        }
        p4.insert(
            trace.name.to_owned(),
            json!(outcomes
                .iter()
                .map(|(p, o)| (p.name(), o))
                .collect::<std::collections::BTreeMap<_, _>>()),
        );
    }
    println!();

    let (batch_lines, swap_lines) = if args.quick { (500, 60) } else { (10_000, 300) };
    let p8 = batch::p8(batch_lines, swap_lines).await?;
    println!(
        "P8 batch: a {}-line job on the simulator (zero delay), {} lines at a time",
        p8.lines, 4
    );
    println!(
        "  {:>8.0} lines/s ({:.1} s); the same chats over the socket {:>8.0} /s; a line costs {:.0} us beyond its chat",
        p8.lines_per_s, p8.seconds, p8.direct_chats_per_s, p8.overhead_per_line_us
    );
    println!(
        "  lmsd's RSS during the job: peak {:.1} MiB",
        p8.peak_rss_mib
    );
    println!(
        "  three models, memory for two, {} lines: {} loads warm-first, {} in the file's order\n",
        p8.swap_lines, p8.loads_warm, p8.loads_file_order
    );
    let p5 = live::p5(&sim, starts, ctl_runs).await?;
    println!("P5 start-up and CLI");
    println!(
        "  socket ready after start  p50 {:>7.1} ms  (target <= 50: {})",
        p5.socket_ready.p50_us / 1000.0,
        verdict(p5.socket_ready.p50_us <= 50_000.0)
    );
    println!(
        "  lmsd-ctl status, whole process  p50 {:>7.1} ms  p99 {:>7.1} ms  (target <= 5: {})",
        p5.ctl_status_wall.p50_us / 1000.0,
        p5.ctl_status_wall.p99_us / 1000.0,
        verdict(p5.ctl_status_wall.p50_us <= 5_000.0)
    );
    Ok(
        json!({ "p1": p1, "p1_llama_server": p1_engine.map(|(_, p1)| p1), "p2": p2, "p3": p3, "p4": p4, "p5": p5, "p6": p6, "p7": p7, "p8": p8, "quick": args.quick, "seed": args.seed }),
    )
}
