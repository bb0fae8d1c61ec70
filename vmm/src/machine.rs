//! A built VM and its run loop.
//!
//! A [`Machine`] is the VM, its vCPU, devices, dirty tracker and snapshot
//! chain, however it came to be (booted by [`crate::vmm::run`] or restored
//! by [`crate::restore::restore`]). [`Machine::drive`] runs the vCPU in the
//! calling thread until the guest exits, idles and is shut down, or dies,
//! serving control-socket jobs between `KVM_RUN`s. Guest messages are decoded
//! and timestamped here; nothing the guest writes is trusted (a message
//! outside RAM or of an unknown kind is counted and ignored).

use std::sync::Arc;

use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress};

use memvisor_abi::Pod as _;
use memvisor_abi::msg::{Message, Report};

use crate::config::VmConfig;
use crate::control::{VmControl, Work};
use crate::devices::{Devices, IoAction};
use crate::dirty::DirtyTracker;
use crate::host::TranslationMode;
use crate::kvm_stats;
use crate::memory::report;
use crate::snapshot::SnapshotChain;
use crate::timeline;
use crate::vcpu::RegisterDump;
use crate::vm::Vm;
use crate::vmm::{BootTimings, RunOutcome, TimedReport, VmmError};

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
    /// The dirty workload's round checks, when that workload runs.
    pub dirty_rounds: Option<crate::dirty::rounds::DirtyRounds>,
    /// A lazy restore's check of the base image, running beside the guest.
    pub verifier: Option<Verifier>,
    /// `--translate` addresses and the translation benchmark's probe.
    pub translation: crate::translate::ready::RunTranslation,
}

/// Checks a lazily restored base image's chunk checksums on a thread while
/// the guest runs (reading 1 GiB up front would defeat the lazy start). A
/// mismatch stops the VM at its next exit (the thread kicks the vCPU) with
/// the error; the run also waits for the check before it reports success.
#[derive(Debug)]
pub struct Verifier {
    failed: Arc<std::sync::Mutex<Option<String>>>,
    thread: std::thread::JoinHandle<()>,
}

/// The check a [`Verifier`] runs, handed to the thread that runs it.
#[derive(Debug)]
pub struct VerifyJob {
    file: std::fs::File,
    chunks: Vec<crate::snapshot::format::Chunk>,
    failed: Arc<std::sync::Mutex<Option<String>>>,
    vcpu_thread: libc::pthread_t,
}

impl VerifyJob {
    /// Checks the chunks, recording a mismatch and kicking the vCPU thread.
    pub fn run(self) {
        // Background work: its wakeups must not preempt the vCPU thread,
        // and under a real-time parent (`chrt`) it must not starve the
        // kernel workers on its CPU either (a restore's memslot
        // registration waits for an SRCU grace period that runs on
        // them: measured 0.6–0.9 s when this thread kept SCHED_FIFO).
        let _batch = crate::snapshot::diff::BatchPolicy::enter();
        if let Err(e) = crate::snapshot::memory_file::verify(&self.file, &self.chunks) {
            *self.failed.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(crate::error_chain(&e));
            // SAFETY: the vCPU thread outlives this one: `Machine::drive`
            // joins it before returning.
            unsafe { libc::pthread_kill(self.vcpu_thread, crate::control::kick_signal()) };
        }
    }
}

impl Verifier {
    /// Starts checking `chunks` of `file` on the thread `hand_over` gives
    /// the job to and whose handle it returns; that thread must call
    /// [`VerifyJob::run`]. A restore hands it to its KVM thread, which
    /// exists already, sparing a thread start before the guest runs. The
    /// calling thread is the vCPU thread to kick on a mismatch.
    #[must_use]
    pub fn start_on(file: std::fs::File, chunks: Vec<crate::snapshot::format::Chunk>, hand_over: impl FnOnce(VerifyJob) -> std::thread::JoinHandle<()>) -> Self {
        crate::control::install_kick_handler();
        let failed = Arc::new(std::sync::Mutex::new(None));
        // SAFETY: pthread_self has no preconditions.
        let vcpu_thread = unsafe { libc::pthread_self() };
        let thread = hand_over(VerifyJob { file, chunks, failed: Arc::clone(&failed), vcpu_thread });
        Verifier { failed, thread }
    }

    fn failure(&self) -> Option<String> {
        self.failed.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Waits for the check to end; its failure, if any.
    fn finish(self) -> Option<String> {
        let _ = self.thread.join();
        self.failed.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take()
    }
}

impl Machine {
    /// Runs until the end and builds the outcome.
    ///
    /// # Errors
    /// [`VmmError`] when the guest dies or KVM fails.
    pub fn drive(mut self, control: Option<Arc<VmControl>>) -> Result<RunOutcome, VmmError> {
        let mut reports = Vec::new();
        let mut bad_messages = 0u64;
        let mut dropped_reports = 0u64;
        let mut timings = BootTimings { vcpu_start_us: timeline::since_start_us(), ..Default::default() };
        if let Some(c) = &control {
            c.vcpu_started();
            if self.guest_idle.is_some() {
                c.guest_idled();
            }
        }
        let result = loop {
            if let Some(c) = &control {
                match c.next_work() {
                    Work::Run => {}
                    Work::Stop => break Ok(self.guest_idle.unwrap_or(0)),
                    Work::Jobs(jobs) => {
                        for job in jobs {
                            job.run(&mut self);
                        }
                        continue;
                    }
                }
            } else if let Some(status) = self.guest_idle {
                // Restored from an idle snapshot without a socket: nothing to do.
                break Ok(status);
            }
            if let Some(why) = self.verifier.as_ref().and_then(Verifier::failure) {
                break Err(crate::snapshot::SnapshotError::Corrupt(why).into());
            }
            let exit = match self.vcpu.run() {
                Ok(exit) => exit,
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                Err(e) => break Err(VmmError::Run(e)),
            };
            if timings.first_exit_us.is_none() {
                timings.first_exit_us = Some(timeline::since_start_us());
            }
            match exit {
                VcpuExit::IoOut(port, data) => match self.devices.port_out(port, data) {
                    IoAction::Continue => {}
                    IoAction::Exit(status) => break Ok(status),
                    IoAction::Swap(gpa) => self.devices.swap.handle(self.vm.ram().memory(), gpa),
                    IoAction::Message(gpa) => {
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
                        // Bounded: a guest that reports without end cannot
                        // grow the VMM's memory without end.
                        if reports.len() < MAX_REPORTS {
                            reports.push(TimedReport { at_us, report });
                        } else {
                            dropped_reports += 1;
                        }
                        if matches!(report, Report::Ready { .. }) && !self.translation.at_ready.is_empty() {
                            crate::translate::ready::at_ready(&mut self);
                        }
                        if let (Report::Workload { event, a, b }, Some(probe)) = (report, self.translation.probe.as_mut()) {
                            probe.on_event(event, a, b, self.vm.kvm(), self.vm.fd(), &self.vcpu);
                        }
                        if let (Report::Workload { event, a, b }, Some(rounds), Some(tracker)) = (report, self.dirty_rounds.as_mut(), self.tracker.as_mut()) {
                            // The guest waits in this port write while the VMM harvests.
                            if let Err(e) = rounds.on_event(event, a, b, tracker, self.vm.fd(), self.vm.ram()) {
                                break Err(e.into());
                            }
                        }
                        if let Report::Idle { status } = report {
                            self.devices.flush();
                            timings.end_us = at_us;
                            match &control {
                                // The guest is never entered again; the loop
                                // serves jobs until shutdown.
                                Some(c) => {
                                    self.guest_idle = Some(status);
                                    c.guest_idled();
                                }
                                None => break Ok(status),
                            }
                        }
                    }
                },
                VcpuExit::IoIn(port, data) => self.devices.port_in(port, data),
                VcpuExit::MmioRead(addr, data) => {
                    self.devices.mmio_read(addr, data);
                    if self.devices.take_idle_hint() {
                        // A polling guest with nothing to do: wait for host
                        // work (a job, e.g. a new balloon target) a little.
                        match &control {
                            Some(c) => c.idle_wait(std::time::Duration::from_millis(1)),
                            None => std::thread::sleep(std::time::Duration::from_millis(1)),
                        }
                    }
                }
                VcpuExit::MmioWrite(addr, data) => self.devices.mmio_write(addr, data, self.vm.ram()),
                VcpuExit::Shutdown => break Err(VmmError::TripleFault(Box::new(RegisterDump::read(&self.vcpu)))),
                VcpuExit::Hlt => break Err(VmmError::Halted(Box::new(RegisterDump::read(&self.vcpu)))),
                VcpuExit::InternalError => {
                    // An instruction KVM's emulator gives up on (PVM: `int3` at CPL0).
                    if crate::unemulated::finish(&self.vcpu, self.vm.ram()) {
                        continue;
                    }
                    break Err(VmmError::GuestFailed {
                        what: "internal error: instruction emulation failed".into(),
                        regs: Box::new(RegisterDump::read(&self.vcpu)),
                    });
                }
                VcpuExit::FailEntry(reason, cpu) => {
                    break Err(VmmError::GuestFailed {
                        what: format!("entry failed, hardware reason {reason:#x} on cpu {cpu}"),
                        regs: Box::new(RegisterDump::read(&self.vcpu)),
                    });
                }
                VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL) => {
                    if let Some(t) = self.tracker.as_mut() {
                        if let Err(e) = t.on_ring_full(self.vm.fd()) {
                            break Err(e.into());
                        }
                    }
                }
                other => {
                    log::warn!("unexpected vCPU exit {other:?}; resuming");
                }
            }
        };
        self.devices.flush();
        if timings.end_us == 0.0 {
            timings.end_us = timeline::since_start_us();
        }
        if let Some(c) = &control {
            c.exited();
        }
        if dropped_reports > 0 {
            log::warn!("the guest sent {dropped_reports} reports beyond the {MAX_REPORTS} kept");
        }
        let unverified = self.verifier.take().and_then(Verifier::finish);
        let exit_status = result?;
        if let Some(why) = unverified {
            return Err(crate::snapshot::SnapshotError::Corrupt(why).into());
        }
        let dirty = self.dirty_rounds.as_mut().map(|d| {
            d.finish();
            d.report(self.tracker.as_ref().map_or(crate::dirty::DirtyMode::Bitmap, DirtyTracker::mode))
        });
        let kvm_stats = kvm_stats::collect(self.vm.kvm(), self.vm.fd(), &[&self.vcpu]);
        let kvm_mappings = report::kvm_mappings(&kvm_stats, self.mode);
        let memory = report::regions(self.vm.ram())?;
        // Last, so that it counts everything the run allocated.
        let vmm_memory = report::process_memory(self.vm.ram());
        Ok(RunOutcome {
            exit_status,
            reports,
            bad_messages,
            memory,
            kvm_mappings,
            kvm_stats,
            vmm_memory,
            dirty,
            balloon: self.devices.balloon.as_ref().map(|b| b.device.info()),
            timings,
            unhandled: self.devices.unhandled().clone(),
            swap_device: self.devices.swap.stats(),
            translation_mode: self.mode,
            translations: std::mem::take(&mut self.translation.results),
            translation_probe: self.translation.probe.take().map(|p| p.records),
            boot_phases: timeline::marks(),
            config: self.config.clone(),
        })
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
