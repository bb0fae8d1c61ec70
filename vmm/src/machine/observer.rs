//! What a workload adds to a run, without the run loop knowing workloads.
//!
//! The run loop hands every guest report to each [`RunObserver`] while the
//! guest waits in its port write (so an observer sees guest memory and
//! vCPU state exactly at the report), and lets each add its results to the
//! outcome when the run ends. The observers a run gets are chosen from its
//! workload by `crate::observers`.

use kvm_ioctls::VcpuFd;

use memvisor_abi::msg::Report;

use crate::dirty::DirtyTracker;
use crate::host::TranslationMode;
use crate::vm::Vm;

use super::{RunOutcome, VmmError};

/// The stopped guest, as an observer may see and use it.
#[derive(Debug)]
pub struct GuestContext<'a> {
    /// The VM and its RAM.
    pub vm: &'a Vm,
    /// The vCPU that sent the report.
    pub vcpu: &'a VcpuFd,
    /// Dirty tracking, when the run prepared it.
    pub tracker: Option<&'a mut DirtyTracker>,
    /// How the host translates guest-physical addresses.
    pub mode: TranslationMode,
}

/// Follows a run's guest reports.
pub trait RunObserver: std::fmt::Debug + Send {
    /// A report arrived (after the run loop recorded it).
    ///
    /// # Errors
    /// An error ends the run with it.
    fn on_report(&mut self, report: &Report, guest: &mut GuestContext<'_>) -> Result<(), VmmError>;

    /// The run ended: adds what was observed to `outcome`.
    fn finish(self: Box<Self>, guest: &mut GuestContext<'_>, outcome: &mut RunOutcome);
}
