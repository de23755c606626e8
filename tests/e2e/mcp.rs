//! `lmsd-mcp` driven by the official MCP Python SDK over stdio (`tests/mcp/check.py`), in front
//! of the real `lmsd` and the simulator.

use std::time::Duration;

use lmstudio_sim::{Fault, Route, SimConfig, Times};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mcp_python_sdk_drives_lmsd_mcp() {
    let sim = start_sim(SimConfig::zero_delay()).await;
    let daemon = TestDaemon::start(&sim.url()).await;
    // The script's first chat waits for a slow load: it hears progress, gives up and cancels.
    sim.inject(
        Route::Load,
        Fault::Delay(Duration::from_secs(6)),
        Times::Once,
    );
    let allowed = tempfile::tempdir().unwrap();
    std::fs::write(allowed.path().join("notes.txt"), "fix the parser").unwrap();
    let tickets: Vec<String> = (0..3)
        .map(|i| {
            serde_json::json!({"id": i, "input": format!("ticket {i}: it crashes")}).to_string()
        })
        .collect();
    std::fs::write(allowed.path().join("tickets.jsonl"), tickets.join("\n")).unwrap();
    std::fs::write(allowed.path().join("chart.png"), [0x89, b'P', b'N', b'G']).unwrap();
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("secret.txt");
    std::fs::write(&secret, "not for the model").unwrap();
    let server = lmsd_bin().with_file_name("lmsd-mcp");
    assert!(
        server.exists(),
        "{} is missing: run `cargo test --workspace`",
        server.display()
    );
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/mcp/check.py");
    let out = tokio::process::Command::new("python3")
        .arg(script)
        .args([&server, &ctl_bin(), &daemon.socket, allowed.path(), &secret])
        .current_dir(allowed.path())
        .output()
        .await
        .expect("python3 runs (CI installs the mcp package)");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "{stdout}\n{stderr}\nlmsd's log:\n{}",
        daemon.logs()
    );
    assert!(stdout.contains("mcp: ok"), "{stdout}");
    assert!(
        !daemon.logs().contains("fix the parser"),
        "file contents never reach a log"
    );
}
