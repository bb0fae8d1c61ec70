//! A lazy restore's check of its base image, beside the running guest.
//!
//! Reading 1 GiB up front would defeat the lazy start, so the image's chunk
//! checksums are checked on another thread while the guest runs. A mismatch
//! aborts the VM at the vCPU's next stop ([`VmControl::abort`] kicks it out
//! of the guest) with the error; the run also waits for the check before it
//! reports success.

use std::sync::Arc;

use crate::control::VmControl;
use crate::snapshot::format::Chunk;

use super::Machine;

/// The running check: its thread, and its failure once it has one.
#[derive(Debug)]
pub struct Verifier {
    failed: Arc<std::sync::Mutex<Option<String>>>,
    thread: std::thread::JoinHandle<()>,
}

/// The check a [`Verifier`] runs, handed to the thread that runs it.
#[derive(Debug)]
pub struct VerifyJob {
    file: std::fs::File,
    chunks: Vec<Chunk>,
    failed: Arc<std::sync::Mutex<Option<String>>>,
    control: Arc<VmControl<Machine>>,
}

impl VerifyJob {
    /// Checks the chunks; a mismatch is recorded and aborts the VM.
    pub fn run(self) {
        // Background work: its wakeups must not preempt the vCPU thread,
        // and under a real-time parent (`chrt`) it must not starve the
        // kernel workers on its CPU either (a restore's memslot
        // registration waits for an SRCU grace period that runs on
        // them: measured 0.6–0.9 s when this thread kept SCHED_FIFO).
        let _batch = crate::snapshot::diff::BatchPolicy::enter();
        if let Err(e) = crate::snapshot::memory_file::verify(&self.file, &self.chunks) {
            let why = crate::error_chain(&e);
            *self.failed.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(why.clone());
            self.control.abort(why);
        }
    }
}

impl Verifier {
    /// Starts checking `chunks` of `file` on the thread `hand_over` gives
    /// the job to and whose handle it returns; that thread must call
    /// [`VerifyJob::run`]. A restore hands it to its KVM thread, which
    /// exists already, sparing a thread start before the guest runs.
    /// `control` is the VM's, which a mismatch aborts.
    #[must_use]
    pub fn start_on(file: std::fs::File, chunks: Vec<Chunk>, control: Arc<VmControl<Machine>>, hand_over: impl FnOnce(VerifyJob) -> std::thread::JoinHandle<()>) -> Self {
        let failed = Arc::new(std::sync::Mutex::new(None));
        let thread = hand_over(VerifyJob { file, chunks, failed: Arc::clone(&failed), control });
        Verifier { failed, thread }
    }

    /// Waits for the check to end; its failure, if any.
    pub(super) fn finish(self) -> Option<String> {
        let _ = self.thread.join();
        self.failed.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take()
    }
}
