//! Errors as they cross the wire: a stable snake_case code plus a message saying what to do.

use serde::{Deserialize, Serialize};

/// Stable error codes. Clients branch on these, never on message text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request line was not valid JSON, too long, or missing or wrong fields.
    BadRequest,
    /// The request's `"v"` is not a protocol version this daemon speaks.
    UnsupportedVersion,
    /// LM Studio could not be reached (connection refused, reset, timed out).
    BackendUnreachable,
    /// LM Studio answered with an error that no other code describes.
    BackendError,
    /// The model key or instance id is not known to LM Studio.
    ModelNotFound,
    /// LM Studio could not load the model for lack of memory.
    OutOfMemory,
    /// The model does not fit in lmsd's memory budget and nothing can give way.
    BudgetExceeded,
    /// The daemon is stopping and takes no new work.
    ShuttingDown,
    /// lmsd's queue is full (`[tasks] max_queue`); try again later.
    QueueFull,
    /// The task's deadline passed (queued, loading or running).
    DeadlineExceeded,
    /// The task was cancelled (`cancel`, or its client disconnected).
    Cancelled,
    /// The connecting user may not use this daemon (`[server] allow_uids` / `allow_gid`).
    PermissionDenied,
    /// A bug in lmsd; the message says what happened.
    Internal,
    /// The engine no longer has the conversation a session or `previous_response_id`
    /// continues (it restarted, or cleared its stored chats). The session is forgotten: its
    /// next message starts a new conversation.
    SessionLost,
    /// The input does not fit the model's context; the message names both sizes.
    ContextExceeded,
    /// No answer kept the task's contract (its schema, choices or JSON object), after a retry
    /// and on every candidate; `invalid_output` carries the problems and the last answer.
    OutputInvalid,
    /// A code this client does not know yet (sent by a newer daemon).
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// Every code this version of lmsd sends (all but `Unknown`).
    pub const KNOWN: [ErrorCode; 16] = [
        ErrorCode::BadRequest,
        ErrorCode::UnsupportedVersion,
        ErrorCode::BackendUnreachable,
        ErrorCode::BackendError,
        ErrorCode::ModelNotFound,
        ErrorCode::OutOfMemory,
        ErrorCode::BudgetExceeded,
        ErrorCode::ShuttingDown,
        ErrorCode::QueueFull,
        ErrorCode::DeadlineExceeded,
        ErrorCode::Cancelled,
        ErrorCode::PermissionDenied,
        ErrorCode::Internal,
        ErrorCode::SessionLost,
        ErrorCode::ContextExceeded,
        ErrorCode::OutputInvalid,
    ];

    /// The snake_case name used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::BackendUnreachable => "backend_unreachable",
            ErrorCode::BackendError => "backend_error",
            ErrorCode::ModelNotFound => "model_not_found",
            ErrorCode::OutOfMemory => "out_of_memory",
            ErrorCode::BudgetExceeded => "budget_exceeded",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::PermissionDenied => "permission_denied",
            ErrorCode::QueueFull => "queue_full",
            ErrorCode::DeadlineExceeded => "deadline_exceeded",
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::Internal => "internal",
            ErrorCode::SessionLost => "session_lost",
            ErrorCode::ContextExceeded => "context_exceeded",
            ErrorCode::OutputInvalid => "output_invalid",
            ErrorCode::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `{"code": "...", "message": "..."}`: the error object of an error reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct WireError {
    pub code: ErrorCode,
    pub message: String,
    /// With `output_invalid`: what was wrong with the answer, and the answer itself (sent to
    /// the client only; lmsd logs neither).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invalid_output: Option<Box<InvalidOutput>>,
}

/// Why an answer broke its contract, and the answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvalidOutput {
    /// Each problem found: "not JSON: …", "\"x\" is not one of the choices", a schema
    /// violation with the path it is at.
    pub errors: Vec<String>,
    /// The last answer, as the model gave it.
    pub output: String,
}

impl WireError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        WireError {
            code,
            message: message.into(),
            invalid_output: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_serialize_as_their_documented_names() {
        for code in ErrorCode::KNOWN {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            assert_eq!(serde_json::from_str::<ErrorCode>(&json).unwrap(), code);
        }
    }

    #[test]
    fn a_code_from_a_newer_daemon_reads_as_unknown() {
        let code: ErrorCode = serde_json::from_str("\"rate_limited\"").unwrap();
        assert_eq!(code, ErrorCode::Unknown);
    }
}
