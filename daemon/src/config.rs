//! The daemon's configuration: TOML structs with defaults, strict about unknown keys.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Environment variable that overrides the LM Studio API token.
pub const TOKEN_ENV: &str = "LMSD_LMSTUDIO_TOKEN";
/// LM Studio accepts any token when auth is off; this is what its own tools send.
pub const DEFAULT_TOKEN: &str = "lmstudio";

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub lmstudio: LmStudioConfig,
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
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            socket: None,
            shutdown_grace: Duration::from_secs(30),
            max_connections: 1024,
        }
    }
}

#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LmStudioConfig {
    pub url: String,
    /// API token; `token_file` and the env variable `LMSD_LMSTUDIO_TOKEN` take precedence.
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
    /// How often the model catalogue is re-read.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Limit for quick calls: listing models, unloading.
    #[serde(with = "humantime_serde")]
    pub control_timeout: Duration,
    /// Limit for loads and chats, which can take minutes on large models.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
}

// The token must never reach a log line or a Debug print.
impl std::fmt::Debug for LmStudioConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LmStudioConfig")
            .field("url", &self.url)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("token_file", &self.token_file)
            .field("poll_interval", &self.poll_interval)
            .field("connect_timeout", &self.connect_timeout)
            .field("control_timeout", &self.control_timeout)
            .field("request_timeout", &self.request_timeout)
            .finish()
    }
}

impl Default for LmStudioConfig {
    fn default() -> Self {
        LmStudioConfig {
            url: "http://127.0.0.1:1234".into(),
            token: None,
            token_file: None,
            poll_interval: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(3),
            control_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(600),
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
        let url = reqwest::Url::parse(&self.lmstudio.url).map_err(|e| {
            ConfigError::Invalid(format!(
                "[lmstudio] url {:?} is not a URL: {e}",
                self.lmstudio.url
            ))
        })?;
        if url.scheme() != "http" && url.scheme() != "https" {
            return Err(ConfigError::Invalid(format!(
                "[lmstudio] url {:?} must start with http:// or https://",
                self.lmstudio.url
            )));
        }
        for (name, value) in [
            ("poll_interval", self.lmstudio.poll_interval),
            ("connect_timeout", self.lmstudio.connect_timeout),
            ("control_timeout", self.lmstudio.control_timeout),
            ("request_timeout", self.lmstudio.request_timeout),
        ] {
            if value.is_zero() {
                return Err(ConfigError::Invalid(format!(
                    "[lmstudio] {name} must be more than 0"
                )));
            }
        }
        if self.server.max_connections == 0 {
            return Err(ConfigError::Invalid(
                "[server] max_connections must be at least 1".into(),
            ));
        }
        Ok(())
    }

    /// The socket path in effect.
    pub fn socket_path(&self) -> PathBuf {
        self.server
            .socket
            .clone()
            .unwrap_or_else(lmsd_proto::paths::default_socket_path)
    }

    /// The API token: env `LMSD_LMSTUDIO_TOKEN`, else `token_file`, else `token`, else `lmstudio`.
    pub fn lmstudio_token(&self) -> Result<String, ConfigError> {
        if let Ok(token) = std::env::var(TOKEN_ENV) {
            if !token.is_empty() {
                return Ok(token);
            }
        }
        if let Some(path) = &self.lmstudio.token_file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::TokenFile {
                path: path.clone(),
                source,
            })?;
            return Ok(text.trim().to_owned());
        }
        Ok(self
            .lmstudio
            .token
            .clone()
            .unwrap_or_else(|| DEFAULT_TOKEN.to_owned()))
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
    fn debug_output_redacts_the_token() {
        let config = Config::parse("[lmstudio]\ntoken = \"sk-lm-secret:abc\"\n").unwrap();
        let shown = format!("{config:?}");
        assert!(!shown.contains("secret"), "{shown}");
        assert!(shown.contains("redacted"));
    }
}
