//! `lmsd-ctl`: parse the command line, send one request to lmsd, print the answer.

mod output;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use lmsd_proto::{
    ChatRequest, Client, ClientError, ErrorCode, Event, LoadRequest, PinRequest, Request, Ttl,
    UnloadRequest,
};

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  other failure (internal error, unreadable reply)
  2  bad command line
  3  lmsd is not running or the socket cannot be reached
  4  lmsd rejected the request (bad_request, unsupported_version)
  5  LM Studio is unreachable (backend_unreachable)
  6  LM Studio answered with an error (backend_error)
  7  no such model or instance (model_not_found)
  8  LM Studio ran out of memory loading the model (out_of_memory)
  9  lmsd is shutting down (shutting_down)
  10  the model does not fit in lmsd's memory budget (budget_exceeded)
 11  this user may not use that lmsd (permission_denied)";

/// Command line for lmsd, the LM Studio lifecycle daemon.
#[derive(Debug, Parser)]
#[command(version, after_help = EXIT_CODES)]
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
    /// Show the daemon, LM Studio's reachability and the loaded instances.
    Status,
    /// List LM Studio's models.
    Models,
    /// Load a model (does nothing if an instance is already loaded).
    Load {
        /// Model key, as `lmsd-ctl models` shows it.
        key: String,
        #[arg(long)]
        context_length: Option<u32>,
        #[arg(long)]
        eval_batch_size: Option<u32>,
        #[arg(long)]
        flash_attention: Option<bool>,
        #[arg(long)]
        num_experts: Option<u32>,
        #[arg(long)]
        offload_kv_cache_to_gpu: Option<bool>,
        /// Idle TTL: a duration ("90s", "15m"), "0" (unload when idle) or "never".
        #[arg(long)]
        ttl: Option<Ttl>,
        /// Pin the model too: keep it loaded always.
        #[arg(long)]
        pin: bool,
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
    /// Re-read lmsd's config file and apply what can change live (as SIGHUP does).
    Reload,
    /// Unload every instance of a model key (or one instance id), and verify they are gone.
    Unload {
        /// Model key, or an instance id such as `qwen/qwen3-4b:2`.
        key: String,
        /// Treat KEY as an instance id only.
        #[arg(long)]
        instance: bool,
    },
    /// Run one chat turn and print the answer.
    Chat {
        /// Model key or loaded instance id.
        model: String,
        /// The task text; `-` reads it from standard input.
        task: String,
        #[arg(long)]
        temperature: Option<f64>,
        #[arg(long)]
        max_output_tokens: Option<u32>,
        /// Continue the conversation from this response (`resp_…`).
        #[arg(long)]
        previous_response_id: Option<String>,
        /// System prompt.
        #[arg(long)]
        system: Option<String>,
        /// Print the answer as it is generated.
        #[arg(long)]
        stream: bool,
        /// Idle TTL of the instance after this task: "90s", "15m", "0" or "never".
        #[arg(long)]
        ttl: Option<Ttl>,
    },
}

impl Command {
    fn into_request(self) -> std::io::Result<Request> {
        Ok(match self {
            Command::Status => Request::Status,
            Command::Reload => Request::Reload,
            Command::Models => Request::Models,
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
                context_length,
                eval_batch_size,
                flash_attention,
                num_experts,
                offload_kv_cache_to_gpu,
                ttl,
                pin,
            }),
            Command::Pin { key } => Request::Pin(PinRequest { model: key }),
            Command::Unpin { key } => Request::Unpin(PinRequest { model: key }),
            Command::Unload { key, instance } => Request::Unload(if instance {
                UnloadRequest {
                    model: None,
                    instance_id: Some(key),
                }
            } else {
                UnloadRequest {
                    model: Some(key),
                    instance_id: None,
                }
            }),
            Command::Chat {
                model,
                task,
                temperature,
                max_output_tokens,
                previous_response_id,
                system,
                stream,
                ttl,
            } => {
                let input = if task == "-" {
                    std::io::read_to_string(std::io::stdin())?
                } else {
                    task
                };
                Request::Chat(ChatRequest {
                    model,
                    input,
                    system_prompt: system,
                    temperature,
                    max_output_tokens,
                    previous_response_id,
                    stream,
                    ttl,
                })
            }
        })
    }
}

fn exit_code(error: &ClientError) -> u8 {
    match error {
        ClientError::Connect { .. } => 3,
        ClientError::Io(_) | ClientError::Closed | ClientError::BadReply(_) => 1,
        ClientError::Remote(wire) => match wire.code {
            ErrorCode::BadRequest | ErrorCode::UnsupportedVersion => 4,
            ErrorCode::BackendUnreachable => 5,
            ErrorCode::BackendError => 6,
            ErrorCode::ModelNotFound => 7,
            ErrorCode::OutOfMemory => 8,
            ErrorCode::ShuttingDown => 9,
            ErrorCode::BudgetExceeded => 10,
            ErrorCode::PermissionDenied => 11,
            ErrorCode::Internal | ErrorCode::Unknown => 1,
        },
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let socket = cli
        .socket
        .unwrap_or_else(lmsd_proto::paths::default_socket_path);
    let json = cli.json;
    let request = match cli.command.into_request() {
        Ok(request) => request,
        Err(error) => {
            eprintln!("lmsd-ctl: cannot read the task from standard input: {error}");
            return ExitCode::from(2);
        }
    };
    let streaming = matches!(&request, Request::Chat(chat) if chat.stream);
    let result = match Client::connect(&socket).await {
        Ok(mut client) => client.call(request, |event| print_event(event, json)).await,
        Err(error) => Err(error),
    };
    match result {
        Ok(outcome) => {
            output::print_outcome(&outcome, json, streaming);
            ExitCode::SUCCESS
        }
        Err(error) => {
            if json {
                if let ClientError::Remote(wire) = &error {
                    println!("{}", serde_json::json!({ "type": "error", "error": wire }));
                }
            }
            eprintln!("lmsd-ctl: {error}");
            ExitCode::from(exit_code(&error))
        }
    }
}

/// Streamed events: the answer's text goes to stdout as it comes (or each event as a JSON line).
fn print_event(event: &Event, json: bool) {
    let mut stdout = std::io::stdout().lock();
    if json {
        let _ = writeln!(
            stdout,
            "{}",
            serde_json::to_string(event).unwrap_or_default()
        );
    } else if let Event::Delta { content } = event {
        let _ = write!(stdout, "{content}");
        let _ = stdout.flush();
    }
}
