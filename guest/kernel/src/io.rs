//! Port I/O: the only way the kernel talks to the VMM's devices.

use core::arch::asm;

/// Writes a byte to an I/O port.
#[inline(always)]
pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O has no memory effects; the ports we use are the
    // VMM's emulated devices (abi::ports).
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags)) };
}

/// Writes a 32-bit value to an I/O port.
#[inline(always)]
pub fn outl(port: u16, value: u32) {
    // SAFETY: as for `outb`. Not `nomem`: the VMM reads guest memory the
    // value points to (a message), so earlier stores must be complete.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") value, options(nostack, preserves_flags)) };
}

/// Reads the time-stamp counter (not trapped on KVM; host and guest agree).
#[inline(always)]
pub fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: rdtsc only reads the TSC.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) };
    (u64::from(hi) << 32) | u64::from(lo)
}
