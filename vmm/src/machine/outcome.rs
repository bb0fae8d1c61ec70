//! What a run produced: the reports the guest sent, its boot milestones,
//! and the memory, KVM and device figures read when it ended. Built by
//! [`super::Machine::drive`] and its observers; printed by
//! `crate::run_report`.

use serde::Serialize;

use memvisor_abi::msg::Report;

use crate::config::VmConfig;
use crate::devices::UnhandledStats;
use crate::host::TranslationMode;
use crate::kvm_stats::KvmStatsReport;
use crate::memory::report::{KvmMappings, ProcessMemory, RegionReport};

/// A guest report and when it arrived.
#[derive(Debug, Clone, Serialize)]
pub struct TimedReport {
    /// Microseconds since process start.
    pub at_us: f64,
    /// The report.
    #[serde(serialize_with = "serialize_report")]
    pub report: Report,
}

fn serialize_report<S: serde::Serializer>(r: &Report, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{r:?}"))
}

/// Boot milestones, microseconds since process start.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BootTimings {
    /// The VM and memory were set up and the vCPU was about to run.
    pub vcpu_start_us: f64,
    /// The guest's first report (Hello).
    pub first_report_us: Option<f64>,
    /// The first exit of the vCPU to the VMM (any exit but a kick): the
    /// guest has run by then, so this bounds its first instruction from
    /// above (`vcpu_start_us` bounds it from below).
    pub first_exit_us: Option<f64>,
    /// The guest was ready (kernel initialised, before the self-test).
    pub ready_us: Option<f64>,
    /// The guest exited or idled.
    pub end_us: f64,
}

/// Everything a run produced.
#[derive(Debug, Clone, Serialize)]
pub struct RunOutcome {
    /// The guest's exit status.
    pub exit_status: u32,
    /// Every report, in order.
    pub reports: Vec<TimedReport>,
    /// Messages the guest sent that were rejected.
    pub bad_messages: u64,
    /// The memory report, per region.
    pub memory: Vec<RegionReport>,
    /// The dirty workload's per-round harvest checks, when it ran.
    pub dirty: Option<crate::dirty::rounds::DirtyReport>,
    /// How KVM maps guest RAM (its page-size counters), when it says.
    pub kvm_mappings: Option<KvmMappings>,
    /// The balloon at the end of the run, when the VM had one.
    pub balloon: Option<crate::devices::virtio::balloon::BalloonInfo>,
    /// Every KVM statistic of the VM and its vCPU at the end of the run.
    pub kvm_stats: KvmStatsReport,
    /// The VMM process's memory at the end of the run, and its overhead
    /// beyond guest RAM.
    pub vmm_memory: ProcessMemory,
    /// Boot timings.
    pub timings: BootTimings,
    /// Accesses to nothing.
    pub unhandled: UnhandledStats,
    /// What the paravirtual swap device did (guest-paging workloads).
    pub swap_device: crate::devices::swap::SwapStats,
    /// How the host translates guest-physical addresses.
    pub translation_mode: TranslationMode,
    /// The guest's TSC frequency in kHz (KVM_GET_TSC_KHZ; 0 when unknown),
    /// to convert the guest's TSC times.
    pub tsc_khz: u64,
    /// `--translate` explanations, in the order asked.
    pub translations: Vec<crate::translate::ReadyTranslation>,
    /// The translation workload's phases and KVM statistic deltas, when it ran.
    pub translation_probe: Option<Vec<crate::translate::probe::WorkloadRecord>>,
    /// Start-up milestones before the first KVM_RUN: (name, µs since
    /// process start), in order.
    pub boot_phases: Vec<(&'static str, f64)>,
    /// The configuration the VM ran with.
    pub config: VmConfig,
}
