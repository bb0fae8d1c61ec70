//! A built VM and its run loop.
//!
//! A [`Machine`] is the VM, its vCPU, devices, dirty tracker and snapshot
//! chain, however it came to be (booted by [`crate::vmm::run`] or restored
//! by [`crate::restore::restore`]). [`Machine::drive`] runs the vCPU in the
//! calling thread until the guest exits, idles and is shut down, or dies,
//! serving the jobs of its [`VmControl`] between `KVM_RUN`s. Guest messages
//! are decoded and timestamped here and handed to the run's
//! [`RunObserver`]s; nothing the guest writes is trusted (a message outside
//! RAM or of an unknown kind is counted and ignored).
//!
//! Other threads reach a running machine only through its
//! [`MachineHandle`] ([`handle`]).

pub mod error;
pub mod handle;
pub mod observer;
pub mod outcome;
pub mod verifier;

use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress};

use memvisor_abi::Pod as _;
use memvisor_abi::msg::{Message, Report};

use crate::config::VmConfig;
use crate::control::{Kick, VmControl, Work};
use crate::devices::{Devices, IoAction};
use crate::dirty::DirtyTracker;
use crate::host::TranslationMode;
use crate::kvm_stats;
use crate::memory::report;
use crate::snapshot::SnapshotChain;
use crate::timeline;
use crate::vcpu::RegisterDump;
use crate::vm::Vm;

pub use error::VmmError;
pub use handle::MachineHandle;
pub use observer::{GuestContext, RunObserver};
pub use outcome::{BootTimings, RunOutcome, TimedReport};
pub use verifier::{Verifier, VerifyJob};

/// `KVM_EXIT_DIRTY_RING_FULL` (KVM api.rst, kvm_run exit reasons): a vCPU's
/// dirty ring is full and must be harvested before it can run again.
const KVM_EXIT_DIRTY_RING_FULL: u32 = 31;

/// Most guest reports kept for the run report (a workload sends a few per
/// round); later ones are counted, not kept.
const MAX_REPORTS: usize = 100_000;

/// A VM ready to run.
#[derive(Debug)]
pub struct Machine {
    /// The configuration it runs with.
    pub config: VmConfig,
    /// How the host translates guest-physical addresses.
    pub mode: TranslationMode,
    /// The VM and its memory.
    pub vm: Vm,
    /// The vCPU.
    pub vcpu: VcpuFd,
    /// The devices.
    pub devices: Devices,
    /// Dirty tracking, when prepared.
    pub tracker: Option<DirtyTracker>,
    /// The previous snapshot, for diffs.
    pub chain: SnapshotChain,
    /// `Some(status)` once the guest has finished its work and idles.
    pub guest_idle: Option<u32>,
    /// Whether the VM stays up when the guest idles, serving requests
    /// until shut down (a control socket is up).
    pub stay_up: bool,
    /// A lazy restore's check of the base image, running beside the guest.
    pub verifier: Option<Verifier>,
    /// What the workload adds to the run.
    pub observers: Vec<Box<dyn RunObserver>>,
}

/// What the run loop does after one exit.
enum Flow {
    Continue,
    End(Result<u32, VmmError>),
}

/// The run's record of guest reports.
#[derive(Default)]
struct Reports {
    kept: Vec<TimedReport>,
    bad: u64,
    dropped: u64,
    timings: BootTimings,
}

impl Machine {
    /// Runs until the end and builds the outcome. `control` is the VM's
    /// (its [`MachineHandle`]'s); this thread is its vCPU thread.
    ///
    /// # Errors
    /// [`VmmError`] when the guest dies or KVM fails.
    pub fn drive(mut self, control: &VmControl<Machine>) -> Result<RunOutcome, VmmError> {
        let mut log = Reports { timings: BootTimings { vcpu_start_us: timeline::since_start_us(), ..Default::default() }, ..Default::default() };
        let immediate_exit = &raw mut self.vcpu.get_kvm_run().immediate_exit;
        // SAFETY: the byte is in this vCPU's kvm_run mapping, which lives as
        // long as `self.vcpu`; `control.exited()` below unregisters the kick
        // before this function returns and so before the vCPU can be dropped.
        control.vcpu_started(unsafe { Kick::new(immediate_exit) });
        if self.guest_idle.is_some() {
            control.guest_idled();
        }
        let result = loop {
            if let Some(status) = self.guest_idle.filter(|_| !self.stay_up) {
                // Restored from an idle snapshot with nobody to serve.
                break Ok(status);
            }
            match control.next_work() {
                Work::Run => {}
                Work::Stop => break Ok(self.guest_idle.unwrap_or(0)),
                // The only abort is a lazy restore's failed image check.
                Work::Abort(why) => break Err(crate::snapshot::SnapshotError::Corrupt(why).into()),
                Work::Jobs(jobs) => {
                    for job in jobs {
                        job.run(&mut self);
                    }
                    continue;
                }
            }
            let exit = match self.vcpu.run() {
                Ok(exit) => exit,
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                Err(e) => break Err(VmmError::Run(e)),
            };
            if log.timings.first_exit_us.is_none() {
                log.timings.first_exit_us = Some(timeline::since_start_us());
            }
            let flow = match exit {
                VcpuExit::IoOut(port, data) => match self.devices.port_out(port, data) {
                    IoAction::Continue => Flow::Continue,
                    IoAction::Exit(status) => Flow::End(Ok(status)),
                    IoAction::Reset => {
                        log::info!("the guest reset the machine (i8042 reset line); the VM ends");
                        Flow::End(Ok(0))
                    }
                    IoAction::Swap(gpa) => {
                        self.devices.swap.handle(self.vm.ram().memory(), gpa);
                        Flow::Continue
                    }
                    IoAction::Message(gpa) => self.on_message(gpa, &mut log, control),
                },
                VcpuExit::IoIn(port, data) => {
                    self.devices.port_in(port, data);
                    Flow::Continue
                }
                VcpuExit::MmioRead(addr, data) => {
                    self.devices.mmio_read(addr, data);
                    if self.devices.take_idle_hint() {
                        // A polling guest with nothing to do: wait for host
                        // work (a job, e.g. a new balloon target) a little.
                        control.idle_wait(std::time::Duration::from_millis(1));
                    }
                    Flow::Continue
                }
                VcpuExit::MmioWrite(addr, data) => {
                    self.devices.mmio_write(addr, data, self.vm.ram());
                    Flow::Continue
                }
                VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL) => match self.tracker.as_mut().map(|t| t.on_ring_full(self.vm.fd())) {
                    Some(Err(e)) => Flow::End(Err(e.into())),
                    _ => Flow::Continue,
                },
                VcpuExit::Shutdown => Flow::End(Err(VmmError::TripleFault(Box::new(RegisterDump::read(&self.vcpu))))),
                VcpuExit::Hlt => Flow::End(Err(VmmError::Halted(Box::new(RegisterDump::read(&self.vcpu))))),
                VcpuExit::InternalError => Flow::End(Err(self.guest_failed("internal error: instruction emulation failed".into()))),
                VcpuExit::FailEntry(reason, cpu) => Flow::End(Err(self.guest_failed(format!("entry failed, hardware reason {reason:#x} on cpu {cpu}")))),
                other => {
                    log::warn!("unexpected vCPU exit {other:?}; resuming");
                    Flow::Continue
                }
            };
            if let Flow::End(r) = flow {
                break r;
            }
        };
        self.devices.flush();
        if log.timings.end_us == 0.0 {
            log.timings.end_us = timeline::since_start_us();
        }
        control.exited();
        if log.dropped > 0 {
            log::warn!("the guest sent {} reports beyond the {MAX_REPORTS} kept", log.dropped);
        }
        let unverified = self.verifier.take().and_then(Verifier::finish);
        let exit_status = result?;
        if let Some(why) = unverified {
            return Err(crate::snapshot::SnapshotError::Corrupt(why).into());
        }
        self.outcome(exit_status, log)
    }

    fn guest_failed(&self, what: String) -> VmmError {
        VmmError::GuestFailed { what, regs: Box::new(RegisterDump::read(&self.vcpu)) }
    }

    /// A message port write: decodes the report at `gpa`, records it and
    /// hands it to the observers (the guest waits in its port write).
    fn on_message(&mut self, gpa: u64, log: &mut Reports, control: &VmControl<Machine>) -> Flow {
        let mut bytes = [0u8; Message::SIZE];
        let decoded = self
            .vm
            .ram()
            .memory()
            .read_slice(&mut bytes, GuestAddress(gpa))
            .ok()
            .and_then(|()| Message::from_bytes(&bytes))
            .and_then(|m| Report::decode(&m).ok());
        let Some(report) = decoded else {
            log.bad += 1;
            log::warn!("guest sent an invalid message at {gpa:#x}; ignored");
            return Flow::Continue;
        };
        let at_us = timeline::since_start_us();
        match report {
            Report::Hello { .. } if log.timings.first_report_us.is_none() => log.timings.first_report_us = Some(at_us),
            Report::Ready { .. } => log.timings.ready_us = Some(at_us),
            _ => {}
        }
        // Bounded: a guest that reports without end cannot grow the VMM's
        // memory without end.
        if log.kept.len() < MAX_REPORTS {
            log.kept.push(TimedReport { at_us, report });
        } else {
            log.dropped += 1;
        }
        let mut guest = GuestContext { vm: &self.vm, vcpu: &self.vcpu, tracker: self.tracker.as_mut(), mode: self.mode };
        for o in &mut self.observers {
            if let Err(e) = o.on_report(&report, &mut guest) {
                return Flow::End(Err(e));
            }
        }
        if let Report::Idle { status } = report {
            self.devices.flush();
            log.timings.end_us = at_us;
            if !self.stay_up {
                return Flow::End(Ok(status));
            }
            // The guest is never entered again; the loop serves jobs until
            // shutdown.
            self.guest_idle = Some(status);
            control.guest_idled();
        }
        Flow::Continue
    }

    /// The outcome of a run that ended with `exit_status`.
    fn outcome(mut self, exit_status: u32, log: Reports) -> Result<RunOutcome, VmmError> {
        let kvm_stats = kvm_stats::collect(self.vm.kvm(), self.vm.fd(), &[&self.vcpu]);
        let kvm_mappings = report::kvm_mappings(&kvm_stats, self.mode);
        let memory = report::regions(self.vm.ram())?;
        let mut outcome = RunOutcome {
            exit_status,
            reports: log.kept,
            bad_messages: log.bad,
            memory,
            kvm_mappings,
            kvm_stats,
            vmm_memory: report::ProcessMemory::default(),
            dirty: None,
            balloon: self.devices.balloon.as_ref().map(|b| b.device.info()),
            timings: log.timings,
            unhandled: self.devices.unhandled().clone(),
            swap_device: self.devices.swap.stats(),
            translation_mode: self.mode,
            translations: Vec::new(),
            translation_probe: None,
            boot_phases: timeline::marks(),
            config: self.config.clone(),
        };
        let mut guest = GuestContext { vm: &self.vm, vcpu: &self.vcpu, tracker: self.tracker.as_mut(), mode: self.mode };
        for o in std::mem::take(&mut self.observers) {
            o.finish(&mut guest, &mut outcome);
        }
        // Last, so that it counts everything the run allocated.
        outcome.vmm_memory = report::process_memory(self.vm.ram());
        Ok(outcome)
    }

    /// Captures a snapshot (on the vCPU thread, the vCPU stopped); the
    /// caller makes it durable with [`crate::snapshot::Captured::persist`],
    /// after the vCPU resumed.
    ///
    /// # Errors
    /// [`crate::snapshot::SnapshotError`].
    pub fn capture_snapshot(&mut self, dir: &std::path::Path, kind: crate::snapshot::format::SnapshotKind) -> Result<crate::snapshot::Captured, crate::snapshot::SnapshotError> {
        self.with_live(|live, tracker, chain| crate::snapshot::capture(live, tracker, chain, dir, kind))
    }

    /// A diff's first stop ([`crate::snapshot::diff::begin`]): harvests the
    /// dirty log; the caller pre-copies the pages while the vCPU runs, then
    /// calls [`Machine::finish_diff`].
    ///
    /// # Errors
    /// [`crate::snapshot::SnapshotError`].
    pub fn begin_diff(&mut self, dir: &std::path::Path) -> Result<crate::snapshot::diff::Precopy, crate::snapshot::SnapshotError> {
        self.with_live(|live, tracker, chain| crate::snapshot::diff::begin(live, tracker, chain, dir))
    }

    /// A diff's second stop ([`crate::snapshot::diff::finish`]).
    ///
    /// # Errors
    /// [`crate::snapshot::SnapshotError`].
    pub fn finish_diff(&mut self, pre: crate::snapshot::diff::Precopy) -> Result<crate::snapshot::Captured, crate::snapshot::SnapshotError> {
        self.with_live(|live, tracker, chain| crate::snapshot::diff::finish(live, tracker, chain, pre))
    }

    /// Runs `f` on the stopped VM, when it can be snapshotted.
    fn with_live<T>(
        &mut self,
        f: impl FnOnce(&crate::snapshot::Live<'_>, &mut DirtyTracker, &mut SnapshotChain) -> Result<T, crate::snapshot::SnapshotError>,
    ) -> Result<T, crate::snapshot::SnapshotError> {
        let swapped = self.devices.swap.slots_used();
        if swapped > 0 && self.guest_idle.is_none() {
            // The swap store is host memory outside guest RAM and is not
            // saved: a restored guest would read zeros for pages it swapped
            // out. Once the guest idles its workload is over and the store
            // is dead data.
            return Err(crate::snapshot::SnapshotError::Unsupported(format!(
                "the guest has {swapped} pages in the swap device, whose store snapshots do not save; take the snapshot before the paging workload swaps or after it ends"
            )));
        }
        let tracker = self.tracker.as_mut().ok_or(crate::snapshot::SnapshotError::NoBase)?;
        let live = crate::snapshot::Live {
            kvm: self.vm.kvm(),
            vm_fd: self.vm.fd(),
            vcpu: &self.vcpu,
            ram: self.vm.ram(),
            config: &self.config,
            devices: self.devices.state(),
            guest_idle: self.guest_idle,
            irqchip: self.vm.has_irqchip(),
            skip: self.devices.balloon.as_ref().map(|b| b.device.released_ram_ranges()).unwrap_or_default(),
        };
        f(&live, tracker, &mut self.chain)
    }
}
