//! `lmsd`: parses arguments, sets up logging and signals, and runs the daemon.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use futures_util::StreamExt;
use lmsd::{BackendKind, Config};
use signal_hook::consts::{SIGINT, SIGTERM};
use tokio_util::sync::CancellationToken;

/// lmsd keeps LM Studio's models warm and runs agents' tasks on them. It talks to LM Studio's
/// REST API and serves a local socket that `lmsd-ctl` and agents use.
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "Without LM Studio, `lmsd --simulate` runs against a built-in simulator (fake replies)."
)]
struct Args {
    /// TOML config file (every key optional; unknown keys are errors)
    /// [default: $XDG_CONFIG_HOME/lmsd/lmsd.toml, if it exists].
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Unix socket to serve [default: $XDG_RUNTIME_DIR/lmsd/lmsd.sock].
    #[arg(long, value_name = "PATH", env = "LMSD_SOCKET")]
    socket: Option<PathBuf>,
    /// LM Studio's base URL [default: http://127.0.0.1:1234].
    #[arg(long, value_name = "URL")]
    lmstudio_url: Option<String>,
    /// Start the LM Studio simulator in-process and use it: for trying lmsd without LM Studio.
    /// Replies are fake.
    #[arg(long, conflicts_with = "lmstudio_url")]
    simulate: bool,
}

fn init_logging() -> tracing_appender::non_blocking::WorkerGuard {
    // Non-blocking, so a slow terminal or journal never stalls request handling; lossy only if
    // the buffer overflows, which the default size makes unlikely for a daemon's log rate.
    let (writer, guard) = tracing_appender::non_blocking(std::io::stderr());
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_target(false)
        .init();
    guard
}

fn main() -> ExitCode {
    let args = Args::parse();
    let _log_guard = init_logging();
    let config_path = args
        .config
        .clone()
        .or_else(|| lmsd_proto::paths::default_config_path().filter(|p| p.exists()));
    let mut config = match &config_path {
        Some(path) => match Config::load(path) {
            Ok(config) => config,
            Err(error) => {
                eprintln!("lmsd: {error}");
                return ExitCode::from(2);
            }
        },
        None => Config::default(),
    };
    if let Some(socket) = args.socket {
        config.server.socket = Some(socket);
    }
    if let Some(url) = args.lmstudio_url {
        config.lmstudio.url = url;
    }
    if let Err(error) = config.validate() {
        eprintln!("lmsd: {error}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("lmsd: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        let signals = match signal_hook_tokio::Signals::new([SIGTERM, SIGINT]) {
            Ok(signals) => signals,
            Err(error) => {
                eprintln!("lmsd: cannot install signal handlers: {error}");
                return ExitCode::FAILURE;
            }
        };
        let signal_task = tokio::spawn(stop_on_signals(signals, shutdown.clone()));
        let mut backend = BackendKind::LmStudio;
        let _simulator = if args.simulate {
            let sim_config = lmstudio_sim::SimConfig::default();
            match lmstudio_sim::Simulator::start(sim_config, SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).await {
                Ok(sim) => {
                    config.lmstudio.url = sim.url();
                    backend = BackendKind::Simulated;
                    tracing::warn!(url = %sim.url(), "SIMULATION: lmsd is using its built-in LM Studio simulator; replies are fake");
                    Some(sim)
                }
                Err(error) => {
                    eprintln!("lmsd: cannot start the simulator: {error}");
                    return ExitCode::FAILURE;
                }
            }
        } else {
            None
        };
        let result = lmsd::run(config, backend, shutdown).await;
        signal_task.abort();
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("lmsd: {error}");
                ExitCode::FAILURE
            }
        }
    })
}

/// The first SIGTERM or SIGINT starts a graceful stop; a second one exits at once.
async fn stop_on_signals(mut signals: signal_hook_tokio::Signals, shutdown: CancellationToken) {
    if let Some(signal) = signals.next().await {
        tracing::info!(
            signal,
            "stopping: finishing open requests (signal again to exit at once)"
        );
        shutdown.cancel();
    }
    if signals.next().await.is_some() {
        tracing::warn!("second stop signal: exiting now");
        std::process::exit(130);
    }
}
