//! P7: what a `local_task` round trip through `lmsd-mcp` (stdio JSON-RPC, a connection to lmsd
//! per call, the receipt's savings read) costs beside the same chat on the socket.

use std::process::Stdio;
use std::time::Instant;

use lmsd_proto::Client;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{ChildStdin, ChildStdout};

use crate::live::{binary, chat_request, chat_through, Daemon, Spread, MODEL};

#[derive(Debug, Serialize)]
pub struct Mcp {
    pub socket: Spread,
    pub mcp: Spread,
    pub mcp_minus_socket_p50_us: f64,
}

/// One JSON-RPC line to `lmsd-mcp`.
async fn send(stdin: &mut ChildStdin, message: Value) -> Result<(), String> {
    let line = format!("{message}\n");
    stdin
        .write_all(line.as_bytes())
        .await
        .map_err(|e| format!("lmsd-mcp's stdin: {e}"))
}

/// Lines until the response to `id` (notifications skipped); an error response is an error.
async fn response(lines: &mut Lines<BufReader<ChildStdout>>, id: u64) -> Result<Value, String> {
    loop {
        let line = lines
            .next_line()
            .await
            .map_err(|e| e.to_string())?
            .ok_or("lmsd-mcp closed its stdout")?;
        let message: Value = serde_json::from_str(&line).map_err(|e| e.to_string())?;
        if message["id"] == id {
            if message.get("error").is_some() || message["result"]["isError"] == true {
                return Err(format!("lmsd-mcp answered an error: {message}"));
            }
            return Ok(message);
        }
    }
}

pub async fn p7(daemon: &Daemon, samples: usize) -> Result<Mcp, String> {
    let mut child = tokio::process::Command::new(binary("lmsd-mcp")?)
        .arg("--socket")
        .arg(&daemon.socket)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start lmsd-mcp: {e}"))?;
    let (Some(mut stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
        return Err("lmsd-mcp has no stdio".into());
    };
    let mut lines = BufReader::new(stdout).lines();
    send(
        &mut stdin,
        json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "lmsd-bench", "version": "0"}}}),
    )
    .await?;
    response(&mut lines, 0).await?;
    send(
        &mut stdin,
        json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
    )
    .await?;
    let mut client = Client::connect(&daemon.socket)
        .await
        .map_err(|e| e.to_string())?;
    let (mut via_socket, mut via_mcp) = (Vec::with_capacity(samples), Vec::with_capacity(samples));
    for id in 1..=samples as u64 {
        let started = Instant::now();
        chat_through(&mut client, chat_request()).await?;
        via_socket.push(started.elapsed());
        let started = Instant::now();
        send(
            &mut stdin,
            json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {
            "name": "local_task",
            "arguments": {"instruction": "Summarise: the quick brown fox", "model": MODEL}}}),
        )
        .await?;
        response(&mut lines, id).await?;
        via_mcp.push(started.elapsed());
    }
    let (socket, mcp) = (Spread::of(via_socket), Spread::of(via_mcp));
    Ok(Mcp {
        mcp_minus_socket_p50_us: mcp.p50_us - socket.p50_us,
        socket,
        mcp,
    })
}
