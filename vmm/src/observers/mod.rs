//! The run observers a workload brings ([`crate::machine::RunObserver`]):
//! chosen here from the typed workload and the run's flags, so that the run
//! loop never names a workload.
//!
//! - [`dirty::DirtyObserver`]: the dirty workload's rounds, harvested and
//!   checked while the guest waits.
//! - [`translation::TranslationObserver`]: `--translate` addresses explained
//!   when the guest is ready, and the translation workload's KVM-statistics
//!   probe.

pub mod dirty;
pub mod translation;

use crate::config::VmConfig;
use crate::machine::RunObserver;
use crate::vm::Vm;
use crate::workload::Workload;

/// The observers of a run of `config` on `vm`, explaining `translate` when
/// the guest is ready; `tsc_khz` converts guest times.
#[must_use]
pub fn for_run(config: &VmConfig, vm: &Vm, tsc_khz: u64, translate: Vec<u64>) -> Vec<Box<dyn RunObserver>> {
    let mut observers: Vec<Box<dyn RunObserver>> = Vec::new();
    if let Some(Workload::Dirty(w)) = config.workload {
        observers.push(Box::new(dirty::DirtyObserver::new(w, vm, tsc_khz)));
    }
    let probe = matches!(config.workload, Some(Workload::Translation(_)));
    if probe || !translate.is_empty() {
        observers.push(Box::new(translation::TranslationObserver::new(translate, probe)));
    }
    observers
}
