//! The `lmsd-mcp` binary over stdio with no lmsd behind it: it starts, lists its tools, and
//! answers a call with a tool error that tells the agent what to do. (The full conversation,
//! against lmsd and the simulator, is `tests/e2e/mcp.rs`; this test also makes cargo build the
//! binary before any test runs.)
// A failed unwrap in a test is a failed test.
#![allow(clippy::unwrap_used)]

use std::process::Stdio;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{ChildStdin, ChildStdout};

/// JSON-RPC over the child's stdio, one line a message.
struct Session {
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Session {
    async fn send(&mut self, message: Value) {
        let line = format!("{message}\n");
        self.stdin.write_all(line.as_bytes()).await.unwrap();
    }

    /// Sends a request and returns its response (notifications in between skipped).
    async fn ask(&mut self, request: Value) -> Value {
        let id = request["id"].clone();
        self.send(request).await;
        loop {
            let line = self.lines.next_line().await.unwrap().unwrap();
            let reply: Value = serde_json::from_str(&line).unwrap();
            if reply["id"] == id {
                return reply;
            }
        }
    }
}

#[tokio::test]
async fn without_lmsd_the_tools_are_listed_and_a_call_says_to_do_the_task_yourself() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_lmsd-mcp"))
        .arg("--socket")
        .arg(dir.path().join("no-lmsd.sock"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut session = Session {
        stdin: child.stdin.take().unwrap(),
        lines: BufReader::new(child.stdout.take().unwrap()).lines(),
    };
    session
        .ask(
            json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "test", "version": "0"}}}),
        )
        .await;
    session
        .send(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
        .await;
    let tools = session
        .ask(json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}))
        .await;
    let mut names: Vec<&str> = tools["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "local_batch",
            "local_batch_status",
            "local_embed",
            "local_models",
            "local_savings",
            "local_status",
            "local_task"
        ]
    );
    let call = json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
        "params": {"name": "local_task", "arguments": {"instruction": "Summarise"}}});
    let result = session.ask(call).await;
    assert_eq!(result["result"]["isError"], true, "{result}");
    assert!(
        result["result"]["content"][0]["text"]
            .as_str()
            .unwrap()
            .contains("lmsd is not running — do this task yourself"),
        "{result}"
    );
}
