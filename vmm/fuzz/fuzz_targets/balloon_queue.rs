//! The virtio-mmio balloon driven by a hostile guest: the input is a
//! sequence of operations — writes into guest memory (rings, descriptors,
//! PFN lists) and register writes and reads of the device's MMIO window —
//! against a small guest RAM. Nothing may panic, and the device must touch
//! no host memory outside guest RAM (the sanitizer would see it).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use memvisor::config::{Backing, VmConfig};
use memvisor::devices::virtio::balloon::Balloon;
use memvisor::devices::virtio::mmio::MmioTransport;
use memvisor::memory::GuestRam;
use vm_memory::{Bytes, GuestAddress};

/// 4 MiB of guest RAM, shared by every run (its contents are the fuzzer's).
fn ram() -> &'static GuestRam {
    static RAM: OnceLock<GuestRam> = OnceLock::new();
    RAM.get_or_init(|| GuestRam::new(&VmConfig { mem_size: 4 << 20, backing: Backing::Anon, ..VmConfig::default() }).expect("4 MiB of guest RAM"))
}

const BASE: u64 = 0xd000_0000;

fuzz_target!(|data: &[u8]| {
    let ram = ram();
    let mut t = MmioTransport::new(Balloon::new(ram, 0), BASE, None);
    let mut ops = data;
    while let Some((&op, rest)) = ops.split_first() {
        ops = rest;
        match op % 4 {
            // Write up to 64 bytes into guest RAM at a 22-bit offset.
            0 if ops.len() >= 4 => {
                let at = u64::from(u32::from_le_bytes([ops[0], ops[1], ops[2], 0])) & ((4 << 20) - 1);
                let n = usize::from(ops[3] % 64).min(ops.len() - 4);
                let _ = ram.memory().write_slice(&ops[4..4 + n], GuestAddress(at));
                ops = &ops[4 + n..];
            }
            // A 32-bit register write (offset within the 4 KiB window).
            1 if ops.len() >= 6 => {
                let off = u64::from(u16::from_le_bytes([ops[0], ops[1]]) & 0xfff);
                t.write(BASE + off, &ops[2..6], ram);
                ops = &ops[6..];
            }
            // A register read.
            2 if ops.len() >= 2 => {
                let off = u64::from(u16::from_le_bytes([ops[0], ops[1]]) & 0xfff);
                let mut v = [0u8; 4];
                t.read(BASE + off, &mut v);
                ops = &ops[2..];
            }
            // A new target.
            3 if ops.len() >= 2 => {
                let pages = u64::from(u16::from_le_bytes([ops[0], ops[1]])) % 1024;
                if t.device.set_target(pages * 4096) {
                    t.config_changed();
                }
                ops = &ops[2..];
            }
            _ => break,
        }
    }
});
