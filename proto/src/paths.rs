//! Default locations of lmsd's files, following the XDG base directory conventions.

use std::path::PathBuf;

/// `$XDG_RUNTIME_DIR/lmsd/lmsd.sock`, or `<temp dir>/lmsd-<uid>/lmsd.sock` where there is no
/// runtime dir (macOS, plain shells). Both live in a directory only the user can enter.
pub fn default_socket_path() -> PathBuf {
    runtime_dir().join("lmsd.sock")
}

/// The per-user directory holding the socket.
pub fn runtime_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("lmsd"),
        _ => std::env::temp_dir().join(format!("lmsd-{}", rustix::process::getuid().as_raw())),
    }
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
