//! Task options and reports: priorities, model needs, timeouts, task listings, sessions.

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Queue priority. Waiting tasks age: every 30 s of waiting counts as one level higher, so
/// `batch` work is served eventually under any load.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    Interactive,
    #[default]
    Normal,
    Batch,
}

impl Priority {
    /// Lower is served first.
    pub fn rank(self) -> u32 {
        match self {
            Priority::Interactive => 0,
            Priority::Normal => 1,
            Priority::Batch => 2,
        }
    }
}

impl std::str::FromStr for Priority {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "interactive" => Ok(Priority::Interactive),
            "normal" => Ok(Priority::Normal),
            "batch" => Ok(Priority::Batch),
            other => Err(format!(
                "unknown priority {other:?}: use interactive, normal or batch"
            )),
        }
    }
}

/// What a task needs of its model, for `"model": "auto"`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Needs {
    pub vision: bool,
    pub reasoning: bool,
    /// Smallest `max_context_length` acceptable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_context: Option<u32>,
    /// A model trained for tool use (where the engine says which are).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub tools: bool,
}

impl Needs {
    pub fn is_empty(&self) -> bool {
        *self == Needs::default()
    }
}

/// A duration on the wire: `"30s"`, `"2m"`, `"1h30m"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireDuration(pub Duration);

impl std::str::FromStr for WireDuration {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        humantime::parse_duration(text.trim())
            .map(WireDuration)
            .map_err(|_| format!("invalid duration {text:?}: use a number with a unit, such as \"30s\" or \"5m\""))
    }
}

impl std::fmt::Display for WireDuration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl Serialize for WireDuration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for WireDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    Chat,
    Embed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Waiting for a slot, a load or memory.
    Queued,
    /// Running on an instance.
    Running,
}

/// One task, as `tasks` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskInfo {
    pub task_id: String,
    pub kind: TaskKind,
    /// What the task asked for (a key, an instance id or `auto`).
    pub model: String,
    pub state: TaskState,
    pub priority: Priority,
    /// The instance it runs on, once running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    pub age_ms: u64,
    /// Milliseconds until its deadline.
    pub deadline_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskList {
    pub tasks: Vec<TaskInfo>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CancelOutcome {
    pub task_id: String,
    /// False when no such task was queued or running (it may have finished).
    pub cancelled: bool,
}

/// A stateful session: the last response per (session, model).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionInfo {
    pub name: String,
    pub model: String,
    pub response_id: String,
    pub turns: u64,
    pub updated_s_ago: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionList {
    pub sessions: Vec<SessionInfo>,
    /// The session dropped by a `forget`, if it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forgotten: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priorities_and_durations_parse() {
        assert_eq!("batch".parse(), Ok(Priority::Batch));
        assert!("urgent".parse::<Priority>().is_err());
        assert!(Priority::Interactive.rank() < Priority::Batch.rank());
        assert_eq!("90s".parse(), Ok(WireDuration(Duration::from_secs(90))));
        assert!("90".parse::<WireDuration>().is_err());
        let json = serde_json::to_string(&WireDuration(Duration::from_secs(90))).unwrap();
        assert_eq!(
            serde_json::from_str::<WireDuration>(&json).unwrap().0,
            Duration::from_secs(90)
        );
    }
}
