//! Starting application processors (APs): the guest asks, the VMM places.
//!
//! The VMM creates every vCPU at boot; with the in-kernel irqchip an AP
//! waits, not running, until started. The guest starts AP `cpu` by writing
//! an [`ApStart`] in its memory and the block's guest-physical address (32
//! bits) to [`crate::ports::AP_START`]. The VMM then puts that AP straight
//! into 64-bit mode at `rip` with `rsp`, `rdi = arg` and the page tables at
//! `cr3`, its other control and segment registers those of the CPU that
//! asked, and lets it run.
//!
//! Why not INIT/SIPI through the local APIC: the AP would start in real
//! mode and need a 16-bit trampoline through protected into long mode, a
//! few hundred instructions that KVM's PVM flavour emulates one by one at
//! ring 0 (host-facts: ~1 µs each), and real mode is the part of the ISA
//! such emulators support least. Placing the AP costs one port write on the
//! starting CPU and nothing on the AP; a Linux guest still uses INIT/SIPI,
//! which KVM's in-kernel LAPIC handles.

use crate::Pod;

/// Most CPUs a memvisor VM has: the guest keeps fixed per-CPU tables (GDT,
/// TSS, stacks) of this many entries, and the VMM refuses more vCPUs.
pub const MAX_CPUS: u32 = 64;

/// Where and how one AP starts.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApStart {
    /// The AP's index (its vCPU id and APIC id), 1 ≤ cpu < vCPUs.
    pub cpu: u32,
    /// Written by the VMM before the `out` completes: [`AP_START_OK`] or
    /// an [`ApStartError`] as `u32`.
    pub status: u32,
    /// 64-bit entry point (canonical, kernel code).
    pub rip: u64,
    /// Initial stack pointer (canonical).
    pub rsp: u64,
    /// Passed in `rdi` (the AP's per-CPU block, say).
    pub arg: u64,
    /// Page-table root (4 KiB-aligned guest-physical address).
    pub cr3: u64,
}
// SAFETY: repr(C), integer fields only, 40 bytes with no padding.
unsafe impl Pod for ApStart {}

/// [`ApStart::status`] of a request the VMM accepted.
pub const AP_START_OK: u32 = 0;

/// Why the VMM refused an [`ApStart`].
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApStartError {
    /// The block is not in guest RAM.
    BadBlock = 1,
    /// No such AP (0 is the boot CPU; the rest must be below the vCPU count).
    NoSuchCpu = 2,
    /// The AP was started already.
    AlreadyStarted = 3,
    /// `rip` or `rsp` is not canonical, or `cr3` not page-aligned.
    BadState = 4,
}

impl ApStart {
    /// Checks the fields that do not depend on the VM.
    ///
    /// # Errors
    /// [`ApStartError::BadState`].
    pub fn check(&self) -> Result<(), ApStartError> {
        let canonical = |a: u64| {
            let top = a >> 47;
            top == 0 || top == 0x1_ffff
        };
        if !canonical(self.rip) || !canonical(self.rsp) || self.cr3 & 0xfff != 0 {
            return Err(ApStartError::BadState);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_canonical_or_misaligned_starts_are_refused() {
        let ok = ApStart { cpu: 1, rip: 0xffff_8000_0010_0000, rsp: 0x20_0000, cr3: 0x1000, ..ApStart::default() };
        assert_eq!(ok.check(), Ok(()));
        assert_eq!(ApStart { rip: 0x0000_8000_0000_0000, ..ok }.check(), Err(ApStartError::BadState));
        assert_eq!(ApStart { rsp: 0x1234_5678_9abc_def0, ..ok }.check(), Err(ApStartError::BadState));
        assert_eq!(ApStart { cr3: 0x1004, ..ok }.check(), Err(ApStartError::BadState));
        assert_eq!(size_of::<ApStart>(), 40);
    }
}
