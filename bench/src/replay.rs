//! P4, pool policy quality: seeded traces replayed in simulated time through lmsd's pool — the
//! real actor, on a paused tokio clock, in front of an in-memory engine whose loads take the
//! model's load time — and through baselines simulated beside it: LRU, Ollama's order, LM
//! Studio's "keep only the last JIT model", and Belady's offline optimum with sizes.
//!
//! The baselines are a cache simulation: a request for a resident model is served at once; a
//! miss loads the model (its load time is the request's wait), after evicting idle instances the
//! policy picks until it fits. An instance is busy while it serves (it cannot be evicted) and
//! every policy waits for busy instances alike. Idle TTLs are off for all, to compare eviction
//! alone.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use lmsd::pool::memory_engine::{MemoryEngine, MemoryModel};
use lmsd::pool::policy::Ranking;
use lmsd::pool::{AcquireRequest, Observers, PoolSettings};
use lmsd_proto::{Priority, Ttl};
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

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
    /// The queue priority it asks for (the cache simulations ignore it).
    pub priority: Priority,
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
            priority: Priority::Normal,
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
            sessions.push(Request {
                at,
                model,
                service,
                priority: Priority::Normal,
            });
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
            priority: Priority::Normal,
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
            models: models.clone(),
            requests: shifting,
            budget,
        },
        Trace {
            name: "agent fan-out",
            models,
            requests: fan_out(requests, &mut rng),
            budget,
        },
    ]
}

/// Agents fanning out: bursts of short interactive tasks on two or three of the five smaller
/// models, while a long batch runs on the 14 GiB model at low priority — a task every 5 s, each
/// busy for 30 s.
fn fan_out(requests: usize, rng: &mut fastrand::Rng) -> Vec<Request> {
    const BATCH_MODEL: usize = 6;
    let mut out = Vec::with_capacity(requests);
    let mut at = 0.0;
    while out.len() < requests {
        at += 5.0;
        out.push(Request {
            at,
            model: BATCH_MODEL,
            service: 30.0,
            priority: Priority::Batch,
        });
        if rng.f64() < 0.2 {
            // A burst: an agent offloads five to ten short tasks over two or three models.
            let models: Vec<usize> = (0..2 + rng.usize(..2)).map(|_| rng.usize(..5)).collect();
            for n in 0..5 + rng.usize(..6) {
                out.push(Request {
                    at: at + 0.2 * n as f64,
                    model: models[n % models.len()],
                    service: 1.0 + rng.f64() * 2.0,
                    priority: Priority::Interactive,
                });
            }
        }
    }
    out.sort_by(|a, b| a.at.total_cmp(&b.at));
    out.truncate(requests);
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    Lmsd,
    Lru,
    Ollama,
    LmStudioLastJit,
    Belady,
    BeladySize,
    /// The pool itself with LRU's ranking and no turn hold: LRU as a queueing pool would be.
    PoolLru,
}

impl Policy {
    pub const ALL: [Policy; 7] = [
        Policy::Lmsd,
        Policy::Lru,
        Policy::Ollama,
        Policy::LmStudioLastJit,
        Policy::Belady,
        Policy::BeladySize,
        Policy::PoolLru,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Policy::Lmsd => "lmsd",
            Policy::Lru => "LRU",
            Policy::Ollama => "Ollama (shortest keep-alive)",
            Policy::LmStudioLastJit => "LM Studio (last JIT only)",
            Policy::Belady => "Belady (furthest next use)",
            Policy::BeladySize => "Belady-Size (size x next use)",
            Policy::PoolLru => "LRU through lmsd's pool",
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
    /// For interactive requests (when the trace has some): the p99 of their wait beyond the
    /// load time of their model, i.e. what they waited on others.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99_interactive_beyond_load_s: Option<f64>,
}

/// lmsd's turn hold and max wait, as the daemon has them by default.
const TURN_HOLD: Duration = Duration::from_secs(10);
const MAX_WAIT: Duration = Duration::from_secs(120);
/// Ollama's default keep-alive.
const OLLAMA_KEEP_ALIVE: f64 = 300.0;

pub fn replay(trace: &Trace, policy: Policy) -> Outcome {
    match policy {
        Policy::Lmsd => return replay_through_the_pool(trace, Ranking::ReloadCost, TURN_HOLD),
        Policy::PoolLru => {
            return replay_through_the_pool(trace, Ranking::LeastRecentlyUsed, Duration::ZERO)
        }
        _ => {}
    }
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
                let victims = choose(policy, trace, &resident, &next_of, t, used, spec.size);
                if victims.is_empty() {
                    // Wait for the first busy instance to become evictable.
                    let next = resident
                        .values()
                        .map(|r| r.busy_until)
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
    outcome(trace, load_seconds, loads, waits)
}

/// The figures of a replay, from each request's wait (in trace order).
fn outcome(trace: &Trace, load_seconds: f64, loads: u64, waits: Vec<f64>) -> Outcome {
    let p99 = |mut values: Vec<f64>| {
        values.sort_by(f64::total_cmp);
        values.get(values.len() * 99 / 100).copied().unwrap_or(0.0)
    };
    let beyond_load: Vec<f64> = trace
        .requests
        .iter()
        .zip(&waits)
        .filter(|(r, _)| r.priority == Priority::Interactive)
        .map(|(r, wait)| (wait - trace.models[r.model].load_secs).max(0.0))
        .collect();
    let mean = waits.iter().sum::<f64>() / waits.len().max(1) as f64;
    Outcome {
        load_seconds,
        loads,
        p99_interactive_beyond_load_s: (!beyond_load.is_empty()).then(|| p99(beyond_load)),
        p99_wait_s: p99(waits),
        mean_wait_s: mean,
    }
}

/// The trace through lmsd's own pool: each request is a task that arrives at its time, waits
/// for a slot (the pool loading, evicting and holding as it does in the daemon), holds it for
/// its service time and lets go. On a paused clock: hours of trace take moments.
fn replay_through_the_pool(trace: &Trace, ranking: Ranking, turn_hold: Duration) -> Outcome {
    // A runtime of its own, on its own thread: the benchmark's runtime has a real clock.
    let trace = trace.clone();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("a runtime for the replay");
        runtime.block_on(pool_replay(&trace, ranking, turn_hold))
    })
    .join()
    .expect("the replay thread")
}

async fn pool_replay(trace: &Trace, ranking: Ranking, turn_hold: Duration) -> Outcome {
    let engine = MemoryEngine::new(
        trace
            .models
            .iter()
            .enumerate()
            .map(|(n, spec)| MemoryModel {
                key: format!("m{n}"),
                size_bytes: spec.size,
                load_time: Duration::from_secs_f64(spec.load_secs),
            })
            .collect(),
        // Every policy lets an instance serve any number of requests at once.
        u32::MAX,
    );
    let settings = PoolSettings {
        budget_bytes: trace.budget,
        idle_ttl: Ttl::Never,
        instance_overhead: 0,
        manage_external: false,
        models: BTreeMap::new(),
        max_wait: MAX_WAIT,
        poll_interval: Duration::from_secs(5),
        turn_hold,
        max_queue: usize::MAX,
        max_instances: 1,
        outage_wait: Duration::from_secs(30),
        orphan_wait: Duration::from_secs(600),
        ranking,
        owned_file: None,
    };
    let observers = Observers {
        metrics: Arc::new(lmsd::metrics::Metrics::default()),
        events: tokio::sync::broadcast::channel(16).0,
    };
    let shutdown = CancellationToken::new();
    let (pool, actor) = lmsd::pool::spawn(
        Arc::new(engine.clone()),
        settings,
        observers,
        shutdown.clone(),
    );
    let base = Instant::now();
    let tasks: Vec<_> = trace
        .requests
        .iter()
        .map(|request| {
            let (pool, request) = (pool.clone(), *request);
            tokio::spawn(async move {
                let arrives = base + Duration::from_secs_f64(request.at);
                tokio::time::sleep_until(arrives).await;
                let lease = pool
                    .acquire(AcquireRequest {
                        model: format!("m{}", request.model),
                        ttl: None,
                        priority: request.priority,
                        deadline: arrives + Duration::from_secs(365 * 24 * 3600),
                        context_length: None,
                        min_context: None,
                        progress: None,
                    })
                    .await
                    .expect("every request is served");
                let waited = arrives.elapsed().as_secs_f64();
                tokio::time::sleep(Duration::from_secs_f64(request.service)).await;
                drop(lease);
                waited
            })
        })
        .collect();
    let mut waits = Vec::with_capacity(tasks.len());
    for task in tasks {
        waits.push(task.await.expect("a replayed request"));
    }
    shutdown.cancel();
    let _ = actor.await;
    let stats = engine.stats();
    outcome(trace, stats.load_time.as_secs_f64(), stats.loads, waits)
}

fn choose(
    policy: Policy,
    trace: &Trace,
    resident: &HashMap<usize, Loaded>,
    next_of: &HashMap<usize, f64>,
    t: f64,
    used: u64,
    need: u64,
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
        // Replayed through the pool itself: see `replay_through_the_pool`.
        Policy::Lmsd | Policy::PoolLru => Vec::new(),
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
    fn the_pool_replay_serves_every_request_through_the_real_actor() {
        let trace = &traces(200, 3)[1];
        let lmsd = replay(trace, Policy::Lmsd);
        let distinct: std::collections::HashSet<usize> =
            trace.requests.iter().map(|r| r.model).collect();
        assert!(lmsd.loads as usize >= distinct.len(), "{lmsd:?}");
        let expected: f64 = distinct.iter().map(|m| trace.models[*m].load_secs).sum();
        assert!(lmsd.load_seconds >= expected - 1e-6, "{lmsd:?}");
    }

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
