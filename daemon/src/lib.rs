//! lmsd: a daemon between agents and LM Studio. It keeps a warm pool of model instances (idle
//! TTL, memory budget, pins), serves a versioned NDJSON protocol on a unix socket, and runs
//! loads, verified unloads and chats.
//!
//! [`run`] is the whole daemon; `main.rs` only parses arguments, sets up logging and signals.

pub mod backend;
mod batch;
pub mod config;
mod front;
mod ledger;
pub mod logging;
pub mod metrics;
pub mod pool;
mod server;
pub mod service;
mod tasks;

use std::sync::Arc;
use std::time::{Duration, Instant};

use sd_notify::NotifyState;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use config::Config;

/// How long `[pool] unload_on_exit` may take before lmsd exits anyway.
const UNLOAD_ON_EXIT_LIMIT: Duration = Duration::from_secs(30);
/// How long the tasks beside the server (reloads, status reports, the front door) may take to end.
const SIDE_TASKS_LIMIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Backend(#[from] backend::BackendError),
    #[error(transparent)]
    Bind(#[from] server::BindError),
    #[error("cannot serve the HTTP front door on {addr}: {source}")]
    Http {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// Where replies come from: a real engine or the embedded LM Studio simulator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplySource {
    Engine,
    /// `lmsd --simulate`: status says so, so nobody mistakes fake replies for real ones.
    Simulator,
}

/// Everything `run` needs from `main`.
pub struct Startup {
    pub config: Config,
    /// Re-read on reload.
    pub source: service::ConfigSource,
    pub replies: ReplySource,
    pub log_level: Option<logging::LevelSetter>,
}

impl std::fmt::Debug for Startup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Startup")
            .field("config", &self.config)
            .field("source", &self.source)
            .field("replies", &self.replies)
            .finish_non_exhaustive()
    }
}

/// Runs the daemon until `shutdown` is cancelled, then drains and returns. Each message on
/// `reloads` (SIGHUP) re-reads the config. LM Studio being down is not an error: lmsd starts
/// anyway and keeps trying.
pub async fn run(
    startup: Startup,
    shutdown: CancellationToken,
    mut reloads: mpsc::Receiver<()>,
) -> Result<(), StartError> {
    let Startup {
        config,
        source,
        replies,
        log_level,
    } = startup;
    let backend = backend::Backend::from_config(&config)?;
    let settings = pool::PoolSettings::from_config(&config)?;
    // Pins that cannot fit together are a config error now, not a surprise later. Without an
    // answer from the engine the sizes are unknown; the pool then warns when it cannot load one.
    if settings.models.values().any(|m| m.pinned) {
        if let Ok(models) = backend.models().await {
            settings.check_pins(&models)?;
        }
    }
    let socket = config.socket_path();
    let listener = server::bind(&socket, config.server.socket.is_none())?;
    let http_listener = match config.http.listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Http { addr, source })?,
        ),
        None => None,
    };
    let pool_shutdown = CancellationToken::new();
    let observers = pool::Observers {
        metrics: Arc::new(metrics::Metrics::default()),
        events: tokio::sync::broadcast::Sender::new(1024),
    };
    let (pool, pool_task) = pool::spawn(
        std::sync::Arc::new(backend.clone()),
        settings.clone(),
        observers.clone(),
        pool_shutdown.clone(),
    );
    let reloader = Arc::new(service::Reloader::new(
        source,
        config.clone(),
        pool.clone(),
        log_level,
    ));
    let ledger = Arc::new(ledger::Ledger::open(
        config.state_file("ledger.jsonl"),
        config.savings.ledger_max.0,
    ));
    let ledger_stop = CancellationToken::new();
    let ledger_flusher = tokio::spawn(ledger.clone().run_flusher(ledger_stop.clone()));
    let ctx = tasks::Context {
        backend: backend.clone(),
        pool: pool.clone(),
        config: reloader.subscribe(),
        registry: Arc::new(tasks::registry::Registry::default()),
        sessions: Arc::new(tasks::sessions::Sessions::open(
            config.state_file("sessions.json"),
        )),
        observers,
        ledger: ledger.clone(),
        batches: Arc::new(batch::Batches::open(config.state_file("batch.sqlite"))),
        reloader: reloader.clone(),
        stopping: shutdown.clone(),
        started: Instant::now(),
        simulated: replies == ReplySource::Simulator,
    };
    // Tasks beside the server, each ended by `side_stop` and awaited before `run` returns.
    let side_tasks = tokio_util::task::TaskTracker::new();
    let side_stop = CancellationToken::new();
    let spawn_side = |work: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>| {
        let stop = side_stop.clone();
        side_tasks.spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = work => {}
            }
        });
    };
    spawn_side(Box::pin({
        let reloader = reloader.clone();
        async move {
            while reloads.recv().await.is_some() {
                if let Err(error) = reloader.reload().await {
                    tracing::error!("{error}");
                }
            }
        }
    }));
    spawn_side(Box::pin(service::report_status(pool.clone())));
    spawn_side(Box::pin(batch::serve(ctx.clone())));
    if let Some(http_listener) = http_listener {
        tracing::info!(listen = %config.http.listen.map(|a| a.to_string()).unwrap_or_default(), "HTTP front door open (OpenAI and Anthropic formats)");
        spawn_side(Box::pin(front::serve(
            http_listener,
            ctx.clone(),
            config.http.api_keys.clone(),
            shutdown.clone(),
        )));
    }
    spawn_side(Box::pin({
        let shutdown = shutdown.clone();
        let pool = pool.clone();
        async move {
            shutdown.cancelled().await;
            service::notify(&[NotifyState::Stopping]);
            // Running tasks may finish; queued ones cannot start and are answered so.
            pool.drain().await;
        }
    }));
    tracing::info!(
        socket = %socket.display(),
        engine = backend.kind().name(),
        url = backend.url(),
        budget_bytes = settings.budget_bytes,
        "lmsd ready"
    );
    service::notify(&[NotifyState::Ready, NotifyState::Status("serving")]);
    let options = server::ServeOptions {
        max_connections: config.server.max_connections,
        grace: config.server.shutdown_grace,
        client_timeout: config.server.client_timeout,
        idle_timeout: config.server.idle_timeout,
        peers: server::PeerPolicy {
            own_uid: rustix::process::geteuid().as_raw(),
            allow_uids: config.server.allow_uids.clone(),
            allow_gid: config.server.allow_gid,
        },
    };
    server::serve(listener, ctx, options, shutdown).await;
    // The pool outlives the server so that draining requests can still finish their chats.
    if reloader.running().await.pool.unload_on_exit {
        match tokio::time::timeout(UNLOAD_ON_EXIT_LIMIT, pool.unload_own()).await {
            Ok(Ok(outcome)) => tracing::info!(unloaded = ?outcome.unloaded, "unloaded on exit"),
            Ok(Err(error)) => tracing::warn!(%error, "unload on exit failed"),
            Err(_) => tracing::warn!("unload on exit did not finish in time"),
        }
    }
    pool_shutdown.cancel();
    let _ = pool_task.await;
    ledger_stop.cancel();
    let _ = ledger_flusher.await;
    side_stop.cancel();
    side_tasks.close();
    if tokio::time::timeout(SIDE_TASKS_LIMIT, side_tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("tasks beside the server did not end in time");
    }
    drop(reloader);
    tracing::info!("lmsd stopped");
    Ok(())
}
