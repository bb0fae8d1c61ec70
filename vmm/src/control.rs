//! Run control shared between the vCPU loop and the control socket:
//! pause, resume, shutdown, and the state the socket reports.
//!
//! The vCPU loop checks for requests before every `KVM_RUN`; a request kicks
//! the vCPU thread out of `KVM_RUN` with a signal (the handler does nothing;
//! `KVM_RUN` returns `EINTR`). A signal that lands just before `KVM_RUN` is
//! caught by the next kick, sent every millisecond until the loop answers.

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

#[derive(Debug)]
struct Inner {
    state: VmState,
    pause_requested: bool,
    shutdown_requested: bool,
    vcpu_thread: Option<libc::pthread_t>,
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
            inner: Mutex::new(Inner { state: VmState::Starting, pause_requested: false, shutdown_requested: false, vcpu_thread: None }),
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

    /// Called by the vCPU thread before each `KVM_RUN`: blocks while a pause
    /// is requested; returns `false` when the VM must stop.
    #[must_use]
    pub fn may_run(&self) -> bool {
        let mut g = self.lock();
        loop {
            if g.shutdown_requested {
                return false;
            }
            if !g.pause_requested {
                if g.state == VmState::Paused {
                    g.state = VmState::Running;
                    self.changed.notify_all();
                }
                return true;
            }
            if g.state != VmState::Paused {
                g.state = VmState::Paused;
                self.changed.notify_all();
            }
            g = self.changed.wait(g).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    /// Called by the vCPU thread when the guest idles: waits until shutdown.
    pub fn wait_while_idle(&self) {
        let mut g = self.lock();
        g.state = VmState::Idle;
        self.changed.notify_all();
        while !g.shutdown_requested {
            g = self.changed.wait(g).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    /// Called when the VM has ended.
    pub fn exited(&self) {
        let mut g = self.lock();
        g.state = VmState::Exited;
        g.vcpu_thread = None;
        self.changed.notify_all();
    }

    /// Pauses the vCPU and waits until it is out of guest code. Returns the
    /// state reached (an idle or exited VM stays as it is).
    pub fn pause(&self) -> VmState {
        let mut g = self.lock();
        if matches!(g.state, VmState::Exited | VmState::Idle) {
            return g.state;
        }
        g.pause_requested = true;
        while !matches!(g.state, VmState::Paused | VmState::Exited | VmState::Idle) {
            if let Some(t) = g.vcpu_thread {
                // SAFETY: the thread id is live while state is Running (it is
                // cleared under this lock before the thread ends).
                unsafe { libc::pthread_kill(t, kick_signal()) };
            }
            g = self.changed.wait_timeout(g, Duration::from_millis(1)).unwrap_or_else(std::sync::PoisonError::into_inner).0;
        }
        g.state
    }

    /// Resumes a paused vCPU.
    pub fn resume(&self) -> VmState {
        let mut g = self.lock();
        g.pause_requested = false;
        self.changed.notify_all();
        while g.state == VmState::Paused {
            g = self.changed.wait_timeout(g, Duration::from_millis(1)).unwrap_or_else(std::sync::PoisonError::into_inner).0;
        }
        g.state
    }

    /// Asks the VM to end and waits until it has.
    pub fn shutdown(&self) {
        let mut g = self.lock();
        g.shutdown_requested = true;
        self.changed.notify_all();
        while g.state != VmState::Exited {
            if let (VmState::Running, Some(t)) = (g.state, g.vcpu_thread) {
                // SAFETY: as in `pause`.
                unsafe { libc::pthread_kill(t, kick_signal()) };
            }
            g = self.changed.wait_timeout(g, Duration::from_millis(1)).unwrap_or_else(std::sync::PoisonError::into_inner).0;
        }
    }

    /// Whether shutdown was requested.
    #[must_use]
    pub fn shutdown_requested(&self) -> bool {
        self.lock().shutdown_requested
    }
}
