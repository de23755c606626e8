//! Stateful sessions: the last `response_id` per (session, model), kept in a JSON file in lmsd's
//! state directory so that a conversation survives a daemon restart.

use std::collections::BTreeMap;
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
}

/// Session name → model key → last turn.
type Table = BTreeMap<String, BTreeMap<String, Turn>>;

/// The session store. A plain mutex around a small map; the file is rewritten (atomically, by
/// rename) on each change, outside the lock's hot path only in the sense that sessions are rare.
#[derive(Debug)]
pub struct Sessions {
    path: Option<PathBuf>,
    table: Mutex<Table>,
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
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The response to continue from, for `session` on `model`.
    pub fn last_response(&self, session: &str, model: &str) -> Option<String> {
        self.lock()
            .get(session)?
            .get(model)
            .map(|turn| turn.response_id.clone())
    }

    pub fn record(&self, session: &str, model: &str, response_id: &str) {
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
                });
            turn.response_id = response_id.to_owned();
            turn.turns += 1;
            turn.updated = now_s();
            table.clone()
        };
        self.save(&snapshot);
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
        sessions.record("review", "m", "resp_1");
        sessions.record("review", "m", "resp_2");
        sessions.record("review", "other", "resp_x");

        let reopened = Sessions::open(Some(path.clone()));
        assert_eq!(
            reopened.last_response("review", "m").as_deref(),
            Some("resp_2")
        );
        let listed = reopened.list();
        assert_eq!(listed.len(), 2);
        assert_eq!(listed.iter().find(|s| s.model == "m").unwrap().turns, 2);
        assert!(reopened.forget("review"));
        assert!(!reopened.forget("review"));
        assert!(Sessions::open(Some(path)).list().is_empty());
    }

    #[test]
    fn a_garbled_file_is_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sessions.json");
        std::fs::write(&path, "{not json").unwrap();
        assert!(Sessions::open(Some(path)).list().is_empty());
    }
}
