//! Output contracts against the simulator: a chat's schema, choices or JSON object kept by the
//! engine's constrained decoding, checked by lmsd, retried, moved to another model, or refused
//! with `output_invalid` — and what is refused before a task queues.

use lmstudio_sim::{Fault, Route, SimConfig, Times};
use serde_json::{json, Value};

use crate::support::*;

const GRANITE: &str = "ibm/granite-4-micro";
const QWEN: &str = "qwen/qwen3-4b";

const PERSON: &str = r#"{"type":"object","properties":{"name":{"type":"string"},"age":{"type":"integer","minimum":18}},"required":["name","age"]}"#;

fn contract(reply: &Value) -> (&str, u64) {
    (
        reply["contract"]["kind"].as_str().unwrap_or_default(),
        reply["contract"]["attempts"].as_u64().unwrap_or_default(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_contract_is_kept_through_the_constrained_endpoint_and_printed_alone() {
    let sim = start_sim(SimConfig::zero_delay()).await;
    let daemon = TestDaemon::start(&sim.url()).await;

    let person = daemon
        .ctl_json(&["chat", GRANITE, "Extract: Ada, 36.", "--schema", PERSON])
        .await;
    assert_eq!(person["json"]["age"], 18, "{person}");
    assert_eq!(contract(&person), ("schema", 1));
    assert_eq!(
        sim.stats().completions,
        1,
        "LM Studio's native chat has no schema"
    );

    // The label the input names; printed alone, without quotes.
    let label = daemon
        .ctl(&[
            "chat",
            GRANITE,
            "Please add a dark mode (feature request)",
            "--choices",
            "bug,feature,question",
        ])
        .await;
    assert_eq!(
        (label.code, label.stdout.as_str()),
        (0, "feature\n"),
        "{}",
        label.stderr
    );

    // The JSON alone on one line, from a schema in a file.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("person.json");
    std::fs::write(&file, PERSON).unwrap();
    let printed = daemon
        .ctl(&[
            "chat",
            GRANITE,
            "Extract: Ada.",
            "--schema",
            file.to_str().unwrap(),
        ])
        .await;
    assert_eq!(printed.code, 0, "{}", printed.stderr);
    let value: Value = serde_json::from_str(printed.stdout.trim()).unwrap();
    assert_eq!(value["name"], "Simulated text");

    let object = daemon
        .ctl_json(&["chat", GRANITE, "Any JSON object", "--json-object"])
        .await;
    assert!(object["json"].is_object(), "{object}");
    assert_eq!(contract(&object), ("json_object", 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_answer_is_retried_once_cold_then_moves_to_the_next_model_then_fails() {
    let sim = start_sim(SimConfig::zero_delay()).await;
    let daemon = TestDaemon::start(&sim.url()).await;
    let person = ["--schema", PERSON];

    // A fence is forgiven without a retry.
    sim.inject(Route::Completions, Fault::Fenced, Times::Once);
    let fenced = daemon
        .ctl_json(&[&["chat", GRANITE, "Ada, 36"][..], &person].concat())
        .await;
    assert_eq!(contract(&fenced), ("schema", 1));
    assert_eq!(fenced["json"]["age"], 18);

    // Prose once: the retry at temperature 0 keeps it.
    sim.inject(Route::Completions, Fault::Prose, Times::Once);
    let prose = daemon
        .ctl_json(&[&["chat", GRANITE, "Ada, 36"][..], &person].concat())
        .await;
    assert_eq!(contract(&prose), ("schema", 2));
    assert_eq!(prose["model"], GRANITE);
    assert_eq!(
        sim.stats().cold_completions,
        1,
        "the retry, and only it, ran cold"
    );

    // Cut off twice on the first model: the next one on the preference list answers.
    sim.inject(Route::Completions, Fault::InvalidJson, Times::N(2));
    let moved = daemon
        .ctl_json(&[&["chat", GRANITE, "Ada, 36", "--prefer", QWEN][..], &person].concat())
        .await;
    assert_eq!(contract(&moved), ("schema", 3));
    assert_eq!(moved["model"], QWEN, "{moved}");

    // A label outside the choices every time: output_invalid, with what was wrong and the
    // answer itself for the client.
    sim.inject(Route::Completions, Fault::OffLabel, Times::Always);
    let failed = daemon
        .ctl(&[
            "--json",
            "chat",
            GRANITE,
            "a crash",
            "--choices",
            "bug,feature",
        ])
        .await;
    assert_eq!(failed.code, 17, "{}", failed.stderr);
    let error: Value = serde_json::from_str(failed.stdout.trim()).unwrap();
    assert_eq!(error["error"]["code"], "output_invalid");
    assert_eq!(
        error["error"]["invalid_output"]["output"],
        r#"{"label":"none of these"}"#
    );
    let problems = error["error"]["invalid_output"]["errors"].to_string();
    assert!(
        problems.contains("not one of the choices (bug, feature)"),
        "{problems}"
    );
    assert!(
        !daemon.logs().contains("none of these"),
        "an answer never reaches the log"
    );

    // A schema's problems quote the answer: they stay in invalid_output, out of the message,
    // and so out of a --log file written without --log-content.
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("calls.jsonl");
    let kinds = r#"{"type":"object","properties":{"kind":{"enum":["a","b"]}},"required":["kind"]}"#;
    let off = daemon
        .ctl(&[
            "chat",
            GRANITE,
            "Ada",
            "--schema",
            kinds,
            "--log",
            log.to_str().unwrap(),
        ])
        .await;
    assert_eq!(off.code, 17, "{}", off.stderr);
    assert!(
        off.stderr.contains("none of these"),
        "the problems, to the user: {}",
        off.stderr
    );
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("output_invalid") && !logged.contains("none of these"),
        "{logged}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contracts_that_cannot_be_kept_are_refused_before_the_task_queues() {
    let sim = start_sim(SimConfig::zero_delay()).await;
    let daemon = TestDaemon::start(&sim.url()).await;
    for (args, says) in [
        (
            vec!["--schema", r#"{"type":"banana"}"#],
            "not a valid JSON Schema",
        ),
        (vec!["--choices", "bug,bug"], "given twice"),
        (
            vec!["--schema", PERSON, "--session", "s"],
            "keeps no conversation",
        ),
        (vec!["--json-object", "--store"], "keeps no conversation"),
    ] {
        let out = daemon
            .ctl(&[&["chat", GRANITE, "hello"][..], &args].concat())
            .await;
        assert_eq!(out.code, 4, "{args:?}: {}", out.stderr);
        assert!(out.stderr.contains(says), "{args:?}: {}", out.stderr);
    }
    let both = daemon
        .raw(
            chat_line("c1", GRANITE, json!({"json_object": true, "stream": true})).as_bytes(),
            1,
        )
        .await;
    assert_eq!(both[0]["error"]["code"], "bad_request", "{both:?}");
    assert!(both[0]["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .contains("cannot stream"));
    assert_eq!(sim.stats().completions + sim.stats().chat_requests, 0);
    assert_eq!(sim.stats().loads, 0, "nothing was loaded for them");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fitness_counts_each_models_contracts_and_sums_across_a_restart() {
    let sim = start_sim(SimConfig::zero_delay()).await;
    let state = tempfile::tempdir().unwrap();
    let env = [("STATE_DIRECTORY", state.path().to_str().unwrap())];
    let labels = ["--choices", "bug,feature"];
    let first = TestDaemon::start_with(&sim.url(), "", &env).await;
    first
        .ctl_json(&[&["chat", GRANITE, "a bug"][..], &labels].concat())
        .await;
    sim.inject(Route::Completions, Fault::OffLabel, Times::Once);
    first
        .ctl_json(&[&["chat", GRANITE, "a bug"][..], &labels].concat())
        .await;
    first.terminate().await;

    let second = TestDaemon::start_with(&sim.url(), "", &env).await;
    // Broken on granite twice, kept by qwen at once: each model counts its own share.
    sim.inject(Route::Completions, Fault::OffLabel, Times::N(2));
    second
        .ctl_json(&[&["chat", GRANITE, "a bug", "--prefer", QWEN][..], &labels].concat())
        .await;
    let fitness = second.ctl_json(&["fitness"]).await;
    let rows = fitness["models"].as_array().unwrap();
    let row = |model: &str| {
        rows.iter()
            .find(|r| r["model"] == model)
            .unwrap_or_else(|| panic!("no row for {model}: {fitness}"))
    };
    let granite = row(GRANITE);
    assert_eq!(granite["kind"], "choices");
    assert_eq!(
        (
            &granite["tasks"],
            &granite["passed_first"],
            &granite["passed_retry"],
            &granite["failed"]
        ),
        (&json!(3), &json!(1), &json!(1), &json!(1)),
        "{granite}"
    );
    assert!((granite["pass_rate"].as_f64().unwrap() - 2.0 / 3.0).abs() < 1e-9);
    assert_eq!(row(QWEN)["passed_first"], 1);
    let table = second.ctl(&["fitness"]).await;
    assert!(
        table.stdout.contains("AFTER RETRY") && table.stdout.contains("67%"),
        "{}",
        table.stdout
    );
    // Savings count the tasks, not their contract records.
    let savings = second.ctl_json(&["savings"]).await;
    assert_eq!(savings["tasks"], 3, "{savings}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eval_compares_models_on_a_labelled_file_with_exact_figures() {
    let sim = start_sim(SimConfig::zero_delay()).await;
    let daemon = TestDaemon::start(&sim.url()).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tickets.jsonl");
    let labels = json!(["bug", "feature", "question"]);
    let lines = [
        json!({"input": "The app crashes when I click save (bug)", "expected": "bug", "choices": labels}),
        json!({"input": "Please add a feature for dark mode", "expected": "feature", "choices": labels}),
        json!({"input": "How do I export? question", "expected": "question", "choices": labels}),
        // The simulator names no label here, so it answers the first: wrong.
        json!({"input": "Nothing matches here", "expected": "question", "choices": labels}),
        json!({"input": "Extract: Ada", "expected": {"name": "Simulated text"},
               "schema": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}}),
    ];
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&file, text).unwrap();
    let path = file.to_str().unwrap();

    let report = daemon
        .ctl_json(&["eval", path, "--models", &format!("{GRANITE},{QWEN}")])
        .await;
    let rows = report["models"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{report}");
    for (row, model) in rows.iter().zip([GRANITE, QWEN]) {
        assert_eq!(row["model"], model);
        assert_eq!(
            (&row["lines"], &row["right"]),
            (&json!(5), &json!(4)),
            "{row}"
        );
        assert_eq!(row["accuracy"], 0.8);
        assert_eq!(row["contract_pass_rate"], 1.0);
        // Prompt words + 4 per line (12 + 11 + 9 + 7 + 6); one word per label, two for the JSON.
        assert_eq!(
            (&row["input_tokens"], &row["output_tokens"]),
            (&json!(45), &json!(6))
        );
        let usd = row["usd_at_paid_prices"].as_f64().unwrap();
        assert!(
            (usd - (45.0 * 3.0 + 6.0 * 15.0) / 1e6).abs() < 1e-12,
            "{usd}"
        );
    }
    let table = daemon.ctl(&["eval", path, "--models", GRANITE]).await;
    assert_eq!(table.code, 0, "{}", table.stderr);
    assert!(
        table.stdout.contains("4/5") && table.stdout.contains("80%"),
        "{}",
        table.stdout
    );
    assert!(
        table.stderr.contains("eval: 5/5 lines"),
        "progress: {}",
        table.stderr
    );

    std::fs::write(
        &file,
        "{\"input\": \"x\", \"expected\": \"a\"}\n{\"input\": \"y\"}\n",
    )
    .unwrap();
    let bad = daemon.ctl(&["eval", path, "--models", GRANITE]).await;
    assert_eq!(bad.code, 2, "{}", bad.stderr);
    assert!(
        bad.stderr.contains("line 2") && bad.stderr.contains("expected"),
        "{}",
        bad.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_only_checks_the_answer_without_constraining_the_engine() {
    let sim = start_sim(SimConfig::zero_delay()).await;
    let daemon = TestDaemon::start(&sim.url()).await;
    // The native chat answers prose, which no schema takes: checked, and refused.
    let out = daemon
        .ctl(&[
            "chat",
            GRANITE,
            "Ada, 36",
            "--schema",
            PERSON,
            "--check-only",
            "--session",
            "s",
        ])
        .await;
    assert_eq!(out.code, 17, "{}", out.stderr);
    assert_eq!(sim.stats().completions, 0, "not constrained");
    assert_eq!(
        sim.stats().chat_requests,
        2,
        "the native chat, with its retry"
    );
    // Apart in fitness, as the bare model's record.
    let fitness = daemon.ctl_json(&["fitness"]).await;
    assert_eq!(fitness["models"][0]["constrained"], false, "{fitness}");
    assert_eq!(fitness["models"][0]["failed"], 1, "{fitness}");
    let alone = daemon.ctl(&["chat", GRANITE, "hi", "--check-only"]).await;
    assert_eq!(alone.code, 4, "{}", alone.stderr);
    assert!(
        alone.stderr.contains("needs a contract"),
        "{}",
        alone.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_tries_a_model_below_min_pass_rate_last() {
    let sim = start_sim(SimConfig::zero_delay()).await;
    let daemon = TestDaemon::start_with(&sim.url(), "[routing]\nmin_pass_rate = 0.8\n", &[]).await;
    daemon.ctl_json(&["load", GRANITE]).await;
    daemon.ctl_json(&["load", QWEN]).await;
    let labels = ["chat", "auto", "a bug", "--choices", "bug,feature"];
    // Five tasks that granite, chosen first, fails twice each and qwen then keeps.
    for _ in 0..5 {
        sim.inject(Route::Completions, Fault::OffLabel, Times::N(2));
        let kept = daemon.ctl_json(&labels).await;
        assert_eq!(kept["model"], QWEN, "{kept}");
    }
    // Judged now (five results, none kept): granite goes last though it would answer well.
    let next = daemon.ctl_json(&labels).await;
    assert_eq!(next["model"], QWEN, "{next}");
    assert_eq!(next["contract"]["attempts"], 1, "{next}");
}
