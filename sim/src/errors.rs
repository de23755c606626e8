//! LM Studio's error replies as the simulator gives them: the v1 shape with its status, and the
//! wordings real servers use.

/// An error as LM Studio's v1 API shapes it: `{"error":{type, message, code?, param?}}` with a
/// status.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ApiError {
    pub status: u16,
    pub kind: &'static str,
    pub message: String,
    pub code: Option<&'static str>,
    pub param: Option<&'static str>,
}

/// What a dead instance answers with (#1730, #927): on `/api/v1/chat` as a v1 error object, on
/// `/v1/embeddings` as a plain string.
pub(crate) const CRASH_MESSAGE: &str =
    "The model has crashed without additional information. (Exit code: null)";

pub(crate) const NO_MODELS_LOADED: &str =
    "No models loaded. Please load a model in the developer page or use the 'lms load' command.";

impl ApiError {
    pub fn new(status: u16, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind,
            message: message.into(),
            code: None,
            param: None,
        }
    }

    pub fn invalid_request(message: impl Into<String>) -> Self {
        ApiError::new(400, "invalid_request", message)
    }

    pub fn model_not_found(what: &str) -> Self {
        ApiError {
            code: Some("model_not_found"),
            ..ApiError::new(
                404,
                "model_not_found",
                format!(
                    "Model \"{what}\" not found. Please specify a valid model key or instance id."
                ),
            )
        }
    }

    pub fn crashed() -> Self {
        ApiError::new(400, "model_not_loaded", CRASH_MESSAGE)
    }

    /// A load that took the engine down, a CUDA out-of-memory included (#2295): no memory wording.
    pub fn load_failed() -> Self {
        ApiError::new(
            500,
            "model_load_failed",
            "Error loading model. (Exit code: null). Unknown error. Try a different model and/or config.",
        )
    }

    pub fn context_overflow(prompt_tokens: u64, context_length: u32) -> Self {
        ApiError::new(
            400,
            "exceed_context_size_error",
            format!(
                "Trying to keep the first {prompt_tokens} tokens when context the overflows. However, the model is loaded with context length of only {context_length} tokens, which is not enough. Try to load the model with a larger context length, or provide a shorter input"
            ),
        )
    }
}
