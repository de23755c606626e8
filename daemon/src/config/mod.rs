//! The daemon's configuration: TOML structs with defaults, strict about unknown keys. The
//! engines' sections are in `engine`, sizes and memory budgets in `sizes`.

mod engine;
mod sizes;

pub use engine::*;
pub use sizes::*;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use lmsd_proto::{LoadSettings, Ttl};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub backend: BackendConfig,
    pub lmstudio: LmStudioConfig,
    pub llama_server: LlamaServerConfig,
    pub pool: PoolConfig,
    /// Per-model settings, keyed by model key: `[models."qwen/qwen3-4b"]`.
    pub models: BTreeMap<String, ModelConfig>,
    pub tasks: TasksConfig,
    pub routing: RoutingConfig,
    pub log: LogConfig,
    pub http: HttpConfig,
    pub savings: SavingsConfig,
    pub batch: BatchConfig,
}

/// `[batch]`: how batch jobs run and how long they are kept.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    /// Lines of one job in lmsd's queue at once: a job never fills `max_queue` or starves
    /// other work.
    pub concurrency: u32,
    /// A finished or cancelled job (its inputs and results) is deleted this long after.
    #[serde(with = "humantime_serde")]
    pub keep: Duration,
    /// `warm`: lines of loaded models first, one swap per model; `file`: the file's order.
    pub order: BatchOrder,
}

/// `[batch] order`: which lines of a job run first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchOrder {
    /// Lines of models in use or loaded first; then the model with the most lines left.
    #[default]
    Warm,
    /// The file's order, whatever it costs in loads.
    File,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            concurrency: 4,
            keep: Duration::from_secs(7 * 24 * 3600),
            order: BatchOrder::Warm,
        }
    }
}

/// `[savings]`: the paid prices lmsd's tasks are counted against.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SavingsConfig {
    /// USD per million input tokens of the paid model tasks would otherwise go to.
    pub input_usd_per_mtok: f64,
    /// USD per million output tokens.
    pub output_usd_per_mtok: f64,
    /// The ledger file is rotated past this size.
    pub ledger_max: ByteCount,
}

impl Default for SavingsConfig {
    /// Prices of a mid-range paid model (3 USD in, 15 USD out per million tokens).
    fn default() -> Self {
        SavingsConfig {
            input_usd_per_mtok: 3.0,
            output_usd_per_mtok: 15.0,
            ledger_max: ByteCount(16 << 20),
        }
    }
}

/// `[http]`: the OpenAI-compatible front door, off unless `listen` is set.
#[derive(Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address to serve on, e.g. `"127.0.0.1:1235"`.
    pub listen: Option<std::net::SocketAddr>,
    /// Bearer keys accepted; required when `listen` is not a loopback address.
    pub api_keys: Vec<String>,
}

// Keys are secrets: never in a Debug print.
impl std::fmt::Debug for HttpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpConfig")
            .field("listen", &self.listen)
            .field("api_keys", &format!("<{} redacted>", self.api_keys.len()))
            .finish()
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Directory of the daily log files; default `$LOGS_DIRECTORY` (systemd), else
    /// `$XDG_STATE_HOME/lmsd/logs`.
    pub dir: Option<PathBuf>,
    /// A tracing filter: `info`, `debug`, `lmsd=debug,info`. `RUST_LOG` overrides it.
    pub level: String,
    /// Daily files kept; older ones are deleted.
    pub keep_files: usize,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            dir: None,
            level: "info".into(),
            keep_files: 7,
        }
    }
}

impl LogConfig {
    pub fn dir(&self) -> Option<PathBuf> {
        self.dir.clone().or_else(lmsd_proto::paths::default_log_dir)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// `"75%"` of physical memory, or a size such as `"24GiB"`.
    pub memory_budget: MemoryBudget,
    /// Idle TTL of instances lmsd loads: `"15m"`, `"0"` (unload when idle) or `"never"`.
    pub idle_ttl: Ttl,
    /// Memory counted per instance on top of its file size (KV cache, runtime).
    pub instance_overhead: ByteCount,
    /// May lmsd evict and expire instances loaded outside it (LM Studio's GUI, `lms load`)?
    pub manage_external: bool,
    /// On stop, unload the unpinned instances lmsd loaded.
    pub unload_on_exit: bool,
    /// After a task ends its instance is not evicted for this long, so an agent's next call
    /// (after a tool step) finds it warm — unless a task has waited longer than `max_wait`.
    #[serde(with = "humantime_serde")]
    pub turn_hold: Duration,
    /// Instances per model. Above 1, a model whose slots are all busy gets another instance
    /// when it fits without evicting anything.
    pub max_instances: usize,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            memory_budget: MemoryBudget::Percent(75.0),
            idle_ttl: Ttl::After(Duration::from_secs(15 * 60)),
            instance_overhead: ByteCount(0),
            manage_external: false,
            unload_on_exit: false,
            turn_hold: Duration::from_secs(10),
            max_instances: 1,
        }
    }
}

/// `[models."KEY"]`: how lmsd treats one model. The load settings are sent on every load.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Always resident: loaded at start, reloaded after an outside unload or a backend restart,
    /// never evicted or expired.
    pub pinned: bool,
    /// Loaded at start, but may be evicted and expire like any other.
    pub preload: bool,
    pub ttl: Option<Ttl>,
    /// Memory to count for this model instead of the size the engine reports (LM Studio's
    /// `size_bytes`; on llama-server the file's, or its child's resident memory).
    pub size: Option<ByteCount>,
    // LM Studio's load settings, spelt out rather than a flattened `LoadSettings`: TOML errors
    // inside a flattened struct lose their line.
    pub context_length: Option<u32>,
    pub eval_batch_size: Option<u32>,
    pub flash_attention: Option<bool>,
    pub num_experts: Option<u32>,
    pub offload_kv_cache_to_gpu: Option<bool>,
}

impl ModelConfig {
    /// What is sent with every load of this model.
    pub fn load_settings(&self) -> LoadSettings {
        LoadSettings {
            context_length: self.context_length,
            eval_batch_size: self.eval_batch_size,
            flash_attention: self.flash_attention,
            num_experts: self.num_experts,
            offload_kv_cache_to_gpu: self.offload_kv_cache_to_gpu,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TasksConfig {
    /// Tasks waiting at most; more get `queue_full`.
    pub max_queue: usize,
    /// After waiting this long, a task may make warm models give way (no more turn holds, busy
    /// instances drain); a load waiting for memory fails with `budget_exceeded` at its deadline.
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
    /// Tries on transient LM Studio errors (connection, timeout, 5xx, garbled replies).
    pub retries: u32,
    /// A task's deadline when it does not set `timeout`.
    #[serde(with = "humantime_serde")]
    pub default_timeout: Duration,
    /// While the engine cannot be reached (LM Studio restarting, say), a task waits this long
    /// for it, trying it with backoff, before it fails with `backend_unreachable`; never past
    /// its deadline. `"0"` fails at once.
    #[serde(with = "humantime_serde")]
    pub outage_wait: Duration,
}

impl Default for TasksConfig {
    fn default() -> Self {
        TasksConfig {
            max_queue: 1024,
            max_wait: Duration::from_secs(120),
            retries: 3,
            default_timeout: Duration::from_secs(600),
            outage_wait: Duration::from_secs(30),
        }
    }
}

/// `[routing]`: how `"model": "auto"` chooses.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// Models to prefer, in order, when no loaded or freely fitting model meets the needs.
    pub prefer: Vec<String>,
    /// For `auto` tasks with a contract: a model that kept fewer than this share (0 to 1) of
    /// its last 20 contracts (judged after 5) is tried last. Off when unset.
    pub min_pass_rate: Option<f64>,
    /// The front door's model names: a name or a glob (`"claude-haiku-*"`) → a model key or
    /// `"auto"`. Agents send the names of cloud models; these say which local model answers.
    pub aliases: std::collections::BTreeMap<String, String>,
}

impl RoutingConfig {
    /// The model a front-door name stands for: its exact alias, else the longest glob that
    /// matches it (the most specific), else none.
    pub fn alias_for(&self, name: &str) -> Option<&str> {
        if let Some(target) = self.aliases.get(name) {
            return Some(target);
        }
        self.aliases
            .iter()
            .filter(|(pattern, _)| glob::Pattern::new(pattern).is_ok_and(|p| p.matches(name)))
            .max_by_key(|(pattern, _)| pattern.len())
            .map(|(_, target)| target.as_str())
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Unix socket path; default `$XDG_RUNTIME_DIR/lmsd/lmsd.sock`.
    pub socket: Option<PathBuf>,
    /// How long in-flight requests may run on after a stop signal.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Connections served at once; more wait to be accepted.
    pub max_connections: usize,
    /// Where sessions are kept; default `$STATE_DIRECTORY` (systemd), else
    /// `$XDG_STATE_HOME/lmsd`.
    pub state_dir: Option<PathBuf>,
    /// A client that leaves a request line unfinished, or does not read its replies, this long
    /// is cut off.
    #[serde(with = "humantime_serde")]
    pub client_timeout: Duration,
    /// A connection with no task in flight and nothing received this long is closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Users served besides the daemon's own (by uid, checked on every connection).
    pub allow_uids: Vec<u32>,
    /// A group whose members are served too.
    pub allow_gid: Option<u32>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            socket: None,
            shutdown_grace: Duration::from_secs(30),
            max_connections: 1024,
            state_dir: None,
            client_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(600),
            allow_uids: Vec::new(),
            allow_gid: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config: {0}")]
    Invalid(String),
    #[error("cannot read token file {path}: {source}")]
    TokenFile {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            other => other,
        })
    }

    /// Parses TOML text; errors name the line and the offending key.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<text>"),
            message: e.to_string().trim_end().to_owned(),
        })?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.lmstudio.validate()?;
        self.llama_server.validate()?;
        if self.backend.kind == EngineKind::LlamaServer && self.pool.max_instances > 1 {
            return Err(ConfigError::Invalid(
                "[pool] max_instances above 1 needs LM Studio: llama-server runs one instance per model".into(),
            ));
        }
        if let Some(rate) = self.routing.min_pass_rate {
            if !(0.0..=1.0).contains(&rate) {
                return Err(ConfigError::Invalid(format!(
                    "[routing] min_pass_rate {rate} is not a share between 0 and 1 (0.8 for 80%)"
                )));
            }
        }
        if self.batch.concurrency == 0 {
            return Err(ConfigError::Invalid(
                "[batch] concurrency must be at least 1".into(),
            ));
        }
        for (pattern, target) in &self.routing.aliases {
            if let Err(error) = glob::Pattern::new(pattern) {
                return Err(ConfigError::Invalid(format!(
                    "[routing] aliases: {pattern:?} is not a name or glob: {error}"
                )));
            }
            if target.trim().is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "[routing] aliases: {pattern:?} maps to nothing; give a model key or \"auto\""
                )));
            }
        }
        if self.backend.kind == EngineKind::LlamaServer {
            // llama-server's router takes load settings from its preset file, not from a load.
            if let Some((key, _)) = self
                .models
                .iter()
                .find(|(_, m)| !m.load_settings().is_empty())
            {
                return Err(ConfigError::Invalid(format!(
                    "[models.{key:?}] has load settings, which llama-server does not take on a load: set them in its --models-preset file (for example `c = 8192`)"
                )));
            }
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level).map_err(|e| {
            ConfigError::Invalid(format!(
                "[log] level {:?} is not a log filter: {e}",
                self.log.level
            ))
        })?;
        if self.log.keep_files == 0 {
            return Err(ConfigError::Invalid(
                "[log] keep_files must be at least 1".into(),
            ));
        }
        if self.tasks.max_wait.is_zero() || self.tasks.default_timeout.is_zero() {
            return Err(ConfigError::Invalid(
                "[tasks] max_wait and default_timeout must be more than 0".into(),
            ));
        }
        if let Some(listen) = self.http.listen {
            if !listen.ip().is_loopback() && self.http.api_keys.is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "[http] listen = \"{listen}\" is reachable from other machines: set [http] api_keys too"
                )));
            }
        }
        if self.pool.max_instances == 0 {
            return Err(ConfigError::Invalid(
                "[pool] max_instances must be at least 1".into(),
            ));
        }
        if self.tasks.max_queue == 0 || self.tasks.retries == 0 {
            return Err(ConfigError::Invalid(
                "[tasks] max_queue and retries must be at least 1".into(),
            ));
        }
        if self.server.max_connections == 0 {
            return Err(ConfigError::Invalid(
                "[server] max_connections must be at least 1".into(),
            ));
        }
        Ok(())
    }

    /// The config as `--check-config` prints it: TOML, with the token hidden.
    pub fn to_redacted_toml(&self) -> String {
        let mut shown = self.clone();
        for token in [&mut shown.lmstudio.token, &mut shown.llama_server.token] {
            if token.is_some() {
                *token = Some("<redacted>".into());
            }
        }
        for key in &mut shown.http.api_keys {
            *key = "<redacted>".into();
        }
        toml::to_string(&shown).unwrap_or_else(|e| format!("# cannot show the config: {e}\n"))
    }

    /// The commented example config that `lmsd --print-default-config` writes.
    pub const EXAMPLE: &'static str = include_str!("../../lmsd.example.toml");

    /// A file in lmsd's state directory (`sessions.json`, `instances.json`).
    pub fn state_file(&self, name: &str) -> Option<PathBuf> {
        let dir = self
            .server
            .state_dir
            .clone()
            .or_else(lmsd_proto::paths::default_state_dir)?;
        Some(dir.join(name))
    }

    /// The socket path in effect.
    pub fn socket_path(&self) -> PathBuf {
        self.server
            .socket
            .clone()
            .unwrap_or_else(lmsd_proto::paths::default_socket_path)
    }

    /// How often the active engine's catalogue is re-read.
    pub fn poll_interval(&self) -> Duration {
        match self.backend.kind {
            EngineKind::Lmstudio => self.lmstudio.poll_interval,
            EngineKind::LlamaServer => self.llama_server.poll_interval,
        }
    }

    /// How long a load or chat may take on the configured engine.
    pub fn request_timeout(&self) -> Duration {
        match self.backend.kind {
            EngineKind::Lmstudio => self.lmstudio.request_timeout,
            EngineKind::LlamaServer => self.llama_server.request_timeout,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_file_gives_the_defaults() {
        let config = Config::parse("").unwrap();
        assert_eq!(config.lmstudio.url, "http://127.0.0.1:1234");
        assert_eq!(config.lmstudio.poll_interval, Duration::from_secs(5));
        assert_eq!(config.server.shutdown_grace, Duration::from_secs(30));
    }

    #[test]
    fn an_exact_alias_wins_then_the_most_specific_glob() {
        let config = Config::parse(
            "[routing.aliases]\n\"claude-*\" = \"auto\"\n\"claude-haiku-*\" = \"small\"\n\"claude-haiku-4-5\" = \"exact\"\n",
        )
        .unwrap();
        let alias = |name| config.routing.alias_for(name);
        assert_eq!(alias("claude-haiku-4-5"), Some("exact"));
        assert_eq!(alias("claude-haiku-3"), Some("small"));
        assert_eq!(alias("claude-opus-4"), Some("auto"));
        assert_eq!(alias("gpt-5-mini"), None);
        let err = Config::parse("[routing.aliases]\n\"gpt-[\" = \"auto\"\n").unwrap_err();
        assert!(err.to_string().contains("not a name or glob"), "{err}");
    }

    #[test]
    fn durations_take_units() {
        let config =
            Config::parse("[lmstudio]\npoll_interval = \"250ms\"\nrequest_timeout = \"15m\"\n")
                .unwrap();
        assert_eq!(config.lmstudio.poll_interval, Duration::from_millis(250));
        assert_eq!(config.lmstudio.request_timeout, Duration::from_secs(900));
        let err = Config::parse("[lmstudio]\npoll_interval = \"5 parsecs\"\n").unwrap_err();
        assert!(err.to_string().contains("line 2"), "{err}");
    }

    #[test]
    fn unknown_keys_name_the_key_and_line() {
        let err = Config::parse(
            "[server]\nsocket = \"/tmp/x.sock\"\n\n[lmstudio]\nurll = \"http://x\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("urll"), "{err}");
        assert!(err.contains("line 5"), "{err}");
    }

    #[test]
    fn a_misspelt_load_setting_of_a_model_names_the_key() {
        let err = Config::parse("[models.\"m\"]\npinned = true\nflash_atention = true\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("flash_atention"), "{err}");
        let config =
            Config::parse("[models.\"m\"]\nflash_attention = true\nnum_experts = 4\n").unwrap();
        assert_eq!(config.models["m"].flash_attention, Some(true));
        assert_eq!(config.models["m"].load_settings().num_experts, Some(4));
    }

    #[test]
    fn bad_values_are_rejected_with_the_key() {
        let err = Config::parse("[lmstudio]\nurl = \"localhost:1234\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("url"), "{err}");
        let err = Config::parse("[lmstudio]\npoll_interval = \"0s\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("poll_interval"), "{err}");
    }

    #[test]
    fn pool_and_model_settings() {
        let config = Config::parse(
            "[pool]\nmemory_budget = \"6GiB\"\nidle_ttl = \"never\"\ninstance_overhead = \"512MiB\"\n\n[models.\"qwen/qwen3-4b\"]\npinned = true\nttl = \"0\"\ncontext_length = 8192\n",
        )
        .unwrap();
        assert_eq!(
            config.pool.memory_budget,
            MemoryBudget::Bytes(ByteCount(6 << 30))
        );
        assert_eq!(config.pool.idle_ttl, Ttl::Never);
        assert_eq!(config.pool.instance_overhead, ByteCount(512 << 20));
        let qwen = &config.models["qwen/qwen3-4b"];
        assert!(qwen.pinned && !qwen.preload);
        assert_eq!(qwen.ttl, Some(Ttl::After(Duration::ZERO)));
        assert_eq!(qwen.context_length, Some(8192));
        assert_eq!(
            Config::default().pool.memory_budget,
            MemoryBudget::Percent(75.0)
        );
        assert_eq!(
            MemoryBudget::Percent(50.0).resolve(Some(1000)).unwrap(),
            500
        );
    }

    #[test]
    fn bad_sizes_and_ttls_name_the_line() {
        for (text, line) in [
            ("[pool]\nmemory_budget = \"lots\"\n", "line 2"),
            ("[pool]\nmemory_budget = \"150%\"\n", "line 2"),
            ("[pool]\n\nidle_ttl = \"15\"\n", "line 3"),
            ("[models.\"m\"]\npinned = true\nprio = 1\n", "line 3"),
        ] {
            let err = Config::parse(text).unwrap_err().to_string();
            assert!(err.contains(line), "{text}: {err}");
        }
    }

    #[test]
    fn the_example_config_is_valid_and_says_the_defaults() {
        let example = Config::parse(Config::EXAMPLE).expect("the example parses");
        assert_eq!(
            example.to_redacted_toml(),
            Config::default().to_redacted_toml()
        );
    }

    #[test]
    fn llama_server_is_chosen_with_its_own_section_and_defaults() {
        let config = Config::parse(
            "[backend]\nkind = \"llama-server\"\n\n[llama_server]\npoll_interval = \"1s\"\n",
        )
        .unwrap();
        assert_eq!(config.backend.kind, EngineKind::LlamaServer);
        assert_eq!(config.llama_server.url, "http://127.0.0.1:8080");
        assert_eq!(config.poll_interval(), Duration::from_secs(1));
        assert_eq!(config.llama_server.token().unwrap(), None);
        assert_eq!(
            config.lmstudio.token().unwrap().as_deref(),
            Some("lmstudio")
        );

        let err = Config::parse("[backend]\nkind = \"ollama\"\n").unwrap_err();
        assert!(err.to_string().contains("llama-server"), "{err}");
        let err = Config::parse("[llama_server]\nurl = \"localhost:8080\"\n").unwrap_err();
        assert!(err.to_string().contains("[llama_server] url"), "{err}");
        // Load settings belong in llama-server's preset file; lmsd says so instead of ignoring them.
        let err = Config::parse(
            "[backend]\nkind = \"llama-server\"\n[models.\"tiny\"]\ncontext_length = 4096\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("--models-preset"), "{err}");
        Config::parse("[backend]\nkind = \"llama-server\"\n[models.\"tiny\"]\npinned = true\n")
            .expect("pins are fine");
        let err = Config::parse("[backend]\nkind = \"llama-server\"\n[pool]\nmax_instances = 2\n")
            .unwrap_err();
        assert!(err.to_string().contains("one instance per model"), "{err}");
    }

    #[test]
    fn the_readme_example_config_is_valid() {
        let readme = include_str!("../../../README.md");
        let start =
            readme.find("```toml\n").expect("the README shows a config") + "```toml\n".len();
        let end = start + readme[start..].find("```").expect("the block ends");
        let config = Config::parse(&readme[start..end]).expect("the README's config parses");
        assert!(config.models["ibm/granite-4-micro"].pinned);
    }

    #[test]
    fn check_config_output_hides_the_token_and_reads_back() {
        let config = Config::parse("[lmstudio]\ntoken = \"sk-lm-abc:secret\"\n").unwrap();
        let shown = config.to_redacted_toml();
        assert!(
            !shown.contains("secret") && shown.contains("<redacted>"),
            "{shown}"
        );
        Config::parse(&shown).expect("the printed config parses");
    }

    #[test]
    fn debug_output_redacts_the_token() {
        let config = Config::parse("[lmstudio]\ntoken = \"sk-lm-secret:abc\"\n").unwrap();
        let shown = format!("{config:?}");
        assert!(!shown.contains("secret"), "{shown}");
        assert!(shown.contains("redacted"));
    }
}
