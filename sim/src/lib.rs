//! lmstudio-sim: a stand-in for LM Studio 0.4's REST API v1, for lmsd's tests, demos and
//! benchmarks.
//!
//! It follows LM Studio's documented and observed behaviour (the project's notes,
//! `lmstudio-fidelity.md`):
//! - `/api/v1/models` lists the catalogue with `loaded_instances`, `format` (`gguf`/`mlx`), and
//!   `config.parallel` 4 for GGUF LLMs, 1 for MLX LLMs, none for embedding models.
//! - Loads: strict bodies, `key:2` instances on a second load, memory that runs out, load time
//!   proportional to size; a load goes on when its client disconnects.
//! - Chats: JIT loads with idle TTL and auto-evict, a bare key reaching the oldest instance,
//!   stateful turns with `response_id` (`store` defaults to true), SSE with `chat.start` first
//!   and `chat.end` last. Rejected as real servers do: input items other than `text`
//!   (`content`) and `image` (`data_url`), `temperature` outside 0..=1, `system_prompt` on a
//!   continuation (500, #2219), prompts over the loaded context (`exceed_context_size_error`).
//!   A second concurrent chat on an MLX instance crashes it, failing both.
//! - `/v1/embeddings` serves one request at a time per instance, JIT-loads an embedding key,
//!   and answers a name that is not loaded with the loaded embedding instance, named in
//!   `model`. Vectors depend on the model and the text ([`embed_text`]).
//! - Bearer or `x-api-key` auth when a token is set; `200` with an `error` string for unknown
//!   routes.
//! - On the wire it is Node/Express: `X-Powered-By: Express`, `Keep-Alive: timeout=5`, and idle
//!   keep-alive connections closed after [`SimConfig::keep_alive_timeout`].
//!
//! Tests switch faults on with [`Simulator::inject`], remove instances behind lmsd's back with
//! [`Simulator::drop_instance`], and restart LM Studio with [`Simulator::go_down`] and
//! [`Simulator::come_back`].

mod api;
pub mod catalogue;
mod chat;
pub mod completions;
mod embeddings;
mod errors;
pub mod faults;
mod messages;
mod responses;
mod server;
mod state;
mod turn;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

pub use catalogue::{default_catalogue, SimFormat, SimModel, SimModelKind};
pub use embeddings::embed_text;
pub use faults::{Fault, Route, Times};
pub use state::SimStats;

use faults::FaultRule;
use server::Server;
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
    /// When set, every request must carry `Authorization: Bearer <token>` or `x-api-key: <token>`.
    pub auth_token: Option<String>,
    /// How long a keep-alive connection with nothing in flight stays open, as Node's
    /// `keepAliveTimeout` (5 s); responses say `Keep-Alive: timeout=<whole seconds, rounded up>`.
    pub keep_alive_timeout: Duration,
    /// How long one embeddings request takes; an instance serves them one at a time.
    pub embed_delay: Duration,
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
            keep_alive_timeout: Duration::from_secs(5),
            embed_delay: Duration::from_millis(20),
        }
    }
}

impl SimConfig {
    /// No load time and no per-token delay: for tests and benchmarks. The keep-alive timeout
    /// and the embedding time stay, as they are what makes connection reuse and serialised
    /// embeddings observable.
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
    /// `None` while LM Studio is down.
    server: Option<Server>,
    sweeper: JoinHandle<()>,
}

impl Simulator {
    /// Starts serving on `addr` (port 0 picks a free one).
    pub async fn start(config: SimConfig, addr: SocketAddr) -> std::io::Result<Self> {
        let listener = server::bind(addr)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(SimState::new(config)),
        });
        let server = Server::spawn(listener, shared.clone(), api::router(shared.clone()));
        let sweeper = tokio::spawn(expire_idle_instances(shared.clone()));
        Ok(Simulator {
            addr,
            shared,
            server: Some(server),
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

    /// How many responses the store holds now (`SimStats::stored_responses` counts all ever
    /// stored).
    pub fn stored_responses(&self) -> usize {
        self.shared.lock().responses.len()
    }

    /// Removes a loaded instance behind everyone's back, as an outside unload, auto-evict or
    /// crash would; true if it existed. Not counted in `SimStats::unloads`.
    pub fn drop_instance(&self, instance_id: &str) -> bool {
        self.shared.lock().remove_instance(instance_id).is_some()
    }

    /// LM Studio quits: the port refuses connections, open ones are cut, and loaded instances,
    /// loads under way and stored responses are forgotten. Catalogue, config, faults and stats
    /// stay. Returns once connections are refused.
    pub async fn go_down(&mut self) {
        if let Some(server) = self.server.take() {
            server.cut().await;
        }
        self.shared.lock().go_down();
    }

    /// LM Studio starts again on the same address, with the state `go_down` left; returns once
    /// it accepts connections. Does nothing if it is up.
    pub async fn come_back(&mut self) -> std::io::Result<()> {
        if self.server.is_none() {
            let listener = server::bind(self.addr)?;
            let router = api::router(self.shared.clone());
            self.server = Some(Server::spawn(listener, self.shared.clone(), router));
        }
        Ok(())
    }

    /// Stops the server, letting open requests finish for up to a second.
    pub async fn stop(mut self) {
        if let Some(server) = self.server.take() {
            server.stop(Duration::from_secs(1)).await;
        }
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        if let Some(server) = &self.server {
            server.abort();
        }
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
