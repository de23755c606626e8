//! The pass the actor makes after each event and on the clock: expiries, drains, lost loads,
//! duplicates, pins and preloads, then the queue; and the record of lmsd's own instances.

use super::*;

impl Actor {
    pub(super) fn pump(&mut self, now: Instant, full: bool) {
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
    pub(super) fn give_up_lost_loads(&mut self, now: Instant) {
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
    pub(super) fn unload_duplicates(&mut self) {
        // This runs on every event: the usual table, one instance per model, costs a scan and
        // nothing more.
        let own = |i: &&Instance| i.loaded_by == LoadedBy::Lmsd;
        let any_twice = self.instances.iter().enumerate().any(|(n, a)| {
            own(&a)
                && self.instances[n + 1..]
                    .iter()
                    .any(|b| own(&b) && b.model == a.model)
        });
        if !any_twice {
            return;
        }
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
    pub(super) fn save_owned(&mut self) {
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
    pub(super) fn report_positions(&mut self) {
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
                    progress.tell(PoolProgress::Queued { position });
                }
            }
        }
    }

    pub(super) fn keep_pins_and_preloads(&mut self, now: Instant) {
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
                    self.start_load(&model, LoadSettings::default(), None);
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
}

/// The instance ids a previous lmsd recorded as its own.
pub(super) fn read_owned(path: Option<&std::path::Path>) -> BTreeSet<String> {
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
