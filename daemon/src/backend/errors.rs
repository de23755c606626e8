//! What can go wrong talking to an engine: [`BackendError`], and reading it out of a reply.
//! Every reply is checked for both its HTTP status and an `error` key in its body, because LM
//! Studio answers some errors with 200 and some with an HTML 500; and the wording is matched the
//! way real servers word it (see `lmstudio-api.md` §6 in the project's notes), because LM Studio
//! rarely says what it means in its error type.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::Value;

/// A failed call to the engine, classified for retry and for the wire.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    /// No connection could be made: the engine is not listening (down, restarting).
    #[error("the engine at {url} is unreachable: {detail}")]
    Unreachable { url: String, detail: String },
    /// The request went out, and the connection broke before its whole reply came back: the
    /// engine may have acted on it.
    #[error("the connection to the engine at {url} broke before its reply: {detail}")]
    ReplyLost { url: String, detail: String },
    #[error("the engine did not answer within {}", humantime::format_duration(*after))]
    Timeout { after: Duration },
    #[error("the engine rejected the API token: {message} (set token or token_file in [lmstudio] or [llama_server], or LMSD_LMSTUDIO_TOKEN / LMSD_LLAMA_SERVER_TOKEN)")]
    Unauthorized { message: String },
    #[error("the engine has no such model: {message}")]
    ModelNotFound { message: String },
    #[error("the engine could not load the model for lack of memory: {message}")]
    OutOfMemory { message: String },
    /// A load that failed without saying why. LM Studio reports a CUDA out-of-memory this way
    /// (`model_load_failed`), so lmsd treats it as possibly memory, and never re-sends it blindly.
    #[error("the engine failed to load the model (LM Studio reports running out of memory this way too): {message}")]
    LoadFailed { message: String },
    /// The instance a request named is no longer there: it crashed, was unloaded, or another
    /// model answered in its place.
    #[error("the instance is gone from the engine: {message}")]
    InstanceGone { message: String },
    /// The prompt does not fit the instance's context.
    #[error("the input does not fit the model's context{}: {message}", context_sizes(*.prompt_tokens, *.context_length))]
    ContextExceeded {
        message: String,
        prompt_tokens: Option<u64>,
        context_length: Option<u64>,
    },
    #[error("the engine answered HTTP {status}: {message}")]
    Api {
        status: u16,
        kind: Option<String>,
        message: String,
    },
    #[error("the engine sent an unreadable reply (HTTP {status}): {detail}")]
    Malformed { status: u16, detail: String },
    /// A continuation of a conversation the engine no longer has: LM Studio restarted or cleared
    /// its stored chats, the id came from elsewhere, or (llama-server) lmsd restarted.
    #[error("the engine no longer has the conversation that response id {response_id:?} continues: {why}")]
    ConversationLost { response_id: String, why: String },
    /// A request the engine cannot serve (load settings on llama-server, say).
    #[error("{what}")]
    Unsupported { what: String },
}

fn context_sizes(prompt_tokens: Option<u64>, context_length: Option<u64>) -> String {
    match (prompt_tokens, context_length) {
        (Some(prompt), Some(context)) => {
            format!(" (the prompt needs {prompt} tokens; the instance has {context})")
        }
        (None, Some(context)) => format!(" (the instance has {context} tokens of context)"),
        (Some(prompt), None) => format!(" (the prompt needs {prompt} tokens)"),
        (None, None) => String::new(),
    }
}

impl BackendError {
    /// Worth retrying after a pause: the server may answer next time.
    pub fn is_transient(&self) -> bool {
        match self {
            BackendError::Unreachable { .. }
            | BackendError::ReplyLost { .. }
            | BackendError::Timeout { .. }
            | BackendError::Malformed { .. } => true,
            BackendError::Api { status, .. } => *status >= 500,
            BackendError::Unauthorized { .. }
            | BackendError::ModelNotFound { .. }
            | BackendError::OutOfMemory { .. }
            | BackendError::LoadFailed { .. }
            | BackendError::InstanceGone { .. }
            | BackendError::ContextExceeded { .. }
            | BackendError::ConversationLost { .. }
            | BackendError::Unsupported { .. } => false,
        }
    }

    /// A load that may have failed for lack of memory: making room may help.
    pub fn may_be_memory(&self) -> bool {
        matches!(
            self,
            BackendError::OutOfMemory { .. } | BackendError::LoadFailed { .. }
        )
    }

    /// A failed call whose request may still have reached the engine and taken effect: the
    /// reply was lost on the way (a timeout, a cut connection, a success that could not be
    /// read). A refused connection or an error page means it did not.
    pub fn reply_lost(&self) -> bool {
        match self {
            BackendError::Timeout { .. } | BackendError::ReplyLost { .. } => true,
            BackendError::Malformed { status, .. } => (200..300).contains(status),
            _ => false,
        }
    }

    /// For a continuation (`previous_response_id`): an error that says the engine does not know
    /// the conversation becomes [`BackendError::ConversationLost`]. The wording is not
    /// documented for `/api/v1/chat`; `/v1/responses` says `previous_response_not_found` or
    /// "Prediction history node … not found" (bug tracker #1188).
    /// A not-found error that names the response id itself (rather than a model) counts too,
    /// whatever it was first read as.
    pub fn for_continuation(self, response_id: &str) -> BackendError {
        let (kind, message) = match &self {
            BackendError::Api { kind, message, .. } => (kind.as_deref(), message),
            BackendError::InstanceGone { message } | BackendError::ModelNotFound { message } => {
                (None, message)
            }
            _ => return self,
        };
        let lower = message.to_lowercase();
        let names_it =
            mentions_stored_response(&lower) || lower.contains(&response_id.to_lowercase());
        let missing = [
            "not found",
            "could not find",
            "unknown",
            "does not exist",
            "no such",
        ]
        .iter()
        .any(|w| lower.contains(w));
        if kind == Some("previous_response_not_found") || (names_it && missing) {
            return BackendError::ConversationLost {
                response_id: response_id.to_owned(),
                why: format!("{message} (LM Studio forgets its stored chats when it restarts)"),
            };
        }
        self
    }
}

/// Words of an error about a stored response (lower-case `text`).
fn mentions_stored_response(text: &str) -> bool {
    [
        "previous_response",
        "previous response",
        "stored response",
        "prediction history",
    ]
    .iter()
    .any(|w| text.contains(w))
}

/// The number that follows `after` in `text`, if any.
fn number_after(text: &str, after: &str) -> Option<u64> {
    let start = text.find(after)? + after.len();
    let digits: String = text[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// Reads an error body: `{"error":{type,message,code?}}` or `{"error":"text"}`.
/// The longest engine message lmsd keeps: errors name what went wrong in a sentence, and a
/// longer one may quote the request (llama-server's "Failed to parse messages: …; messages = "
/// dumps the whole conversation), which must not reach a log.
const MAX_MESSAGE: usize = 300;

/// An engine's message as lmsd keeps it: any quoted request cut off, at most [`MAX_MESSAGE`].
pub(super) fn clipped(message: &str) -> String {
    let message = message
        .split("; messages =")
        .next()
        .unwrap_or_default()
        .trim_end();
    if message.len() <= MAX_MESSAGE {
        return message.to_owned();
    }
    let mut end = MAX_MESSAGE;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &message[..end])
}

pub(super) fn classify_error(status: u16, error: &Value) -> BackendError {
    let (kind, code, message) = match error {
        Value::String(message) => (None, None, message.clone()),
        Value::Object(fields) => {
            let text = |key: &str| fields.get(key).and_then(Value::as_str).map(str::to_owned);
            (
                text("type"),
                text("code"),
                text("message").unwrap_or_else(|| error.to_string()),
            )
        }
        other => (None, None, other.to_string()),
    };
    let lower = message.to_lowercase();
    // The numbers a context overflow names are read before the message is cut.
    let field = |key: &str| error.get(key).and_then(Value::as_u64);
    let context = (
        field("n_prompt_tokens").or_else(|| number_after(&message, "first ")),
        field("n_ctx").or_else(|| number_after(&message, "of only ")),
    );
    let message = clipped(&message);
    let is = |name: &str| kind.as_deref() == Some(name) || code.as_deref() == Some(name);
    if lower.contains("insufficient system resources")
        || lower.contains("out of memory")
        || lower.contains("not enough memory")
    {
        BackendError::OutOfMemory { message }
    } else if status == 401 || is("invalid_api_key") {
        BackendError::Unauthorized { message }
    } else if is("model_load_failed") {
        BackendError::LoadFailed { message }
    } else if is("exceed_context_size_error")
        || lower.contains("context size has been exceeded")
        || lower.contains("context length of only")
        || lower.contains("exceeds the available context size")
    {
        // llama.cpp names both sizes in fields; LM Studio in its sentence ("Trying to keep the
        // first N tokens … loaded with context length of only M tokens").
        BackendError::ContextExceeded {
            prompt_tokens: context.0,
            context_length: context.1,
            message,
        }
    } else if is("model_not_loaded")
        || lower.contains("model has crashed")
        || lower.contains("no models loaded")
        // llama-server's router: a chat to a model it has unloaded.
        || lower.contains("model is not loaded")
        || (lower.contains("identifier") && lower.contains("not found"))
    {
        BackendError::InstanceGone { message }
    } else if is("previous_response_not_found") || mentions_stored_response(&lower) {
        // Left for the continuation to recognise (see `for_continuation`), whatever the status.
        BackendError::Api {
            status,
            kind,
            message,
        }
    } else if status == 404
        // llama-server's router: an unload of a model it lacks.
        || lower.contains("model is not found")
        || is("model_not_found")
    {
        BackendError::ModelNotFound { message }
    } else {
        BackendError::Api {
            status,
            kind,
            message,
        }
    }
}

/// Checks status and body, and decodes the body as `T`.
pub(super) fn decode_reply<T: DeserializeOwned>(
    status: u16,
    body: &[u8],
) -> Result<T, BackendError> {
    // The common case in one pass: a success with no `"error"` anywhere in it (a reply type
    // whose fields are all optional would read an error body as a success, so any mention
    // takes the careful way below).
    if (200..300).contains(&status) && memchr::memmem::find(body, b"\"error\"").is_none() {
        if let Ok(reply) = serde_json::from_slice(body) {
            return Ok(reply);
        }
    }
    let value: Value = match serde_json::from_slice(body) {
        Ok(value) => value,
        Err(e) => {
            let looks_html = body.trim_ascii_start().starts_with(b"<");
            let detail = if looks_html {
                "an HTML page instead of JSON".to_owned()
            } else {
                format!("invalid JSON: {e}")
            };
            return Err(match status {
                401 => BackendError::Unauthorized { message: detail },
                404 => BackendError::ModelNotFound { message: detail },
                _ => BackendError::Malformed { status, detail },
            });
        }
    };
    // OpenAI's Response object carries `"error": null` when all is well.
    if let Some(error) = value.get("error").filter(|e| !e.is_null()) {
        return Err(classify_error(status, error));
    }
    if !(200..300).contains(&status) {
        return Err(classify_error(
            status,
            &Value::String(format!("HTTP {status} without an error body")),
        ));
    }
    serde_json::from_value(value).map_err(|e| BackendError::Malformed {
        status,
        detail: format!("unexpected shape: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    struct AllOptional {
        #[serde(default)]
        text: Option<String>,
    }

    fn error(status: u16, body: &str) -> BackendError {
        decode_reply::<AllOptional>(status, body.as_bytes()).unwrap_err()
    }

    #[test]
    fn an_error_body_is_an_error_even_where_the_reply_type_would_accept_it() {
        assert!(matches!(
            error(200, r#"{"error":"model crashed"}"#),
            BackendError::Api { status: 200, .. }
        ));
        // A success that merely mentions the word takes the careful way and still succeeds.
        let reply: AllOptional = decode_reply(200, br#"{"text":"an \"error\" in prose"}"#).unwrap();
        assert_eq!(reply.text.as_deref(), Some("an \"error\" in prose"));
        let plain: AllOptional = decode_reply(200, br#"{"text":"fine"}"#).unwrap();
        assert_eq!(plain.text.as_deref(), Some("fine"));
        // OpenAI's Response object says `"error": null` when there is none.
        let response: serde_json::Value =
            decode_reply(200, br#"{"id":"resp_1","error":null}"#).unwrap();
        assert_eq!(response["id"], "resp_1");
    }

    #[test]
    fn an_engine_message_that_quotes_the_request_is_cut_before_it() {
        let dump = r#"{"error":{"code":500,"message":"Failed to parse messages: bad role; messages = [{\"role\":\"user\",\"content\":\"my secret prompt\"}]","type":"server_error"}}"#;
        let dumped = error(500, dump);
        assert!(!dumped.to_string().contains("secret"), "{dumped}");
        assert!(dumped.to_string().contains("bad role"), "{dumped}");
        let long = format!(r#"{{"error":"{}"}}"#, "x".repeat(5000));
        assert!(error(400, &long).to_string().len() < 500);
    }

    #[test]
    fn errors_lm_studio_really_sends_are_told_apart() {
        // A CUDA out-of-memory as LM Studio reports it (#2295): no memory wording.
        let failed = error(
            500,
            r#"{"error":{"type":"model_load_failed","message":"Error loading model. (Exit code: null). Unknown error."}}"#,
        );
        assert!(matches!(failed, BackendError::LoadFailed { .. }));
        assert!(failed.may_be_memory() && !failed.is_transient());

        for gone in [
            r#"{"error":"The model has crashed without additional information. (Exit code: null)"}"#,
            r#"{"error":{"type":"model_not_loaded","message":"Model is not loaded"}}"#,
            r#"{"error":{"message":"No models loaded. Please load a model in the developer page or use the 'lms load' command.","type":"invalid_request_error","param":"model","code":null}}"#,
            r#"{"error":"Model with identifier 'qwen/qwen3-4b:2' not found"}"#,
            r#"{"error":{"code":400,"message":"model is not loaded","type":"invalid_request_error"}}"#,
        ] {
            let error = error(400, gone);
            assert!(
                matches!(error, BackendError::InstanceGone { .. }) && !error.is_transient(),
                "{gone}: {error:?}"
            );
        }

        let lm_studio = error(
            400,
            r#"{"error":{"type":"exceed_context_size_error","message":"Trying to keep the first 5183 tokens when context the overflows. However, the model is loaded with context length of only 4096 tokens, which is not enough."}}"#,
        );
        assert!(matches!(
            lm_studio,
            BackendError::ContextExceeded {
                prompt_tokens: Some(5183),
                context_length: Some(4096),
                ..
            }
        ));
        assert!(lm_studio.to_string().contains("needs 5183 tokens"));
        let llama = error(
            400,
            r#"{"error":{"code":400,"message":"the request exceeds the available context size, try increasing it","type":"exceed_context_size_error","n_prompt_tokens":1500,"n_ctx":1024}}"#,
        );
        assert!(matches!(
            llama,
            BackendError::ContextExceeded {
                prompt_tokens: Some(1500),
                context_length: Some(1024),
                ..
            }
        ));
        let compat = error(400, r#"{"error":"Context size has been exceeded."}"#);
        assert!(matches!(compat, BackendError::ContextExceeded { .. }));
    }

    #[test]
    fn only_a_reply_that_may_have_been_acted_on_is_lost() {
        let url = String::new;
        let detail = String::new;
        let cut = BackendError::ReplyLost {
            url: url(),
            detail: detail(),
        };
        assert!(cut.reply_lost());
        assert!(BackendError::Timeout {
            after: Duration::from_secs(1)
        }
        .reply_lost());
        let refused = BackendError::Unreachable {
            url: url(),
            detail: detail(),
        };
        assert!(!refused.reply_lost());
        assert!(!error(500, "<html>Internal Server Error</html>").reply_lost());
        assert!(
            error(200, r#"{"text": 7}"#).reply_lost(),
            "a success that could not be read"
        );
    }

    #[test]
    fn a_lost_stored_response_is_recognised_only_on_a_continuation() {
        let lost = error(
            400,
            r#"{"error":{"type":"invalid_request","message":"Could not find stored response for previous_response_id \"resp_1\""}}"#,
        );
        assert!(matches!(lost, BackendError::Api { .. }));
        assert!(matches!(
            lost.for_continuation("resp_1"),
            BackendError::ConversationLost { .. }
        ));
        let node = error(
            404,
            r#"{"error":{"type":"previous_response_not_found","message":"Prediction history node resp_9 not found"}}"#,
        );
        assert!(matches!(
            node.for_continuation("resp_9"),
            BackendError::ConversationLost { .. }
        ));
        // Read first as a missing instance, or a missing model: it names the response.
        let identifier = error(400, r#"{"error":"No identifier resp_7 found: not found"}"#);
        assert!(matches!(identifier, BackendError::InstanceGone { .. }));
        assert!(matches!(
            identifier.for_continuation("resp_7"),
            BackendError::ConversationLost { .. }
        ));
        let model = error(
            404,
            r#"{"error":{"type":"model_not_found","message":"Model \"m\" not found"}}"#,
        );
        assert!(matches!(
            model.for_continuation("resp_7"),
            BackendError::ModelNotFound { .. }
        ));
        let other = error(500, r#"{"error":{"type":"unknown","message":"busy"}}"#);
        assert!(matches!(
            other.for_continuation("resp_1"),
            BackendError::Api { .. }
        ));
    }
}
