//! System calls: numbers and the user side of the two entry mechanisms.
//!
//! The number goes in `rax`, arguments in `rdi`, `rsi`. The kernel is
//! entered with `int3` through a DPL-3 gate (works everywhere, and is the
//! only ring 3 → 0 path on KVM's PVM flavour, where `syscall` and `int n`
//! fail from ring 3), or with `syscall` when the boot configuration says
//! the host supports it.

use core::arch::asm;

/// End the task; `rdi` is its status.
pub const SYS_EXIT: u64 = 0;

/// Ends the calling task with `status`.
#[inline(always)]
pub fn exit(status: u64, syscall_insn: bool) -> ! {
    if syscall_insn {
        // SAFETY: a system call that never returns; rcx/r11 are clobbered by
        // `syscall` but nothing runs after it.
        unsafe { asm!("syscall", in("rax") SYS_EXIT, in("rdi") status, options(noreturn, nostack)) }
    } else {
        // SAFETY: as above, through the kernel's DPL-3 breakpoint gate.
        unsafe { asm!("int3", in("rax") SYS_EXIT, in("rdi") status, options(noreturn, nostack)) }
    }
}
