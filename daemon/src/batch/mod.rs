//! Batch jobs: a file of tasks in, results out. A job is validated whole at submission, kept in
//! an SQLite store (`store`), and run in the background by one runner: each line a task at
//! `batch` priority (interactive and normal tasks overtake it), at most `[batch] concurrency`
//! lines of a job in the queue at once, lines of warm models first (`policy`). A line is done
//! once its result is written; after a crash the lines that were running run again, so every
//! id ends exactly once. `lines` reads the file; `run` runs one line.

mod lines;
mod policy;
mod run;
mod store;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use lmsd_proto::{BatchJob, BatchState, BatchSubmitRequest, Event};
use serde_json::{json, Value};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub use store::{FileRow, LineRow, StoreError};
use store::{NewLine, Store};

use crate::tasks::{Context, TaskError};

/// How often the runner looks again without being woken (a disk that may have room now, a
/// model that may have loaded).
const TICK: Duration = Duration::from_secs(1);

/// A job's life in this process: what runs, its pace, and a pause.
#[derive(Debug)]
struct Run {
    cancel: CancellationToken,
    in_flight: HashMap<String, u64>,
    /// When this process began running it, and lines finished since: the rate.
    began: Instant,
    finished: u64,
    loads: u64,
    /// Why it is paused (a store write failed); it resumes at the next write that works.
    paused: Option<String>,
    /// Pending lines per model, kept as lines are claimed; `None` when they must be read from
    /// the store again (a line went back to pending). Reading them each time a line ends would
    /// make a job's cost grow with the square of its length.
    pending: Option<Vec<policy::Pending>>,
    /// A line went back to pending while a fill held the counts: they are stale.
    pending_stale: bool,
    /// The job's counts, kept here for progress events (the store's are the truth).
    total: u64,
    done: u64,
    failed: u64,
}

impl Run {
    fn new(row: &store::JobRow) -> Run {
        Run {
            cancel: CancellationToken::new(),
            in_flight: HashMap::new(),
            began: Instant::now(),
            finished: 0,
            loads: row.loads,
            paused: None,
            pending: None,
            pending_stale: false,
            total: row.total,
            done: row.done,
            failed: row.failed,
        }
    }

    fn running(&self) -> u64 {
        self.in_flight.values().sum()
    }
}

/// The batch jobs: the store, and the jobs running now.
#[derive(Debug)]
pub struct Batches {
    /// Where the store is (none: no state directory).
    path: Option<PathBuf>,
    /// Opened at start when it exists (jobs may wait in it), else at the first batch request:
    /// an lmsd that never runs a job does not carry SQLite in its memory. `Err` says why it
    /// could not be opened; lmsd runs on, and batch requests say why.
    store: OnceLock<Result<Store, String>>,
    runs: Mutex<HashMap<String, Run>>,
    wake: Notify,
}

fn now_s() -> u64 {
    crate::ledger::now_s() as u64
}

fn unavailable(why: &str) -> TaskError {
    TaskError::BadRequest(format!("batch jobs are unavailable: {why}"))
}

fn store_error(error: StoreError) -> TaskError {
    TaskError::BadRequest(error.to_string())
}

impl Batches {
    /// The batch jobs kept at `path`; the store is opened now if it exists.
    pub fn open(path: Option<PathBuf>) -> Batches {
        let batches = Batches {
            path,
            store: OnceLock::new(),
            runs: Mutex::new(HashMap::new()),
            wake: Notify::new(),
        };
        if batches.path.as_ref().is_some_and(|p| p.exists()) {
            let _ = batches.store();
        }
        batches
    }

    /// The store, opened on first use.
    fn store(&self) -> Result<&Store, TaskError> {
        let opened = self.store.get_or_init(|| {
            let store = match &self.path {
                None => Err("lmsd has no state directory (set [server] state_dir)".to_owned()),
                Some(path) => Store::open(path).map_err(|e| e.to_string()),
            };
            if let Err(why) = &store {
                tracing::error!("{why}; batch jobs are unavailable");
            }
            store
        });
        opened.as_ref().map_err(|why| unavailable(why))
    }

    /// The store if there is one (opened now if need be), `None` if no job was ever stored:
    /// reading the jobs does not create it.
    fn existing(&self) -> Result<Option<&Store>, TaskError> {
        if self.opened().is_none() && !self.path.as_ref().is_some_and(|p| p.exists()) {
            return Ok(None);
        }
        self.store().map(Some)
    }

    /// The store if it is open, without opening it.
    fn opened(&self) -> Option<&Store> {
        self.store.get().and_then(|s| s.as_ref().ok())
    }

    fn runs(&self) -> std::sync::MutexGuard<'_, HashMap<String, Run>> {
        self.runs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Validates and stores a job; it starts at once. With invalid lines the job is refused
    /// whole (their numbers in the error) unless `skip_invalid`, when they are failed lines.
    pub async fn submit(
        self: &Arc<Self>,
        request: BatchSubmitRequest,
        openai: Option<Value>,
    ) -> Result<BatchJob, TaskError> {
        self.store()?;
        let this = self.clone();
        let job = tokio::task::spawn_blocking(move || this.submit_now(request, openai))
            .await
            .map_err(|e| TaskError::BadRequest(format!("the submission failed: {e}")))??;
        self.wake.notify_one();
        Ok(job)
    }

    fn submit_now(
        &self,
        request: BatchSubmitRequest,
        openai: Option<Value>,
    ) -> Result<BatchJob, TaskError> {
        let store = self.store()?;
        let parsed = lines::parse(&request.lines, &request.defaults);
        if parsed.lines.is_empty() {
            return Err(TaskError::BadRequest(
                "the job has no lines: one JSON task per line".into(),
            ));
        }
        if !parsed.invalid.is_empty() && !request.skip_invalid {
            return Err(TaskError::BadRequest(format!(
                "{} of the job's lines are invalid, so nothing was submitted (send --skip-invalid to run the rest): {}",
                parsed.invalid.len(),
                lines::describe(&parsed.invalid)
            )));
        }
        let stored: Vec<NewLine<'_>> = parsed
            .lines
            .iter()
            .map(|line| match &line.task {
                Ok(task) => NewLine {
                    seq: line.seq,
                    id: &line.id,
                    model: &line.model,
                    task: serde_json::to_string(task).ok(),
                    error: None,
                },
                Err(why) => NewLine {
                    seq: line.seq,
                    id: &line.id,
                    model: &line.model,
                    task: None,
                    error: Some(
                        json!({"code": "bad_request", "message": format!("line {}: {why}", line.seq)})
                            .to_string(),
                    ),
                },
            })
            .collect();
        let id = format!("batch_{:016x}", fastrand::u64(..));
        let openai = openai.map(|o| o.to_string());
        store
            .insert_job(
                &id,
                request.name.as_deref(),
                now_s(),
                openai.as_deref(),
                &stored,
            )
            .map_err(store_error)?;
        tracing::info!(job = %id, lines = stored.len(), invalid = parsed.invalid.len(), "batch job submitted");
        let mut job = self.status(&id)?;
        job.invalid = parsed.invalid;
        Ok(job)
    }

    /// A job's progress.
    pub fn status(&self, id: &str) -> Result<BatchJob, TaskError> {
        let Some(store) = self.existing()? else {
            return Err(no_job(id));
        };
        let row = store
            .job(id)
            .map_err(store_error)?
            .ok_or_else(|| no_job(id))?;
        Ok(self.report(row))
    }

    /// Every job's progress, oldest first.
    pub fn list(&self) -> Result<Vec<BatchJob>, TaskError> {
        let Some(store) = self.existing()? else {
            return Ok(Vec::new());
        };
        let rows = store.jobs().map_err(store_error)?;
        Ok(rows.into_iter().map(|row| self.report(row)).collect())
    }

    fn report(&self, row: store::JobRow) -> BatchJob {
        let runs = self.runs();
        let run = runs.get(&row.id);
        let mut state = match row.state.as_str() {
            "running" => BatchState::Running,
            "completed" => BatchState::Completed,
            "cancelled" => BatchState::Cancelled,
            _ => BatchState::Unknown,
        };
        let error = run.and_then(|r| r.paused.clone());
        if error.is_some() {
            state = BatchState::Paused;
        }
        let rate = run.map_or(0.0, |r| {
            r.finished as f64 / r.began.elapsed().as_secs_f64().max(0.001)
        });
        let left = row.total.saturating_sub(row.done + row.failed);
        BatchJob {
            job_id: row.id,
            name: row.name,
            state,
            total: row.total,
            done: row.done,
            failed: row.failed,
            running: row.running,
            loads: run.map_or(row.loads, |r| r.loads),
            rate_per_s: rate,
            eta_s: (state == BatchState::Running && rate > 0.0 && left > 0)
                .then(|| (left as f64 / rate).ceil() as u64),
            created_s: row.created,
            finished_s: row.finished,
            error,
            invalid: Vec::new(),
        }
    }

    /// The OpenAI Batch API's record of a job it made, if it made this one.
    pub fn openai_of(&self, id: &str) -> Result<Option<Value>, TaskError> {
        let row = self.store()?.job(id).map_err(store_error)?;
        Ok(row
            .and_then(|r| r.openai)
            .and_then(|text| serde_json::from_str(&text).ok()))
    }

    /// A job's lines in file order, each as a result line (see [`run::result_line`]).
    pub fn results(&self, id: &str, mut each: impl FnMut(Value)) -> Result<u64, TaskError> {
        let store = self.store()?;
        store
            .job(id)
            .map_err(store_error)?
            .ok_or_else(|| no_job(id))?;
        let mut count = 0;
        store
            .each_line(id, |line| {
                count += 1;
                each(run::result_line(&line));
            })
            .map_err(store_error)?;
        Ok(count)
    }

    /// The raw lines of a job, for OpenAI's output and error files.
    pub fn each_line(&self, id: &str, each: impl FnMut(store::LineRow)) -> Result<(), TaskError> {
        self.store()?.each_line(id, each).map_err(store_error)
    }

    /// Cancels a job: its pending lines will not run, its running ones are cancelled.
    pub fn cancel(&self, id: &str) -> Result<BatchJob, TaskError> {
        let store = self.store()?;
        store
            .job(id)
            .map_err(store_error)?
            .ok_or_else(|| no_job(id))?;
        store.end(id, "cancelled", now_s()).map_err(store_error)?;
        if let Some(run) = self.runs().get(id) {
            run.cancel.cancel();
        }
        tracing::info!(job = %id, "batch job cancelled");
        self.status(id)
    }

    /// Deletes a job and all it stored, cancelling it first.
    pub fn delete(&self, id: &str) -> Result<bool, TaskError> {
        let Some(store) = self.existing()? else {
            return Ok(false);
        };
        // Out of the store first: a fill in between must not find the job and start its lines.
        let deleted = store.delete(id).map_err(store_error)?;
        if let Some(run) = self.runs().remove(id) {
            run.cancel.cancel();
        }
        if deleted {
            tracing::info!(job = %id, "batch job deleted");
        }
        Ok(deleted)
    }

    pub fn put_file(&self, file: &FileRow, content: &[u8]) -> Result<(), TaskError> {
        self.store()?.put_file(file, content).map_err(store_error)
    }

    pub fn file(&self, id: &str) -> Result<Option<FileRow>, TaskError> {
        self.store()?.file(id).map_err(store_error)
    }

    pub fn files(&self) -> Result<Vec<FileRow>, TaskError> {
        match self.existing()? {
            Some(store) => store.files().map_err(store_error),
            None => Ok(Vec::new()),
        }
    }

    pub fn file_content(&self, id: &str) -> Result<Option<Vec<u8>>, TaskError> {
        self.store()?.file_content(id).map_err(store_error)
    }

    pub fn delete_file(&self, id: &str) -> Result<bool, TaskError> {
        self.store()?.delete_file(id).map_err(store_error)
    }
}

fn no_job(id: &str) -> TaskError {
    TaskError::BadRequest(format!(
        "no batch job {id:?}: `lmsd-ctl batch list` shows the jobs lmsd keeps"
    ))
}

/// Runs the jobs until lmsd stops: claims lines as room frees, lines of warm models first.
pub async fn serve(ctx: Context) {
    let batches = ctx.batches.clone();
    let mut events = ctx.observers.events.subscribe();
    let mut last_expiry = None::<Instant>;
    loop {
        if ctx.stopping.is_cancelled() {
            return;
        }
        if last_expiry.is_none_or(|t: Instant| t.elapsed() > Duration::from_secs(3600)) {
            last_expiry = Some(Instant::now());
            expire(&ctx);
        }
        if let Err(error) = fill(&ctx).await {
            tracing::warn!(%error, "the batch runner could not read its jobs");
        }
        // With no job running, nothing to look at until one is submitted: no wake-ups.
        let idle = batches.runs().is_empty();
        tokio::select! {
            _ = ctx.stopping.cancelled() => return,
            _ = batches.wake.notified() => {}
            _ = tokio::time::sleep(TICK), if !idle => {}
            event = events.recv() => {
                if let Ok(Event::Loaded { .. }) = event {
                    for run in batches.runs().values_mut().filter(|r| r.running() > 0) {
                        run.loads += 1;
                    }
                }
            }
        }
    }
}

/// Deletes jobs that ended longer ago than `[batch] keep`.
fn expire(ctx: &Context) {
    let keep = ctx.config.borrow().batch.keep;
    let Some(store) = ctx.batches.opened() else {
        return;
    };
    match store.expire(now_s().saturating_sub(keep.as_secs())) {
        Ok(0) => {}
        Ok(n) => tracing::info!(jobs = n, "deleted batch jobs past [batch] keep"),
        Err(error) => tracing::warn!(%error, "could not delete old batch jobs"),
    }
}

/// Claims lines for every running job with room, and starts them.
async fn fill(ctx: &Context) -> Result<(), TaskError> {
    let batches = &ctx.batches;
    // Until a job is submitted (which opens the store), there is nothing to run.
    let Some(store) = batches.opened() else {
        return Ok(());
    };
    let (concurrency, order) = {
        let config = ctx.config.borrow();
        (config.batch.concurrency, config.batch.order)
    };
    let jobs = store.running_jobs().map_err(store_error)?;
    // A job cancelled or deleted is forgotten here once its last line has ended.
    batches
        .runs()
        .retain(|id, run| jobs.contains(id) || run.running() > 0);
    let mut warm: Option<HashSet<String>> = None;
    for job in jobs {
        if !batches.runs().contains_key(&job) {
            let Some(row) = store.job(&job).map_err(store_error)? else {
                continue;
            };
            batches.runs().insert(job.clone(), Run::new(&row));
        }
        let (room, in_flight, cached) = {
            let mut runs = batches.runs();
            let Some(run) = runs.get_mut(&job) else {
                continue;
            };
            if let Some(why) = &run.paused {
                // Paused by a failed write: resume once one works (its lines in flight have
                // ended, and those whose end could not be written run again).
                if run.running() > 0 || store.requeue_running(&job).is_err() {
                    continue;
                }
                tracing::info!(job = %job, was = %why, "batch job resumes");
                run.paused = None;
                run.pending = None;
            }
            (
                u64::from(concurrency).saturating_sub(run.running()),
                run.in_flight.clone(),
                run.pending.take(),
            )
        };
        let mut pending: Vec<policy::Pending> = match cached {
            Some(pending) => pending,
            None => store
                .pending_by_model(&job)
                .map_err(store_error)?
                .into_iter()
                .map(|(model, count, first)| policy::Pending {
                    model,
                    count,
                    first,
                })
                .collect(),
        };
        if pending.is_empty() {
            if in_flight.values().all(|n| *n == 0) {
                store.end(&job, "completed", now_s()).map_err(store_error)?;
                batches.runs().remove(&job);
                tracing::info!(job = %job, "batch job completed");
            }
            continue;
        }
        if room == 0 {
            keep_pending(batches, &job, pending);
            continue;
        }
        if warm.is_none() {
            let status = ctx.pool.status().await?;
            warm = Some(status.instances.iter().map(|i| i.model.clone()).collect());
        }
        let claims = policy::next(
            &pending,
            warm.as_ref().unwrap_or(&HashSet::new()),
            &in_flight,
            room,
            order,
        );
        for (model, n) in claims {
            for line in store
                .claim(&job, model.as_deref(), n)
                .map_err(store_error)?
            {
                if let Some(p) = pending.iter_mut().find(|p| p.model == line.model) {
                    p.count -= 1;
                }
                run::start(ctx, &job, line);
            }
        }
        pending.retain(|p| p.count > 0);
        keep_pending(batches, &job, pending);
    }
    Ok(())
}

/// Keeps a job's pending counts for the next fill, unless they were made stale meanwhile.
fn keep_pending(batches: &Batches, job: &str, pending: Vec<policy::Pending>) {
    if let Some(run) = batches.runs().get_mut(job) {
        run.pending = (!std::mem::take(&mut run.pending_stale)).then_some(pending);
    }
}
