//! The savings ledger: one JSON line per finished task in lmsd's state directory (time, model,
//! agent tag, tokens, timings, outcome — never prompt or answer), and one per contract kept or
//! broken on a model; rotated by size. From it: the sums `lmsd-ctl savings` shows at the
//! configured paid prices, the pass rates `lmsd-ctl fitness` shows, and each model's recent
//! pass rate that `[routing] min_pass_rate` reads.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lmsd_proto::{
    ContractKind, FitnessReport, FitnessRow, SavingsGroup, SavingsGrouping, SavingsReport,
    SavingsTotals,
};
use serde::{Deserialize, Serialize};

/// One finished task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Unix seconds.
    pub time: f64,
    pub kind: String,
    pub model: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub queued_ms: u64,
    pub load_ms: u64,
    pub total_ms: u64,
    /// `ok` or an error code; for a contract record, its result.
    pub outcome: String,
    /// Set on a contract record (`kind` "contract"): one model's answers to one task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contract: Option<ContractCheck>,
}

impl Record {
    /// A contract's result on `model`: what `fitness` counts (no tokens: the task's own record
    /// has them).
    pub fn contract(model: &str, check: ContractCheck) -> Record {
        Record {
            time: now_s(),
            kind: "contract".into(),
            model: model.to_owned(),
            agent: None,
            input_tokens: 0,
            output_tokens: 0,
            queued_ms: 0,
            load_ms: 0,
            total_ms: 0,
            outcome: check.result.as_str().into(),
            contract: Some(check),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContractCheck {
    pub kind: ContractKind,
    pub result: ContractResult,
    /// False for `check_only`: the engine was not held to the contract. Such results show
    /// apart in `fitness`, and do not count towards `min_pass_rate`.
    #[serde(default = "constrained_by_default")]
    pub constrained: bool,
}

fn constrained_by_default() -> bool {
    true
}

/// How one model did on one task's contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContractResult {
    PassedFirst,
    PassedRetry,
    Failed,
}

impl ContractResult {
    fn as_str(self) -> &'static str {
        match self {
            ContractResult::PassedFirst => "passed_first",
            ContractResult::PassedRetry => "passed_retry",
            ContractResult::Failed => "failed",
        }
    }
}

/// Contract tasks per model that `recent_pass_rate` looks back over.
pub const PASS_RATE_WINDOW: usize = 20;

/// Paid prices, per million tokens, of the model a task would otherwise have gone to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prices {
    pub input_usd_per_mtok: f64,
    pub output_usd_per_mtok: f64,
}

impl Prices {
    fn cost(&self, input: u64, output: u64) -> f64 {
        (input as f64 * self.input_usd_per_mtok + output as f64 * self.output_usd_per_mtok) / 1e6
    }
}

/// Appends to `ledger.jsonl`; past `max_bytes` it becomes `ledger.1.jsonl` (replacing the older
/// one) and a new file starts. Tasks only push their record to a buffer; `flush` (every
/// `FLUSH_EVERY`, off the tasks' path, and at shutdown) writes the buffer in one go.
#[derive(Debug)]
pub struct Ledger {
    path: Option<PathBuf>,
    max_bytes: u64,
    pending: Mutex<Vec<Record>>,
    /// Told when the buffer stops being empty, so an idle flusher sleeps instead of polling.
    filled: tokio::sync::Notify,
    /// The open file and its size, between flushes. Plain mutexes: short holds, never across an
    /// `.await`.
    file: Mutex<Option<(std::fs::File, u64)>>,
    /// Each model's last `PASS_RATE_WINDOW` contract results (passed or not), newest last:
    /// read from the files when first asked for (not at start: a large ledger would slow every
    /// start for a setting most never use), then kept up to date by `append`.
    recent: Mutex<Option<HashMap<String, VecDeque<bool>>>>,
}

/// How often buffered records reach the disk.
pub const FLUSH_EVERY: Duration = Duration::from_millis(500);
/// Records buffered at most; past this a record is dropped (and that is logged).
const PENDING_MAX: usize = 100_000;

pub fn now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// `YYYY-MM-DD` (UTC) of a Unix time, by the civil-from-days algorithm.
fn day(time: f64) -> String {
    let days = (time / 86_400.0).floor() as i64 + 719_468;
    let era = days.div_euclid(146_097);
    let doe = days.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

impl Ledger {
    pub fn open(path: Option<PathBuf>, max_bytes: u64) -> Self {
        Ledger {
            path,
            max_bytes,
            pending: Mutex::new(Vec::new()),
            filled: tokio::sync::Notify::new(),
            file: Mutex::new(None),
            recent: Mutex::new(None),
        }
    }

    fn recent(&self) -> MutexGuard<'_, Option<HashMap<String, VecDeque<bool>>>> {
        self.recent
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A model's pass rate over its last contract tasks, and how many there were; `None`
    /// before its first. The first call reads the ledger's files (blocking, once).
    pub fn recent_pass_rate(&self, model: &str) -> Option<(f64, usize)> {
        if self.recent().is_none() {
            self.flush();
            let mut seeded = HashMap::new();
            self.each_record(f64::MIN, |record| remember(&mut seeded, &record));
            *self.recent() = Some(seeded);
        }
        let recent = self.recent();
        let results = recent.as_ref()?.get(model).filter(|r| !r.is_empty())?;
        let passed = results.iter().filter(|p| **p).count();
        Some((passed as f64 / results.len() as f64, results.len()))
    }

    fn rotated(&self) -> Option<PathBuf> {
        self.path.as_ref().map(|p| p.with_extension("1.jsonl"))
    }

    /// The buffer; a panic elsewhere while it was held leaves it usable.
    fn pending(&self) -> MutexGuard<'_, Vec<Record>> {
        self.pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn append(&self, record: Record) {
        if let Some(recent) = self.recent().as_mut() {
            remember(recent, &record);
        }
        if self.path.is_none() {
            return;
        }
        let mut pending = self.pending();
        if pending.is_empty() {
            self.filled.notify_one();
        }
        if pending.len() < PENDING_MAX {
            pending.push(record);
        } else {
            tracing::warn!("the savings ledger is behind; a record was dropped");
        }
    }

    /// Writes the buffered records (blocking file I/O: call it from a blocking context).
    pub fn flush(&self) {
        let Some(path) = &self.path else { return };
        let records = std::mem::take(&mut *self.pending());
        if records.is_empty() {
            return;
        }
        let mut open = self
            .file
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut write = || -> std::io::Result<()> {
            let mut text = String::new();
            for record in &records {
                text.push_str(&serde_json::to_string(record)?);
                text.push('\n');
            }
            if open
                .as_ref()
                .is_some_and(|(_, size)| *size >= self.max_bytes)
            {
                *open = None;
                if let Some(rotated) = self.rotated() {
                    std::fs::rename(path, rotated)?;
                }
            }
            if open.is_none() {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?;
                let size = file.metadata()?.len();
                *open = Some((file, size));
            }
            if let Some((file, size)) = open.as_mut() {
                file.write_all(text.as_bytes())?;
                *size += text.len() as u64;
            }
            Ok(())
        };
        if let Err(error) = write() {
            *open = None;
            tracing::warn!(file = %path.display(), %error, "cannot append to the savings ledger");
        }
    }

    /// Flushes `FLUSH_EVERY` after the buffer's first record (so records are batched, and an
    /// idle daemon does not wake at all) until `stop`, then once more.
    pub async fn run_flusher(
        self: std::sync::Arc<Self>,
        stop: tokio_util::sync::CancellationToken,
    ) {
        loop {
            tokio::select! {
                _ = self.filled.notified() => {}
                _ = stop.cancelled() => break,
            }
            tokio::select! {
                _ = tokio::time::sleep(FLUSH_EVERY) => {}
                _ = stop.cancelled() => break,
            }
            let ledger = self.clone();
            let _ = tokio::task::spawn_blocking(move || ledger.flush()).await;
        }
        let _ = tokio::task::spawn_blocking(move || self.flush()).await;
    }

    /// Sums the records of the last `since` (or all), grouped if asked.
    pub fn report(
        &self,
        since: Option<Duration>,
        by: Option<SavingsGrouping>,
        prices: Prices,
    ) -> SavingsReport {
        let mut totals = SavingsTotals::default();
        let mut groups: BTreeMap<String, SavingsTotals> = BTreeMap::new();
        self.flush();
        self.each_record(since_time(since), |record| {
            // A token count is no work offloaded.
            if record.outcome != "ok" || record.contract.is_some() || record.kind == "count_tokens"
            {
                return;
            }
            let saved = prices.cost(record.input_tokens, record.output_tokens);
            for sums in std::iter::once(&mut totals).chain(by.map(|by| {
                let key = match by {
                    SavingsGrouping::Model => record.model.clone(),
                    SavingsGrouping::Agent => {
                        record.agent.clone().unwrap_or_else(|| "(untagged)".into())
                    }
                    SavingsGrouping::Day => day(record.time),
                };
                groups.entry(key).or_default()
            })) {
                sums.tasks += 1;
                sums.input_tokens += record.input_tokens;
                sums.output_tokens += record.output_tokens;
                sums.usd_saved += saved;
            }
        });
        SavingsReport {
            since_s: since.map(|d| d.as_secs()),
            input_usd_per_mtok: prices.input_usd_per_mtok,
            output_usd_per_mtok: prices.output_usd_per_mtok,
            totals,
            groups: groups
                .into_iter()
                .map(|(key, totals)| SavingsGroup { key, totals })
                .collect(),
        }
    }

    /// Contract results per model and kind over the last `since` (or all).
    pub fn fitness(&self, since: Option<Duration>) -> FitnessReport {
        let mut rows: BTreeMap<(String, ContractKind, bool), [u64; 3]> = BTreeMap::new();
        self.flush();
        self.each_record(since_time(since), |record| {
            if let Some(check) = record.contract {
                let key = (record.model, check.kind, check.constrained);
                rows.entry(key).or_default()[check.result as usize] += 1;
            }
        });
        FitnessReport {
            since_s: since.map(|d| d.as_secs()),
            models: rows
                .into_iter()
                .map(|((model, kind, constrained), [first, retry, failed])| {
                    let tasks = first + retry + failed;
                    FitnessRow {
                        model,
                        kind,
                        constrained,
                        tasks,
                        passed_first: first,
                        passed_retry: retry,
                        failed,
                        pass_rate: (first + retry) as f64 / tasks.max(1) as f64,
                    }
                })
                .collect(),
        }
    }

    /// Every readable record from `from` (Unix seconds) on, oldest file first. The file lock is
    /// held while reading, so a rotation cannot move a file from under the sums.
    fn each_record(&self, from: f64, mut each: impl FnMut(Record)) {
        let _guard = self
            .file
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for file in [self.rotated(), self.path.clone()].into_iter().flatten() {
            let Ok(file) = std::fs::File::open(&file) else {
                continue;
            };
            for line in std::io::BufReader::new(file).lines().map_while(Result::ok) {
                match serde_json::from_str::<Record>(&line) {
                    Ok(record) if record.time >= from => each(record),
                    _ => {}
                }
            }
        }
    }
}

fn since_time(since: Option<Duration>) -> f64 {
    since.map_or(f64::MIN, |d| now_s() - d.as_secs_f64())
}

/// Adds a contract record's result to its model's recent window.
fn remember(recent: &mut HashMap<String, VecDeque<bool>>, record: &Record) {
    let Some(check) = record.contract.filter(|c| c.constrained) else {
        return;
    };
    let results = recent.entry(record.model.clone()).or_default();
    results.push_back(check.result != ContractResult::Failed);
    if results.len() > PASS_RATE_WINDOW {
        results.pop_front();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(model: &str, agent: Option<&str>, tokens: u64, outcome: &str) -> Record {
        Record {
            time: now_s(),
            kind: "chat".into(),
            model: model.into(),
            agent: agent.map(str::to_owned),
            input_tokens: tokens,
            output_tokens: tokens,
            queued_ms: 0,
            load_ms: 0,
            total_ms: 1,
            outcome: outcome.into(),
            contract: None,
        }
    }

    const PRICES: Prices = Prices {
        input_usd_per_mtok: 3.0,
        output_usd_per_mtok: 15.0,
    };

    #[test]
    fn sums_group_and_survive_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(Some(dir.path().join("ledger.jsonl")), 300);
        ledger.append(record("a", Some("coder"), 1_000_000, "ok"));
        ledger.append(record("b", None, 1_000_000, "ok"));
        ledger.flush();
        ledger.append(record("a", Some("coder"), 5, "deadline_exceeded"));
        ledger.flush();
        assert!(
            dir.path().join("ledger.1.jsonl").exists(),
            "rotated past 300 bytes"
        );
        let all = ledger.report(None, Some(SavingsGrouping::Agent), PRICES);
        assert_eq!(all.totals.tasks, 2, "failed tasks saved nothing");
        assert!(
            (all.totals.usd_saved - 36.0).abs() < 1e-9,
            "{}",
            all.totals.usd_saved
        );
        let keys: Vec<&str> = all.groups.iter().map(|g| g.key.as_str()).collect();
        assert_eq!(keys, ["(untagged)", "coder"]);
        let by_day = ledger.report(
            Some(Duration::from_secs(60)),
            Some(SavingsGrouping::Day),
            PRICES,
        );
        assert_eq!(by_day.groups.len(), 1);
    }

    #[test]
    fn days_are_civil_dates() {
        assert_eq!(day(0.0), "1970-01-01");
        assert_eq!(day(951_782_400.0), "2000-02-29");
        assert_eq!(day(1_795_651_200.0), "2026-11-26");
    }
}
