//! `lmstudio-sim`: runs the LM Studio simulator standalone, for demos and manual testing.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use lmstudio_sim::{SimConfig, SimModel, Simulator};

/// A stand-in for LM Studio's REST API v1 (models, load, unload, chat with SSE), with simulated
/// memory, load times, JIT loading and idle TTL. Its replies are fake text.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Port to listen on.
    #[arg(long, default_value_t = 1234)]
    port: u16,
    /// Address to listen on (keep it on loopback).
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// JSON file with the model catalogue (an array of models); the built-in one has six.
    #[arg(long)]
    catalogue: Option<PathBuf>,
    /// Memory for loaded models, in bytes.
    #[arg(long)]
    memory_bytes: Option<u64>,
    /// Require `Authorization: Bearer TOKEN` (or `x-api-key: TOKEN`) on every request.
    #[arg(long)]
    auth_token: Option<String>,
    /// No load time and no per-token delay (for benchmarks).
    #[arg(long)]
    zero_delay: bool,
    /// Milliseconds per generated token.
    #[arg(long, conflicts_with = "zero_delay")]
    token_ms: Option<u64>,
    /// Idle TTL of just-in-time loaded models, in seconds.
    #[arg(long)]
    jit_ttl_secs: Option<u64>,
    /// Seconds an idle keep-alive connection stays open (Node's keepAliveTimeout, 5 s).
    #[arg(long)]
    keep_alive_secs: Option<u64>,
    /// Milliseconds one embeddings request takes (an instance serves one at a time).
    #[arg(long)]
    embed_ms: Option<u64>,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let mut config = if args.zero_delay {
        SimConfig::zero_delay()
    } else {
        SimConfig::default()
    };
    if let Some(path) = &args.catalogue {
        let parsed = std::fs::read_to_string(path)
            .map_err(|e| e.to_string())
            .and_then(|text| {
                serde_json::from_str::<Vec<SimModel>>(&text).map_err(|e| e.to_string())
            });
        match parsed {
            Ok(models) => config.catalogue = models,
            Err(error) => {
                eprintln!(
                    "lmstudio-sim: cannot read catalogue {}: {error}",
                    path.display()
                );
                return std::process::ExitCode::from(2);
            }
        }
    }
    if let Some(bytes) = args.memory_bytes {
        config.memory_bytes = bytes;
    }
    if let Some(ms) = args.token_ms {
        config.token_delay = Duration::from_millis(ms);
    }
    if let Some(secs) = args.jit_ttl_secs {
        config.jit_ttl = Duration::from_secs(secs);
    }
    if let Some(secs) = args.keep_alive_secs {
        config.keep_alive_timeout = Duration::from_secs(secs);
    }
    if let Some(ms) = args.embed_ms {
        config.embed_delay = Duration::from_millis(ms);
    }
    config.auth_token = args.auth_token;
    let sim = match Simulator::start(config, SocketAddr::new(args.host, args.port)).await {
        Ok(sim) => sim,
        Err(error) => {
            eprintln!(
                "lmstudio-sim: cannot listen on {}:{}: {error}",
                args.host, args.port
            );
            return std::process::ExitCode::from(1);
        }
    };
    eprintln!(
        "lmstudio-sim: simulated LM Studio API on {} (Ctrl-C stops)",
        sim.url()
    );
    let _ = tokio::signal::ctrl_c().await;
    sim.stop().await;
    std::process::ExitCode::SUCCESS
}
