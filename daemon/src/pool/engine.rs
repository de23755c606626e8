//! What the pool asks of the engine — its catalogue, loads, unloads — behind a small interface,
//! so that tests can drive the actor with a fake engine and a paused clock.

use futures_util::future::BoxFuture;

use crate::backend::{Backend, BackendError, LoadBody, LoadReply, Model};

/// The engine as the pool sees it. Calls are rare beside chats (reads, loads, unloads), so a
/// boxed future per call costs nothing that matters.
pub trait Engine: Send + Sync + std::fmt::Debug + 'static {
    /// The catalogue with each model's loaded instances.
    fn models(&self) -> BoxFuture<'_, Result<Vec<Model>, BackendError>>;
    /// Loads an instance; returns once it can serve.
    fn load<'a>(&'a self, body: &'a LoadBody) -> BoxFuture<'a, Result<LoadReply, BackendError>>;
    /// Unloads one instance, by an id from `loaded_instances`.
    fn unload<'a>(&'a self, instance_id: &'a str) -> BoxFuture<'a, Result<(), BackendError>>;
    /// Where it is, for messages.
    fn url(&self) -> &str;
    /// Whether a load may name a context length (llama-server takes it from its presets).
    fn takes_load_settings(&self) -> bool;
}

impl Engine for Backend {
    fn models(&self) -> BoxFuture<'_, Result<Vec<Model>, BackendError>> {
        Box::pin(Backend::models(self))
    }

    fn load<'a>(&'a self, body: &'a LoadBody) -> BoxFuture<'a, Result<LoadReply, BackendError>> {
        Box::pin(Backend::load(self, body))
    }

    fn unload<'a>(&'a self, instance_id: &'a str) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(Backend::unload(self, instance_id))
    }

    fn url(&self) -> &str {
        Backend::url(self)
    }

    fn takes_load_settings(&self) -> bool {
        self.accept_load_settings(true).is_ok()
    }
}
