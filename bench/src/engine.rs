//! P1 on a real engine: lmsd in front of llama.cpp's `llama-server` (router mode, the tiny
//! random model), against the same chat sent to llama-server directly, in the same run.

use lmsd_proto::{ChatRequest, Request};
use lmsd_real_engine::{EngineFiles, Router, TINY_A};

use crate::live::{dispatch_overhead, Daemon, DispatchOverhead};

const PROMPT: &str = "Summarise: the quick brown fox";
/// Short replies keep the engine's own time small, so lmsd's share shows.
const MAX_TOKENS: u32 = 8;

/// `Ok(None)` when the engine is not set up here (`tests/real-engine/setup.sh` sets it up).
pub async fn p1(samples: usize) -> Result<Option<(String, DispatchOverhead)>, String> {
    let files = match EngineFiles::locate() {
        Ok(files) => files,
        Err(why) => {
            println!("P1 on llama-server: skipped: {why}\n");
            return Ok(None);
        }
    };
    let router = Router::start(&files, &[TINY_A]).await?;
    let daemon = Daemon::start(
        &format!(
            "[backend]\nkind = \"llama-server\"\n[llama_server]\nurl = {:?}\n",
            router.url()
        ),
        "",
    )
    .await?;
    let direct = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", router.url()))
        .json(&serde_json::json!({
            "model": TINY_A,
            "messages": [{ "role": "user", "content": PROMPT }],
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
        }));
    let via = Request::Chat(ChatRequest {
        model: TINY_A.into(),
        input: PROMPT.into(),
        max_output_tokens: Some(MAX_TOKENS),
        temperature: Some(0.0),
        ..ChatRequest::default()
    });
    let overhead = dispatch_overhead(direct, via, &daemon, samples).await?;
    Ok(Some((router.url(), overhead)))
}
