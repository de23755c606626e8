//! The pool actor: the one owner of the instance table and the catalogue mirror. It serves
//! commands, runs LM Studio calls as jobs that report back, reconciles its table with what LM
//! Studio really has, and applies policy (TTL expiry, eviction, pins) in `pump`.
//!
//! This file holds the state and the loop that serves commands; `jobs` runs engine calls and
//! takes their results, `reconcile` converges the table with the engine's listing, `view` is
//! how policy and `status` see the table, `upkeep` is the periodic pass (`pump`), and `serve`
//! answers the waiting requests.

mod jobs;
mod reconcile;
mod serve;
mod upkeep;
mod view;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use lmsd_proto::{
    Event, Eviction, InstanceState, InstanceStatus, LoadOutcome, LoadRequest, LoadSettings,
    LoadedBy, MemoryStatus, PinOutcome, Priority, Ttl, UnloadOutcome, UnloadRequest,
};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::engine::Engine;
use super::policy::{self, Fit, Resident};
use super::{Command, Lease, PoolError, PoolProgress, PoolSettings, PoolStatus, Progress, Reply};
use crate::backend::{BackendError, LoadBody, LoadReply, Model};

/// Rounds of unload-then-verify before lmsd gives up on an instance that will not go.
const UNLOAD_ROUNDS: u32 = 5;
/// Evictions kept for `status`.
const EVICTIONS_KEPT: usize = 16;
/// How often TTLs, deadlines and the poll clock are checked.
const TICK: Duration = Duration::from_millis(100);
/// Parallel slots of an instance until the engine reports its `config.parallel`, and when it
/// never does: LM Studio leaves it out for embedding models, which serve one request at a time,
/// and MLX models report 1 and crash under concurrent requests (bug tracker #2255).
const DEFAULT_PARALLEL: u32 = 1;
/// How long lmsd links an instance the engine loaded on its own to the chats that caused it.
const JIT_WINDOW: Duration = Duration::from_secs(60);
/// How long a load that failed without saying why is remembered (see `may_make_room`).
const LOAD_FAILURE_MEMORY: Duration = Duration::from_secs(60);
/// Catalogue reads while the engine is unreachable and tasks wait for it: this, doubling, …
const OUTAGE_RETRY_FIRST: Duration = Duration::from_millis(250);
/// … up to this.
const OUTAGE_RETRY_MAX: Duration = Duration::from_secs(2);
/// How long an interactive task waits for another instance's turn hold before it gives way.
const INTERACTIVE_HOLD_PATIENCE: Duration = Duration::from_secs(1);
/// Waiting this long raises a task's priority by one level, so batch work cannot starve.
const AGING_STEP: Duration = Duration::from_secs(30);
/// Waiters visited after an event other than the clock tick (see `pump`).
const EVENT_SCAN: usize = 512;

#[derive(Debug)]
struct Instance {
    /// Unique per table entry: a lease from an instance that vanished must not release a slot
    /// of a new instance that got the same id.
    serial: u64,
    id: String,
    model: String,
    size_bytes: u64,
    context_length: u32,
    /// The context length lmsd asked for, when it loaded the instance with one.
    requested_context: Option<u32>,
    parallel: u32,
    loaded_by: LoadedBy,
    /// A TTL set by a task or load request; otherwise the model's or the pool's applies, so a
    /// config reload changes it.
    ttl_override: Option<Ttl>,
    in_flight: u32,
    last_used: Instant,
    /// When lmsd put it in the table: a catalogue read that started earlier cannot see it.
    added_at: Instant,
    load_time: Duration,
    uses: u64,
    /// An unload job is running for it, with this reason.
    unloading: Option<&'static str>,
    /// An explicit unload waits for its running tasks to end; no new tasks go to it.
    draining: bool,
    /// A task that has waited past `max_wait` needs this memory: no new tasks go to it, and
    /// once idle it may be evicted despite its turn hold.
    swap_out: bool,
}

#[derive(Debug)]
struct PendingLoad {
    size_bytes: u64,
    context_length: Option<u32>,
    ttl_override: Option<Ttl>,
    started: Instant,
    /// The load's reply was lost (timeout, cut connection, unreadable): it may still finish on
    /// the engine, so lmsd waits for its instance to appear rather than load again (which
    /// would make `key:2`). Since when, and what went wrong.
    orphaned: Option<(Instant, BackendError)>,
}

/// Work waiting on the pool's state: served, in order, by `pump`.
enum Waiting {
    Acquire(Reply<Lease>),
    Load(LoadRequest, Reply<LoadOutcome>),
    Unload {
        request: UnloadRequest,
        /// The instances this unload is waiting for, once started.
        targets: Option<BTreeSet<String>>,
        unloaded: Vec<String>,
        rounds: u32,
        reply: Reply<UnloadOutcome>,
    },
    Models(Reply<Arc<Vec<Model>>>),
}

struct Waiter {
    model: String,
    ttl: Option<Ttl>,
    priority: Priority,
    enqueued: Instant,
    /// Load setting for a load this waiter causes.
    context_length: Option<u32>,
    /// Context the task needs of its instance.
    min_context: Option<u32>,
    progress: Option<Box<dyn Progress>>,
    /// Last queue position reported (0: none yet).
    position: u32,
    /// It was told a load of its model started.
    heard_load: bool,
    /// Served only after a catalogue read numbered at least this has completed.
    needs_read: u64,
    /// Waiting ends here: `DeadlineExceeded` for tasks, `BudgetExceeded` for loads.
    deadline: Instant,
    /// Time of a load of this model that finished while it waited.
    load_seen: Option<Duration>,
    waiting: Waiting,
}

enum Step {
    Done,
    Wait,
}

enum JobResult {
    Catalogue {
        seq: u64,
        started: Instant,
        result: Result<Vec<Model>, BackendError>,
    },
    Loaded {
        model: String,
        result: Result<LoadReply, BackendError>,
        took: Duration,
    },
    Unloaded {
        id: String,
        result: Result<u32, PoolError>,
    },
}

struct Actor {
    backend: Arc<dyn Engine>,
    settings: PoolSettings,
    catalogue: Arc<Vec<Model>>,
    reachable: bool,
    last_error: Option<BackendError>,
    refreshed_at: Option<Instant>,
    /// Sequence numbers of catalogue reads: the next to start, and the last completed.
    next_read: u64,
    completed_read: u64,
    reading: bool,
    read_again: bool,
    next_poll: Instant,
    preloaded: bool,
    instances: Vec<Instance>,
    loads: HashMap<String, PendingLoad>,
    waiters: VecDeque<Waiter>,
    pins: BTreeSet<String>,
    /// Pinned models lmsd could not load, so the warning is logged once.
    pins_blocked: BTreeSet<String>,
    /// Models said to have no known size (warned once each).
    sizeless: BTreeSet<String>,
    /// Ids lmsd unloaded recently: a catalogue read that started before must not resurrect them.
    recently_unloaded: HashMap<String, Instant>,
    /// Ids of lmsd's instances that vanished: when LM Studio brings one back (a just-in-time
    /// reload for a chat that was running on it), it is lmsd's again.
    recently_vanished: HashMap<String, Instant>,
    /// Models a chat's reply said the engine loaded just in time, and when.
    engine_loaded: HashMap<String, Instant>,
    /// Catalogue reads that failed in a row.
    failed_reads: u32,
    /// Models whose too-small instance lmsd unloaded to load one with more context: their
    /// next load names the context it needs.
    context_reloads: BTreeSet<String>,
    /// When the engine was last found unreachable, while it is: outages are waited out from
    /// then, not from when a task was queued.
    unreachable_since: Option<Instant>,
    /// Leases out per model, whatever instance they name (one may have vanished): duplicates
    /// of a model are unloaded only when no task runs on it.
    leased: HashMap<String, u32>,
    /// When a load of each model last failed without saying why: room is made for it once,
    /// not again and again (a model that fails to load for another reason would otherwise
    /// evict everything).
    load_failed_at: HashMap<String, Instant>,
    next_serial: u64,
    /// Set by `Drain`: no new tasks start.
    stopping: bool,
    /// Instances lmsd had loaded before a restart (from `owned_file`), to adopt when LM Studio
    /// still lists them.
    adopt: BTreeSet<String>,
    /// What `owned_file` holds now.
    owned_written: BTreeSet<String>,
    evictions: VecDeque<(Eviction, Instant)>,
    observers: super::Observers,
    jobs: JoinSet<JobResult>,
    releases: mpsc::UnboundedSender<(u64, String)>,
}

pub(super) async fn run(
    backend: Arc<dyn Engine>,
    settings: PoolSettings,
    observers: super::Observers,
    mut commands: mpsc::Receiver<Command>,
    shutdown: CancellationToken,
) {
    let (releases, mut released) = mpsc::unbounded_channel();
    let pins = settings
        .models
        .iter()
        .filter(|(_, m)| m.pinned)
        .map(|(key, _)| key.clone())
        .collect();
    let mut actor = Actor {
        backend,
        settings,
        catalogue: Arc::new(Vec::new()),
        reachable: false,
        last_error: None,
        refreshed_at: None,
        next_read: 1,
        completed_read: 0,
        reading: false,
        read_again: false,
        next_poll: Instant::now(),
        preloaded: false,
        instances: Vec::new(),
        loads: HashMap::new(),
        waiters: VecDeque::new(),
        pins,
        pins_blocked: BTreeSet::new(),
        sizeless: BTreeSet::new(),
        recently_unloaded: HashMap::new(),
        recently_vanished: HashMap::new(),
        engine_loaded: HashMap::new(),
        failed_reads: 0,
        load_failed_at: HashMap::new(),
        context_reloads: BTreeSet::new(),
        unreachable_since: None,
        leased: HashMap::new(),
        next_serial: 1,
        stopping: false,
        adopt: BTreeSet::new(),
        owned_written: BTreeSet::new(),
        evictions: VecDeque::new(),
        observers,
        jobs: JoinSet::new(),
        releases,
    };
    actor.adopt = upkeep::read_owned(actor.settings.owned_file.as_deref());
    actor.owned_written = actor.adopt.clone();
    actor.request_read();
    // When the clock next wakes the actor. Events only bring it closer, so a steady stream of
    // them cannot put off the full pass.
    let mut wake = Instant::now() + TICK;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
                        Some(command) = commands.recv() => {
                // Status and the like change nothing: no need to re-plan after them.
                let read_only = matches!(command, Command::Status { .. } | Command::RefreshSoon);
                actor.command(command);
                if !read_only {
                    actor.pump(Instant::now(), false);
                    wake = wake.min(actor.next_wake(Instant::now()));
                }
            }
            Some((serial, model)) = released.recv() => {
                actor.release(serial, &model);
                actor.pump(Instant::now(), false);
                wake = wake.min(actor.next_wake(Instant::now()));
            }
                        Some(Ok(result)) = actor.jobs.join_next(), if !actor.jobs.is_empty() => {
                actor.job_done(result);
                actor.pump(Instant::now(), false);
                // Only jobs (loads, unloads, catalogue reads) change which instances are lmsd's.
                actor.save_owned();
                wake = wake.min(actor.next_wake(Instant::now()));
            }
            _ = tokio::time::sleep_until(wake) => {
                if Instant::now() >= actor.next_poll {
                    actor.request_read();
                }
                actor.pump(Instant::now(), true);
                wake = actor.next_wake(Instant::now());
            }
        }
    }
    for waiter in actor.waiters.drain(..) {
        waiter.fail(PoolError::ShuttingDown);
    }
    actor.jobs.shutdown().await;
}

impl Waiter {
    fn fail(self, error: PoolError) {
        self.waiting.fail(error);
    }

    /// A task or load, which waits out a short engine outage rather than fail at once.
    fn waits_for_engine(&self) -> bool {
        matches!(self.waiting, Waiting::Acquire(_) | Waiting::Load(..))
    }
}

impl Waiting {
    fn fail(self, error: PoolError) {
        match self {
            Waiting::Acquire(reply) => drop(reply.send(Err(error))),
            Waiting::Load(_, reply) => drop(reply.send(Err(error))),
            Waiting::Unload { reply, .. } => drop(reply.send(Err(error))),
            Waiting::Models(reply) => drop(reply.send(Err(error))),
        }
    }
}

impl Actor {
    // --- commands -------------------------------------------------------------------------

    fn command(&mut self, command: Command) {
        let now = Instant::now();
        let (model, ttl, needs_read, waiting) = match command {
            Command::Status { reply } => {
                let _ = reply.send(self.status(now));
                return;
            }
            Command::RefreshSoon => {
                self.request_read();
                return;
            }
            Command::EngineLoaded { model } => {
                // Instances of it that a read already listed as outside came from that load
                // (or from others racing it, `key:2`…): they are lmsd's.
                for instance in self.instances.iter_mut().filter(|i| {
                    i.model == model
                        && i.loaded_by == LoadedBy::Outside
                        && now.saturating_duration_since(i.added_at) < JIT_WINDOW
                }) {
                    tracing::info!(instance = %instance.id, model = %model, "adopted an instance the engine loaded just in time for lmsd's chats");
                    instance.loaded_by = LoadedBy::Lmsd;
                }
                self.engine_loaded.insert(model, now);
                self.request_read();
                return;
            }
            Command::Pin {
                model,
                pinned,
                reply,
            } => {
                let _ = reply.send(self.pin(model, pinned));
                return;
            }
            Command::Reconfigure { settings, reply } => {
                let _ = reply.send(self.reconfigure(*settings));
                return;
            }
            Command::UnloadOwn { reply } => {
                let pins = &self.pins;
                let own: BTreeSet<String> = self
                    .instances
                    .iter_mut()
                    .filter(|i| i.loaded_by == LoadedBy::Lmsd && !pins.contains(&i.model))
                    .map(|i| {
                        i.draining = true;
                        i.id.clone()
                    })
                    .collect();
                let waiting = Waiting::Unload {
                    request: UnloadRequest::default(),
                    targets: Some(own),
                    unloaded: Vec::new(),
                    rounds: 0,
                    reply,
                };
                (String::new(), None, 0, waiting)
            }
            Command::Acquire { reply, .. } if self.stopping => {
                let _ = reply.send(Err(PoolError::ShuttingDown));
                return;
            }
            Command::Drain => {
                self.drain();
                return;
            }
            Command::Acquire { request, reply } => {
                // Counting is O(n): only worth it when the queue could be full.
                let queued = if self.waiters.len() < self.settings.max_queue {
                    0
                } else {
                    self.waiters
                        .iter()
                        .filter(|w| matches!(w.waiting, Waiting::Acquire(_)))
                        .count()
                };
                if queued >= self.settings.max_queue {
                    let _ = reply.send(Err(PoolError::QueueFull(queued)));
                    return;
                }
                // An engine believed down is tried again for this task: a read started now, not
                // one begun before the engine came back, decides.
                let needs_read = if self.reachable {
                    0
                } else {
                    self.request_read()
                };
                self.waiters.push_back(Waiter {
                    model: request.model,
                    ttl: request.ttl,
                    priority: request.priority,
                    enqueued: now,
                    context_length: request.context_length,
                    min_context: request.min_context,
                    progress: request.progress,
                    position: 0,
                    heard_load: false,
                    needs_read,
                    deadline: request.deadline,
                    load_seen: None,
                    waiting: Waiting::Acquire(reply),
                });
                return;
            }
            // Loads, unloads and listings act on a catalogue read after they arrived, so an
            // instance loaded outside lmsd a moment ago is seen.
            Command::Load { request, reply } => {
                let needs = self.request_read();
                (
                    request.model.clone(),
                    request.ttl,
                    needs,
                    Waiting::Load(request, reply),
                )
            }
            Command::Unload { request, reply } => {
                let needs = self.request_read();
                let name = request
                    .model
                    .clone()
                    .or(request.instance_id.clone())
                    .unwrap_or_default();
                let waiting = Waiting::Unload {
                    request,
                    targets: None,
                    unloaded: Vec::new(),
                    rounds: 0,
                    reply,
                };
                (name, None, needs, waiting)
            }
            Command::Models { reply } => {
                let needs = self.request_read();
                (String::new(), None, needs, Waiting::Models(reply))
            }
        };
        self.waiters.push_back(Waiter {
            model,
            ttl,
            priority: Priority::Interactive,
            enqueued: now,
            context_length: None,
            min_context: None,
            progress: None,
            position: 0,
            heard_load: false,
            needs_read,
            deadline: now + self.settings.max_wait,
            load_seen: None,
            waiting,
        });
    }

    fn pin(&mut self, model: String, pinned: bool) -> Result<PinOutcome, PoolError> {
        if self.reachable && !self.catalogue.iter().any(|m| m.key == model) {
            return Err(self.not_found(model));
        }
        if pinned {
            self.pins.insert(model.clone());
        } else {
            self.pins.remove(&model);
            self.pins_blocked.remove(&model);
        }
        tracing::info!(model = %model, pinned, "pin changed");
        Ok(PinOutcome { model, pinned })
    }

    fn reconfigure(&mut self, settings: PoolSettings) -> Result<(), PoolError> {
        if self.reachable {
            settings
                .check_pins(&self.catalogue)
                .map_err(|e| PoolError::Config(e.to_string()))?;
        }
        let config_pins = |s: &PoolSettings| -> BTreeSet<String> {
            s.models
                .iter()
                .filter(|(_, m)| m.pinned)
                .map(|(k, _)| k.clone())
                .collect()
        };
        // Pins made at run time stay; pins the old config made follow the new config.
        let runtime_pins: BTreeSet<String> = self
            .pins
            .difference(&config_pins(&self.settings))
            .cloned()
            .collect();
        self.pins = runtime_pins
            .union(&config_pins(&settings))
            .cloned()
            .collect();
        self.pins_blocked.clear();
        self.settings = settings;
        tracing::info!(budget_bytes = self.settings.budget_bytes, idle_ttl = %self.settings.idle_ttl, pins = ?self.pins, "pool settings applied");
        Ok(())
    }

    /// Stopping: tasks that have not started yet will not; they and any new ones hear so.
    fn drain(&mut self) {
        self.stopping = true;
        let (queued, kept): (VecDeque<Waiter>, VecDeque<Waiter>) = self
            .waiters
            .drain(..)
            .partition(|w| matches!(w.waiting, Waiting::Acquire(_)));
        self.waiters = kept;
        for waiter in queued {
            waiter.fail(PoolError::ShuttingDown);
        }
    }

    fn release(&mut self, serial: u64, model: &str) {
        if let Some(count) = self.leased.get_mut(model) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.leased.remove(model);
            }
        }
        if let Some(instance) = self.instances.iter_mut().find(|i| i.serial == serial) {
            instance.in_flight = instance.in_flight.saturating_sub(1);
            instance.last_used = Instant::now();
        }
    }
}
