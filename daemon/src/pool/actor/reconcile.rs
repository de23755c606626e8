//! Converging the instance table with what the engine lists: outside loads and unloads,
//! restarts, lost loads that finished after all, just-in-time loads behind lmsd's back.

use super::*;

impl Actor {
    /// Converges the table to the catalogue read that started at `started`.
    pub(super) fn reconcile(&mut self, started: Instant, now: Instant) {
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
    pub(super) fn adopt_lost_load(&mut self, key: &str) {
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
}
