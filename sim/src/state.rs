//! The simulator's state: loaded instances, memory accounting, stored responses, faults.
//! Plain data and synchronous methods; the HTTP layer in `api` does the waiting.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::catalogue::{SimFormat, SimModel, SimModelKind};
use crate::errors::{ApiError, NO_MODELS_LOADED};
use crate::faults::FaultRule;
use crate::SimConfig;

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
    /// Unique for the simulator's life, unlike `id`, which a later load may reuse: in-flight
    /// requests hold on to this.
    pub serial: u64,
    pub id: String,
    pub key: String,
    pub kind: SimModelKind,
    pub format: SimFormat,
    pub size_bytes: u64,
    pub settings: LoadSettings,
    pub context_length: u32,
    /// Loaded just in time by a chat (subject to JIT TTL and auto-evict), not by an explicit load.
    pub jit: bool,
    pub ttl: Option<Duration>,
    pub last_used: Instant,
    pub in_flight: u32,
    /// Embedding instances serve one request at a time (#1152, #1487): held while serving.
    pub serve_lock: Arc<tokio::sync::Mutex<()>>,
}

/// Memory reserved for a load in progress; turned into an instance by `finish_load`.
#[derive(Debug)]
pub(crate) struct LoadTicket {
    pub key: String,
    pub size_bytes: u64,
    pub settings: LoadSettings,
    pub jit: bool,
    /// The context the engine settles on whatever was asked (an injected MLX auto-fit).
    pub context_override: Option<u32>,
    /// The `SimState::generation` it was reserved in: a load that outlives a restart is dropped.
    generation: u64,
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
    /// Load requests received, counted before any injected fault.
    pub load_requests: u64,
    pub jit_loads: u64,
    pub unloads: u64,
    /// Chats that got as far as generating (one that crashes or is cut off later still counts).
    pub chats: u64,
    /// Chat requests received, counted before any injected fault or delay.
    pub chat_requests: u64,
    /// Chats answered on `/v1/chat/completions`.
    pub completions: u64,
    /// Of those, the ones asked at temperature 0.
    pub cold_completions: u64,
    /// Requests answered on `/v1/responses`.
    pub responses: u64,
    /// Requests answered on `/v1/messages`.
    pub messages: u64,
    /// Embedding requests answered.
    pub embeddings: u64,
    /// The most requests any one instance had at the same moment, counted from their arrival
    /// (embeddings waiting for their turn on a busy instance count).
    pub max_in_flight: u32,
    /// Instances that crashed: a second concurrent chat on an MLX instance, or `Fault::Crash`.
    pub crashes: u64,
    /// Chat responses stored (every chat without `store:false`).
    pub stored_responses: u64,
    /// Requests answered by closing their reused connection unwritten (`Fault::CloseReused`).
    pub closed_reused: u64,
}

pub(crate) const DEFAULT_CONTEXT_LENGTH: u32 = 4096;
/// llama.cpp's "Max Concurrent Predictions" for JIT and API loads (#2061); MLX runs one (#2191).
pub(crate) const GGUF_PARALLEL: u32 = 4;
pub(crate) const MLX_PARALLEL: u32 = 1;

#[derive(Debug)]
pub(crate) struct SimState {
    pub config: SimConfig,
    pub instances: Vec<Instance>,
    pub reserved_bytes: u64,
    pub peak_bytes: u64,
    pub responses: HashMap<String, StoredResponse>,
    pub faults: Vec<FaultRule>,
    pub stats: SimStats,
    /// Serials of instances that crashed, so that requests still running on them fail too.
    pub crashed: HashSet<u64>,
    /// Bumped when LM Studio quits: loads begun before belong to a process that is gone.
    pub generation: u64,
    next_serial: u64,
}

/// What a chat or embeddings request runs on.
#[derive(Debug, PartialEq)]
pub(crate) enum Target {
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
            crashed: HashSet::new(),
            generation: 0,
            next_serial: 0,
        }
    }

    pub fn model(&self, key: &str) -> Option<&SimModel> {
        self.config.catalogue.iter().find(|m| m.key == key)
    }

    pub fn used_bytes(&self) -> u64 {
        self.instances.iter().map(|i| i.size_bytes).sum::<u64>() + self.reserved_bytes
    }

    pub fn instance(&self, id: &str) -> Option<&Instance> {
        self.instances.iter().find(|i| i.id == id)
    }

    pub fn instance_mut(&mut self, id: &str) -> Option<&mut Instance> {
        self.instances.iter_mut().find(|i| i.id == id)
    }

    pub fn instance_by_serial_mut(&mut self, serial: u64) -> Option<&mut Instance> {
        self.instances.iter_mut().find(|i| i.serial == serial)
    }

    /// `key`, then `key:2`, `key:3`, …: the first id not taken, as LM Studio names instances.
    pub fn next_instance_id(&self, key: &str) -> String {
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
            return Err(ApiError::new(
                500,
                "internal_error",
                format!(
                    "Failed to load model \"{key}\". Error: Model loading was stopped due to insufficient system resources: it needs {} bytes and {} of {} are free.",
                    model.size_bytes,
                    self.config.memory_bytes.saturating_sub(used),
                    self.config.memory_bytes
                ),
            ));
        }
        self.reserved_bytes += model.size_bytes;
        self.peak_bytes = self.peak_bytes.max(self.used_bytes());
        Ok(LoadTicket {
            key: key.to_owned(),
            size_bytes: model.size_bytes,
            settings,
            jit,
            context_override: None,
            generation: self.generation,
        })
    }

    /// Gives back a reservation for a load that did not happen.
    pub fn cancel_load(&mut self, ticket: LoadTicket) {
        if ticket.generation == self.generation {
            self.reserved_bytes = self.reserved_bytes.saturating_sub(ticket.size_bytes);
        }
    }

    /// Turns a reservation into a loaded instance and returns its id; a load begun before LM
    /// Studio quit comes to nothing.
    pub fn finish_load(&mut self, ticket: LoadTicket, now: Instant) -> Result<String, ApiError> {
        if ticket.generation != self.generation {
            return Err(ApiError::load_failed());
        }
        self.reserved_bytes = self.reserved_bytes.saturating_sub(ticket.size_bytes);
        let (kind, format) = self
            .model(&ticket.key)
            .map_or((SimModelKind::Llm, SimFormat::Gguf), |m| (m.kind, m.format));
        let id = self.next_instance_id(&ticket.key);
        let context_length = ticket
            .context_override
            .or(ticket.settings.context_length)
            .unwrap_or(DEFAULT_CONTEXT_LENGTH);
        self.next_serial += 1;
        self.instances.push(Instance {
            serial: self.next_serial,
            id: id.clone(),
            key: ticket.key,
            kind,
            format,
            size_bytes: ticket.size_bytes,
            settings: ticket.settings,
            context_length,
            jit: ticket.jit,
            ttl: ticket.jit.then_some(self.config.jit_ttl),
            last_used: now,
            in_flight: 0,
            serve_lock: Arc::default(),
        });
        self.stats.loads += 1;
        if ticket.jit {
            self.stats.jit_loads += 1;
        }
        Ok(id)
    }

    /// Removes an instance without an unload request (outside unload, auto-evict, crash).
    pub fn remove_instance(&mut self, instance_id: &str) -> Option<Instance> {
        let index = self.instances.iter().position(|i| i.id == instance_id)?;
        Some(self.instances.remove(index))
    }

    /// The instance dies: it is removed, and requests still running on it fail.
    pub fn crash(&mut self, instance_id: &str) {
        if let Some(instance) = self.remove_instance(instance_id) {
            self.crashed.insert(instance.serial);
            self.stats.crashes += 1;
            tracing::info!(instance = %instance_id, "simulator: instance crashed");
        }
    }

    pub fn store_response(&mut self, response_id: String, response: StoredResponse) {
        self.responses.insert(response_id, response);
        self.stats.stored_responses += 1;
    }

    /// LM Studio quits: everything in its memory is gone; catalogue, config, faults and stats
    /// belong to the test and stay.
    pub fn go_down(&mut self) {
        self.instances.clear();
        self.reserved_bytes = 0;
        self.responses.clear();
        self.crashed.clear();
        self.generation += 1;
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

    /// What a chat naming `model` (an instance id or a key) runs on: an instance id reaches that
    /// instance, a bare key the oldest instance of the model.
    pub fn chat_target(&self, model: &str) -> Result<Target, ApiError> {
        if let Some(instance) = self.instances.iter().find(|i| i.id == model) {
            return Ok(Target::Loaded(instance.id.clone()));
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
            Some(instance) => Ok(Target::Loaded(instance.id.clone())),
            None if self.config.jit => Ok(Target::NeedsLoad(model.to_owned())),
            None => Err(ApiError::invalid_request(NO_MODELS_LOADED)),
        }
    }

    /// What `/v1/embeddings` naming `model` runs on. A loaded instance or the key of a loaded
    /// model is served by it; an embedding model's key is JIT-loaded; anything else (a gone
    /// `key:2`, a key with JIT off, an unknown name) is served by the first loaded embedding
    /// instance, as LM Studio's compatible endpoints do (hermes-agent PR #64742, 0.4.19).
    pub fn embedding_target(&self, model: &str) -> Result<Target, ApiError> {
        let not_embedding =
            || ApiError::invalid_request(format!("\"{model}\" is not an embedding model"));
        let named = self
            .instances
            .iter()
            .find(|i| i.id == model)
            .or_else(|| self.instances.iter().find(|i| i.key == model));
        if let Some(instance) = named {
            return match instance.kind {
                SimModelKind::Llm => Err(not_embedding()),
                SimModelKind::Embedding => Ok(Target::Loaded(instance.id.clone())),
            };
        }
        match self.model(model).map(|m| m.kind) {
            Some(SimModelKind::Llm) => return Err(not_embedding()),
            Some(SimModelKind::Embedding) if self.config.jit => {
                return Ok(Target::NeedsLoad(model.to_owned()))
            }
            _ => {}
        }
        self.instances
            .iter()
            .find(|i| i.kind == SimModelKind::Embedding)
            .map(|i| Target::Loaded(i.id.clone()))
            .ok_or_else(|| ApiError::invalid_request(NO_MODELS_LOADED))
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
        state.finish_load(ticket, Instant::now())
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
        s.finish_load(ticket, Instant::now()).unwrap();
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
            Ok(Target::NeedsLoad(_))
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
            matches!(s.chat_target("qwen/qwen3-4b:2"), Ok(Target::Loaded(id)) if id == "qwen/qwen3-4b:2")
        );
        assert!(
            matches!(s.chat_target("qwen/qwen3-4b"), Ok(Target::Loaded(id)) if id == "qwen/qwen3-4b")
        );
    }

    const NOMIC: &str = "text-embedding-nomic-embed-text-v1.5";

    #[test]
    fn embedding_targets_jit_load_keys_and_fall_back_to_a_loaded_instance() {
        let mut s = state(u64::MAX);
        let loaded = |id: &str| Ok(Target::Loaded(id.to_owned()));
        assert_eq!(
            s.embedding_target(NOMIC),
            Ok(Target::NeedsLoad(NOMIC.into()))
        );
        let none = s.embedding_target(&format!("{NOMIC}:2")).unwrap_err();
        assert_eq!(
            (none.status, none.message.as_str()),
            (400, NO_MODELS_LOADED)
        );
        assert_eq!(s.embedding_target("qwen/qwen3-4b").unwrap_err().status, 400);
        load(&mut s, NOMIC, false).unwrap();
        load(&mut s, "qwen/qwen3-4b", false).unwrap();
        assert_eq!(s.embedding_target(NOMIC), loaded(NOMIC));
        // A gone instance id, or a name LM Studio does not know: the loaded one answers.
        assert_eq!(s.embedding_target(&format!("{NOMIC}:2")), loaded(NOMIC));
        assert_eq!(s.embedding_target("no/such-model"), loaded(NOMIC));
        assert_eq!(s.embedding_target("qwen/qwen3-4b").unwrap_err().status, 400);
        s.remove_instance(NOMIC);
        s.config.jit = false;
        let none = s.embedding_target(NOMIC).unwrap_err();
        assert_eq!(none.message, NO_MODELS_LOADED);
    }

    #[test]
    fn a_crash_removes_the_instance_and_marks_it_and_going_down_forgets_everything() {
        let mut s = state(u64::MAX);
        load(&mut s, "qwen/qwen3-4b", false).unwrap();
        let serial = s.instances[0].serial;
        s.crash("qwen/qwen3-4b");
        assert!(s.instances.is_empty() && s.crashed.contains(&serial));
        assert_eq!(s.stats.crashes, 1);
        // A reload reuses the id, not the serial.
        load(&mut s, "qwen/qwen3-4b", false).unwrap();
        assert_ne!(s.instances[0].serial, serial);

        let pending = s
            .begin_load("ibm/granite-4-micro", LoadSettings::default(), false)
            .unwrap();
        s.go_down();
        assert_eq!((s.instances.len(), s.reserved_bytes), (0, 0));
        // A load that was under way when LM Studio quit never appears, and frees nothing twice.
        assert!(s.finish_load(pending, Instant::now()).is_err());
        assert_eq!((s.instances.len(), s.reserved_bytes), (0, 0));
        assert_eq!(s.stats.loads, 2);
    }

    #[test]
    fn an_auto_fit_context_replaces_the_asked_one() {
        let mut s = state(u64::MAX);
        let settings = LoadSettings {
            context_length: Some(8192),
            ..LoadSettings::default()
        };
        let mut ticket = s.begin_load("qwen/qwen3-4b", settings, false).unwrap();
        ticket.context_override = Some(40192);
        let id = s.finish_load(ticket, Instant::now()).unwrap();
        assert_eq!(s.instance(&id).map(|i| i.context_length), Some(40192));
    }
}
