//! An engine in memory, for the pool's unit tests and the benchmark's replays: a catalogue of
//! models with sizes and load times, loads that take their time on tokio's clock (so a paused
//! clock replays hours in moments), ids as LM Studio gives them (`key`, `key:2`, …), and the
//! faults the pool must survive (unreachable, a lost load reply).

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::future::BoxFuture;

use super::engine::Engine;
use crate::backend::lmstudio::LoadConfigEcho;
use crate::backend::{
    BackendError, InstanceConfig, LoadBody, LoadReply, LoadedInstance, Model, ModelType,
};

/// A model the engine has.
#[derive(Debug, Clone)]
pub struct MemoryModel {
    pub key: String,
    pub size_bytes: u64,
    pub load_time: Duration,
}

#[derive(Debug, Clone)]
struct Loaded {
    id: String,
    key: String,
    context_length: u32,
}

/// What the engine did, for tests and the benchmark to read.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MemoryStats {
    pub loads: u64,
    pub unloads: u64,
    /// Time spent loading, over all loads.
    pub load_time: Duration,
}

#[derive(Debug)]
struct State {
    catalogue: Vec<MemoryModel>,
    loaded: Vec<Loaded>,
    stats: MemoryStats,
    reachable: bool,
    /// The next load happens, but its reply is lost this long after it.
    lose_next_reply: Option<Duration>,
}

/// The engine; clones share it.
#[derive(Debug, Clone)]
pub struct MemoryEngine {
    state: Arc<Mutex<State>>,
    /// Slots each instance reports.
    parallel: u32,
}

impl MemoryEngine {
    pub fn new(catalogue: Vec<MemoryModel>, parallel: u32) -> Self {
        MemoryEngine {
            state: Arc::new(Mutex::new(State {
                catalogue,
                loaded: Vec::new(),
                stats: MemoryStats::default(),
                reachable: true,
                lose_next_reply: None,
            })),
            parallel,
        }
    }

    // Plain data behind the lock, never held across an await: a poisoned lock is still usable.
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Loads `key` as another client would; returns the instance id.
    pub fn load_outside(&self, key: &str, context_length: u32) -> String {
        let mut state = self.state();
        let taken = |id: &str| state.loaded.iter().any(|i| i.id == id);
        let id = if taken(key) {
            (2u32..)
                .map(|n| format!("{key}:{n}"))
                .find(|id| !taken(id))
                .unwrap_or_default()
        } else {
            key.to_owned()
        };
        state.loaded.push(Loaded {
            id: id.clone(),
            key: key.to_owned(),
            context_length,
        });
        id
    }

    /// Ids of the loaded instances, in load order.
    pub fn loaded(&self) -> Vec<String> {
        self.state().loaded.iter().map(|i| i.id.clone()).collect()
    }

    /// Context lengths of the loaded instances, in load order.
    pub fn contexts(&self) -> Vec<u32> {
        self.state()
            .loaded
            .iter()
            .map(|i| i.context_length)
            .collect()
    }

    pub fn stats(&self) -> MemoryStats {
        self.state().stats
    }

    /// Goes away (every call refused) or comes back.
    pub fn set_reachable(&self, reachable: bool) {
        self.state().reachable = reachable;
    }

    /// The next load happens, then its reply is lost `after` it.
    pub fn lose_next_reply(&self, after: Duration) {
        self.state().lose_next_reply = Some(after);
    }

    fn refused(&self) -> Option<BackendError> {
        (!self.state().reachable).then(|| BackendError::Unreachable {
            url: "memory".into(),
            detail: "Connection refused".into(),
        })
    }
}

impl Engine for MemoryEngine {
    fn models(&self) -> BoxFuture<'_, Result<Vec<Model>, BackendError>> {
        Box::pin(async move {
            if let Some(refused) = self.refused() {
                return Err(refused);
            }
            let state = self.state();
            Ok(state
                .catalogue
                .iter()
                .map(|model| Model {
                    kind: ModelType::Llm,
                    key: model.key.clone(),
                    display_name: None,
                    size_bytes: model.size_bytes,
                    params_string: None,
                    loaded_instances: state
                        .loaded
                        .iter()
                        .filter(|i| i.key == model.key)
                        .map(|i| LoadedInstance {
                            id: i.id.clone(),
                            config: InstanceConfig {
                                context_length: i.context_length,
                                parallel: Some(self.parallel),
                            },
                        })
                        .collect(),
                    max_context_length: Some(131_072),
                    capabilities: None,
                })
                .collect())
        })
    }

    fn load<'a>(&'a self, body: &'a LoadBody) -> BoxFuture<'a, Result<LoadReply, BackendError>> {
        Box::pin(async move {
            if let Some(refused) = self.refused() {
                return Err(refused);
            }
            let load_time = self
                .state()
                .catalogue
                .iter()
                .find(|m| m.key == body.model)
                .map(|m| m.load_time)
                .ok_or_else(|| BackendError::ModelNotFound {
                    message: format!("no model {:?}", body.model),
                })?;
            tokio::time::sleep(load_time).await;
            let context_length = body.settings.context_length.unwrap_or(4096);
            let id = self.load_outside(&body.model, context_length);
            let lost = {
                let mut state = self.state();
                state.stats.loads += 1;
                state.stats.load_time += load_time;
                state.lose_next_reply.take()
            };
            if let Some(after) = lost {
                tokio::time::sleep(after).await;
                return Err(BackendError::ReplyLost {
                    url: "memory".into(),
                    detail: "connection closed before message completed".into(),
                });
            }
            Ok(LoadReply {
                instance_id: id,
                load_time_seconds: load_time.as_secs_f64(),
                load_config: Some(LoadConfigEcho {
                    context_length: Some(context_length),
                }),
            })
        })
    }

    fn unload<'a>(&'a self, instance_id: &'a str) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move {
            if let Some(refused) = self.refused() {
                return Err(refused);
            }
            let mut state = self.state();
            state.loaded.retain(|i| i.id != instance_id);
            state.stats.unloads += 1;
            Ok(())
        })
    }

    fn url(&self) -> &str {
        "memory"
    }

    fn takes_load_settings(&self) -> bool {
        true
    }
}
