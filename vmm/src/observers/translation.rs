//! Translation work a run does on its own: `vmm run --translate GVA,...`
//! explained when the guest reports Ready (the guest is stopped in its port
//! write, CR3 is the kernel's), and the translation benchmark's probe,
//! which samples KVM statistics at the translation workload's events.

use memvisor_abi::msg::Report;

use crate::machine::{GuestContext, RunObserver, RunOutcome, VmmError};
use crate::translate::ReadyTranslation;
use crate::translate::probe::StatsProbe;

/// `--translate` addresses and the translation workload's probe.
#[derive(Debug, Default)]
pub struct TranslationObserver {
    at_ready: Vec<u64>,
    results: Vec<ReadyTranslation>,
    probe: Option<StatsProbe>,
}

impl TranslationObserver {
    /// Explains `at_ready` when the guest is ready; probes KVM statistics
    /// when `probe`.
    #[must_use]
    pub fn new(at_ready: Vec<u64>, probe: bool) -> Self {
        TranslationObserver { at_ready, results: Vec::new(), probe: probe.then(StatsProbe::default) }
    }
}

impl RunObserver for TranslationObserver {
    fn on_report(&mut self, report: &Report, guest: &mut GuestContext<'_>) -> Result<(), VmmError> {
        match *report {
            Report::Ready { .. } if !self.at_ready.is_empty() => {
                let gvas = std::mem::take(&mut self.at_ready);
                self.results = crate::translate::ready::explain_all(guest.vm.ram(), guest.vcpu, guest.mode, &gvas);
            }
            Report::Workload { event, a, b } => {
                if let Some(p) = self.probe.as_mut() {
                    p.on_event(event, a, b, guest.vm.kvm(), guest.vm.fd(), guest.vcpu);
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn finish(self: Box<Self>, _guest: &mut GuestContext<'_>, outcome: &mut RunOutcome) {
        outcome.translations = self.results;
        outcome.translation_probe = self.probe.map(|p| p.records);
    }
}
