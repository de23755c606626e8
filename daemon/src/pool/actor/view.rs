//! How policy and `status` see the table: memory used, TTLs in force, residents for the
//! eviction policy, how a load fits, when the clock must next run.

use super::*;

impl Actor {
    pub(super) fn bytes(&self, size_bytes: u64) -> u64 {
        size_bytes + self.settings.instance_overhead
    }

    pub(super) fn used_bytes(&self) -> u64 {
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
    pub(super) fn ttl_for(&self, model: &str, ttl_override: Option<Ttl>) -> Ttl {
        ttl_override
            .or_else(|| self.settings.models.get(model).and_then(|m| m.ttl))
            .unwrap_or(self.settings.idle_ttl)
    }

    /// The table as policy sees it. `starving`: a task has waited past `max_wait`, so turn holds
    /// no longer protect anything.
    pub(super) fn residents(&self, now: Instant, starving: bool) -> Vec<Resident> {
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
    pub(super) fn fit(&self, model: &Model, now: Instant, starving: bool) -> Fit {
        let residents = self.residents(now, starving);
        let leaving: u64 = residents
            .iter()
            .filter(|r| r.leaving)
            .map(|r| r.bytes)
            .sum();
        let used = self.used_bytes();
        let need = self.bytes(model.size_bytes);
        match policy::plan_fit_ranked(
            &residents,
            used - leaving,
            self.settings.budget_bytes,
            need,
            now,
            self.settings.ranking,
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
    pub(super) fn next_wake(&self, now: Instant) -> Instant {
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

    pub(super) fn status(&self, now: Instant) -> PoolStatus {
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
