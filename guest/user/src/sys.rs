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
/// Report a workload event to the VMM: `rdi` = event
/// (`memvisor_abi::workload::Event`), `rsi`, `rdx` = its values. Returns 0.
pub const SYS_EVENT: u64 = 1;

/// Reports a workload event and returns when the VMM has seen it.
#[inline(always)]
pub fn event(event: u64, a: u64, b: u64, syscall_insn: bool) {
    if syscall_insn {
        // SAFETY: the kernel returns with sysret-compatible state; `syscall`
        // clobbers rcx and r11.
        unsafe {
            asm!("syscall", inout("rax") SYS_EVENT => _, in("rdi") event, in("rsi") a, in("rdx") b, out("rcx") _, out("r11") _, options(nostack));
        }
    } else {
        // SAFETY: the kernel's DPL-3 breakpoint gate returns after the
        // `int3` with every register but rax preserved.
        unsafe {
            asm!("int3", inout("rax") SYS_EVENT => _, in("rdi") event, in("rsi") a, in("rdx") b, options(nostack));
        }
    }
}

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
