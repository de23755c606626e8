//! P4, pool policy quality: seeded traces replayed in simulated time (no sleeps) through lmsd's
//! real policy functions and through baselines — LRU, Ollama's order, LM Studio's "keep only the
//! last JIT model" — and Belady's offline optimum with sizes.
//!
//! The replay is a cache simulation: a request for a resident model is served at once; a miss
//! loads the model (its load time is the request's wait), after evicting idle instances the
//! policy picks until it fits. An instance is busy while it serves (it cannot be evicted) and
//! every policy waits for busy instances alike. Idle TTLs are off for all, to compare eviction
//! alone.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use lmsd::pool::policy::{plan_fit, Fit, Resident};
use lmsd_proto::Ttl;
use serde::Serialize;

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub size: u64,
    pub load_secs: f64,
}

#[derive(Debug, Clone, Copy)]
pub struct Request {
    pub at: f64,
    pub model: usize,
    pub service: f64,
}

#[derive(Debug, Clone)]
pub struct Trace {
    pub name: &'static str,
    pub models: Vec<ModelSpec>,
    pub requests: Vec<Request>,
    pub budget: u64,
}

/// Eight models from 2 to 20 GiB, loading at 1.5 GiB/s plus half a second; a 32 GiB budget.
fn models() -> Vec<ModelSpec> {
    [2.0, 3.0, 4.5, 6.0, 8.0, 11.0, 14.0, 20.0]
        .iter()
        .map(|gib| ModelSpec {
            size: (gib * GIB) as u64,
            load_secs: gib / 1.5 + 0.5,
        })
        .collect()
}

/// Samples ranks 0.. with probability proportional to 1 / (rank + 1)^s.
struct Zipf {
    cumulative: Vec<f64>,
}

impl Zipf {
    fn new(n: usize, s: f64) -> Self {
        let mut total = 0.0;
        let cumulative = (0..n)
            .map(|rank| {
                total += 1.0 / ((rank + 1) as f64).powf(s);
                total
            })
            .collect::<Vec<_>>();
        Zipf {
            cumulative: cumulative.iter().map(|c| c / total).collect(),
        }
    }

    fn sample(&self, rng: &mut fastrand::Rng) -> usize {
        let x = rng.f64();
        self.cumulative
            .iter()
            .position(|c| x <= *c)
            .unwrap_or(self.cumulative.len() - 1)
    }
}

fn exponential(rng: &mut fastrand::Rng, mean: f64) -> f64 {
    -mean * (1.0 - rng.f64()).ln()
}

/// Three shapes: steady Zipf traffic, bursty agent sessions with think time, and a working set
/// that shifts every ten minutes.
pub fn traces(requests: usize, seed: u64) -> Vec<Trace> {
    let models = models();
    let budget = (32.0 * GIB) as u64;
    let zipf = Zipf::new(models.len(), 1.1);
    let mut rng = fastrand::Rng::with_seed(seed);
    // Popularity is not size order: a fixed random permutation maps ranks to models.
    let mut order: Vec<usize> = (0..models.len()).collect();
    rng.shuffle(&mut order);

    let mut steady = Vec::new();
    let mut at = 0.0;
    for _ in 0..requests {
        at += exponential(&mut rng, 2.0);
        steady.push(Request {
            at,
            model: order[zipf.sample(&mut rng)],
            service: 2.0 + rng.f64() * 8.0,
        });
    }

    let mut sessions = Vec::new();
    let mut session_start = 0.0;
    while sessions.len() < requests {
        session_start += exponential(&mut rng, 20.0);
        let model = order[zipf.sample(&mut rng)];
        let mut at = session_start;
        let burst = 1 + (exponential(&mut rng, 9.0) as usize);
        for _ in 0..burst {
            let service = 2.0 + rng.f64() * 6.0;
            sessions.push(Request { at, model, service });
            at += service + exponential(&mut rng, 8.0);
        }
    }
    sessions.sort_by(|a, b| a.at.total_cmp(&b.at));
    sessions.truncate(requests);

    let mut shifting = Vec::new();
    let mut at = 0.0;
    let mut shifted = order.clone();
    for _ in 0..requests {
        at += exponential(&mut rng, 2.0);
        // Every ten minutes the popularity ranking moves by three places.
        let epoch = (at / 600.0) as usize;
        shifted
            .iter_mut()
            .enumerate()
            .for_each(|(rank, m)| *m = order[(rank + 3 * epoch) % order.len()]);
        shifting.push(Request {
            at,
            model: shifted[zipf.sample(&mut rng)],
            service: 2.0 + rng.f64() * 8.0,
        });
    }

    vec![
        Trace {
            name: "steady zipf",
            models: models.clone(),
            requests: steady,
            budget,
        },
        Trace {
            name: "bursty sessions",
            models: models.clone(),
            requests: sessions,
            budget,
        },
        Trace {
            name: "shifting working set",
            models,
            requests: shifting,
            budget,
        },
    ]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    Lmsd,
    Lru,
    Ollama,
    LmStudioLastJit,
    Belady,
    BeladySize,
}

impl Policy {
    pub const ALL: [Policy; 6] = [
        Policy::Lmsd,
        Policy::Lru,
        Policy::Ollama,
        Policy::LmStudioLastJit,
        Policy::Belady,
        Policy::BeladySize,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Policy::Lmsd => "lmsd",
            Policy::Lru => "LRU",
            Policy::Ollama => "Ollama (shortest keep-alive)",
            Policy::LmStudioLastJit => "LM Studio (last JIT only)",
            Policy::Belady => "Belady (furthest next use)",
            Policy::BeladySize => "Belady-Size (size x next use)",
        }
    }
}

#[derive(Debug, Clone)]
struct Loaded {
    last_used: f64,
    busy_until: f64,
    uses: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub load_seconds: f64,
    pub loads: u64,
    pub p99_wait_s: f64,
    pub mean_wait_s: f64,
}

/// lmsd's turn hold and max wait, as the daemon applies them by default: a just-used instance is
/// held for its agent's next call, unless a task has waited longer than the max wait.
const TURN_HOLD: f64 = 10.0;
const MAX_WAIT: f64 = 120.0;
/// Ollama's default keep-alive.
const OLLAMA_KEEP_ALIVE: f64 = 300.0;

pub fn replay(trace: &Trace, policy: Policy) -> Outcome {
    let base = Instant::now();
    let instant = |t: f64| base + Duration::from_secs_f64(t.max(0.0));
    // Next use of each model after each request index, for Belady.
    let mut next_use = vec![f64::INFINITY; trace.requests.len()];
    let mut seen: HashMap<usize, f64> = HashMap::new();
    for (i, r) in trace.requests.iter().enumerate().rev() {
        next_use[i] = seen.get(&r.model).copied().unwrap_or(f64::INFINITY);
        seen.insert(r.model, r.at);
    }
    let mut next_of: HashMap<usize, f64> = HashMap::new();
    let mut resident: HashMap<usize, Loaded> = HashMap::new();
    let (mut load_seconds, mut loads, mut waits) =
        (0.0, 0u64, Vec::with_capacity(trace.requests.len()));
    for (index, request) in trace.requests.iter().enumerate() {
        next_of.insert(request.model, next_use[index]);
        let spec = &trace.models[request.model];
        let mut t = request.at;
        if !resident.contains_key(&request.model) {
            if policy == Policy::LmStudioLastJit {
                // Loading a JIT model unloads the previous ones, whatever the budget, even busy.
                resident.clear();
            }
            loop {
                let used: u64 = resident.keys().map(|m| trace.models[*m].size).sum();
                if used + spec.size <= trace.budget {
                    break;
                }
                let starving = t - request.at >= MAX_WAIT;
                let victims = choose(
                    policy, trace, &resident, &next_of, t, used, spec.size, starving, instant,
                );
                if victims.is_empty() {
                    // Wait for the first busy (or held) instance to become evictable, or for this
                    // task to have waited long enough to override holds.
                    let holds = policy == Policy::Lmsd && !starving;
                    let next = resident
                        .values()
                        .map(|r| {
                            if holds {
                                r.busy_until.max(r.last_used + TURN_HOLD)
                            } else {
                                r.busy_until
                            }
                        })
                        .chain(
                            (policy == Policy::Lmsd && !starving).then_some(request.at + MAX_WAIT),
                        )
                        .filter(|at| *at > t)
                        .fold(f64::INFINITY, f64::min);
                    if !next.is_finite() {
                        break; // cannot happen with a budget larger than every model
                    }
                    t = next;
                    continue;
                }
                for victim in victims {
                    resident.remove(&victim);
                }
            }
            t += spec.load_secs;
            load_seconds += spec.load_secs;
            loads += 1;
            resident.insert(
                request.model,
                Loaded {
                    last_used: t,
                    busy_until: t,
                    uses: 0,
                },
            );
        }
        let entry = resident.get_mut(&request.model).expect("resident");
        let start = t.max(request.at);
        entry.busy_until = entry.busy_until.max(start + request.service);
        entry.last_used = entry.last_used.max(start + request.service);
        entry.uses += 1;
        waits.push(start - request.at);
    }
    waits.sort_by(f64::total_cmp);
    let p99 = waits.get(waits.len() * 99 / 100).copied().unwrap_or(0.0);
    let mean = waits.iter().sum::<f64>() / waits.len().max(1) as f64;
    Outcome {
        load_seconds,
        loads,
        p99_wait_s: p99,
        mean_wait_s: mean,
    }
}

#[allow(clippy::too_many_arguments)] // the replay's whole state, passed plainly
fn choose(
    policy: Policy,
    trace: &Trace,
    resident: &HashMap<usize, Loaded>,
    next_of: &HashMap<usize, f64>,
    t: f64,
    used: u64,
    need: u64,
    starving: bool,
    instant: impl Fn(f64) -> Instant,
) -> Vec<usize> {
    let idle: Vec<(&usize, &Loaded)> = resident.iter().filter(|(_, r)| r.busy_until <= t).collect();
    let greedy = |mut order: Vec<(&usize, &Loaded)>, key: &dyn Fn(&(&usize, &Loaded)) -> f64| {
        order.sort_by(|a, b| key(a).total_cmp(&key(b)));
        let mut freed = 0;
        let mut victims = Vec::new();
        for (model, _) in order {
            if used - freed + need <= trace.budget {
                break;
            }
            freed += trace.models[*model].size;
            victims.push(*model);
        }
        if used - freed + need <= trace.budget {
            victims
        } else {
            Vec::new()
        }
    };
    match policy {
        Policy::Lmsd => {
            let residents: Vec<Resident> = resident
                .iter()
                .map(|(model, r)| Resident {
                    id: model.to_string(),
                    model: model.to_string(),
                    bytes: trace.models[*model].size,
                    in_flight: u32::from(r.busy_until > t),
                    pinned: false,
                    managed: true,
                    leaving: false,
                    held: !starving && r.busy_until <= t && t - r.last_used < TURN_HOLD,
                    ttl: Ttl::Never,
                    last_used: instant(r.last_used),
                    load_time: Duration::from_secs_f64(trace.models[*model].load_secs),
                    uses: r.uses,
                })
                .collect();
            match plan_fit(&residents, used, trace.budget, need, instant(t)) {
                Fit::Evict(victims) => victims.iter().filter_map(|v| v.parse().ok()).collect(),
                _ => Vec::new(),
            }
        }
        Policy::Lru | Policy::LmStudioLastJit => greedy(idle, &|(_, r)| r.last_used),
        Policy::Ollama => greedy(idle, &|(_, r)| r.last_used + OLLAMA_KEEP_ALIVE),
        Policy::Belady => greedy(idle, &|(m, _)| {
            -(next_of.get(m).copied().unwrap_or(f64::INFINITY) - t)
        }),
        Policy::BeladySize => greedy(idle, &|(m, _)| {
            -((next_of.get(m).copied().unwrap_or(f64::INFINITY) - t)
                * trace.models[**m].size as f64)
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traces_are_reproducible_and_belady_beats_lru() {
        let a = traces(500, 7);
        let b = traces(500, 7);
        assert_eq!(a[0].requests.len(), 500);
        assert_eq!(a[1].requests[10].model, b[1].requests[10].model);
        for trace in &a {
            let belady = replay(trace, Policy::Belady).load_seconds;
            let lru = replay(trace, Policy::Lru).load_seconds;
            assert!(belady <= lru, "{}: Belady {belady} > LRU {lru}", trace.name);
        }
    }
}
