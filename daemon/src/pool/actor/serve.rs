//! Serving the waiting requests: a slot on an instance (loading, evicting or reloading for
//! context as needed), a load, an unload, a listing; and what each is answered.

use super::*;

impl Actor {
    /// Tries to finish the waiter at `index`; removes it when done.
    pub(super) fn serve(&mut self, index: usize, now: Instant) -> Step {
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

    pub(super) fn is_model_key(&self, name: &str) -> bool {
        self.catalogue.iter().any(|m| m.key == name)
    }

    /// Does a task wait for an instance of `model`?
    pub(super) fn wanted(&self, model: &str) -> bool {
        self.waiters
            .iter()
            .any(|w| w.model == model && matches!(w.waiting, Waiting::Acquire(_)))
    }

    pub(super) fn serial(&mut self) -> u64 {
        self.next_serial += 1;
        self.next_serial
    }

    /// A not-found error that names the models LM Studio does have.
    pub(super) fn not_found(&self, name: String) -> PoolError {
        PoolError::NotFound {
            name,
            known: self.catalogue.iter().map(|m| m.key.clone()).collect(),
        }
    }

    /// The catalogue entry for a key, or for the model of a loaded instance id.
    pub(super) fn model_named(&self, name: &str) -> Option<Model> {
        let key = self
            .instances
            .iter()
            .find(|i| i.id == name)
            .map_or(name, |i| i.model.as_str());
        self.catalogue.iter().find(|m| m.key == key).cloned()
    }

    /// `Some(Ok)` when an instance with a free slot is there; starts a load or evictions when
    /// needed; `None` to keep waiting.
    pub(super) fn serve_acquire(
        &mut self,
        index: usize,
        now: Instant,
    ) -> Option<Result<(), PoolError>> {
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
                    let takes_settings = self.backend.takes_load_settings();
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
                self.start_load(&model, LoadSettings::default(), None);
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
            .map(|context_length| LoadSettings {
                context_length: Some(context_length),
                ..LoadSettings::default()
            })
            .unwrap_or_default();
        self.ensure_loading(index, &model, settings, ttl, now)
    }

    /// The context to load `model` with for a task that needs `need` tokens: when the engine's
    /// default (LM Studio's is usually 4096) and the configured one may be too small, or
    /// (`forced`) when an instance loaded without one turned out too small.
    pub(super) fn context_to_load(&self, model: &Model, need: u32, forced: bool) -> Option<u32> {
        const ENGINE_DEFAULT: u32 = 4096;
        if !self.backend.takes_load_settings() {
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
    pub(super) fn context_unavailable(
        &self,
        model: &Model,
        index: usize,
        need: u32,
    ) -> Option<PoolError> {
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

    pub(super) fn serve_load(
        &mut self,
        index: usize,
        now: Instant,
    ) -> Option<Result<(), PoolError>> {
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
        self.ensure_loading(index, &model, request.settings, request.ttl, now)
    }

    /// Starts what a waiter for `model` needs — a load, or evictions to make room — and says
    /// whether to keep waiting (`None`) or give up.
    pub(super) fn ensure_loading(
        &mut self,
        index: usize,
        model: &Model,
        settings: LoadSettings,
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
        let waited = now.saturating_duration_since(self.waiters[index].enqueued);
        let starving = waited >= self.settings.max_wait;
        // A turn hold keeps an instance for its agent's next call, but no waiter sits out more
        // than one hold's length for it: a model in steady use renews its hold with every call,
        // and would otherwise keep a task for another model waiting until `max_wait`.
        // An interactive task is an agent waiting now: it sits out another's hold for a moment
        // at most, not a whole hold.
        let patience = match self.waiters[index].priority {
            Priority::Interactive => self.settings.turn_hold.min(INTERACTIVE_HOLD_PATIENCE),
            _ => self.settings.turn_hold,
        };
        let holds_yield = starving || waited >= patience;
        match self.fit(model, now, holds_yield) {
            Fit::Fits => {
                self.start_load(model, settings, ttl);
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

    pub(super) fn serve_unload(&mut self, index: usize) -> Option<Result<(), PoolError>> {
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

    pub(super) fn grant(
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

    pub(super) fn load_outcome(
        &mut self,
        request: &LoadRequest,
        load_seen: Option<Duration>,
    ) -> LoadOutcome {
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
}

/// Whether an instance has the context a task needs (0: its context is not known).
fn fits_context(instance: &Instance, need: u32) -> bool {
    instance.context_length == 0 || instance.context_length >= need
}
