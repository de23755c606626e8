//! What a task does once it holds a slot: the chat or embedding call, with the checks a real
//! engine needs — the conversation it continues and its system prompt, what the engine keeps,
//! that the answer came from the model asked, and the context a chat needs.

use lmsd_proto::{ChatRequest, Event};

use super::choice::Candidate;
use super::runner::{Done, Task, Work};
use super::sessions::{Conversation, SystemPrompt};
use super::TaskError;
use crate::backend::{same_model, BackendError, ChatBody, StreamEvent};
use crate::pool::Lease;

impl Task<'_> {
    pub(super) async fn perform(
        &self,
        lease: &Lease,
        candidate: &Candidate,
        work: &Work<'_>,
        cold: bool,
    ) -> Result<Done, TaskError> {
        match work {
            Work::Embed(embed) => {
                let (vectors, answered) = self
                    .ctx
                    .backend
                    .embeddings(&lease.instance_id, &embed.input)
                    .await?;
                match answered {
                    Some(answered) if !same_model(&lease.instance_id, &answered) => {
                        self.check_answered_by(&lease.instance_id, &answered)
                            .await?;
                    }
                    _ => {}
                }
                Ok(Done::Embed(vectors))
            }
            Work::Forward { request, relay } => self.relay(lease, request, *relay, cold).await,
            Work::Chat { chat, contract } => {
                let continues = self.continues(chat, &candidate.model)?;
                // The system prompt of the conversation this reply belongs to: the one it began
                // with, or this chat's when it begins one.
                let system = continues
                    .as_ref()
                    .and_then(|c| c.began_with)
                    .unwrap_or(SystemPrompt::of(chat.system_prompt.as_deref()));
                let body = ChatBody {
                    model: lease.instance_id.clone(),
                    input: chat.input.clone(),
                    // The engine keeps the system prompt its conversation began with, and LM
                    // Studio refuses a continuation that sends one (`continues` checked it).
                    system_prompt: match continues {
                        Some(_) => None,
                        None => chat.system_prompt.clone(),
                    },
                    temperature: if cold { Some(0.0) } else { chat.temperature },
                    max_output_tokens: chat.max_output_tokens,
                    store: chat.store || chat.session.is_some() || continues.is_some(),
                    previous_response_id: continues.map(|c| c.response_id),
                    stream: chat.stream,
                    schema: contract
                        .filter(|_| !chat.check_only)
                        .map(|c| c.engine_schema().clone()),
                    images: chat.images.clone(),
                };
                let reply = if chat.stream {
                    let mut first_token = true;
                    self.ctx
                        .backend
                        .chat_stream(&body, |event| {
                            if first_token && matches!(event, StreamEvent::Message(_)) {
                                first_token = false;
                                self.ctx
                                    .observers
                                    .metrics
                                    .first_token(self.submitted.elapsed().as_secs_f64());
                            }
                            self.sink.send(match event {
                                StreamEvent::LoadProgress {
                                    model_instance_id,
                                    progress,
                                } => Event::Load {
                                    model_instance_id,
                                    progress,
                                },
                                StreamEvent::Reasoning(content) => Event::Reasoning { content },
                                StreamEvent::Message(content) => Event::Delta { content },
                            })
                        })
                        .await
                } else {
                    self.ctx.backend.chat(&body).await
                };
                let reply = reply.map_err(|error| match (error, chat.session.as_deref()) {
                    (source @ BackendError::ConversationLost { .. }, Some(session))
                        if chat.previous_response_id.is_none() =>
                    {
                        self.ctx
                            .sessions
                            .forget_conversation(session, &candidate.model);
                        TaskError::SessionLost {
                            session: session.to_owned(),
                            model: candidate.model.clone(),
                            source,
                        }
                    }
                    (error, _) => TaskError::Backend(error),
                })?;
                if !same_model(&lease.instance_id, &reply.model_instance_id) {
                    return Err(TaskError::Backend(BackendError::InstanceGone {
                        message: format!(
                            "asked {:?} to chat, and {:?} answered",
                            lease.instance_id, reply.model_instance_id
                        ),
                    }));
                }
                if reply.stats.model_load_time_seconds.is_some() {
                    // lmsd loads before it chats, so the engine loaded this one itself (its
                    // just-in-time loading): the instance lmsd leased had gone.
                    tracing::warn!(task = %self.handle.id, instance = %reply.model_instance_id, "the engine loaded the model just in time behind lmsd; switch JIT loading off in LM Studio's server settings");
                    self.ctx.pool.engine_loaded(&lease.model);
                }
                if reply.text().is_none() {
                    return Err(TaskError::EmptyReply {
                        instance: reply.model_instance_id,
                    });
                }
                Ok(Done::Chat {
                    reply,
                    system,
                    json: None,
                })
            }
        }
    }

    /// The conversation a chat continues, if any (see [`Sessions::conversation`]). A system
    /// prompt other than the one that conversation began with is refused: the engine keeps the
    /// first, and would silently ignore (llama-server) or refuse (LM Studio) another.
    fn continues(
        &self,
        chat: &ChatRequest,
        model: &str,
    ) -> Result<Option<Conversation>, TaskError> {
        let Some(conversation) = self.ctx.sessions.conversation(
            chat.previous_response_id.as_deref(),
            chat.session.as_deref(),
            model,
        ) else {
            return Ok(None);
        };
        let asked = chat.system_prompt.as_deref();
        match (asked, conversation.began_with) {
            (None, _) => {}
            (Some(_), Some(began)) if began == SystemPrompt::of(asked) => {}
            (Some(_), Some(_)) => {
                return Err(TaskError::BadRequest(format!(
                    "this chat continues a conversation that began with another system prompt, and the engine keeps the first one; leave system_prompt out, or start a new conversation{}",
                    chat.session.as_deref().map_or(String::new(), |s| format!(" (`lmsd-ctl sessions forget {s}`, or another session name)"))
                )))
            }
            // A session recorded before lmsd kept its prompt: this one is taken as its prompt.
            (Some(_), None) if conversation.in_session => {}
            (Some(_), None) => {
                return Err(TaskError::BadRequest(
                    "a chat that continues a previous_response_id lmsd did not answer cannot carry a system_prompt: the engine keeps the one its conversation began with; leave it out".into(),
                ))
            }
        }
        Ok(Some(conversation))
    }

    /// An embedding reply that names another model than the leased instance's: when that is a
    /// different model the engine has, the instance is gone and another model answered (its
    /// vectors would poison an index); a name lmsd does not know is taken on trust.
    async fn check_answered_by(&self, asked: &str, answered: &str) -> Result<(), TaskError> {
        let status = self.ctx.pool.status().await?;
        let other_model = status.catalogue.iter().any(|m| {
            !same_model(asked, &m.key)
                && (same_model(answered, &m.key)
                    || m.loaded_instances.iter().any(|i| i.id == answered))
        });
        if other_model {
            return Err(TaskError::Backend(BackendError::InstanceGone {
                message: format!("asked {asked:?} for embeddings, and {answered:?} answered"),
            }));
        }
        tracing::debug!(
            asked,
            answered,
            "embedding reply names an unknown model; accepted"
        );
        Ok(())
    }
}

/// Tokens a text surely needs: no tokenizer averages more than this many bytes per token on
/// prose or code, so an input longer than this many bytes per token of an instance's context
/// cannot fit it.
pub(super) const BYTES_PER_TOKEN_CEILING: usize = 6;

/// The bytes of text in an agent's request body: its strings, each image (a data URL, or an
/// Anthropic `base64` source) counted as `per_image` — a model reads an image as some hundreds
/// of tokens, whatever its base64 weighs.
pub fn text_bytes(value: &serde_json::Value, per_image: usize) -> usize {
    use serde_json::Value;
    match value {
        Value::String(text) if text.starts_with("data:") => per_image,
        Value::String(text) => text.len(),
        Value::Array(items) => items.iter().map(|v| text_bytes(v, per_image)).sum(),
        Value::Object(fields) if fields.get("type").and_then(Value::as_str) == Some("base64") => {
            per_image
        }
        Value::Object(fields) => fields.values().map(|v| text_bytes(v, per_image)).sum(),
        _ => 0,
    }
}

/// The context a chat needs of its instance: what `needs.min_context` says, or what its text
/// clearly takes, whichever is more.
pub(super) fn context_needed(chat: &ChatRequest) -> Option<u32> {
    let text = chat.input.len() + chat.system_prompt.as_ref().map_or(0, String::len);
    let estimate = u32::try_from(text / BYTES_PER_TOKEN_CEILING).unwrap_or(u32::MAX);
    let needed = chat.options.needs.min_context.unwrap_or(0).max(estimate);
    (needed > 0).then_some(needed)
}
