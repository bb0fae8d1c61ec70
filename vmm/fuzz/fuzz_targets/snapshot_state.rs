//! A snapshot's state.json (vCPU, irqchip and device state) as a restore
//! parses it.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<memvisor::snapshot::SavedState>(data);
});
