//! `lmsd-ctl eval FILE.jsonl`: a labelled file run on each model as batch-priority tasks, and
//! per model how often it was right, how often it kept the contract, how fast, how many
//! tokens, and what the same work would have cost at the paid prices — how a user decides what
//! is safe to offload.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use lmsd_proto::{
    ChatOutcome, ChatRequest, Client, ClientError, ErrorCode, ModelKind, Priority, Request,
    SavingsRequest, TaskOptions,
};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::task::JoinSet;

/// Lines in flight at once, per model.
const IN_FLIGHT: usize = 4;

/// One line of the file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    input: String,
    /// The label, or the JSON value, a right answer is equal to.
    expected: Value,
    #[serde(default)]
    system: Option<String>,
    #[serde(default)]
    schema: Option<Value>,
    #[serde(default)]
    choices: Vec<String>,
}

impl Case {
    fn has_contract(&self) -> bool {
        self.schema.is_some() || !self.choices.is_empty()
    }

    fn request(&self, model: &str, settings: &Settings) -> ChatRequest {
        ChatRequest {
            model: model.to_owned(),
            input: self.input.clone(),
            system_prompt: self.system.clone(),
            temperature: Some(0.0),
            max_output_tokens: settings.max_output_tokens,
            schema: self.schema.clone(),
            choices: self.choices.clone(),
            check_only: settings.check_only && self.has_contract(),
            options: TaskOptions {
                priority: Priority::Batch,
                tag: Some("eval".into()),
                ..TaskOptions::default()
            },
            ..ChatRequest::default()
        }
    }

    /// Whether `answer` is the expected one: the contract's parsed value, else the text.
    fn is_right(&self, answer: &ChatOutcome) -> bool {
        match &answer.json {
            Some(value) => *value == self.expected,
            None => self.expected.as_str() == Some(answer.content.trim()),
        }
    }
}

/// How every line runs.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Check the contracts without constraining the engine.
    pub check_only: bool,
    pub max_output_tokens: Option<u32>,
}

/// Reads and checks every line; the first bad one refuses the file, naming its line.
fn read_cases(path: &Path) -> Result<Vec<Case>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut cases = Vec::new();
    for (number, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let case: Case = serde_json::from_str(line)
            .map_err(|e| format!("{} line {}: {e}", path.display(), number + 1))?;
        if case.input.trim().is_empty() {
            return Err(format!(
                "{} line {}: input is empty",
                path.display(),
                number + 1
            ));
        }
        if case.schema.is_some() && !case.choices.is_empty() {
            return Err(format!(
                "{} line {}: give schema or choices, not both",
                path.display(),
                number + 1
            ));
        }
        cases.push(case);
    }
    if cases.is_empty() {
        return Err(format!("{} holds no lines to evaluate", path.display()));
    }
    Ok(cases)
}

/// One model's figures.
#[derive(Debug, Default)]
struct Tally {
    lines: u64,
    right: u64,
    contract_lines: u64,
    contract_kept: u64,
    /// Lines that failed for another reason than their answer (the engine, a deadline), by
    /// error code.
    errors: BTreeMap<String, u64>,
    latencies_ms: Vec<u64>,
    input_tokens: u64,
    output_tokens: u64,
}

impl Tally {
    fn add(&mut self, case: &Case, result: &Result<ChatOutcome, ClientError>) {
        self.lines += 1;
        self.contract_lines += u64::from(case.has_contract());
        match result {
            Ok(answer) => {
                self.right += u64::from(case.is_right(answer));
                self.contract_kept += u64::from(answer.contract.is_some_and(|c| c.passed));
                self.latencies_ms.push(answer.task.total_ms);
                self.input_tokens += answer.usage.input_tokens;
                self.output_tokens += answer.usage.total_output_tokens;
            }
            Err(ClientError::Remote(wire)) if wire.code == ErrorCode::OutputInvalid => {}
            Err(ClientError::Remote(wire)) => {
                *self.errors.entry(wire.code.to_string()).or_default() += 1
            }
            Err(other) => *self.errors.entry(other.to_string()).or_default() += 1,
        }
    }

    fn p50_ms(&self) -> Option<u64> {
        let mut sorted = self.latencies_ms.clone();
        sorted.sort_unstable();
        sorted.get(sorted.len().saturating_sub(1) / 2).copied()
    }

    fn json(&self, model: &str, prices: (f64, f64)) -> Value {
        let share = |n: u64, of: u64| (of > 0).then(|| n as f64 / of as f64);
        json!({
            "model": model,
            "lines": self.lines,
            "right": self.right,
            "accuracy": share(self.right, self.lines),
            "contract_lines": self.contract_lines,
            "contract_kept": self.contract_kept,
            "contract_pass_rate": share(self.contract_kept, self.contract_lines),
            "errors": self.errors.values().sum::<u64>(),
            "errors_by_code": self.errors,
            "p50_ms": self.p50_ms(),
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "usd_at_paid_prices": (self.input_tokens as f64 * prices.0 + self.output_tokens as f64 * prices.1) / 1e6,
        })
    }
}

/// Where the run is, for a person watching: a bar on a terminal, a line per tenth otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    total: u64,
    done: u64,
}

impl Progress {
    fn new(total: u64, quiet: bool) -> Self {
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let bar = indicatif::ProgressBar::new(total);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{msg:30} [{bar:30}] {pos}/{len} lines, {eta} left",
            ) {
                bar.set_style(style);
            }
            bar
        });
        Progress {
            bar,
            total,
            done: 0,
        }
    }

    fn step(&mut self, model: &str) {
        self.done += 1;
        match &self.bar {
            Some(bar) => {
                bar.set_message(model.to_owned());
                bar.inc(1);
            }
            None if self.done * 10 / self.total != (self.done - 1) * 10 / self.total => {
                eprintln!("lmsd-ctl: eval: {}/{} lines", self.done, self.total);
            }
            None => {}
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// The models `--models` names: a list, `all-loaded` (the default) or `all`.
async fn models(client: &mut Client, wanted: &str) -> Result<Vec<String>, String> {
    match wanted {
        "all-loaded" => {
            let status = client.status().await.map_err(|e| e.to_string())?;
            let mut loaded: Vec<String> = status.instances.into_iter().map(|i| i.model).collect();
            loaded.sort();
            loaded.dedup();
            if loaded.is_empty() {
                return Err("no model is loaded: load one, or name them with --models a,b (or --models all)".into());
            }
            Ok(loaded)
        }
        "all" => {
            let list = client.models().await.map_err(|e| e.to_string())?;
            Ok(list
                .models
                .into_iter()
                .filter(|m| m.kind == ModelKind::Llm)
                .map(|m| m.key)
                .collect())
        }
        named => Ok(named
            .split(',')
            .map(str::trim)
            .filter(|m| !m.is_empty())
            .map(str::to_owned)
            .collect()),
    }
}

pub async fn run(
    socket: &Path,
    file: &Path,
    wanted: &str,
    settings: Settings,
    json: bool,
) -> ExitCode {
    let cases = match read_cases(file) {
        Ok(cases) => Arc::new(cases),
        Err(error) => {
            eprintln!("lmsd-ctl: {error}");
            return ExitCode::from(2);
        }
    };
    let fail = |error: &ClientError| {
        eprintln!("lmsd-ctl: {error}");
        ExitCode::from(crate::exit_codes::for_error(error))
    };
    let mut client = match Client::connect(socket).await {
        Ok(client) => client,
        Err(error) => return fail(&error),
    };
    let models = match models(&mut client, wanted).await {
        Ok(models) => models,
        Err(error) => {
            eprintln!("lmsd-ctl: {error}");
            return ExitCode::from(4);
        }
    };
    let prices = match client
        .call(Request::Savings(SavingsRequest::default()), |_| {})
        .await
    {
        Ok(lmsd_proto::Outcome::Savings(report)) => {
            (report.input_usd_per_mtok, report.output_usd_per_mtok)
        }
        Ok(_) => (0.0, 0.0),
        Err(error) => return fail(&error),
    };
    let mut progress = Progress::new((cases.len() * models.len()) as u64, json);
    let mut rows = Vec::new();
    for model in &models {
        let mut tally = Tally::default();
        let mut running = JoinSet::new();
        let mut next = 0;
        while next < cases.len() || !running.is_empty() {
            while next < cases.len() && running.len() < IN_FLIGHT {
                let (cases, socket, model, index) =
                    (cases.clone(), socket.to_owned(), model.clone(), next);
                running.spawn(async move {
                    let mut client = Client::connect(&socket).await?;
                    let request = cases[index].request(&model, &settings);
                    let answer = client.chat(request, |_| {}).await;
                    Ok::<_, ClientError>((index, answer))
                });
                next += 1;
            }
            match running.join_next().await {
                Some(Ok(Ok((index, answer)))) => {
                    tally.add(&cases[index], &answer);
                    progress.step(model);
                }
                Some(Ok(Err(error))) => {
                    progress.finish();
                    return fail(&error);
                }
                // A line whose worker died still counts, as an error, so the sums add up.
                Some(Err(error)) => {
                    tally.lines += 1;
                    *tally.errors.entry(format!("lost: {error}")).or_default() += 1;
                    progress.step(model);
                }
                None => {}
            }
        }
        rows.push(tally.json(model, prices));
    }
    progress.finish();
    if json {
        println!(
            "{}",
            json!({ "file": file.display().to_string(), "models": rows })
        );
    } else {
        print_table(&rows);
    }
    ExitCode::SUCCESS
}

fn print_table(rows: &[Value]) {
    let percent = |v: &Value| {
        v.as_f64()
            .map_or("-".to_owned(), |s| format!("{:.0}%", s * 100.0))
    };
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r["model"].as_str().unwrap_or_default().to_owned(),
                format!("{}/{}", r["right"], r["lines"]),
                percent(&r["accuracy"]),
                percent(&r["contract_pass_rate"]),
                r["errors"].to_string(),
                r["p50_ms"]
                    .as_u64()
                    .map_or("-".into(), |ms| format!("{ms} ms")),
                r["input_tokens"].to_string(),
                r["output_tokens"].to_string(),
                format!("${:.4}", r["usd_at_paid_prices"].as_f64().unwrap_or(0.0)),
            ]
        })
        .collect();
    print!(
        "{}",
        crate::output::table(
            &[
                "MODEL",
                "RIGHT",
                "ACCURACY",
                "CONTRACT PASS",
                "ERRORS",
                "P50",
                "TOKENS IN",
                "TOKENS OUT",
                "WOULD COST"
            ],
            &table,
        )
    );
}
