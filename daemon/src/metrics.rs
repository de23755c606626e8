//! Prometheus metrics, on the front door's `/metrics` and through `lmsd-ctl metrics`: how long
//! tasks wait, load and run, what they end with, what gets evicted, and the pool's gauges.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskLabels {
    kind: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

/// The daemon's metrics. Updates are atomic; nothing here blocks a task.
pub struct Metrics {
    registry: Registry,
    queue_wait: Histogram,
    load_time: Histogram,
    first_token: Histogram,
    task_time: Histogram,
    tasks: Family<TaskLabels, Counter>,
    evictions: Family<ReasonLabels, Counter>,
    loads: Counter,
    pub memory_used: Gauge,
    pub memory_budget: Gauge,
    pub instances: Gauge,
    pub queue_depth: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        // 1 ms to about 9 minutes.
        let seconds = || Histogram::new(exponential_buckets(0.001, 2.0, 20));
        let mut metrics = Metrics {
            registry: Registry::with_prefix("lmsd"),
            queue_wait: seconds(),
            load_time: seconds(),
            first_token: seconds(),
            task_time: seconds(),
            tasks: Family::default(),
            evictions: Family::default(),
            loads: Counter::default(),
            memory_used: Gauge::default(),
            memory_budget: Gauge::default(),
            instances: Gauge::default(),
            queue_depth: Gauge::default(),
        };
        let r = &mut metrics.registry;
        r.register(
            "task_queue_seconds",
            "Time tasks waited for a slot, a load or memory",
            metrics.queue_wait.clone(),
        );
        r.register(
            "task_load_seconds",
            "Time tasks waited for their model to load",
            metrics.load_time.clone(),
        );
        r.register(
            "first_token_seconds",
            "Submission to first streamed token",
            metrics.first_token.clone(),
        );
        r.register(
            "task_seconds",
            "Submission to answer",
            metrics.task_time.clone(),
        );
        r.register(
            "tasks",
            "Finished tasks by kind and outcome",
            metrics.tasks.clone(),
        );
        r.register(
            "evictions",
            "Instances lmsd unloaded on its own, by reason",
            metrics.evictions.clone(),
        );
        r.register("loads", "Model loads lmsd made", metrics.loads.clone());
        r.register(
            "memory_used_bytes",
            "Memory of loaded instances, as the budget counts it",
            metrics.memory_used.clone(),
        );
        r.register(
            "memory_budget_bytes",
            "The memory budget",
            metrics.memory_budget.clone(),
        );
        r.register("instances", "Loaded instances", metrics.instances.clone());
        r.register("queue_depth", "Tasks waiting", metrics.queue_depth.clone());
        metrics
    }
}

impl Metrics {
    pub fn task_finished(
        &self,
        kind: &str,
        outcome: &str,
        queued_ms: u64,
        load_ms: u64,
        total_ms: u64,
    ) {
        self.tasks
            .get_or_create(&TaskLabels {
                kind: kind.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
        if outcome == "ok" {
            self.queue_wait.observe(queued_ms as f64 / 1000.0);
            if load_ms > 0 {
                self.load_time.observe(load_ms as f64 / 1000.0);
            }
            self.task_time.observe(total_ms as f64 / 1000.0);
        }
    }

    pub fn first_token(&self, seconds: f64) {
        self.first_token.observe(seconds);
    }

    pub fn evicted(&self, reason: &str) {
        self.evictions
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }

    pub fn loaded(&self) {
        self.loads.inc();
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            text.push_str("# metrics could not be encoded\n");
        }
        text
    }
}
