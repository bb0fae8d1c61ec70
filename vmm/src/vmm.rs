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
}

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
    let entry = boot::load_kernel(vm.ram(), &image)?;
    timeline::mark("load kernel ELF");
    let vcpu = vcpu::create_pvh(&vm, 0, entry.0, layout::abi::PVH_START_INFO)?;
    timeline::mark("create vCPU + CPUID + registers");
    let tsc_khz = vcpu.get_tsc_khz().map_or(0, u64::from);
    let boot_cfg = boot_config(config, mode, options.control.is_some(), options.skip_selftest, tsc_khz);
    boot::pvh::write_boot_data(vm.ram().memory(), vm.ram().size(), &config.cmdline, &boot_cfg)?;
    let mut devices = Devices::new(options.console);
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
fn dirty_rounds_for(config: &VmConfig, vm: &Vm, tsc_khz: u64) -> Option<crate::dirty::rounds::DirtyRounds> {
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

/// How a restore loads guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestoreMode {
    /// Read every saved page into fresh guest RAM before starting (every
    /// chunk's checksum verified first).
    Copy,
    /// Map the base image privately so pages load on first guest access;
    /// diffs are copied on top. Only for anonymous and THP backings.
    Lazy,
}

impl std::str::FromStr for RestoreMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "copy" => Ok(RestoreMode::Copy),
            "lazy" => Ok(RestoreMode::Lazy),
            _ => Err(format!("invalid restore mode {s:?}; expected copy or lazy")),
        }
    }
}

/// How to restore.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// How memory is loaded.
    pub mode: RestoreMode,
    /// Control socket for the restored VM.
    pub api_socket: Option<std::path::PathBuf>,
    /// When set, the snapshot's memory size must be this.
    pub expected_mem: Option<u64>,
}

/// Starts a VM from the snapshot chain ending at `dir`; the guest continues
/// where it was.
///
/// # Errors
/// Any [`VmmError`]; a damaged or inconsistent snapshot is rejected before
/// a VM exists.
pub fn restore(dir: &std::path::Path, restore: &RestoreOptions, options: RunOptions) -> Result<RunOutcome, VmmError> {
    use crate::snapshot::{self, format::SnapshotKind, memory_file};

    timeline::mark("restore");
    let mode = restore.mode;
    let chain = snapshot::load_chain(dir)?;
    timeline::mark("load + check snapshot chain");
    let top = chain.top();
    let mut config = top.manifest.config.clone();
    config.validate().map_err(|e| snapshot::SnapshotError::Corrupt(format!("the saved configuration is invalid: {e}")))?;
    if let Some(mem) = restore.expected_mem {
        if mem != config.mem_size {
            return Err(snapshot::SnapshotError::Mismatch(format!(
                "the snapshot holds {} of guest memory, not the {} asked for",
                crate::config::format_size(config.mem_size),
                crate::config::format_size(mem)
            ))
            .into());
        }
    }
    let layout: Vec<(u64, u64)> = crate::layout::ram_ranges(config.mem_size).iter().map(|r| (r.start.0, r.size)).collect();
    let recorded: Vec<(u64, u64)> = top.manifest.regions.iter().map(|r| (r.guest_start, r.size)).collect();
    if layout != recorded {
        return Err(snapshot::SnapshotError::Mismatch(format!("the snapshot's RAM layout {recorded:x?} differs from this build's {layout:x?}")).into());
    }
    config.api_socket.clone_from(&restore.api_socket);
    let base = &chain.links[0];
    if base.manifest.kind != SnapshotKind::Full {
        return Err(snapshot::SnapshotError::Corrupt(format!("the chain starts at {}, which is not a full snapshot", base.dir.display())).into());
    }
    let lazy = mode == RestoreMode::Lazy && matches!(config.backing, crate::config::Backing::Anon | crate::config::Backing::Thp);
    if mode == RestoreMode::Lazy && !lazy {
        log::warn!("lazy restore needs an anon or thp backing; restoring {} backing by copy", config.backing);
    }
    let kvm = vm::open_kvm()?;
    timeline::mark("open /dev/kvm");
    let host_mode = host::detect();
    let ram = if lazy { GuestRam::from_image(&config, &base.memory)? } else { GuestRam::new(&config)? };
    let skip = usize::from(lazy);
    for link in &chain.links[skip..] {
        memory_file::apply(&ram, &link.memory, &link.manifest.chunks)?;
    }
    // Checked before any VM exists; releases the balloon's holes in `ram`.
    let balloon = restore_balloon(&config, &chain.state, &ram)?;
    // Writes made while restoring are not guest activity.
    let _ = crate::dirty::vmm_writes::take(&ram);
    timeline::mark("map + load guest RAM");
    let vm = Vm::without_memslots(kvm, ram)?;
    timeline::mark("create VM");
    // Before the vCPU, as at boot (the dirty ring can only be enabled then).
    let mut tracker = prepare_tracker(&config, &vm, options.control.is_some())?;
    // The memslots are registered on this thread, before the vCPU. A second
    // thread registering them while this one builds the vCPU won ~1 ms at
    // load averages of 3-8 under `chrt -f 20`, but showed no gain on a
    // quiet host, where the same binary's restore varies by ~1 ms from run
    // to run (`vmm bench snapshot`, docs/PERFORMANCE.md); one thread is
    // simpler.
    vm.register_memslots()?;
    timeline::mark("memslots registered");
    let (vcpu, devices, verifier) = load_vcpu(&vm, &chain, tracker.as_mut(), lazy, options.console, balloon)?;
    let mut snapshots = SnapshotChain::default();
    if let Some(t) = tracker.as_mut() {
        // Diffs taken from here on apply on top of the restored snapshot.
        t.start(vm.fd(), vm.ram())?;
        snapshots.last = Some(crate::snapshot::format::ParentRef { dir: top.dir.clone(), id: top.manifest.id.clone() });
        snapshots.generation = t.generation();
    }
    let guest_idle = chain.state.guest_idle.then_some(chain.state.idle_status);
    let dirty_rounds = dirty_rounds_for(&config, &vm, vcpu.get_tsc_khz().map_or(0, u64::from));
    let translation = crate::translate::ready::RunTranslation::default();
    let machine = Machine { config, mode: host_mode, vm, vcpu, devices, tracker, chain: snapshots, guest_idle, dirty_rounds, verifier, translation };
    machine.drive(options.control)
}

/// The balloon of a snapshot, checked against its configuration and built
/// over the restored `ram` (without its irqfd, which needs the VM); `None`
/// for a VM without one.
fn restore_balloon(
    config: &VmConfig,
    state: &crate::snapshot::SavedState,
    ram: &GuestRam,
) -> Result<Option<crate::devices::virtio::mmio::MmioTransport<crate::devices::virtio::balloon::Balloon>>, VmmError> {
    use crate::snapshot::SnapshotError;
    let saved = match (config.balloon.is_some(), &state.devices.balloon) {
        (false, None) => return Ok(None),
        (true, Some(saved)) => saved,
        (true, None) => {
            // Builds before balloon state was saved refused such snapshots,
            // so this is damage, not an old format.
            return Err(SnapshotError::Corrupt("the configuration has a balloon but the snapshot holds no balloon state".into()).into());
        }
        (false, Some(_)) => return Err(SnapshotError::Corrupt("the snapshot holds balloon state but its configuration has no balloon".into()).into()),
    };
    if state.irqchip.is_none() {
        return Err(SnapshotError::Corrupt("a VM with a balloon has an in-kernel irqchip, but the snapshot holds no irqchip state".into()).into());
    }
    let t = crate::devices::virtio::balloon::state::restore(saved, ram, memvisor_abi::virtio::BALLOON_MMIO_BASE, None).map_err(SnapshotError::from)?;
    Ok(Some(t))
}

/// The vCPU side of a restore, while the memslots are being registered:
/// the irqchip (before the vCPU, as at boot), the vCPU with its saved
/// CPUID and state, the devices (the balloon given its irqfd), and for a
/// lazy restore the check of the base image, which starts here, off the
/// path to the first `KVM_RUN`.
fn load_vcpu(
    vm: &Vm,
    chain: &crate::snapshot::Chain,
    tracker: Option<&mut DirtyTracker>,
    lazy: bool,
    console: Box<dyn std::io::Write + Send>,
    balloon: Option<crate::devices::virtio::mmio::MmioTransport<crate::devices::virtio::balloon::Balloon>>,
) -> Result<(kvm_ioctls::VcpuFd, Devices, Option<crate::machine::Verifier>), VmmError> {
    use crate::snapshot::SnapshotError;
    if chain.state.irqchip.is_some() {
        vm.create_irqchip()?;
    }
    let saved = &chain.state.vcpus[0];
    let vcpu = if saved.cpuid.is_empty() { vcpu::create(vm, 0)? } else { vcpu::create_with_cpuid(vm, 0, &saved.cpuid()?)? };
    timeline::mark("create vCPU + CPUID");
    if let Some(t) = tracker {
        t.attach_vcpu(&vcpu, 0)?;
    }
    if let Some(chips) = &chain.state.irqchip {
        chips.restore(vm.fd())?;
    }
    saved.restore(&vcpu)?;
    timeline::mark("restore vCPU + irqchip state");
    let mut devices = Devices::from_state(&chain.state.devices, console).map_err(SnapshotError::Corrupt)?;
    if let Some(mut b) = balloon {
        // The same wiring as at boot: an irqfd on the balloon's GSI of the
        // restored IOAPIC, whose routing the guest programmed (or not).
        b.set_irqfd(Some(vm.irqfd(memvisor_abi::virtio::BALLOON_GSI)?));
        devices.balloon = Some(b);
    }
    // A lazy restore has not read the base image: check it beside the guest.
    let verifier = if lazy {
        let base = &chain.links[0];
        let file = base.memory.try_clone().map_err(|source| SnapshotError::Io { what: "reopening the base image".into(), source })?;
        Some(crate::machine::Verifier::start(file, base.manifest.chunks.clone()))
    } else {
        None
    };
    timeline::mark("devices + verifier");
    Ok((vcpu, devices, verifier))
}
