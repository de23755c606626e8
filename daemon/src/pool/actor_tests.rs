//! The pool actor driven through its handle, against a fake engine, on a paused clock: the
//! decisions that end-to-end runs can only reach by chance (which instance gives way, when a
//! hold ends, what a lost load reply leaves behind, how an outage is waited out).
// A failed unwrap in a test is a failed test.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use lmsd_proto::{InstanceStatus, LoadedBy, Priority, Ttl};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::memory_engine::{MemoryEngine, MemoryModel};
use super::policy::Ranking;
use super::{AcquireRequest, Lease, Observers, PoolError, PoolHandle, PoolSettings};

const GB: u64 = 1_000_000_000;

/// The models as the tests give them: key and size; every load takes two seconds.
fn engine(models: &[(&str, u64)]) -> MemoryEngine {
    MemoryEngine::new(
        models
            .iter()
            .map(|(key, size)| MemoryModel {
                key: (*key).to_owned(),
                size_bytes: *size,
                load_time: Duration::from_secs(2),
            })
            .collect(),
        4,
    )
}

fn settings(budget_bytes: u64) -> PoolSettings {
    PoolSettings {
        budget_bytes,
        idle_ttl: Ttl::Never,
        instance_overhead: 0,
        manage_external: false,
        models: BTreeMap::new(),
        max_wait: Duration::from_secs(120),
        poll_interval: Duration::from_secs(5),
        turn_hold: Duration::ZERO,
        max_queue: 1024,
        max_instances: 1,
        outage_wait: Duration::from_secs(30),
        orphan_wait: Duration::from_secs(600),
        ranking: Ranking::default(),
        owned_file: None,
    }
}

fn start(engine: &MemoryEngine, settings: PoolSettings) -> PoolHandle {
    let observers = Observers {
        metrics: Arc::new(crate::metrics::Metrics::default()),
        events: tokio::sync::broadcast::channel(64).0,
    };
    let (pool, _task) = super::spawn(
        Arc::new(engine.clone()),
        settings,
        observers,
        CancellationToken::new(),
    );
    pool
}

fn request(model: &str) -> AcquireRequest {
    AcquireRequest {
        model: model.into(),
        ttl: None,
        priority: Priority::Normal,
        deadline: Instant::now() + Duration::from_secs(600),
        context_length: None,
        min_context: None,
        progress: None,
    }
}

async fn acquire(pool: &PoolHandle, model: &str) -> Lease {
    pool.acquire(request(model)).await.unwrap()
}

async fn instances(pool: &PoolHandle) -> Vec<InstanceStatus> {
    pool.status().await.unwrap().instances
}

/// Room for one of two 4 GB models, `a` just used and held for ten seconds.
async fn a_just_used_with_no_room_for_b() -> (MemoryEngine, PoolHandle) {
    let engine = engine(&[("a", 4 * GB), ("b", 4 * GB)]);
    let pool = start(
        &engine,
        PoolSettings {
            turn_hold: Duration::from_secs(10),
            ..settings(5 * GB)
        },
    );
    drop(acquire(&pool, "a").await);
    (engine, pool)
}

#[tokio::test(start_paused = true)]
async fn twenty_waiters_for_an_unloaded_model_make_one_load() {
    let engine = engine(&[("a", 2 * GB)]);
    let pool = start(&engine, settings(10 * GB));
    let waiters: Vec<_> = (0..20)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move { drop(acquire(&pool, "a").await) })
        })
        .collect();
    for waiter in waiters {
        waiter.await.unwrap();
    }
    assert_eq!(engine.stats().loads, 1);
    assert_eq!(engine.loaded(), ["a"]);
}

#[tokio::test(start_paused = true)]
async fn an_idle_instance_expires_after_its_ttl_and_never_while_busy() {
    let engine = engine(&[("a", 2 * GB)]);
    let pool = start(
        &engine,
        PoolSettings {
            idle_ttl: Ttl::After(Duration::from_secs(60)),
            ..settings(10 * GB)
        },
    );
    let lease = acquire(&pool, "a").await;
    tokio::time::sleep(Duration::from_secs(300)).await;
    assert_eq!(engine.loaded(), ["a"], "busy: never expires");
    drop(lease);
    tokio::time::sleep(Duration::from_secs(50)).await;
    assert_eq!(engine.loaded(), ["a"], "idle for less than its TTL");
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert!(engine.loaded().is_empty(), "idle past its TTL");
}

#[tokio::test(start_paused = true)]
async fn the_least_valuable_idle_instance_makes_room_and_a_busy_one_never_does() {
    let engine = engine(&[("a", 4 * GB), ("b", 4 * GB), ("c", 4 * GB)]);
    let pool = start(&engine, settings(10 * GB));
    drop(acquire(&pool, "a").await);
    let busy = acquire(&pool, "b").await;
    drop(acquire(&pool, "c").await);
    let mut loaded = engine.loaded();
    loaded.sort();
    assert_eq!(loaded, ["b", "c"], "a was idle, b busy");
    drop(busy);
}

#[tokio::test(start_paused = true)]
async fn a_load_waits_for_a_busy_instance_and_gives_up_at_its_deadline() {
    let engine = engine(&[("a", 4 * GB), ("b", 4 * GB)]);
    let pool = start(&engine, settings(5 * GB));
    let busy = acquire(&pool, "a").await;
    let started = Instant::now();
    let waited = pool
        .acquire(AcquireRequest {
            deadline: started + Duration::from_secs(30),
            ..request("b")
        })
        .await;
    assert!(
        matches!(waited, Err(PoolError::DeadlineExceeded)),
        "{waited:?}"
    );
    assert!(started.elapsed() >= Duration::from_secs(30));
    assert_eq!(engine.loaded(), ["a"]);
    drop(busy);
}

#[tokio::test(start_paused = true)]
async fn a_just_used_instance_is_held_for_the_turn_hold_then_gives_way() {
    let (engine, pool) = a_just_used_with_no_room_for_b().await;
    let asked = Instant::now();
    drop(acquire(&pool, "b").await);
    let waited = asked.elapsed();
    assert!(
        waited >= Duration::from_secs(10),
        "b waited out a's hold: {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(20),
        "and no longer: {waited:?}"
    );
    assert_eq!(engine.loaded(), ["b"]);
}

#[tokio::test(start_paused = true)]
async fn an_outside_instance_is_counted_and_left_alone() {
    let engine = engine(&[("x", 4 * GB), ("y", 4 * GB)]);
    engine.load_outside("x", 4096);
    let pool = start(&engine, settings(5 * GB));
    let refused = pool.acquire(request("y")).await;
    match refused {
        Err(PoolError::BudgetExceeded { holders, .. }) => assert_eq!(holders, ["x"]),
        other => panic!("{other:?}"),
    }
    let listed = instances(&pool).await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].loaded_by, LoadedBy::Outside);
    assert_eq!(engine.loaded(), ["x"], "never unloaded by lmsd");
}

#[tokio::test(start_paused = true)]
async fn a_lost_load_reply_leaves_lmsds_instance_and_no_second_load() {
    let engine = engine(&[("a", 2 * GB)]);
    // The reply is lost after the next catalogue read already listed the new instance (as
    // loaded outside lmsd, which did not know better yet).
    engine.lose_next_reply(Duration::from_secs(12));
    let pool = start(&engine, settings(10 * GB));
    drop(acquire(&pool, "a").await);
    tokio::time::sleep(Duration::from_secs(15)).await;
    assert_eq!(engine.stats().loads, 1);
    let listed = instances(&pool).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].loaded_by, LoadedBy::Lmsd);
    let memory = pool.status().await.unwrap().memory;
    assert_eq!(memory.used_bytes, 2 * GB, "counted once");
}

#[tokio::test(start_paused = true)]
async fn an_outage_is_waited_out_from_when_it_began_not_from_when_the_task_queued() {
    let engine = engine(&[("a", 4 * GB), ("b", 4 * GB)]);
    let pool = start(
        &engine,
        PoolSettings {
            outage_wait: Duration::from_secs(5),
            ..settings(5 * GB)
        },
    );
    let busy = acquire(&pool, "a").await;
    // b waits for a's memory, long past outage_wait…
    let waiter = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.acquire(request("b")).await.map(drop) })
    };
    tokio::time::sleep(Duration::from_secs(20)).await;
    // …when the engine goes away for three seconds.
    engine.set_reachable(false);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!waiter.is_finished(), "failed at the outage's first read");
    engine.set_reachable(true);
    tokio::time::sleep(Duration::from_secs(3)).await;
    drop(busy);
    waiter.await.unwrap().unwrap();
    assert_eq!(engine.loaded(), ["b"]);
}

#[tokio::test(start_paused = true)]
async fn one_instance_at_a_time_is_reloaded_for_a_task_that_needs_more_context() {
    let engine = engine(&[("m", 2 * GB)]);
    engine.load_outside("m", 4096);
    engine.load_outside("m", 4096);
    let pool = start(
        &engine,
        PoolSettings {
            manage_external: true,
            max_instances: 2,
            ..settings(10 * GB)
        },
    );
    let lease = pool
        .acquire(AcquireRequest {
            min_context: Some(8192),
            ..request("m")
        })
        .await
        .unwrap();
    assert_eq!(engine.stats().unloads, 1, "one small instance gave way");
    assert_eq!(engine.contexts(), [4096, 8192]);
    drop(lease);
}

#[tokio::test(start_paused = true)]
async fn a_model_in_steady_use_keeps_a_waiter_for_another_no_longer_than_one_hold() {
    let (_, pool) = a_just_used_with_no_room_for_b().await;
    // An agent calls `a` every three seconds, renewing its hold each time.
    let steady = {
        let pool = pool.clone();
        tokio::spawn(async move {
            for _ in 0..40 {
                if let Ok(lease) = pool.acquire(request("a")).await {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    drop(lease);
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        })
    };
    let asked = Instant::now();
    drop(acquire(&pool, "b").await);
    let waited = asked.elapsed();
    assert!(
        waited < Duration::from_secs(20),
        "waited {waited:?}: the hold yields after one turn_hold, not after max_wait"
    );
    steady.abort();
}

#[tokio::test(start_paused = true)]
async fn an_interactive_task_sits_out_another_models_hold_for_a_moment_only() {
    let (_, pool) = a_just_used_with_no_room_for_b().await;
    let asked = Instant::now();
    let lease = pool
        .acquire(AcquireRequest {
            priority: Priority::Interactive,
            ..request("b")
        })
        .await
        .unwrap();
    let waited = asked.elapsed();
    // A second of patience, then b's two-second load.
    assert!(waited < Duration::from_secs(4), "waited {waited:?}");
    drop(lease);
}
