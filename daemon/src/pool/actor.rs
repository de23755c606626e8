//! The pool actor: the one owner of the instance table and the catalogue mirror. It serves
//! commands, runs LM Studio calls as jobs that report back, reconciles its table with what LM
//! Studio really has, and applies policy (TTL expiry, eviction, pins) in `pump`.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lmsd_proto::{
    Event, Eviction, InstanceState, InstanceStatus, LoadOutcome, LoadRequest, LoadedBy,
    MemoryStatus, PinOutcome, Priority, Ttl, UnloadOutcome, UnloadRequest,
};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::policy::{self, Fit, Resident};
use super::{Command, Lease, PoolError, PoolProgress, PoolSettings, PoolStatus, Reply};
use crate::backend::{Backend, BackendError, LoadBody, LoadReply, Model};

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
    progress: Option<mpsc::Sender<PoolProgress>>,
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
    backend: Backend,
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
    backend: Backend,
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
    actor.adopt = read_owned(actor.settings.owned_file.as_deref());
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
            _ = tokio::time::sleep_until(wake.into()) => {
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

    // --- jobs -----------------------------------------------------------------------------

    /// Starts a catalogue read unless one is running (then another follows it). Returns the
    /// number of the read whose result reflects everything up to now.
    fn request_read(&mut self) -> u64 {
        if self.reading {
            self.read_again = true;
            return self.next_read;
        }
        let seq = self.next_read;
        self.next_read += 1;
        self.reading = true;
        let backend = self.backend.clone();
        self.jobs.spawn(async move {
            let started = Instant::now();
            let result = backend.models().await;
            JobResult::Catalogue {
                seq,
                started,
                result,
            }
        });
        seq
    }

    fn start_load(
        &mut self,
        model: &Model,
        request: Option<&LoadRequest>,
        ttl_override: Option<Ttl>,
    ) {
        let configured = self
            .settings
            .models
            .get(&model.key)
            .cloned()
            .unwrap_or_default();
        let body = LoadBody {
            model: model.key.clone(),
            context_length: request
                .and_then(|r| r.context_length)
                .or(configured.context_length),
            eval_batch_size: request
                .and_then(|r| r.eval_batch_size)
                .or(configured.eval_batch_size),
            flash_attention: request
                .and_then(|r| r.flash_attention)
                .or(configured.flash_attention),
            num_experts: request
                .and_then(|r| r.num_experts)
                .or(configured.num_experts),
            offload_kv_cache_to_gpu: request
                .and_then(|r| r.offload_kv_cache_to_gpu)
                .or(configured.offload_kv_cache_to_gpu),
            echo_load_config: true,
        };
        tracing::info!(model = %model.key, size_bytes = model.size_bytes, "loading");
        self.context_reloads.remove(&model.key);
        self.observers.emit(Event::LoadStarted {
            model: model.key.clone(),
        });
        // Each waiting task hears of a load of its model once: a busy model swapped in and out
        // would otherwise send every one of its waiters an event per swap.
        for waiter in self
            .waiters
            .iter_mut()
            .filter(|w| w.model == model.key && !w.heard_load)
        {
            waiter.heard_load = true;
            if let Some(progress) = &waiter.progress {
                let _ = progress.try_send(PoolProgress::Loading {
                    model: model.key.clone(),
                });
            }
        }
        self.loads.insert(
            model.key.clone(),
            PendingLoad {
                size_bytes: model.size_bytes,
                context_length: body.context_length,
                ttl_override,
                started: Instant::now(),
                orphaned: None,
            },
        );
        let backend = self.backend.clone();
        let key = model.key.clone();
        self.jobs.spawn(async move {
            let started = Instant::now();
            let result = backend.load(&body).await;
            JobResult::Loaded {
                model: key,
                result,
                took: started.elapsed(),
            }
        });
    }

    /// Unloads one instance by its id, verifying that LM Studio no longer lists it.
    fn start_unload(&mut self, id: &str, reason: &'static str) {
        let Some(instance) = self.instances.iter_mut().find(|i| i.id == id) else {
            return;
        };
        if instance.unloading.is_some() {
            return;
        }
        instance.unloading = Some(reason);
        tracing::info!(instance = %id, model = %instance.model, reason, "unloading");
        let backend = self.backend.clone();
        let id = id.to_owned();
        self.jobs.spawn(async move {
            let result = unload_verified(&backend, &id).await;
            JobResult::Unloaded { id, result }
        });
    }

    fn job_done(&mut self, result: JobResult) {
        let now = Instant::now();
        match result {
            JobResult::Catalogue {
                seq,
                started,
                result,
            } => {
                self.reading = false;
                self.completed_read = seq;
                self.next_poll = now + self.settings.poll_interval;
                if self.loads.values().any(|l| l.orphaned.is_some()) {
                    // A lost load's instance should show up soon: look more often.
                    self.next_poll = self.next_poll.min(now + Duration::from_secs(1));
                }
                match result {
                    Ok(models) => {
                        self.failed_reads = 0;
                        if !self.reachable {
                            tracing::info!(
                                url = self.backend.url(),
                                models = models.len(),
                                "the engine is reachable"
                            );
                            self.observers.emit(Event::Backend { reachable: true });
                        }
                        self.reachable = true;
                        self.unreachable_since = None;
                        self.last_error = None;
                        self.refreshed_at = Some(now);
                        self.catalogue = Arc::new(self.settings.with_configured_sizes(models));
                        for model in self.catalogue.iter().filter(|m| m.size_bytes == 0) {
                            if self.sizeless.insert(model.key.clone()) {
                                tracing::warn!(model = %model.key, "the engine gives no size for this model, so the memory budget counts it as 0 bytes until it is loaded (llama-server: start it with an absolute --models-dir); or set [models.\"KEY\"] size");
                            }
                        }
                        self.reconcile(started, now);
                    }
                    Err(error) => {
                        self.failed_reads += 1;
                        if self.waiters.iter().any(Waiter::waits_for_engine) {
                            // Tasks wait for the engine to come back (LM Studio restarting):
                            // try it again soon, backing off.
                            let retry = OUTAGE_RETRY_FIRST
                                .saturating_mul(1 << self.failed_reads.min(8).saturating_sub(1))
                                .min(OUTAGE_RETRY_MAX);
                            self.next_poll = self.next_poll.min(now + retry);
                        }
                        // An engine that refuses connections has stopped: a load whose reply was
                        // lost went down with it. (A slow or garbled listing proves nothing.)
                        if matches!(error, BackendError::Unreachable { .. }) {
                            let lost: Vec<String> = self
                                .loads
                                .iter()
                                .filter(|(_, l)| l.orphaned.is_some())
                                .map(|(key, _)| key.clone())
                                .collect();
                            for key in lost {
                                tracing::warn!(model = %key, "the engine went away while a load's reply was lost; that load is given up");
                                self.loads.remove(&key);
                            }
                        }
                        let changed = self.last_error.as_ref().map(ToString::to_string)
                            != Some(error.to_string());
                        if self.reachable || changed {
                            tracing::warn!(url = self.backend.url(), %error, "cannot read the engine's models; will keep trying");
                        }
                        if self.reachable {
                            self.observers.emit(Event::Backend { reachable: false });
                        }
                        self.reachable = false;
                        self.unreachable_since.get_or_insert(now);
                        self.last_error = Some(error);
                    }
                }
                if self.read_again {
                    self.read_again = false;
                    self.request_read();
                }
            }
            JobResult::Loaded {
                model,
                result,
                took,
            } => {
                let pending = self.loads.remove(&model);
                match result {
                    Ok(reply) => self.loaded(&model, reply, pending, took, now),
                    // LM Studio's memory is not lmsd's budget: if it ran out (or a load failed
                    // the way LM Studio reports running out), make more room while something
                    // can give way, and try again (the waiters still wait).
                    Err(error) if self.may_make_room(&model, &error, now) => {
                        tracing::warn!(model = %model, %error, "the load failed, maybe for lack of memory; evicting one more instance and retrying");
                    }
                    // The reply was lost, not the load: it may still finish on the engine. Wait
                    // for its instance to appear and adopt it; loading again would make a
                    // second one.
                    Err(error) if error.reply_lost() => {
                        tracing::warn!(model = %model, %error, "the load's reply was lost; waiting for its instance to appear rather than loading again");
                        if let Some(mut pending) = pending {
                            pending.orphaned = Some((now, error));
                            self.loads.insert(model.clone(), pending);
                            // A read may have listed its instance already.
                            self.adopt_lost_load(&model);
                        }
                    }
                    Err(error) => {
                        tracing::warn!(model = %model, %error, "load failed");
                        self.observers.emit(Event::LoadFailed {
                            model: model.clone(),
                            error: error.to_string(),
                        });
                        self.fail_waiters_for(&model, &PoolError::Backend(error));
                    }
                }
                // Learn the new instance's slots and settings, or the state after a failure.
                self.request_read();
            }
            JobResult::Unloaded { id, result } => match result {
                Ok(rounds) => {
                    if let Some(index) = self.instances.iter().position(|i| i.id == id) {
                        let instance = self.instances.remove(index);
                        let reason = instance.unloading.unwrap_or("unload");
                        self.recently_unloaded.insert(id.clone(), now);
                        self.note_unloaded(&instance, reason, rounds, now);
                    }
                }
                Err(error) => {
                    tracing::warn!(instance = %id, %error, "unload failed");
                    if let Some(instance) = self.instances.iter_mut().find(|i| i.id == id) {
                        instance.unloading = None;
                        instance.draining = false;
                    }
                    self.fail_unloads_of(&id, &error);
                    self.request_read();
                }
            },
        }
    }

    fn loaded(
        &mut self,
        model: &str,
        reply: LoadReply,
        pending: Option<PendingLoad>,
        took: Duration,
        now: Instant,
    ) {
        self.observers.metrics.loaded();
        tracing::info!(model, instance = %reply.instance_id, load_ms = took.as_millis() as u64, "loaded");
        self.observers.emit(Event::Loaded {
            model: model.to_owned(),
            instance_id: reply.instance_id.clone(),
            load_ms: took.as_millis().try_into().unwrap_or(u64::MAX),
        });
        let ttl_override = pending.as_ref().and_then(|p| p.ttl_override);
        let requested_context = pending.as_ref().and_then(|p| p.context_length);
        let echoed = reply.load_config.and_then(|c| c.context_length);
        let context_length = echoed.or(requested_context).unwrap_or(0);
        self.note_context(model, &reply.instance_id, requested_context, echoed);
        let size_bytes = pending.map_or(0, |p| p.size_bytes);
        // A catalogue read may already have listed it as an outside instance: adopt it.
        if let Some(known) = self
            .instances
            .iter_mut()
            .find(|i| i.id == reply.instance_id)
        {
            known.loaded_by = LoadedBy::Lmsd;
            known.ttl_override = ttl_override;
            known.load_time = took;
        } else {
            let serial = self.serial();
            self.instances.push(Instance {
                serial,
                id: reply.instance_id,
                model: model.to_owned(),
                size_bytes,
                context_length,
                requested_context,
                parallel: DEFAULT_PARALLEL,
                loaded_by: LoadedBy::Lmsd,
                ttl_override,
                in_flight: 0,
                last_used: now,
                added_at: now,
                load_time: took,
                uses: 0,
                unloading: None,
                draining: false,
                swap_out: false,
            });
        }
        for waiter in self.waiters.iter_mut().filter(|w| w.model == model) {
            waiter.load_seen = Some(took);
        }
    }

    /// Says so when the engine loaded another context length than lmsd asked for (MLX auto-fit,
    /// a llama.cpp load that shrank it).
    fn note_context(
        &self,
        model: &str,
        instance_id: &str,
        requested: Option<u32>,
        loaded: Option<u32>,
    ) {
        if let (Some(requested), Some(loaded)) = (requested, loaded) {
            if requested != loaded {
                tracing::warn!(model, instance = %instance_id, requested, loaded, "the engine loaded another context length than lmsd asked for; tasks that need more will not be sent to this instance");
                self.observers.emit(Event::ContextMismatch {
                    model: model.to_owned(),
                    instance_id: instance_id.to_owned(),
                    requested,
                    loaded,
                });
            }
        }
    }

    /// After a load failed for lack of memory, or the way LM Studio reports it: evicts one more
    /// idle instance to retry in its room. For a failure that names no cause, only once a
    /// minute per model.
    fn may_make_room(&mut self, model: &str, error: &BackendError, now: Instant) -> bool {
        match error {
            BackendError::OutOfMemory { .. } => self.evict_one_for_memory(now),
            BackendError::LoadFailed { .. } => {
                let recent = self
                    .load_failed_at
                    .insert(model.to_owned(), now)
                    .is_some_and(|at| now.saturating_duration_since(at) < LOAD_FAILURE_MEMORY);
                !recent && self.evict_one_for_memory(now)
            }
            _ => false,
        }
    }

    /// Evicts the least valuable idle instance lmsd may unload; false when there is none.
    fn evict_one_for_memory(&mut self, now: Instant) -> bool {
        let residents = self.residents(now, true);
        // Asking for the whole budget makes policy list victims cheapest first; take the first.
        match policy::plan_fit(
            &residents,
            self.settings.budget_bytes,
            self.settings.budget_bytes,
            1,
            now,
        ) {
            Fit::Evict(victims) if !victims.is_empty() => {
                self.start_unload(&victims[0], "memory");
                true
            }
            _ => false,
        }
    }

    fn note_unloaded(
        &mut self,
        instance: &Instance,
        reason: &'static str,
        rounds: u32,
        now: Instant,
    ) {
        tracing::info!(instance = %instance.id, model = %instance.model, reason, rounds, "unloaded");
        self.observers.emit(Event::Unloaded {
            model: instance.model.clone(),
            instance_id: instance.id.clone(),
            reason: reason.to_owned(),
        });
        if reason != "unload" {
            self.observers.metrics.evicted(reason);
            self.evictions.push_front((
                Eviction {
                    instance_id: instance.id.clone(),
                    model: instance.model.clone(),
                    reason: reason.to_owned(),
                    seconds_ago: 0,
                },
                now,
            ));
            self.evictions.truncate(EVICTIONS_KEPT);
        }
        self.target_gone(&instance.id, rounds);
    }

    /// An instance an explicit unload waits for is gone (unloaded by lmsd, or from outside).
    fn target_gone(&mut self, id: &str, rounds: u32) {
        for waiter in &mut self.waiters {
            if let Waiting::Unload {
                targets: Some(targets),
                unloaded,
                rounds: total,
                ..
            } = &mut waiter.waiting
            {
                if targets.remove(id) {
                    unloaded.push(id.to_owned());
                    *total = (*total).max(rounds);
                }
            }
        }
    }

    fn fail_waiters_for(&mut self, model: &str, error: &PoolError) {
        let (failed, kept): (VecDeque<Waiter>, VecDeque<Waiter>) =
            self.waiters.drain(..).partition(|w| {
                w.model == model && matches!(w.waiting, Waiting::Acquire(_) | Waiting::Load(..))
            });
        self.waiters = kept;
        for waiter in failed {
            waiter.fail(error.clone());
        }
    }

    fn fail_unloads_of(&mut self, id: &str, error: &PoolError) {
        let (failed, kept): (VecDeque<Waiter>, VecDeque<Waiter>) = self.waiters.drain(..).partition(|w| {
            matches!(&w.waiting, Waiting::Unload { targets: Some(targets), .. } if targets.contains(id))
        });
        self.waiters = kept;
        for waiter in failed {
            waiter.fail(error.clone());
        }
    }

    // --- reconciliation -------------------------------------------------------------------

    /// Converges the table to the catalogue read that started at `started`.
    fn reconcile(&mut self, started: Instant, now: Instant) {
        self.recently_vanished
            .retain(|_, at| now.duration_since(*at) < Duration::from_secs(60));
        self.recently_unloaded
            .retain(|_, at| now.duration_since(*at) < Duration::from_secs(60));
        self.engine_loaded
            .retain(|_, at| now.duration_since(*at) < JIT_WINDOW);
        let catalogue = self.catalogue.clone();
        let listed: BTreeSet<&str> = catalogue
            .iter()
            .flat_map(|m| m.loaded_instances.iter().map(|i| i.id.as_str()))
            .collect();
        let before = self.instances.len();
        let mut vanished = Vec::new();
        self.instances.retain(|instance| {
            let keep = listed.contains(instance.id.as_str())
                || instance.added_at > started
                || instance.unloading.is_some();
            if !keep {
                vanished.push((instance.id.clone(), instance.in_flight));
            }
            keep
        });
        for (id, in_flight) in &vanished {
            tracing::warn!(instance = %id, in_flight, "instance is gone from the engine (unloaded outside lmsd, or the engine restarted)");
            self.recently_vanished.insert(id.clone(), now);
            self.target_gone(id, 0);
        }
        if before > 0 && vanished.len() == before {
            tracing::warn!(gone = before, "every instance is gone: the engine probably restarted; pinned models will be reloaded");
        }
        for model in catalogue.iter() {
            for listed in &model.loaded_instances {
                if let Some(known) = self.instances.iter_mut().find(|i| i.id == listed.id) {
                    // The listed value is the one in force, and can change after the first
                    // prompt (bug tracker #2346).
                    known.context_length = listed.config.context_length;
                    known.parallel = listed.config.parallel.unwrap_or(DEFAULT_PARALLEL).max(1);
                    known.size_bytes = model.size_bytes;
                    continue;
                }
                if self
                    .recently_unloaded
                    .get(&listed.id)
                    .is_some_and(|at| *at > started)
                {
                    continue;
                }
                let duplicate = self.instances.iter().any(|i| i.model == model.key);
                let adopted = self.adopt.remove(&listed.id);
                if adopted {
                    tracing::info!(instance = %listed.id, model = %model.key, "adopted an instance lmsd loaded before it restarted");
                }
                // The engine loaded it just in time for lmsd's chats.
                let jit = self.engine_loaded.contains_key(&model.key);
                if jit {
                    tracing::info!(instance = %listed.id, model = %model.key, "adopted an instance the engine loaded just in time for lmsd's chats");
                }
                let returned =
                    self.recently_vanished.remove(&listed.id).is_some() || adopted || jit;
                let serial = self.serial();
                if !returned {
                    tracing::info!(instance = %listed.id, model = %model.key, duplicate, "instance loaded outside lmsd");
                }
                self.instances.push(Instance {
                    serial,
                    id: listed.id.clone(),
                    model: model.key.clone(),
                    size_bytes: model.size_bytes,
                    context_length: listed.config.context_length,
                    requested_context: None,
                    parallel: listed.config.parallel.unwrap_or(DEFAULT_PARALLEL).max(1),
                    loaded_by: if returned {
                        LoadedBy::Lmsd
                    } else {
                        LoadedBy::Outside
                    },
                    ttl_override: None,
                    in_flight: 0,
                    last_used: now,
                    added_at: now,
                    load_time: Duration::ZERO,
                    uses: 0,
                    unloading: None,
                    draining: false,
                    swap_out: false,
                });
            }
        }
        // Instances from before a restart that LM Studio no longer lists are gone for good.
        self.adopt.clear();
        let lost_loads: Vec<String> = self
            .loads
            .iter()
            .filter(|(_, l)| l.orphaned.is_some())
            .map(|(key, _)| key.clone())
            .collect();
        for key in lost_loads {
            self.adopt_lost_load(&key);
        }
    }

    /// A load whose reply was lost has finished after all: the instance of its model that the
    /// engine listed since it started (as loaded outside lmsd, not knowing better) is lmsd's,
    /// with the load's TTL and context, and it no longer counts twice in the budget.
    fn adopt_lost_load(&mut self, key: &str) {
        let Some(started) = self
            .loads
            .get(key)
            .filter(|l| l.orphaned.is_some())
            .map(|l| l.started)
        else {
            return;
        };
        let Some(instance) = self
            .instances
            .iter_mut()
            .find(|i| i.model == key && i.added_at >= started)
        else {
            return;
        };
        let Some(load) = self.loads.remove(key) else {
            return;
        };
        instance.loaded_by = LoadedBy::Lmsd;
        instance.ttl_override = load.ttl_override;
        instance.requested_context = load.context_length;
        let (id, context_length) = (instance.id.clone(), instance.context_length);
        tracing::info!(instance = %id, model = key, "the load whose reply was lost finished; adopted its instance");
        self.note_context(key, &id, load.context_length, Some(context_length));
        for waiter in self.waiters.iter_mut().filter(|w| w.model == key) {
            waiter.load_seen = Some(Duration::ZERO);
        }
    }

    // --- policy ---------------------------------------------------------------------------

    fn bytes(&self, size_bytes: u64) -> u64 {
        size_bytes + self.settings.instance_overhead
    }

    fn used_bytes(&self) -> u64 {
        let resident: u64 = self
            .instances
            .iter()
            .map(|i| self.bytes(i.size_bytes))
            .sum();
        let loading: u64 = self.loads.values().map(|l| self.bytes(l.size_bytes)).sum();
        resident + loading
    }

    /// The TTL in force for an instance of `model`: a task's or load's own, else the model's,
    /// else the pool's.
    fn ttl_for(&self, model: &str, ttl_override: Option<Ttl>) -> Ttl {
        ttl_override
            .or_else(|| self.settings.models.get(model).and_then(|m| m.ttl))
            .unwrap_or(self.settings.idle_ttl)
    }

    /// The table as policy sees it. `starving`: a task has waited past `max_wait`, so turn holds
    /// no longer protect anything.
    fn residents(&self, now: Instant, starving: bool) -> Vec<Resident> {
        self.instances
            .iter()
            .map(|i| Resident {
                // Held: tasks wait for it, or its turn hold runs. A task that has waited past
                // max_wait overrides both (it swaps models), so nothing starves.
                held: !starving
                    && !i.swap_out
                    && (self.wanted(&i.model)
                        || (i.uses > 0
                            && i.in_flight == 0
                            && now.saturating_duration_since(i.last_used)
                                < self.settings.turn_hold)),
                id: i.id.clone(),
                model: i.model.clone(),
                bytes: self.bytes(i.size_bytes),
                in_flight: i.in_flight,
                pinned: self.pins.contains(&i.model),
                managed: i.loaded_by == LoadedBy::Lmsd || self.settings.manage_external,
                leaving: i.unloading.is_some() || i.draining,
                ttl: self.ttl_for(&i.model, i.ttl_override),
                last_used: i.last_used,
                load_time: i.load_time,
                uses: i.uses,
            })
            .collect()
    }

    /// How a load of `model` fits now. Memory of instances already on their way out counts as
    /// free for planning, but a load waits until it is really freed.
    fn fit(&self, model: &Model, now: Instant, starving: bool) -> Fit {
        let residents = self.residents(now, starving);
        let leaving: u64 = residents
            .iter()
            .filter(|r| r.leaving)
            .map(|r| r.bytes)
            .sum();
        let used = self.used_bytes();
        let need = self.bytes(model.size_bytes);
        match policy::plan_fit(
            &residents,
            used - leaving,
            self.settings.budget_bytes,
            need,
            now,
        ) {
            Fit::Fits if used + need > self.settings.budget_bytes => {
                Fit::WaitForBusy { busy: Vec::new() }
            }
            // Loads in progress hold memory that becomes evictable once they are instances.
            Fit::Never { .. } if !self.loads.is_empty() && need <= self.settings.budget_bytes => {
                Fit::WaitForBusy {
                    busy: self.loads.keys().cloned().collect(),
                }
            }
            fit => fit,
        }
    }

    /// Applies policy and serves whatever can be served now.
    /// `full` (on the clock tick): re-rank the whole queue, visit every waiter (deadlines, gone
    /// clients) and report positions. After other events only the head of the queue is visited,
    /// which keeps an event's cost bounded however long the queue grows; anything deeper is
    /// served by the next tick, at most `TICK` later.
    /// When the clock must next run a full pass: every [`TICK`] while anything waits (task
    /// deadlines, priority aging, turn holds, `max_wait`) or a pinned model is missing;
    /// otherwise at the next catalogue read or TTL expiry. An idle lmsd sleeps between polls.
    fn next_wake(&self, now: Instant) -> Instant {
        // A pin waiting for memory held by a turn hold needs the clock; one the engine cannot
        // serve (unreachable, not in its catalogue, never fits) waits for a catalogue read.
        let pin_missing = self.reachable
            && self.pins.iter().any(|pin| {
                !self.pins_blocked.contains(pin)
                    && self.catalogue.iter().any(|m| &m.key == pin)
                    && !self
                        .instances
                        .iter()
                        .any(|i| &i.model == pin && i.unloading.is_none())
            });
        if !self.waiters.is_empty() || !self.loads.is_empty() || pin_missing {
            return now + TICK;
        }
        // While a read runs, its end is an event that sets the next poll.
        let poll = (!self.reading).then_some(self.next_poll);
        let expiry = policy::next_expiry(&self.residents(now, false), now);
        let at = match (poll, expiry) {
            (Some(poll), Some(expiry)) => poll.min(expiry),
            (Some(at), None) | (None, Some(at)) => at,
            (None, None) => now + self.settings.poll_interval,
        };
        // A due expiry that this pass could not act on must not spin the loop.
        at.max(now + TICK / 10)
    }

    fn pump(&mut self, now: Instant, full: bool) {
        for instance in &mut self.instances {
            instance.swap_out = false;
        }
        // Waiters for a model keep its instances: a fresh instance must reach the task that
        // caused its load before a zero TTL or another task's eviction can take it.
        for id in policy::expired(&self.residents(now, false), now) {
            if !self
                .instances
                .iter()
                .any(|i| i.id == id && self.wanted(&i.model))
            {
                self.start_unload(&id, "idle_ttl");
            }
        }
        let drained: Vec<String> = self
            .instances
            .iter()
            .filter(|i| i.draining && i.in_flight == 0 && i.unloading.is_none())
            .map(|i| i.id.clone())
            .collect();
        for id in drained {
            self.start_unload(&id, "unload");
        }
        self.give_up_lost_loads(now);
        self.unload_duplicates();
        self.keep_pins_and_preloads(now);
        // Served by priority, aged so that waiting long enough beats any priority; then by age.
        let rank = |w: &Waiter| {
            let aged = now.saturating_duration_since(w.enqueued).as_secs() / AGING_STEP.as_secs();
            (i64::from(w.priority.rank()) - aged as i64, w.enqueued)
        };
        if full {
            self.waiters.make_contiguous().sort_by_key(rank);
        }
        let visit = if full { usize::MAX } else { EVENT_SCAN };
        // Once a task for a model must wait, the tasks behind it for that model wait too: only
        // their deadlines need checking, not the whole plan again.
        let mut blocked: Vec<String> = Vec::new();
        let mut index = 0;
        let mut visited = 0;
        while index < self.waiters.len() && visited < visit {
            visited += 1;
            let waiter = &self.waiters[index];
            let is_task = matches!(&waiter.waiting, Waiting::Acquire(reply) if !reply.is_closed());
            if is_task && now < waiter.deadline && blocked.contains(&waiter.model) {
                index += 1;
                continue;
            }
            match self.serve(index, now) {
                Step::Done => {}
                Step::Wait => {
                    if is_task && !blocked.contains(&self.waiters[index].model) {
                        blocked.push(self.waiters[index].model.clone());
                    }
                    index += 1;
                }
            }
        }
        if full {
            self.report_positions();
        }
    }

    /// Loads whose reply was lost and whose instance has not appeared within `orphan_wait`
    /// did not happen: their waiters hear why.
    fn give_up_lost_loads(&mut self, now: Instant) {
        let wait = self.settings.orphan_wait;
        let given_up: Vec<(String, BackendError)> = self
            .loads
            .iter()
            .filter_map(|(key, load)| match &load.orphaned {
                Some((since, error)) if now.saturating_duration_since(*since) >= wait => {
                    Some((key.clone(), error.clone()))
                }
                _ => None,
            })
            .collect();
        for (key, error) in given_up {
            tracing::warn!(model = %key, %error, "the load whose reply was lost never showed an instance; giving it up");
            self.loads.remove(&key);
            self.observers.emit(Event::LoadFailed {
                model: key.clone(),
                error: error.to_string(),
            });
            // Waiters an instance of the model can serve wait on; the others hear why.
            if !self.instances.iter().any(|i| i.model == key) {
                self.fail_waiters_for(&key, &PoolError::Backend(error));
            }
        }
    }

    /// More instances of a model than lmsd keeps (`max_instances`), all lmsd's: the engine's
    /// just-in-time loads racing each other (`key:2`, `key:3`, bug tracker #1751). The newest
    /// idle ones go.
    fn unload_duplicates(&mut self) {
        let mut seen: HashMap<&str, usize> = HashMap::new();
        let mut extra = Vec::new();
        let mut own: Vec<&Instance> = self
            .instances
            .iter()
            .filter(|i| i.loaded_by == LoadedBy::Lmsd && i.unloading.is_none() && !i.draining)
            .collect();
        own.sort_by_key(|i| i.serial);
        for instance in own {
            let count = seen.entry(instance.model.as_str()).or_default();
            *count += 1;
            // A chat that raced into a duplicate may still run on it under a lease of the
            // instance that vanished: wait until no task runs on the model.
            let busy = self.leased.contains_key(&instance.model);
            if *count > self.settings.max_instances && !busy {
                extra.push(instance.id.clone());
            }
        }
        for id in extra {
            self.start_unload(&id, "duplicate");
        }
    }

    /// Keeps `owned_file` listing lmsd's own instances, when that set changes.
    fn save_owned(&mut self) {
        let owned: BTreeSet<String> = self
            .instances
            .iter()
            .filter(|i| i.loaded_by == LoadedBy::Lmsd)
            .map(|i| i.id.clone())
            .chain(self.adopt.iter().cloned())
            .collect();
        if owned == self.owned_written {
            return;
        }
        if let Some(path) = &self.settings.owned_file {
            let write = || -> std::io::Result<()> {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                let temp = path.with_extension("json.tmp");
                std::fs::write(&temp, serde_json::to_vec(&owned)?)?;
                std::fs::rename(&temp, path)
            };
            if let Err(error) = write() {
                tracing::warn!(file = %path.display(), %error, "cannot record lmsd's instances");
            }
        }
        self.owned_written = owned;
    }

    /// Tells waiting tasks their place in the queue when it changes.
    /// When a task is first queued, each time its place has halved, near the head of the queue,
    /// and when it is moved back: every grant moves everyone's place, and reporting each move
    /// would flood a long queue with events (a task hears O(log n) of them).
    fn report_positions(&mut self) {
        let mut position = 0;
        for waiter in self
            .waiters
            .iter_mut()
            .filter(|w| matches!(w.waiting, Waiting::Acquire(_)))
        {
            position += 1;
            let first = waiter.position == 0;
            let halved = position <= waiter.position / 2;
            let near_head = position <= 3 && position < waiter.position;
            // Rare: a task of higher priority came in ahead.
            let moved_back = position > waiter.position;
            if first || halved || near_head || moved_back {
                waiter.position = position;
                if let Some(progress) = &waiter.progress {
                    // Progress is advice: a full channel skips an update, never blocks the pool.
                    let _ = progress.try_send(PoolProgress::Queued { position });
                }
            }
        }
    }

    fn keep_pins_and_preloads(&mut self, now: Instant) {
        if !self.reachable {
            return;
        }
        let mut wanted: Vec<String> = self.pins.iter().cloned().collect();
        if !self.preloaded {
            self.preloaded = true;
            for (key, _) in self
                .settings
                .models
                .iter()
                .filter(|(_, m)| m.preload && !m.pinned)
            {
                wanted.push(key.clone());
            }
        }
        for key in wanted {
            let resident = self
                .instances
                .iter()
                .any(|i| i.model == key && i.unloading.is_none() && !i.draining);
            if resident || self.loads.contains_key(&key) {
                continue;
            }
            let Some(model) = self.catalogue.iter().find(|m| m.key == key).cloned() else {
                continue;
            };
            match self.fit(&model, now, false) {
                Fit::Fits => {
                    self.pins_blocked.remove(&key);
                    self.start_load(&model, None, None);
                }
                Fit::Evict(victims) => {
                    for id in victims {
                        self.start_unload(&id, "memory");
                    }
                }
                Fit::WaitForBusy { .. } => {}
                Fit::Never { holders } => {
                    if self.pins_blocked.insert(key.clone()) {
                        tracing::warn!(model = %key, ?holders, "cannot load pinned or preloaded model: it does not fit in the memory budget");
                    }
                }
            }
        }
    }

    /// Tries to finish the waiter at `index`; removes it when done.
    fn serve(&mut self, index: usize, now: Instant) -> Step {
        let waiter = &self.waiters[index];
        if let Waiting::Acquire(reply) = &waiter.waiting {
            // The task gave up (cancelled, deadline, client gone): forget it.
            if reply.is_closed() {
                self.waiters.remove(index);
                return Step::Done;
            }
            if now >= waiter.deadline {
                if let Some(waiter) = self.waiters.remove(index) {
                    waiter.fail(PoolError::DeadlineExceeded);
                }
                return Step::Done;
            }
        }
        if self.completed_read < waiter.needs_read || (self.refreshed_at.is_none() && self.reading)
        {
            return Step::Wait;
        }
        if !self.reachable {
            // A short outage (LM Studio restarting) is waited out, up to `outage_wait`.
            let since = self
                .unreachable_since
                .map_or(waiter.enqueued, |down| down.max(waiter.enqueued));
            let waited = now.saturating_duration_since(since);
            if waiter.waits_for_engine() && waited < self.settings.outage_wait {
                return Step::Wait;
            }
            let error = self
                .last_error
                .clone()
                .unwrap_or(BackendError::Unreachable {
                    url: self.backend.url().to_owned(),
                    detail: "no answer yet".into(),
                });
            if let Some(waiter) = self.waiters.remove(index) {
                waiter.fail(PoolError::Backend(error));
            }
            return Step::Done;
        }
        let outcome = match waiter.waiting {
            Waiting::Models(_) => Some(Ok(())),
            Waiting::Acquire(_) => self.serve_acquire(index, now),
            Waiting::Load(..) => self.serve_load(index, now),
            Waiting::Unload { .. } => self.serve_unload(index),
        };
        match outcome {
            None => Step::Wait,
            Some(result) => {
                let Some(waiter) = self.waiters.remove(index) else {
                    return Step::Done;
                };
                match (result, waiter.waiting) {
                    (Err(error), waiting) => waiting.fail(error),
                    (Ok(()), Waiting::Models(reply)) => {
                        drop(reply.send(Ok(self.catalogue.clone())))
                    }
                    (Ok(()), Waiting::Acquire(reply)) => self.grant(
                        &waiter.model,
                        waiter.ttl,
                        waiter.load_seen,
                        waiter.min_context.unwrap_or(0),
                        reply,
                    ),
                    (Ok(()), Waiting::Load(request, reply)) => {
                        drop(reply.send(Ok(self.load_outcome(&request, waiter.load_seen))))
                    }
                    (
                        Ok(()),
                        Waiting::Unload {
                            unloaded,
                            rounds,
                            reply,
                            ..
                        },
                    ) => drop(reply.send(Ok(UnloadOutcome { unloaded, rounds }))),
                }
                Step::Done
            }
        }
    }

    fn is_model_key(&self, name: &str) -> bool {
        self.catalogue.iter().any(|m| m.key == name)
    }

    /// Does a task wait for an instance of `model`?
    fn wanted(&self, model: &str) -> bool {
        self.waiters
            .iter()
            .any(|w| w.model == model && matches!(w.waiting, Waiting::Acquire(_)))
    }

    fn serial(&mut self) -> u64 {
        self.next_serial += 1;
        self.next_serial
    }

    /// A not-found error that names the models LM Studio does have.
    fn not_found(&self, name: String) -> PoolError {
        PoolError::NotFound {
            name,
            known: self.catalogue.iter().map(|m| m.key.clone()).collect(),
        }
    }

    /// The catalogue entry for a key, or for the model of a loaded instance id.
    fn model_named(&self, name: &str) -> Option<Model> {
        let key = self
            .instances
            .iter()
            .find(|i| i.id == name)
            .map_or(name, |i| i.model.as_str());
        self.catalogue.iter().find(|m| m.key == key).cloned()
    }

    /// `Some(Ok)` when an instance with a free slot is there; starts a load or evictions when
    /// needed; `None` to keep waiting.
    fn serve_acquire(&mut self, index: usize, now: Instant) -> Option<Result<(), PoolError>> {
        let name = self.waiters[index].model.clone();
        let need = self.waiters[index].min_context.unwrap_or(0);
        let usable = |i: &Instance| i.unloading.is_none() && !i.draining && !i.swap_out;
        let too_small = |i: &Instance| PoolError::ContextTooSmall {
            model: i.model.clone(),
            instance_id: i.id.clone(),
            context_length: i.context_length,
            need,
        };
        // An instance id names that instance only (the first instance's id is the model key:
        // a key means any instance of the model).
        if !self.is_model_key(&name) {
            if let Some(instance) = self.instances.iter().find(|i| i.id == name && usable(i)) {
                if !fits_context(instance, need) {
                    return Some(Err(too_small(instance)));
                }
                return (instance.in_flight < instance.parallel).then_some(Ok(()));
            }
        }
        let Some(model) = self.model_named(&name) else {
            return Some(Err(self.not_found(name)));
        };
        if let Some(error) = self.context_unavailable(&model, index, need) {
            return Some(Err(error));
        }
        let (count, free_slot) = self
            .instances
            .iter()
            .filter(|i| i.model == model.key && usable(i) && fits_context(i, need))
            .fold((0, false), |(count, free), i| {
                (count + 1, free || i.in_flight < i.parallel)
            });
        if free_slot {
            return Some(Ok(()));
        }
        if count == 0 && !self.loads.contains_key(&model.key) {
            // Instances there are, but with too little context for this task. One lmsd may
            // unload is reloaded with more — one at a time, and only where the engine takes a
            // context and did not already give less than lmsd asked for (it would again);
            // otherwise the task fails now, with both sizes.
            let small: Vec<&Instance> = self
                .instances
                .iter()
                .filter(|i| i.model == model.key && usable(i))
                .collect();
            if let Some(largest) = small.iter().max_by_key(|i| i.context_length) {
                let reloading = self
                    .instances
                    .iter()
                    .any(|i| i.model == model.key && i.unloading == Some("context"));
                if reloading {
                    return None;
                }
                if !self.context_reloads.contains(&model.key) {
                    let takes_settings = self.backend.accept_load_settings(true).is_ok();
                    let reloadable = small
                        .iter()
                        .find(|i| {
                            takes_settings
                                && (i.loaded_by == LoadedBy::Lmsd || self.settings.manage_external)
                                && !self.pins.contains(&i.model)
                                && i.requested_context.is_none_or(|asked| asked < need)
                        })
                        .map(|i| (i.id.clone(), i.in_flight));
                    match reloadable {
                        None => return Some(Err(too_small(largest))),
                        Some((id, 0)) => {
                            tracing::info!(instance = %id, need, "reloading with more context for a task that needs it");
                            self.context_reloads.insert(model.key.clone());
                            self.start_unload(&id, "context");
                        }
                        // Its running tasks end first; no new ones go to it meanwhile.
                        Some((id, _)) => {
                            if let Some(instance) = self.instances.iter_mut().find(|i| i.id == id) {
                                instance.swap_out = true;
                            }
                        }
                    }
                    return None;
                }
                // Room was made by a context reload: load the larger instance below.
            }
        }
        if count > 0 {
            // Every slot is busy. A further instance, on purpose, when the config allows it and it
            // fits without evicting anything; otherwise the task waits for a slot.
            let more_allowed =
                count < self.settings.max_instances && !self.loads.contains_key(&model.key);
            if more_allowed && self.fit(&model, now, false) == Fit::Fits {
                tracing::info!(model = %model.key, instances = count + 1, "all slots busy: loading another instance");
                self.start_load(&model, None, None);
            }
            return None;
        }
        let waiter = &self.waiters[index];
        let ttl = waiter.ttl;
        let settings = waiter
            .context_length
            .or_else(|| {
                self.context_to_load(&model, need, self.context_reloads.contains(&model.key))
            })
            .map(|context_length| LoadRequest {
                model: model.key.clone(),
                context_length: Some(context_length),
                ..LoadRequest::default()
            });
        self.ensure_loading(index, &model, settings.as_ref(), ttl, now)
    }

    /// The context to load `model` with for a task that needs `need` tokens: when the engine's
    /// default (LM Studio's is usually 4096) and the configured one may be too small, or
    /// (`forced`) when an instance loaded without one turned out too small.
    fn context_to_load(&self, model: &Model, need: u32, forced: bool) -> Option<u32> {
        const ENGINE_DEFAULT: u32 = 4096;
        if self.backend.accept_load_settings(true).is_err() {
            return None;
        }
        let configured = self
            .settings
            .models
            .get(&model.key)
            .and_then(|m| m.context_length);
        if !forced && configured.unwrap_or(ENGINE_DEFAULT) >= need {
            return None;
        }
        let wanted = need.div_ceil(1024).saturating_mul(1024);
        let wanted = model
            .max_context_length
            .map_or(wanted, |max| wanted.min(max));
        Some(wanted.max(configured.unwrap_or(0)))
    }

    /// Why no instance of `model` can have the context a waiter needs, when that is known before
    /// loading anything: the model's largest context is smaller, or the task asks to load it
    /// with less.
    fn context_unavailable(&self, model: &Model, index: usize, need: u32) -> Option<PoolError> {
        let unavailable = |why: String| PoolError::ContextUnavailable {
            model: model.key.clone(),
            need,
            why,
        };
        if let Some(max) = model
            .max_context_length
            .filter(|max| *max > 0 && *max < need)
        {
            return Some(unavailable(format!("its largest context is {max} tokens")));
        }
        let asked = self.waiters[index].context_length;
        asked.filter(|asked| *asked < need).map(|asked| {
            unavailable(format!(
                "the task asks to load it with context_length {asked}"
            ))
        })
    }

    fn serve_load(&mut self, index: usize, now: Instant) -> Option<Result<(), PoolError>> {
        let Waiting::Load(request, _) = &self.waiters[index].waiting else {
            return None;
        };
        let request = request.clone();
        let Some(model) = self
            .catalogue
            .iter()
            .find(|m| m.key == request.model)
            .cloned()
        else {
            return Some(Err(self.not_found(request.model)));
        };
        if request.pin {
            self.pins.insert(model.key.clone());
        }
        if self
            .instances
            .iter()
            .any(|i| i.model == model.key && i.unloading.is_none() && !i.draining)
        {
            return Some(Ok(()));
        }
        self.ensure_loading(index, &model, Some(&request), request.ttl, now)
    }

    /// Starts what a waiter for `model` needs — a load, or evictions to make room — and says
    /// whether to keep waiting (`None`) or give up.
    fn ensure_loading(
        &mut self,
        index: usize,
        model: &Model,
        request: Option<&LoadRequest>,
        ttl: Option<Ttl>,
        now: Instant,
    ) -> Option<Result<(), PoolError>> {
        // One load per model; and while evictions for memory run, LM Studio's real memory is in
        // flux: wait for them rather than race a load into them.
        if self.loads.contains_key(&model.key)
            || self
                .instances
                .iter()
                .any(|i| matches!(i.unloading, Some("memory" | "context")))
        {
            return None;
        }
        let (need_bytes, budget_bytes) = (self.bytes(model.size_bytes), self.settings.budget_bytes);
        let budget_error = |holders: Vec<String>, waited: bool| PoolError::BudgetExceeded {
            model: model.key.clone(),
            need_bytes,
            budget_bytes,
            holders,
            waited,
        };
        let starving =
            now.saturating_duration_since(self.waiters[index].enqueued) >= self.settings.max_wait;
        match self.fit(model, now, starving) {
            Fit::Fits => {
                self.start_load(model, request, ttl);
                None
            }
            Fit::WaitForBusy { busy } if starving => {
                // Waited long enough: the warm models holding the memory take no new tasks,
                // and give way once their running ones end.
                for instance in self.instances.iter_mut().filter(|i| busy.contains(&i.id)) {
                    instance.swap_out = true;
                }
                if now >= self.waiters[index].deadline {
                    return Some(Err(budget_error(busy, true)));
                }
                None
            }
            Fit::Evict(victims) => {
                for id in victims {
                    self.start_unload(&id, "memory");
                }
                None
            }
            Fit::WaitForBusy { busy } if now >= self.waiters[index].deadline => {
                Some(Err(budget_error(busy, true)))
            }
            Fit::WaitForBusy { .. } => None,
            Fit::Never { holders } => Some(Err(budget_error(holders, false))),
        }
    }

    fn serve_unload(&mut self, index: usize) -> Option<Result<(), PoolError>> {
        let name = self.waiters[index].model.clone();
        let Waiting::Unload {
            request, targets, ..
        } = &mut self.waiters[index].waiting
        else {
            return None;
        };
        if let Some(targets) = targets {
            return targets.is_empty().then_some(Ok(()));
        }
        let by_key = request.model.is_some();
        let all = request.all;
        let pins = &self.pins;
        let chosen: BTreeSet<String> = self
            .instances
            .iter()
            .filter(|i| {
                (all && !pins.contains(&i.model)) || (by_key && i.model == name) || i.id == name
            })
            .map(|i| i.id.clone())
            .collect();
        if chosen.is_empty() {
            let known_key = all || (by_key && self.catalogue.iter().any(|m| m.key == name));
            return Some(if known_key {
                Ok(())
            } else {
                Err(self.not_found(name))
            });
        }
        let models: BTreeSet<String> = self
            .instances
            .iter()
            .filter(|i| chosen.contains(&i.id))
            .map(|i| i.model.clone())
            .collect();
        if let Some(pinned) = models.iter().find(|m| self.pins.contains(*m)) {
            return Some(Err(PoolError::Pinned {
                model: pinned.clone(),
            }));
        }
        for instance in self.instances.iter_mut().filter(|i| chosen.contains(&i.id)) {
            instance.draining = true;
        }
        *targets = Some(chosen);
        None
    }

    fn grant(
        &mut self,
        name: &str,
        ttl: Option<Ttl>,
        load_seen: Option<Duration>,
        need: u32,
        reply: Reply<Lease>,
    ) {
        let by_key = self.is_model_key(name);
        let chosen = self
            .instances
            .iter_mut()
            .filter(|i| {
                if by_key {
                    i.model == name
                } else {
                    i.id == name
                }
            })
            .filter(|i| i.unloading.is_none() && !i.draining && !i.swap_out)
            .filter(|i| i.in_flight < i.parallel && fits_context(i, need))
            .min_by_key(|i| i.in_flight);
        let Some(instance) = chosen else {
            let _ = reply.send(Err(self.not_found(name.to_owned())));
            return;
        };
        instance.in_flight += 1;
        instance.uses += 1;
        match self.leased.get_mut(&instance.model) {
            Some(count) => *count += 1,
            None => {
                self.leased.insert(instance.model.clone(), 1);
            }
        }
        if ttl.is_some() {
            instance.ttl_override = ttl;
        }
        let lease = Lease {
            serial: instance.serial,
            instance_id: instance.id.clone(),
            model: instance.model.clone(),
            load_time: load_seen,
            releases: self.releases.clone(),
        };
        // If the task is gone, the lease comes back and its drop releases the slot.
        let _ = reply.send(Ok(lease));
    }

    fn load_outcome(&mut self, request: &LoadRequest, load_seen: Option<Duration>) -> LoadOutcome {
        let instance = self
            .instances
            .iter_mut()
            .find(|i| i.model == request.model && i.unloading.is_none() && !i.draining);
        match instance {
            Some(instance) => {
                if request.ttl.is_some() {
                    instance.ttl_override = request.ttl;
                }
                instance.last_used = Instant::now();
                LoadOutcome {
                    model: instance.model.clone(),
                    instance_id: instance.id.clone(),
                    load_time_seconds: load_seen.map_or(0.0, |d| d.as_secs_f64()),
                    context_length: Some(instance.context_length).filter(|c| *c > 0),
                    already_loaded: load_seen.is_none(),
                }
            }
            None => LoadOutcome {
                model: request.model.clone(),
                instance_id: String::new(),
                load_time_seconds: 0.0,
                context_length: None,
                already_loaded: false,
            },
        }
    }

    // --- status ---------------------------------------------------------------------------

    fn status(&self, now: Instant) -> PoolStatus {
        let mut instances: Vec<InstanceStatus> = self
            .instances
            .iter()
            .map(|i| {
                let pinned = self.pins.contains(&i.model);
                let managed = i.loaded_by == LoadedBy::Lmsd || self.settings.manage_external;
                let idle = if i.in_flight > 0 {
                    Duration::ZERO
                } else {
                    now.saturating_duration_since(i.last_used)
                };
                let state = match (i.unloading.is_some(), i.in_flight) {
                    (true, _) => InstanceState::Unloading,
                    (false, 0) => InstanceState::Idle,
                    (false, _) => InstanceState::Busy,
                };
                let expires = managed && !pinned && i.in_flight == 0;
                let ttl = self.ttl_for(&i.model, i.ttl_override);
                InstanceStatus {
                    instance_id: i.id.clone(),
                    model: i.model.clone(),
                    size_bytes: i.size_bytes,
                    context_length: i.context_length,
                    requested_context_length: i
                        .requested_context
                        .filter(|requested| *requested != i.context_length),
                    parallel: Some(i.parallel),
                    state,
                    in_flight: i.in_flight,
                    idle_s: idle.as_secs(),
                    ttl,
                    ttl_left_s: ttl.left(idle).filter(|_| expires).map(|d| d.as_secs()),
                    pinned,
                    loaded_by: i.loaded_by,
                }
            })
            .collect();
        for (key, load) in &self.loads {
            instances.push(InstanceStatus {
                instance_id: String::new(),
                model: key.clone(),
                size_bytes: load.size_bytes,
                context_length: load.context_length.unwrap_or(0),
                requested_context_length: None,
                parallel: None,
                state: InstanceState::Loading,
                in_flight: 0,
                idle_s: 0,
                ttl: self.ttl_for(key, load.ttl_override),
                ttl_left_s: None,
                pinned: self.pins.contains(key),
                loaded_by: LoadedBy::Lmsd,
            });
        }
        let used = self.used_bytes();
        PoolStatus {
            instances,
            memory: MemoryStatus {
                budget_bytes: self.settings.budget_bytes,
                used_bytes: used,
                free_bytes: self.settings.budget_bytes.saturating_sub(used),
            },
            evictions: self
                .evictions
                .iter()
                .map(|(eviction, at)| Eviction {
                    seconds_ago: now.duration_since(*at).as_secs(),
                    ..eviction.clone()
                })
                .collect(),
            reachable: self.reachable,
            last_error: self.last_error.clone(),
            refreshed_ago: self.refreshed_at.map(|at| now.duration_since(at)),
            catalogue: self.catalogue.clone(),
            overhead_bytes: self.settings.instance_overhead,
        }
    }
}

/// Whether an instance has the context a task needs (0: its context is not known).
fn fits_context(instance: &Instance, need: u32) -> bool {
    instance.context_length == 0 || instance.context_length >= need
}

/// Unloads `id` (an id read from `loaded_instances`), then re-reads the catalogue and repeats
/// until LM Studio no longer lists it. Returns the rounds it took.
async fn unload_verified(backend: &Backend, id: &str) -> Result<u32, PoolError> {
    for round in 1..=UNLOAD_ROUNDS {
        // An error may only mean the instance is gone already (a TTL, auto-evict or crash a
        // moment before; LM Studio documents no status for it): the listing decides.
        let unloaded = backend.unload(id).await;
        let models = backend.models().await?;
        let still_listed = models
            .iter()
            .flat_map(|m| &m.loaded_instances)
            .any(|i| i.id == id);
        if !still_listed {
            return Ok(round);
        }
        if let Err(error) = unloaded {
            return Err(PoolError::Backend(error));
        }
        tracing::warn!(instance = %id, round, "instance still listed after unload; retrying");
        tokio::time::sleep(Duration::from_millis(50 * u64::from(round))).await;
    }
    Err(PoolError::UnloadNotVerified {
        remaining: vec![id.to_owned()],
        rounds: UNLOAD_ROUNDS,
    })
}

/// The instance ids a previous lmsd recorded as its own.
fn read_owned(path: Option<&std::path::Path>) -> BTreeSet<String> {
    let Some(path) = path else {
        return BTreeSet::new();
    };
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|error| {
            tracing::warn!(file = %path.display(), %error, "unreadable record of lmsd's instances; adopting none");
            BTreeSet::new()
        }),
        Err(_) => BTreeSet::new(),
    }
}
