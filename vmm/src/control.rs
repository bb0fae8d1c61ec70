//! Run control of one VM: its vCPU threads, and the threads that ask things
//! of it (the control socket, a restore's image check).
//!
//! A [`VmControl`] holds the VM's shared state `M` (the run loop's machine)
//! while it runs, and the run state of every vCPU thread: running (it holds
//! its vCPU and is in, or handling an exit of, `KVM_RUN`) or parked (its
//! vCPU is deposited in `M`, and it waits). Anything that needs the whole VM
//! stopped — a snapshot, a register read, a translation, a pause — parks
//! every vCPU thread first and then runs on the asking thread with `&mut M`
//! ([`VmControl::call`]); the vCPU threads carry on when it is done. This
//! module is generic over `M`, so it knows nothing of the machine and sits
//! below it.
//!
//! # Kicking a vCPU out of `KVM_RUN`
//! A request sets its state under the lock, then [`Kick::kick`] sets the
//! vCPU's `kvm_run.immediate_exit` and sends one signal to its thread,
//! whose handler does nothing. A vCPU inside `KVM_RUN` returns `EINTR` on
//! the signal; a vCPU about to enter it returns `EINTR` at once because of
//! the flag (KVM api.rst, "immediate_exit"). The vCPU thread clears its flag
//! under the lock in [`VmControl::next_work`] before it reads the state, so
//! a request either finds the flag still set at the next entry or is seen
//! by that read: one kick is enough, where a signal alone could land just
//! before `KVM_RUN` and be lost.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Where the VM is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmState {
    /// Not started yet.
    Starting,
    /// The vCPUs run guest code.
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

/// Work on the stopped VM; it gets the VM's shared state `M`.
pub type Job<M> = Box<dyn FnOnce(&mut M) -> JobResult + Send>;

/// What a running vCPU thread must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Work {
    /// Enter the guest.
    Run,
    /// Deposit the vCPU and park ([`VmControl::park`]).
    Park,
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
    /// this kick ([`VmControl::vcpu_started`] until
    /// [`VmControl::vcpu_ended`]); the calling thread must be that vCPU's
    /// and must call `vcpu_ended` before it ends.
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
        // unregisters in `vcpu_ended` before it ends).
        unsafe { libc::pthread_kill(self.thread, kick_signal()) };
    }

    /// Clears the flag; the vCPU thread does this before it reads the state
    /// (module docs).
    fn clear(&self) {
        // SAFETY: as in `kick`.
        unsafe { (*self.immediate_exit).store(0, Ordering::SeqCst) };
    }
}

#[derive(Debug)]
struct Inner {
    /// Whether the shared state is installed (the vCPU threads exist).
    started: bool,
    exited: bool,
    /// vCPU threads that have not ended, and of those the parked ones.
    vcpus: usize,
    parked: usize,
    /// Jobs waiting for, or running on, the stopped VM.
    holds: usize,
    pause_requested: bool,
    stop: bool,
    abort: Option<String>,
    guest_idle: bool,
    kicks: Vec<Option<Kick>>,
    /// Live [`RamLease`]s: threads reading guest RAM outside the stopped
    /// VM ([`VmControl::exited`] waits for them to end before the VM, and
    /// its RAM, can be torn down).
    ram_readers: usize,
}

impl Inner {
    /// Whether a running vCPU thread must park.
    fn must_park(&self) -> bool {
        self.holds > 0 || self.pause_requested || self.guest_idle
    }

    fn ending(&self) -> bool {
        self.stop || self.abort.is_some() || self.exited
    }

    fn all_parked(&self) -> bool {
        self.parked == self.vcpus
    }

    fn kick_all(&self) {
        for k in self.kicks.iter().flatten() {
            k.kick();
        }
    }
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

/// Run control and shared state of one VM, whose jobs get an `M`.
#[derive(Debug)]
pub struct VmControl<M> {
    inner: Mutex<Inner>,
    changed: Condvar,
    shared: Mutex<Option<M>>,
}

impl<M> Default for VmControl<M> {
    fn default() -> Self {
        VmControl {
            inner: Mutex::new(Inner {
                started: false,
                exited: false,
                vcpus: 0,
                parked: 0,
                holds: 0,
                pause_requested: false,
                stop: false,
                abort: None,
                guest_idle: false,
                kicks: Vec::new(),
                ram_readers: 0,
            }),
            changed: Condvar::new(),
            shared: Mutex::new(None),
        }
    }
}

impl<M> VmControl<M> {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A poisoned lock means a panic elsewhere; the state is still usable.
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn wait<'a>(&self, g: MutexGuard<'a, Inner>) -> MutexGuard<'a, Inner> {
        self.changed.wait(g).unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The shared state, locked; `None` before [`install`](Self::install)
    /// and after [`take`](Self::take).
    pub fn shared(&self) -> MutexGuard<'_, Option<M>> {
        self.shared.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Installs the VM's shared state before its `vcpus` threads start;
    /// every thread starts by parking ([`park`](Self::park)), its vCPU in
    /// `shared`, and counts as parked from then on.
    pub fn install(&self, shared: M, vcpus: usize) {
        *self.shared() = Some(shared);
        let mut g = self.lock();
        g.vcpus = vcpus;
        g.parked = 0;
        g.kicks = (0..vcpus).map(|_| None).collect();
        g.started = true;
        self.changed.notify_all();
    }

    /// Takes the shared state back once every vCPU thread has ended.
    pub fn take(&self) -> Option<M> {
        self.shared().take()
    }

    /// The current state.
    #[must_use]
    pub fn state(&self) -> VmState {
        let g = self.lock();
        if g.exited {
            VmState::Exited
        } else if !g.started {
            VmState::Starting
        } else if g.guest_idle {
            VmState::Idle
        } else if g.pause_requested && g.all_parked() {
            VmState::Paused
        } else {
            VmState::Running
        }
    }

    /// Called by vCPU thread `index` when it starts, before it unparks.
    pub fn vcpu_started(&self, index: usize, kick: Kick) {
        let mut g = self.lock();
        if let Some(slot) = g.kicks.get_mut(index) {
            *slot = Some(kick);
        }
    }

    /// Called by vCPU thread `index` before it ends (`parked`: it ends from
    /// [`park`](Self::park), not from running): its kick is unregistered
    /// and it no longer counts.
    pub fn vcpu_ended(&self, index: usize, parked: bool) {
        let mut g = self.lock();
        if let Some(slot) = g.kicks.get_mut(index) {
            *slot = None;
        }
        g.vcpus = g.vcpus.saturating_sub(1);
        if parked {
            g.parked = g.parked.saturating_sub(1);
        }
        self.changed.notify_all();
    }

    /// Called by a running vCPU thread before each `KVM_RUN`.
    #[must_use]
    pub fn next_work(&self, index: usize) -> Work {
        let g = self.lock();
        if let Some(Some(k)) = g.kicks.get(index) {
            // Under the lock: requests set their state under it too.
            k.clear();
        }
        if let Some(why) = g.abort.clone() {
            return Work::Abort(why);
        }
        if g.stop || g.exited {
            return Work::Stop;
        }
        if g.must_park() { Work::Park } else { Work::Run }
    }

    /// Called by a vCPU thread that has deposited its vCPU in the shared
    /// state: waits until it may run again. Returns the work that ends the
    /// wait: [`Work::Run`] (take the vCPU back) or the end of the VM.
    pub fn park(&self) -> Work {
        let mut g = self.lock();
        g.parked += 1;
        self.changed.notify_all();
        loop {
            if let Some(why) = g.abort.clone() {
                return Work::Abort(why);
            }
            if g.stop || g.exited {
                return Work::Stop;
            }
            if !g.must_park() {
                g.parked -= 1;
                self.changed.notify_all();
                return Work::Run;
            }
            g = self.wait(g);
        }
    }

    /// Called by a vCPU thread when a polling guest found nothing to do:
    /// waits up to `timeout` unless something is pending.
    pub fn idle_wait(&self, timeout: Duration) {
        let g = self.lock();
        if !g.must_park() && !g.ending() {
            let _ = self.changed.wait_timeout(g, timeout);
        }
    }

    /// The guest has finished its work: no vCPU enters it again; jobs and
    /// shutdown are still served.
    pub fn guest_idled(&self) {
        let mut g = self.lock();
        g.guest_idle = true;
        g.kick_all();
        self.changed.notify_all();
    }

    /// Kicks vCPU `index` out of `KVM_RUN` (it has work waiting in the
    /// shared state, such as an AP start).
    pub fn kick(&self, index: usize) {
        let g = self.lock();
        if let Some(Some(k)) = g.kicks.get(index) {
            k.kick();
        }
    }

    /// A vCPU thread ended the VM (the guest exited or died): every vCPU
    /// thread stops.
    pub fn stop(&self) {
        let mut g = self.lock();
        g.stop = true;
        g.kick_all();
        self.changed.notify_all();
    }

    /// A lease on the VM's guest RAM, for reading it from another thread
    /// while the vCPUs run; `None` once the VM has exited.
    #[must_use]
    pub fn lease_ram(&self) -> Option<RamLease<'_, M>> {
        let mut g = self.lock();
        if g.exited {
            return None;
        }
        g.ram_readers += 1;
        Some(RamLease { control: self })
    }

    /// Called when the VM has ended, its vCPU threads gone, before its RAM
    /// goes: no job and no [`RamLease`] is granted any more, and this waits
    /// until the leases held are dropped.
    pub fn exited(&self) {
        let mut g = self.lock();
        g.exited = true;
        g.kicks.clear();
        self.changed.notify_all();
        while g.ram_readers > 0 {
            g = self.wait(g);
        }
    }

    /// Parks every vCPU thread for one hold; `false` (and no hold) when the
    /// VM ends first. Waits for the VM to start.
    fn stop_the_world(&self) -> bool {
        let mut g = self.lock();
        while !g.started && !g.ending() {
            g = self.wait(g);
        }
        if g.ending() {
            return false;
        }
        g.holds += 1;
        g.kick_all();
        while !g.all_parked() && !g.ending() {
            g = self.wait(g);
        }
        if g.ending() {
            g.holds -= 1;
            self.changed.notify_all();
            return false;
        }
        true
    }

    fn release_the_world(&self) {
        let mut g = self.lock();
        g.holds = g.holds.saturating_sub(1);
        self.changed.notify_all();
    }

    /// Pauses every vCPU and waits until all are out of guest code. Returns
    /// the state reached (an idle or exited VM stays as it is).
    pub fn pause(&self) -> VmState {
        {
            let mut g = self.lock();
            if g.exited || g.guest_idle {
                drop(g);
                return self.state();
            }
            g.pause_requested = true;
            g.kick_all();
            while !g.all_parked() && !g.ending() {
                g = self.wait(g);
            }
        }
        self.state()
    }

    /// Resumes paused vCPUs.
    pub fn resume(&self) -> VmState {
        let mut g = self.lock();
        g.pause_requested = false;
        self.changed.notify_all();
        drop(g);
        self.state()
    }

    /// Asks the VM to end and waits until it has.
    pub fn shutdown(&self) {
        let mut g = self.lock();
        g.stop = true;
        g.kick_all();
        self.changed.notify_all();
        while !g.exited {
            g = self.wait(g);
        }
    }

    /// Ends the VM with `why` as its error at the vCPUs' next stop (a
    /// background check that failed); does not wait.
    pub fn abort(&self, why: String) {
        let mut g = self.lock();
        if !g.exited {
            g.abort = Some(why);
            g.kick_all();
            self.changed.notify_all();
        }
    }

    /// Runs `job` on the calling thread with every vCPU parked and returns
    /// its result.
    ///
    /// # Errors
    /// The job's own error, or "the VM has exited".
    pub fn call(&self, job: Job<M>) -> JobResult {
        if !self.stop_the_world() {
            return Err("the VM has exited".into());
        }
        let result = match self.shared().as_mut() {
            Some(m) => job(m),
            None => Err("the VM has exited".into()),
        };
        self.release_the_world();
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A shared state with the "vCPUs" of a stand-in VM: each thread runs
    /// like a vCPU thread, depositing its counter while parked.
    #[derive(Debug, Default)]
    struct World {
        deposited: Vec<Option<u32>>,
        runs: u32,
    }

    fn vcpu_thread(control: &VmControl<World>, index: usize) -> Option<String> {
        let mut flag = 0u8;
        // SAFETY: `flag` outlives the registration: `vcpu_ended` below
        // unregisters the kick before this function returns.
        control.vcpu_started(index, unsafe { Kick::new(&raw mut flag) });
        let mut why = None;
        let mut work = control.park();
        while work == Work::Run {
            let mut mine = control.shared().as_mut().and_then(|w| w.deposited[index].take()).expect("deposited while parked");
            work = loop {
                match control.next_work(index) {
                    Work::Run => {
                        mine += 1;
                        std::thread::sleep(Duration::from_micros(100));
                    }
                    other => break other,
                }
            };
            if let Some(w) = control.shared().as_mut() {
                w.deposited[index] = Some(mine);
            }
            if work != Work::Park {
                control.vcpu_ended(index, false);
                return if let Work::Abort(w) = work { Some(w) } else { None };
            }
            work = control.park();
        }
        if let Work::Abort(w) = work {
            why = Some(w);
        }
        control.vcpu_ended(index, true);
        why
    }

    fn start(n: usize) -> (Arc<VmControl<World>>, Vec<std::thread::JoinHandle<Option<String>>>) {
        let control = Arc::new(VmControl::<World>::default());
        control.install(World { deposited: vec![Some(0); n], runs: 0 }, n);
        let threads = (0..n)
            .map(|i| {
                let c = Arc::clone(&control);
                std::thread::spawn(move || vcpu_thread(&c, i))
            })
            .collect();
        (control, threads)
    }

    #[test]
    fn jobs_see_every_vcpu_parked_and_shutdown_ends_them_all() {
        let (control, threads) = start(3);
        for _ in 0..20 {
            let got = control.call(Box::new(|w: &mut World| {
                w.runs += 1;
                // Every vCPU is deposited while a job runs.
                Ok(serde_json::json!(w.deposited.iter().all(Option::is_some)))
            }));
            assert_eq!(got, Ok(serde_json::json!(true)));
        }
        assert_eq!(control.pause(), VmState::Paused);
        assert_eq!(control.resume(), VmState::Running);
        let c = Arc::clone(&control);
        let stopper = std::thread::spawn(move || c.shutdown());
        for t in threads {
            assert_eq!(t.join().unwrap(), None);
        }
        let world = control.take().unwrap();
        assert_eq!(world.runs, 20);
        assert!(world.deposited.iter().all(Option::is_some), "every vCPU came back");
        control.exited();
        stopper.join().unwrap();
        assert_eq!(control.state(), VmState::Exited);
        assert!(control.call(Box::new(|_| Ok(serde_json::Value::Null))).is_err(), "no jobs after the end");
        assert!(control.lease_ram().is_none());
    }

    #[test]
    fn an_abort_ends_every_vcpu_with_its_reason() {
        let (control, threads) = start(2);
        control.abort("the image is damaged".into());
        for t in threads {
            assert_eq!(t.join().unwrap().as_deref(), Some("the image is damaged"));
        }
    }
}
