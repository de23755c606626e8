//! `lmsd-ctl batch …`: submit a job file, follow it (a live bar on a terminal, a plain line
//! every few seconds otherwise), list jobs, fetch results as JSONL in input order, cancel,
//! delete. Each is one socket request; `--wait` polls `batch_status`.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Subcommand;
use lmsd_proto::{
    BatchDefaults, BatchJob, BatchJobRequest, BatchState, BatchStatusRequest, BatchSubmitRequest,
    Client, Event, Outcome, Request,
};

/// How often `--wait` asks how the job is doing.
const POLL: Duration = Duration::from_millis(250);
/// Without a terminal, a progress line this often.
const PLAIN_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, Subcommand)]
pub enum BatchCommand {
    /// Submit a JSONL job file (`-` reads standard input): one task per line, lmsd's form
    /// {"id","input","system"?,"model"?,"schema"?,"choices"?,"max_output_tokens"?} or
    /// OpenAI's batch form {"custom_id","method":"POST","url":"/v1/chat/completions","body":{…}}.
    /// Every line is checked first: a bad line refuses the job, naming its line number.
    Submit {
        file: String,
        /// The model of lines that name none: a key or `auto` [default: auto].
        #[arg(long)]
        model: Option<String>,
        /// The system prompt of lines that give none.
        #[arg(long)]
        system: Option<String>,
        /// A contract for every line without one: a JSON Schema (a file, `-`, or inline JSON).
        #[arg(long, value_name = "FILE|-|JSON", conflicts_with = "choices")]
        schema: Option<String>,
        /// A contract for every line without one: labels.
        #[arg(long, value_name = "LABEL,...", value_delimiter = ',')]
        choices: Vec<String>,
        #[arg(long)]
        max_output_tokens: Option<u32>,
        /// A name for `batch list`.
        #[arg(long)]
        name: Option<String>,
        /// Run the valid lines and record the invalid ones as failed, instead of refusing.
        #[arg(long)]
        skip_invalid: bool,
        /// Follow the job until it ends (exit 0: every line done; 1: some failed or it was
        /// cancelled).
        #[arg(long)]
        wait: bool,
    },
    /// A job's progress: done, failed, running, rate, ETA, loads (without an id: every job).
    Status { job_id: Option<String> },
    /// Every job lmsd keeps.
    List,
    /// A job's results as JSONL in input order: `id`, then `result` and `usage`, or `error`.
    Results {
        job_id: String,
        /// Write to FILE instead of standard output.
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Stop a job: lines not yet done will not run.
    Cancel { job_id: String },
    /// Delete a job and all lmsd stored of it (its inputs and results).
    Delete { job_id: String },
}

fn usage_error(message: String) -> ExitCode {
    eprintln!("lmsd-ctl: {message}");
    ExitCode::from(2)
}

async fn call(
    socket: &Path,
    request: Request,
    on_event: impl FnMut(&Event),
) -> Result<Outcome, ExitCode> {
    let result = match Client::connect(socket).await {
        Ok(mut client) => client.call(request, on_event).await,
        Err(error) => Err(error),
    };
    result.map_err(|error| super::fail(&error, false))
}

pub async fn run(socket: &Path, command: BatchCommand, json: bool) -> ExitCode {
    let request = match command {
        BatchCommand::Submit {
            file,
            model,
            system,
            schema,
            choices,
            max_output_tokens,
            name,
            skip_invalid,
            wait,
        } => {
            let lines = if file == "-" {
                match super::read_stdin() {
                    Ok(text) => text,
                    Err(code) => return code,
                }
            } else {
                match std::fs::read_to_string(&file) {
                    Ok(text) => text,
                    Err(error) => return usage_error(format!("cannot read {file}: {error}")),
                }
            };
            let schema = match schema {
                Some(given) => match super::read_schema(&given, file == "-") {
                    Ok(schema) => Some(schema),
                    Err(code) => return code,
                },
                None => None,
            };
            let submit = BatchSubmitRequest {
                lines,
                defaults: BatchDefaults {
                    model,
                    system,
                    schema,
                    choices,
                    max_output_tokens,
                },
                skip_invalid,
                name,
            };
            let job = match call(socket, Request::BatchSubmit(submit), |_| {}).await {
                Ok(Outcome::Batch(job)) => job,
                Ok(other) => return unexpected(&other),
                Err(code) => return code,
            };
            if !wait {
                print_job_submitted(&job, json);
                return ExitCode::SUCCESS;
            }
            if !json {
                print_job_submitted(&job, false);
            }
            return follow(socket, job, json).await;
        }
        BatchCommand::Status { job_id } => Request::BatchStatus(BatchStatusRequest { job_id }),
        BatchCommand::List => Request::BatchStatus(BatchStatusRequest::default()),
        BatchCommand::Results { job_id, output } => return results(socket, job_id, output).await,
        BatchCommand::Cancel { job_id } => Request::BatchCancel(BatchJobRequest { job_id }),
        BatchCommand::Delete { job_id } => Request::BatchDelete(BatchJobRequest { job_id }),
    };
    match call(socket, request, |_| {}).await {
        Ok(outcome) if json => {
            println!("{}", serde_json::to_string(&outcome).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Ok(Outcome::Batch(job)) => {
            println!("{}", describe(&job));
            ExitCode::SUCCESS
        }
        Ok(Outcome::BatchList(list)) if list.jobs.is_empty() => {
            println!("no batch jobs");
            ExitCode::SUCCESS
        }
        Ok(Outcome::BatchList(list)) => {
            for job in &list.jobs {
                println!("{}", describe(job));
            }
            ExitCode::SUCCESS
        }
        Ok(Outcome::BatchDeleted(deleted)) if deleted.deleted => {
            println!("deleted {} and everything stored with it", deleted.job_id);
            ExitCode::SUCCESS
        }
        Ok(Outcome::BatchDeleted(deleted)) => {
            eprintln!("lmsd-ctl: no batch job {}", deleted.job_id);
            ExitCode::from(4)
        }
        Ok(other) => unexpected(&other),
        Err(code) => code,
    }
}

fn unexpected(outcome: &Outcome) -> ExitCode {
    eprintln!("lmsd-ctl: unexpected reply: {outcome:?}");
    ExitCode::from(1)
}

fn print_job_submitted(job: &BatchJob, json: bool) {
    if json {
        println!("{}", serde_json::to_string(job).unwrap_or_default());
        return;
    }
    let invalid = if job.invalid.is_empty() {
        String::new()
    } else {
        format!(", {} invalid lines recorded as failed", job.invalid.len())
    };
    println!("submitted {}: {} lines{invalid}", job.job_id, job.total);
    for line in job.invalid.iter().take(10) {
        eprintln!("  line {}: {}", line.line, line.error);
    }
}

/// One line for people: state, counts, pace.
pub fn describe(job: &BatchJob) -> String {
    let state = job.state.name();
    let name = job
        .name
        .as_deref()
        .map_or(String::new(), |n| format!(" ({n})"));
    let mut text = format!(
        "{}{name} {state}: {}/{} done, {} failed, {} running, {} loads",
        job.job_id, job.done, job.total, job.failed, job.running, job.loads
    );
    if job.state == BatchState::Running && job.rate_per_s > 0.0 {
        text.push_str(&format!(", {:.1} lines/s", job.rate_per_s));
    }
    if let Some(eta) = job.eta_s {
        text.push_str(&format!(", about {} left", crate::output::duration(eta)));
    }
    if let Some(error) = &job.error {
        text.push_str(&format!(" — {error}"));
    }
    text
}

/// Follows a job to its end with a bar (or plain lines), then prints how it ended.
async fn follow(socket: &Path, mut job: BatchJob, json: bool) -> ExitCode {
    let bar = (!json && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new(job.total);
        if let Ok(style) =
            indicatif::ProgressStyle::with_template("[{bar:30}] {pos}/{len} lines {msg}")
        {
            bar.set_style(style);
        }
        bar
    });
    let mut last_line = Instant::now();
    while matches!(job.state, BatchState::Running | BatchState::Paused) {
        tokio::time::sleep(POLL).await;
        let request = Request::BatchStatus(BatchStatusRequest {
            job_id: Some(job.job_id.clone()),
        });
        job = match call(socket, request, |_| {}).await {
            Ok(Outcome::Batch(job)) => job,
            Ok(other) => return unexpected(&other),
            Err(code) => return code,
        };
        let status = format!(
            "{} failed, {:.1}/s, {} loads{}",
            job.failed,
            job.rate_per_s,
            job.loads,
            job.error
                .as_deref()
                .map_or(String::new(), |e| format!(" — paused: {e}"))
        );
        match &bar {
            Some(bar) => {
                bar.set_position(job.done + job.failed);
                bar.set_message(status);
            }
            None if !json && last_line.elapsed() >= PLAIN_EVERY => {
                last_line = Instant::now();
                eprintln!("lmsd-ctl: {}", describe(&job));
            }
            None => {}
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    if json {
        println!("{}", serde_json::to_string(&job).unwrap_or_default());
    } else {
        println!("{}", describe(&job));
    }
    if job.state == BatchState::Completed && job.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// Writes a job's results as JSONL, to `output` or standard output.
async fn results(socket: &Path, job_id: String, output: Option<PathBuf>) -> ExitCode {
    // To a file, the lines are kept until lmsd has answered whole: a wrong id or an lmsd that
    // is down must not empty a results file already there.
    let mut kept = Vec::new();
    let mut sink: Box<dyn Write + '_> = match &output {
        Some(_) => Box::new(&mut kept),
        None => Box::new(std::io::stdout().lock()),
    };
    let mut failed = None;
    let request = Request::BatchResults(BatchJobRequest { job_id });
    let outcome = call(socket, request, |event| {
        if let Event::BatchLine { line } = event {
            if let Err(error) = writeln!(sink, "{line}") {
                failed.get_or_insert(error);
            }
        }
    })
    .await;
    let flushed = sink.flush();
    drop(sink);
    let written = match (&output, &outcome) {
        (Some(path), Ok(Outcome::BatchResults(_))) => std::fs::write(path, &kept).err(),
        _ => None,
    };
    match failed.or(flushed.err()).or(written) {
        // A reader that stopped early (`| head`) has what it wanted.
        Some(error) if error.kind() == std::io::ErrorKind::BrokenPipe => return ExitCode::SUCCESS,
        Some(error) => return usage_error(format!("cannot write the results: {error}")),
        None => {}
    }
    match outcome {
        Ok(Outcome::BatchResults(done)) => {
            if let Some(path) = output {
                eprintln!(
                    "lmsd-ctl: {} result lines written to {}",
                    done.lines,
                    path.display()
                );
            }
            ExitCode::SUCCESS
        }
        Ok(other) => unexpected(&other),
        Err(code) => code,
    }
}
