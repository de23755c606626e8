//! Images for vision models: `lmsd-ctl chat --image` sends them as LM Studio's image input items,
//! `auto` picks a model that sees them, and what is not an image is refused before queueing.

use lmstudio_sim::SimConfig;
use serde_json::json;

use crate::support::*;

const QWEN_VL: &str = "qwen/qwen3-vl-4b";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_goes_to_a_vision_model_as_an_image() {
    let sim = start_sim(SimConfig::zero_delay()).await;
    let daemon = TestDaemon::start(&sim.url()).await;
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("dot.png");
    std::fs::write(&image, [0x89, b'P', b'N', b'G']).unwrap();

    let seen = daemon
        .ctl_json(&[
            "chat",
            "auto",
            "Describe it",
            "--image",
            image.to_str().unwrap(),
        ])
        .await;
    assert_eq!(
        seen["model"], QWEN_VL,
        "auto chose a model that sees: {seen}"
    );
    // The simulator counts 256 tokens per image item, as a small vision model's encoder does.
    let tokens = seen["usage"]["input_tokens"].as_u64().unwrap();
    assert!(
        tokens > 256,
        "the image reached the engine as an image: {seen}"
    );

    let named = dir.path().join("notes.txt");
    std::fs::write(&named, "text").unwrap();
    let refused = daemon
        .ctl(&["chat", "auto", "x", "--image", named.to_str().unwrap()])
        .await;
    assert_eq!(refused.code, 2, "{}", refused.stderr);

    let not_data = daemon
        .raw(
            chat_line(
                "i1",
                QWEN_VL,
                json!({"images": ["https://example.com/a.png"]}),
            )
            .as_bytes(),
            1,
        )
        .await;
    assert_eq!(not_data[0]["error"]["code"], "bad_request", "{not_data:?}");
    assert_eq!(
        sim.stats().chat_requests,
        1,
        "nothing sent for the refused ones"
    );
}
