//! The actor's engine calls: catalogue reads, loads and verified unloads run as jobs that
//! report back, and what their results change.

use super::*;

impl Actor {
    /// Starts a catalogue read unless one is running (then another follows it). Returns the
    /// number of the read whose result reflects everything up to now.
    pub(super) fn request_read(&mut self) -> u64 {
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

    pub(super) fn start_load(
        &mut self,
        model: &Model,
        settings: LoadSettings,
        ttl_override: Option<Ttl>,
    ) {
        let configured = self
            .settings
            .models
            .get(&model.key)
            .map(crate::config::ModelConfig::load_settings)
            .unwrap_or_default();
        let body = LoadBody {
            model: model.key.clone(),
            settings: settings.or(configured),
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
                progress.tell(PoolProgress::Loading {
                    model: model.key.clone(),
                });
            }
        }
        self.loads.insert(
            model.key.clone(),
            PendingLoad {
                size_bytes: model.size_bytes,
                context_length: body.settings.context_length,
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
    pub(super) fn start_unload(&mut self, id: &str, reason: &'static str) {
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
            let result = unload_verified(backend.as_ref(), &id).await;
            JobResult::Unloaded { id, result }
        });
    }

    pub(super) fn job_done(&mut self, result: JobResult) {
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

    pub(super) fn loaded(
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
    pub(super) fn note_context(
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
    pub(super) fn may_make_room(
        &mut self,
        model: &str,
        error: &BackendError,
        now: Instant,
    ) -> bool {
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
    pub(super) fn evict_one_for_memory(&mut self, now: Instant) -> bool {
        let residents = self.residents(now, true);
        // Asking for the whole budget makes policy list victims cheapest first; take the first.
        match policy::plan_fit_ranked(
            &residents,
            self.settings.budget_bytes,
            self.settings.budget_bytes,
            1,
            now,
            self.settings.ranking,
        ) {
            Fit::Evict(victims) if !victims.is_empty() => {
                self.start_unload(&victims[0], "memory");
                true
            }
            _ => false,
        }
    }

    pub(super) fn note_unloaded(
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
    pub(super) fn target_gone(&mut self, id: &str, rounds: u32) {
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

    pub(super) fn fail_waiters_for(&mut self, model: &str, error: &PoolError) {
        let (failed, kept): (VecDeque<Waiter>, VecDeque<Waiter>) =
            self.waiters.drain(..).partition(|w| {
                w.model == model && matches!(w.waiting, Waiting::Acquire(_) | Waiting::Load(..))
            });
        self.waiters = kept;
        for waiter in failed {
            waiter.fail(error.clone());
        }
    }

    pub(super) fn fail_unloads_of(&mut self, id: &str, error: &PoolError) {
        let (failed, kept): (VecDeque<Waiter>, VecDeque<Waiter>) = self.waiters.drain(..).partition(|w| {
            matches!(&w.waiting, Waiting::Unload { targets: Some(targets), .. } if targets.contains(id))
        });
        self.waiters = kept;
        for waiter in failed {
            waiter.fail(error.clone());
        }
    }
}

/// Unloads `id` (an id read from `loaded_instances`), then re-reads the catalogue and repeats
/// until LM Studio no longer lists it. Returns the rounds it took.
async fn unload_verified(backend: &dyn Engine, id: &str) -> Result<u32, PoolError> {
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
