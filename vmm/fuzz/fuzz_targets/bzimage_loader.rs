//! How a kernel image is told apart (PVH ELF, bzImage, plain vmlinux) and
//! a bzImage's setup header checked, before anything is loaded.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = memvisor::boot::format::detect(data);
    if memvisor::boot::bzimage::has_setup_header(data) {
        let _ = memvisor::boot::bzimage::parse(data);
    }
    let _ = memvisor::boot::elf::pvh_entry(data);
});
