//! Errors of building and running a VM.

use thiserror::Error;

use crate::boot::BootError;
use crate::memory::MemoryError;
use crate::vcpu::RegisterDump;
use crate::vm::VmError;

/// Errors running a VM.
#[derive(Debug, Error)]
pub enum VmmError {
    /// Creating the VM.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Loading the guest.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// The guest triple-faulted.
    #[error("guest triple-faulted (KVM_EXIT_SHUTDOWN); registers: {0}")]
    TripleFault(Box<RegisterDump>),
    /// KVM could not run or emulate the guest.
    #[error("KVM could not run the guest ({what}); registers: {regs}")]
    GuestFailed {
        /// What KVM said.
        what: String,
        /// Registers at the failure.
        regs: Box<RegisterDump>,
    },
    /// The guest halted without exiting.
    #[error("guest halted without using the exit port; registers: {0}")]
    Halted(Box<RegisterDump>),
    /// KVM_RUN failed.
    #[error("KVM_RUN failed")]
    Run(#[source] kvm_ioctls::Error),
    /// Dirty tracking.
    #[error(transparent)]
    Dirty(#[from] crate::dirty::DirtyError),
    /// Snapshots.
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    /// A restore's KVM thread could not start, or ended without its VM.
    #[error("the restore's KVM thread {0}")]
    KvmThread(&'static str),
}
