//! Booting and running a VM: the run loop.
//!
//! [`run`] builds guest RAM, the VM, the boot data and one vCPU, then runs
//! the vCPU in the calling thread until the guest exits (debug-exit port),
//! idles and is shut down, or dies. Guest messages are decoded here and
//! timestamped; nothing the guest writes is trusted (a message outside RAM
//! or of an unknown kind is counted and ignored).

use std::sync::Arc;

use kvm_ioctls::VcpuExit;
use serde::Serialize;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use memvisor_abi::Pod as _;
use memvisor_abi::boot::{BOOT_CONFIG_MAGIC, BOOT_CONFIG_VERSION, BootConfig, FLAG_IDLE_AT_END, FLAG_SKIP_SELFTEST, FLAG_SYSCALL_INSN};
use memvisor_abi::msg::{Message, Report};

use crate::boot::{self, BootError};
use crate::config::VmConfig;
use crate::control::VmControl;
use crate::devices::{Devices, IoAction, UnhandledStats};
use crate::host::{self, TranslationMode};
use crate::layout;
use crate::kvm_stats::{self, KvmStatsReport};
use crate::memory::report::{self, KvmMappings, ProcessMemory, RegionReport};
use crate::memory::{GuestRam, MemoryError};
use crate::timeline;
use crate::vcpu::{self, RegisterDump};
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
}

/// How to run.
pub struct RunOptions {
    /// Where the guest's serial console goes.
    pub console: Box<dyn std::io::Write + Send>,
    /// Run control (the control socket holds the other end).
    pub control: Option<Arc<VmControl>>,
    /// Skip the guest's self-test (boot benchmarks).
    pub skip_selftest: bool,
}

impl std::fmt::Debug for RunOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunOptions").field("control", &self.control.is_some()).field("skip_selftest", &self.skip_selftest).finish()
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
    /// How KVM maps guest RAM (its page-size counters), when it says.
    pub kvm_mappings: Option<KvmMappings>,
    /// Every KVM statistic of the VM and its vCPU at the end of the run.
    pub kvm_stats: KvmStatsReport,
    /// The VMM process's memory at the end of the run, and its overhead
    /// beyond guest RAM.
    pub vmm_memory: ProcessMemory,
    /// Boot timings.
    pub timings: BootTimings,
    /// Accesses to nothing.
    pub unhandled: UnhandledStats,
    /// How the host translates guest-physical addresses.
    pub translation_mode: TranslationMode,
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
        workload: Default::default(),
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
    let image = boot::read_kernel(config.kernel.as_deref())?;
    // The boot data is written once the vCPU exists, so the TSC frequency
    // it reports can go into the boot configuration.
    let entry = boot::load_kernel(vm.ram(), &image)?;
    timeline::mark("load kernel ELF");
    let mut vcpu = vcpu::create_pvh(&vm, 0, entry.0, layout::abi::PVH_START_INFO)?;
    timeline::mark("create vCPU + CPUID + registers");
    let tsc_khz = vcpu.get_tsc_khz().map_or(0, u64::from);
    let boot_cfg = boot_config(config, mode, options.control.is_some(), options.skip_selftest, tsc_khz);
    boot::pvh::write_boot_data(vm.ram().memory(), vm.ram().size(), &config.cmdline, &boot_cfg)?;
    timeline::mark("write boot data");
    let vcpu = &mut vcpu;

    let mut devices = Devices::new(options.console);
    let mut reports = Vec::new();
    let mut bad_messages = 0u64;
    let mut timings = BootTimings { vcpu_start_us: timeline::since_start_us(), ..Default::default() };
    let control = options.control;
    if let Some(c) = &control {
        c.vcpu_started();
    }

    let result = loop {
        if let Some(c) = &control {
            if !c.may_run() {
                break Ok(0);
            }
        }
        let exit = match vcpu.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => break Err(VmmError::Run(e)),
        };
        match exit {
            VcpuExit::IoOut(port, data) => match devices.port_out(port, data) {
                IoAction::Continue => {}
                IoAction::Exit(status) => break Ok(status),
                IoAction::Message(gpa) => {
                    let mut bytes = [0u8; Message::SIZE];
                    let decoded = vm
                        .ram()
                        .memory()
                        .read_slice(&mut bytes, GuestAddress(gpa))
                        .ok()
                        .and_then(|()| Message::from_bytes(&bytes))
                        .and_then(|m| Report::decode(&m).ok());
                    let Some(report) = decoded else {
                        bad_messages += 1;
                        log::warn!("guest sent an invalid message at {gpa:#x}; ignored");
                        continue;
                    };
                    let at_us = timeline::since_start_us();
                    match report {
                        Report::Hello { .. } if timings.first_report_us.is_none() => timings.first_report_us = Some(at_us),
                        Report::Ready { .. } => timings.ready_us = Some(at_us),
                        _ => {}
                    }
                    reports.push(TimedReport { at_us, report });
                    if let Report::Idle { status } = report {
                        devices.flush();
                        match &control {
                            Some(c) => {
                                timings.end_us = at_us;
                                c.wait_while_idle();
                                break Ok(status);
                            }
                            None => break Ok(status),
                        }
                    }
                }
            },
            VcpuExit::IoIn(port, data) => devices.port_in(port, data),
            VcpuExit::MmioRead(addr, data) => devices.mmio_read(addr, data),
            VcpuExit::MmioWrite(addr, data) => devices.mmio_write(addr, data),
            VcpuExit::Shutdown => break Err(VmmError::TripleFault(Box::new(RegisterDump::read(vcpu)))),
            VcpuExit::Hlt => break Err(VmmError::Halted(Box::new(RegisterDump::read(vcpu)))),
            VcpuExit::InternalError => {
                break Err(VmmError::GuestFailed { what: "internal error: instruction emulation failed".into(), regs: Box::new(RegisterDump::read(vcpu)) });
            }
            VcpuExit::FailEntry(reason, cpu) => {
                break Err(VmmError::GuestFailed {
                    what: format!("entry failed, hardware reason {reason:#x} on cpu {cpu}"),
                    regs: Box::new(RegisterDump::read(vcpu)),
                });
            }
            other => {
                log::warn!("unexpected vCPU exit {other:?}; resuming");
            }
        }
    };
    devices.flush();
    if timings.end_us == 0.0 {
        timings.end_us = timeline::since_start_us();
    }
    if let Some(c) = &control {
        c.exited();
    }
    let exit_status = result?;
    let kvm_stats = kvm_stats::collect(vm.kvm(), vm.fd(), &[&*vcpu]);
    let kvm_mappings = report::kvm_mappings(&kvm_stats, mode);
    let memory = report::regions(vm.ram())?;
    // Last, so that it counts everything the run allocated.
    let vmm_memory = report::process_memory(vm.ram());
    Ok(RunOutcome {
        exit_status,
        reports,
        bad_messages,
        memory,
        kvm_mappings,
        kvm_stats,
        vmm_memory,
        timings,
        unhandled: devices.unhandled().clone(),
        translation_mode: mode,
        boot_phases: timeline::marks(),
        config: config.clone(),
    })
}
