//! `lmsd-ctl selftest`: the smoke test the old scripts had — health, load, chat, unload, verify —
//! each step printed with its time; the first failure ends it with that error's exit code.

use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use lmsd_proto::{
    ChatRequest, Client, ClientError, ErrorCode, LoadRequest, ModelKind, UnloadRequest, WireError,
};

struct Steps {
    json: bool,
    number: u32,
}

impl Steps {
    fn report(&mut self, name: &str, started: Instant, detail: &str) {
        self.number += 1;
        let ms = started.elapsed().as_millis();
        if self.json {
            println!(
                "{}",
                serde_json::json!({"step": name, "ok": true, "ms": ms, "detail": detail})
            );
        } else {
            println!("{}. {name:<8} ok  {ms:>6} ms  {detail}", self.number);
        }
    }
}

fn failed(name: &str, error: &ClientError, json: bool) -> ExitCode {
    if json {
        println!(
            "{}",
            serde_json::json!({"step": name, "ok": false, "error": error.to_string()})
        );
    }
    eprintln!("lmsd-ctl: selftest failed at {name}: {error}");
    ExitCode::from(crate::exit_codes::for_error(error))
}

pub async fn run(socket: &Path, model: Option<String>, json: bool) -> ExitCode {
    let mut steps = Steps { json, number: 0 };
    let mut client = match Client::connect(socket).await {
        Ok(client) => client,
        Err(error) => return failed("connect", &error, json),
    };

    let started = Instant::now();
    match client.status().await {
        Ok(status) if status.backend.reachable => {
            let simulated = if status.backend.simulated {
                " (SIMULATED)"
            } else {
                ""
            };
            steps.report(
                "health",
                started,
                &format!(
                    "{} at {} answers{simulated}",
                    status.backend.engine_name(),
                    status.backend.url
                ),
            );
        }
        Ok(status) => {
            let error = WireError::new(
                ErrorCode::BackendUnreachable,
                format!(
                    "{} at {} does not answer: {}",
                    status.backend.engine_name(),
                    status.backend.url,
                    status.backend.last_error.as_deref().unwrap_or_default()
                ),
            );
            return failed("health", &ClientError::Remote(error), json);
        }
        Err(error) => return failed("health", &error, json),
    }

    let model = match model {
        Some(model) => model,
        None => match client.models().await {
            Ok(list) => {
                let smallest = list
                    .models
                    .iter()
                    .filter(|m| m.kind == ModelKind::Llm)
                    .min_by_key(|m| m.size_bytes);
                match smallest {
                    Some(model) => model.key.clone(),
                    None => {
                        let error = WireError::new(
                            ErrorCode::ModelNotFound,
                            "the engine has no LLM to test with",
                        );
                        return failed("choose", &ClientError::Remote(error), json);
                    }
                }
            }
            Err(error) => return failed("choose", &error, json),
        },
    };

    let started = Instant::now();
    let load = LoadRequest {
        model: model.clone(),
        ..LoadRequest::default()
    };
    match client.load(load).await {
        Ok(load) => {
            let how = if load.already_loaded {
                "was already loaded"
            } else {
                "loaded"
            };
            steps.report(
                "load",
                started,
                &format!("{} {how} as {}", load.model, load.instance_id),
            );
        }
        Err(error) => return failed("load", &error, json),
    }

    let started = Instant::now();
    let chat = ChatRequest {
        model: model.clone(),
        input: "Reply with the single word OK.".into(),
        ..ChatRequest::default()
    };
    match client.chat(chat, |_| {}).await {
        Ok(chat) => {
            let words = chat.content.split_whitespace().count();
            steps.report(
                "chat",
                started,
                &format!("{words} words from {}", chat.model_instance_id),
            );
        }
        Err(error) => return failed("chat", &error, json),
    }

    let started = Instant::now();
    let unload = UnloadRequest {
        model: Some(model.clone()),
        ..UnloadRequest::default()
    };
    match client.unload(unload).await {
        Ok(unload) => steps.report(
            "unload",
            started,
            &format!("unloaded {}", unload.unloaded.join(", ")),
        ),
        Err(error) => return failed("unload", &error, json),
    }

    let started = Instant::now();
    match client.models().await {
        Ok(list) => {
            let left: Vec<&String> = list
                .models
                .iter()
                .filter(|m| m.key == model)
                .flat_map(|m| &m.loaded_instances)
                .collect();
            if !left.is_empty() {
                let error = WireError::new(
                    ErrorCode::BackendError,
                    format!("{model} still has instances {left:?}"),
                );
                return failed("verify", &ClientError::Remote(error), json);
            }
            steps.report(
                "verify",
                started,
                &format!("the engine lists no instance of {model}"),
            );
        }
        Err(error) => return failed("verify", &error, json),
    }
    ExitCode::SUCCESS
}
