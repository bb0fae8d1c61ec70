//! The dirty workload's observer: each round the guest reports is
//! harvested and checked ([`crate::dirty::rounds`]) while the guest waits
//! in its port write; the per-round report goes into the outcome.

use memvisor_abi::msg::Report;

use crate::dirty::rounds::DirtyRounds;
use crate::dirty::{DirtyMode, DirtyTracker};
use crate::machine::{GuestContext, RunObserver, RunOutcome, VmmError};
use crate::vm::Vm;
use crate::workload::DirtyWorkload;

/// Follows the dirty workload's rounds.
#[derive(Debug)]
pub struct DirtyObserver(DirtyRounds);

impl DirtyObserver {
    /// For `workload` on `vm`; `tsc_khz` converts the guest's round times.
    #[must_use]
    pub fn new(workload: DirtyWorkload, vm: &Vm, tsc_khz: u64) -> Self {
        let stats = crate::kvm_stats::StatsFd::for_vm(vm.kvm(), vm.fd()).ok();
        DirtyObserver(DirtyRounds::new(workload, tsc_khz, stats))
    }
}

impl RunObserver for DirtyObserver {
    fn on_report(&mut self, report: &Report, guest: &mut GuestContext<'_>) -> Result<(), VmmError> {
        if let (Report::Workload { event, a, b }, Some(tracker)) = (*report, guest.tracker.as_deref_mut()) {
            self.0.on_event(event, a, b, tracker, guest.vm.fd(), guest.vm.ram())?;
        }
        Ok(())
    }

    fn finish(mut self: Box<Self>, guest: &mut GuestContext<'_>, outcome: &mut RunOutcome) {
        self.0.finish();
        let mut report = self.0.report(guest.tracker.as_deref().map_or(DirtyMode::Bitmap, DirtyTracker::mode));
        report.ring_entries_per_vcpu = guest.tracker.as_deref().map(|t| t.ring_entries().to_vec()).unwrap_or_default();
        outcome.dirty = Some(report);
    }
}
