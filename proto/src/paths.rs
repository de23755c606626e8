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
