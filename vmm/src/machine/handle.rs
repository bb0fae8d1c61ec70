//! The one way other threads reach a running machine.
//!
//! A [`MachineHandle`] is made before the machine (the control socket is
//! up before the guest boots), shared by every thread that asks something
//! of the VM, and given to [`crate::vmm::run`] or [`crate::restore::restore`],
//! whose run loop serves it. Its methods are the VM's whole control
//! surface: state, pause, resume and shutdown, snapshots, the balloon, the
//! swap device's counters, translations and dirty logging. Each that needs
//! the vCPU or a device runs as a job on the vCPU thread between two
//! `KVM_RUN`s; callers never see the machine's parts.
//!
//! The handle also holds what belongs to one VM's control plane rather
//! than to its run loop: the one-snapshot-at-a-time lock and the previous
//! diff's page buffers, kept between snapshots so they can be warmed while
//! the guest runs.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::control::{JobResult, VmControl, VmState};
use crate::snapshot::format::SnapshotKind;
use crate::snapshot::{SnapshotError, Spares};

use super::Machine;

/// How long `balloon stats` waits for the guest to refill its buffer.
const STATS_TIMEOUT: Duration = Duration::from_secs(5);

/// Control of one VM, shared by the threads that ask things of it.
#[derive(Debug, Default)]
pub struct MachineHandle {
    control: Arc<VmControl<Machine>>,
    /// One snapshot at a time, capture through persist (a second one must
    /// not chain to a first that may still fail); holds the previous
    /// diff's buffers.
    snapshots: Mutex<Spares>,
    /// The destination of the snapshot being taken, if one is.
    snapshot_in_progress: Mutex<Option<PathBuf>>,
    /// The signal that ended the VM, if one did ([`terminate`](Self::terminate)).
    terminated_by: Mutex<Option<i32>>,
    /// The last migration's progress, as its source publishes it
    /// (`crate::migration::source`), and whether one is under way.
    migration: Mutex<MigrationSlot>,
}

/// See [`MachineHandle::migration_status`].
#[derive(Debug, Default)]
struct MigrationSlot {
    active: bool,
    status: Option<serde_json::Value>,
}

fn no_balloon() -> String {
    "this VM has no balloon (start it with --balloon SIZE)".into()
}

fn to_json<T: serde::Serialize>(value: T) -> JobResult {
    serde_json::to_value(value).map_err(|e| e.to_string())
}

impl MachineHandle {
    /// A handle for a VM that is yet to run.
    #[must_use]
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// The run control the VM's vCPU thread serves (for the run loop and
    /// the restore's image check).
    #[must_use]
    pub fn control(&self) -> &Arc<VmControl<Machine>> {
        &self.control
    }

    /// The VM's state.
    #[must_use]
    pub fn state(&self) -> VmState {
        self.control.state()
    }

    /// Pauses the vCPU; the state reached.
    pub fn pause(&self) -> VmState {
        self.control.pause()
    }

    /// Resumes the vCPU; the state reached.
    pub fn resume(&self) -> VmState {
        self.control.resume()
    }

    /// Ends the VM and waits until it has.
    pub fn shutdown(&self) {
        self.control.shutdown();
    }

    /// Ends the VM because the process got `signal` (SIGTERM, SIGINT), and
    /// waits until it has; a snapshot being taken is abandoned and its
    /// temporary directory removed.
    pub fn terminate(&self, signal: i32) {
        *self.terminated_by.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(signal);
        self.control.shutdown();
        if let Some(dir) = self.snapshot_in_progress.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take() {
            let tmp = crate::snapshot::temp_dir_of(&dir);
            if tmp.exists() {
                match std::fs::remove_dir_all(&tmp) {
                    Ok(()) => log::warn!("removed {}, a snapshot the signal interrupted", tmp.display()),
                    Err(e) => log::warn!("cannot remove {}, a snapshot the signal interrupted: {e}", tmp.display()),
                }
            }
        }
    }

    /// The signal that ended the VM, if one did.
    #[must_use]
    pub fn terminated_by(&self) -> Option<i32> {
        *self.terminated_by.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The swap device's counters.
    ///
    /// # Errors
    /// The VM has exited.
    pub fn swap(&self) -> JobResult {
        self.control.call(Box::new(|m| to_json(m.devices.swap.stats())))
    }

    /// Explains how `gva` translates under vCPU 0's current CR3.
    ///
    /// # Errors
    /// Why it does not translate, or the VM has exited.
    pub fn translate(&self, gva: u64) -> JobResult {
        self.control.call(Box::new(move |m| crate::translate::ready::explain_json(m.vm.ram(), m.vcpu(0)?, m.mode, gva)))
    }

    /// Every mapping under vCPU 0's current CR3.
    ///
    /// # Errors
    /// Why the tables cannot be listed, or the VM has exited.
    pub fn translation_map(&self) -> JobResult {
        self.control.call(Box::new(|m| crate::translate::ready::map_json(m.vm.ram(), m.vcpu(0)?)))
    }

    /// Switches dirty logging on or off, for memslot `slot` or all.
    ///
    /// # Errors
    /// Tracking is not prepared, KVM refused, or the VM has exited.
    pub fn dirty_log(&self, on: bool, slot: Option<u32>) -> JobResult {
        if self.migration_active() {
            return Err("a migration is under way; its dirty log is not to be switched".into());
        }
        self.control.call(Box::new(move |m| {
            let tracker = m.tracker.as_mut().ok_or("dirty tracking is not prepared for this VM")?;
            let (vm, ram) = (m.vm.fd(), m.vm.ram());
            let result = match (slot, on) {
                (Some(s), _) => tracker.set_slot_logging(vm, ram, s, on),
                (None, true) => tracker.start(vm, ram),
                (None, false) => tracker.stop(vm, ram),
            };
            result.map_err(|e| crate::error_chain(&e))?;
            let slots: Vec<serde_json::Value> = tracker
                .slot_logging()
                .into_iter()
                .map(|(info, logging)| serde_json::json!({ "slot": info.slot, "first_pfn": info.first_pfn, "pages": info.pages, "logging": logging }))
                .collect();
            Ok(serde_json::json!({ "mode": tracker.mode(), "slots": slots }))
        }))
    }

    /// A new balloon target; the guest is told by a configuration-change
    /// interrupt.
    ///
    /// # Errors
    /// No balloon, a target that is not a page multiple within guest RAM,
    /// or the VM has exited.
    pub fn balloon_set(&self, bytes: u64) -> JobResult {
        self.control.call(Box::new(move |m| {
            let ram = m.vm.ram().size();
            if !bytes.is_multiple_of(memvisor_abi::layout::PAGE_SIZE) || bytes > ram {
                return Err(format!("balloon target {bytes} must be a multiple of 4096 and at most the guest memory ({ram})"));
            }
            let b = m.devices.balloon.as_mut().ok_or_else(no_balloon)?;
            if b.device.set_target(bytes) {
                b.config_changed();
            }
            to_json(b.device.info())
        }))
    }

    /// The balloon's target, size, reclaimed and pending bytes, metrics.
    ///
    /// # Errors
    /// No balloon, or the VM has exited.
    pub fn balloon_info(&self) -> JobResult {
        self.control.call(Box::new(|m| to_json(m.devices.balloon.as_ref().ok_or_else(no_balloon)?.device.info())))
    }

    /// Hands the guest its statistics buffer back and waits until it
    /// returns it refilled.
    ///
    /// # Errors
    /// No balloon, no stats queue, a guest that does not answer in time,
    /// or the VM has exited.
    pub fn balloon_stats(&self) -> JobResult {
        let before = self.control.call(Box::new(|m| {
            let ram = m.vm.ram();
            let b = m.devices.balloon.as_mut().ok_or_else(no_balloon)?;
            let updates = b.device.metrics.stats_updates;
            if !b.device.request_stats() {
                return Err("the guest's driver has not set up a statistics queue".into());
            }
            b.flush_pending(ram);
            Ok(serde_json::json!(updates))
        }))?;
        let deadline = Instant::now() + STATS_TIMEOUT;
        loop {
            let before = before.clone();
            let now = self.control.call(Box::new(move |m| {
                let b = m.devices.balloon.as_ref().ok_or_else(no_balloon)?;
                if serde_json::json!(b.device.metrics.stats_updates) == before {
                    return Ok(serde_json::Value::Null);
                }
                to_json(b.device.stats())
            }))?;
            if !now.is_null() {
                return Ok(now);
            }
            if Instant::now() > deadline {
                return Err("the guest did not refill its statistics buffer within 5 s".into());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Takes a snapshot into `dir`: captured on the vCPU thread (the vCPU
    /// stopped only for that), then made durable on the calling thread
    /// while the guest runs on. A diff stops the vCPU twice: once to
    /// harvest the dirty log, then, after this thread has copied those
    /// pages with the guest running, to recopy the pages written meanwhile
    /// and save the vCPU state (`crate::snapshot::diff`).
    ///
    /// # Errors
    /// Why the snapshot could not be taken or written, as text.
    pub fn snapshot(&self, kind: SnapshotKind, dir: PathBuf) -> JobResult {
        let mut spares = self.snapshots.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let absolute = std::path::absolute(&dir).unwrap_or_else(|_| dir.clone());
        *self.snapshot_in_progress.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(absolute);
        let result = self.snapshot_locked(&mut spares, kind, dir);
        *self.snapshot_in_progress.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        result
    }

    fn snapshot_locked(&self, spares: &mut Spares, kind: SnapshotKind, dir: PathBuf) -> JobResult {
        // This thread's work is background work to the guest: when the
        // vCPU thread wakes it at the end of a stop it must not take the
        // vCPU's CPU before the vCPU is back in the guest.
        let _batch = crate::snapshot::diff::BatchPolicy::enter();
        let captured = match kind {
            SnapshotKind::Full => self.on_vcpu(move |m| m.capture_snapshot(&dir, kind)),
            SnapshotKind::Diff => {
                // Only a diff uses the previous diff's buffers: warm them
                // here, with the guest running, not in the stop.
                let mut kept = std::mem::take(spares);
                for buf in [kept.pages.as_mut(), kept.late.as_mut()].into_iter().flatten() {
                    crate::snapshot::warm(buf);
                }
                self.on_vcpu(move |m| {
                    m.chain.keep(kept);
                    m.begin_diff(&dir)
                })
                .and_then(|mut pre| {
                    let lease = self.control.lease_ram().ok_or("the VM has exited")?;
                    // SAFETY: the plan comes from this VM's first stop, and
                    // the lease keeps its RAM mapped until it is dropped
                    // after the copy (VmControl::exited waits for it).
                    unsafe { pre.copy() };
                    drop(lease);
                    self.on_vcpu(move |m| m.finish_diff(pre))
                })
            }
        };
        // A failure before the final stop's capture leaves any harvested
        // pages in the chain's `pending` list: the next diff includes them.
        let captured = captured?;
        match captured.persist() {
            Ok((info, next)) => {
                *spares = next;
                to_json(info)
            }
            Err(e) => {
                // Its dirty pages were harvested and are not on disk: the
                // next snapshot must be a full one.
                let _ = self.control.call(Box::new(|m| {
                    m.chain.last = None;
                    Ok(serde_json::Value::Null)
                }));
                Err(crate::error_chain(&e))
            }
        }
    }

    /// Marks a migration of this VM as under way, with its first `status`;
    /// false when one already is.
    pub fn migration_begin(&self, status: serde_json::Value) -> bool {
        let mut m = self.migration.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if m.active {
            return false;
        }
        *m = MigrationSlot { active: true, status: Some(status) };
        true
    }

    /// Publishes a migration's progress; `done` ends it.
    pub fn migration_publish(&self, status: serde_json::Value, done: bool) {
        let mut m = self.migration.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        m.status = Some(status);
        if done {
            m.active = false;
        }
    }

    /// The progress of the migration under way, or of the last one.
    #[must_use]
    pub fn migration_status(&self) -> Option<serde_json::Value> {
        self.migration.lock().unwrap_or_else(std::sync::PoisonError::into_inner).status.clone()
    }

    fn migration_active(&self) -> bool {
        self.migration.lock().unwrap_or_else(std::sync::PoisonError::into_inner).active
    }

    /// Runs `f` holding the snapshot lock: a migration's source does, so
    /// that no snapshot harvests or restarts the dirty log under it.
    pub fn without_snapshots<T>(&self, f: impl FnOnce() -> T) -> T {
        let _guard = self.snapshots.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        f()
    }

    /// Runs `job` on the vCPU thread (the vCPU stopped) and hands back what
    /// it returned.
    fn on_vcpu<T: Send + 'static>(&self, job: impl FnOnce(&mut Machine) -> Result<T, SnapshotError> + Send + 'static) -> Result<T, String> {
        let slot: Arc<Mutex<Option<T>>> = Arc::default();
        let out = Arc::clone(&slot);
        self.control.call(Box::new(move |m| {
            let value = job(m).map_err(|e| crate::error_chain(&e))?;
            *out.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(value);
            Ok(serde_json::Value::Null)
        }))?;
        let value = slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        value.ok_or_else(|| "the snapshot was not captured".into())
    }
}
