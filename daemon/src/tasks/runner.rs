//! The task runner: a task's registration, deadline and candidates, its wait in the pool's
//! queue, and the faults it survives the way a careful script would — retries with backoff on
//! transient errors, a reload when an instance vanished or answered nothing, the next candidate
//! when a model is missing or does not fit. What a task does once it holds a slot is in `work`.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use lmsd_proto::{Event, TaskKind, TaskOptions, TaskReport, Ttl, UnloadRequest};
use tokio_util::sync::CancellationToken;

use super::choice::{self, Candidate, PoolView};
use super::contract::Contract;
use super::forward::{self, ForwardRequest, Tokens};
use super::registry::TaskHandle;
use super::sessions::SystemPrompt;
use super::work::context_needed;
use super::{millis, Context, EventSink, TaskError};
use crate::backend::{BackendError, ChatReply, Frame, TextSource};
use crate::ledger::{ContractCheck, ContractResult, Record};
use crate::pool::{AcquireRequest, Lease, PoolError, PoolProgress, Progress};
use lmsd_proto::{ChatRequest, EmbedRequest};

/// A task in flight: its registration, deadline, options and the running account of its time.
pub(super) struct Task<'a> {
    pub(super) ctx: &'a Context,
    pub(super) handle: TaskHandle,
    pub(super) submitted: Instant,
    pub(super) deadline: Instant,
    pub(super) options: TaskOptions,
    pub(super) retries: u32,
    pub(super) sink: &'a EventSink,
    pub(super) report: TaskReport,
    /// Time spent loading models for this task, if it waited for a load.
    pub(super) load_time: Option<Duration>,
    /// Answers checked against the task's contract, on every model tried.
    pub(super) answers: u32,
}

/// What a task does once it holds a slot: a chat or an embedding.
pub(super) enum Work<'a> {
    Chat {
        chat: &'a ChatRequest,
        contract: Option<&'a Contract>,
    },
    Embed(&'a EmbedRequest),
    /// A request in an agent's wire format, relayed to the engine's endpoint for it.
    Forward {
        request: &'a ForwardRequest,
        relay: Option<&'a tokio::sync::mpsc::Sender<Frame>>,
    },
}

pub(super) enum Done {
    /// The reply, and the system prompt of the conversation it belongs to.
    Chat {
        reply: ChatReply,
        system: SystemPrompt,
        /// The answer parsed, when it kept a contract.
        json: Option<serde_json::Value>,
    },
    Embed(Vec<Vec<f64>>),
    /// The engine's reply to a relayed request (for a stream, its last whole object).
    Forward {
        reply: serde_json::Value,
        usage: Tokens,
    },
}

impl Done {
    /// A chat's text and where it came from; `None` for embeddings or an empty chat.
    pub(super) fn text(&self) -> Option<(String, TextSource)> {
        match self {
            Done::Chat { reply, .. } => reply.text(),
            Done::Embed(_) | Done::Forward { .. } => None,
        }
    }

    /// The answer a contract checks: a chat's message (not its reasoning, even when that is
    /// all there is), a relayed chat completion's content.
    fn answer(&self) -> String {
        match self {
            Done::Chat { reply, .. } => match reply.text() {
                Some((text, TextSource::Message)) => text,
                _ => String::new(),
            },
            Done::Forward { reply, .. } => forward::answer_of(reply),
            Done::Embed(_) => String::new(),
        }
    }

    /// The same, with the answer that kept the contract parsed.
    fn kept(self, json: serde_json::Value) -> Done {
        match self {
            Done::Chat { reply, system, .. } => Done::Chat {
                reply,
                system,
                json: Some(json),
            },
            Done::Forward { reply, usage } => Done::Forward {
                reply: forward::with_answer(reply, &json),
                usage,
            },
            done @ Done::Embed(_) => done,
        }
    }
}

impl<'a> Task<'a> {
    fn start(
        ctx: &'a Context,
        kind: TaskKind,
        model: &str,
        options: &TaskOptions,
        vision: bool,
        sink: &'a EventSink,
        cancel: CancellationToken,
    ) -> Self {
        let config = ctx.config.borrow().clone();
        let submitted = Instant::now();
        let deadline = submitted
            + options
                .timeout
                .map_or(config.tasks.default_timeout, |t| t.0);
        let handle = ctx
            .registry
            .register(kind, model, options.priority, deadline, cancel);
        ctx.observers.emit(Event::TaskQueued {
            task_id: handle.id.clone(),
            kind,
            model: model.to_owned(),
        });
        let mut options = options.clone();
        // Images need a model that sees them.
        options.needs.vision |= vision;
        options.prefer.extend(config.routing.prefer.iter().cloned());
        Task {
            ctx,
            report: TaskReport {
                task_id: handle.id.clone(),
                ..TaskReport::default()
            },
            handle,
            submitted,
            deadline,
            options,
            retries: config.tasks.retries,
            sink,
            load_time: None,
            answers: 0,
        }
    }

    /// The models to try, best first.
    async fn candidates(
        &self,
        requested: &str,
        embedding: bool,
        contract: bool,
    ) -> Result<Vec<Candidate>, TaskError> {
        let named = requested != "auto";
        if named && self.options.prefer.is_empty() {
            return Ok(vec![Candidate {
                model: requested.to_owned(),
                reason: "requested".into(),
                size_bytes: None,
            }]);
        }
        let mut status = self.ctx.pool.status().await?;
        if status.catalogue.is_empty() && !status.reachable {
            // Nothing to choose from yet: one fresh read, started now, decides.
            self.ctx.pool.models().await?;
            status = self.ctx.pool.status().await?;
        }
        let size_of = |key: &str| {
            status
                .catalogue
                .iter()
                .find(|m| m.key == key)
                .map(|m| m.size_bytes)
        };
        if named {
            let mut list = vec![Candidate {
                model: requested.to_owned(),
                reason: "requested".into(),
                size_bytes: size_of(requested),
            }];
            for key in self.options.prefer.iter().filter(|k| *k != requested) {
                list.push(Candidate {
                    model: key.clone(),
                    reason: "fallback from the prefer list".into(),
                    size_bytes: size_of(key),
                });
            }
            return Ok(list);
        }
        let view = PoolView {
            loaded: status
                .instances
                .iter()
                .filter(|i| !i.instance_id.is_empty())
                .map(|i| i.model.clone())
                .collect(),
            free_bytes: status.memory.free_bytes,
            budget_bytes: status.memory.budget_bytes,
            overhead: status.overhead_bytes,
        };
        let mut list = choice::choose(
            &status.catalogue,
            &view,
            &self.options.needs,
            &self.options.prefer,
            embedding,
        );
        let min_pass_rate = self.ctx.config.borrow().routing.min_pass_rate;
        if let (true, Some(min)) = (contract, min_pass_rate) {
            list = choice::demote_unfit(list, min, |model| self.ctx.ledger.recent_pass_rate(model));
        }
        if list.is_empty() {
            let kind = if embedding {
                " (an embedding model)"
            } else {
                ""
            };
            return Err(TaskError::NoModel(format!(
                "{kind} {:?}",
                self.options.needs
            )));
        }
        Ok(list)
    }

    /// Waits for a slot on `model`, forwarding queue positions and loads as events.
    async fn acquire(
        &mut self,
        model: &str,
        ttl: Option<Ttl>,
        context_length: Option<u32>,
        min_context: Option<u32>,
    ) -> Result<Lease, TaskError> {
        let progress = TaskProgress {
            task_id: self.handle.id.clone(),
            sink: self.sink.clone(),
        };
        let request = AcquireRequest {
            model: model.to_owned(),
            ttl,
            priority: self.options.priority,
            deadline: self.deadline.into(),
            context_length,
            min_context,
            progress: Some(Box::new(progress)),
        };
        let started = Instant::now();
        let lease = self.ctx.pool.acquire(request).await?;
        let waited = started.elapsed();
        let load = lease.load_time.unwrap_or_default().min(waited);
        self.report.load_ms += millis(load);
        if let Some(loaded) = lease.load_time {
            self.load_time = Some(self.load_time.unwrap_or_default() + loaded);
        }
        self.report.queued_ms += millis(waited - load);
        if let Some(load) = lease.load_time {
            self.sink
                .send(Event::Load {
                    model_instance_id: lease.instance_id.clone(),
                    progress: 1.0,
                })
                .await;
            tracing::debug!(task = %self.handle.id, load_ms = millis(load), "loaded for this task");
        }
        self.handle.set_instance(Some(&lease.instance_id));
        self.ctx.observers.emit(Event::TaskStarted {
            task_id: self.handle.id.clone(),
            instance_id: lease.instance_id.clone(),
        });
        Ok(lease)
    }

    /// Runs the work on each candidate in turn until one answers.
    async fn run(
        &mut self,
        candidates: &[Candidate],
        work: &Work<'_>,
    ) -> Result<(Done, Answered), TaskError> {
        let mut last_error = None;
        // After a model ran out of memory, only smaller ones are worth a try.
        let mut smaller_than: Option<u64> = None;
        for candidate in candidates {
            if let (Some(limit), Some(size)) = (smaller_than, candidate.size_bytes) {
                if size >= limit {
                    continue;
                }
            }
            match self.run_on(candidate, work).await {
                Ok(done) => {
                    self.report.model = candidate.model.clone();
                    self.report.reason = candidate.reason.clone();
                    return Ok(done);
                }
                Err(error) if error.next_candidate_may_help() => {
                    if error.is_out_of_memory() {
                        smaller_than = candidate.size_bytes.or(smaller_than);
                    }
                    tracing::info!(task = %self.handle.id, model = %candidate.model, %error, "trying the next candidate");
                    last_error = Some(error);
                }
                Err(error) => return Err(error),
            }
        }
        Err(last_error.unwrap_or_else(|| TaskError::NoModel(String::new())))
    }

    /// Runs the work on one model, retrying transient faults with backoff, once reloading an
    /// instance that vanished or answered nothing.
    async fn run_on(
        &mut self,
        candidate: &Candidate,
        work: &Work<'_>,
    ) -> Result<(Done, Answered), TaskError> {
        let (ttl, context_length, min_context) = match work {
            Work::Chat { chat, .. } => (
                if chat.unload_after {
                    Some(Ttl::After(Duration::ZERO))
                } else if chat.keep {
                    Some(Ttl::Never)
                } else {
                    chat.ttl
                },
                chat.context_length,
                context_needed(chat),
            ),
            Work::Forward { request, .. } => (None, None, forward::context_needed(request)),
            Work::Embed(_) => (None, None, None),
        };
        let mut transient_tries = 0;
        // After an answer broke its contract, the one retry on this model runs at temperature 0.
        let mut cold = false;
        let already_cold = match work {
            Work::Chat { chat, .. } => chat.temperature == Some(0.0),
            Work::Forward { request, .. } => request.body["temperature"].as_f64() == Some(0.0),
            Work::Embed(_) => false,
        };
        let mut unreachable_since = None;
        let outage_wait = self.ctx.config.borrow().tasks.outage_wait;
        let mut reloaded = false;
        let mut reread = false;
        loop {
            self.report.attempts += 1;
            // Boxed, like `perform` below: an async fn's state holds room for every future it
            // awaits, so a queued task would carry a running one's. Boxes exist only while used.
            let lease =
                match Box::pin(self.acquire(&candidate.model, ttl, context_length, min_context))
                    .await
                {
                    Ok(lease) => lease,
                    // The catalogue may be stale (a model downloaded a moment ago): read it again
                    // once before giving up on the name.
                    Err(TaskError::Pool(PoolError::NotFound { .. })) if !reread => {
                        reread = true;
                        let _ = Box::pin(self.ctx.pool.models()).await;
                        continue;
                    }
                    Err(error) => return Err(error),
                };
            let instance = lease.instance_id.clone();
            let result = Box::pin(self.perform(&lease, candidate, work, cold))
                .await
                .and_then(|done| {
                    let attempt = ContractAttempt {
                        model: &candidate.model,
                        retry: cold,
                        last: cold || already_cold,
                    };
                    self.keep_contract(work, done, attempt)
                });
            drop(lease);
            self.handle.set_instance(None);
            let error = match result {
                Ok(done) => {
                    return Ok((
                        done,
                        Answered {
                            instance,
                            load_time: self.load_time,
                            answers: self.answers,
                        },
                    ))
                }
                Err(error) => error,
            };
            if let TaskError::Backend(BackendError::Unreachable { .. }) = &error {
                unreachable_since.get_or_insert_with(Instant::now);
            }
            match &error {
                // Already at temperature 0, the same request would get the same answer.
                TaskError::OutputInvalid { .. } if !cold && !already_cold => {
                    cold = true;
                    tracing::info!(task = %self.handle.id, model = %candidate.model, "the answer broke its contract; asking once more at temperature 0");
                }
                TaskError::OutputInvalid { .. } => return Err(error),
                // The instance vanished under the task (outside unload, a crash, LM Studio
                // restart; or another model answered in its place), or answered nothing: reload
                // it once and try again.
                TaskError::Backend(
                    BackendError::ModelNotFound { .. } | BackendError::InstanceGone { .. },
                )
                | TaskError::EmptyReply { .. }
                    if !reloaded =>
                {
                    reloaded = true;
                    tracing::warn!(task = %self.handle.id, instance = %instance, %error, "reloading the instance and retrying");
                    if matches!(error, TaskError::EmptyReply { .. }) {
                        let unload = UnloadRequest {
                            instance_id: Some(instance),
                            ..UnloadRequest::default()
                        };
                        let _ = Box::pin(self.ctx.pool.unload(unload)).await;
                    } else {
                        let _ = Box::pin(self.ctx.pool.models()).await;
                    }
                }
                // Transient faults get `retries` tries; an engine that cannot be reached may be
                // restarting, and is waited out up to `outage_wait` from its first refusal, as
                // the pool does for a waiting task.
                TaskError::Backend(backend)
                    if backend.is_transient()
                        && (transient_tries + 1 < self.retries
                            || unreachable_since
                                .is_some_and(|since: Instant| since.elapsed() < outage_wait)) =>
                {
                    transient_tries += 1;
                    self.ctx.pool.refresh_soon();
                    let pause = backoff(transient_tries);
                    tracing::warn!(task = %self.handle.id, %error, try_ = transient_tries, pause_ms = millis(pause), "transient engine error; retrying");
                    tokio::time::sleep(pause).await;
                }
                _ => {
                    self.ctx.pool.refresh_soon();
                    return Err(error);
                }
            }
        }
    }

    /// A chat's answer checked against its contract: parsed into `json`, or `OutputInvalid`.
    /// A model's last chance at the contract and every pass are entered in the ledger.
    fn keep_contract(
        &mut self,
        work: &Work<'_>,
        done: Done,
        attempt: ContractAttempt<'_>,
    ) -> Result<Done, TaskError> {
        let (contract, constrained) = match work {
            Work::Chat {
                chat,
                contract: Some(contract),
            } => (*contract, !chat.check_only),
            Work::Forward { request, .. } => match &request.contract {
                Some(contract) => (contract, true),
                None => return Ok(done),
            },
            _ => return Ok(done),
        };
        self.answers += 1;
        let answer = done.answer();
        let checked = contract.check(&answer);
        let result = match (&checked, attempt.retry, attempt.last) {
            (Ok(_), false, _) => Some(ContractResult::PassedFirst),
            (Ok(_), true, _) => Some(ContractResult::PassedRetry),
            (Err(_), _, true) => Some(ContractResult::Failed),
            (Err(_), _, false) => None,
        };
        if let Some(result) = result {
            let check = ContractCheck {
                kind: contract.kind(),
                result,
                constrained,
            };
            self.ctx
                .ledger
                .append(Record::contract(attempt.model, check));
        }
        match checked {
            Ok(value) => Ok(done.kept(value)),
            Err(problems) => Err(TaskError::OutputInvalid {
                kind: contract.kind(),
                attempts: self.answers,
                problems,
                output: answer,
            }),
        }
    }

    fn finish(mut self) -> TaskReport {
        self.report.total_ms = millis(self.submitted.elapsed());
        self.report
    }
}

/// Which answer of a model a contract check is about.
struct ContractAttempt<'a> {
    model: &'a str,
    /// The retry at temperature 0.
    retry: bool,
    /// No retry follows on this model.
    last: bool,
}

/// A waiting task's queue positions and loads, told to its client as events.
#[derive(Debug)]
struct TaskProgress {
    task_id: String,
    sink: EventSink,
}

impl Progress for TaskProgress {
    fn tell(&self, progress: PoolProgress) {
        self.sink.offer(match progress {
            PoolProgress::Queued { position } => Event::Queued {
                task_id: self.task_id.clone(),
                position,
            },
            PoolProgress::Loading { model } => Event::Load {
                model_instance_id: model,
                progress: 0.0,
            },
        });
    }
}

/// The instance a task's answer came from (its lease is already returned).
pub(super) struct Answered {
    pub(super) instance: String,
    /// Load time this task waited for, if any.
    pub(super) load_time: Option<Duration>,
    /// Answers checked against a contract, the one that kept it included.
    pub(super) answers: u32,
}

/// Exponential backoff with jitter: about 100 ms, 200 ms, 400 ms, … capped at 5 s.
fn backoff(try_number: u32) -> Duration {
    let base = 100u64.saturating_mul(1 << try_number.min(6)).min(5000);
    Duration::from_millis(base / 2 + fastrand::u64(..=base / 2))
}

/// Runs `work` until it ends, the task is cancelled, or its deadline passes. `work` comes
/// pinned by its owner: a future taken by value would be held twice in this one's state, once
/// as the argument and once moved into the `select!`.
async fn bounded<T>(
    stopping: &CancellationToken,
    cancel: &CancellationToken,
    deadline: Instant,
    submitted: Instant,
    work: Pin<&mut impl Future<Output = Result<T, TaskError>>>,
) -> Result<T, TaskError> {
    tokio::select! {
        biased;
                        _ = cancel.cancelled() => Err(if stopping.is_cancelled() {
            TaskError::Pool(PoolError::ShuttingDown)
        } else {
            TaskError::Cancelled
        }),
        _ = tokio::time::sleep_until(deadline.into()) => Err(TaskError::DeadlineExceeded(millis(submitted.elapsed()))),
        result = work => result,
    }
}

/// Registers a task, chooses its candidates and runs it to its end, its deadline or its
/// cancellation.
pub(super) async fn run_task(
    ctx: &Context,
    kind: TaskKind,
    model: &str,
    options: &TaskOptions,
    work: Work<'_>,
    sink: &EventSink,
    cancel: CancellationToken,
) -> Result<(Done, Answered, TaskReport), TaskError> {
    let vision = matches!(work, Work::Chat { chat, .. } if !chat.images.is_empty());
    let mut task = Task::start(ctx, kind, model, options, vision, sink, cancel.clone());
    let (deadline, submitted) = (task.deadline, task.submitted);
    let embedding = kind == TaskKind::Embed;
    // Boxed: a waiting task's future stays small, the room for running it is taken when it runs.
    let mut run = Box::pin(async {
        let contract = match &work {
            Work::Chat { contract, .. } => contract.is_some(),
            Work::Forward { request, .. } => request.contract.is_some(),
            Work::Embed(_) => false,
        };
        let candidates = task.candidates(model, embedding, contract).await?;
        task.run(&candidates, &work).await
    });
    let result = bounded(&ctx.stopping, &cancel, deadline, submitted, run.as_mut()).await;
    drop(run);
    ctx.observers.emit(Event::TaskFinished {
        task_id: task.handle.id.clone(),
        outcome: result
            .as_ref()
            .map_or_else(|e| e.to_wire().code.to_string(), |_| "ok".to_owned()),
        total_ms: millis(submitted.elapsed()),
    });
    let (done, answered) = result?;
    Ok((done, answered, task.finish()))
}
