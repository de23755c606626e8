//! `lmsd-mcp`: lmsd's offload tools for coding agents (Claude Code, Codex, Cursor, OpenClaw,
//! any MCP client) as an MCP server over stdio. It talks to lmsd over its socket, as
//! `lmsd-ctl` does, and holds no model state of its own.

mod batch;
mod files;
mod tools;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use rmcp::ServiceExt;

/// MCP server over stdio for lmsd: `claude mcp add lmsd -- lmsd-mcp`.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// lmsd's socket [default: $XDG_RUNTIME_DIR/lmsd/lmsd.sock].
    #[arg(long, env = "LMSD_SOCKET", value_name = "PATH")]
    socket: Option<PathBuf>,
    /// A directory `local_task` may read files from, besides the client's MCP roots (or, when
    /// it names none, the directory lmsd-mcp started in); repeatable.
    #[arg(long, value_name = "DIR")]
    allow_dir: Vec<PathBuf>,
    /// Bytes read per file, and per task in total.
    #[arg(long, value_name = "N", default_value_t = 1 << 20)]
    max_file_bytes: u64,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    let socket = args
        .socket
        .unwrap_or_else(lmsd_proto::paths::default_socket_path);
    let mut allowed = Vec::new();
    for dir in args.allow_dir {
        match dir.canonicalize() {
            Ok(root) => allowed.push(root),
            Err(error) => {
                eprintln!(
                    "lmsd-mcp: cannot use {} as a directory to read: {error}",
                    dir.display()
                );
                return ExitCode::from(2);
            }
        }
    }
    let started_in = std::env::current_dir().and_then(|dir| dir.canonicalize());
    let access = files::Access {
        roots: started_in
            .into_iter()
            .chain(allowed.iter().cloned())
            .collect(),
        max_bytes: args.max_file_bytes,
    };
    let server = tools::LocalTools::new(socket, access, allowed);
    // stdout is the protocol; anything for a person goes to stderr.
    let running = match server.serve(rmcp::transport::stdio()).await {
        Ok(running) => running,
        Err(error) => {
            eprintln!("lmsd-mcp: the MCP session did not start: {error}");
            return ExitCode::from(1);
        }
    };
    match running.waiting().await {
        Ok(_) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("lmsd-mcp: {error}");
            ExitCode::from(1)
        }
    }
}
