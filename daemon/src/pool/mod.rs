//! The warm pool. One task (the actor in `actor.rs`) owns the instance table — every instance
//! LM Studio has loaded, who loaded it, its memory, TTL, pin and in-flight count — and the mirror
//! of LM Studio's catalogue. Everyone else talks to it through [`PoolHandle`]; decisions are pure
//! functions in [`policy`]; LM Studio calls run in spawned jobs that report back, so a slow load
//! never blocks the actor.

mod actor;
#[cfg(test)]
mod actor_tests;
pub mod engine;
pub mod memory_engine;
pub mod policy;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use lmsd_proto::{
    Eviction, InstanceStatus, LoadOutcome, LoadRequest, MemoryStatus, PinOutcome, Priority, Ttl,
    UnloadOutcome, UnloadRequest,
};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::backend::{BackendError, Model};
use crate::config::{Config, ConfigError, ModelConfig};

/// The pool's settings, resolved from the config.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub budget_bytes: u64,
    pub idle_ttl: Ttl,
    pub instance_overhead: u64,
    pub manage_external: bool,
    pub models: BTreeMap<String, ModelConfig>,
    pub max_wait: Duration,
    pub poll_interval: Duration,
    pub turn_hold: Duration,
    pub max_queue: usize,
    pub max_instances: usize,
    /// How long tasks wait for an engine that cannot be reached.
    pub outage_wait: Duration,
    /// How long a load whose reply was lost may still finish on the engine (and be adopted).
    pub orphan_wait: Duration,
    /// Which idle instances give way first (not a config key: lmsd's own; others are for the
    /// benchmark's comparisons).
    pub ranking: policy::Ranking,
    /// Where the ids of lmsd's own instances are kept, so that a restarted lmsd adopts them.
    pub owned_file: Option<std::path::PathBuf>,
}

impl PoolSettings {
    pub fn from_config(config: &Config) -> Result<Self, ConfigError> {
        Ok(PoolSettings {
            budget_bytes: config
                .pool
                .memory_budget
                .resolve(crate::config::physical_memory())?,
            idle_ttl: config.pool.idle_ttl,
            instance_overhead: config.pool.instance_overhead.0,
            manage_external: config.pool.manage_external,
            models: config.models.clone(),
            max_wait: config.tasks.max_wait,
            poll_interval: config.poll_interval(),
            turn_hold: config.pool.turn_hold,
            max_queue: config.tasks.max_queue,
            max_instances: config.pool.max_instances,
            outage_wait: config.tasks.outage_wait,
            orphan_wait: config.request_timeout(),
            ranking: policy::Ranking::default(),
            owned_file: config.state_file("instances.json"),
        })
    }

    /// A model's size: `[models."KEY"] size` if set, else what the engine reports.
    fn size_of(&self, model: &Model) -> u64 {
        self.models
            .get(&model.key)
            .and_then(|m| m.size)
            .map_or(model.size_bytes, |size| size.0)
    }

    /// The engine's catalogue with the configured sizes in place of its own.
    pub fn with_configured_sizes(&self, mut models: Vec<Model>) -> Vec<Model> {
        for model in &mut models {
            model.size_bytes = self.size_of(model);
        }
        models
    }

    /// Checks that the pinned models fit in the budget together. `models` is the engine's
    /// catalogue; pins it does not list are reported and skipped.
    pub fn check_pins(&self, models: &[Model]) -> Result<(), ConfigError> {
        let mut total = 0u64;
        for (key, _) in self.models.iter().filter(|(_, m)| m.pinned) {
            match models.iter().find(|m| &m.key == key) {
                Some(model) => total += self.size_of(model) + self.instance_overhead,
                None => {
                    tracing::warn!(model = %key, "pinned model is not in the engine's catalogue")
                }
            }
        }
        if total > self.budget_bytes {
            return Err(ConfigError::Invalid(format!(
                "the pinned models need {total} bytes together but [pool] memory_budget is {} bytes; raise the budget or unpin some",
                self.budget_bytes
            )));
        }
        Ok(())
    }
}

/// Where the pool reports what it does: metrics, and the `events` stream.
#[derive(Debug, Clone)]
pub struct Observers {
    pub metrics: Arc<crate::metrics::Metrics>,
    pub events: tokio::sync::broadcast::Sender<lmsd_proto::Event>,
}

impl Observers {
    /// Tells subscribers, if there are any; a slow one misses events rather than slowing lmsd.
    pub fn emit(&self, event: lmsd_proto::Event) {
        let _ = self.events.send(event);
    }
}

/// Why the pool could not do what was asked.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PoolError {
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("the engine has no model or loaded instance {name:?}; it has: {}", known_text(.known))]
    NotFound { name: String, known: Vec<String> },
    #[error("{model} needs {need_bytes} bytes but the memory budget is {budget_bytes} bytes{}", holders_text(.holders, *.waited))]
    BudgetExceeded {
        model: String,
        need_bytes: u64,
        budget_bytes: u64,
        holders: Vec<String>,
        waited: bool,
    },
    #[error("the engine still lists {remaining:?} after {rounds} rounds of unloading")]
    UnloadNotVerified { remaining: Vec<String>, rounds: u32 },
    #[error("{model} is pinned; unpin it first (`lmsd-ctl unpin {model}`)")]
    Pinned { model: String },
    #[error("lmsd is shutting down")]
    ShuttingDown,
    #[error("lmsd's queue is full ({0} tasks wait); try again later or raise [tasks] max_queue")]
    QueueFull(usize),
    #[error("the task's deadline passed while it waited in the queue")]
    DeadlineExceeded,
    #[error("{model} cannot give the task the context it needs (about {need} tokens): {why}")]
    ContextUnavailable {
        model: String,
        need: u32,
        why: String,
    },
    #[error("{model}'s instance {instance_id} has {context_length} tokens of context, and the task needs about {need}; load it with a larger context_length (`lmsd-ctl unload {model}`, then `lmsd-ctl load {model} --context-length N`) or choose another model")]
    ContextTooSmall {
        model: String,
        instance_id: String,
        context_length: u32,
        need: u32,
    },
    #[error("{0}")]
    Config(String),
}

fn known_text(known: &[String]) -> String {
    const SHOWN: usize = 12;
    let mut text = known
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if known.len() > SHOWN {
        text.push_str(&format!(
            " and {} more (`lmsd-ctl models` lists them)",
            known.len() - SHOWN
        ));
    }
    if known.is_empty() {
        text = "no models".into();
    }
    text
}

fn holders_text(holders: &[String], waited: bool) -> String {
    let mut text = String::new();
    if !holders.is_empty() {
        text = format!(
            ", and {} hold the rest (pinned, busy or loaded outside lmsd)",
            holders.join(", ")
        );
    }
    if waited {
        text.push_str("; waited for busy instances until [tasks] max_wait ran out");
    }
    text
}

/// A request for a slot on an instance.
#[derive(Debug)]
pub struct AcquireRequest {
    /// A model key or an instance id.
    pub model: String,
    pub ttl: Option<Ttl>,
    pub priority: Priority,
    /// Waiting ends with `DeadlineExceeded` here.
    pub deadline: Instant,
    /// Load setting for a load this request causes.
    pub context_length: Option<u32>,
    /// Context the task needs of its instance: smaller instances are not used for it.
    pub min_context: Option<u32>,
    /// Where to report the queue position and loads while it waits.
    pub progress: Option<Box<dyn Progress>>,
}

/// Where a waiting request hears of its place in the queue and of loads for it. The pool's
/// loop calls it: it returns at once, dropping what it cannot pass on (progress is advice).
/// A callback, not a channel per task: ten thousand queued tasks would hold ten thousand.
pub trait Progress: Send + Sync + std::fmt::Debug {
    fn tell(&self, progress: PoolProgress);
}

/// What a waiting request hears.
#[derive(Debug, Clone, PartialEq)]
pub enum PoolProgress {
    /// Its place among the waiting tasks (1 is next).
    Queued { position: u32 },
    /// A load of its model started.
    Loading { model: String },
}

/// An instance reserved for one task. Dropping it gives the slot back and restarts the idle clock.
#[derive(Debug)]
pub struct Lease {
    pub instance_id: String,
    pub model: String,
    /// Set when this task waited for a load of its model; how long that load took.
    pub load_time: Option<Duration>,
    serial: u64,
    releases: mpsc::UnboundedSender<(u64, String)>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let _ = self
            .releases
            .send((self.serial, std::mem::take(&mut self.model)));
    }
}

/// What `status` shows of the pool.
#[derive(Debug, Clone)]
pub struct PoolStatus {
    pub instances: Vec<InstanceStatus>,
    pub memory: MemoryStatus,
    pub evictions: Vec<Eviction>,
    pub reachable: bool,
    pub last_error: Option<BackendError>,
    pub refreshed_ago: Option<Duration>,
    /// The catalogue as last read (not re-read for this).
    pub catalogue: Arc<Vec<Model>>,
    pub overhead_bytes: u64,
}

type Reply<T> = oneshot::Sender<Result<T, PoolError>>;

enum Command {
    Acquire {
        request: AcquireRequest,
        reply: Reply<Lease>,
    },
    Load {
        request: LoadRequest,
        reply: Reply<LoadOutcome>,
    },
    Unload {
        request: UnloadRequest,
        reply: Reply<UnloadOutcome>,
    },
    Pin {
        model: String,
        pinned: bool,
        reply: Reply<PinOutcome>,
    },
    Models {
        reply: Reply<Arc<Vec<Model>>>,
    },
    Status {
        reply: oneshot::Sender<PoolStatus>,
    },
    RefreshSoon,
    /// A chat's reply says the engine loaded the model itself (just in time).
    EngineLoaded {
        model: String,
    },
    Reconfigure {
        settings: Box<PoolSettings>,
        reply: Reply<()>,
    },
    UnloadOwn {
        reply: Reply<UnloadOutcome>,
    },
    Drain,
}

/// Cheap, cloneable access to the pool actor.
#[derive(Debug, Clone)]
pub struct PoolHandle {
    commands: mpsc::Sender<Command>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Command::Acquire { .. } => "Acquire",
            Command::Load { .. } => "Load",
            Command::Unload { .. } => "Unload",
            Command::Pin { .. } => "Pin",
            Command::Models { .. } => "Models",
            Command::Status { .. } => "Status",
            Command::RefreshSoon => "RefreshSoon",
            Command::EngineLoaded { .. } => "EngineLoaded",
            Command::Reconfigure { .. } => "Reconfigure",
            Command::UnloadOwn { .. } => "UnloadOwn",
            Command::Drain => "Drain",
        })
    }
}

impl PoolHandle {
    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, PoolError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(make(reply))
            .await
            .map_err(|_| PoolError::ShuttingDown)?;
        answer.await.map_err(|_| PoolError::ShuttingDown)?
    }

    /// A slot on a ready instance of the model (a key or an instance id), loading it if needed.
    pub async fn acquire(&self, request: AcquireRequest) -> Result<Lease, PoolError> {
        self.ask(|reply| Command::Acquire { request, reply }).await
    }

    pub async fn load(&self, request: LoadRequest) -> Result<LoadOutcome, PoolError> {
        self.ask(|reply| Command::Load { request, reply }).await
    }

    pub async fn unload(&self, request: UnloadRequest) -> Result<UnloadOutcome, PoolError> {
        self.ask(|reply| Command::Unload { request, reply }).await
    }

    pub async fn pin(&self, model: String, pinned: bool) -> Result<PinOutcome, PoolError> {
        self.ask(|reply| Command::Pin {
            model,
            pinned,
            reply,
        })
        .await
    }

    /// LM Studio's catalogue, freshly read.
    pub async fn models(&self) -> Result<Arc<Vec<Model>>, PoolError> {
        self.ask(|reply| Command::Models { reply }).await
    }

    pub async fn status(&self) -> Result<PoolStatus, PoolError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Status { reply })
            .await
            .map_err(|_| PoolError::ShuttingDown)?;
        answer.await.map_err(|_| PoolError::ShuttingDown)
    }

    /// Applies new settings (a config reload). Pins that cannot fit are refused; the old
    /// settings then stay.
    pub async fn reconfigure(&self, settings: PoolSettings) -> Result<(), PoolError> {
        let settings = Box::new(settings);
        self.ask(|reply| Command::Reconfigure { settings, reply })
            .await
    }

    /// Unloads the unpinned instances lmsd loaded (for `[pool] unload_on_exit`).
    pub async fn unload_own(&self) -> Result<UnloadOutcome, PoolError> {
        self.ask(|reply| Command::UnloadOwn { reply }).await
    }

    /// Stopping: queued tasks are answered `shutting_down`, and no new ones start.
    pub async fn drain(&self) {
        let _ = self.commands.send(Command::Drain).await;
    }

    /// After a backend error: re-read the catalogue soon, without waiting for it.
    pub fn refresh_soon(&self) {
        let _ = self.commands.try_send(Command::RefreshSoon);
    }

    /// A chat on `model` made the engine load it just in time, behind lmsd's back: the pool
    /// re-reads the catalogue and adopts what that load (and any racing it) left.
    pub fn engine_loaded(&self, model: &str) {
        let _ = self.commands.try_send(Command::EngineLoaded {
            model: model.to_owned(),
        });
    }
}

/// Starts the pool actor; it stops when `shutdown` is cancelled (after the server has drained).
pub fn spawn(
    backend: Arc<dyn engine::Engine>,
    settings: PoolSettings,
    observers: Observers,
    shutdown: CancellationToken,
) -> (PoolHandle, tokio::task::JoinHandle<()>) {
    let (commands, inbox) = mpsc::channel(1024);
    let task = tokio::spawn(actor::run(backend, settings, observers, inbox, shutdown));
    (PoolHandle { commands }, task)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::ModelType;

    fn model(key: &str, size_bytes: u64) -> Model {
        Model {
            kind: ModelType::Llm,
            key: key.into(),
            display_name: None,
            size_bytes,
            params_string: None,
            loaded_instances: Vec::new(),
            max_context_length: None,
            capabilities: None,
        }
    }

    #[test]
    fn configured_sizes_replace_the_engines_for_the_budget() {
        let config = Config::parse(
            "[pool]\nmemory_budget = \"1GiB\"\n[models.\"big\"]\npinned = true\nsize = \"2GiB\"\n",
        )
        .unwrap();
        let settings = PoolSettings::from_config(&config).unwrap();
        let models = vec![model("big", 1000), model("small", 2000)];
        assert!(
            settings.check_pins(&models).is_err(),
            "2 GiB counted, 1 GiB budget"
        );
        let sized: Vec<u64> = settings
            .with_configured_sizes(models)
            .iter()
            .map(|m| m.size_bytes)
            .collect();
        assert_eq!(sized, [2 << 30, 2000]);
    }
}
