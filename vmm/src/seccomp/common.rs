//! What every filtered thread may do, whatever its kind: what the Rust
//! runtime and glibc do on any thread. Each entry says who needs it.

use super::Allow::{self, Call};

/// The calls.
#[must_use]
pub fn allowed() -> Vec<Allow> {
    vec![
        // Locks, condition variables, channels, `Once` (std's futex-based
        // sync primitives), and glibc's own locks.
        Call(libc::SYS_futex),
        // The allocator: glibc's malloc grows its arenas with brk (main
        // arena) or mmap + mprotect (thread arenas), serves large blocks
        // with mmap/munmap, grows them with mremap, and trims freed memory
        // with madvise(MADV_DONTNEED).
        Call(libc::SYS_brk),
        Call(libc::SYS_mmap),
        Call(libc::SYS_munmap),
        Call(libc::SYS_mremap),
        Call(libc::SYS_mprotect),
        Call(libc::SYS_madvise),
        // Logging (`log::warn!` to stderr) and the one-line error.
        Call(libc::SYS_write),
        // A thread's end: Rust unregisters and frees its signal stack
        // (sigaltstack), glibc blocks signals, frees the unused stack
        // (madvise, above) and exits; `process::exit` from any thread.
        Call(libc::SYS_sigaltstack),
        Call(libc::SYS_rt_sigprocmask),
        Call(libc::SYS_exit),
        Call(libc::SYS_exit_group),
        // Returning from a signal handler (the vCPU kick, std's stack
        // overflow handler).
        Call(libc::SYS_rt_sigreturn),
        // A panic (`panic = "abort"`): abort(3) raises SIGABRT on the
        // calling thread.
        Call(libc::SYS_getpid),
        Call(libc::SYS_gettid),
        Call(libc::SYS_tgkill),
        // std's `HashMap` keys, seeded once per thread.
        Call(libc::SYS_getrandom),
        // Time when the vDSO cannot answer (clock_gettime falls back to
        // the system call); `Instant` and `SystemTime`.
        Call(libc::SYS_clock_gettime),
        Call(libc::SYS_sched_yield),
    ]
}
