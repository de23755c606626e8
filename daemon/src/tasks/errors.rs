//! Why a task or request failed, and the one place that maps it to a wire code.

use lmsd_proto::{ContractKind, ErrorCode, InvalidOutput, WireError};

use crate::backend::BackendError;
use crate::pool::PoolError;

/// Why a request failed. Mapped to wire codes in one place: [`TaskError::to_wire`].
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("the engine answered with neither message nor reasoning text (instance {instance})")]
    EmptyReply { instance: String },
    #[error("no model meets the task's needs{0}; `lmsd-ctl models` lists what there is")]
    NoModel(String),
    #[error("the task's deadline passed after {0} ms")]
    DeadlineExceeded(u64),
    #[error("the task was cancelled")]
    Cancelled,
    /// The engine's conversation behind a session is gone (see
    /// [`BackendError::ConversationLost`]); the session is forgotten so it can start afresh.
    #[error("session {session:?} lost its conversation on {model} ({source}); lmsd has forgotten it, so the session's next message starts a new conversation")]
    SessionLost {
        session: String,
        model: String,
        source: BackendError,
    },
    /// A relayed stream broke after part of it reached the client: not retried, which would
    /// send that part twice.
    #[error("the engine's stream broke after part of the answer was sent, so lmsd did not retry it: {source}")]
    StreamBroken { source: BackendError },
    /// A request lmsd refuses before it reaches the engine.
    #[error("{0}")]
    BadRequest(String),
    /// No answer kept the contract. What was wrong, and the answer, go to the client in
    /// `invalid_output` and nowhere else: this message, which logs may show, holds neither.
    #[error("no answer kept the task's {kind} contract (answers tried: {attempts}); the problems and the last answer are in the error's invalid_output")]
    OutputInvalid {
        kind: ContractKind,
        attempts: u32,
        problems: Vec<String>,
        output: String,
    },
}

fn backend_code(error: &BackendError) -> ErrorCode {
    match error {
        BackendError::Unreachable { .. }
        | BackendError::ReplyLost { .. }
        | BackendError::Timeout { .. } => ErrorCode::BackendUnreachable,
        BackendError::ModelNotFound { .. } => ErrorCode::ModelNotFound,
        BackendError::Unsupported { .. } => ErrorCode::BadRequest,
        BackendError::ConversationLost { .. } => ErrorCode::SessionLost,
        BackendError::ContextExceeded { .. } => ErrorCode::ContextExceeded,
        BackendError::OutOfMemory { .. } => ErrorCode::OutOfMemory,
        BackendError::Unauthorized { .. }
        | BackendError::LoadFailed { .. }
        | BackendError::InstanceGone { .. }
        | BackendError::Api { .. }
        | BackendError::Malformed { .. } => ErrorCode::BackendError,
    }
}

impl TaskError {
    pub fn to_wire(&self) -> WireError {
        let code = match self {
            TaskError::Backend(error) | TaskError::Pool(PoolError::Backend(error)) => {
                backend_code(error)
            }
            TaskError::Pool(PoolError::NotFound { .. }) | TaskError::NoModel(_) => {
                ErrorCode::ModelNotFound
            }
            TaskError::Pool(PoolError::BudgetExceeded { .. }) => ErrorCode::BudgetExceeded,
            TaskError::Pool(PoolError::Pinned { .. } | PoolError::Config(_))
            | TaskError::BadRequest(_) => ErrorCode::BadRequest,
            TaskError::Pool(
                PoolError::ContextTooSmall { .. } | PoolError::ContextUnavailable { .. },
            ) => ErrorCode::ContextExceeded,
            TaskError::Pool(PoolError::ShuttingDown) => ErrorCode::ShuttingDown,
            TaskError::Pool(PoolError::QueueFull(_)) => ErrorCode::QueueFull,
            TaskError::Pool(PoolError::DeadlineExceeded) | TaskError::DeadlineExceeded(_) => {
                ErrorCode::DeadlineExceeded
            }
            TaskError::Cancelled => ErrorCode::Cancelled,
            TaskError::OutputInvalid { .. } => ErrorCode::OutputInvalid,
            TaskError::SessionLost { .. } => ErrorCode::SessionLost,
            TaskError::Pool(PoolError::UnloadNotVerified { .. })
            | TaskError::EmptyReply { .. }
            | TaskError::StreamBroken { .. } => ErrorCode::BackendError,
        };
        let mut wire = WireError::new(code, self.to_string());
        if let TaskError::OutputInvalid {
            problems, output, ..
        } = self
        {
            // Not in the message: problems quote the answer, and messages reach logs (the
            // client's `--log` file among them).
            wire.invalid_output = Some(Box::new(InvalidOutput {
                errors: problems.clone(),
                output: output.clone(),
            }));
        }
        wire
    }

    pub(super) fn backend(&self) -> Option<&BackendError> {
        match self {
            TaskError::Backend(error) | TaskError::Pool(PoolError::Backend(error)) => Some(error),
            _ => None,
        }
    }

    /// Out of memory, or a failed load that may have been (LM Studio does not say).
    pub(super) fn is_out_of_memory(&self) -> bool {
        matches!(self, TaskError::Pool(PoolError::BudgetExceeded { .. }))
            || self.backend().is_some_and(BackendError::may_be_memory)
    }

    /// Worth trying the next candidate model after this?
    pub(super) fn next_candidate_may_help(&self) -> bool {
        matches!(
            self,
            TaskError::EmptyReply { .. }
                | TaskError::OutputInvalid { .. }
                | TaskError::Pool(
                    PoolError::NotFound { .. }
                        | PoolError::BudgetExceeded { .. }
                        | PoolError::ContextTooSmall { .. }
                        | PoolError::ContextUnavailable { .. }
                )
        ) || self.backend().is_some_and(|error| {
            error.may_be_memory()
                || matches!(
                    error,
                    BackendError::ModelNotFound { .. }
                        | BackendError::InstanceGone { .. }
                        | BackendError::ContextExceeded { .. }
                )
        })
    }
}
