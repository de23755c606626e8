//! Stateful sessions: the last `response_id` per (session, model), kept in a JSON file in lmsd's
//! state directory so that a conversation survives a daemon restart; and, for every
//! conversation lmsd continues, which system prompt it began with — the engine keeps that one,
//! and LM Studio refuses a continuation that sends one again (bug tracker #2219).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use lmsd_proto::SessionInfo;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Turn {
    response_id: String,
    turns: u64,
    /// Unix seconds.
    updated: u64,
    /// The conversation's system prompt, as a [`fingerprint`] (the text itself is the
    /// user's and stays out of lmsd's files). Absent in files from before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    system: Option<SystemPrompt>,
}

/// Which system prompt a conversation began with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SystemPrompt {
    None,
    Fingerprint(u64),
}

impl SystemPrompt {
    pub fn of(text: Option<&str>) -> Self {
        text.map_or(SystemPrompt::None, |text| {
            SystemPrompt::Fingerprint(fingerprint(text))
        })
    }
}

/// FNV-1a: stable across lmsd versions and machines (std's hasher is neither), and enough to
/// tell one system prompt from another.
fn fingerprint(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The conversation a chat continues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversation {
    /// The reply it continues from.
    pub response_id: String,
    /// The system prompt it began with, when lmsd knows it.
    pub began_with: Option<SystemPrompt>,
    /// Found through a session (not an explicit `previous_response_id`).
    pub in_session: bool,
}

/// Replies lmsd remembers the system prompt of, for continuations by `previous_response_id`.
const RECENT_MAX: usize = 4096;

/// The newest replies' conversations, in memory.
#[derive(Debug, Default)]
struct Recent {
    by_response: HashMap<String, SystemPrompt>,
    order: VecDeque<String>,
}

/// Session name → model key → last turn.
type Table = BTreeMap<String, BTreeMap<String, Turn>>;

/// The session store. A plain mutex around a small map; the file is rewritten (atomically, by
/// rename) on each change, outside the lock's hot path only in the sense that sessions are rare.
#[derive(Debug)]
pub struct Sessions {
    path: Option<PathBuf>,
    table: Mutex<Table>,
    recent: Mutex<Recent>,
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Sessions {
    /// Opens the store at `path` (created on first write). An unreadable file is logged and
    /// set aside, not fatal: sessions are a convenience.
    pub fn open(path: Option<PathBuf>) -> Self {
        let table = path
            .as_ref()
            .and_then(|path| match std::fs::read_to_string(path) {
                Ok(text) => match serde_json::from_str(&text) {
                    Ok(table) => Some(table),
                    Err(error) => {
                        tracing::warn!(file = %path.display(), %error, "session file unreadable; starting with no sessions");
                        None
                    }
                },
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
                Err(error) => {
                    tracing::warn!(file = %path.display(), %error, "cannot read the session file");
                    None
                }
            })
            .unwrap_or_default();
        Sessions {
            path,
            table: Mutex::new(table),
            recent: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The response to continue from, for `session` on `model`, and the system prompt its
    /// conversation began with when lmsd knows it.
    pub fn last_response(
        &self,
        session: &str,
        model: &str,
    ) -> Option<(String, Option<SystemPrompt>)> {
        self.lock()
            .get(session)?
            .get(model)
            .map(|turn| (turn.response_id.clone(), turn.system))
    }

    /// The conversation a chat continues on `model`: its explicit `previous_response_id`, else
    /// its session's.
    pub fn conversation(
        &self,
        previous_response_id: Option<&str>,
        session: Option<&str>,
        model: &str,
    ) -> Option<Conversation> {
        match (previous_response_id, session) {
            (Some(id), _) => Some(Conversation {
                response_id: id.to_owned(),
                began_with: self.system_of(id),
                in_session: false,
            }),
            (None, Some(session)) => {
                let (response_id, began_with) = self.last_response(session, model)?;
                Some(Conversation {
                    response_id,
                    began_with,
                    in_session: true,
                })
            }
            (None, None) => None,
        }
    }

    /// The system prompt of the conversation `response_id` ends, if lmsd answered it lately.
    pub fn system_of(&self, response_id: &str) -> Option<SystemPrompt> {
        self.recent
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .by_response
            .get(response_id)
            .copied()
    }

    /// Remembers a stored reply and the system prompt its conversation began with.
    pub fn remember(&self, response_id: &str, system: SystemPrompt) {
        let mut recent = self
            .recent
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if recent
            .by_response
            .insert(response_id.to_owned(), system)
            .is_none()
        {
            recent.order.push_back(response_id.to_owned());
        }
        while recent.order.len() > RECENT_MAX {
            if let Some(oldest) = recent.order.pop_front() {
                recent.by_response.remove(&oldest);
            }
        }
    }

    pub fn record(&self, session: &str, model: &str, response_id: &str, system: SystemPrompt) {
        self.remember(response_id, system);
        let snapshot = {
            let mut table = self.lock();
            let turn = table
                .entry(session.to_owned())
                .or_default()
                .entry(model.to_owned())
                .or_insert(Turn {
                    response_id: String::new(),
                    turns: 0,
                    updated: 0,
                    system: None,
                });
            turn.response_id = response_id.to_owned();
            turn.turns += 1;
            turn.updated = now_s();
            turn.system = Some(system);
            table.clone()
        };
        self.save(&snapshot);
    }

    /// Drops a session's conversation on one model (the engine lost it); true if it existed.
    pub fn forget_conversation(&self, session: &str, model: &str) -> bool {
        let (existed, snapshot) = {
            let mut table = self.lock();
            let existed = table
                .get_mut(session)
                .is_some_and(|models| models.remove(model).is_some());
            if table.get(session).is_some_and(BTreeMap::is_empty) {
                table.remove(session);
            }
            (existed, table.clone())
        };
        if existed {
            self.save(&snapshot);
        }
        existed
    }

    /// Drops a session; true if it existed.
    pub fn forget(&self, session: &str) -> bool {
        let (existed, snapshot) = {
            let mut table = self.lock();
            (table.remove(session).is_some(), table.clone())
        };
        if existed {
            self.save(&snapshot);
        }
        existed
    }

    pub fn list(&self) -> Vec<SessionInfo> {
        let now = now_s();
        self.lock()
            .iter()
            .flat_map(|(name, models)| {
                models.iter().map(move |(model, turn)| SessionInfo {
                    name: name.clone(),
                    model: model.clone(),
                    response_id: turn.response_id.clone(),
                    turns: turn.turns,
                    updated_s_ago: now.saturating_sub(turn.updated),
                })
            })
            .collect()
    }

    fn save(&self, table: &Table) {
        let Some(path) = &self.path else { return };
        let write = || -> std::io::Result<()> {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let temp = path.with_extension("json.tmp");
            std::fs::write(&temp, serde_json::to_vec_pretty(table)?)?;
            std::fs::rename(&temp, path)
        };
        if let Err(error) = write() {
            tracing::warn!(file = %path.display(), %error, "cannot save sessions");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_survive_a_reopen_and_can_be_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/sessions.json");
        let sessions = Sessions::open(Some(path.clone()));
        assert_eq!(sessions.last_response("review", "m"), None);
        let brief = SystemPrompt::of(Some("be brief"));
        sessions.record("review", "m", "resp_1", brief);
        sessions.record("review", "m", "resp_2", brief);
        sessions.record("review", "other", "resp_x", SystemPrompt::None);

        let reopened = Sessions::open(Some(path.clone()));
        assert_eq!(
            reopened.last_response("review", "m"),
            Some(("resp_2".into(), Some(brief)))
        );
        let listed = reopened.list();
        assert_eq!(listed.len(), 2);
        assert_eq!(listed.iter().find(|s| s.model == "m").unwrap().turns, 2);
        assert!(reopened.forget("review"));
        assert!(!reopened.forget("review"));
        assert!(Sessions::open(Some(path)).list().is_empty());
    }

    #[test]
    fn a_lost_conversation_is_forgotten_alone_and_prompts_are_told_apart() {
        let sessions = Sessions::open(None);
        sessions.record("s", "a", "resp_a", SystemPrompt::None);
        sessions.record("s", "b", "resp_b", SystemPrompt::None);
        assert!(sessions.forget_conversation("s", "a"));
        assert!(!sessions.forget_conversation("s", "a"));
        assert_eq!(sessions.list().len(), 1);
        assert!(sessions.forget_conversation("s", "b"));
        assert!(sessions.list().is_empty());

        assert_eq!(sessions.system_of("resp_a"), Some(SystemPrompt::None));
        assert_eq!(sessions.system_of("resp_elsewhere"), None);
        assert_ne!(SystemPrompt::of(Some("a")), SystemPrompt::of(Some("b")));
        assert_eq!(SystemPrompt::of(Some("a")), SystemPrompt::of(Some("a")));
        // Fixed values: a session file written by one lmsd is read the same by the next.
        assert_eq!(fingerprint(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fingerprint("a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn a_garbled_file_is_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sessions.json");
        std::fs::write(&path, "{not json").unwrap();
        assert!(Sessions::open(Some(path)).list().is_empty());
    }
}
