//! lmsd-ctl's exit codes: one table, read both to exit and to print them in `--help`.

use lmsd_proto::{ClientError, ErrorCode};

/// Exit code, what it means, and the wire error codes that lead to it.
const TABLE: [(u8, &str, &[ErrorCode]); 18] = [
    (0, "success", &[]),
    (
        1,
        "other failure (internal error, unreadable reply)",
        &[ErrorCode::Internal, ErrorCode::Unknown],
    ),
    (2, "bad command line", &[]),
    (
        3,
        "lmsd is not running or the socket cannot be reached",
        &[],
    ),
    (
        4,
        "lmsd rejected the request",
        &[ErrorCode::BadRequest, ErrorCode::UnsupportedVersion],
    ),
    (
        5,
        "the engine (LM Studio, llama-server) is unreachable",
        &[ErrorCode::BackendUnreachable],
    ),
    (
        6,
        "the engine answered with an error",
        &[ErrorCode::BackendError],
    ),
    (
        7,
        "no such model or instance, or none meets the needs",
        &[ErrorCode::ModelNotFound],
    ),
    (
        8,
        "the engine ran out of memory loading the model",
        &[ErrorCode::OutOfMemory],
    ),
    (9, "lmsd is shutting down", &[ErrorCode::ShuttingDown]),
    (
        10,
        "the model does not fit in lmsd's memory budget",
        &[ErrorCode::BudgetExceeded],
    ),
    (
        11,
        "this user may not use that lmsd",
        &[ErrorCode::PermissionDenied],
    ),
    (12, "lmsd's queue is full", &[ErrorCode::QueueFull]),
    (
        13,
        "the task's deadline passed",
        &[ErrorCode::DeadlineExceeded],
    ),
    (14, "the task was cancelled", &[ErrorCode::Cancelled]),
    (
        15,
        "the engine lost the session's conversation; the session starts afresh next time",
        &[ErrorCode::SessionLost],
    ),
    (
        16,
        "the input does not fit the model's context",
        &[ErrorCode::ContextExceeded],
    ),
    (
        17,
        "no answer kept the task's contract (schema, choices or JSON object)",
        &[ErrorCode::OutputInvalid],
    ),
];

/// Not running, or the socket cannot be reached.
const CANNOT_CONNECT: u8 = 3;
/// Anything without a code of its own.
const OTHER: u8 = 1;

/// The exit code for a failed request.
pub fn for_error(error: &ClientError) -> u8 {
    match error {
        ClientError::Connect { .. } => CANNOT_CONNECT,
        ClientError::Io(_) | ClientError::Closed | ClientError::BadReply(_) => OTHER,
        ClientError::Remote(wire) => TABLE
            .iter()
            .find(|(_, _, codes)| codes.contains(&wire.code))
            .map_or(OTHER, |(exit, _, _)| *exit),
    }
}

/// The table as `--help` shows it.
pub fn help() -> String {
    let mut text = String::from("Exit codes:");
    for (exit, meaning, codes) in TABLE {
        text.push_str(&format!("\n {exit:>2}  {meaning}"));
        if !codes.is_empty() && !codes.contains(&ErrorCode::Internal) {
            let names: Vec<&str> = codes.iter().map(|c| c.as_str()).collect();
            text.push_str(&format!(" ({})", names.join(", ")));
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_code_has_one_exit_code_and_help_lists_them_all() {
        for code in ErrorCode::KNOWN {
            let rows = TABLE.iter().filter(|(_, _, codes)| codes.contains(&code));
            assert_eq!(rows.count(), 1, "{code}");
        }
        let help = help();
        for (exit, _, codes) in TABLE {
            assert!(help.contains(&format!(" {exit:>2}  ")), "{exit}");
            for code in codes
                .iter()
                .filter(|c| **c != ErrorCode::Internal && **c != ErrorCode::Unknown)
            {
                assert!(help.contains(code.as_str()), "{code}");
            }
        }
        let remote = |code| ClientError::Remote(lmsd_proto::WireError::new(code, "x"));
        assert_eq!(for_error(&remote(ErrorCode::SessionLost)), 15);
        assert_eq!(for_error(&remote(ErrorCode::Unknown)), 1);
    }
}
