//! A built VM and its run loop.
//!
//! A [`Machine`] is the VM, its vCPUs, devices, dirty tracker and snapshot
//! chain, however it came to be (booted by [`crate::vmm::run`] or restored
//! by [`crate::restore::restore`]). [`Machine::drive`] runs one thread per
//! vCPU (the calling thread waits, then reports) until the guest exits, idles and is
//! shut down, or dies. While it runs, the machine is the VM's shared state
//! in its [`VmControl`]: a vCPU thread locks it to handle an exit, and a
//! job from another thread gets it with every vCPU parked. Guest messages
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
pub mod smp;
pub mod vcpu_loop;
pub mod verifier;

use kvm_ioctls::VcpuFd;

use crate::config::VmConfig;
use crate::control::VmControl;
use crate::devices::Devices;
use crate::dirty::DirtyTracker;
use crate::host::TranslationMode;
use crate::kvm_stats;
use crate::memory::report;
use crate::snapshot::SnapshotChain;
use crate::timeline;
use crate::vm::Vm;

pub use error::VmmError;
pub use handle::MachineHandle;
pub use observer::{GuestContext, RunObserver};
pub use outcome::{BootTimings, RunOutcome, TimedReport};
pub use verifier::{Verifier, VerifyJob};

/// A VM ready to run.
#[derive(Debug)]
pub struct Machine {
    /// The configuration it runs with.
    pub config: VmConfig,
    /// How the host translates guest-physical addresses.
    pub mode: TranslationMode,
    /// The VM and its memory.
    pub vm: Vm,
    /// The vCPUs, by index: each is here while its thread is parked, so all
    /// of them while a job runs; a running vCPU is held by its thread.
    pub vcpus: Vec<Option<VcpuFd>>,
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
    /// Application processors the guest asked to start, by index
    /// ([`smp`]); each vCPU's thread applies its own.
    pub ap_starts: Vec<Option<smp::ApState>>,
    /// Which vCPUs have been started (vCPU 0 from the first); a restored
    /// VM's are all running already.
    pub started_aps: Vec<bool>,
    /// The guest's reports and the boot milestones.
    log: vcpu_loop::Reports,
    /// How the run ended, once a vCPU thread ended it.
    end: Option<Result<u32, VmmError>>,
}

impl Drop for Machine {
    fn drop(&mut self) {
        // The balloon's release thread holds guest RAM by address: it is
        // drained and joined here, before `vm` (declared earlier, so
        // dropped earlier) unmaps the RAM.
        self.devices.balloon = None;
    }
}

impl Machine {
    /// A machine of `vm` with `vcpus` (index order; vCPU 0 first), ready to
    /// [`drive`](Self::drive).
    #[must_use]
    #[allow(clippy::too_many_arguments)]
    pub fn new(config: VmConfig, mode: TranslationMode, vm: Vm, vcpus: Vec<VcpuFd>, devices: Devices, tracker: Option<DirtyTracker>, chain: SnapshotChain, stay_up: bool) -> Self {
        let n = vcpus.len();
        Machine {
            config,
            mode,
            vm,
            vcpus: vcpus.into_iter().map(Some).collect(),
            devices,
            tracker,
            chain,
            guest_idle: None,
            stay_up,
            verifier: None,
            observers: Vec::new(),
            ap_starts: (0..n).map(|_| None).collect(),
            started_aps: (0..n).map(|i| i == 0).collect(),
            log: vcpu_loop::Reports::default(),
            end: None,
        }
    }

    /// vCPU `index`, parked (every vCPU is while a job runs).
    ///
    /// # Errors
    /// A message when there is no such vCPU.
    pub fn vcpu(&self, index: usize) -> Result<&VcpuFd, String> {
        self.vcpus.get(index).and_then(Option::as_ref).ok_or_else(|| format!("no parked vCPU {index}"))
    }

    /// Every vCPU, when all are parked (as in a job), in index order.
    #[must_use]
    pub fn parked_vcpus(&self) -> Vec<&VcpuFd> {
        self.vcpus.iter().flatten().collect()
    }

    /// Waits until no device changes guest memory behind the vCPUs' backs
    /// (the balloon's queued releases, `devices::virtio::balloon::worker`).
    /// Call it with every vCPU parked before reading guest memory for a
    /// snapshot or a migration: then the pages the balloon says it
    /// released are released, and nothing else changes until a vCPU runs.
    pub fn settle_devices(&self) {
        if let Some(b) = &self.devices.balloon {
            b.device.finish_releases();
        }
    }

    /// Ends the run with `result` unless it has ended already.
    fn end_with(&mut self, result: Result<u32, VmmError>) {
        if self.end.is_none() {
            self.end = Some(result);
        }
    }

    /// Runs until the end and builds the outcome. `control` is the VM's
    /// (its [`MachineHandle`]'s); one thread runs each vCPU while this one
    /// waits, under the VMM threads' seccomp filter once they exist.
    ///
    /// # Errors
    /// [`VmmError`] when the guest dies or KVM fails.
    pub fn drive(mut self, control: &VmControl<Machine>) -> Result<RunOutcome, VmmError> {
        self.log.timings.vcpu_start_us = timeline::since_start_us();
        let exits: Vec<vcpu_loop::ImmediateExit> = self.vcpus.iter_mut().flatten().map(vcpu_loop::ImmediateExit::of).collect();
        let idle = self.guest_idle;
        let stay_up = self.stay_up;
        if let (Some(status), false) = (idle, stay_up) {
            // Restored from an idle snapshot with nobody to serve.
            self.end_with(Ok(status));
        }
        control.install(self, exits.len());
        if idle.is_some() {
            if stay_up {
                control.guest_idled();
            } else {
                control.stop();
            }
        }
        // Before any vCPU thread installs its seccomp filter (which does
        // not allow changing signal handlers).
        crate::control::install_kick_handler();
        std::thread::scope(|s| {
            // Every vCPU on a thread of its own, vCPU 0 included: each
            // installs the vCPU threads' seccomp filter, and this thread,
            // which only waits from here on and then reports, the VMM
            // threads' one (`crate::seccomp`), once the vCPU threads exist
            // (a thread inherits its creator's filter).
            for (index, exit) in exits.into_iter().enumerate() {
                let spawned = std::thread::Builder::new().name(format!("vcpu{index}")).spawn_scoped(s, move || vcpu_loop::run(index, exit, control));
                if let Err(e) = spawned {
                    log::error!("cannot start the thread of vCPU {index}: {e}");
                    control.abort(format!("cannot start the thread of vCPU {index}"));
                }
            }
            crate::seccomp::apply_or_abort(crate::seccomp::ThreadKind::Vmm);
        });
        let Some(mut m) = control.take() else {
            return Err(VmmError::KvmThread("ended without its machine"));
        };
        m.devices.flush();
        if m.log.timings.end_us == 0.0 {
            m.log.timings.end_us = timeline::since_start_us();
        }
        control.exited();
        if m.log.dropped > 0 {
            log::warn!("the guest sent {} more reports than the first {} and the last {} kept", m.log.dropped, vcpu_loop::FIRST_REPORTS, vcpu_loop::LAST_REPORTS);
        }
        let unverified = m.verifier.take().and_then(Verifier::finish);
        let exit_status = m.end.take().unwrap_or(Ok(0))?;
        if let Some(why) = unverified {
            return Err(crate::snapshot::SnapshotError::Corrupt(why).into());
        }
        m.outcome(exit_status)
    }

    /// The outcome of a run that ended with `exit_status`.
    fn outcome(mut self, exit_status: u32) -> Result<RunOutcome, VmmError> {
        // The report counts releases made, not queued.
        self.settle_devices();
        let fds = self.parked_vcpus();
        let kvm_stats = kvm_stats::collect(self.vm.kvm(), self.vm.fd(), &fds);
        let kvm_mappings = report::kvm_mappings(&kvm_stats, self.mode);
        let tsc_khz = fds.first().and_then(|v| v.get_tsc_khz().ok()).map_or(0, u64::from);
        let memory = report::regions(self.vm.ram())?;
        let log = std::mem::take(&mut self.log);
        let (bad_messages, timings) = (log.bad, log.timings.clone());
        let mut outcome = RunOutcome {
            exit_status,
            reports: log.into_kept(),
            bad_messages,
            memory,
            kvm_mappings,
            kvm_stats,
            vmm_memory: report::ProcessMemory::default(),
            dirty: None,
            balloon: self.devices.balloon.as_ref().map(|b| b.device.info()),
            timings,
            unhandled: self.devices.unhandled().clone(),
            swap_device: self.devices.swap.stats(),
            translation_mode: self.mode,
            tsc_khz,
            translations: Vec::new(),
            translation_probe: None,
            boot_phases: timeline::take_marks(),
            config: self.config.clone(),
        };
        let observers = std::mem::take(&mut self.observers);
        if let Some(Some(vcpu)) = self.vcpus.first() {
            let mut guest = GuestContext { vm: &self.vm, vcpu, tracker: self.tracker.as_mut(), mode: self.mode };
            for o in observers {
                o.finish(&mut guest, &mut outcome);
            }
        }
        // Last, so that it counts everything the run allocated.
        outcome.vmm_memory = report::process_memory(self.vm.ram());
        Ok(outcome)
    }

    /// Captures a snapshot (every vCPU parked); the caller makes it durable
    /// with [`crate::snapshot::Captured::persist`], after the vCPUs resumed.
    ///
    /// # Errors
    /// [`crate::snapshot::SnapshotError`].
    pub fn capture_snapshot(&mut self, dir: &std::path::Path, kind: crate::snapshot::format::SnapshotKind) -> Result<crate::snapshot::Captured, crate::snapshot::SnapshotError> {
        self.with_live(|live, tracker, chain| crate::snapshot::capture(live, tracker, chain, dir, kind))
    }

    /// A diff's first stop ([`crate::snapshot::diff::begin`]): harvests the
    /// dirty log; the caller pre-copies the pages while the vCPUs run, then
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
        self.settle_devices();
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
        let vcpus: Vec<&VcpuFd> = self.vcpus.iter().flatten().collect();
        if vcpus.len() != self.vcpus.len() {
            return Err(crate::snapshot::SnapshotError::Unsupported("a vCPU is running; snapshots are taken with every vCPU parked".into()));
        }
        let tracker = self.tracker.as_mut().ok_or(crate::snapshot::SnapshotError::NoBase)?;
        let live = crate::snapshot::Live {
            kvm: self.vm.kvm(),
            vm_fd: self.vm.fd(),
            vcpus,
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
