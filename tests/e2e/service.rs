//! lmsd as a service: reloads, config checking, logs, who may connect, stopping.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use lmsd_proto::Ttl;
use lmstudio_sim::{Fault, Route, SimConfig, Times};

use crate::support::*;

const GRANITE: &str = "ibm/granite-4-micro";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_new_ttl_and_keeps_the_old_config_when_the_new_one_is_broken() {
    let sim = start_sim(SimConfig::zero_delay()).await;
    let daemon = TestDaemon::start_with(&sim.url(), "[pool]\nidle_ttl = \"15m\"\n", &[]).await;
    chat(&daemon.socket, GRANITE).await.unwrap();
    assert_eq!(
        daemon.status().await.instances[0].ttl,
        Ttl::After(Duration::from_secs(900))
    );

    daemon.rewrite_config("", "[pool]\nidle_ttl = \"1h\"\n");
    daemon.signal("HUP");
    daemon
        .wait_for_status("the new TTL", |s| {
            s.instances.first().map(|i| i.ttl) == Some(Ttl::After(Duration::from_secs(3600)))
        })
        .await;
    daemon.wait_for_log("config reloaded").await;

    daemon.rewrite_config("", "[pool]\nidle_ttl = \"soon\"\n");
    daemon.signal("HUP");
    daemon.wait_for_log("config rejected").await;
    assert!(
        daemon.logs().contains("line"),
        "the rejection names the line"
    );
    assert_eq!(
        daemon.status().await.instances[0].ttl,
        Ttl::After(Duration::from_secs(3600))
    );

    // lmsd-ctl reload does the same and says what it did.
    let refused = daemon.ctl(&["reload"]).await;
    assert_eq!(refused.code, 4, "{}", refused.stderr);
    assert!(
        refused.stderr.contains("config rejected"),
        "{}",
        refused.stderr
    );
    daemon.rewrite_config(
        "max_connections = 9",
        "[pool]\nidle_ttl = \"2h\"\n[tasks]\nmax_wait = \"5s\"\n",
    );
    let reload = daemon.ctl_json(&["reload"]).await;
    assert_eq!(
        reload["applied"],
        serde_json::json!(["pool.idle_ttl", "tasks.max_wait"])
    );
    assert_eq!(
        reload["needs_restart"],
        serde_json::json!(["server.max_connections"])
    );
    assert_eq!(
        daemon.status().await.instances[0].ttl,
        Ttl::After(Duration::from_secs(7200))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_validates_names_lines_and_hides_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "[lmstudio]\ntoken = \"sk-lm-abc:very-secret\"\n[pool]\nmemory_budget = \"8GiB\"\n",
    )
    .unwrap();
    let out = lmsd_command(dir.path())
        .args(["--check-config"])
        .arg(&good)
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("valid") && stdout.contains("<redacted>"),
        "{stdout}"
    );
    assert!(!stdout.contains("very-secret"), "{stdout}");
    assert!(
        stdout.contains("8589934592"),
        "the budget is resolved: {stdout}"
    );

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[pool]\nidle_ttl = \"15m\"\nmemory_budget = \"lots\"\n",
    )
    .unwrap();
    let out = lmsd_command(dir.path())
        .arg("--check-config")
        .arg(&bad)
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bad.toml") && stderr.contains("line 3") && stderr.contains("lots"),
        "{stderr}"
    );

    // The printed default config is itself a valid config.
    let example = lmsd_command(dir.path())
        .arg("--print-default-config")
        .output()
        .await
        .unwrap();
    assert_eq!(example.status.code(), Some(0));
    let example_file = dir.path().join("example.toml");
    std::fs::write(&example_file, &example.stdout).unwrap();
    let out = lmsd_command(dir.path())
        .arg("--check-config")
        .arg(&example_file)
        .output()
        .await
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_files_are_written_without_tokens_prompts_or_outputs() {
    let sim = start_sim(SimConfig::zero_delay()).await;
    let daemon = TestDaemon::start_with(&sim.url(), "token = \"sk-lm-abc:hush-hush\"\n", &[]).await;
    let out = daemon
        .ctl(&["chat", GRANITE, "zebra crossing prompt"])
        .await;
    assert_eq!(out.code, 0);
    assert!(out.stdout.contains("Simulated reply"));
    daemon.wait_for_log("loaded").await;
    let logs = daemon.logs();
    assert!(logs.contains("lmsd ready"), "{logs}");
    for secret in ["hush-hush", "zebra", "Simulated reply"] {
        assert!(
            !logs.contains(secret),
            "{secret:?} reached the log:\n{logs}"
        );
    }
}

/// Runs `lmsd-ctl` as the unprivileged user `nobody`, to test peer credential checks.
async fn ctl_as_nobody(daemon: &TestDaemon, args: &[&str]) -> CtlOutput {
    // The fixture's directories are private to root; open the path (not the policy) to nobody.
    for path in [daemon.dir.path(), daemon.socket.parent().unwrap()] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::set_permissions(&daemon.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = tokio::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(ctl_bin())
        .arg("--socket")
        .arg(&daemon.socket)
        .args(args)
        .output()
        .await
        .expect("setpriv runs");
    CtlOutput {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_users_are_refused_unless_allowed() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: switching to another user needs root (CI runs as root)");
        return;
    }
    let sim = start_sim(SimConfig::zero_delay()).await;
    let daemon = TestDaemon::start(&sim.url()).await;
    let refused = ctl_as_nobody(&daemon, &["status"]).await;
    assert_eq!(
        refused.code, 11,
        "stdout {} stderr {}",
        refused.stdout, refused.stderr
    );
    assert!(
        refused.stderr.contains("user 65534 may not use this lmsd"),
        "{}",
        refused.stderr
    );
    daemon.wait_for_log("connection refused").await;
    assert!(daemon.logs().contains("65534"));

    let allowing = TestDaemon::start_configured(&sim.url(), "allow_uids = [65534]", "", &[]).await;
    let served = ctl_as_nobody(&allowing, &["status"]).await;
    assert_eq!(served.code, 0, "{}", served.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unload_on_exit_unloads_what_lmsd_loaded_except_pins() {
    let sim = start_sim(SimConfig::zero_delay()).await;
    let config = "[pool]\nunload_on_exit = true\n\n[models.\"qwen/qwen3-4b\"]\npinned = true\n";
    let daemon = TestDaemon::start_with(&sim.url(), config, &[]).await;
    eventually("the pin to load", || {
        sim.loaded_instances() == ["qwen/qwen3-4b"]
    })
    .await;
    chat(&daemon.socket, GRANITE).await.unwrap();
    load_outside(&sim, "qwen/qwen3-vl-4b").await;
    daemon
        .wait_for_status("the outside load", |s| s.instances.len() == 3)
        .await;
    assert_eq!(daemon.terminate().await, Some(0));
    let mut left = sim.loaded_instances();
    left.sort();
    assert_eq!(
        left,
        ["qwen/qwen3-4b", "qwen/qwen3-vl-4b"],
        "the pin and the outside load stay"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sigterm_queued_tasks_hear_shutting_down_and_running_ones_finish_or_are_ended_at_the_grace(
) {
    let sim = start_sim(SimConfig::zero_delay()).await;
    let daemon = TestDaemon::start(&sim.url()).await;
    daemon.ctl_json(&["load", GRANITE]).await;
    sim.inject(
        Route::Chat,
        Fault::Delay(Duration::from_millis(1500)),
        Times::N(4),
    );
    let lines: Vec<String> = (0..5)
        .map(|n| chat_line(&format!("s{n}"), GRANITE, serde_json::json!({})))
        .collect();
    let socket = daemon.socket.clone();
    let talk = tokio::spawn(async move { converse(&socket, &lines, 5).await });
    eventually("four chats running", || sim.stats().chat_requests == 4).await;
    assert_eq!(daemon.terminate().await, Some(0));
    let replies = talk.await.unwrap();
    let terminal: Vec<&serde_json::Value> =
        replies.iter().filter(|r| r["type"] != "event").collect();
    assert_eq!(
        terminal.iter().filter(|r| r["type"] == "result").count(),
        4,
        "{terminal:?}"
    );
    assert_eq!(
        terminal
            .iter()
            .filter(|r| r["error"]["code"] == "shutting_down")
            .count(),
        1,
        "{terminal:?}"
    );

    // A task still running when the grace runs out is answered too.
    let daemon =
        TestDaemon::start_configured(&sim.url(), "shutdown_grace = \"300ms\"", "", &[]).await;
    sim.inject(
        Route::Chat,
        Fault::Delay(Duration::from_secs(5)),
        Times::Once,
    );
    let before = sim.stats().chat_requests;
    let socket = daemon.socket.clone();
    let talk = tokio::spawn(async move {
        converse(
            &socket,
            &[chat_line("long", GRANITE, serde_json::json!({}))],
            1,
        )
        .await
    });
    eventually("the long chat running", || {
        sim.stats().chat_requests == before + 1
    })
    .await;
    assert_eq!(daemon.terminate().await, Some(0));
    let replies = talk.await.unwrap();
    assert_eq!(
        replies.last().unwrap()["error"]["code"],
        "shutting_down",
        "{replies:?}"
    );
}
