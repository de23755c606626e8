//! The conversations lmsd keeps for llama-server, which keeps none: each reply gets a response
//! id, and a chat that continues one sends the whole conversation again. They live in memory,
//! the newest [`CONVERSATIONS_MAX`] replies and [`CONVERSATIONS_MAX_BYTES`] of their text.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use serde_json::{json, Value};

use super::{BackendError, ChatBody};

/// Replies whose conversations lmsd keeps for continuation; older ones are forgotten.
pub const CONVERSATIONS_MAX: usize = 4096;
/// Text the kept replies may hold together (their earlier turns, shared, come on top).
pub const CONVERSATIONS_MAX_BYTES: usize = 64 << 20;

/// One exchange of a conversation; earlier ones are reached through `parent`, so a long
/// conversation costs one turn per reply, not a copy of its history.
pub(super) struct Turn {
    pub(super) parent: Option<Arc<Turn>>,
    pub(super) system: Option<String>,
    pub(super) user: String,
    pub(super) assistant: String,
}

impl Turn {
    fn bytes(&self) -> usize {
        self.system.as_ref().map_or(0, String::len) + self.user.len() + self.assistant.len()
    }
}

/// Conversations by response id: the newest, at most [`CONVERSATIONS_MAX`] replies and
/// [`CONVERSATIONS_MAX_BYTES`] of their text.
#[derive(Default)]
pub(super) struct Conversations {
    by_response: HashMap<String, Arc<Turn>>,
    order: VecDeque<String>,
    /// Text of the turns in `by_response`.
    bytes: usize,
    next: u64,
}

// Conversations are prompts and outputs: never printed.
impl std::fmt::Debug for Conversations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Conversations({} kept)", self.by_response.len())
    }
}

impl Conversations {
    pub(super) fn get(&self, response_id: &str) -> Result<Arc<Turn>, BackendError> {
        self.by_response
            .get(response_id)
            .cloned()
            .ok_or_else(|| BackendError::ConversationLost {
                response_id: response_id.to_owned(),
                why: format!(
                    "on llama-server lmsd keeps conversations in memory (the newest {CONVERSATIONS_MAX} replies, {} MiB of text), and they end when lmsd restarts",
                    CONVERSATIONS_MAX_BYTES >> 20
                ),
            })
    }

    /// Records a reply and returns its response id.
    pub(super) fn record(&mut self, turn: Turn) -> String {
        self.next += 1;
        // The process id keeps ids of a restarted lmsd apart from the last one's.
        let id = format!("resp_lmsd_{}_{}", std::process::id(), self.next);
        self.bytes += turn.bytes();
        self.order.push_back(id.clone());
        self.by_response.insert(id.clone(), Arc::new(turn));
        // The newest reply stays, whatever its size.
        while self.order.len() > 1
            && (self.order.len() > CONVERSATIONS_MAX || self.bytes > CONVERSATIONS_MAX_BYTES)
        {
            let oldest = self.order.pop_front();
            if let Some(turn) = oldest.and_then(|id| self.by_response.remove(&id)) {
                self.bytes -= turn.bytes();
            }
        }
        id
    }
}

/// OpenAI chat messages for `turn`'s history followed by the new input.
pub(super) fn messages(history: Option<&Arc<Turn>>, body: &ChatBody) -> Vec<Value> {
    let mut turns = Vec::new();
    let mut next = history;
    while let Some(turn) = next {
        turns.push(turn);
        next = turn.parent.as_ref();
    }
    turns.reverse();
    // The conversation's first system prompt holds unless this chat sets its own.
    let system = body
        .system_prompt
        .as_deref()
        .or_else(|| turns.first().and_then(|t| t.system.as_deref()));
    let mut messages = Vec::with_capacity(2 * turns.len() + 2);
    if let Some(system) = system {
        messages.push(json!({ "role": "system", "content": system }));
    }
    for turn in turns {
        messages.push(json!({ "role": "user", "content": turn.user }));
        messages.push(json!({ "role": "assistant", "content": turn.assistant }));
    }
    messages.push(json!({ "role": "user", "content": super::completions::user_content(body) }));
    messages
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(input: &str, system: Option<&str>) -> ChatBody {
        ChatBody {
            model: "m".into(),
            input: input.into(),
            system_prompt: system.map(str::to_owned),
            temperature: None,
            max_output_tokens: None,
            previous_response_id: None,
            stream: false,
            store: true,
            schema: None,
            images: Vec::new(),
        }
    }

    #[test]
    fn a_continued_conversation_sends_its_whole_history_once() {
        let mut conversations = Conversations::default();
        let first = conversations.record(Turn {
            parent: None,
            system: Some("be brief".into()),
            user: "one".into(),
            assistant: "1".into(),
        });
        let second = conversations.record(Turn {
            parent: Some(conversations.get(&first).unwrap()),
            system: None,
            user: "two".into(),
            assistant: "2".into(),
        });
        let history = conversations.get(&second).unwrap();
        let sent = messages(Some(&history), &chat("three", None));
        let roles: Vec<(&str, &str)> = sent
            .iter()
            .map(|m| (m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
        assert_eq!(
            roles,
            [
                ("system", "be brief"),
                ("user", "one"),
                ("assistant", "1"),
                ("user", "two"),
                ("assistant", "2"),
                ("user", "three"),
            ]
        );
        // A branch from the first reply does not see the second exchange.
        let branch = messages(
            Some(&conversations.get(&first).unwrap()),
            &chat("again", None),
        );
        assert_eq!(branch.len(), 4);
    }

    #[test]
    fn only_the_newest_conversations_are_kept() {
        let mut conversations = Conversations::default();
        let turn = || Turn {
            parent: None,
            system: None,
            user: String::new(),
            assistant: String::new(),
        };
        let first = conversations.record(turn());
        for _ in 0..CONVERSATIONS_MAX {
            conversations.record(turn());
        }
        assert_eq!(conversations.by_response.len(), CONVERSATIONS_MAX);
        let Err(error) = conversations.get(&first) else {
            panic!("the oldest conversation was kept");
        };
        // Large replies are forgotten by size, long before their count says so.
        let big = || Turn {
            parent: None,
            system: None,
            user: "x".repeat(CONVERSATIONS_MAX_BYTES / 3),
            assistant: String::new(),
        };
        let ids: Vec<String> = (0..4).map(|_| conversations.record(big())).collect();
        assert!(conversations.bytes <= CONVERSATIONS_MAX_BYTES);
        assert!(conversations.get(&ids[0]).is_err());
        assert!(conversations.get(&ids[3]).is_ok());
        assert!(
            matches!(error, BackendError::ConversationLost { .. }),
            "{error}"
        );
    }
}
