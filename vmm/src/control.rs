//! Run control shared between a VM's vCPU thread and the threads that ask
//! things of it (the control socket, a restore's image check): pause,
//! resume, shutdown, abort, and jobs that must run on the vCPU thread.
//!
//! The vCPU thread owns the vCPU fd, so anything that needs it (snapshots,
//! register reads, address translation) is sent as a job and runs there
//! between two `KVM_RUN`s; the caller blocks until the job's reply comes
//! back. [`VmControl`] is generic over what a job gets (the run loop's
//! machine), so this module knows nothing of the machine and sits below it.
//!
//! # Kicking the vCPU out of `KVM_RUN`
//! A request sets its state under the lock, then [`Kick::kick`] sets
//! `kvm_run.immediate_exit` and sends one signal to the vCPU thread, whose
//! handler does nothing. A vCPU inside `KVM_RUN` returns `EINTR` on the
//! signal; a vCPU about to enter it returns `EINTR` at once because of the
//! flag (KVM api.rst, "immediate_exit"). The vCPU thread clears the flag
//! *before* it reads the state ([`VmControl::next_work`]), so a request
//! either finds the flag still set at the next entry or is seen by that
//! read: one kick is enough, where a signal alone could land just before
//! `KVM_RUN` and be lost.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};

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

/// Work for the vCPU thread; it gets the VM's live state `M`.
pub type Job<M> = Box<dyn FnOnce(&mut M) -> JobResult + Send>;

/// A job with the channel its result goes back on.
pub struct PendingJob<M> {
    job: Job<M>,
    reply: mpsc::Sender<JobResult>,
}

impl<M> std::fmt::Debug for PendingJob<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PendingJob")
    }
}

impl<M> PendingJob<M> {
    /// Runs the job and sends its result back.
    pub fn run(self, ctx: &mut M) {
        let result = (self.job)(ctx);
        let _ = self.reply.send(result);
    }
}

/// What the vCPU thread must do next.
#[derive(Debug)]
pub enum Work<M> {
    /// Enter the guest.
    Run,
    /// Run these jobs, then ask again.
    Jobs(Vec<PendingJob<M>>),
    /// End the VM.
    Stop,
    /// End the VM with this error (a failed background check).
    Abort(String),
}

/// The signal used to kick a vCPU thread out of `KVM_RUN`.
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

/// How to get one vCPU thread out of `KVM_RUN` (module docs): its thread
/// and its `kvm_run.immediate_exit` byte.
#[derive(Debug)]
pub struct Kick {
    thread: libc::pthread_t,
    immediate_exit: *const AtomicU8,
}

// SAFETY: the pointer targets the vCPU's kvm_run mapping, shared memory that
// any thread may write with atomic byte stores; `Kick::new`'s contract keeps
// it mapped while the Kick is registered.
unsafe impl Send for Kick {}

impl Kick {
    /// The calling thread's kick, for the vCPU whose `kvm_run` holds
    /// `immediate_exit`.
    ///
    /// # Safety
    /// `immediate_exit` must point at the `immediate_exit` byte of a vCPU's
    /// mapped `kvm_run`, and the mapping must outlive the registration of
    /// this kick ([`VmControl::vcpu_started`] until [`VmControl::exited`]).
    #[must_use]
    pub unsafe fn new(immediate_exit: *mut u8) -> Self {
        install_kick_handler();
        // SAFETY: pthread_self has no preconditions.
        let thread = unsafe { libc::pthread_self() };
        Kick { thread, immediate_exit: immediate_exit.cast_const().cast() }
    }

    /// Makes the vCPU leave `KVM_RUN` now, or not enter it next time.
    pub fn kick(&self) {
        // SAFETY: the byte is mapped while the kick is registered (`new`'s
        // contract), and AtomicU8 has the layout and alignment of u8.
        unsafe { (*self.immediate_exit).store(1, Ordering::SeqCst) };
        // SAFETY: the thread is live while its kick is registered (it
        // unregisters in `exited` before it ends).
        unsafe { libc::pthread_kill(self.thread, kick_signal()) };
    }

    /// Clears the flag; the vCPU thread calls this before it reads the
    /// state (module docs).
    fn clear(&self) {
        // SAFETY: as in `kick`.
        unsafe { (*self.immediate_exit).store(0, Ordering::SeqCst) };
    }
}

#[derive(Debug)]
struct Inner<M> {
    state: VmState,
    pause_requested: bool,
    shutdown_requested: bool,
    abort: Option<String>,
    guest_idle: bool,
    jobs: VecDeque<PendingJob<M>>,
    kick: Option<Kick>,
    /// Live [`RamLease`]s: threads reading guest RAM outside the vCPU
    /// thread ([`VmControl::exited`] waits for them to end before the VM,
    /// and its RAM, can be torn down).
    ram_readers: usize,
}

/// Keeps the VM's guest RAM mapped while held: the VM's teardown waits in
/// [`VmControl::exited`] until every lease is dropped, and no lease is
/// granted once the VM has exited.
#[derive(Debug)]
pub struct RamLease<'a, M> {
    control: &'a VmControl<M>,
}

impl<M> Drop for RamLease<'_, M> {
    fn drop(&mut self) {
        let mut g = self.control.lock();
        g.ram_readers = g.ram_readers.saturating_sub(1);
        self.control.changed.notify_all();
    }
}

/// Shared run control of one VM, whose jobs get an `M`.
#[derive(Debug)]
pub struct VmControl<M> {
    inner: Mutex<Inner<M>>,
    changed: Condvar,
}

impl<M> Default for VmControl<M> {
    fn default() -> Self {
        VmControl {
            inner: Mutex::new(Inner {
                state: VmState::Starting,
                pause_requested: false,
                shutdown_requested: false,
                abort: None,
                guest_idle: false,
                jobs: VecDeque::new(),
                kick: None,
                ram_readers: 0,
            }),
            changed: Condvar::new(),
        }
    }
}

impl<M> VmControl<M> {
    fn lock(&self) -> MutexGuard<'_, Inner<M>> {
        // A poisoned lock means a panic elsewhere; the state is still usable.
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn wait<'a>(&self, g: MutexGuard<'a, Inner<M>>) -> MutexGuard<'a, Inner<M>> {
        self.changed.wait(g).unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Notifies waiters and kicks the vCPU, after a request changed `g`.
    fn requested(&self, g: &Inner<M>) {
        self.changed.notify_all();
        if let Some(k) = &g.kick {
            k.kick();
        }
    }

    /// The current state.
    #[must_use]
    pub fn state(&self) -> VmState {
        self.lock().state
    }

    /// Called by the vCPU thread when it starts running the guest.
    pub fn vcpu_started(&self, kick: Kick) {
        let mut g = self.lock();
        g.kick = Some(kick);
        g.state = VmState::Running;
        self.changed.notify_all();
    }

    /// Called by the vCPU thread before each `KVM_RUN`: blocks while paused
    /// or idle with nothing to do.
    #[must_use]
    pub fn next_work(&self) -> Work<M> {
        let mut g = self.lock();
        if let Some(k) = &g.kick {
            // Under the lock, so no request between this and the reads
            // below: requests set their state under it too.
            k.clear();
        }
        loop {
            if let Some(why) = g.abort.take() {
                return Work::Abort(why);
            }
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
            g = self.wait(g);
        }
    }

    /// Called by the vCPU thread when a polling guest found nothing to do:
    /// waits up to `timeout` unless something is pending.
    pub fn idle_wait(&self, timeout: Duration) {
        let g = self.lock();
        if g.jobs.is_empty() && !g.pause_requested && !g.shutdown_requested && g.abort.is_none() {
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
    pub fn lease_ram(&self) -> Option<RamLease<'_, M>> {
        let mut g = self.lock();
        if g.state == VmState::Exited {
            return None;
        }
        g.ram_readers += 1;
        Some(RamLease { control: self })
    }

    /// Called by the vCPU thread when the VM has ended, before its vCPU and
    /// RAM go: pending jobs are refused, the kick is unregistered, no
    /// [`RamLease`] is granted any more, and this waits until the leases
    /// held are dropped.
    pub fn exited(&self) {
        let mut g = self.lock();
        g.state = VmState::Exited;
        g.kick = None;
        for job in g.jobs.drain(..) {
            let _ = job.reply.send(Err("the VM has exited".into()));
        }
        self.changed.notify_all();
        while g.ram_readers > 0 {
            g = self.wait(g);
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
        self.requested(&g);
        while !matches!(g.state, VmState::Paused | VmState::Exited | VmState::Idle) {
            g = self.wait(g);
        }
        g.state
    }

    /// Resumes a paused vCPU.
    pub fn resume(&self) -> VmState {
        let mut g = self.lock();
        g.pause_requested = false;
        self.changed.notify_all();
        while g.state == VmState::Paused {
            g = self.wait(g);
        }
        g.state
    }

    /// Asks the VM to end and waits until it has.
    pub fn shutdown(&self) {
        let mut g = self.lock();
        g.shutdown_requested = true;
        self.requested(&g);
        while g.state != VmState::Exited {
            g = self.wait(g);
        }
    }

    /// Ends the VM with `why` as its error at the vCPU's next stop (a
    /// background check that failed); does not wait.
    pub fn abort(&self, why: String) {
        let mut g = self.lock();
        if g.state != VmState::Exited {
            g.abort = Some(why);
            self.requested(&g);
        }
    }

    /// Runs `job` on the vCPU thread and returns its result.
    ///
    /// # Errors
    /// The job's own error, or "the VM has exited".
    pub fn call(&self, job: Job<M>) -> JobResult {
        let (tx, rx) = mpsc::channel();
        {
            let mut g = self.lock();
            if g.state == VmState::Exited {
                return Err("the VM has exited".into());
            }
            g.jobs.push_back(PendingJob { job, reply: tx });
            self.requested(&g);
        }
        rx.recv().unwrap_or_else(|_| Err("the VM has exited".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A stand-in vCPU thread: serves jobs and stops like the run loop,
    /// entering no guest.
    fn serve(control: &VmControl<u32>, state: &mut u32) -> Option<String> {
        let mut flag = 0u8;
        // SAFETY: `flag` outlives the registration: `exited` below
        // unregisters the kick before this function returns.
        control.vcpu_started(unsafe { Kick::new(&raw mut flag) });
        let why = loop {
            match control.next_work() {
                Work::Run => std::thread::sleep(Duration::from_millis(1)),
                Work::Jobs(jobs) => jobs.into_iter().for_each(|j| j.run(state)),
                Work::Stop => break None,
                Work::Abort(why) => break Some(why),
            }
        };
        control.exited();
        why
    }

    #[test]
    fn jobs_run_on_the_serving_thread_and_shutdown_ends_it() {
        let control = Arc::new(VmControl::<u32>::default());
        let c = Arc::clone(&control);
        let thread = std::thread::spawn(move || {
            let mut state = 7;
            (serve(&c, &mut state), state)
        });
        let got = control.call(Box::new(|n: &mut u32| {
            *n += 1;
            Ok(serde_json::json!(*n))
        }));
        assert_eq!(got, Ok(serde_json::json!(8)));
        assert_eq!(control.pause(), VmState::Paused);
        assert_eq!(control.resume(), VmState::Running);
        control.shutdown();
        assert_eq!(thread.join().unwrap(), (None, 8));
        assert_eq!(control.state(), VmState::Exited);
        assert!(control.call(Box::new(|_| Ok(serde_json::Value::Null))).is_err(), "no jobs after the end");
        assert!(control.lease_ram().is_none());
    }

    #[test]
    fn an_abort_ends_the_run_with_its_reason() {
        let control = Arc::new(VmControl::<u32>::default());
        let c = Arc::clone(&control);
        let thread = std::thread::spawn(move || serve(&c, &mut 0));
        control.abort("the image is damaged".into());
        assert_eq!(thread.join().unwrap().as_deref(), Some("the image is damaged"));
    }
}
