//! The simulator's state: loaded instances, memory accounting, stored responses, faults.
//! Plain data and synchronous methods; the HTTP layer in `api` does the waiting.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::catalogue::{SimModel, SimModelKind};
use crate::faults::FaultRule;
use crate::SimConfig;

/// An error as LM Studio's v1 API shapes it: `{"error":{type, message, code?}}` with a status.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ApiError {
    pub status: u16,
    pub kind: &'static str,
    pub message: String,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn invalid_request(message: impl Into<String>) -> Self {
        ApiError {
            status: 400,
            kind: "invalid_request",
            message: message.into(),
            code: None,
        }
    }

    pub fn model_not_found(what: &str) -> Self {
        ApiError {
            status: 404,
            kind: "model_not_found",
            message: format!(
                "Model \"{what}\" not found. Please specify a valid model key or instance id."
            ),
            code: Some("model_not_found"),
        }
    }
}

/// Load settings of an instance, as `GET /api/v1/models` reports them in `config`.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct LoadSettings {
    pub context_length: Option<u32>,
    pub eval_batch_size: Option<u32>,
    pub flash_attention: Option<bool>,
    pub num_experts: Option<u32>,
    pub offload_kv_cache_to_gpu: Option<bool>,
}

#[derive(Debug, Clone)]
pub(crate) struct Instance {
    pub id: String,
    pub key: String,
    pub kind: SimModelKind,
    pub size_bytes: u64,
    pub settings: LoadSettings,
    pub context_length: u32,
    /// Loaded just in time by a chat (subject to JIT TTL and auto-evict), not by an explicit load.
    pub jit: bool,
    pub ttl: Option<Duration>,
    pub last_used: Instant,
    pub in_flight: u32,
}

/// Memory reserved for a load in progress; turned into an instance by `finish_load`.
#[derive(Debug)]
pub(crate) struct LoadTicket {
    pub key: String,
    pub size_bytes: u64,
    pub settings: LoadSettings,
    pub jit: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct StoredResponse {
    pub turn: u32,
    pub context_tokens: u64,
}

/// Counters tests read to check what lmsd really asked for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimStats {
    pub loads: u64,
    pub jit_loads: u64,
    pub unloads: u64,
    /// Chats completed.
    pub chats: u64,
    /// Chat requests received, counted before any injected fault or delay.
    pub chat_requests: u64,
    /// Embedding requests answered.
    pub embeddings: u64,
    /// The most requests any one instance served at the same moment.
    pub max_in_flight: u32,
}

pub(crate) const DEFAULT_CONTEXT_LENGTH: u32 = 4096;
pub(crate) const DEFAULT_PARALLEL: u32 = 4;

#[derive(Debug)]
pub(crate) struct SimState {
    pub config: SimConfig,
    pub instances: Vec<Instance>,
    pub reserved_bytes: u64,
    pub peak_bytes: u64,
    pub responses: HashMap<String, StoredResponse>,
    pub faults: Vec<FaultRule>,
    pub stats: SimStats,
}

pub(crate) enum ChatTarget {
    Loaded(String),
    NeedsLoad(String),
}

impl SimState {
    pub fn new(config: SimConfig) -> Self {
        SimState {
            config,
            instances: Vec::new(),
            reserved_bytes: 0,
            peak_bytes: 0,
            responses: HashMap::new(),
            faults: Vec::new(),
            stats: SimStats::default(),
        }
    }

    pub fn model(&self, key: &str) -> Option<&SimModel> {
        self.config.catalogue.iter().find(|m| m.key == key)
    }

    pub fn used_bytes(&self) -> u64 {
        self.instances.iter().map(|i| i.size_bytes).sum::<u64>() + self.reserved_bytes
    }

    pub fn instance_mut(&mut self, id: &str) -> Option<&mut Instance> {
        self.instances.iter_mut().find(|i| i.id == id)
    }

    /// `key`, then `key:2`, `key:3`, …: the first id not taken, as LM Studio names instances.
    fn next_instance_id(&self, key: &str) -> String {
        let taken = |id: &str| self.instances.iter().any(|i| i.id == id);
        if !taken(key) {
            return key.to_owned();
        }
        (2u32..)
            .map(|n| format!("{key}:{n}"))
            .find(|id| !taken(id))
            .unwrap_or_default()
    }

    /// Checks the model and memory, and reserves the memory for a load.
    pub fn begin_load(
        &mut self,
        key: &str,
        settings: LoadSettings,
        jit: bool,
    ) -> Result<LoadTicket, ApiError> {
        let model = self
            .model(key)
            .ok_or_else(|| ApiError::model_not_found(key))?
            .clone();
        if let Some(ctx) = settings.context_length {
            if ctx == 0 || ctx > model.max_context_length {
                return Err(ApiError::invalid_request(format!(
                    "context_length {ctx} is out of range for \"{key}\" (1..={})",
                    model.max_context_length
                )));
            }
        }
        if jit && self.config.auto_evict {
            // "Only keep last JIT loaded model": previous idle JIT instances make way.
            self.instances.retain(|i| !(i.jit && i.in_flight == 0));
        }
        let used = self.used_bytes();
        if used + model.size_bytes > self.config.memory_bytes {
            return Err(ApiError {
                status: 500,
                kind: "internal_error",
                message: format!(
                    "Failed to load model \"{key}\". Error: Model loading was stopped due to insufficient system resources: it needs {} bytes and {} of {} are free.",
                    model.size_bytes,
                    self.config.memory_bytes.saturating_sub(used),
                    self.config.memory_bytes
                ),
                code: None,
            });
        }
        self.reserved_bytes += model.size_bytes;
        self.peak_bytes = self.peak_bytes.max(self.used_bytes());
        Ok(LoadTicket {
            key: key.to_owned(),
            size_bytes: model.size_bytes,
            settings,
            jit,
        })
    }

    /// Turns a reservation into a loaded instance and returns its id.
    pub fn finish_load(&mut self, ticket: LoadTicket, now: Instant) -> String {
        self.reserved_bytes -= ticket.size_bytes;
        let kind = self
            .model(&ticket.key)
            .map_or(SimModelKind::Llm, |m| m.kind);
        let id = self.next_instance_id(&ticket.key);
        let context_length = ticket
            .settings
            .context_length
            .unwrap_or(DEFAULT_CONTEXT_LENGTH);
        self.instances.push(Instance {
            id: id.clone(),
            key: ticket.key,
            kind,
            size_bytes: ticket.size_bytes,
            settings: ticket.settings,
            context_length,
            jit: ticket.jit,
            ttl: ticket.jit.then_some(self.config.jit_ttl),
            last_used: now,
            in_flight: 0,
        });
        self.stats.loads += 1;
        if ticket.jit {
            self.stats.jit_loads += 1;
        }
        id
    }

    pub fn unload(&mut self, instance_id: &str) -> Result<(), ApiError> {
        let index = self
            .instances
            .iter()
            .position(|i| i.id == instance_id)
            .ok_or_else(|| ApiError::model_not_found(instance_id))?;
        self.instances.remove(index);
        self.stats.unloads += 1;
        Ok(())
    }

    /// What a chat naming `model` (an instance id or a key) runs on.
    pub fn chat_target(&self, model: &str) -> Result<ChatTarget, ApiError> {
        if let Some(instance) = self.instances.iter().find(|i| i.id == model) {
            return Ok(ChatTarget::Loaded(instance.id.clone()));
        }
        let Some(entry) = self.model(model) else {
            return Err(ApiError::model_not_found(model));
        };
        if entry.kind == SimModelKind::Embedding {
            return Err(ApiError::invalid_request(format!(
                "\"{model}\" is an embedding model and cannot chat"
            )));
        }
        match self.instances.iter().find(|i| i.key == model) {
            Some(instance) => Ok(ChatTarget::Loaded(instance.id.clone())),
            None if self.config.jit => Ok(ChatTarget::NeedsLoad(model.to_owned())),
            None => Err(ApiError::invalid_request(
                "No models loaded. Please load a model in the developer page or use the 'lms load' command.",
            )),
        }
    }

    /// Unloads JIT instances whose idle TTL has run out; returns their ids.
    pub fn expire_idle(&mut self, now: Instant) -> Vec<String> {
        let expired: Vec<String> = self
            .instances
            .iter()
            .filter(|i| {
                i.in_flight == 0
                    && i.ttl
                        .is_some_and(|ttl| now.saturating_duration_since(i.last_used) >= ttl)
            })
            .map(|i| i.id.clone())
            .collect();
        self.instances.retain(|i| !expired.contains(&i.id));
        self.stats.unloads += expired.len() as u64;
        expired
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(memory_bytes: u64) -> SimState {
        SimState::new(SimConfig {
            memory_bytes,
            ..SimConfig::default()
        })
    }

    fn load(state: &mut SimState, key: &str, jit: bool) -> Result<String, ApiError> {
        let ticket = state.begin_load(key, LoadSettings::default(), jit)?;
        Ok(state.finish_load(ticket, Instant::now()))
    }

    #[test]
    fn a_second_load_of_a_key_makes_key_2_and_ids_are_reused_after_unload() {
        let mut s = state(u64::MAX);
        assert_eq!(
            load(&mut s, "qwen/qwen3-4b", false).unwrap(),
            "qwen/qwen3-4b"
        );
        assert_eq!(
            load(&mut s, "qwen/qwen3-4b", false).unwrap(),
            "qwen/qwen3-4b:2"
        );
        assert_eq!(
            load(&mut s, "qwen/qwen3-4b", false).unwrap(),
            "qwen/qwen3-4b:3"
        );
        s.unload("qwen/qwen3-4b:2").unwrap();
        assert_eq!(
            load(&mut s, "qwen/qwen3-4b", false).unwrap(),
            "qwen/qwen3-4b:2"
        );
    }

    #[test]
    fn loads_fail_when_memory_is_full_and_reservations_count() {
        let mut s = state(5_000_000_000);
        let ticket = s
            .begin_load("qwen/qwen3-4b", LoadSettings::default(), false)
            .unwrap();
        // 2.5 GB reserved, not yet loaded: a 3.3 GB model must not fit.
        let err = s
            .begin_load("qwen/qwen3-vl-4b", LoadSettings::default(), false)
            .unwrap_err();
        assert!(err.message.contains("insufficient system resources"));
        s.finish_load(ticket, Instant::now());
        assert_eq!(s.used_bytes(), 2_500_000_000);
        assert_eq!(s.peak_bytes, 2_500_000_000);
    }

    #[test]
    fn jit_loads_evict_the_previous_idle_jit_instance_only() {
        let mut s = state(u64::MAX);
        load(&mut s, "ibm/granite-4-micro", false).unwrap();
        load(&mut s, "qwen/qwen3-4b", true).unwrap();
        load(&mut s, "qwen/qwen3-vl-4b", true).unwrap();
        let ids: Vec<&str> = s.instances.iter().map(|i| i.id.as_str()).collect();
        assert_eq!(ids, ["ibm/granite-4-micro", "qwen/qwen3-vl-4b"]);
    }

    #[test]
    fn only_idle_jit_instances_expire() {
        let mut s = state(u64::MAX);
        s.config.jit_ttl = Duration::from_secs(10);
        s.config.auto_evict = false;
        let start = Instant::now();
        load(&mut s, "ibm/granite-4-micro", false).unwrap();
        load(&mut s, "qwen/qwen3-4b", true).unwrap();
        load(&mut s, "qwen/qwen3-vl-4b", true).unwrap();
        s.instance_mut("qwen/qwen3-vl-4b").unwrap().in_flight = 1;
        let later = start + Duration::from_secs(11);
        assert_eq!(s.expire_idle(later), vec!["qwen/qwen3-4b".to_string()]);
        assert_eq!(s.instances.len(), 2);
    }

    #[test]
    fn chat_targets() {
        let mut s = state(u64::MAX);
        assert!(matches!(
            s.chat_target("qwen/qwen3-4b"),
            Ok(ChatTarget::NeedsLoad(_))
        ));
        assert_eq!(s.chat_target("nope").err().unwrap().status, 404);
        assert_eq!(
            s.chat_target("text-embedding-nomic-embed-text-v1.5")
                .err()
                .unwrap()
                .status,
            400
        );
        load(&mut s, "qwen/qwen3-4b", false).unwrap();
        load(&mut s, "qwen/qwen3-4b", false).unwrap();
        assert!(
            matches!(s.chat_target("qwen/qwen3-4b:2"), Ok(ChatTarget::Loaded(id)) if id == "qwen/qwen3-4b:2")
        );
        assert!(
            matches!(s.chat_target("qwen/qwen3-4b"), Ok(ChatTarget::Loaded(id)) if id == "qwen/qwen3-4b")
        );
    }
}
