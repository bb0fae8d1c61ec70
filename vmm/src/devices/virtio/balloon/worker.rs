//! The balloon's release worker: one thread per balloon device that makes
//! the release system calls, so that the vCPU whose notification asked for
//! them does not wait for them.
//!
//! Releasing 512 MiB of 4 KiB pages takes ~50 ms (`MADV_DONTNEED` plus
//! KVM's MMU notifier dropping every shadow entry); made inside the guest's
//! MMIO write exit, that was 50 ms during which the vCPU was stopped and
//! held the machine, so every other vCPU's exits and every control request
//! waited too. The device ([`super::device`]) now checks the guest's PFNs
//! and does its bookkeeping on the vCPU thread as before, then hands the
//! host-page ranges to release to this worker as one *batch* and returns.
//!
//! # Ordering
//! A host page is *released* only once its system call has returned
//! successfully on this thread. Until then:
//! - **the guest does not get it back**: a deflate waits for every queued
//!   batch that overlaps the pages it takes ([`ReleaseWorker::wait_overlapping`])
//!   before it takes them and acknowledges; a device reset waits for all
//!   of them ([`ReleaseWorker::drain`]). The inflate itself is acknowledged
//!   at once only when the driver negotiated `VIRTIO_BALLOON_F_MUST_TELL_HOST`,
//!   which forbids it to use a ballooned page before the device has
//!   acknowledged its deflate (virtio 1.2 §5.5.6.1); without it the driver
//!   may reuse ballooned pages as soon as the inflate is acknowledged, so
//!   the device waits for the batch before acknowledging. Free page
//!   reports always wait: the driver reuses reported pages as soon as the
//!   report is used.
//! - **it is not counted as reclaimed**: `reclaimed_bytes` is this worker's
//!   count of host pages whose release succeeded and that are still in the
//!   balloon (its `ReleasedPages`); a failed release is counted in the
//!   metrics (`release_errors`, `release_failed_bytes`) and never as
//!   reclaimed; a queued one is `releasing_bytes`.
//! - **no snapshot reads it**: a capture runs with every vCPU parked and
//!   first drains the worker (`Machine::settle_devices`), so the pages it
//!   skips (`released_ram_ranges`) are released and none is zeroed while
//!   it is copied.
//!
//! The worker marks each released range in the VMM-write bitmap
//! ([`super::reclaim::RamView::release`]), as the device did before.
//!
//! # Lifetime
//! The worker holds guest RAM only as addresses ([`RamView`]), so the RAM
//! must outlive every batch: dropping the worker drains it and joins the
//! thread, the balloon is dropped before the VM's RAM (`Machine`'s `Drop`),
//! and a batch is only queued by the device while it serves the VM. When
//! the thread cannot be started, batches are released on the caller's
//! thread instead (logged): slower, never wrong.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use super::reclaim::{RamView, Released};

/// What a batch is for (it decides what its releases count towards).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchKind {
    /// Host pages the balloon completed: counted as released and, once
    /// done, as reclaimed.
    Inflate,
    /// Free page reporting: counted as released (and reported-released),
    /// not reclaimed (the pages are not in the balloon).
    Report,
    /// A restore releasing again what the snapshot's balloon held:
    /// reclaimed once done, not counted again as released (the saved
    /// metrics already count it).
    Restore,
}

/// Ranges of RAM to release, as one unit of waiting.
#[derive(Debug)]
struct Batch {
    seq: u64,
    kind: BatchKind,
    /// RAM byte ranges `(offset, length)`, whole host pages.
    ranges: Vec<(u64, u64)>,
}

impl Batch {
    fn overlaps(&self, start: u64, len: u64) -> bool {
        self.ranges.iter().any(|&(s, n)| s < start.saturating_add(len) && start < s.saturating_add(n))
    }

    fn bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.1).sum()
    }
}

/// Which host pages are released, and their bytes.
#[derive(Debug)]
struct ReleasedPages {
    /// One bit per host page.
    bits: Vec<u64>,
    host_page: u64,
    ram_bytes: u64,
    /// Bytes of the host pages whose bit is set (the last one may be cut
    /// short by the end of RAM).
    bytes: u64,
}

impl ReleasedPages {
    fn new(ram_bytes: u64, host_page: u64) -> Self {
        ReleasedPages { bits: vec![0; ram_bytes.div_ceil(host_page).div_ceil(64) as usize], host_page, ram_bytes, bytes: 0 }
    }

    fn page_bytes(&self, h: u64) -> u64 {
        self.host_page.min(self.ram_bytes.saturating_sub(h * self.host_page))
    }

    /// Host pages `[first, end)` (clamped to RAM).
    fn host_pages(&self, start: u64, len: u64) -> std::ops::Range<u64> {
        let first = start / self.host_page;
        let end = start.saturating_add(len).min(self.ram_bytes).div_ceil(self.host_page);
        first..end.max(first)
    }

    /// Sets the host pages wholly inside RAM bytes `[start, start + len)`.
    fn set(&mut self, start: u64, len: u64) {
        for h in self.host_pages(start, len) {
            let (w, b) = ((h / 64) as usize, 1u64 << (h % 64));
            if self.bits[w] & b == 0 {
                self.bits[w] |= b;
                self.bytes += self.page_bytes(h);
            }
        }
    }

    /// Clears the host pages touching RAM bytes `[start, start + len)`.
    fn clear(&mut self, start: u64, len: u64) {
        for h in self.host_pages(start, len) {
            let w = (h / 64) as usize;
            if self.bits[w] == 0 {
                continue;
            }
            let b = 1u64 << (h % 64);
            if self.bits[w] & b != 0 {
                self.bits[w] &= !b;
                self.bytes -= self.page_bytes(h);
            }
        }
    }

    fn clear_all(&mut self) {
        self.bits.fill(0);
        self.bytes = 0;
    }
}

/// The target whose reclaim the device times (`last_target_to_reclaimed_ns`).
#[derive(Debug, Clone, Copy)]
struct Goal {
    at: Instant,
    bytes: u64,
}

/// The worker's state, behind one lock.
#[derive(Debug)]
struct State {
    queue: VecDeque<Batch>,
    /// The batch being released, if any.
    current: Option<Batch>,
    next_seq: u64,
    /// Every batch up to this sequence number is done.
    done_seq: u64,
    stop: bool,
    /// Counts of the inflate and report batches' calls.
    totals: Released,
    /// Of `totals.bytes`, those of free page reports.
    reported_bytes: u64,
    released: ReleasedPages,
    goal: Option<Goal>,
    /// Nanoseconds from the goal's target change to the batch that
    /// reclaimed it, 0 until then.
    reclaimed_ns: u64,
}

impl State {
    /// Records a finished batch.
    fn finish(&mut self, batch: &Batch, result: Released, succeeded: &[(u64, u64)]) {
        if batch.kind != BatchKind::Report {
            for &(s, n) in succeeded {
                self.released.set(s, n);
            }
        }
        if batch.kind != BatchKind::Restore {
            self.totals.add(result);
        }
        if batch.kind == BatchKind::Report {
            self.reported_bytes = self.reported_bytes.saturating_add(result.bytes);
        }
        if let Some(g) = self.goal
            && self.released.bytes >= g.bytes
            && batch.kind == BatchKind::Inflate
        {
            self.reclaimed_ns = u64::try_from(g.at.elapsed().as_nanos()).unwrap_or(u64::MAX).max(1);
            self.goal = None;
        }
        self.done_seq = batch.seq;
    }
}

/// State shared by the device and the worker thread.
#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    view: RamView,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock means a panic elsewhere; the counts stay usable.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn wait<'a>(&self, g: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.changed.wait(g).unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Releases `batch` (no lock held) and records it; it is no longer
    /// the current batch then.
    fn run(&self, batch: &Batch) {
        let mut result = Released::default();
        let mut succeeded = Vec::new();
        for &(start, len) in &batch.ranges {
            // SAFETY: the RAM outlives every batch (module docs: the worker
            // is drained and joined before the RAM is unmapped).
            let r = unsafe {
                self.view.release(start, len, |s, n, ok| {
                    if ok {
                        succeeded.push((s, n));
                    }
                })
            };
            result.add(r);
        }
        let mut g = self.lock();
        g.finish(batch, result, &succeeded);
        g.current = None;
        drop(g);
        self.changed.notify_all();
    }
}

/// What the worker has done, for the device's report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerCounts {
    /// Inflate and report releases: bytes, calls, errors, failed bytes, time.
    pub totals: Released,
    /// Of `totals.bytes`, free page reports'.
    pub reported_bytes: u64,
    /// Bytes of host pages released and still in the balloon.
    pub reclaimed_bytes: u64,
    /// Bytes queued or being released.
    pub releasing_bytes: u64,
    /// Nanoseconds from the last target change until a batch made the
    /// reclaimed bytes reach it; 0 until then.
    pub reclaimed_ns: u64,
}

/// The worker of one balloon device.
#[derive(Debug)]
pub struct ReleaseWorker {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ReleaseWorker {
    /// Starts the worker for RAM `view` of `ram_bytes`, released in
    /// `host_page`-byte units. The thread installs the device threads'
    /// seccomp filter (`crate::seccomp`) before it takes any batch.
    #[must_use]
    pub fn start(view: RamView, ram_bytes: u64, host_page: u64) -> Self {
        let state = State {
            queue: VecDeque::new(),
            current: None,
            next_seq: 1,
            done_seq: 0,
            stop: false,
            totals: Released::default(),
            reported_bytes: 0,
            released: ReleasedPages::new(ram_bytes, host_page.max(1)),
            goal: None,
            reclaimed_ns: 0,
        };
        let shared = Arc::new(Shared { state: Mutex::new(state), changed: Condvar::new(), view });
        let worker = Arc::clone(&shared);
        let thread = std::thread::Builder::new().name("balloon".into()).spawn(move || {
            crate::seccomp::apply_or_abort(crate::seccomp::ThreadKind::Device);
            serve(&worker);
        });
        let thread = match thread {
            Ok(t) => Some(t),
            Err(e) => {
                log::warn!("cannot start the balloon's release thread ({e}); releasing on the vCPU thread instead");
                None
            }
        };
        ReleaseWorker { shared, thread }
    }

    /// Queues `ranges` (RAM byte ranges of whole host pages) for release
    /// and returns the batch's sequence number, for [`Self::wait_for`].
    /// Without a thread the batch is released here and now.
    pub fn submit(&self, kind: BatchKind, ranges: Vec<(u64, u64)>) -> u64 {
        let mut g = self.shared.lock();
        let seq = g.next_seq;
        g.next_seq += 1;
        let batch = Batch { seq, kind, ranges };
        if self.thread.is_none() {
            // Callers are serialised by the device (`&mut`), so batches
            // still finish in order.
            drop(g);
            self.shared.run(&batch);
            return seq;
        }
        g.queue.push_back(batch);
        drop(g);
        self.shared.changed.notify_all();
        seq
    }

    /// Waits until batch `seq` and every batch before it are done.
    pub fn wait_for(&self, seq: u64) {
        let mut g = self.shared.lock();
        while g.done_seq < seq {
            g = self.shared.wait(g);
        }
    }

    /// Waits until every batch queued so far is done.
    pub fn drain(&self) {
        let last = self.shared.lock().next_seq - 1;
        self.wait_for(last);
    }

    /// Waits until no queued or running batch overlaps RAM bytes
    /// `[start, start + len)`.
    pub fn wait_overlapping(&self, start: u64, len: u64) {
        let last = {
            let g = self.shared.lock();
            g.current.iter().chain(g.queue.iter()).filter(|b| b.overlaps(start, len)).map(|b| b.seq).max()
        };
        if let Some(seq) = last {
            self.wait_for(seq);
        }
    }

    /// The host pages touching RAM bytes `[start, start + len)` left the
    /// balloon (in part): they are not released any more. Call after
    /// [`Self::wait_overlapping`] on the same range.
    pub fn forget(&self, start: u64, len: u64) {
        self.shared.lock().released.clear(start, len);
    }

    /// Every page left the balloon (a device reset). Call after [`Self::drain`].
    pub fn forget_all(&self) {
        let mut g = self.shared.lock();
        g.released.clear_all();
        g.goal = None;
    }

    /// Starts timing the reclaim of a new target of `bytes` (`None`: stop).
    pub fn set_goal(&self, at: Option<Instant>, bytes: u64) {
        let mut g = self.shared.lock();
        g.goal = at.map(|at| Goal { at, bytes });
        g.reclaimed_ns = 0;
    }

    /// What has been done so far.
    #[must_use]
    pub fn counts(&self) -> WorkerCounts {
        let g = self.shared.lock();
        let releasing = g.current.iter().chain(g.queue.iter()).filter(|b| b.kind != BatchKind::Report).map(Batch::bytes).sum();
        WorkerCounts { totals: g.totals, reported_bytes: g.reported_bytes, reclaimed_bytes: g.released.bytes, releasing_bytes: releasing, reclaimed_ns: g.reclaimed_ns }
    }
}

impl Drop for ReleaseWorker {
    fn drop(&mut self) {
        {
            let mut g = self.shared.lock();
            g.stop = true;
        }
        self.shared.changed.notify_all();
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            log::warn!("the balloon's release thread panicked");
        }
    }
}

/// The worker thread: takes batches in order until stopped with none left.
fn serve(shared: &Shared) {
    loop {
        let batch = {
            let mut g = shared.lock();
            loop {
                if let Some(b) = g.queue.pop_front() {
                    // Still visible to `wait_overlapping` while it is
                    // released: taken off the queue and made current under
                    // one lock.
                    g.current = Some(Batch { seq: b.seq, kind: b.kind, ranges: b.ranges.clone() });
                    break b;
                }
                if g.stop {
                    return;
                }
                g = shared.wait(g);
            }
        };
        shared.run(&batch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Backing, VmConfig};
    use crate::memory::GuestRam;

    fn filled(mem: u64) -> GuestRam {
        let config = VmConfig { mem_size: mem, backing: Backing::Anon, prefault: true, ..VmConfig::default() };
        let ram = GuestRam::new(&config).unwrap();
        let m = &ram.regions()[0].mapping;
        // SAFETY: writing our own fresh mapping.
        unsafe { m.as_ptr().write_bytes(0x5a, m.size()) };
        ram
    }

    fn byte(ram: &GuestRam, off: usize) -> u8 {
        // SAFETY: reading our own mapping, inside it.
        unsafe { *ram.regions()[0].mapping.as_ptr().add(off) }
    }

    #[test]
    fn a_batch_counts_as_reclaimed_only_once_released() {
        let ram = filled(8 << 20);
        let w = ReleaseWorker::start(RamView::of(&ram), 8 << 20, 4096);
        let seq = w.submit(BatchKind::Inflate, vec![(0, 1 << 20), (4 << 20, 1 << 20)]);
        w.wait_for(seq);
        let c = w.counts();
        assert_eq!((c.reclaimed_bytes, c.releasing_bytes, c.totals.bytes, c.totals.errors), (2 << 20, 0, 2 << 20, 0));
        assert_eq!((byte(&ram, 0), byte(&ram, 2 << 20), byte(&ram, 4 << 20)), (0, 0x5a, 0));
        w.forget(0, 4096);
        assert_eq!(w.counts().reclaimed_bytes, (2 << 20) - 4096);
        drop(w);
    }

    #[test]
    fn reports_and_restores_count_apart() {
        let ram = filled(4 << 20);
        let w = ReleaseWorker::start(RamView::of(&ram), 4 << 20, 4096);
        w.submit(BatchKind::Report, vec![(0, 1 << 20)]);
        w.submit(BatchKind::Restore, vec![(1 << 20, 1 << 20)]);
        w.drain();
        let c = w.counts();
        assert_eq!((c.totals.bytes, c.reported_bytes, c.reclaimed_bytes), (1 << 20, 1 << 20, 1 << 20));
    }

    #[test]
    fn a_failed_release_is_not_reclaimed() {
        let ram = filled(4 << 20);
        let w = ReleaseWorker::start(RamView::of(&ram), 4 << 20, 4096);
        // An unaligned length makes madvise refuse (EINVAL needs an unaligned
        // start: ask for one).
        w.submit(BatchKind::Inflate, vec![(100, 4096)]);
        w.drain();
        let c = w.counts();
        assert_eq!((c.reclaimed_bytes, c.totals.errors, c.totals.failed_bytes), (0, 1, 4096));
    }

    #[test]
    fn waiting_for_an_overlap_sees_the_release_done() {
        let ram = filled(64 << 20);
        let w = ReleaseWorker::start(RamView::of(&ram), 64 << 20, 4096);
        for i in 0..16 {
            w.submit(BatchKind::Inflate, vec![(i << 22, 4 << 20)]);
        }
        w.wait_overlapping(60 << 20, 4096);
        assert_eq!(byte(&ram, 60 << 20), 0, "the overlapping batch is done");
        let reclaimed = w.counts().reclaimed_bytes;
        assert!(reclaimed >= 4 << 20, "{reclaimed}");
        w.drain();
        assert_eq!(w.counts().reclaimed_bytes, 64 << 20);
    }

    #[test]
    fn released_pages_count_a_short_last_host_page() {
        let mut r = ReleasedPages::new(5 << 20, 2 << 20);
        r.set(0, 5 << 20);
        assert_eq!(r.bytes, 5 << 20);
        r.clear(4 << 20, 4096);
        assert_eq!(r.bytes, 4 << 20);
        r.clear(0, 1);
        assert_eq!(r.bytes, 2 << 20);
    }
}
