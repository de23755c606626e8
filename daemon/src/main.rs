//! `lmsd`: parses arguments, sets up logging and signals, and runs the daemon.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use futures_util::StreamExt;
use lmsd::service::ConfigSource;
use lmsd::{Config, ReplySource, Startup};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// lmsd keeps LM Studio's models warm and runs agents' tasks on them. It talks to LM Studio's
/// REST API and serves a local socket that `lmsd-ctl` and agents use.
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "Without LM Studio, `lmsd --simulate` runs against a built-in simulator (fake replies).\n\
                  Signals: SIGTERM/SIGINT stop gracefully (twice: at once); SIGHUP reloads the config."
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
    /// Check a config file (default: the one lmsd would read), print the effective config with
    /// the token hidden, and exit: 0 if valid, 2 if not.
    #[arg(long, value_name = "FILE", num_args = 0..=1)]
    check_config: Option<Option<PathBuf>>,
    /// Print a commented example config with every default, and exit.
    #[arg(long)]
    print_default_config: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.print_default_config {
        print!("{}", Config::EXAMPLE);
        return ExitCode::SUCCESS;
    }
    let mut source = ConfigSource {
        path: args
            .config
            .clone()
            .or_else(|| lmsd_proto::paths::default_config_path().filter(|p| p.exists())),
        socket: args.socket.clone(),
        lmstudio_url: args.lmstudio_url.clone(),
    };
    if let Some(file) = args.check_config {
        return check_config(ConfigSource {
            path: file.or(source.path),
            ..source
        });
    }
    let config = match source.load() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("lmsd: {error}");
            return ExitCode::from(2);
        }
    };
    let logging = lmsd::logging::init(&config.log);
    lmsd::service::warn_if_token_exposed(source.path.as_deref(), &config);
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
    let level_setter = logging.level_setter();
    let code = runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        let (reload, reloads) = mpsc::channel(4);
        let signals = match signal_hook_tokio::Signals::new([SIGTERM, SIGINT, SIGHUP]) {
            Ok(signals) => signals,
            Err(error) => {
                eprintln!("lmsd: cannot install signal handlers: {error}");
                return ExitCode::FAILURE;
            }
        };
        let signal_task = tokio::spawn(handle_signals(signals, shutdown.clone(), reload));
        let mut config = config;
        let mut backend = ReplySource::Engine;
        let _simulator = if args.simulate {
            let sim_config = lmstudio_sim::SimConfig::default();
            match lmstudio_sim::Simulator::start(sim_config, SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).await {
                Ok(sim) => {
                    config.lmstudio.url = sim.url();
                    config.backend.kind = lmsd::config::EngineKind::Lmstudio;
                    // Reloads keep pointing at the simulator.
                    source.lmstudio_url = Some(sim.url());
                    backend = ReplySource::Simulator;
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
        let startup = Startup {
            config,
            source,
            replies: backend,
                        log_level: Some(level_setter),
        };
        let result = lmsd::run(startup, shutdown, reloads).await;
        signal_task.abort();
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                tracing::error!("{error}");
                eprintln!("lmsd: {error}");
                ExitCode::FAILURE
            }
        }
    });
    drop(logging);
    code
}

fn check_config(source: ConfigSource) -> ExitCode {
    let shown = source
        .path
        .as_deref()
        .map_or("(no file: defaults)".to_owned(), |p| {
            p.display().to_string()
        });
    match source.load() {
        Ok(config) => {
            println!("# lmsd config from {shown}: valid");
            match config
                .pool
                .memory_budget
                .resolve(lmsd::config::physical_memory())
            {
                Ok(bytes) => println!(
                    "# memory_budget = {} resolves to {bytes} bytes",
                    config.pool.memory_budget
                ),
                Err(error) => println!("# {error}"),
            }
            print!("{}", config.to_redacted_toml());
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("lmsd: {error}");
            ExitCode::from(2)
        }
    }
}

/// SIGTERM or SIGINT starts a graceful stop (a second one exits at once); SIGHUP asks for a
/// config reload.
async fn handle_signals(
    mut signals: signal_hook_tokio::Signals,
    shutdown: CancellationToken,
    reload: mpsc::Sender<()>,
) {
    while let Some(signal) = signals.next().await {
        if signal == SIGHUP {
            tracing::info!("SIGHUP: reloading the config");
            let _ = reload.try_send(());
        } else if shutdown.is_cancelled() {
            tracing::warn!("second stop signal: exiting now");
            std::process::exit(130);
        } else {
            tracing::info!(
                signal,
                "stopping: finishing open requests (signal again to exit at once)"
            );
            shutdown.cancel();
        }
    }
}
