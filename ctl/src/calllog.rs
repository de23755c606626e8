//! `lmsd-ctl chat --log PATH`: one JSON line per call, as the old chat script kept.

use std::io::Write;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use lmsd_proto::{ClientError, Outcome};
use serde_json::{json, Value};

#[derive(Debug)]
pub struct CallLog {
    pub path: PathBuf,
    /// The prompt, when `--log-content` asks for prompt and answer in the log.
    pub content: Option<String>,
}

impl CallLog {
    pub fn append(&self, result: &Result<Outcome, ClientError>) -> std::io::Result<()> {
        let time = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let mut line = match result {
            Ok(Outcome::Chat(chat)) => {
                let mut line = json!({
                    "time": time,
                    "outcome": "ok",
                    "task_id": chat.task.task_id,
                    "model": chat.task.model,
                    "instance": chat.model_instance_id,
                    "reason": chat.task.reason,
                    "response_id": chat.response_id,
                    "usage": chat.usage,
                    "queued_ms": chat.task.queued_ms,
                    "load_ms": chat.task.load_ms,
                    "total_ms": chat.task.total_ms,
                    "attempts": chat.task.attempts,
                });
                if self.content.is_some() {
                    line["answer"] = json!(chat.content);
                }
                line
            }
            Ok(_) => json!({ "time": time, "outcome": "ok" }),
            Err(ClientError::Remote(wire)) => {
                json!({ "time": time, "outcome": wire.code, "error": wire.message })
            }
            Err(other) => {
                json!({ "time": time, "outcome": "client_error", "error": other.to_string() })
            }
        };
        if let Some(prompt) = &self.content {
            line["prompt"] = Value::String(prompt.clone());
        }
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        writeln!(file, "{line}")
    }
}
