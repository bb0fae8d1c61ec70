//! The ELF checks a kernel image passes before anything is loaded.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // A 256 MiB guest: the kernel must lie in [1 MiB, 256 MiB).
    let _ = memvisor::boot::elf::inspect(data, 0x10_0000, 256 << 20);
});
