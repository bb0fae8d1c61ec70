//! How a kernel image is told apart (PVH ELF, bzImage, plain vmlinux), a
//! bzImage's setup header checked, and its compressed payload found and
//! decompressed (under a small cap, so a bomb costs the fuzzer nothing),
//! before anything is loaded.
#![no_main]

use libfuzzer_sys::fuzz_target;

/// The decompression cap here: 1 MiB (the VMM's is 256 MiB or guest RAM).
const CAP: u64 = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let _ = memvisor::boot::format::detect(data);
    if memvisor::boot::bzimage::has_setup_header(data)
        && let Ok(info) = memvisor::boot::bzimage::parse(data)
        && let Ok(payload) = memvisor::boot::decompress::payload(data, &info)
    {
        let _ = memvisor::boot::decompress::decompress(&payload, CAP);
    }
    let _ = memvisor::boot::elf::pvh_entry(data);
});
