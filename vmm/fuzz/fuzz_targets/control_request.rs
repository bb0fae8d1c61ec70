//! The control socket's request parser, on any bytes a peer may send.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(line) = std::str::from_utf8(data) {
        if let Ok(request) = memvisor::api::protocol::parse_request(line) {
            // What parses must encode again.
            let text = serde_json::to_string(&request).expect("a parsed request encodes");
            assert_eq!(memvisor::api::protocol::parse_request(&text).ok(), Some(request));
        }
    }
});
