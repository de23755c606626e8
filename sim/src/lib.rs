//! lmstudio-sim: a stand-in for LM Studio 0.4's REST API v1, for lmsd's tests, demos and
//! benchmarks.
//!
//! It follows LM Studio's documented and observed behaviour: the `/api/v1/models` catalogue with
//! `loaded_instances`, strict load bodies, `key:2` instances on a second load, memory that runs
//! out, load time proportional to size, just-in-time loads on chat with idle TTL and auto-evict,
//! stateful chats with `response_id`, SSE streaming, optional bearer-token auth, and `200` with an
//! `error` string for unknown routes. Tests switch faults on with [`Simulator::inject`].

mod api;
pub mod catalogue;
pub mod faults;
mod state;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use catalogue::{default_catalogue, SimModel, SimModelKind};
pub use faults::{Fault, Route, Times};
pub use state::SimStats;

use faults::FaultRule;
use state::SimState;

/// How the simulated LM Studio behaves.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub catalogue: Vec<SimModel>,
    /// Memory available for loaded models; a load that would exceed it fails.
    pub memory_bytes: u64,
    /// Load speed; a model of `size_bytes` takes `size_bytes / speed` seconds. `None` loads at once.
    pub load_bytes_per_sec: Option<u64>,
    /// Time per generated token.
    pub token_delay: Duration,
    /// Just-in-time loading on chat.
    pub jit: bool,
    /// Keep only the last JIT-loaded model.
    pub auto_evict: bool,
    /// Idle TTL of JIT-loaded instances.
    pub jit_ttl: Duration,
    /// When set, every request must carry `Authorization: Bearer <token>`.
    pub auth_token: Option<String>,
}

impl Default for SimConfig {
    /// Demo speed: a 2.5 GB model loads in about half a second, tokens come at ~60/s.
    fn default() -> Self {
        SimConfig {
            catalogue: default_catalogue(),
            memory_bytes: 24 * 1024 * 1024 * 1024,
            load_bytes_per_sec: Some(5_000_000_000),
            token_delay: Duration::from_millis(15),
            jit: true,
            auto_evict: true,
            jit_ttl: Duration::from_secs(3600),
            auth_token: None,
        }
    }
}

impl SimConfig {
    /// No waiting anywhere: for tests and benchmarks.
    pub fn zero_delay() -> Self {
        SimConfig {
            load_bytes_per_sec: None,
            token_delay: Duration::ZERO,
            ..SimConfig::default()
        }
    }

    pub(crate) fn load_time(&self, size_bytes: u64) -> Duration {
        match self.load_bytes_per_sec {
            Some(speed) if speed > 0 => Duration::from_secs_f64(size_bytes as f64 / speed as f64),
            _ => Duration::ZERO,
        }
    }
}

/// State shared by the HTTP handlers. The lock guards plain data and is never held across an
/// `.await`; a test tool does not need an actor.
#[derive(Debug)]
pub(crate) struct Shared {
    state: Mutex<SimState>,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, SimState> {
        // A panic while holding the lock leaves plain data behind, still usable.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A running simulator. Dropping it stops the server.
#[derive(Debug)]
pub struct Simulator {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
    server: JoinHandle<()>,
    sweeper: JoinHandle<()>,
}

impl Simulator {
    /// Starts serving on `addr` (port 0 picks a free one).
    pub async fn start(config: SimConfig, addr: SocketAddr) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(SimState::new(config)),
        });
        let (shutdown, stopped) = oneshot::channel::<()>();
        let app = api::router(shared.clone());
        let server = tokio::spawn(async move {
            let serve = axum::serve(listener, app).with_graceful_shutdown(async {
                let _ = stopped.await;
            });
            if let Err(error) = serve.await {
                tracing::warn!(%error, "simulator server stopped");
            }
        });
        let sweeper = tokio::spawn(expire_idle_instances(shared.clone()));
        Ok(Simulator {
            addr,
            shared,
            shutdown: Some(shutdown),
            server,
            sweeper,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`: what lmsd's `[lmstudio] url` should be.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Makes `fault` happen on `route` for the given number of requests.
    pub fn inject(&self, route: Route, fault: Fault, times: Times) {
        self.shared
            .lock()
            .faults
            .push(FaultRule::new(route, fault, times));
    }

    /// Deletes a model from the catalogue (and unloads its instances), as deleting its files would.
    pub fn remove_model(&self, key: &str) {
        let mut state = self.shared.lock();
        state.config.catalogue.retain(|m| m.key != key);
        state.instances.retain(|i| i.key != key);
    }

    pub fn clear_faults(&self) {
        self.shared.lock().faults.clear();
    }

    pub fn set_auth_token(&self, token: Option<String>) {
        self.shared.lock().config.auth_token = token;
    }

    pub fn stats(&self) -> SimStats {
        self.shared.lock().stats
    }

    /// Ids of the loaded instances, in load order.
    pub fn loaded_instances(&self) -> Vec<String> {
        self.shared
            .lock()
            .instances
            .iter()
            .map(|i| i.id.clone())
            .collect()
    }

    /// The most memory ever in use or reserved by loads at one moment.
    pub fn peak_memory_bytes(&self) -> u64 {
        self.shared.lock().peak_bytes
    }

    /// Stops the server, letting open requests finish for up to a second.
    pub async fn stop(mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), &mut self.server).await;
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        self.server.abort();
        self.sweeper.abort();
    }
}

/// LM Studio's idle TTL for JIT-loaded models, checked a few times a second.
async fn expire_idle_instances(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        let expired = shared.lock().expire_idle(Instant::now());
        for id in expired {
            tracing::info!(instance = %id, "simulator: idle TTL expired, unloaded");
        }
    }
}
