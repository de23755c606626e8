//! Batch jobs on the wire: a JSONL file of tasks submitted whole, run in the background at
//! `batch` priority, its progress, its results, and what can be done to it.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `{"type":"batch_submit", "lines":"…JSONL…", "defaults":{…}, "skip_invalid":false}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchSubmitRequest {
    /// The job file's text: one task per line, in lmsd's form or OpenAI's batch form.
    pub lines: String,
    #[serde(default, skip_serializing_if = "BatchDefaults::is_empty")]
    pub defaults: BatchDefaults,
    /// Record invalid lines as failed and run the rest, instead of refusing the job.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub skip_invalid: bool,
    /// A name for people (`batch list` shows it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// What a line of lmsd's form takes when it says nothing of its own.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchDefaults {
    /// A model key or `auto` (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub choices: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_output_tokens: Option<u32>,
}

impl BatchDefaults {
    pub fn is_empty(&self) -> bool {
        *self == BatchDefaults::default()
    }
}

/// `{"type":"batch_status", "job_id":"b1"}` (one job) or without `job_id` (every job, as
/// `batch_list`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchStatusRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
}

/// `{"type":"batch_results"|"batch_cancel"|"batch_delete", "job_id":"b1"}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchJobRequest {
    pub job_id: String,
}

/// Where a job is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchState {
    /// Lines are running or waiting to.
    #[default]
    Running,
    /// Stopped by a fault lmsd waits out (a full disk): `error` says which. Nothing done is lost.
    Paused,
    /// Every line is done or failed.
    Completed,
    Cancelled,
    /// A state this client does not know yet (from a newer daemon).
    #[serde(other)]
    Unknown,
}

impl BatchState {
    /// The state's name, as the wire spells it.
    pub fn name(self) -> &'static str {
        match self {
            BatchState::Running => "running",
            BatchState::Paused => "paused",
            BatchState::Completed => "completed",
            BatchState::Cancelled => "cancelled",
            BatchState::Unknown => "unknown",
        }
    }
}

/// A job and its progress.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BatchJob {
    pub job_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub state: BatchState,
    pub total: u64,
    pub done: u64,
    pub failed: u64,
    /// Lines in flight now.
    pub running: u64,
    /// Loads lmsd made while the job ran.
    pub loads: u64,
    /// Lines finished per second since the job began (or resumed).
    pub rate_per_s: f64,
    /// Seconds left at that rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_s: Option<u64>,
    /// Unix seconds.
    pub created_s: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_s: Option<u64>,
    /// Why the job is paused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Lines refused at submission and recorded as failed (`skip_invalid`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub invalid: Vec<InvalidLine>,
}

/// A line of a job file that is not a task, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InvalidLine {
    /// 1-based.
    pub line: u64,
    pub error: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BatchJobList {
    pub jobs: Vec<BatchJob>,
}

/// The end of `batch_results`: its lines came before it as `batch_line` events, in input
/// order, one per line of the job.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BatchResults {
    pub job_id: String,
    pub lines: u64,
}

/// `batch_delete`'s answer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BatchDeleted {
    pub job_id: String,
    pub deleted: bool,
}
