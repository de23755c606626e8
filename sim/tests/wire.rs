//! The simulator on the wire: Node/Express headers, idle keep-alive connections closed after the
//! timeout, connection-level faults, and LM Studio going down and coming back.
// In test helpers a failed unwrap is a failed test, which is what it should be.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use lmstudio_sim::{Fault, Route, SimConfig, Simulator, Times};
use serde_json::{json, Value};
use support::{eventually, post, sim, sse_events, GRANITE, QWEN};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn connect(sim: &Simulator) -> TcpStream {
    TcpStream::connect(sim.addr()).await.unwrap()
}

async fn send(stream: &mut TcpStream, method: &str, path: &str, body: Option<Value>) {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nhost: sim\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
}

/// Reads one response with a content-length body, as (head, body); `None` when the server
/// closed the connection without writing a byte.
async fn response(stream: &mut TcpStream) -> Option<(String, String)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .map_or(0, |v| v.trim().parse().unwrap());
            if buf.len() >= end + 4 + length {
                let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + length]).into_owned();
                return Some((head, body));
            }
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) if buf.is_empty() => return None,
            Ok(0) | Err(_) => panic!("connection closed mid-response"),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Whether the server closes the connection within `within`.
async fn closes_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(within, stream.read(&mut byte)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test]
async fn responses_carry_express_keep_alive_headers() {
    let response = |sim: &Simulator| reqwest::get(format!("{}/api/v1/models", sim.url()));
    let default = sim(SimConfig::zero_delay()).await;
    let headers = response(&default).await.unwrap().headers().clone();
    assert_eq!(headers["x-powered-by"], "Express");
    assert_eq!(headers["connection"], "keep-alive");
    assert_eq!(headers["keep-alive"], "timeout=5");
    let mut config = SimConfig::zero_delay();
    config.keep_alive_timeout = Duration::from_millis(1500);
    let short = sim(config).await;
    let unknown = reqwest::get(format!("{}/nope", short.url())).await.unwrap();
    assert_eq!(unknown.headers()["keep-alive"], "timeout=2");
}

#[tokio::test]
async fn an_idle_connection_closes_after_the_keep_alive_timeout() {
    let mut config = SimConfig::zero_delay();
    config.keep_alive_timeout = Duration::from_millis(300);
    let sim = sim(config).await;
    let mut stream = connect(&sim).await;
    send(&mut stream, "GET", "/api/v1/models", None).await;
    let (head, _) = response(&mut stream).await.unwrap();
    assert!(head.starts_with("http/1.1 200"));
    // Reused within the timeout, it serves; left idle, the server closes it.
    tokio::time::sleep(Duration::from_millis(150)).await;
    send(&mut stream, "GET", "/api/v1/models", None).await;
    assert!(response(&mut stream).await.is_some());
    let idle = Instant::now();
    assert!(closes_within(&mut stream, Duration::from_secs(3)).await);
    assert!(
        idle.elapsed() >= Duration::from_millis(250),
        "{:?}",
        idle.elapsed()
    );
}

#[tokio::test]
async fn a_stream_longer_than_the_keep_alive_timeout_is_not_cut() {
    let mut config = SimConfig::zero_delay();
    config.keep_alive_timeout = Duration::from_millis(200);
    config.token_delay = Duration::from_millis(30);
    let sim = sim(config).await;
    let started = Instant::now();
    let text = support::stream(
        &sim,
        json!({"model": GRANITE, "input": "hi", "stream": true}),
    )
    .await;
    assert!(started.elapsed() > Duration::from_millis(400));
    let events = sse_events(&text);
    assert_eq!(events.last().map(|(n, _)| n.as_str()), Some("chat.end"));
}

#[tokio::test]
async fn close_reused_closes_only_reused_connections_and_has_no_effect() {
    let sim = sim(SimConfig::zero_delay()).await;
    sim.inject(Route::Any, Fault::CloseReused, Times::Once);
    let chat = json!({"model": GRANITE, "input": "hi"});
    // Fresh connections pass without using the fault up.
    for _ in 0..2 {
        let mut fresh = connect(&sim).await;
        send(&mut fresh, "POST", "/api/v1/chat", Some(chat.clone())).await;
        assert!(response(&mut fresh)
            .await
            .unwrap()
            .0
            .starts_with("http/1.1 200"));
    }
    let mut reused = connect(&sim).await;
    send(&mut reused, "GET", "/api/v1/models", None).await;
    assert!(response(&mut reused).await.is_some());
    let before = sim.stats();
    send(
        &mut reused,
        "POST",
        "/api/v1/models/load",
        Some(json!({ "model": QWEN })),
    )
    .await;
    assert!(
        response(&mut reused).await.is_none(),
        "closed without a reply"
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    let after = sim.stats();
    assert_eq!(after.closed_reused, 1);
    let after = lmstudio_sim::SimStats {
        closed_reused: 0,
        ..after
    };
    assert_eq!(after, before, "the request had no effect");
    assert_eq!(sim.loaded_instances(), [GRANITE]);
    // Used up: a reused connection serves again.
    let mut again = connect(&sim).await;
    for _ in 0..2 {
        send(&mut again, "GET", "/api/v1/models", None).await;
        assert!(response(&mut again).await.is_some());
    }
}

#[tokio::test]
async fn a_dropped_load_reply_still_loads() {
    let sim = sim(SimConfig::zero_delay()).await;
    sim.inject(Route::Load, Fault::DropLoadReply, Times::Once);
    let reply = reqwest::Client::new()
        .post(format!("{}/api/v1/models/load", sim.url()))
        .json(&json!({ "model": QWEN }))
        .send()
        .await;
    assert!(
        reply.is_err(),
        "the client sees a broken connection: {reply:?}"
    );
    assert_eq!(sim.loaded_instances(), [QWEN]);
    assert_eq!(sim.stats().loads, 1);
}

#[tokio::test]
async fn lm_studio_goes_down_and_comes_back_empty_on_the_same_port() {
    let mut config = SimConfig::zero_delay();
    config.token_delay = Duration::from_millis(20);
    let mut sim = sim(config).await;
    let url = sim.url();
    post(&sim, "/api/v1/models/load", json!({ "model": QWEN })).await;
    post(&sim, "/api/v1/chat", json!({"model": QWEN, "input": "hi"})).await;
    assert_eq!(sim.stored_responses(), 1);
    sim.inject(Route::Chat, Fault::StallStream, Times::Once);
    let open = reqwest::Client::new()
        .post(format!("{url}/api/v1/chat"))
        .json(&json!({"model": QWEN, "input": "hi", "stream": true}))
        .send()
        .await
        .unwrap();
    eventually("the stalled chat", || sim.stats().chats == 2).await;

    sim.go_down().await;
    assert!(TcpStream::connect(sim.addr()).await.is_err(), "refused");
    assert!(open.text().await.is_err(), "the open stream is cut");
    assert!(sim.loaded_instances().is_empty());
    assert_eq!(sim.stored_responses(), 0);
    assert_eq!((sim.stats().loads, sim.stats().stored_responses), (1, 1));

    sim.come_back().await.unwrap();
    assert_eq!(sim.url(), url);
    let listed: Value = reqwest::get(format!("{url}/api/v1/models"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(listed["models"]
        .as_array()
        .unwrap()
        .iter()
        .all(|m| m["loaded_instances"] == json!([])));
    let (status, _) = post(
        &sim,
        "/api/v1/chat",
        json!({"model": GRANITE, "input": "hi"}),
    )
    .await;
    assert_eq!(status, 200);
    sim.stop().await;
}

#[tokio::test]
async fn a_load_under_way_when_lm_studio_quits_never_appears() {
    let mut config = SimConfig::zero_delay();
    config.load_bytes_per_sec = Some(5_000_000_000);
    let mut sim = sim(config).await;
    let url = sim.url();
    let loading = tokio::spawn(async move {
        reqwest::Client::new()
            .post(format!("{url}/api/v1/models/load"))
            .json(&json!({ "model": QWEN }))
            .send()
            .await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    sim.go_down().await;
    assert!(loading.await.unwrap().is_err());
    sim.come_back().await.unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(sim.loaded_instances().is_empty());
    let (status, _) = post(&sim, "/api/v1/models/load", json!({ "model": QWEN })).await;
    assert_eq!(status, 200);
}
