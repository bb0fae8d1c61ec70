//! A snapshot's manifest.json and chunks.bin as a restore reads them. The
//! input is the manifest, a NUL byte, then the chunk table.
#![no_main]

use libfuzzer_sys::fuzz_target;
use memvisor::snapshot::format::{Manifest, decode_chunks};

fuzz_target!(|data: &[u8]| {
    let (json, chunks) = match data.iter().position(|b| *b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    if let Ok(mut m) = serde_json::from_slice::<Manifest>(json) {
        let _ = m.checksum();
        if m.validate_header().is_ok() {
            if let Ok(c) = decode_chunks(chunks, m.chunk_count) {
                m.chunks = c;
                let _ = m.validate_chunks();
                let _ = m.check_parent(&m.clone());
            }
        }
    }
});
