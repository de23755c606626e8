//! `[backend]` and the engines' sections (`[lmstudio]`, `[llama_server]`): one generic type, so
//! that the two cannot drift apart.

use super::*;

/// `[backend]`: which engine lmsd drives.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackendConfig {
    pub kind: EngineKind,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EngineKind {
    /// LM Studio's REST API v1, set in `[lmstudio]`.
    #[default]
    Lmstudio,
    /// llama.cpp's `llama-server` in router mode, set in `[llama_server]`.
    LlamaServer,
}

impl EngineKind {
    pub fn name(self) -> &'static str {
        match self {
            EngineKind::Lmstudio => "lmstudio",
            EngineKind::LlamaServer => "llama-server",
        }
    }
}

/// What differs between the engines' connection sections: their defaults and names.
pub trait EngineSection: Clone {
    /// The TOML section, for messages.
    const SECTION: &'static str;
    const DEFAULT_URL: &'static str;
    /// Environment variable that overrides the API token.
    const TOKEN_ENV: &'static str;
    /// Sent when no token is set.
    const DEFAULT_TOKEN: Option<&'static str>;
}

#[derive(Debug, Clone)]
pub struct LmStudioSection;

impl EngineSection for LmStudioSection {
    const SECTION: &'static str = "lmstudio";
    const DEFAULT_URL: &'static str = "http://127.0.0.1:1234";
    const TOKEN_ENV: &'static str = "LMSD_LMSTUDIO_TOKEN";
    /// LM Studio accepts any token when auth is off; this is what its own tools send.
    const DEFAULT_TOKEN: Option<&'static str> = Some("lmstudio");
}

#[derive(Debug, Clone)]
pub struct LlamaServerSection;

impl EngineSection for LlamaServerSection {
    const SECTION: &'static str = "llama_server";
    const DEFAULT_URL: &'static str = "http://127.0.0.1:8080";
    const TOKEN_ENV: &'static str = "LMSD_LLAMA_SERVER_TOKEN";
    /// llama-server checks no key unless started with `--api-key`.
    const DEFAULT_TOKEN: Option<&'static str> = None;
}

/// `[lmstudio]`.
pub type LmStudioConfig = EngineConfig<LmStudioSection>;
/// `[llama_server]`.
pub type LlamaServerConfig = EngineConfig<LlamaServerSection>;

/// How lmsd reaches one engine.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default, bound = "")]
pub struct EngineConfig<S: EngineSection> {
    pub url: String,
    /// API token; `token_file` and the section's environment variable take precedence.
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
    #[serde(skip)]
    section: std::marker::PhantomData<S>,
}

// The token must never reach a log line or a Debug print.
impl<S: EngineSection> std::fmt::Debug for EngineConfig<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct(S::SECTION)
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

impl<S: EngineSection> Default for EngineConfig<S> {
    fn default() -> Self {
        EngineConfig {
            url: S::DEFAULT_URL.into(),
            token: None,
            token_file: None,
            poll_interval: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(3),
            control_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(600),
            section: std::marker::PhantomData,
        }
    }
}

impl<S: EngineSection> EngineConfig<S> {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let section = S::SECTION;
        let url = reqwest::Url::parse(&self.url).map_err(|e| {
            ConfigError::Invalid(format!("[{section}] url {:?} is not a URL: {e}", self.url))
        })?;
        if url.scheme() != "http" && url.scheme() != "https" {
            return Err(ConfigError::Invalid(format!(
                "[{section}] url {:?} must start with http:// or https://",
                self.url
            )));
        }
        for (name, value) in [
            ("poll_interval", self.poll_interval),
            ("connect_timeout", self.connect_timeout),
            ("control_timeout", self.control_timeout),
            ("request_timeout", self.request_timeout),
        ] {
            if value.is_zero() {
                return Err(ConfigError::Invalid(format!(
                    "[{section}] {name} must be more than 0"
                )));
            }
        }
        Ok(())
    }

    /// The API token: the section's environment variable, else `token_file`, else `token`, else
    /// the engine's default (none for llama-server).
    pub fn token(&self) -> Result<Option<String>, ConfigError> {
        if let Ok(token) = std::env::var(S::TOKEN_ENV) {
            if !token.is_empty() {
                return Ok(Some(token));
            }
        }
        if let Some(path) = &self.token_file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::TokenFile {
                path: path.clone(),
                source,
            })?;
            return Ok(Some(text.trim().to_owned()));
        }
        Ok(self.token.clone().or(S::DEFAULT_TOKEN.map(str::to_owned)))
    }
}
