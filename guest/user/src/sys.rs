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

/// Duplicate the calling task copy-on-write (issue 6): returns 0 in the
/// child, 1 in the parent, `u64::MAX` when the kernel cannot.
pub const SYS_FORK: u64 = 2;
/// Let the other task run (the kernel has at most two: a parent and its
/// forked child); returns 0, at once when there is no other task.
pub const SYS_YIELD: u64 = 3;

/// TLB shootdown of one page of the caller's address space (the
/// shootdown workload's ring-3 writer): `rdi` = the page, `rsi` nonzero to
/// flush only the calling CPU. Returns the CPUs interrupted.
pub const SYS_SHOOTDOWN: u64 = 4;

/// Asks the kernel to shoot down `va` ([`SYS_SHOOTDOWN`]), or with
/// `local_only` just to flush it here; the CPUs it interrupted.
#[inline(always)]
pub fn shootdown(va: u64, local_only: bool, syscall_insn: bool) -> u64 {
    let r: u64;
    if syscall_insn {
        // SAFETY: as in `event`.
        unsafe { asm!("syscall", inout("rax") SYS_SHOOTDOWN => r, in("rdi") va, in("rsi") u64::from(local_only), out("rcx") _, out("r11") _, options(nostack)) };
    } else {
        // SAFETY: as in `event`.
        unsafe { asm!("int3", inout("rax") SYS_SHOOTDOWN => r, in("rdi") va, in("rsi") u64::from(local_only), options(nostack)) };
    }
    r
}

/// A system call with no arguments; returns `rax`.
#[inline(always)]
fn call0(number: u64, syscall_insn: bool) -> u64 {
    let r: u64;
    if syscall_insn {
        // SAFETY: as in `event`; the kernel preserves every register but
        // rax (and rcx/r11, which `syscall` clobbers).
        unsafe { asm!("syscall", inout("rax") number => r, out("rcx") _, out("r11") _, options(nostack)) };
    } else {
        // SAFETY: as in `event`.
        unsafe { asm!("int3", inout("rax") number => r, options(nostack)) };
    }
    r
}

/// Forks the calling task ([`SYS_FORK`]).
#[inline(always)]
pub fn fork(syscall_insn: bool) -> u64 {
    call0(SYS_FORK, syscall_insn)
}

/// Yields to the other task ([`SYS_YIELD`]).
#[inline(always)]
pub fn yield_now(syscall_insn: bool) {
    let _ = call0(SYS_YIELD, syscall_insn);
}

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
