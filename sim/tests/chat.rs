//! `/api/v1/chat` over HTTP: what real LM Studio 0.4.x rejects, stores and crashes on.
// In test helpers a failed unwrap is a failed test, which is what it should be.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use lmstudio_sim::{Fault, Route, SimConfig, SimFormat, Times};
use serde_json::json;
use support::{eventually, post, sim, sse_events, stream, GRANITE, QWEN};

#[tokio::test]
async fn a_continuation_with_a_system_prompt_fails_with_500() {
    let sim = sim(SimConfig::zero_delay()).await;
    let first = json!({"model": GRANITE, "input": "hi", "system_prompt": "Be brief."});
    let (status, reply) = post(&sim, "/api/v1/chat", first).await;
    assert_eq!(status, 200);
    let id = reply["response_id"].as_str().unwrap();
    let next = json!({"model": GRANITE, "input": "more", "system_prompt": "Be brief.", "previous_response_id": id});
    let (status, body) = post(&sim, "/api/v1/chat", next).await;
    assert_eq!(status, 500);
    assert_eq!(
        body,
        json!({"error": {"type": "unknown", "message": "Only user, assistant and tool roles are supported, got system"}})
    );
    let next = json!({"model": GRANITE, "input": "more", "previous_response_id": id});
    assert_eq!(post(&sim, "/api/v1/chat", next).await.0, 200);
}

#[tokio::test]
async fn temperature_must_be_between_0_and_1() {
    let sim = sim(SimConfig::zero_delay()).await;
    for temperature in [1.5, -0.1] {
        let body = json!({"model": GRANITE, "input": "hi", "temperature": temperature});
        let (status, body) = post(&sim, "/api/v1/chat", body).await;
        assert_eq!(status, 400);
        assert_eq!(
            body,
            json!({"error": {"type": "invalid_request", "message": "'temperature' must be a number between 0 and 1", "param": "temperature"}})
        );
    }
    assert!(
        sim.loaded_instances().is_empty(),
        "rejected before any JIT load"
    );
    let body = json!({"model": GRANITE, "input": "hi", "temperature": 1.0});
    assert_eq!(post(&sim, "/api/v1/chat", body).await.0, 200);
}

#[tokio::test]
async fn input_items_are_text_or_image_only() {
    let sim = sim(SimConfig::zero_delay()).await;
    let chat = |input| json!({"model": GRANITE, "input": input});
    let (status, body) = post(
        &sim,
        "/api/v1/chat",
        chat(json!([{"type": "message", "content": "hi"}])),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(
        body,
        json!({"error": {"message": "Invalid discriminator value. Expected 'text' | 'image'", "type": "invalid_request", "code": "invalid_union", "param": "input"}})
    );
    let (status, body) = post(
        &sim,
        "/api/v1/chat",
        chat(json!([{"type": "text", "text": "hi"}])),
    )
    .await;
    assert_eq!(
        (status, &body["error"]["message"]),
        (400, &json!("'input.0.content' is required"))
    );
    let (status, body) = post(&sim, "/api/v1/chat", chat(json!([{"type": "image"}]))).await;
    assert_eq!(
        (status, &body["error"]["message"]),
        (400, &json!("'input.0.data_url' is required"))
    );
    let good = json!([{"type": "text", "content": "look"}, {"type": "image", "data_url": "data:image/png;base64,AA"}]);
    assert_eq!(post(&sim, "/api/v1/chat", chat(good)).await.0, 200);
}

#[tokio::test]
async fn a_prompt_over_the_loaded_context_is_refused_with_the_real_numbers() {
    let sim = sim(SimConfig::zero_delay()).await;
    let load = json!({"model": GRANITE, "context_length": 64});
    assert_eq!(post(&sim, "/api/v1/models/load", load).await.0, 200);
    // 50 words of input + 6 of system prompt + 4 = 60 tokens: fits.
    let words = vec!["word"; 50].join(" ");
    let first =
        json!({"model": GRANITE, "input": words, "system_prompt": "You are a terse helpful bot."});
    let (status, reply) = post(&sim, "/api/v1/chat", first).await;
    assert_eq!(status, 200, "{reply}");
    let context = reply["stats"]["input_tokens"].as_u64().unwrap()
        + reply["stats"]["total_output_tokens"].as_u64().unwrap();
    // The next turn carries the previous one's context: 2 + 4 + context.
    let next = json!({"model": GRANITE, "input": "and then", "previous_response_id": reply["response_id"]});
    let (status, body) = post(&sim, "/api/v1/chat", next).await;
    assert_eq!(status, 400);
    let n = 2 + 4 + context;
    assert_eq!(
        body,
        json!({"error": {"type": "exceed_context_size_error", "message": format!("Trying to keep the first {n} tokens when context the overflows. However, the model is loaded with context length of only 64 tokens, which is not enough. Try to load the model with a larger context length, or provide a shorter input")}})
    );
}

#[tokio::test]
async fn stored_responses_are_counted_and_store_false_keeps_none() {
    let sim = sim(SimConfig::zero_delay()).await;
    post(
        &sim,
        "/api/v1/chat",
        json!({"model": GRANITE, "input": "a"}),
    )
    .await;
    post(
        &sim,
        "/api/v1/chat",
        json!({"model": GRANITE, "input": "b", "store": true}),
    )
    .await;
    post(
        &sim,
        "/api/v1/chat",
        json!({"model": GRANITE, "input": "c", "store": false}),
    )
    .await;
    assert_eq!(sim.stats().stored_responses, 2);
    assert_eq!(sim.stored_responses(), 2);
}

#[tokio::test]
async fn an_injected_crash_removes_the_instance_the_chat_names() {
    let sim = sim(SimConfig::zero_delay()).await;
    post(&sim, "/api/v1/models/load", json!({ "model": QWEN })).await;
    post(&sim, "/api/v1/models/load", json!({ "model": QWEN })).await;
    sim.inject(Route::Chat, Fault::Crash, Times::Once);
    let (status, body) = post(
        &sim,
        "/api/v1/chat",
        json!({"model": "qwen/qwen3-4b:2", "input": "hi"}),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(
        body,
        json!({"error": {"type": "model_not_loaded", "message": "The model has crashed without additional information. (Exit code: null)"}})
    );
    assert_eq!(sim.loaded_instances(), [QWEN]);
    assert_eq!(sim.stats().crashes, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_concurrent_chat_crashes_an_mlx_instance_and_both_fail() {
    let mut config = SimConfig::zero_delay();
    config.token_delay = Duration::from_millis(20);
    let mut mlx = config.catalogue[0].clone();
    mlx.key = "mlx-community/granite-mlx".into();
    mlx.format = SimFormat::Mlx;
    config.catalogue.push(mlx);
    let sim = sim(config).await;
    let key = "mlx-community/granite-mlx";
    post(&sim, "/api/v1/models/load", json!({ "model": key })).await;
    let first = post(&sim, "/api/v1/chat", json!({"model": key, "input": "one"}));
    let second = async {
        eventually("the first chat to generate", || sim.stats().chats == 1).await;
        stream(&sim, json!({"model": key, "input": "two", "stream": true})).await
    };
    let ((status, body), text) = tokio::join!(first, second);
    let crashed = json!({"type": "model_not_loaded", "message": "The model has crashed without additional information. (Exit code: null)"});
    assert_eq!((status, &body["error"]), (400, &crashed));
    let names: Vec<String> = sse_events(&text).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["chat.start", "error", "chat.end"]);
    assert_eq!(sse_events(&text)[1].1["error"], crashed);
    assert!(sim.loaded_instances().is_empty());
    assert_eq!(sim.stats().crashes, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gguf_instances_take_concurrent_chats() {
    let mut config = SimConfig::zero_delay();
    config.token_delay = Duration::from_millis(5);
    let sim = sim(config).await;
    post(&sim, "/api/v1/models/load", json!({ "model": GRANITE })).await;
    let chats = (0..4).map(|n| {
        post(
            &sim,
            "/api/v1/chat",
            json!({"model": GRANITE, "input": format!("{n}")}),
        )
    });
    let replies = futures_util::future::join_all(chats).await;
    assert!(replies.iter().all(|(status, _)| *status == 200));
    assert!(sim.stats().max_in_flight > 1);
    assert_eq!(sim.stats().crashes, 0);
}
