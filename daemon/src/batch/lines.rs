//! A job file read and checked before anything runs: each line a task in lmsd's form
//! (`{"id", "input", "system"?, "model"?, "schema"?, "choices"?, "max_output_tokens"?}`) or
//! OpenAI's batch form (`{"custom_id", "method": "POST", "url", "body"}`), the job's defaults
//! applied, and every problem named by its line number. Pure: no I/O.

use std::collections::HashMap;

use lmsd_proto::{BatchDefaults, ChatRequest, InvalidLine, Priority, TaskOptions};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::tasks::Contract;

/// What one line runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LineTask {
    /// lmsd's form: one chat.
    Chat { request: Box<ChatRequest> },
    /// OpenAI's form for `/v1/chat/completions`, relayed as the front door relays it.
    ChatCompletion { body: Value },
    /// OpenAI's form for `/v1/embeddings`.
    Embedding { body: Value },
}

/// A line as it is stored: its place, its id, the model it groups under, and its task (none
/// for an invalid line recorded as failed).
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    /// The 1-based line number in the file.
    pub seq: u64,
    pub id: String,
    /// A model key, or `auto`: lines of one model run together.
    pub model: String,
    pub task: Result<LineTask, String>,
}

/// A file's lines, the invalid ones among them.
#[derive(Debug, Default)]
pub struct Parsed {
    pub lines: Vec<Line>,
    pub invalid: Vec<InvalidLine>,
}

/// The fields of lmsd's form.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlainLine {
    id: Value,
    input: String,
    #[serde(default)]
    system: Option<String>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    schema: Option<Value>,
    #[serde(default)]
    choices: Vec<String>,
    #[serde(default)]
    max_output_tokens: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OpenAiLine {
    custom_id: String,
    method: String,
    url: String,
    body: Value,
}

/// A line's id as text: a string as it is, a number written out.
fn id_text(id: &Value) -> Result<String, String> {
    match id {
        Value::String(id) if !id.is_empty() => Ok(id.clone()),
        Value::Number(n) => Ok(n.to_string()),
        _ => Err("\"id\" must be a non-empty string or a number".into()),
    }
}

fn plain(line: PlainLine, defaults: &BatchDefaults) -> Result<(String, String, LineTask), String> {
    let id = id_text(&line.id)?;
    if line.input.trim().is_empty() {
        return Err("\"input\" is empty".into());
    }
    let own_contract = line.schema.is_some() || !line.choices.is_empty();
    let model = line
        .model
        .or_else(|| defaults.model.clone())
        .unwrap_or_else(|| "auto".into());
    let request = ChatRequest {
        model: model.clone(),
        input: line.input,
        system_prompt: line.system.or_else(|| defaults.system.clone()),
        max_output_tokens: line.max_output_tokens.or(defaults.max_output_tokens),
        // A line's own contract replaces the job's.
        schema: if own_contract {
            line.schema
        } else {
            defaults.schema.clone()
        },
        choices: if own_contract {
            line.choices
        } else {
            defaults.choices.clone()
        },
        options: TaskOptions {
            priority: Priority::Batch,
            ..TaskOptions::default()
        },
        ..ChatRequest::default()
    };
    Contract::of(&request)?;
    Ok((
        id,
        model,
        LineTask::Chat {
            request: Box::new(request),
        },
    ))
}

fn openai(line: OpenAiLine) -> Result<(String, String, LineTask), String> {
    if line.custom_id.is_empty() {
        return Err("\"custom_id\" is empty".into());
    }
    if line.method != "POST" {
        return Err(format!(
            "\"method\" must be \"POST\", not {:?}",
            line.method
        ));
    }
    let Some(model) = line
        .body
        .get("model")
        .and_then(Value::as_str)
        .map(str::to_owned)
    else {
        return Err("\"body\" names no \"model\"".into());
    };
    let task = match line.url.as_str() {
        "/v1/chat/completions" => {
            if line.body["messages"].as_array().is_none_or(Vec::is_empty) {
                return Err("\"body.messages\" must be a non-empty array".into());
            }
            if line.body["stream"] == true {
                return Err("a batch line cannot stream: leave \"stream\" out".into());
            }
            // Checked now, translated for the engine when the line runs.
            crate::tasks::response_format_contract(&mut line.body.clone())
                .map_err(|e| e.message)?;
            LineTask::ChatCompletion { body: line.body }
        }
        "/v1/embeddings" => {
            if line.body.get("input").is_none() {
                return Err("\"body.input\" is missing".into());
            }
            LineTask::Embedding { body: line.body }
        }
        other => {
            return Err(format!(
                "\"url\" {other:?} is not one lmsd runs in a batch: /v1/chat/completions or /v1/embeddings"
            ))
        }
    };
    Ok((line.custom_id, model, task))
}

/// One line read: lmsd's form or OpenAI's, told apart by `custom_id`.
fn read(
    text: &str,
    defaults: &BatchDefaults,
) -> Result<(String, String, LineTask), (Option<String>, String)> {
    let value: Value = serde_json::from_str(text).map_err(|e| (None, format!("not JSON: {e}")))?;
    let id = value
        .get("custom_id")
        .or_else(|| value.get("id"))
        .and_then(|id| id_text(id).ok());
    let fail = |error: String| (id.clone(), error);
    if !value.is_object() {
        return Err(fail("a line must be a JSON object".into()));
    }
    if value.get("custom_id").is_some() {
        let line: OpenAiLine = serde_json::from_value(value)
            .map_err(|e| fail(format!("not an OpenAI batch line: {e}")))?;
        openai(line).map_err(fail)
    } else {
        let line: PlainLine =
            serde_json::from_value(value).map_err(|e| fail(format!("not a task line: {e}")))?;
        plain(line, defaults).map_err(fail)
    }
}

/// Reads a job file. Blank lines are skipped; an invalid line or a repeated id is in
/// `invalid`, with its line number, and in `lines` as a failed line.
pub fn parse(text: &str, defaults: &BatchDefaults) -> Parsed {
    let mut parsed = Parsed::default();
    let mut seen: HashMap<String, u64> = HashMap::new();
    for (index, text) in text.lines().enumerate() {
        let seq = index as u64 + 1;
        if text.trim().is_empty() {
            continue;
        }
        let (id, model, task) = match read(text, defaults) {
            Ok((id, model, task)) => (id, model, Ok(task)),
            Err((id, error)) => (
                id.unwrap_or_else(|| format!("line-{seq}")),
                String::new(),
                Err(error),
            ),
        };
        let first = seen.get(&id).copied();
        let task = match first {
            Some(first) => Err(format!("id {id:?} is already on line {first}")),
            None => task,
        };
        seen.entry(id.clone()).or_insert(seq);
        if let Err(error) = &task {
            parsed.invalid.push(InvalidLine {
                line: seq,
                error: error.clone(),
            });
        }
        // A repeated id is not stored twice: it is reported, and the file refused or the line
        // dropped with `skip_invalid` (results hold each id once).
        if first.is_some() {
            continue;
        }
        parsed.lines.push(Line {
            seq,
            id,
            model,
            task,
        });
    }
    parsed
}

/// The invalid lines in one message: the first few, and how many more.
pub fn describe(invalid: &[InvalidLine]) -> String {
    const SHOWN: usize = 10;
    let mut text: Vec<String> = invalid
        .iter()
        .take(SHOWN)
        .map(|l| format!("line {}: {}", l.line, l.error))
        .collect();
    if invalid.len() > SHOWN {
        text.push(format!("and {} more", invalid.len() - SHOWN));
    }
    text.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn both_forms_are_read_with_the_jobs_defaults() {
        let file = [
            json!({"id": "a", "input": "Label: it crashes"}).to_string(),
            String::new(),
            json!({"id": 2, "input": "x", "model": "qwen/qwen3-4b", "choices": ["bug", "feature"]})
                .to_string(),
            json!({"custom_id": "c", "method": "POST", "url": "/v1/chat/completions",
                   "body": {"model": "gemma", "messages": [{"role": "user", "content": "hi"}]}})
            .to_string(),
        ]
        .join("\n");
        let defaults = BatchDefaults {
            model: Some("small".into()),
            choices: vec!["yes".into(), "no".into()],
            ..BatchDefaults::default()
        };
        let parsed = parse(&file, &defaults);
        assert!(parsed.invalid.is_empty(), "{:?}", parsed.invalid);
        let ids: Vec<(&str, u64, &str)> = parsed
            .lines
            .iter()
            .map(|l| (l.id.as_str(), l.seq, l.model.as_str()))
            .collect();
        assert_eq!(
            ids,
            [
                ("a", 1, "small"),
                ("2", 3, "qwen/qwen3-4b"),
                ("c", 4, "gemma")
            ]
        );
        let Ok(LineTask::Chat { request }) = &parsed.lines[0].task else {
            panic!("a chat")
        };
        assert_eq!(request.choices, ["yes", "no"], "the job's contract");
        assert_eq!(request.options.priority, Priority::Batch);
        let Ok(LineTask::Chat { request }) = &parsed.lines[1].task else {
            panic!("a chat")
        };
        assert_eq!(
            request.choices,
            ["bug", "feature"],
            "the line's own contract"
        );
    }

    #[test]
    fn each_bad_line_is_named_by_its_number_and_a_repeated_id_once() {
        let file = [
            json!({"id": "a", "input": "fine"}).to_string(),
            "{not json".to_string(),
            json!({"id": "a", "input": "again"}).to_string(),
            json!({"id": "b", "input": "x", "schema": 7}).to_string(),
            json!({"id": "c", "prompt": "typo"}).to_string(),
            json!({"custom_id": "d", "method": "GET", "url": "/v1/chat/completions", "body": {}})
                .to_string(),
        ]
        .join("\n");
        let parsed = parse(&file, &BatchDefaults::default());
        let lines: Vec<u64> = parsed.invalid.iter().map(|l| l.line).collect();
        assert_eq!(lines, [2, 3, 4, 5, 6]);
        assert!(parsed.invalid[1].error.contains("already on line 1"));
        assert!(
            parsed.invalid[2].error.contains("schema"),
            "{:?}",
            parsed.invalid[2]
        );
        assert!(
            parsed.invalid[3].error.contains("prompt"),
            "{:?}",
            parsed.invalid[3]
        );
        assert_eq!(
            parsed.lines.iter().filter(|l| l.id == "a").count(),
            1,
            "results hold each id once"
        );
        assert!(describe(&parsed.invalid).starts_with("line 2: not JSON"));
    }
}
