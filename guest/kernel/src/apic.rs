//! The local APIC, in xAPIC mode through its MMIO page at
//! [`LAPIC_BASE`]: enabling it, end of interrupt, and sending
//! inter-processor interrupts (SDM Vol. 3A §11.6).
//!
//! xAPIC MMIO rather than x2APIC MSRs: KVM's in-kernel LAPIC starts in
//! xAPIC mode, and on this project's reference host every ring-0 access is
//! emulated either way (an MMIO store and a `wrmsr` both leave the guest);
//! the balloon driver's interrupt code already uses this page. Every CPU
//! sees its own LAPIC at the same address. The page must be mapped
//! uncached in the kernel's tables first ([`crate::paging::map_mmio`]).
//!
//! Destinations are physical APIC ids, which KVM makes equal to the vCPU
//! index the VMM created the vCPU with (and the guest's CPU index).

use memvisor_abi::layout::LAPIC_BASE;

/// LAPIC register offsets (SDM Vol. 3A §11.4.1, Table 11-1).
pub const EOI: u64 = 0xb0;
const SVR: u64 = 0xf0;
const ICR_LOW: u64 = 0x300;
const ICR_HIGH: u64 = 0x310;
const LVT_LINT0: u64 = 0x350;
const LVT_LINT1: u64 = 0x360;
/// SVR bit 8: APIC software enable; LVT bit 16: masked.
const SVR_ENABLE: u32 = 1 << 8;
const LVT_MASKED: u32 = 1 << 16;
/// ICR: level "assert" (bit 14; SDM §11.6.1 wants it set for fixed IPIs),
/// and the destination shorthand "all excluding self" (bits 19:18 = 11).
const ICR_ASSERT: u32 = 1 << 14;
const ICR_ALL_BUT_SELF: u32 = 0b11 << 18;

/// The guest-virtual address of the EOI register (the kernel maps the page
/// at its physical address), for assembly stubs.
pub const EOI_ADDR: u64 = LAPIC_BASE + EOI;

fn write(reg: u64, v: u32) {
    // SAFETY: a LAPIC register in the page the kernel mapped uncached at
    // LAPIC_BASE before any caller runs (crate::smp, the balloon's irq).
    unsafe { ((LAPIC_BASE + reg) as *mut u32).write_volatile(v) };
}

/// Software-enables this CPU's LAPIC with `spurious` as its spurious
/// vector, and masks LINT0/LINT1 (the legacy PIC's ExtINT and NMI lines),
/// so only interrupts the kernel routes arrive. KVM's LAPIC drops fixed
/// interrupts while software-disabled.
pub fn enable(spurious: u8) {
    write(LVT_LINT0, LVT_MASKED);
    write(LVT_LINT1, LVT_MASKED);
    write(SVR, SVR_ENABLE | u32::from(spurious));
}


/// Sends a fixed interrupt `vector` to the CPU with APIC id `cpu`.
pub fn send_ipi(cpu: usize, vector: u8) {
    write(ICR_HIGH, (cpu as u32) << 24);
    // Writing the low word sends it.
    write(ICR_LOW, ICR_ASSERT | u32::from(vector));
}

/// Sends a fixed interrupt `vector` to every other CPU: one ICR write
/// instead of two per target.
pub fn send_ipi_all_but_self(vector: u8) {
    write(ICR_LOW, ICR_ALL_BUT_SELF | ICR_ASSERT | u32::from(vector));
}
