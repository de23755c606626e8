//! `lmsd-ctl`: parse the command line, send one request to lmsd, print the answer.

mod batch;
mod calllog;
mod eval;
mod exit_codes;
mod output;
mod selftest;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use lmsd_proto::{
    CancelRequest, ChatRequest, Client, ClientError, EmbedRequest, Event, FitnessRequest,
    LoadRequest, LoadSettings, Needs, PinRequest, Priority, Request, SavingsGrouping,
    SavingsRequest, SessionsRequest, TaskOptions, Ttl, UnloadRequest, WireDuration, WireError,
};

/// Command line for lmsd, the LM Studio lifecycle daemon: run tasks on local models, manage
/// what is loaded, and see what lmsd is doing.
#[derive(Debug, Parser)]
#[command(version, after_help = exit_codes::help())]
struct Cli {
    /// lmsd's socket [default: $XDG_RUNTIME_DIR/lmsd/lmsd.sock].
    #[arg(long, global = true, env = "LMSD_SOCKET", value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Print the reply as JSON (one object per line), for scripts.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show the daemon, LM Studio's reachability, memory and the loaded instances.
    Status {
        /// Redraw every second while it changes, until interrupted.
        #[arg(long)]
        watch: bool,
    },
    /// Follow what lmsd does: loads, unloads and evictions, tasks, LM Studio up or down.
    Events,
    /// List LM Studio's models.
    Models,
    /// Load a model (does nothing if an instance is already loaded).
    Load {
        /// Model key, as `lmsd-ctl models` shows it.
        key: String,
        /// Context length in tokens (LM Studio only; llama-server takes its settings from its
        /// preset file).
        #[arg(long)]
        context_length: Option<u32>,
        /// Tokens per evaluation batch (LM Studio).
        #[arg(long)]
        eval_batch_size: Option<u32>,
        /// Flash attention on or off: true or false (LM Studio).
        #[arg(long)]
        flash_attention: Option<bool>,
        /// Experts to use, for mixture-of-experts models (LM Studio).
        #[arg(long)]
        num_experts: Option<u32>,
        /// Keep the KV cache in GPU memory: true or false (LM Studio).
        #[arg(long)]
        offload_kv_cache_to_gpu: Option<bool>,
        /// Idle TTL: a duration ("90s", "15m"), "0" (unload when idle) or "never".
        #[arg(long)]
        ttl: Option<Ttl>,
        /// Pin the model too: keep it loaded always.
        #[arg(long)]
        pin: bool,
    },
    /// Unload every instance of a model key (or one instance id, or all), and verify they are gone.
    Unload {
        /// Model key, or an instance id such as `qwen/qwen3-4b:2`.
        #[arg(required_unless_present = "all")]
        key: Option<String>,
        /// Treat KEY as an instance id only.
        #[arg(long, conflicts_with = "all")]
        instance: bool,
        /// Unload every instance except pinned ones.
        #[arg(long)]
        all: bool,
    },
    /// Keep a model loaded always: loaded now if needed, reloaded if anything unloads it.
    Pin {
        /// Model key.
        key: String,
    },
    /// Let a pinned model expire and be evicted again.
    Unpin {
        /// Model key.
        key: String,
    },
    /// Run one chat task and print the answer.
    Chat(Box<ChatArgs>),
    /// Embed texts and print one JSON array of numbers per line.
    Embed {
        /// An embedding model's key, or `auto`.
        model: String,
        /// Texts to embed; `-` reads one text per line from standard input.
        #[arg(required = true)]
        texts: Vec<String>,
        #[command(flatten)]
        queue: QueueArgs,
    },
    /// List queued and running tasks.
    Tasks,
    /// Cancel a queued or running task by its id (`lmsd-ctl tasks` shows them).
    Cancel { task_id: String },
    /// List stateful sessions (`sessions forget NAME` drops one).
    Sessions {
        #[command(subcommand)]
        action: Option<SessionsAction>,
    },
    /// Check the whole path: health, load, chat, unload, verify unloaded. Exits non-zero on the
    /// first failing step.
    Selftest {
        /// Model to test with [default: the smallest LLM].
        model: Option<String>,
    },
    /// Re-read lmsd's config file and apply what can change live (as SIGHUP does).
    Reload,
    /// lmsd's Prometheus metrics (as on the front door's /metrics).
    Metrics,
    /// Tokens served locally and the cost avoided at the paid prices in [savings].
    Savings {
        /// Only the last DUR, e.g. "24h", "7d".
        #[arg(long, value_name = "DUR")]
        since: Option<WireDuration>,
        /// Break down by model, agent (the tasks' --tag) or day.
        #[arg(long, value_name = "model|agent|day")]
        by: Option<SavingsGrouping>,
    },
    /// Run a labelled JSONL file on models and compare them: accuracy, contract pass rate,
    /// p50 latency, tokens, and what it would have cost at the paid prices. Each line is
    /// {"input": …, "expected": LABEL-OR-JSON, "choices"?: […], "schema"?: {…}, "system"?: …};
    /// lines run at batch priority and temperature 0.
    Eval {
        file: PathBuf,
        /// Models to compare: a comma-separated list, `all-loaded`, or `all` (every LLM).
        #[arg(long, value_name = "a,b|all-loaded|all", default_value = "all-loaded")]
        models: String,
        /// Check each line's contract without constraining the engine to it: how the bare
        /// models do.
        #[arg(long)]
        check_only: bool,
        /// Stop each answer at this many tokens (a bare model may ramble to its context's end).
        #[arg(long)]
        max_output_tokens: Option<u32>,
    },
    /// Batch jobs: a JSONL file of tasks run in the background at batch priority, durable
    /// across restarts, with results in input order.
    #[command(subcommand)]
    Batch(batch::BatchCommand),
    /// How often each model kept its contracts (--schema, --choices, --json-object): first
    /// try, after the retry, failed; from the ledger, so it survives restarts.
    Fitness {
        /// Only the last DUR, e.g. "24h", "7d".
        #[arg(long, value_name = "DUR")]
        since: Option<WireDuration>,
    },
}

#[derive(Debug, Subcommand)]
enum SessionsAction {
    /// Drop a session: its next task starts a new conversation.
    Forget { name: String },
}

/// Queueing options every task takes.
#[derive(Debug, Args)]
struct QueueArgs {
    /// interactive, normal or batch.
    #[arg(long, default_value = "normal")]
    priority: Priority,
    /// Deadline from submission, e.g. "30s", "5m" [default: lmsd's [tasks] default_timeout].
    #[arg(long)]
    timeout: Option<WireDuration>,
    /// Who is asking (an agent's name), for `lmsd-ctl savings --by agent`.
    #[arg(long, value_name = "NAME")]
    tag: Option<String>,
}

#[derive(Debug, Args)]
struct ChatArgs {
    /// Model key, loaded instance id, or `auto` (chosen by the needs below).
    model: String,
    /// The task text; `-` reads it from standard input.
    task: String,
    /// System prompt.
    #[arg(long)]
    system: Option<String>,
    /// Sampling temperature, in the engine's range: 0 to 1 on LM Studio, 0 to 2 on
    /// llama-server.
    #[arg(long)]
    temperature: Option<f64>,
    #[arg(long)]
    max_output_tokens: Option<u32>,
    /// Keep the reply on the engine and print its `response_id`, to continue it later with
    /// --previous-response-id (sessions do this by themselves).
    #[arg(long)]
    store: bool,
    /// Continue the conversation from this response (`resp_…`).
    #[arg(long)]
    previous_response_id: Option<String>,
    /// Continue the conversation kept by lmsd (session "default", or --session).
    #[arg(long)]
    stateful: bool,
    /// Continue the conversation kept under this name (implies --stateful).
    #[arg(long, value_name = "NAME")]
    session: Option<String>,
    /// Unload the instance once it is idle after this task.
    #[arg(long, conflicts_with = "keep")]
    unload_after: bool,
    /// Keep the instance loaded after this task.
    #[arg(long)]
    keep: bool,
    /// Idle TTL of the instance after this task: "90s", "15m", "0" or "never".
    #[arg(long, conflicts_with_all = ["keep", "unload_after"])]
    ttl: Option<Ttl>,
    /// With `auto`: the model must handle images.
    #[arg(long)]
    vision: bool,
    /// With `auto`: the model must reason.
    #[arg(long)]
    reasoning: bool,
    /// With `auto`: the model's context must hold at least this many tokens.
    #[arg(long, value_name = "TOKENS")]
    min_context: Option<u32>,
    /// Models to prefer (with `auto`) or fall back to, in order; repeatable.
    #[arg(long, value_name = "KEY")]
    prefer: Vec<String>,
    /// Context length to load the model with, if this task loads it.
    #[arg(long)]
    context_length: Option<u32>,
    #[command(flatten)]
    queue: QueueArgs,
    /// Contract: the answer must be one JSON value valid against this JSON Schema: a file, `-`
    /// for standard input, or the schema itself ('{"type":"object", …}'). The engine is
    /// constrained to it and lmsd checks the answer; the JSON alone is printed.
    #[arg(long, value_name = "FILE|-|JSON", conflicts_with_all = ["choices", "json_object", "stream"])]
    schema: Option<String>,
    /// Contract: the answer must be exactly one of these labels (comma-separated); the label
    /// alone is printed.
    #[arg(long, value_name = "LABEL,...", value_delimiter = ',', conflicts_with_all = ["json_object", "stream"])]
    choices: Vec<String>,
    /// Contract: the answer must be a JSON object; the JSON alone is printed.
    #[arg(long, conflicts_with = "stream")]
    json_object: bool,
    /// Check the contract without constraining the engine to it (how the bare model does).
    #[arg(long)]
    check_only: bool,
    /// An image for a vision model (PNG, JPEG, WebP or GIF); repeatable. With `auto` it
    /// implies --vision.
    #[arg(long, value_name = "FILE")]
    image: Vec<PathBuf>,
    /// Print the answer as it is generated.
    #[arg(long)]
    stream: bool,
    /// Append one JSON line per call to this file: time, model, instance, usage, timings,
    /// outcome (not the prompt or answer, unless --log-content).
    #[arg(long, value_name = "PATH")]
    log: Option<PathBuf>,
    /// Put the prompt and the answer in the --log line too.
    #[arg(long, requires = "log")]
    log_content: bool,
}

/// Standard input; or, when it cannot be read, the exit code after saying why.
fn read_stdin() -> Result<String, ExitCode> {
    std::io::read_to_string(std::io::stdin()).map_err(|error| {
        eprintln!("lmsd-ctl: cannot read standard input: {error}");
        ExitCode::from(2)
    })
}

/// A `--schema` argument: inline JSON, a file, or standard input (`-`, unless the task
/// already reads it).
fn read_schema(given: &str, stdin_taken: bool) -> Result<serde_json::Value, ExitCode> {
    let (text, from) = if given.trim_start().starts_with('{') {
        (given.to_owned(), "the --schema argument".to_owned())
    } else if given == "-" {
        if stdin_taken {
            eprintln!("lmsd-ctl: the task and --schema cannot both come from standard input");
            return Err(ExitCode::from(2));
        }
        (read_stdin()?, "standard input".to_owned())
    } else {
        match std::fs::read_to_string(given) {
            Ok(text) => (text, given.to_owned()),
            Err(error) => {
                eprintln!("lmsd-ctl: cannot read the schema file {given}: {error}");
                return Err(ExitCode::from(2));
            }
        }
    };
    serde_json::from_str(&text).map_err(|error| {
        eprintln!("lmsd-ctl: the schema in {from} is not JSON: {error}");
        ExitCode::from(2)
    })
}

impl ChatArgs {
    /// The schema `--schema` names: inline JSON, a file, or standard input.
    fn schema(&self) -> Result<Option<serde_json::Value>, ExitCode> {
        self.schema
            .as_deref()
            .map(|given| read_schema(given, self.task == "-"))
            .transpose()
    }

    /// The `--image` files as data URLs.
    fn images(&self) -> Result<Vec<String>, ExitCode> {
        use base64::Engine;
        self.image
            .iter()
            .map(|path| {
                let kind = match path
                    .extension()
                    .and_then(|e| e.to_str())
                    .map(str::to_lowercase)
                {
                    Some(e) if e == "png" => "png",
                    Some(e) if e == "jpg" || e == "jpeg" => "jpeg",
                    Some(e) if e == "webp" => "webp",
                    Some(e) if e == "gif" => "gif",
                    _ => {
                        eprintln!(
                            "lmsd-ctl: {} is not a PNG, JPEG, WebP or GIF file (by its name)",
                            path.display()
                        );
                        return Err(ExitCode::from(2));
                    }
                };
                let bytes = std::fs::read(path).map_err(|error| {
                    eprintln!("lmsd-ctl: cannot read {}: {error}", path.display());
                    ExitCode::from(2)
                })?;
                let data = base64::engine::general_purpose::STANDARD.encode(bytes);
                Ok(format!("data:image/{kind};base64,{data}"))
            })
            .collect()
    }

    fn into_request(
        self,
        input: String,
        schema: Option<serde_json::Value>,
        images: Vec<String>,
    ) -> ChatRequest {
        let session = self.session.or(self.stateful.then(|| "default".to_owned()));
        ChatRequest {
            model: self.model,
            input,
            images,
            system_prompt: self.system,
            temperature: self.temperature,
            max_output_tokens: self.max_output_tokens,
            previous_response_id: self.previous_response_id,
            stream: self.stream,
            ttl: self.ttl,
            session,
            unload_after: self.unload_after,
            keep: self.keep,
            context_length: self.context_length,
            store: self.store,
            schema,
            choices: self.choices,
            json_object: self.json_object,
            check_only: self.check_only,
            options: TaskOptions {
                priority: self.queue.priority,
                timeout: self.queue.timeout,
                needs: Needs {
                    vision: self.vision,
                    reasoning: self.reasoning,
                    min_context: self.min_context,
                    ..Needs::default()
                },
                prefer: self.prefer,
                tag: self.queue.tag,
            },
        }
    }
}

fn fail(error: &ClientError, json: bool) -> ExitCode {
    if json {
        if let ClientError::Remote(wire) = error {
            println!("{}", serde_json::json!({ "type": "error", "error": wire }));
        }
    }
    eprintln!("lmsd-ctl: {error}");
    if let ClientError::Remote(WireError {
        invalid_output: Some(invalid),
        ..
    }) = error
    {
        for problem in &invalid.errors {
            eprintln!("  {problem}");
        }
    }
    ExitCode::from(exit_codes::for_error(error))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let socket = cli
        .socket
        .unwrap_or_else(lmsd_proto::paths::default_socket_path);
    let json = cli.json;
    let mut log = None;
    let request = match cli.command {
        Command::Selftest { model } => return selftest::run(&socket, model, json).await,
        Command::Eval {
            file,
            models,
            check_only,
            max_output_tokens,
        } => {
            let settings = eval::Settings {
                check_only,
                max_output_tokens,
            };
            return eval::run(&socket, &file, &models, settings, json).await;
        }
        Command::Batch(command) => return batch::run(&socket, command, json).await,
        Command::Status { watch: true } => return output::watch_status(&socket, json).await,
        Command::Status { watch: false } => Request::Status,
        Command::Events => Request::Events,
        Command::Models => Request::Models,
        Command::Reload => Request::Reload,
        Command::Metrics => Request::Metrics,
        Command::Savings { since, by } => Request::Savings(SavingsRequest { since, by }),
        Command::Fitness { since } => Request::Fitness(FitnessRequest { since }),
        Command::Tasks => Request::Tasks,
        Command::Cancel { task_id } => Request::Cancel(CancelRequest { task_id }),
        Command::Sessions { action } => Request::Sessions(SessionsRequest {
            forget: action.map(|SessionsAction::Forget { name }| name),
        }),
        Command::Pin { key } => Request::Pin(PinRequest { model: key }),
        Command::Unpin { key } => Request::Unpin(PinRequest { model: key }),
        Command::Load {
            key,
            context_length,
            eval_batch_size,
            flash_attention,
            num_experts,
            offload_kv_cache_to_gpu,
            ttl,
            pin,
        } => Request::Load(LoadRequest {
            model: key,
            settings: LoadSettings {
                context_length,
                eval_batch_size,
                flash_attention,
                num_experts,
                offload_kv_cache_to_gpu,
            },
            ttl,
            pin,
        }),
        Command::Unload { key, instance, all } => Request::Unload(match (key, instance) {
            _ if all => UnloadRequest {
                all: true,
                ..UnloadRequest::default()
            },
            (key, true) => UnloadRequest {
                instance_id: key,
                ..UnloadRequest::default()
            },
            (key, false) => UnloadRequest {
                model: key,
                ..UnloadRequest::default()
            },
        }),
        Command::Embed {
            model,
            texts,
            queue,
        } => {
            let input = if texts == ["-"] {
                match read_stdin() {
                    Ok(text) => text
                        .lines()
                        .filter(|l| !l.trim().is_empty())
                        .map(str::to_owned)
                        .collect(),
                    Err(code) => return code,
                }
            } else {
                texts
            };
            let options = TaskOptions {
                priority: queue.priority,
                timeout: queue.timeout,
                tag: queue.tag,
                ..TaskOptions::default()
            };
            Request::Embed(EmbedRequest {
                model,
                input,
                options,
            })
        }
        Command::Chat(args) => {
            let input = if args.task == "-" {
                match read_stdin() {
                    Ok(text) => text,
                    Err(code) => return code,
                }
            } else {
                args.task.clone()
            };
            log = args.log.clone().map(|path| calllog::CallLog {
                path,
                content: args.log_content.then(|| input.clone()),
            });
            let schema = match args.schema() {
                Ok(schema) => schema,
                Err(code) => return code,
            };
            let images = match args.images() {
                Ok(images) => images,
                Err(code) => return code,
            };
            Request::Chat(args.into_request(input, schema, images))
        }
    };
    let streaming = matches!(&request, Request::Chat(chat) if chat.stream);
    let result = match Client::connect(&socket).await {
        Ok(mut client) => client.call(request, |event| print_event(event, json)).await,
        Err(error) => Err(error),
    };
    if let Some(log) = &log {
        if let Err(error) = log.append(&result) {
            eprintln!("lmsd-ctl: cannot append to {}: {error}", log.path.display());
        }
    }
    match result {
        Ok(outcome) => {
            output::print_outcome(&outcome, json, streaming);
            ExitCode::SUCCESS
        }
        Err(error) => fail(&error, json),
    }
}

/// Streamed events: the answer's text goes to stdout as it comes (or each event as a JSON line);
/// queue and load progress to stderr, for a person watching.
fn print_event(event: &Event, json: bool) {
    if json {
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(
            stdout,
            "{}",
            serde_json::to_string(event).unwrap_or_default()
        );
        return;
    }
    match event {
        Event::Delta { content } => {
            let mut stdout = std::io::stdout().lock();
            let _ = write!(stdout, "{content}");
            let _ = stdout.flush();
        }
        Event::Queued { task_id, position } => {
            eprintln!("lmsd-ctl: task {task_id} queued at position {position}")
        }
        Event::Load {
            model_instance_id,
            progress,
        } if *progress == 0.0 => {
            eprintln!("lmsd-ctl: loading {model_instance_id}…")
        }
        Event::Load { .. } | Event::Reasoning { .. } => {}
        daemon_event => output::print_daemon_event(daemon_event),
    }
}
