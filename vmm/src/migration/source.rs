//! The source side of a migration (`vmm ctl SOCK migrate ADDR`), run on
//! the control-socket thread that received the request.
//!
//! It reaches the VM only through its [`MachineHandle`]: each time it
//! needs the vCPU stopped (to start the dirty log, to harvest it, to save
//! the vCPU state) it queues a job on the vCPU thread; it reads guest
//! memory itself, with the guest running, under a [`crate::control::RamLease`]
//! that keeps RAM mapped. It holds the handle's snapshot lock throughout,
//! so no snapshot harvests or restarts the dirty log under it, and the
//! control socket refuses `dirty-log` switches meanwhile.
//!
//! Failure before the hand-over (the destination refuses, is killed, the
//! link goes silent for the link timeout) leaves the guest running here,
//! untouched: it is resumed if the migration had stopped it, the dirty log
//! is switched off again if it was off before, and the request answers
//! with the error. Failure after the Commit frame is on its way cannot be
//! told apart from a destination that runs the guest and lost its answer:
//! the guest stays stopped here and the error says so.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::convergence::{Convergence, Decision, Round};
use super::pages::{RamMap, Sender};
use super::status::{Phase, Status};
use super::stream::{self, Kind, PAGE};
use super::transport::Conn;
use super::{MigrateRequest, MigrationError};
use crate::config::VmConfig;
use crate::control::VmState;
use crate::machine::{Machine, MachineHandle};
use crate::snapshot::{SavedState, memory_file};

/// What the source tells the destination first.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    /// The VM's configuration (the destination keeps its own host side:
    /// backing, NUMA, prefault, mlock, control socket, dirty mode).
    pub config: VmConfig,
    /// The RAM layout: (guest-physical start, bytes) per region.
    pub regions: Vec<(u64, u64)>,
    /// The page size the stream counts in.
    pub page_size: u64,
}

/// The destination's answer to [`Hello`].
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Accepted {
    /// Whether it can take post-copy (its guest RAM is private anonymous).
    pub postcopy: bool,
}

/// Interval of the auto-converge throttle: in each, the vCPU is kept
/// stopped for the throttle's share (QEMU's `CPU_THROTTLE_TIMESLICE_NS`
/// is 10 ms too).
const THROTTLE_SLICE: Duration = Duration::from_millis(10);

/// How often the status is republished while a round is sent.
const PUBLISH_EVERY: Duration = Duration::from_millis(50);

/// What the first stop hands back.
struct Setup {
    config: VmConfig,
    regions: Vec<(u64, u64)>,
    runs: Vec<(u64, u64)>,
    cpuid: Vec<kvm_bindings::kvm_cpuid_entry2>,
    was_logging: bool,
    ram: RamMap,
}

/// What the final stop hands back.
struct Final {
    runs: Vec<(u64, u64)>,
    state: SavedState,
}

/// The host's time-stamp counter.
fn rdtsc() -> u64 {
    // SAFETY: rdtsc only reads the counter; every x86-64 CPU has it.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Runs `job` on the vCPU thread and returns what it returned.
fn on_vcpu<T: Send + 'static>(handle: &MachineHandle, job: impl FnOnce(&mut Machine) -> Result<T, String> + Send + 'static) -> Result<T, MigrationError> {
    let slot: Arc<Mutex<Option<T>>> = Arc::default();
    let out = Arc::clone(&slot);
    handle
        .control()
        .call(Box::new(move |m| {
            let value = job(m)?;
            *out.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(value);
            Ok(serde_json::Value::Null)
        }))
        .map_err(MigrationError::Vcpu)?;
    let value = slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
    value.ok_or_else(|| MigrationError::Vcpu("the vCPU thread did not answer".into()))
}

/// Runs of RAM the balloon has released: nothing to send.
fn released(m: &Machine) -> Vec<(u64, u64)> {
    m.devices.balloon.as_ref().map(|b| b.device.released_ram_ranges()).unwrap_or_default()
}

/// The first stop: checks the VM can migrate, (re)starts the dirty log
/// and lists the pages to send in round 0 (every page present, less the
/// balloon's).
fn setup(m: &mut Machine) -> Result<Setup, String> {
    let swapped = m.devices.swap.slots_used();
    if swapped > 0 && m.guest_idle.is_none() {
        return Err(format!("the guest has {swapped} pages in the swap device, whose store is not migrated; migrate before the paging workload swaps or after it ends"));
    }
    if let Some(crate::workload::Workload::Dirty(d)) = m.config.workload
        && d.log
        && m.guest_idle.is_none()
    {
        return Err("the dirty workload's round checks harvest the dirty log migration needs; migrate after it ends, or run it with log=0".into());
    }
    m.settle_devices();
    let skip = released(m);
    let tracker = m.tracker.as_mut().ok_or("dirty tracking is not prepared for this VM")?;
    let was_logging = tracker.logging() && tracker.logging_everywhere();
    tracker.start(m.vm.fd(), m.vm.ram()).map_err(|e| crate::error_chain(&e))?;
    let present = memory_file::pages_to_save(m.vm.ram()).map_err(|e| crate::error_chain(&e))?;
    // vCPU 0's CPUID creates the destination's vCPUs; each vCPU's own comes
    // with its state.
    let cpuid = m.vcpu(0)?.get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES).map_err(|e| format!("KVM_GET_CPUID2 failed: {e}"))?;
    Ok(Setup {
        config: m.config.clone(),
        regions: m.vm.ram().regions().iter().map(|r| (r.range.start.0, r.range.size)).collect(),
        runs: memory_file::subtract(&present, &skip),
        cpuid: cpuid.as_slice().to_vec(),
        was_logging,
        ram: RamMap::of(m.vm.ram()),
    })
}

/// A harvest: the pages written since the last one, less the balloon's.
fn harvest(m: &mut Machine) -> Result<Vec<(u64, u64)>, String> {
    let skip = released(m);
    let tracker = m.tracker.as_mut().ok_or("dirty tracking is not prepared for this VM")?;
    let h = tracker.harvest(m.vm.fd(), m.vm.ram()).map_err(|e| crate::error_chain(&e))?;
    Ok(memory_file::subtract(&memory_file::ranges_to_runs(m.vm.ram(), h.all()), &skip))
}

/// The final stop (every vCPU parked): the last harvest and the state of
/// every vCPU.
fn finish(m: &mut Machine) -> Result<Final, String> {
    // Balloon releases still queued must be done before the released
    // ranges are read (they are not sent).
    m.settle_devices();
    let runs = harvest(m)?;
    let irqchip = m.vm.has_irqchip();
    let vcpus = m
        .parked_vcpus()
        .into_iter()
        .map(|v| crate::snapshot::vcpu_state::VcpuState::save(m.vm.kvm(), v, irqchip).map_err(|e| crate::error_chain(&e)))
        .collect::<Result<Vec<_>, _>>()?;
    if vcpus.len() != m.vcpus.len() {
        return Err("a vCPU was not parked at the final stop".into());
    }
    let chips = if irqchip { Some(crate::snapshot::irqchip::IrqchipState::save(m.vm.fd()).map_err(|e| crate::error_chain(&e))?) } else { None };
    let state = SavedState { vcpus, devices: m.devices.state(), irqchip: chips, guest_idle: m.guest_idle.is_some(), idle_status: m.guest_idle.unwrap_or(0) };
    Ok(Final { runs, state })
}

fn bytes_of(runs: &[(u64, u64)]) -> u64 {
    runs.iter().map(|r| r.1).sum()
}

/// The auto-converge throttle: a thread that keeps the vCPU stopped for
/// `percent` of every [`THROTTLE_SLICE`] by queueing a sleeping job.
struct Throttle<'a> {
    percent: &'a AtomicU8,
    stop: &'a AtomicBool,
}

impl Throttle<'_> {
    fn run(&self, handle: &MachineHandle) {
        while !self.stop.load(Ordering::Relaxed) {
            let p = u32::from(self.percent.load(Ordering::Relaxed).min(99));
            let held = THROTTLE_SLICE * p / 100;
            if p > 0 && handle.control().call(Box::new(move |_| {
                std::thread::sleep(held);
                Ok(serde_json::Value::Null)
            })).is_err()
            {
                return;
            }
            std::thread::sleep(THROTTLE_SLICE - held);
        }
    }
}

/// The migration under way.
struct Source<'a> {
    handle: &'a MachineHandle,
    status: Status,
    started: Instant,
    publish: bool,
}

impl Source<'_> {
    fn publish(&mut self, done: bool) {
        self.status.elapsed_ms = self.started.elapsed().as_secs_f64() * 1e3;
        if self.publish {
            self.handle.migration_publish(self.status.to_json(), done);
        }
    }

    /// Sends `runs` with the lease held, publishing progress as it goes.
    fn send(&mut self, sender: &mut Sender<Conn>, ram: &RamMap, runs: &[(u64, u64)]) -> Result<(), MigrationError> {
        let _lease = self.handle.control().lease_ram().ok_or_else(|| MigrationError::Vcpu("the VM has exited".into()))?;
        let total = bytes_of(runs);
        let mut done = 0;
        let mut published = Instant::now();
        // In pieces of 1 MiB, so progress shows even on a slow link.
        for piece in split(runs, 256 * PAGE) {
            sender.send_runs(ram, &piece)?;
            done += bytes_of(&piece);
            if published.elapsed() >= PUBLISH_EVERY {
                self.progress(sender, total - done);
                published = Instant::now();
            }
        }
        sender.flush()?;
        self.progress(sender, total - done);
        Ok(())
    }

    fn progress(&mut self, sender: &Sender<Conn>, remaining: u64) {
        self.status.bytes_sent = sender.sent_bytes;
        self.status.data_pages = sender.data_pages;
        self.status.zero_pages = sender.zero_pages;
        self.status.remaining_bytes = remaining;
        self.publish(false);
    }
}

/// `runs` cut into groups of about `bytes` each.
fn split(runs: &[(u64, u64)], bytes: u64) -> Vec<Vec<(u64, u64)>> {
    let mut out = vec![Vec::new()];
    let mut size = 0;
    for &(mut start, mut len) in runs {
        while len > 0 {
            let take = len.min(bytes - size);
            out.last_mut().expect("never empty").push((start, take));
            size += take;
            start += take;
            len -= take;
            if size == bytes {
                out.push(Vec::new());
                size = 0;
            }
        }
    }
    out.retain(|g| !g.is_empty());
    out
}

/// The union of two ascending lists of disjoint runs, ascending; runs that
/// touch merge.
fn union(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut all: Vec<(u64, u64)> = a.iter().chain(b).copied().collect();
    all.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(all.len());
    for (start, len) in all {
        match out.last_mut() {
            Some(last) if start <= last.0 + last.1 => last.1 = last.1.max(start + len - last.0),
            _ => out.push((start, len)),
        }
    }
    out
}

/// The destination's reason for giving up, if it sent one before it
/// closed the link (read for at most 200 ms).
fn peer_reason(reader: &mut Conn) -> Option<MigrationError> {
    reader.set_timeout(Some(Duration::from_millis(200))).ok()?;
    let mut buf = Vec::new();
    // Frames it sent earlier (Accept) come first.
    for _ in 0..4 {
        if stream::read_frame(reader, &mut buf).ok()? == Kind::Abort {
            let reason: String = stream::json(Kind::Abort, &buf).ok()?;
            return Some(MigrationError::PeerAborted { peer: "destination", reason });
        }
    }
    None
}

/// Reads the next frame, which must be `expected`; an Abort from the
/// destination is its error.
fn expect(conn: &mut Conn, buf: &mut Vec<u8>, expected: Kind) -> Result<(), MigrationError> {
    let kind = stream::read_frame(conn, buf)?;
    if kind == Kind::Abort {
        let reason: String = stream::json(kind, buf)?;
        return Err(MigrationError::PeerAborted { peer: "destination", reason });
    }
    if kind != expected {
        return Err(stream::StreamError::Unexpected { got: kind, expected: "the destination's answer" }.into());
    }
    Ok(())
}

/// Reads the destination's [`Kind::RoundAck`], which must name `round`.
fn expect_ack(conn: &mut Conn, buf: &mut Vec<u8>, round: u64) -> Result<(), MigrationError> {
    expect(conn, buf, Kind::RoundAck)?;
    let acked = stream::u64_payload(Kind::RoundAck, buf)?;
    if acked != round {
        return Err(stream::StreamError::Malformed { kind: Kind::RoundAck, why: format!("round {acked} acknowledged, {round} was sent") }.into());
    }
    Ok(())
}

/// Migrates the VM behind `handle` as `req` asks; returns the final
/// status. On success the caller ends the VM (the guest runs on the
/// destination now).
///
/// # Errors
/// Why it failed, as text that says where the guest is.
pub fn migrate(handle: &MachineHandle, req: &MigrateRequest) -> Result<serde_json::Value, String> {
    let status = Status::new(req.to.to_string(), 0, req.max_downtime.as_secs_f64() * 1e3, req.bandwidth, req.postcopy.to_string());
    if !handle.migration_begin(status.to_json()) {
        return Err("a migration of this VM is already under way".into());
    }
    let mut src = Source { handle, status, started: Instant::now(), publish: true };
    let result = handle.without_snapshots(|| run(&mut src, req));
    match result {
        Ok(()) => {
            src.status.phase = Phase::Completed;
            src.publish(true);
            Ok(src.status.to_json())
        }
        Err((e, committed)) => {
            let mut text = crate::error_chain(&e);
            if committed {
                text.push_str("; the guest was handed over and stays stopped here (it may run on the destination)");
            } else {
                text.push_str("; the guest keeps running here");
            }
            src.status.phase = Phase::Failed;
            src.status.error = Some(text.clone());
            src.publish(true);
            Err(format!("migration to {} failed: {text}", req.to))
        }
    }
}

/// The migration proper; the error says whether Commit had gone out.
fn run(src: &mut Source<'_>, req: &MigrateRequest) -> Result<(), (MigrationError, bool)> {
    let handle = src.handle;
    let before = handle.state();
    if before == VmState::Exited {
        return Err((MigrationError::Refused("the VM has exited".into()), false));
    }
    let connect = |what: String| move |source| MigrationError::Connect { what, source };
    let mut conn = Conn::connect(&req.to, req.link_timeout).map_err(connect(format!("cannot connect to {}", req.to))).map_err(|e| (e, false))?;
    conn.set_timeout(Some(req.link_timeout)).map_err(connect("cannot set the link timeout".into())).map_err(|e| (e, false))?;
    stream::exchange_preambles(&mut conn).map_err(|e| (e.into(), false))?;
    let setup = match on_vcpu(handle, setup) {
        Ok(s) => s,
        Err(e) => {
            // Tell the destination why, so it does not only see the link close.
            let _ = stream::write_json(&mut conn, Kind::Abort, &crate::error_chain(&e));
            return Err((e, false));
        }
    };
    let was_logging = setup.was_logging;
    let percent = AtomicU8::new(0);
    let stop = AtomicBool::new(false);
    let throttle = Throttle { percent: &percent, stop: &stop };
    let mut paused = false;
    let mut reader = match conn.try_clone() {
        Ok(r) => r,
        Err(source) => return Err((MigrationError::Connect { what: "cannot clone the connection".into(), source }, false)),
    };
    let result = std::thread::scope(|scope| {
        let mut throttling = None;
        let r = precopy(src, req, conn, &mut reader, setup, &mut paused, |pct| {
            percent.store(pct, Ordering::Relaxed);
            if throttling.is_none() {
                throttling = Some(scope.spawn(|| throttle.run(handle)));
            }
        });
        stop.store(true, Ordering::Relaxed);
        r
    });
    // A destination that gave up says why before it closes the link; a
    // write that failed on the closed link would only say "broken pipe".
    let result = result.map_err(|(e, committed)| match e {
        MigrationError::Stream(stream::StreamError::Io { .. } | stream::StreamError::Closed(_)) if !committed => (peer_reason(&mut reader).unwrap_or(e), false),
        e => (e, committed),
    });
    if let Err((_, committed)) = &result
        && !committed
    {
        // The guest stays here: as it was.
        if !was_logging {
            let _ = on_vcpu(handle, |m| m.tracker.as_mut().map_or(Ok(()), |t| t.stop(m.vm.fd(), m.vm.ram()).map_err(|e| e.to_string())));
        }
        if paused && before != VmState::Paused {
            handle.resume();
        }
    }
    result
}

/// Pre-copy rounds, the stop and the hand-over. `throttle` sets the
/// auto-converge throttle; `paused` records that the guest was stopped.
fn precopy(src: &mut Source<'_>, req: &MigrateRequest, conn: Conn, reader: &mut Conn, setup: Setup, paused: &mut bool, mut throttle: impl FnMut(u8)) -> Result<(), (MigrationError, bool)> {
    let handle = src.handle;
    let fail = |e: MigrationError| (e, false);
    let mut sender = Sender::new(conn, req.bandwidth);
    let mut buf = Vec::new();
    sender.json(Kind::Hello, &Hello { config: setup.config.clone(), regions: setup.regions.clone(), page_size: PAGE }).map_err(fail)?;
    expect(reader, &mut buf, Kind::Accept).map_err(fail)?;
    let accepted: Accepted = stream::json(Kind::Accept, &buf).map_err(|e| fail(e.into()))?;
    sender.json(Kind::Setup, &setup.cpuid).map_err(fail)?;
    src.status.ram_bytes = setup.ram.size();
    src.status.phase = Phase::Precopy;
    let mut conv = Convergence::new(req.max_downtime, req.bandwidth, req.postcopy);
    if !accepted.postcopy {
        if let super::PostcopyPolicy::After(_) = req.postcopy {
            return Err(fail(MigrationError::Refused("the destination cannot take post-copy (its guest RAM is not anon or thp)".into())));
        }
        conv.without_postcopy();
    }
    let mut postcopy = false;
    let mut runs = setup.runs;
    let mut last_harvest = Instant::now();
    let mut round = 0u32;
    loop {
        src.status.round = round;
        let before = sender.sent_bytes;
        let t = Instant::now();
        src.send(&mut sender, &setup.ram, &runs).map_err(fail)?;
        sender.frame(Kind::RoundEnd, &[&u64::from(round).to_le_bytes()]).map_err(fail)?;
        sender.flush().map_err(fail)?;
        // The round counts as sent once the destination has it in RAM.
        expect_ack(reader, &mut buf, u64::from(round)).map_err(fail)?;
        let send_secs = t.elapsed().as_secs_f64();
        runs = on_vcpu(handle, harvest).map_err(fail)?;
        let interval_secs = last_harvest.elapsed().as_secs_f64();
        last_harvest = Instant::now();
        let r = Round { index: round, sent_bytes: sender.sent_bytes - before, send_secs, dirty_bytes: bytes_of(&runs), interval_secs };
        let decision = conv.after(r);
        src.status.rounds.push(r);
        src.status.remaining_bytes = r.dirty_bytes;
        src.status.dirty_rate_bytes_per_s = conv.dirty_rate().unwrap_or(0.0);
        src.status.bandwidth_bytes_per_s = conv.bandwidth().unwrap_or(0.0);
        src.status.expected_downtime_ms = conv.expected_downtime(r.dirty_bytes).map_or(0.0, |d| d.as_secs_f64() * 1e3);
        src.status.throttle_percent = conv.throttle();
        src.publish(false);
        match decision {
            Decision::Continue => {}
            Decision::Throttle(p) => throttle(p),
            Decision::StopAndCopy => break,
            Decision::Postcopy => {
                postcopy = true;
                break;
            }
        }
        round += 1;
    }
    // Stop and copy.
    src.status.phase = Phase::StopAndCopy;
    src.publish(false);
    let stopped = Instant::now();
    src.status.stop_tsc = Some(rdtsc());
    let state = handle.pause();
    *paused = true;
    if state == VmState::Exited {
        return Err(fail(MigrationError::Refused("the VM exited during the migration".into())));
    }
    throttle(0);
    log::debug!("stop: paused after {:?}", stopped.elapsed());
    let fin = on_vcpu(handle, finish).map_err(fail)?;
    log::debug!("stop: final harvest and vCPU state after {:?}", stopped.elapsed());
    src.status.round = round + 1;
    // What the last round's harvest found and what the guest wrote since.
    let last = union(&runs, &fin.runs);
    let pending: Vec<(u64, u64)> = last.iter().map(|&(offset, len)| (offset, len / PAGE)).collect();
    if postcopy {
        // The destination runs the guest without these; they follow.
        sender.frame(Kind::PostcopyPending, &[&stream::encode_runs(&pending)]).map_err(fail)?;
    } else {
        src.send(&mut sender, &setup.ram, &last).map_err(fail)?;
        sender.frame(Kind::RoundEnd, &[&u64::from(round + 1).to_le_bytes()]).map_err(fail)?;
    }
    sender.json(Kind::State, &fin.state).map_err(fail)?;
    sender.flush().map_err(fail)?;
    log::debug!("stop: last pages and state sent after {:?}", stopped.elapsed());
    if !postcopy {
        expect_ack(reader, &mut buf, u64::from(round + 1)).map_err(fail)?;
    }
    expect(reader, &mut buf, Kind::Ready).map_err(fail)?;
    log::debug!("stop: destination ready after {:?}", stopped.elapsed());
    // The point of no return: from here the guest is the destination's.
    sender.frame(Kind::Commit, &[]).map_err(|e| (e, true))?;
    sender.flush().map_err(|e| (e, true))?;
    expect(reader, &mut buf, Kind::Resumed).map_err(|e| (e, true))?;
    src.status.downtime_ms = Some(stopped.elapsed().as_secs_f64() * 1e3);
    src.status.bytes_sent = sender.sent_bytes;
    if postcopy {
        src.status.phase = Phase::Postcopy;
        src.status.remaining_bytes = bytes_of(&last);
        src.publish(false);
        let committed = |e: MigrationError| (e, true);
        let lease = handle.control().lease_ram().ok_or_else(|| committed(MigrationError::Vcpu("the VM has exited".into())))?;
        let back = reader.try_clone().map_err(|source| committed(MigrationError::Connect { what: "cannot clone the connection".into(), source }))?;
        let served = super::postcopy::serve_source(&mut sender, back, &setup.ram, &pending, req.link_timeout).map_err(committed)?;
        drop(lease);
        src.status.postcopy_requests = served;
        src.status.bytes_sent = sender.sent_bytes;
        src.status.data_pages = sender.data_pages;
        src.status.zero_pages = sender.zero_pages;
        src.status.remaining_bytes = 0;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_cuts_runs_into_groups_of_a_size() {
        let g = split(&[(0, 10), (100, 5), (200, 20)], 8);
        assert_eq!(g, vec![vec![(0, 8)], vec![(8, 2), (100, 5), (200, 1)], vec![(201, 8)], vec![(209, 8)], vec![(217, 3)]]);
        assert!(split(&[], 8).is_empty());
    }

    #[test]
    fn union_keeps_every_page_of_both_lists_once() {
        let a = [(0, 8), (20, 4), (40, 4)];
        let b = [(4, 8), (24, 4), (50, 1)];
        assert_eq!(union(&a, &b), [(0, 12), (20, 8), (40, 4), (50, 1)]);
        assert_eq!(union(&a, &[]), a);
        assert_eq!(union(&[], &b), b);
        assert_eq!(union(&[(0, 100)], &[(10, 5)]), [(0, 100)]);
    }
}
