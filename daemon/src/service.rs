//! Service glue: where the config comes from, live reloads (SIGHUP and `lmsd-ctl reload`), and
//! systemd notifications.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use lmsd_proto::{InstanceState, ReloadOutcome};
use serde_json::Value;

use crate::config::{Config, ConfigError};
use crate::logging::LevelSetter;
use crate::pool::{PoolHandle, PoolSettings};

/// Where the config comes from: a file (or the defaults), with command-line overrides on top.
#[derive(Debug, Clone, Default)]
pub struct ConfigSource {
    pub path: Option<PathBuf>,
    pub socket: Option<PathBuf>,
    pub lmstudio_url: Option<String>,
}

impl ConfigSource {
    pub fn load(&self) -> Result<Config, ConfigError> {
        let mut config = match &self.path {
            Some(path) => Config::load(path)?,
            None => Config::default(),
        };
        if let Some(socket) = &self.socket {
            config.server.socket = Some(socket.clone());
        }
        if let Some(url) = &self.lmstudio_url {
            config.backend.kind = crate::config::EngineKind::Lmstudio;
            config.lmstudio.url = url.clone();
        }
        config.validate()?;
        Ok(config)
    }
}

/// Settings a reload applies live; every other change waits for a restart.
const LIVE: [&str; 8] = [
    "pool.",
    "models",
    "tasks.",
    "routing.",
    "savings.",
    "log.level",
    "lmstudio.poll_interval",
    "llama_server.poll_interval",
];

/// Flattens a config into `section.key` → value, to name what changed.
fn flatten(config: &Config) -> BTreeMap<String, Value> {
    fn walk(prefix: &str, value: Value, out: &mut BTreeMap<String, Value>) {
        match value {
            Value::Object(map) if !map.is_empty() => {
                for (key, value) in map {
                    let name = if prefix.is_empty() {
                        key
                    } else {
                        format!("{prefix}.{key}")
                    };
                    walk(&name, value, out);
                }
            }
            other => {
                out.insert(prefix.to_owned(), other);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(
        "",
        serde_json::to_value(config).unwrap_or(Value::Null),
        &mut out,
    );
    out
}

/// The settings whose values differ between two configs, split into (live, needs restart).
pub fn changes(old: &Config, new: &Config) -> (Vec<String>, Vec<String>) {
    let (old, new) = (flatten(old), flatten(new));
    let keys: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    keys.into_iter()
        .filter(|key| old.get(*key) != new.get(*key))
        .cloned()
        .partition(|key| LIVE.iter().any(|live| key.starts_with(live)))
}

/// Re-reads the config and applies what can change live. Reloads run one at a time.
pub struct Reloader {
    source: ConfigSource,
    published: tokio::sync::watch::Sender<std::sync::Arc<Config>>,
    // Held across the pool's reconfigure so two reloads never interleave; nothing else locks it.
    running: tokio::sync::Mutex<Config>,
    pool: PoolHandle,
    log_level: Option<LevelSetter>,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl Reloader {
    pub fn new(
        source: ConfigSource,
        running: Config,
        pool: PoolHandle,
        log_level: Option<LevelSetter>,
    ) -> Self {
        Reloader {
            source,
            published: tokio::sync::watch::Sender::new(std::sync::Arc::new(running.clone())),
            running: tokio::sync::Mutex::new(running),
            pool,
            log_level,
        }
    }

    /// The config in force (live changes applied).
    pub async fn running(&self) -> Config {
        self.running.lock().await.clone()
    }

    /// Follows the config in force, without waiting on a reload in progress.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<std::sync::Arc<Config>> {
        self.published.subscribe()
    }

    /// Applies the config file's live settings; an invalid file changes nothing.
    pub async fn reload(&self) -> Result<ReloadOutcome, String> {
        let reject =
            |e: &dyn std::fmt::Display| format!("config rejected, the running config stays: {e}");
        let new = self.source.load().map_err(|e| reject(&e))?;
        let mut running = self.running.lock().await;
        let (applied, needs_restart) = changes(&running, &new);
        let settings = PoolSettings::from_config(&new).map_err(|e| reject(&e))?;
        self.pool
            .reconfigure(settings)
            .await
            .map_err(|e| reject(&e))?;
        if running.log.level != new.log.level {
            if let Some(set_level) = &self.log_level {
                if let Err(e) = set_level(&new.log.level) {
                    tracing::warn!(level = %new.log.level, "log level not changed: {e}");
                }
            }
        }
        running.pool = new.pool;
        running.models = new.models;
        running.tasks = new.tasks;
        running.routing = new.routing;
        running.savings = new.savings;
        running.log.level = new.log.level;
        running.lmstudio.poll_interval = new.lmstudio.poll_interval;
        running.llama_server.poll_interval = new.llama_server.poll_interval;
        self.published
            .send_replace(std::sync::Arc::new(running.clone()));
        tracing::info!(?applied, ?needs_restart, "config reloaded");
        Ok(ReloadOutcome {
            path: self.source.path.as_deref().map(|p| p.display().to_string()),
            applied,
            needs_restart,
        })
    }
}

/// A config file that holds the token must not be readable by others.
pub fn warn_if_token_exposed(path: Option<&Path>, config: &Config) {
    use std::os::unix::fs::PermissionsExt;
    let readable_by_others =
        |p: &Path| std::fs::metadata(p).is_ok_and(|m| m.permissions().mode() & 0o044 != 0);
    let sections = [
        (&config.lmstudio.token, &config.lmstudio.token_file),
        (&config.llama_server.token, &config.llama_server.token_file),
    ];
    for (token, token_file) in sections {
        if let (Some(path), Some(_)) = (path, token) {
            if readable_by_others(path) {
                tracing::warn!(file = %path.display(), "the config file holds an API token and others can read it: chmod 600 it");
            }
        }
        if let Some(token_file) = token_file {
            if readable_by_others(token_file) {
                tracing::warn!(file = %token_file.display(), "the token file can be read by others: chmod 600 it");
            }
        }
    }
}

/// Tells systemd (when it started us with `Type=notify`) how things stand; a no-op elsewhere.
pub fn notify(state: &[sd_notify::NotifyState]) {
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        if let Err(error) = sd_notify::notify(state) {
            tracing::debug!(%error, "systemd notification failed");
        }
    }
}

/// Keeps systemd's one-line STATUS current: instances, busy ones, memory.
pub async fn report_status(pool: PoolHandle) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tick.tick().await;
        let Ok(status) = pool.status().await else {
            return;
        };
        let busy = status
            .instances
            .iter()
            .filter(|i| i.state == InstanceState::Busy)
            .count();
        let line = format!(
            "{} instances ({busy} busy), {:.1} of {:.1} GB, LM Studio {}",
            status.instances.len(),
            status.memory.used_bytes as f64 / 1e9,
            status.memory.budget_bytes as f64 / 1e9,
            if status.reachable {
                "reachable"
            } else {
                "unreachable"
            }
        );
        notify(&[sd_notify::NotifyState::Status(&line)]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_are_split_into_live_and_restart() {
        let old = Config::default();
        let mut new = Config::default();
        new.pool.idle_ttl = lmsd_proto::Ttl::Never;
        new.log.level = "debug".into();
        new.server.max_connections = 7;
        new.lmstudio.token = Some("secret".into());
        let (live, restart) = changes(&old, &new);
        assert_eq!(live, ["log.level", "pool.idle_ttl"]);
        assert_eq!(restart, ["lmstudio.token", "server.max_connections"]);
    }
}
