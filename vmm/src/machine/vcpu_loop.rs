//! One vCPU thread: `KVM_RUN`, its exits, and parking.
//!
//! A thread starts parked (its vCPU deposited in the machine), takes its
//! vCPU when it may run, and runs it until the control asks it to park
//! (a job, a pause, an idle guest) or to stop (the VM ends), depositing it
//! again each time. An exit is handled with the machine locked, the vCPU
//! stopped in it: port and MMIO accesses go to the devices, a message to the
//! observers, a dirty-ring-full exit to the tracker; an exit that ends the
//! VM records how and stops every thread.

use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress};

use memvisor_abi::Pod as _;
use memvisor_abi::msg::{Message, Report};

use crate::control::{Kick, VmControl, Work};
use crate::devices::IoAction;
use crate::timeline;
use crate::vcpu::RegisterDump;

use super::{BootTimings, GuestContext, Machine, TimedReport, VmmError};

/// `KVM_EXIT_DIRTY_RING_FULL` (KVM api.rst, kvm_run exit reasons): a vCPU's
/// dirty ring is full and must be harvested before it can run again.
const KVM_EXIT_DIRTY_RING_FULL: u32 = 31;

/// Guest reports kept from the start of a run (boot, self-test).
pub const FIRST_REPORTS: usize = 1_000;
/// Guest reports kept from the end of a run: more than the longest
/// workload the VMM checks sends (the dirty workload's 4,096 rounds send
/// two each). A VM that serves for days (a balloon driver reports every
/// deflate) keeps a bounded log: the first and the latest reports.
pub const LAST_REPORTS: usize = 10_000;

/// The run's record of guest reports, from every vCPU: the first
/// [`FIRST_REPORTS`] and the last [`LAST_REPORTS`].
#[derive(Debug, Default)]
pub struct Reports {
    /// The first reports, in arrival order.
    pub first: Vec<TimedReport>,
    /// The latest reports after those, in arrival order.
    pub last: std::collections::VecDeque<TimedReport>,
    /// Messages rejected.
    pub bad: u64,
    /// Reports between `first` and `last` that were not kept.
    pub dropped: u64,
    /// Boot milestones.
    pub timings: BootTimings,
}

impl Reports {
    /// Records `r`, forgetting the oldest of the latest when full.
    pub fn keep(&mut self, r: TimedReport) {
        if self.first.len() < FIRST_REPORTS {
            self.first.push(r);
            return;
        }
        if self.last.len() == LAST_REPORTS {
            self.last.pop_front();
            self.dropped += 1;
        }
        self.last.push_back(r);
    }

    /// Every report kept, in arrival order.
    #[must_use]
    pub fn into_kept(self) -> Vec<TimedReport> {
        let mut all = self.first;
        all.extend(self.last);
        all
    }
}

/// A vCPU's `kvm_run.immediate_exit` byte, handed to its thread.
#[derive(Debug)]
pub struct ImmediateExit(*mut u8);

// SAFETY: the pointer is only turned into the thread's `Kick` (which
// documents its own contract); the byte is shared memory any thread may
// write atomically.
unsafe impl Send for ImmediateExit {}

impl ImmediateExit {
    /// The byte of `vcpu`'s `kvm_run` (its mapping lives as long as `vcpu`).
    pub fn of(vcpu: &mut VcpuFd) -> Self {
        ImmediateExit(&raw mut vcpu.get_kvm_run().immediate_exit)
    }
}

/// What the thread does after one exit.
enum Flow {
    Continue,
    End(Result<u32, VmmError>),
}

/// The thread of vCPU `index` until the VM ends.
pub fn run(index: usize, immediate_exit: ImmediateExit, control: &VmControl<Machine>) {
    // Before the first KVM_RUN (`crate::seccomp`).
    crate::seccomp::apply_or_abort(crate::seccomp::ThreadKind::Vcpu);
    // SAFETY: the byte is in the kvm_run mapping of vCPU `index`, which the
    // machine keeps until after `drive` has joined this thread and called
    // `control.exited()`; this thread unregisters the kick (vcpu_ended)
    // before it returns.
    control.vcpu_started(index, unsafe { Kick::new(immediate_exit.0) });
    let mut work = control.park();
    while work == Work::Run {
        let Some(mut vcpu) = control.shared().as_mut().and_then(|m| m.vcpus.get_mut(index).and_then(Option::take)) else {
            // Never: a parked thread's vCPU is in the machine.
            work = Work::Abort(format!("vCPU {index} was missing from the machine"));
            break;
        };
        work = run_until_parked(index, &mut vcpu, control);
        if let Some(m) = control.shared().as_mut() {
            m.vcpus[index] = Some(vcpu);
        }
        if work != Work::Park {
            end(index, work, false, control);
            return;
        }
        work = control.park();
    }
    end(index, work, true, control);
}

/// The thread ends with `work` (stop or abort); `parked`: from parking.
fn end(index: usize, work: Work, parked: bool, control: &VmControl<Machine>) {
    if let Some(m) = control.shared().as_mut() {
        match work {
            Work::Abort(why) => m.end_with(Err(crate::snapshot::SnapshotError::Corrupt(why).into())),
            _ => {
                let status = m.guest_idle.unwrap_or(0);
                m.end_with(Ok(status));
            }
        }
    }
    control.vcpu_ended(index, parked);
}

/// Runs `vcpu` until the control says park or stop.
fn run_until_parked(index: usize, vcpu: &mut VcpuFd, control: &VmControl<Machine>) -> Work {
    loop {
        match control.next_work(index) {
            Work::Run => {}
            other => return other,
        }
        if index > 0 {
            // An application processor the guest asked to start gets its
            // entry state here, on its own thread.
            let start = control.shared().as_mut().and_then(|m| m.ap_starts.get_mut(index).and_then(Option::take));
            if let Some(state) = start
                && let Err(e) = state.apply(vcpu)
            {
                return finish(control, Err(e));
            }
        }
        let exit = match vcpu.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => return finish(control, Err(VmmError::Run(e))),
        };
        let mut shared = control.shared();
        let Some(m) = shared.as_mut() else { return Work::Stop };
        if m.log.timings.first_exit_us.is_none() {
            m.log.timings.first_exit_us = Some(timeline::since_start_us());
        }
        let flow = match exit {
            VcpuExit::IoOut(port, data) => match m.devices.port_out(port, data) {
                IoAction::Continue => Flow::Continue,
                IoAction::Exit(status) => Flow::End(Ok(status)),
                IoAction::Reset => {
                    log::info!("the guest reset the machine (i8042 reset line); the VM ends");
                    Flow::End(Ok(0))
                }
                IoAction::PowerOff => {
                    log::info!("the guest powered the machine off (ACPI S5); the VM ends");
                    Flow::End(Ok(0))
                }
                IoAction::Swap(gpa) => {
                    m.devices.swap.handle(m.vm.ram().memory(), gpa);
                    Flow::Continue
                }
                IoAction::StartAp(gpa) => match super::smp::request(m, index, vcpu, gpa) {
                    Ok(ap) => {
                        drop(shared);
                        control.kick(ap);
                        continue;
                    }
                    Err(why) => {
                        crate::warn_limited!("guest's AP start request at {gpa:#x} refused: {why}");
                        Flow::Continue
                    }
                },
                IoAction::Message(gpa) => on_message(m, vcpu, gpa, control),
            },
            VcpuExit::IoIn(port, data) => {
                m.devices.port_in(port, data);
                Flow::Continue
            }
            VcpuExit::MmioRead(addr, data) => {
                m.devices.mmio_read(addr, data);
                if m.devices.take_idle_hint() {
                    // A polling guest with nothing to do: wait for host work
                    // (a job, e.g. a new balloon target) a little.
                    drop(shared);
                    control.idle_wait(std::time::Duration::from_millis(1));
                    continue;
                }
                Flow::Continue
            }
            VcpuExit::MmioWrite(addr, data) => {
                let ram = m.vm.ram();
                m.devices.mmio_write(addr, data, ram);
                Flow::Continue
            }
            VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL) => match m.tracker.as_mut().map(|t| t.on_ring_full(m.vm.fd())) {
                Some(Err(e)) => Flow::End(Err(e.into())),
                _ => Flow::Continue,
            },
            VcpuExit::Shutdown => Flow::End(Err(VmmError::TripleFault(Box::new(RegisterDump::read(vcpu))))),
            VcpuExit::Hlt => Flow::End(Err(VmmError::Halted(Box::new(RegisterDump::read(vcpu))))),
            // An instruction KVM's emulator gives up on (PVM: `int3`,
            // `clac`, `popcnt` at CPL0) that the VMM can finish itself.
            VcpuExit::InternalError => {
                if crate::unemulated::finish(vcpu, m.vm.ram()) {
                    Flow::Continue
                } else {
                    Flow::End(Err(guest_failed(vcpu, "internal error: instruction emulation failed".into())))
                }
            }
            VcpuExit::FailEntry(reason, cpu) => Flow::End(Err(guest_failed(vcpu, format!("entry failed, hardware reason {reason:#x} on cpu {cpu}")))),
            other => {
                crate::warn_limited!("unexpected exit of vCPU {index}: {other:?}; resuming");
                Flow::Continue
            }
        };
        if let Flow::End(result) = flow {
            m.devices.flush();
            m.end_with(result);
            drop(shared);
            control.stop();
            return Work::Stop;
        }
    }
}

/// Ends the VM with `result` (nothing locked by the caller).
fn finish(control: &VmControl<Machine>, result: Result<u32, VmmError>) -> Work {
    if let Some(m) = control.shared().as_mut() {
        m.end_with(result);
    }
    control.stop();
    Work::Stop
}

fn guest_failed(vcpu: &VcpuFd, what: String) -> VmmError {
    VmmError::GuestFailed { what, regs: Box::new(RegisterDump::read(vcpu)) }
}

/// A message port write: decodes the report at `gpa`, records it and hands
/// it to the observers (the guest waits in its port write).
fn on_message(m: &mut Machine, vcpu: &VcpuFd, gpa: u64, control: &VmControl<Machine>) -> Flow {
    let mut bytes = [0u8; Message::SIZE];
    let decoded = m
        .vm
        .ram()
        .memory()
        .read_slice(&mut bytes, GuestAddress(gpa))
        .ok()
        .and_then(|()| Message::from_bytes(&bytes))
        .and_then(|msg| Report::decode(&msg).ok());
    let Some(report) = decoded else {
        m.log.bad += 1;
        crate::warn_limited!("guest sent an invalid message at {gpa:#x}; ignored");
        return Flow::Continue;
    };
    let at_us = timeline::since_start_us();
    match report {
        Report::Hello { .. } if m.log.timings.first_report_us.is_none() => m.log.timings.first_report_us = Some(at_us),
        Report::Ready { .. } => m.log.timings.ready_us = Some(at_us),
        _ => {}
    }
    // Bounded: a guest that reports without end cannot grow the VMM's
    // memory without end.
    m.log.keep(TimedReport { at_us, report });
    let mut guest = GuestContext { vm: &m.vm, vcpu, tracker: m.tracker.as_mut(), mode: m.mode };
    for o in &mut m.observers {
        if let Err(e) = o.on_report(&report, &mut guest) {
            return Flow::End(Err(e));
        }
    }
    if let Report::Idle { status } = report {
        m.devices.flush();
        m.log.timings.end_us = at_us;
        if !m.stay_up {
            return Flow::End(Ok(status));
        }
        // The guest is never entered again; the VM serves jobs until
        // shutdown.
        m.guest_idle = Some(status);
        control.guest_idled();
    }
    Flow::Continue
}

#[cfg(test)]
mod tests {
    use super::*;
    use memvisor_abi::msg::Report;

    #[test]
    fn a_long_run_keeps_its_first_and_latest_reports_only() {
        let mut r = Reports::default();
        let n = FIRST_REPORTS + LAST_REPORTS + 500;
        for i in 0..n {
            r.keep(TimedReport { at_us: i as f64, report: Report::Idle { status: 0 } });
        }
        assert_eq!(r.dropped, 500);
        let kept = r.into_kept();
        assert_eq!(kept.len(), FIRST_REPORTS + LAST_REPORTS);
        assert_eq!(kept[FIRST_REPORTS - 1].at_us, (FIRST_REPORTS - 1) as f64);
        assert_eq!(kept[FIRST_REPORTS].at_us, (FIRST_REPORTS + 500) as f64, "the oldest of the latest were dropped");
        assert_eq!(kept.last().map(|k| k.at_us), Some((n - 1) as f64));
    }
}
