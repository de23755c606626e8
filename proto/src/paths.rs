//! Default locations of lmsd's files, following the XDG base directory conventions.

use std::path::PathBuf;

/// `$XDG_RUNTIME_DIR/lmsd/lmsd.sock`, or `/tmp/lmsd-<uid>/lmsd.sock` where there is no runtime
/// dir (macOS, plain shells). Both live in a directory only the user can enter. `/tmp` rather
/// than `$TMPDIR`: a launchd agent and a shell see different `$TMPDIR`s on macOS.
pub fn default_socket_path() -> PathBuf {
    runtime_dir().join("lmsd.sock")
}

/// The per-user directory holding the socket.
pub fn runtime_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("lmsd"),
        _ => PathBuf::from("/tmp").join(format!("lmsd-{}", rustix::process::getuid().as_raw())),
    }
}

/// Where the daemon keeps state (sessions): `$STATE_DIRECTORY` (systemd's `StateDirectory=`),
/// else `$XDG_STATE_HOME/lmsd`, else `~/.local/state/lmsd`.
pub fn default_state_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("STATE_DIRECTORY").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir));
    }
    Some(xdg_state_home()?.join("lmsd"))
}

fn xdg_state_home() -> Option<PathBuf> {
    match std::env::var_os("XDG_STATE_HOME") {
        Some(dir) if !dir.is_empty() => Some(PathBuf::from(dir)),
        _ => Some(PathBuf::from(std::env::var_os("HOME")?).join(".local/state")),
    }
}

/// Where the daemon writes its log files: `$LOGS_DIRECTORY` (set by systemd's `LogsDirectory=`),
/// else `$XDG_STATE_HOME/lmsd/logs`, else `~/.local/state/lmsd/logs`.
pub fn default_log_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("LOGS_DIRECTORY").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir));
    }
    Some(xdg_state_home()?.join("lmsd").join("logs"))
}

/// `$XDG_CONFIG_HOME/lmsd/lmsd.toml`, else `~/.config/lmsd/lmsd.toml`: read when it exists and no
/// `--config` is given.
pub fn default_config_path() -> Option<PathBuf> {
    let base = match std::env::var_os("XDG_CONFIG_HOME") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(std::env::var_os("HOME")?).join(".config"),
    };
    Some(base.join("lmsd").join("lmsd.toml"))
}
