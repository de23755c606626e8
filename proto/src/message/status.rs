//! The `status` result: the daemon, the engine, the instances and the memory budget.

use serde::{Deserialize, Serialize};

use crate::ttl::Ttl;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub daemon: DaemonInfo,
    pub backend: BackendStatus,
    /// Loaded instances, and loads in progress (`state: loading`).
    pub instances: Vec<InstanceStatus>,
    pub memory: MemoryStatus,
    /// The most recent unloads lmsd made on its own, newest first.
    #[serde(default)]
    pub evictions: Vec<Eviction>,
}

/// lmsd's memory budget: what LM Studio has loaded (by `size_bytes`, plus the configured
/// per-instance overhead), outside loads included.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryStatus {
    pub budget_bytes: u64,
    pub used_bytes: u64,
    pub free_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Eviction {
    pub instance_id: String,
    pub model: String,
    /// Why: `idle_ttl`, `memory` (made room for another model), `unload` (asked for).
    pub reason: String,
    pub seconds_ago: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    Loading,
    Idle,
    Busy,
    Unloading,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoadedBy {
    Lmsd,
    /// LM Studio's GUI, `lms load`, another client: counted, never unloaded unless
    /// `[pool] manage_external = true` or asked for by name.
    Outside,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DaemonInfo {
    pub version: String,
    pub protocol: u32,
    pub pid: u32,
    pub uptime_s: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendStatus {
    /// The engine lmsd drives: `lmstudio` or `llama-server` (`[backend] kind`).
    #[serde(default = "BackendStatus::default_engine")]
    pub engine: String,
    pub url: String,
    pub reachable: bool,
    /// True when lmsd runs against its embedded simulator (`lmsd --simulate`): replies are fake.
    pub simulated: bool,
    /// Why the last contact failed, while `reachable` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Milliseconds since the catalogue was last read successfully, if ever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refreshed_ms_ago: Option<u64>,
}

impl BackendStatus {
    /// What an lmsd from before `engine` was reported drives.
    fn default_engine() -> String {
        "lmstudio".into()
    }

    /// The engine's name for people: "LM Studio" or "llama-server".
    pub fn engine_name(&self) -> &str {
        match self.engine.as_str() {
            "lmstudio" => "LM Studio",
            other => other,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceStatus {
    /// Empty while the instance is still loading.
    pub instance_id: String,
    pub model: String,
    pub size_bytes: u64,
    pub context_length: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallel: Option<u32>,
    /// The context length lmsd asked for when it differs from `context_length`, the one the
    /// engine really loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_context_length: Option<u32>,
    pub state: InstanceState,
    pub in_flight: u32,
    /// Seconds since its last task ended (0 while busy).
    pub idle_s: u64,
    pub ttl: Ttl,
    /// Seconds until the idle TTL unloads it; absent when it never expires (TTL `never`,
    /// pinned, or loaded outside lmsd).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_left_s: Option<u64>,
    pub pinned: bool,
    pub loaded_by: LoadedBy,
}
