//! Every JSON line of `PROTOCOL.md` parses with the real types: a request line (one with `"v"`)
//! as a request, anything else as a reply. The document cannot drift from the code unseen.
// A failed unwrap in a test is a failed test.
#![allow(clippy::unwrap_used)]

use lmsd_proto::{parse_request, Reply, ReplyBody};

const DOC: &str = include_str!("../PROTOCOL.md");

/// The lines of the document's ```json blocks.
fn json_lines() -> Vec<&'static str> {
    let mut lines = Vec::new();
    let mut in_json = false;
    for line in DOC.lines() {
        match line.trim() {
            "```json" => in_json = true,
            "```" => in_json = false,
            text if in_json && !text.is_empty() => lines.push(text),
            _ => {}
        }
    }
    lines
}

#[test]
fn every_json_line_of_the_protocol_document_parses() {
    let lines = json_lines();
    assert!(lines.len() >= 10, "found only {} lines", lines.len());
    for line in lines {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        if value.get("v").is_some() {
            parse_request(line.as_bytes())
                .unwrap_or_else(|e| panic!("request does not parse ({:?}): {line}", e.error));
        } else {
            let reply: Reply = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("reply does not parse ({e}): {line}"));
            // Documented lines use documented kinds and events, not the fallbacks.
            let unknown = match &reply.body {
                ReplyBody::Result(outcome) => matches!(**outcome, lmsd_proto::Outcome::Unknown),
                ReplyBody::Event(event) => matches!(event, lmsd_proto::Event::Unknown),
                ReplyBody::Error { error } => error.code == lmsd_proto::ErrorCode::Unknown,
            };
            assert!(!unknown, "read as unknown: {line}");
        }
    }
}
