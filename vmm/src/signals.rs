//! SIGTERM and SIGINT end a running VM cleanly.
//!
//! `vmm run` and `vmm restore` block both signals in every thread
//! ([`block_termination`], first thing in `main`, so every thread started
//! later inherits the mask) and one thread waits for them
//! ([`watch`]). On either the VM is shut down as `vmm ctl SOCK shutdown`
//! would, a snapshot being taken is abandoned and its temporary directory
//! removed ([`MachineHandle::terminate`]), the report is printed, the
//! control socket's file removed, and the process exits with 128 + the
//! signal's number (130 for SIGINT, 143 for SIGTERM), as a shell reports a
//! process the signal killed.

use std::sync::Arc;

use crate::machine::MachineHandle;

/// The signals that end a VM.
const TERMINATION: [libc::c_int; 2] = [libc::SIGINT, libc::SIGTERM];

fn termination_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; the signal numbers are valid.
    unsafe {
        libc::sigemptyset(&raw mut set);
        for s in TERMINATION {
            libc::sigaddset(&raw mut set, s);
        }
    }
    set
}

/// Blocks SIGINT and SIGTERM in the calling thread and every thread it
/// starts from now on.
pub fn block_termination() {
    let set = termination_set();
    // SAFETY: `set` is a valid signal set; a null old-set pointer is allowed.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &raw const set, std::ptr::null_mut()) };
    if r != 0 {
        log::warn!("cannot block SIGINT and SIGTERM ({r}); they will end the VMM without its report");
    }
}

/// Starts the thread that waits for SIGINT or SIGTERM and terminates the VM
/// of `handle` when one comes. The signals must be blocked
/// ([`block_termination`]).
pub fn watch(handle: Arc<MachineHandle>) {
    let spawned = std::thread::Builder::new().name("signals".into()).spawn(move || {
        crate::seccomp::apply_or_abort(crate::seccomp::ThreadKind::Vmm);
        let set = termination_set();
        let mut signal: libc::c_int = 0;
        // SAFETY: `set` and `signal` are valid for the call.
        if unsafe { libc::sigwait(&raw const set, &raw mut signal) } == 0 {
            log::warn!("got signal {signal}; ending the VM");
            handle.terminate(signal);
        }
    });
    if let Err(e) = spawned {
        log::warn!("cannot start the signal thread ({e}); SIGINT and SIGTERM will wait until the VM ends");
    }
}

/// The exit status of a process ended by `signal`.
#[must_use]
pub fn exit_status(signal: i32) -> u32 {
    128 + signal.unsigned_abs()
}
