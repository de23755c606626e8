//! Property tests: whatever bytes a client sends, the decoder and parser answer or close cleanly
//! and never panic; every reply lmsd can send reads back as itself.

use lmsd_proto::codec::{encode_line, Frame, LineReader};
use lmsd_proto::{
    parse_request, CancelOutcome, ChatOutcome, ContentSource, ContractKind, ContractReport,
    ErrorCode, Event, Outcome, Reply, TaskReport, Usage, WireError,
};
use proptest::prelude::*;

fn frames(bytes: &[u8], max_line: usize) -> Vec<Frame> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let mut reader =
            LineReader::with_max_line(tokio::io::BufReader::with_capacity(7, bytes), max_line);
        let mut out = Vec::new();
        while let Some(frame) = reader
            .next_frame()
            .await
            .expect("reading a byte slice cannot fail")
        {
            out.push(frame);
        }
        out
    })
}

/// Bytes that look a little like requests: JSON fragments, newlines, invalid UTF-8.
fn hostile_bytes() -> impl Strategy<Value = Vec<u8>> {
    let pieces = prop_oneof![
        any::<u8>().prop_map(|b| vec![b]),
        Just(b"\n".to_vec()),
        Just(b"{\"v\":1,\"id\":\"x\",\"type\":\"chat\"".to_vec()),
        Just(b"{\"v\":1,\"id\":\"s\",\"type\":\"status\"}".to_vec()),
        Just(b"\"model\":\"m\",\"input\":\"".to_vec()),
        Just(vec![0xff, 0xfe, 0x80]),
        Just(b"}]\":,".to_vec()),
    ];
    prop::collection::vec(pieces, 0..64).prop_map(|parts| parts.concat())
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![any::<String>(), "[ -~]{0,40}".prop_map(String::from)]
}

fn code() -> impl Strategy<Value = ErrorCode> {
    prop::sample::select(ErrorCode::KNOWN.to_vec())
}

fn reply() -> impl Strategy<Value = Reply> {
    let id = prop::option::of(text());
    let chat = (
        text(),
        text(),
        prop::option::of(text()),
        0u64..1 << 40,
        0u64..1 << 40,
        text(),
    )
        .prop_map(|(content, instance, response_id, tokens, ms, task_id)| {
            Outcome::Chat(ChatOutcome {
                json: Some(serde_json::json!({ "label": content.clone() })),
                content,
                content_source: ContentSource::Message,
                model_instance_id: instance,
                response_id,
                usage: Usage {
                    input_tokens: tokens,
                    total_output_tokens: tokens / 2,
                    reasoning_output_tokens: 0,
                    model_load_time_seconds: Some(1.5),
                },
                contract: Some(ContractReport {
                    kind: ContractKind::Schema,
                    passed: true,
                    attempts: 2,
                }),
                task: TaskReport {
                    task_id,
                    total_ms: ms,
                    attempts: 1,
                    ..TaskReport::default()
                },
            })
        });
    let cancel = (text(), any::<bool>())
        .prop_map(|(task_id, cancelled)| Outcome::Cancel(CancelOutcome { task_id, cancelled }));
    let body = prop_oneof![
        chat.prop_map(|o| ("result", Some(o), None, None)),
        cancel.prop_map(|o| ("result", Some(o), None, None)),
        text().prop_map(|content| ("event", None, Some(Event::Delta { content }), None)),
        (text(), 0u32..10_000).prop_map(|(task_id, position)| (
            "event",
            None,
            Some(Event::Queued { task_id, position }),
            None
        )),
        (code(), text()).prop_map(|(code, message)| (
            "error",
            None,
            None,
            Some(WireError::new(code, message))
        )),
    ];
    (id, body).prop_map(
        |(id, (_, outcome, event, error))| match (outcome, event, error) {
            (Some(outcome), _, _) => Reply::result(id.unwrap_or_default(), outcome),
            (_, Some(event), _) => Reply::event(id.unwrap_or_default(), event),
            (_, _, Some(error)) => Reply::error(id, error),
            _ => Reply::error(None, WireError::bad_request("unreachable")),
        },
    )
}

proptest! {
    #[test]
    fn any_bytes_give_frames_and_answers_never_a_panic(bytes in hostile_bytes(), max_line in 1usize..200) {
        for frame in frames(&bytes, max_line) {
            match frame {
                Frame::TooLong { len } => prop_assert!(len > max_line),
                Frame::Line(line) => {
                    prop_assert!(line.len() <= max_line);
                    if let Err(rejection) = parse_request(&line) {
                        // The error reply for it is a valid line.
                        let encoded = encode_line(&rejection.into_reply());
                        let back: Reply = serde_json::from_slice(&encoded).expect("error replies parse");
                        prop_assert!(back.is_terminal());
                    }
                }
            }
        }
    }

    #[test]
    fn every_reply_round_trips(reply in reply()) {
        let line = encode_line(&reply);
        prop_assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1, "one line, newline last");
        let back: Reply = serde_json::from_slice(&line).expect("replies parse");
        prop_assert_eq!(back, reply);
    }
}
