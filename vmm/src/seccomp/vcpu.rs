//! The vCPU threads' list: `KVM_RUN` and what handling its exits takes
//! (`machine::vcpu_loop`): the devices (UART output, the balloon's
//! notifications, the swap device), guest reports and the observers that
//! act on them (dirty-log rounds, translations at Ready), and parking.

use super::Allow::{self, Arg, Call};
use super::ioctls::*;

/// ioctls a vCPU thread makes, by request number.
const IOCTLS: &[u64] = &[
    // The run loop.
    KVM_RUN,
    // Starting an application processor (`machine::smp`): the starter
    // reads its own sregs, the AP sets its entry state.
    KVM_GET_SREGS,
    KVM_SET_SREGS,
    KVM_SET_REGS,
    KVM_SET_MP_STATE,
    // Register dumps of a guest that died (triple fault, hlt, emulation
    // failure), and the observers' page walks (CR3).
    KVM_GET_REGS,
    // Finishing an instruction KVM's PVM emulator refuses at ring 0
    // (`unemulated`): `fwait` reads the x87 state, `int3` raises its #BP
    // through the vCPU events. Linux meets both early (int3_selftest).
    KVM_GET_FPU,
    KVM_GET_VCPU_EVENTS,
    KVM_SET_VCPU_EVENTS,
    // A full dirty ring (`KVM_EXIT_DIRTY_RING_FULL`), and the dirty
    // workload's per-round harvest and its logging switches (`observers`):
    // every mechanism.
    KVM_RESET_DIRTY_RINGS,
    KVM_GET_DIRTY_LOG,
    KVM_CLEAR_DIRTY_LOG,
    KVM_SET_USER_MEMORY_REGION,
    // The translation observers (`observers::translation`): at Ready
    // (`--translate`) KVM's own walk to compare with and the CPU's
    // features; the translation workload's probe reads KVM's binary
    // statistics at each of its events (`kvm_stats::collect`).
    KVM_TRANSLATE,
    KVM_GET_CPUID2,
    KVM_GET_STATS_FD,
    KVM_CHECK_EXTENSION,
];

/// The calls, beyond [`super::common`]'s.
#[must_use]
pub fn allowed() -> Vec<Allow> {
    vec![
        Arg(libc::SYS_ioctl, 1, IOCTLS),
        // Kicking another vCPU out of KVM_RUN (an AP start, a shutdown):
        // pthread_kill is tgkill (common) of getpid (common).
        //
        // The translation observers run on the vCPU thread (the guest
        // stopped in its report): `--translate` reads host frames and page
        // kinds from /proc/self/pagemap, /proc/kpageflags and
        // /proc/self/smaps, the probe reads its statistics descriptors.
        // Opening is allowed read-only only (O_RDONLY | O_CLOEXEC, what
        // std's File::open passes): no file can be created or written.
        // Moving these observers to a VMM thread would take all of this
        // off the vCPU list.
        Arg(libc::SYS_openat, 2, &[(libc::O_RDONLY | libc::O_CLOEXEC) as u64]),
        Call(libc::SYS_read),
        Call(libc::SYS_pread64),
        Call(libc::SYS_statx),
        Call(libc::SYS_close),
        // std's debug builds check a descriptor they adopt (F_GETFD).
        Arg(libc::SYS_fcntl, 1, &[libc::F_GETFD as u64]),
    ]
}
