//! lmsd: a daemon between agents and LM Studio. It keeps a warm pool of model instances (idle
//! TTL, memory budget, pins), serves a versioned NDJSON protocol on a unix socket, and runs
//! loads, verified unloads and chats.
//!
//! [`run`] is the whole daemon; `main.rs` only parses arguments, sets up logging and signals.

pub mod config;
pub mod lmstudio;
pub mod pool;
pub mod server;
pub mod tasks;

use std::time::Instant;

use tokio_util::sync::CancellationToken;

pub use config::Config;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Backend(#[from] lmstudio::BackendError),
    #[error(transparent)]
    Bind(#[from] server::BindError),
}

/// Where replies come from: a real LM Studio or the embedded simulator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    LmStudio,
    /// `lmsd --simulate`: status says so, so nobody mistakes fake replies for real ones.
    Simulated,
}

/// Runs the daemon until `shutdown` is cancelled, then drains and returns. LM Studio being down
/// is not an error: lmsd starts anyway and keeps trying.
pub async fn run(
    config: Config,
    backend: BackendKind,
    shutdown: CancellationToken,
) -> Result<(), StartError> {
    let token = config.lmstudio_token()?;
    let lmstudio = lmstudio::LmStudio::new(&config.lmstudio, token)?;
    let settings = pool::PoolSettings::from_config(&config)?;
    // Pins that cannot fit together are a config error now, not a surprise later. Without an
    // answer from LM Studio the sizes are unknown; the pool then warns when it cannot load one.
    if settings.models.values().any(|m| m.pinned) {
        if let Ok(models) = lmstudio.models().await {
            settings.check_pins(&models)?;
        }
    }
    let socket = config.socket_path();
    let listener = server::bind(&socket)?;
    let pool_shutdown = CancellationToken::new();
    let (pool, pool_task) = pool::spawn(lmstudio.clone(), settings.clone(), pool_shutdown.clone());
    let ctx = tasks::Context {
        lmstudio,
        pool,
        started: Instant::now(),
        simulated: backend == BackendKind::Simulated,
    };
    tracing::info!(
        socket = %socket.display(),
        lmstudio = %config.lmstudio.url,
        budget_bytes = settings.budget_bytes,
        "lmsd ready"
    );
    server::serve(
        listener,
        ctx,
        config.server.max_connections,
        config.server.shutdown_grace,
        shutdown,
    )
    .await;
    // The pool outlives the server so that draining requests can still finish their chats.
    pool_shutdown.cancel();
    let _ = pool_task.await;
    tracing::info!("lmsd stopped");
    Ok(())
}
