//! The VMM threads' list: the main thread once the VM is built, the
//! control socket's threads and the jobs they run (snapshots with their
//! writer threads, translations, balloon and dirty-log requests), the
//! signal thread, a restore's image check, and live migration (the
//! source's stream from a control-socket thread, the destination's
//! post-copy threads). The broadest list: these threads write snapshots
//! and reports, so they open, write and rename files, and a migration
//! opens one stream socket (Unix, IPv4 or IPv6); they never execute
//! anything.

use super::Allow::{self, Arg, Call};
use super::ioctls::*;

/// ioctls the VMM threads make, by request number.
const IOCTLS: &[u64] = &[
    // Snapshots (`snapshot::capture`): every vCPU's state, the VM's clock
    // and irqchip, dirty logging on and off.
    KVM_GET_REGS,
    KVM_GET_SREGS,
    KVM_GET_FPU,
    KVM_GET_MSRS,
    KVM_GET_LAPIC,
    KVM_GET_MP_STATE,
    KVM_GET_VCPU_EVENTS,
    KVM_GET_DEBUGREGS,
    KVM_GET_XSAVE,
    KVM_GET_XSAVE2,
    KVM_GET_XCRS,
    KVM_GET_CPUID2,
    KVM_GET_TSC_KHZ,
    KVM_GET_CLOCK,
    KVM_GET_IRQCHIP,
    KVM_GET_PIT2,
    KVM_GET_DIRTY_LOG,
    KVM_CLEAR_DIRTY_LOG,
    KVM_RESET_DIRTY_RINGS,
    KVM_SET_USER_MEMORY_REGION,
    KVM_SET_USER_MEMORY_REGION2,
    KVM_CHECK_EXTENSION,
    KVM_GET_MSR_INDEX_LIST,
    // Translations (`vmm translate`).
    KVM_TRANSLATE,
    // The report: KVM's binary statistics of the VM and each vCPU.
    KVM_GET_STATS_FD,
    // Post-copy migration: the destination's userfaultfd
    // (`migration::postcopy`, linux/userfaultfd.h).
    0xC018_AA3F, // UFFDIO_API
    0xC020_AA00, // UFFDIO_REGISTER
    0x8010_AA01, // UFFDIO_UNREGISTER
    0x8010_AA02, // UFFDIO_WAKE
    0xC028_AA03, // UFFDIO_COPY
    0xC020_AA04, // UFFDIO_ZEROPAGE
    // A migration's TCP connect with a timeout: std switches the socket to
    // non-blocking and back with FIONBIO (asm-generic/ioctls.h).
    0x5421,
];

/// Socket domains live migration uses: a Unix socket or TCP over IPv4/6.
const MIGRATION_DOMAINS: &[u64] = &[libc::AF_UNIX as u64, libc::AF_INET as u64, libc::AF_INET6 as u64];

/// The calls, beyond [`super::common`]'s.
#[must_use]
pub fn allowed() -> Vec<Allow> {
    vec![
        Arg(libc::SYS_ioctl, 1, IOCTLS),
        // Files: snapshots (manifests, memory images with O_DIRECT,
        // fsync, atomic renames, removing a failed or interrupted one's
        // temporary directory), `--dirty-report`, /proc for the report.
        Call(libc::SYS_openat),
        Call(libc::SYS_close),
        Call(libc::SYS_read),
        Call(libc::SYS_pread64),
        Call(libc::SYS_pwrite64),
        Call(libc::SYS_lseek),
        Call(libc::SYS_fstat),
        Call(libc::SYS_newfstatat),
        Call(libc::SYS_statx),
        Call(libc::SYS_fcntl),
        Call(libc::SYS_fsync),
        Call(libc::SYS_fdatasync),
        Call(libc::SYS_sync_file_range),
        Call(libc::SYS_ftruncate),
        Call(libc::SYS_fallocate),
        Call(libc::SYS_mkdir),
        Call(libc::SYS_mkdirat),
        Call(libc::SYS_renameat2),
        Call(libc::SYS_rename),
        Call(libc::SYS_unlinkat),
        Call(libc::SYS_unlink),
        Call(libc::SYS_rmdir),
        Call(libc::SYS_getdents64),
        Call(libc::SYS_getcwd),
        // The control socket: accepting, checking the peer, reading and
        // answering (recvfrom/sendto are std's socket read and write).
        Call(libc::SYS_accept4),
        Call(libc::SYS_getsockopt),
        Call(libc::SYS_recvfrom),
        Call(libc::SYS_sendto),
        Call(libc::SYS_shutdown),
        // Live migration (`migration/`): the source connects from a
        // control-socket thread and streams; the destination's post-copy
        // threads read the stream and serve the userfaultfd.
        Arg(libc::SYS_socket, 0, MIGRATION_DOMAINS),
        Call(libc::SYS_connect),
        Call(libc::SYS_setsockopt),
        Call(libc::SYS_getsockname),
        Call(libc::SYS_getpeername),
        Call(libc::SYS_poll),
        Call(libc::SYS_ppoll),
        Call(libc::SYS_userfaultfd),
        // Threads: connection threads, snapshot writer and copy threads
        // (clone3 cannot be restricted by its flags: its argument is a
        // pointer; clone only with CLONE_THREAD, below).
        Call(libc::SYS_clone3),
        Arg(libc::SYS_clone, 0, CLONE_THREAD_FLAGS),
        Call(libc::SYS_set_robust_list),
        Call(libc::SYS_rseq),
        Call(libc::SYS_prctl),
        Call(libc::SYS_sched_getaffinity),
        Call(libc::SYS_sched_setaffinity),
        // Snapshot threads step aside for the vCPUs (`BatchPolicy`).
        Call(libc::SYS_sched_getscheduler),
        Call(libc::SYS_sched_getparam),
        Call(libc::SYS_sched_setscheduler),
        // Waiting: `balloon stats` polls, the signal thread's sigwait.
        Call(libc::SYS_clock_nanosleep),
        Call(libc::SYS_nanosleep),
        Call(libc::SYS_rt_sigtimedwait),
        // Whether a snapshot's temporary directory belongs to a live
        // process (kill(pid, 0)).
        Call(libc::SYS_kill),
        // The report: NUMA placement of guest RAM.
        Call(libc::SYS_move_pages),
        Call(libc::SYS_get_mempolicy),
        Call(libc::SYS_mincore),
    ]
}

/// The flags std's thread creation passes to clone(2) when clone3 is not
/// available (glibc's `create_thread`).
const CLONE_THREAD_FLAGS: &[u64] = &[(libc::CLONE_VM
    | libc::CLONE_FS
    | libc::CLONE_FILES
    | libc::CLONE_SIGHAND
    | libc::CLONE_THREAD
    | libc::CLONE_SYSVSEM
    | libc::CLONE_SETTLS
    | libc::CLONE_PARENT_SETTID
    | libc::CLONE_CHILD_CLEARTID) as u64];
