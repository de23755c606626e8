//! lmsd-ctl on its own: help, exit codes, and a clear word when lmsd is not running.

use std::process::Command;

fn ctl(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_lmsd-ctl"))
        .args(args)
        .env_remove("LMSD_SOCKET")
        .output()
        .expect("lmsd-ctl runs")
}

#[test]
fn help_lists_commands_and_exit_codes() {
    let out = ctl(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for word in [
        "status",
        "models",
        "load",
        "unload",
        "chat",
        "--json",
        "--socket",
        "Exit codes",
        "model_not_found",
    ] {
        assert!(help.contains(word), "help lacks {word}: {help}");
    }
}

#[test]
fn a_missing_daemon_exits_3_and_says_what_to_do() {
    let dir = std::env::temp_dir().join(format!("lmsd-ctl-test-{}", std::process::id()));
    let socket = dir.join("nobody.sock");
    let out = ctl(&["--socket", socket.to_str().unwrap(), "status"]);
    assert_eq!(out.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("is lmsd running?") && stderr.contains("nobody.sock"),
        "{stderr}"
    );
}

#[test]
fn bad_arguments_exit_2() {
    assert_eq!(ctl(&["chat"]).status.code(), Some(2));
    assert_eq!(
        ctl(&["load", "m", "--context-length", "lots"])
            .status
            .code(),
        Some(2)
    );
}
