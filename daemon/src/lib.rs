//! lmsd: a daemon between agents and LM Studio. It mirrors LM Studio's model catalogue, serves a
//! versioned NDJSON protocol on a unix socket, and runs loads, verified unloads and chats.
//!
//! [`run`] is the whole daemon; `main.rs` only parses arguments, sets up logging and signals.

pub mod catalogue;
pub mod config;
pub mod lmstudio;
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
    let socket = config.socket_path();
    let listener = server::bind(&socket)?;
    let (catalogue, catalogue_task) = catalogue::spawn(
        lmstudio.clone(),
        config.lmstudio.poll_interval,
        shutdown.child_token(),
    );
    let ctx = tasks::Context {
        lmstudio,
        catalogue,
        started: Instant::now(),
        simulated: backend == BackendKind::Simulated,
    };
    tracing::info!(socket = %socket.display(), lmstudio = %config.lmstudio.url, "lmsd ready");
    server::serve(
        listener,
        ctx,
        config.server.max_connections,
        config.server.shutdown_grace,
        shutdown,
    )
    .await;
    let _ = catalogue_task.await;
    tracing::info!("lmsd stopped");
    Ok(())
}
