//! Renders results for people (tables, plain text) or for scripts (`--json`: the reply object).

use lmsd_proto::{
    ChatOutcome, ContentSource, ContractKind, Event, InstanceState, LoadedBy, ModelList, Outcome,
    SessionList, StatusReport, TaskList, TaskState,
};

pub fn print_outcome(outcome: &Outcome, json: bool, streamed: bool) {
    if json {
        println!("{}", serde_json::to_string(outcome).unwrap_or_default());
        return;
    }
    match outcome {
        Outcome::Status(status) => print_status(status),
        Outcome::Models(list) => print_models(list),
        Outcome::Load(load) if load.already_loaded => {
            println!("{} is already loaded as {}", load.model, load.instance_id)
        }
        Outcome::Load(load) => println!(
            "loaded {} as {} in {:.1}s",
            load.model, load.instance_id, load.load_time_seconds
        ),
        Outcome::Unload(unload) if unload.unloaded.is_empty() => println!("nothing was loaded"),
        Outcome::Unload(unload) => println!("unloaded {}", unload.unloaded.join(", ")),
        Outcome::Chat(chat) => print_chat(chat, streamed),
        Outcome::Pin(pin) if pin.pinned => println!("{} is pinned", pin.model),
        Outcome::Pin(pin) => println!("{} is no longer pinned", pin.model),
        Outcome::Embed(embed) => {
            for vector in &embed.embeddings {
                println!("{}", serde_json::to_string(vector).unwrap_or_default());
            }
        }
        Outcome::Tasks(list) => print_tasks(list),
        Outcome::Cancel(cancel) if cancel.cancelled => println!("cancelled {}", cancel.task_id),
        Outcome::Cancel(cancel) => println!("no task {} is queued or running", cancel.task_id),
        Outcome::Sessions(list) => print_sessions(list),
        Outcome::Metrics(metrics) => print!("{}", metrics.text),
        Outcome::Savings(report) => {
            let period = report.since_s.map_or("all recorded time".to_owned(), |s| {
                format!("the last {}", duration(s))
            });
            println!(
                "{} tasks served locally in {period}: {} tokens in, {} out; saved ${:.2} at ${}/${} per million tokens",
                report.totals.tasks,
                report.totals.input_tokens,
                report.totals.output_tokens,
                report.totals.usd_saved,
                report.input_usd_per_mtok,
                report.output_usd_per_mtok
            );
            if !report.groups.is_empty() {
                let rows: Vec<Vec<String>> = report
                    .groups
                    .iter()
                    .map(|g| {
                        vec![
                            g.key.clone(),
                            g.totals.tasks.to_string(),
                            g.totals.input_tokens.to_string(),
                            g.totals.output_tokens.to_string(),
                            format!("${:.2}", g.totals.usd_saved),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    table(
                        &["GROUP", "TASKS", "TOKENS IN", "TOKENS OUT", "SAVED"],
                        &rows,
                    )
                );
            }
        }
        Outcome::Fitness(report) if report.models.is_empty() => {
            println!(
                "no contract tasks recorded yet (chat with --schema, --choices or --json-object)"
            )
        }
        Outcome::Fitness(report) => {
            let rows: Vec<Vec<String>> = report
                .models
                .iter()
                .map(|row| {
                    vec![
                        row.model.clone(),
                        if row.constrained {
                            row.kind.to_string()
                        } else {
                            format!("{} (unconstrained)", row.kind)
                        },
                        row.tasks.to_string(),
                        row.passed_first.to_string(),
                        row.passed_retry.to_string(),
                        row.failed.to_string(),
                        format!("{:.0}%", row.pass_rate * 100.0),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(
                    &[
                        "MODEL",
                        "CONTRACT",
                        "TASKS",
                        "FIRST TRY",
                        "AFTER RETRY",
                        "FAILED",
                        "PASS RATE"
                    ],
                    &rows,
                )
            );
        }
        Outcome::Batch(job) => println!("{}", crate::batch::describe(job)),
        Outcome::BatchList(list) => {
            for job in &list.jobs {
                println!("{}", crate::batch::describe(job));
            }
        }
        Outcome::BatchResults(results) => println!("{} result lines", results.lines),
        Outcome::BatchDeleted(deleted) => {
            println!("deleted {}: {}", deleted.job_id, deleted.deleted)
        }
        Outcome::Unknown => println!(
            "lmsd answered with a kind of result this lmsd-ctl does not know: update lmsd-ctl"
        ),
        Outcome::Reload(reload) => {
            let from = reload
                .path
                .as_deref()
                .unwrap_or("defaults (no config file)");
            println!("reloaded {from}");
            let list = |items: &[String]| {
                if items.is_empty() {
                    "nothing".to_owned()
                } else {
                    items.join(", ")
                }
            };
            println!("applied: {}", list(&reload.applied));
            if !reload.needs_restart.is_empty() {
                println!("needs a restart to apply: {}", list(&reload.needs_restart));
            }
        }
    }
}

/// `2.5 GB`: sizes as people read them (decimal, as LM Studio shows them).
fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit < UNITS.len() - 1 {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Rows as left-aligned columns under a header.
#[must_use]
pub(crate) fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..header.len())
        .map(|col| {
            rows.iter()
                .map(|row| row[col].chars().count())
                .chain([header[col].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        out.push_str(padded.join("  ").trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

/// One line per event of an `events` subscription.
pub fn print_daemon_event(event: &Event) {
    let line = match event {
        Event::LoadStarted { model } => format!("loading {model}"),
        Event::Loaded {
            model,
            instance_id,
            load_ms,
        } => format!("loaded {model} as {instance_id} in {load_ms} ms"),
        Event::LoadFailed { model, error } => format!("load of {model} failed: {error}"),
        Event::Unloaded {
            instance_id,
            reason,
            ..
        } => format!("unloaded {instance_id} ({reason})"),
        Event::TaskQueued {
            task_id,
            kind,
            model,
        } => format!("task {task_id} queued: {kind:?} on {model}").to_lowercase(),
        Event::TaskStarted {
            task_id,
            instance_id,
        } => format!("task {task_id} running on {instance_id}"),
        Event::TaskFinished {
            task_id,
            outcome,
            total_ms,
        } => format!("task {task_id} finished: {outcome} in {total_ms} ms"),
        Event::Backend { reachable: true } => "the engine is reachable".into(),
        Event::Backend { reachable: false } => "the engine is UNREACHABLE".into(),
        Event::ContextMismatch {
            model,
            instance_id,
            requested,
            loaded,
        } => format!(
            "{instance_id} ({model}) loaded with {loaded} tokens of context, not the {requested} asked for"
        ),
        Event::BatchProgress {
            job_id,
            done,
            failed,
            total,
        } => format!("batch {job_id}: {done}/{total} done, {failed} failed"),
        Event::Load { .. }
        | Event::Reasoning { .. }
        | Event::Delta { .. }
        | Event::Queued { .. }
        | Event::BatchLine { .. }
        // From a newer lmsd: nothing to say about it.
        | Event::Unknown => return,
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    println!(
        "{:02}:{:02}:{:02}  {line}",
        now / 3600 % 24,
        now / 60 % 60,
        now % 60
    );
}

/// `status --watch`: the status, redrawn each second when it changed, until interrupted.
pub async fn watch_status(socket: &std::path::Path, json: bool) -> std::process::ExitCode {
    let mut last = String::new();
    loop {
        let result = match lmsd_proto::Client::connect(socket).await {
            Ok(mut client) => client.call(lmsd_proto::Request::Status, |_| {}).await,
            Err(error) => Err(error),
        };
        let shown = match &result {
            Ok(Outcome::Status(status)) if json => {
                serde_json::to_string(status).unwrap_or_default() + "\n"
            }
            Ok(Outcome::Status(status)) => render_status(status),
            Ok(_) => String::new(),
            Err(error) => {
                eprintln!("lmsd-ctl: {error}");
                return std::process::ExitCode::from(crate::exit_codes::for_error(error));
            }
        };
        // The daemon's uptime changes every second; redraw for anything else.
        let comparable = |text: &str| text.lines().skip(1).collect::<Vec<_>>().join("\n");
        if comparable(&shown) != comparable(&last) {
            if !json {
                print!("\x1b[2J\x1b[H");
            }
            print!("{shown}");
            last = shown;
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

fn print_status(status: &StatusReport) {
    print!("{}", render_status(status));
}

fn render_status(status: &StatusReport) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let backend = &status.backend;
    let state = if backend.reachable {
        "reachable"
    } else {
        "UNREACHABLE"
    };
    let _ = writeln!(
        out,
        "lmsd {} (pid {}, up {}s)",
        status.daemon.version, status.daemon.pid, status.daemon.uptime_s
    );
    let _ = writeln!(out, "{} {} {state}", backend.engine_name(), backend.url);
    if backend.simulated {
        let _ = writeln!(
            out,
            "  SIMULATED backend: replies are fake (lmsd --simulate)"
        );
    }
    if let Some(error) = &backend.last_error {
        let _ = writeln!(out, "  last error: {error}");
    }
    let memory = &status.memory;
    let _ = writeln!(
        out,
        "memory budget {}: {} used, {} free",
        size(memory.budget_bytes),
        size(memory.used_bytes),
        size(memory.free_bytes)
    );
    if status.instances.is_empty() {
        let _ = writeln!(out, "no instances loaded");
    } else {
        let rows: Vec<Vec<String>> = status
            .instances
            .iter()
            .map(|i| {
                let state = match i.state {
                    InstanceState::Loading => "loading",
                    InstanceState::Idle => "idle",
                    InstanceState::Busy => "busy",
                    InstanceState::Unloading => "unloading",
                };
                vec![
                    if i.instance_id.is_empty() {
                        "-".into()
                    } else {
                        i.instance_id.clone()
                    },
                    i.model.clone(),
                    state.into(),
                    format!(
                        "{}/{}",
                        i.in_flight,
                        i.parallel.map_or("-".into(), |p| p.to_string())
                    ),
                    size(i.size_bytes),
                    // The engine may load another context than asked (LM Studio's auto-fit).
                    match i.requested_context_length {
                        Some(asked) => format!("{} (asked {asked})", i.context_length),
                        None => i.context_length.to_string(),
                    },
                    duration(i.idle_s),
                    i.ttl_left_s.map_or_else(|| "-".into(), duration),
                    if i.pinned { "yes".into() } else { "".into() },
                    match i.loaded_by {
                        LoadedBy::Lmsd => "lmsd".into(),
                        LoadedBy::Outside => "outside".into(),
                    },
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "INSTANCE", "MODEL", "STATE", "TASKS", "SIZE", "CONTEXT", "IDLE", "TTL LEFT",
                "PINNED", "BY",
            ],
            &rows,
        ));
    }
    if !status.evictions.is_empty() {
        let _ = writeln!(out, "recent evictions:");
        for eviction in &status.evictions {
            let _ = writeln!(
                out,
                "  {} ago  {} ({})",
                duration(eviction.seconds_ago),
                eviction.instance_id,
                eviction.reason
            );
        }
    }
    out
}

/// `1h05m`, `4m10s`, `42s`.
pub fn duration(seconds: u64) -> String {
    match seconds {
        s if s >= 3600 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        s if s >= 60 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

fn print_models(list: &ModelList) {
    let rows: Vec<Vec<String>> = list
        .models
        .iter()
        .map(|m| {
            let mut caps = Vec::new();
            if m.vision {
                caps.push("vision");
            }
            if m.reasoning {
                caps.push("reasoning");
            }
            if m.tool_use {
                caps.push("tools");
            }
            vec![
                m.key.clone(),
                format!("{:?}", m.kind).to_lowercase(),
                m.params_string.clone().unwrap_or_else(|| "-".into()),
                size(m.size_bytes),
                m.max_context_length.to_string(),
                caps.join(","),
                if m.loaded_instances.is_empty() {
                    "-".into()
                } else {
                    m.loaded_instances.join(",")
                },
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &[
                "KEY",
                "TYPE",
                "PARAMS",
                "SIZE",
                "MAX CTX",
                "CAPABILITIES",
                "LOADED",
            ],
            &rows,
        )
    );
}

fn print_tasks(list: &TaskList) {
    if list.tasks.is_empty() {
        println!("no tasks queued or running");
        return;
    }
    let rows: Vec<Vec<String>> = list
        .tasks
        .iter()
        .map(|t| {
            vec![
                t.task_id.clone(),
                format!("{:?}", t.kind).to_lowercase(),
                t.model.clone(),
                match t.state {
                    TaskState::Queued => "queued".into(),
                    TaskState::Running => "running".into(),
                },
                t.instance_id.clone().unwrap_or_else(|| "-".into()),
                format!("{:?}", t.priority).to_lowercase(),
                duration(t.age_ms / 1000),
                duration(t.deadline_ms / 1000),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &[
                "TASK",
                "KIND",
                "MODEL",
                "STATE",
                "INSTANCE",
                "PRIORITY",
                "AGE",
                "DEADLINE IN",
            ],
            &rows,
        )
    );
}

fn print_sessions(list: &SessionList) {
    if let Some(name) = &list.forgotten {
        println!("forgot session {name}");
    }
    if list.sessions.is_empty() {
        println!("no sessions");
        return;
    }
    let rows: Vec<Vec<String>> = list
        .sessions
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                s.model.clone(),
                s.turns.to_string(),
                duration(s.updated_s_ago),
                s.response_id.clone(),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &["SESSION", "MODEL", "TURNS", "LAST USE", "RESPONSE"],
            &rows,
        )
    );
}

fn print_chat(chat: &ChatOutcome, streamed: bool) {
    let kind = chat.contract.map(|c| c.kind);
    match &chat.json {
        // A contract's answer alone: the label as it is, JSON on one line (no fence, no prose).
        Some(serde_json::Value::String(label)) if kind == Some(ContractKind::Choices) => {
            println!("{label}")
        }
        Some(value) => println!("{value}"),
        None if streamed && chat.content_source == ContentSource::Message => {
            // The text was printed as it came; end its line.
            println!();
        }
        None => println!("{}", chat.content),
    }
    // Only kept replies have one (--store, a session, a continuation): say it beside the
    // answer, not in it.
    if let Some(response_id) = &chat.response_id {
        eprintln!("response_id: {response_id}");
    }
}

#[cfg(test)]
mod tests {
    use super::size;

    #[test]
    fn durations_read_at_a_glance() {
        assert_eq!(super::duration(42), "42s");
        assert_eq!(super::duration(250), "4m10s");
        assert_eq!(super::duration(3900), "1h05m");
    }

    #[test]
    fn sizes_read_like_lm_studio_shows_them() {
        assert_eq!(size(512), "512 B");
        assert_eq!(size(2_500_000_000), "2.5 GB");
        assert_eq!(size(274_290_560), "274.3 MB");
    }
}
