//! The catalogue mirror: one task owns lmsd's view of LM Studio's models and whether LM Studio
//! answers. It re-reads `GET /api/v1/models` every poll interval and whenever asked, and
//! publishes each view through a watch channel, so readers never wait on LM Studio.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::lmstudio::{BackendError, LmStudio, Model};

/// What lmsd last learned from LM Studio.
#[derive(Debug, Clone, Default)]
pub struct CatalogueView {
    /// The last model list read successfully (empty until the first success).
    pub models: Arc<Vec<Model>>,
    /// Whether the last read succeeded.
    pub reachable: bool,
    /// Why the last read failed, while `reachable` is false.
    pub last_error: Option<BackendError>,
    /// When the last successful read finished.
    pub refreshed_at: Option<Instant>,
}

/// Cheap, cloneable access to the catalogue task.
#[derive(Debug, Clone)]
pub struct CatalogueHandle {
    view: watch::Receiver<CatalogueView>,
    refresh: mpsc::Sender<oneshot::Sender<()>>,
}

impl CatalogueHandle {
    /// The latest view, without waiting.
    pub fn view(&self) -> CatalogueView {
        self.view.borrow().clone()
    }

    /// Re-reads the catalogue now and returns the fresh view.
    pub async fn refresh(&self) -> CatalogueView {
        let (done, wait) = oneshot::channel();
        if self.refresh.send(done).await.is_ok() {
            let _ = wait.await;
        }
        self.view()
    }

    /// Asks for a re-read without waiting for it (after a backend error, say).
    pub fn refresh_soon(&self) {
        let (done, _) = oneshot::channel();
        let _ = self.refresh.try_send(done);
    }
}

/// Starts the catalogue task; it stops when `shutdown` is cancelled.
pub fn spawn(
    lmstudio: LmStudio,
    poll_interval: Duration,
    shutdown: CancellationToken,
) -> (CatalogueHandle, tokio::task::JoinHandle<()>) {
    let (publish, view) = watch::channel(CatalogueView::default());
    let (refresh, requests) = mpsc::channel(64);
    let task = tokio::spawn(run(lmstudio, poll_interval, publish, requests, shutdown));
    (CatalogueHandle { view, refresh }, task)
}

async fn run(
    lmstudio: LmStudio,
    poll_interval: Duration,
    publish: watch::Sender<CatalogueView>,
    mut requests: mpsc::Receiver<oneshot::Sender<()>>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(poll_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut waiting = Vec::new();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
            Some(done) = requests.recv() => {
                waiting.push(done);
                // Requests that piled up during the last read are served by this one read.
                while let Ok(done) = requests.try_recv() {
                    waiting.push(done);
                }
            }
        }
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            result = lmstudio.models() => result,
        };
        publish.send_modify(|view| match result {
            Ok(models) => {
                if !view.reachable {
                    tracing::info!(url = lmstudio.url(), models = models.len(), "LM Studio is reachable");
                }
                view.models = Arc::new(models);
                view.reachable = true;
                view.last_error = None;
                view.refreshed_at = Some(Instant::now());
            }
            Err(error) => {
                let unchanged = view.last_error.as_ref().map(ToString::to_string) == Some(error.to_string());
                if view.reachable || !unchanged {
                    tracing::warn!(url = lmstudio.url(), %error, "cannot read LM Studio's models; will keep trying");
                }
                view.reachable = false;
                view.last_error = Some(error);
            }
        });
        for done in waiting {
            let _ = done.send(());
        }
        tick.reset();
    }
}
