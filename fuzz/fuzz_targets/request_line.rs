//! Fuzzes what a client controls: bytes on the socket, through the line decoder and the request
//! parser, and the error reply lmsd would send back.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use lmsd_proto::codec::{encode_line, Frame, LineReader};
use lmsd_proto::{parse_request, Reply};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| tokio::runtime::Builder::new_current_thread().build().expect("runtime"))
}

fuzz_target!(|data: &[u8]| {
    runtime().block_on(async {
        let mut reader = LineReader::with_max_line(tokio::io::BufReader::with_capacity(16, data), 256);
        while let Ok(Some(frame)) = reader.next_frame().await {
            if let Frame::Line(line) = frame {
                if let Err(rejection) = parse_request(&line) {
                    let encoded = encode_line(&rejection.into_reply());
                    let _: Reply = serde_json::from_slice(&encoded).expect("error replies parse");
                }
            }
        }
    });
});
