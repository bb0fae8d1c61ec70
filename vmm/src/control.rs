//! Run control shared between the vCPU thread and the control socket:
//! pause, resume, shutdown, and jobs that must run on the vCPU thread.
//!
//! The vCPU thread owns the vCPU fd, so anything that needs it (snapshots,
//! register reads, address translation) is sent as a [`Job`] and runs there
//! between two `KVM_RUN`s; the caller blocks until the job's reply comes
//! back. Requests kick the vCPU out of `KVM_RUN` with a signal whose handler
//! does nothing (`KVM_RUN` returns `EINTR`); a signal that lands just before
//! `KVM_RUN` is covered by the next kick, sent every millisecond until the
//! thread answers.

use std::collections::VecDeque;
use std::sync::mpsc;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::machine::Machine;

/// Where the VM is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmState {
    /// Not started yet.
    Starting,
    /// The vCPU runs guest code.
    Running,
    /// Paused by request.
    Paused,
    /// The guest finished its work and waits for requests.
    Idle,
    /// The VM has ended.
    Exited,
}

/// What a job returns: JSON data for the caller, or an error message.
pub type JobResult = Result<serde_json::Value, String>;

/// Work for the vCPU thread. It gets the VM's live state.
pub type Job = Box<dyn FnOnce(&mut Machine) -> JobResult + Send>;

/// A job with the channel its result goes back on.
pub struct PendingJob {
    job: Job,
    reply: mpsc::Sender<JobResult>,
}

impl std::fmt::Debug for PendingJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PendingJob")
    }
}

impl PendingJob {
    /// Runs the job and sends its result back.
    pub fn run(self, ctx: &mut Machine) {
        let result = (self.job)(ctx);
        let _ = self.reply.send(result);
    }
}

/// What the vCPU thread must do next.
#[derive(Debug)]
pub enum Work {
    /// Enter the guest.
    Run,
    /// Run these jobs, then ask again.
    Jobs(Vec<PendingJob>),
    /// End the VM.
    Stop,
}

#[derive(Debug)]
struct Inner {
    state: VmState,
    pause_requested: bool,
    shutdown_requested: bool,
    guest_idle: bool,
    jobs: VecDeque<PendingJob>,
    vcpu_thread: Option<libc::pthread_t>,
    /// Live [`RamLease`]s: threads reading guest RAM outside the vCPU
    /// thread ([`VmControl::exited`] waits for them to end before the VM,
    /// and its RAM, can be torn down).
    ram_readers: usize,
}

/// Keeps the VM's guest RAM mapped while held: the VM's teardown waits in
/// [`VmControl::exited`] until every lease is dropped, and no lease is
/// granted once the VM has exited.
#[derive(Debug)]
pub struct RamLease<'a> {
    control: &'a VmControl,
}

impl Drop for RamLease<'_> {
    fn drop(&mut self) {
        let mut g = self.control.lock();
        g.ram_readers = g.ram_readers.saturating_sub(1);
        self.control.changed.notify_all();
    }
}

/// Shared run control of one VM.
#[derive(Debug)]
pub struct VmControl {
    inner: Mutex<Inner>,
    changed: Condvar,
}

impl Default for VmControl {
    fn default() -> Self {
        VmControl {
            inner: Mutex::new(Inner {
                state: VmState::Starting,
                pause_requested: false,
                shutdown_requested: false,
                guest_idle: false,
                jobs: VecDeque::new(),
                vcpu_thread: None,
                ram_readers: 0,
            }),
            changed: Condvar::new(),
        }
    }
}

/// The signal used to kick the vCPU out of `KVM_RUN`.
#[must_use]
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the no-op handler for [`kick_signal`] (once per process).
pub fn install_kick_handler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick) {
            log::warn!("cannot install the vCPU kick handler: {e}");
        }
    });
}

impl VmControl {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A poisoned lock means a panic elsewhere; the state is still usable.
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn wait_a_little<'a>(&self, g: MutexGuard<'a, Inner>) -> MutexGuard<'a, Inner> {
        self.changed.wait_timeout(g, Duration::from_millis(1)).unwrap_or_else(std::sync::PoisonError::into_inner).0
    }

    /// Kicks the vCPU thread out of `KVM_RUN` if it is in guest code.
    fn kick(g: &Inner) {
        if let (VmState::Running, Some(t)) = (g.state, g.vcpu_thread) {
            // SAFETY: the thread id is live while it is recorded (it is
            // cleared under this lock before the thread ends).
            unsafe { libc::pthread_kill(t, kick_signal()) };
        }
    }

    /// The current state.
    #[must_use]
    pub fn state(&self) -> VmState {
        self.lock().state
    }

    /// Called by the vCPU thread when it starts running the guest.
    pub fn vcpu_started(&self) {
        install_kick_handler();
        let mut g = self.lock();
        // SAFETY: pthread_self has no preconditions.
        g.vcpu_thread = Some(unsafe { libc::pthread_self() });
        g.state = VmState::Running;
        self.changed.notify_all();
    }

    /// Called by the vCPU thread before each `KVM_RUN`: blocks while paused
    /// or idle with nothing to do.
    #[must_use]
    pub fn next_work(&self) -> Work {
        let mut g = self.lock();
        loop {
            if g.shutdown_requested {
                return Work::Stop;
            }
            if !g.jobs.is_empty() {
                return Work::Jobs(g.jobs.drain(..).collect());
            }
            let want = if g.guest_idle {
                VmState::Idle
            } else if g.pause_requested {
                VmState::Paused
            } else {
                VmState::Running
            };
            if g.state != want {
                g.state = want;
                self.changed.notify_all();
            }
            if want == VmState::Running {
                return Work::Run;
            }
            g = self.changed.wait(g).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    /// Called by the vCPU thread when a polling guest found nothing to do:
    /// waits up to `timeout` unless jobs, a pause or a shutdown are pending.
    pub fn idle_wait(&self, timeout: Duration) {
        let g = self.lock();
        if g.jobs.is_empty() && !g.pause_requested && !g.shutdown_requested {
            let _ = self.changed.wait_timeout(g, timeout);
        }
    }

    /// Called by the vCPU thread when the guest has finished its work: it
    /// will not be entered again; jobs and shutdown are still served.
    pub fn guest_idled(&self) {
        let mut g = self.lock();
        g.guest_idle = true;
        self.changed.notify_all();
    }

    /// A lease on the VM's guest RAM, for reading it from another thread
    /// while the vCPU runs; `None` once the VM has exited.
    #[must_use]
    pub fn lease_ram(&self) -> Option<RamLease<'_>> {
        let mut g = self.lock();
        if g.state == VmState::Exited {
            return None;
        }
        g.ram_readers += 1;
        Some(RamLease { control: self })
    }

    /// Called when the VM has ended, before its RAM is unmapped: pending
    /// jobs are refused, no [`RamLease`] is granted any more, and this
    /// waits until the leases held are dropped.
    pub fn exited(&self) {
        let mut g = self.lock();
        g.state = VmState::Exited;
        g.vcpu_thread = None;
        for job in g.jobs.drain(..) {
            let _ = job.reply.send(Err("the VM has exited".into()));
        }
        self.changed.notify_all();
        while g.ram_readers > 0 {
            g = self.changed.wait(g).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    /// Pauses the vCPU and waits until it is out of guest code. Returns the
    /// state reached (an idle or exited VM stays as it is).
    pub fn pause(&self) -> VmState {
        let mut g = self.lock();
        if matches!(g.state, VmState::Exited | VmState::Idle) {
            return g.state;
        }
        g.pause_requested = true;
        self.changed.notify_all();
        while !matches!(g.state, VmState::Paused | VmState::Exited | VmState::Idle) {
            Self::kick(&g);
            g = self.wait_a_little(g);
        }
        g.state
    }

    /// Resumes a paused vCPU.
    pub fn resume(&self) -> VmState {
        let mut g = self.lock();
        g.pause_requested = false;
        self.changed.notify_all();
        while g.state == VmState::Paused {
            g = self.wait_a_little(g);
        }
        g.state
    }

    /// Asks the VM to end and waits until it has.
    pub fn shutdown(&self) {
        let mut g = self.lock();
        g.shutdown_requested = true;
        self.changed.notify_all();
        while g.state != VmState::Exited {
            Self::kick(&g);
            g = self.wait_a_little(g);
        }
    }

    /// Runs `job` on the vCPU thread and returns its result.
    ///
    /// # Errors
    /// The job's own error, or "the VM has exited".
    pub fn call(&self, job: Job) -> JobResult {
        let (tx, rx) = mpsc::channel();
        {
            let mut g = self.lock();
            if g.state == VmState::Exited {
                return Err("the VM has exited".into());
            }
            g.jobs.push_back(PendingJob { job, reply: tx });
            self.changed.notify_all();
            // Kick until the thread has taken the job.
            while !g.jobs.is_empty() && g.state != VmState::Exited {
                Self::kick(&g);
                g = self.wait_a_little(g);
            }
        }
        rx.recv().unwrap_or_else(|_| Err("the VM has exited".into()))
    }
}
