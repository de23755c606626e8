//! Logging: daily files under `[log] dir` plus stderr (journald takes it under systemd), both
//! non-blocking, with a level filter that a config reload can change.

use std::io::IsTerminal;
use std::sync::Arc;

use tracing_appender::non_blocking::WorkerGuard;
use tracing_appender::rolling::{RollingFileAppender, Rotation};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, reload, EnvFilter, Registry};

use crate::config::LogConfig;

/// Lines each writer buffers before it drops (and counts) more. tracing-appender's default,
/// 128,000, preallocates 4 MiB per writer: half of an idle lmsd's memory, for bursts a daemon
/// that logs a few lines per task never has.
const BUFFERED_LINES: usize = 8_192;

/// A writer that hands lines to a background thread.
fn non_blocking<W: std::io::Write + Send + 'static>(
    writer: W,
) -> (tracing_appender::non_blocking::NonBlocking, WorkerGuard) {
    tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(BUFFERED_LINES)
        .finish(writer)
}

/// Sets the log filter at run time (`[log] level` on reload).
pub type LevelSetter = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// The installed logger. Keep it alive until `main` returns: dropping it flushes the writers.
pub struct Logging {
    _guards: Vec<WorkerGuard>,
    filter: reload::Handle<EnvFilter, Registry>,
    from_env: bool,
}

impl std::fmt::Debug for Logging {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Logging")
            .field("from_env", &self.from_env)
            .finish_non_exhaustive()
    }
}

/// Installs the global logger. A log directory that cannot be created is reported on stderr and
/// logging goes on to stderr alone: logs must never stop the daemon.
pub fn init(config: &LogConfig) -> Logging {
    let from_env = std::env::var_os("RUST_LOG").is_some();
    let filter = match from_env {
        true => EnvFilter::from_default_env(),
        false => EnvFilter::new(&config.level),
    };
    let (filter, handle) = reload::Layer::new(filter);
    let mut guards = Vec::new();
    let (stderr, guard) = non_blocking(std::io::stderr());
    guards.push(guard);
    let stderr_layer = fmt::layer()
        .with_writer(stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal());
    let mut file_problem = None;
    let file_layer = config.dir().and_then(|dir| {
        let appender = std::fs::create_dir_all(&dir)
            .map_err(|e| e.to_string())
            .and_then(|()| {
                RollingFileAppender::builder()
                    .rotation(Rotation::DAILY)
                    .filename_prefix("lmsd")
                    .filename_suffix("log")
                    .max_log_files(config.keep_files)
                    .build(&dir)
                    .map_err(|e| e.to_string())
            });
        match appender {
            Ok(appender) => {
                let (writer, guard) = non_blocking(appender);
                guards.push(guard);
                Some(
                    fmt::layer()
                        .with_writer(writer)
                        .with_target(false)
                        .with_ansi(false),
                )
            }
            Err(error) => {
                file_problem = Some(format!(
                    "cannot write logs under {}: {error}",
                    dir.display()
                ));
                None
            }
        }
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(stderr_layer)
        .with(file_layer)
        .init();
    if let Some(problem) = file_problem {
        tracing::warn!("{problem}; logging to stderr only");
    }
    Logging {
        _guards: guards,
        filter: handle,
        from_env,
    }
}

impl Logging {
    pub fn level_setter(&self) -> LevelSetter {
        let handle = self.filter.clone();
        let from_env = self.from_env;
        Arc::new(move |level: &str| {
            if from_env {
                return Err("RUST_LOG is set and overrides [log] level".into());
            }
            let filter = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
            handle.reload(filter).map_err(|e| e.to_string())
        })
    }
}
