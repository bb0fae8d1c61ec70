//! Privileged CPU instructions the kernel uses, each wrapped once.

use core::arch::asm;

/// Loads CR3 (switches address space; flushes non-global TLB entries).
///
/// # Safety
/// `root` must be a PML4 that maps the running code, its stack and every
/// static the kernel touches next, with the kernel's permissions.
#[inline(always)]
pub unsafe fn write_cr3(root: u64) {
    // SAFETY: the caller guarantees the new tables map what runs next.
    unsafe { asm!("mov cr3, {}", in(reg) root, options(nostack, preserves_flags)) };
}

/// Reads CR2, the linear address of the last page fault.
#[inline(always)]
pub fn read_cr2() -> u64 {
    let v: u64;
    // SAFETY: reading CR2 has no side effects.
    unsafe { asm!("mov {}, cr2", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// `cpuid` leaf `leaf`, subleaf 0: (eax, ebx, ecx, edx).
#[inline(always)]
pub fn cpuid(leaf: u32) -> (u32, u32, u32, u32) {
    let r = core::arch::x86_64::__cpuid_count(leaf, 0);
    (r.eax, r.ebx, r.ecx, r.edx)
}

/// Whether the CPU supports 1 GiB pages: CPUID 8000_0001h EDX bit 26
/// (SDM Vol. 3A §4.1.4, "Page1GB").
pub fn has_1g_pages() -> bool {
    let (max_ext, ..) = cpuid(0x8000_0000);
    max_ext >= 0x8000_0001 && cpuid(0x8000_0001).3 & (1 << 26) != 0
}

/// Writes a model-specific register.
///
/// # Safety
/// `msr` must exist and `value` be valid for it; the effect must keep the
/// kernel's invariants (e.g. EFER must keep LME/LMA/NXE).
#[inline(always)]
pub unsafe fn wrmsr(msr: u32, value: u64) {
    // SAFETY: the caller vouches for the MSR and value.
    unsafe { asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32, options(nostack, preserves_flags)) };
}

/// Reads a model-specific register.
///
/// # Safety
/// `msr` must exist.
#[inline(always)]
pub unsafe fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: the caller vouches for the MSR.
    unsafe { asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Halts forever with interrupts off.
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: cli; hlt only stops this vCPU; with IF=0 the VMM sees a
        // HLT exit and decides what happens next.
        unsafe { asm!("cli; hlt", options(nomem, nostack)) };
    }
}
