//! A migration stream as a destination reads it, from a hostile or broken
//! source: the preamble, then frames (CRC-checked) whose pages and zero
//! markers land in a small guest RAM; nothing may be written outside it.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use memvisor::config::{Backing, VmConfig};
use memvisor::memory::GuestRam;
use memvisor::migration::pages::{PageSink, RamMap};
use memvisor::migration::stream::{self, Kind, PREAMBLE_BYTES};

fn ram() -> &'static GuestRam {
    static RAM: OnceLock<GuestRam> = OnceLock::new();
    RAM.get_or_init(|| GuestRam::new(&VmConfig { mem_size: 4 << 20, backing: Backing::Anon, ..VmConfig::default() }).expect("4 MiB of guest RAM"))
}

fuzz_target!(|data: &[u8]| {
    let Some((pre, rest)) = data.split_first_chunk::<PREAMBLE_BYTES>() else { return };
    // Half the inputs get a valid preamble, so the frames are reached.
    let pre = if pre[0] & 1 == 0 { stream::preamble() } else { *pre };
    if stream::check_preamble(&pre).is_err() {
        return;
    }
    let mut sink = PageSink::new(RamMap::of(ram()));
    let mut reader = rest;
    let mut buf = Vec::new();
    for _ in 0..64 {
        let Ok(kind) = stream::read_frame(&mut reader, &mut buf) else { return };
        let _ = match kind {
            Kind::Pages => sink.pages(&buf).map(|_| ()),
            Kind::Zeros => sink.zeros(&buf).map(|_| ()),
            Kind::PostcopyPending => stream::runs(kind, &buf).map(|_| ()).map_err(Into::into),
            Kind::RoundEnd => stream::u64_payload(kind, &buf).map(|_| ()).map_err(Into::into),
            Kind::State => stream::json::<memvisor::snapshot::SavedState>(kind, &buf).map(|_| ()).map_err(Into::into),
            _ => Ok(()),
        };
    }
});
