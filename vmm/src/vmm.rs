//! Booting and running a VM: the run loop.
//!
//! [`run`] builds guest RAM, the VM, the boot data and one vCPU, then runs
//! the vCPU in the calling thread until the guest exits (debug-exit port),
//! idles and is shut down, or dies. Guest messages are decoded here and
//! timestamped; nothing the guest writes is trusted (a message outside RAM
//! or of an unknown kind is counted and ignored).

use std::sync::Arc;

use serde::Serialize;
use thiserror::Error;

use memvisor_abi::boot::{BOOT_CONFIG_MAGIC, BOOT_CONFIG_VERSION, BootConfig, FLAG_IDLE_AT_END, FLAG_SKIP_SELFTEST, FLAG_SYSCALL_INSN};
use memvisor_abi::msg::Report;

use crate::boot::{self, BootError};
use crate::config::VmConfig;
use crate::control::VmControl;
use crate::dirty::DirtyTracker;
use crate::machine::Machine;
use crate::snapshot::SnapshotChain;
use crate::devices::{Devices, UnhandledStats};
use crate::host::{self, TranslationMode};
use crate::layout;
use crate::kvm_stats::KvmStatsReport;
use crate::memory::report::{KvmMappings, ProcessMemory, RegionReport};
use crate::memory::{GuestRam, MemoryError};
use crate::vcpu::{self, RegisterDump};
use crate::timeline;
use crate::vm::{self, Vm, VmError};

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

pub use crate::restore::{RestoreMode, RestoreOptions, restore};

/// How to run.
pub struct RunOptions {
    /// Where the guest's serial console goes.
    pub console: Box<dyn std::io::Write + Send>,
    /// Run control (the control socket holds the other end).
    pub control: Option<Arc<VmControl>>,
    /// Skip the guest's self-test (boot benchmarks).
    pub skip_selftest: bool,
    /// Guest-virtual addresses to explain when the guest is ready (`--translate`).
    pub translate: Vec<u64>,
}

impl std::fmt::Debug for RunOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunOptions")
            .field("control", &self.control.is_some())
            .field("skip_selftest", &self.skip_selftest)
            .field("translate", &self.translate)
            .finish()
    }
}

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
    /// `--translate` explanations, in the order asked.
    pub translations: Vec<crate::translate::ready::ReadyTranslation>,
    /// The translation workload's phases and KVM statistic deltas, when it ran.
    pub translation_probe: Option<Vec<crate::bench::translation::probe::WorkloadRecord>>,
    /// Start-up milestones before the first KVM_RUN: (name, µs since
    /// process start), in order.
    pub boot_phases: Vec<(&'static str, f64)>,
    /// The configuration the VM ran with.
    pub config: VmConfig,
}

/// The boot configuration for `config` on this host.
#[must_use]
pub fn boot_config(config: &VmConfig, mode: TranslationMode, idle_at_end: bool, skip_selftest: bool, tsc_khz: u64) -> BootConfig {
    let mut flags = 0;
    if idle_at_end {
        flags |= FLAG_IDLE_AT_END;
    }
    if skip_selftest {
        flags |= FLAG_SKIP_SELFTEST;
    }
    if !mode.is_pvm() {
        // Elsewhere `syscall` from ring 3 works (host-facts: not on PVM).
        flags |= FLAG_SYSCALL_INSN;
    }
    BootConfig {
        magic: BOOT_CONFIG_MAGIC,
        version: BOOT_CONFIG_VERSION,
        guest_page_shift: config.guest_page.shift(),
        flags,
        tsc_khz,
        vmm_start_tsc: 0,
        // Validated with the configuration.
        workload: config.workload.as_deref().and_then(|w| crate::workload::parse(w).ok()).unwrap_or_default(),
    }
}

/// Boots the VM `config` describes and runs it to the end.
///
/// # Errors
/// Any [`VmmError`]: set-up failures, or a guest that dies.
pub fn run(config: &VmConfig, options: RunOptions) -> Result<RunOutcome, VmmError> {
    timeline::mark("run");
    let kvm = vm::open_kvm()?;
    timeline::mark("open /dev/kvm");
    let mode = host::detect();
    timeline::mark("detect host");
    let ram = GuestRam::new(config)?;
    timeline::mark("map guest RAM");
    let vm = Vm::new(kvm, ram)?;
    timeline::mark("create VM + memslots");
    // The irqchip must exist before the vCPU; only VMs with a virtio
    // device get one (snapshots save its state and the LAPIC's, and the
    // balloon's own: devices::virtio::balloon::state).
    let balloon = match config.balloon {
        Some(target) => {
            vm.create_irqchip()?;
            let irqfd = vm.irqfd(memvisor_abi::virtio::BALLOON_GSI)?;
            let device = crate::devices::virtio::balloon::Balloon::new(vm.ram(), target);
            Some(crate::devices::virtio::mmio::MmioTransport::new(device, memvisor_abi::virtio::BALLOON_MMIO_BASE, Some(irqfd)))
        }
        None => None,
    };
    // Before any vCPU exists: the dirty ring can only be enabled then.
    let mut tracker = prepare_tracker(config, &vm, options.control.is_some())?;
    let image = boot::read_kernel(config.kernel.as_deref())?;
    // The boot data is written once the vCPU exists, so the TSC frequency
    // it reports can go into the boot configuration.
    // A bzImage or a vmlinux without a PVH note: Linux's boot protocol (boot::linux).
    let linux_vcpu = boot::start_linux(&vm, &image, config.initrd.as_deref(), &config.cmdline)?;
    let is_pvh = linux_vcpu.is_none();
    let vcpu = match linux_vcpu {
        Some(vcpu) => vcpu,
        None => {
            let entry = boot::load_kernel(vm.ram(), &image)?;
            timeline::mark("load kernel ELF");
            vcpu::create_pvh(&vm, 0, entry.0, layout::abi::PVH_START_INFO)?
        }
    };
    timeline::mark("create vCPU + CPUID + registers");
    let tsc_khz = vcpu.get_tsc_khz().map_or(0, u64::from);
    let boot_cfg = boot_config(config, mode, options.control.is_some(), options.skip_selftest, tsc_khz);
    if is_pvh {
        boot::pvh::write_boot_data(vm.ram().memory(), vm.ram().size(), &config.cmdline, &boot_cfg)?;
    }
    let mut devices = Devices::new(options.console);
    if !is_pvh {
        // Linux's 8250 driver waits for the transmitter-empty interrupt.
        devices.connect_serial_irq(vm.irqfd(memvisor_abi::ports::COM1_GSI)?);
    }
    devices.balloon = balloon;
    if let Some(t) = tracker.as_mut() {
        t.attach_vcpu(&vcpu, 0)?;
    }
    timeline::mark("write boot data");
    let dirty_rounds = dirty_rounds_for(config, &vm, tsc_khz);
    let translation = crate::translate::ready::RunTranslation {
        at_ready: options.translate.clone(),
        results: Vec::new(),
        probe: is_translation_workload(config).then(crate::bench::translation::probe::StatsProbe::default),
    };
    let machine = Machine { config: config.clone(), mode, vm, vcpu, devices, tracker, chain: SnapshotChain::default(), guest_idle: None, dirty_rounds, verifier: None, translation };
    machine.drive(options.control)
}

/// Whether `config` runs the translation benchmark's workload.
fn is_translation_workload(config: &VmConfig) -> bool {
    let spec = config.workload.as_deref().and_then(|w| crate::workload::parse(w).ok());
    spec.is_some_and(|s| s.kind == memvisor_abi::workload::WorkloadKind::Translation as u32)
}

/// The round checker for a dirty workload, if `config` runs one.
pub(crate) fn dirty_rounds_for(config: &VmConfig, vm: &Vm, tsc_khz: u64) -> Option<crate::dirty::rounds::DirtyRounds> {
    let spec = crate::workload::parse(config.workload.as_deref()?).ok()?;
    if spec.kind != memvisor_abi::workload::WorkloadKind::Dirty as u32 {
        return None;
    }
    let stats = crate::kvm_stats::StatsFd::for_vm(vm.kvm(), vm.fd()).ok();
    let p = spec.params;
    Some(crate::dirty::rounds::DirtyRounds::new([p[0], p[1], p[2], p[3], p[4], p[5]], tsc_khz, stats))
}

/// Prepares dirty tracking when anything may need it: a forced mode, or a
/// control socket (snapshots).
pub(crate) fn prepare_tracker(config: &VmConfig, vm: &Vm, has_control: bool) -> Result<Option<DirtyTracker>, VmmError> {
    let dirty_workload = crate::workload::is_dirty(config.workload.as_deref());
    if config.dirty_mode.is_none() && !has_control && !dirty_workload {
        return Ok(None);
    }
    Ok(Some(DirtyTracker::prepare(vm.fd(), vm.ram(), config.dirty_mode)?))
}
