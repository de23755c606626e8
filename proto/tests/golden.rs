//! Golden lines of protocol version 1 (`fixtures/v1.ndjson`): each request and reply parses
//! with the real types and serializes back to the same JSON, so no field of the wire format can
//! be renamed, dropped or retyped without this test saying so. New optional fields keep it
//! passing; change a line here only with a protocol change.
// A failed unwrap in a test is a failed test.
#![allow(clippy::unwrap_used)]

use lmsd_proto::{parse_request, Reply};
use serde_json::Value;

const GOLDEN: &str = include_str!("fixtures/v1.ndjson");

#[test]
fn every_golden_line_round_trips_unchanged() {
    let mut count = 0;
    for line in GOLDEN.lines().filter(|l| !l.trim().is_empty()) {
        count += 1;
        let original: Value = serde_json::from_str(line).unwrap();
        let again = if original.get("v").is_some() {
            let envelope =
                parse_request(line.as_bytes()).unwrap_or_else(|e| panic!("{:?}: {line}", e.error));
            serde_json::to_value(&envelope).unwrap()
        } else {
            let reply: Reply = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
            serde_json::to_value(&reply).unwrap()
        };
        assert_eq!(again, original, "changed on the way through: {line}");
    }
    assert!(count >= 40, "{count} lines");
}
