//! The virtio-balloon device (virtio 1.2 §5.5) behind the MMIO transport.
//!
//! Queues, in index order among those whose feature was negotiated (as
//! Linux's driver numbers them): inflate, deflate, stats
//! (`VIRTIO_BALLOON_F_STATS_VQ`), free page reporting
//! (`VIRTIO_BALLOON_F_REPORTING`). Inflate and deflate buffers are arrays
//! of 32-bit PFNs (4 KiB frames); every PFN is checked against guest RAM
//! and the balloon's page set ([`super::pages`]) before anything happens,
//! and host memory is released through [`super::reclaim`] only for whole
//! host pages, by the device's release thread ([`super::worker`], which
//! also says when the guest may have a page back). `VIRTIO_BALLOON_F_DEFLATE_ON_OOM`
//! needs nothing from the device: the driver may deflate below the target,
//! which is always honoured. `VIRTIO_BALLOON_F_MUST_TELL_HOST` is offered:
//! a driver that accepts it promises to use no ballooned page before its
//! deflate is acknowledged, which lets the device acknowledge an inflate
//! before the host pages are released.


use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory as _};

use memvisor_abi::layout::{MMIO_HOLE_END, MMIO_HOLE_START};
use memvisor_abi::virtio::{CONFIG_ACTUAL, CONFIG_NUM_PAGES, CONFIG_SIZE, DEVICE_ID_BALLOON, F_DEFLATE_ON_OOM, F_MUST_TELL_HOST, F_REPORTING, F_STATS_VQ, F_VERSION_1};

use super::metrics::{BalloonMetrics, bump};
use super::pages::{BalloonPages, PAGE, RunOutcome, inner_units, merge_runs, pfn_runs};
use super::reclaim;
use super::stats::{GuestStats, MAX_ENTRIES};
use super::worker::{BatchKind, ReleaseWorker};
use crate::devices::virtio::{TransportReject, VirtioDevice};
use crate::memory::{GuestMemory, GuestRam};

/// Size of every balloon queue (a power of two; virtio 1.2 §2.7).
pub const QUEUE_SIZE: u16 = 256;
/// PFNs read from guest memory per step (bounds the VMM's buffer whatever
/// length a descriptor claims).
const PFN_CHUNK: usize = 4096;

/// What a queue is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Role {
    Inflate,
    Deflate,
    Stats,
    Reporting,
}

/// The balloon's state as `balloon get` and the run report show it.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct BalloonInfo {
    /// The host's target, bytes.
    pub target_bytes: u64,
    /// What the driver says it holds (`actual`), bytes.
    pub actual_bytes: u64,
    /// Pages the device holds in the balloon, bytes.
    pub balloon_bytes: u64,
    /// Of those, bytes whose host pages were handed back: their release
    /// call (MADV_DONTNEED or a punched hole) returned successfully. A
    /// release the kernel refused does not count here (its pages stay
    /// resident until the guest deflates them; `metrics.release_errors`
    /// and `metrics.release_failed_bytes` count it), nor does one still
    /// queued (`releasing_bytes`).
    pub reclaimed_bytes: u64,
    /// Of those, bytes whose host pages are complete and queued for
    /// release on the device's release thread, or being released.
    #[serde(default)]
    pub releasing_bytes: u64,
    /// Of those, bytes waiting for the rest of their huge host page.
    pub pending_bytes: u64,
    /// The host page size releases are made in.
    pub host_page_bytes: u64,
    /// Whether the driver finished its set-up (`DRIVER_OK`).
    pub driver_ok: bool,
    /// Features the driver accepted.
    pub features: u64,
    /// Counters.
    pub metrics: BalloonMetrics,
}

/// The balloon device.
#[derive(Debug)]
pub struct Balloon {
    pub(super) acked: u64,
    pub(super) target_pages: u32,
    pub(super) actual_pages: u32,
    pub(super) pages: BalloonPages,
    pub(super) ram_bytes: u64,
    /// PFNs the notification being processed may still carry (reset to
    /// guest RAM's page count by each [`VirtioDevice::process_queue`]).
    pub(super) pfn_budget: u64,
    pub(super) host_page: u64,
    /// Metrics (read by the transport's owner).
    pub metrics: BalloonMetrics,
    pub(super) stats: Option<GuestStats>,
    /// The stats buffer the device holds until it wants fresh numbers.
    pub(super) stats_head: Option<u16>,
    pub(super) stats_requested: bool,
    pub(super) driver_ok: bool,
    /// When the target last changed, and which milestones since were timed.
    pub(super) clock: Option<TargetClock>,
    /// The thread that makes the release calls.
    pub(super) worker: ReleaseWorker,
}

/// Times from a target change to what followed it (the benchmark's clock).
#[derive(Debug, Clone, Copy)]
pub(super) struct TargetClock {
    at: std::time::Instant,
    inflate_seen: bool,
    met: bool,
}

fn ns_since(at: std::time::Instant) -> u64 {
    u64::try_from(at.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

impl Balloon {
    /// A balloon for `ram` with an initial target of `target_bytes`.
    #[must_use]
    pub fn new(ram: &GuestRam, target_bytes: u64) -> Self {
        let host_page = reclaim::host_page_size(ram);
        Balloon {
            acked: 0,
            target_pages: u32::try_from(target_bytes / PAGE).unwrap_or(u32::MAX),
            actual_pages: 0,
            pages: BalloonPages::new(ram.size(), host_page),
            ram_bytes: ram.size(),
            pfn_budget: ram.size() / PAGE,
            host_page,
            metrics: BalloonMetrics::default(),
            stats: None,
            stats_head: None,
            stats_requested: false,
            driver_ok: false,
            clock: None,
            worker: ReleaseWorker::start(reclaim::RamView::of(ram), ram.size(), host_page),
        }
    }

    /// Sets the target; returns whether it changed (the transport then
    /// raises a configuration-change interrupt).
    pub fn set_target(&mut self, bytes: u64) -> bool {
        let pages = u32::try_from(bytes / PAGE).unwrap_or(u32::MAX);
        let changed = pages != self.target_pages;
        self.target_pages = pages;
        if changed {
            let at = std::time::Instant::now();
            self.clock = Some(TargetClock { at, inflate_seen: false, met: false });
            // The release thread times the reclaim (it makes the calls).
            self.worker.set_goal(Some(at), u64::from(pages) * PAGE);
            // The timings are of this change: none is stale.
            let m = &mut self.metrics;
            (m.last_target_to_inflate_ns, m.last_target_to_reclaimed_ns, m.last_target_to_actual_ns) = (0, 0, 0);
        }
        changed
    }

    /// Waits until every release queued so far has been made: then the
    /// host pages [`Balloon::released_ram_ranges`] names are released, and
    /// no release changes guest memory until the next notification. A
    /// snapshot or migration calls this with every vCPU parked, before it
    /// reads guest memory.
    pub fn finish_releases(&self) {
        self.worker.drain();
    }

    /// The metrics, with the release thread's counts folded in.
    #[must_use]
    pub fn metrics(&self) -> BalloonMetrics {
        let c = self.worker.counts();
        let mut m = self.metrics.clone();
        m.released_bytes = m.released_bytes.saturating_add(c.totals.bytes);
        m.release_calls = m.release_calls.saturating_add(c.totals.calls);
        m.release_errors = m.release_errors.saturating_add(c.totals.errors);
        m.release_failed_bytes = m.release_failed_bytes.saturating_add(c.totals.failed_bytes);
        m.release_ns = m.release_ns.saturating_add(c.totals.ns);
        m.reported_released_bytes = m.reported_released_bytes.saturating_add(c.reported_bytes);
        m.last_target_to_reclaimed_ns = m.last_target_to_reclaimed_ns.max(c.reclaimed_ns);
        m
    }

    /// The current state.
    #[must_use]
    pub fn info(&self) -> BalloonInfo {
        let c = self.worker.counts();
        BalloonInfo {
            target_bytes: u64::from(self.target_pages) * PAGE,
            actual_bytes: u64::from(self.actual_pages) * PAGE,
            balloon_bytes: self.pages.pages() * PAGE,
            reclaimed_bytes: c.reclaimed_bytes,
            releasing_bytes: c.releasing_bytes,
            pending_bytes: self.pages.pending_pages() * PAGE,
            host_page_bytes: self.host_page,
            driver_ok: self.driver_ok,
            features: self.acked,
            metrics: self.metrics(),
        }
    }

    /// The guest's last statistics.
    #[must_use]
    pub fn stats(&self) -> Option<&GuestStats> {
        self.stats.as_ref()
    }

    /// Asks the driver for fresh statistics (its buffer is handed back at
    /// the next [`VirtioDevice::pending_used`]); false when there is no
    /// stats queue or buffer.
    pub fn request_stats(&mut self) -> bool {
        if self.acked & F_STATS_VQ == 0 || self.stats_head.is_none() {
            return false;
        }
        self.stats_requested = true;
        true
    }

    pub(super) fn roles(&self) -> Vec<Role> {
        let mut r = vec![Role::Inflate, Role::Deflate];
        if self.acked & F_STATS_VQ != 0 {
            r.push(Role::Stats);
        }
        if self.acked & F_REPORTING != 0 {
            r.push(Role::Reporting);
        }
        r
    }

    /// The chain's descriptors, or `None` (counted) for a chain whose head
    /// index is outside the table, that loops or runs past the table, or
    /// that names memory outside guest RAM.
    fn descriptors(&mut self, chain: DescriptorChain<&GuestMemory>, mem: &GuestMemory) -> Option<Vec<Descriptor>> {
        let mut out = Vec::new();
        let mut unfinished = false;
        for d in chain {
            unfinished = d.has_next();
            out.push(d);
        }
        if out.is_empty() {
            // virtio-queue yields nothing for a head index of queue size or
            // more (virtio 1.2 §2.7.6) or an unreadable head descriptor.
            bump(&mut self.metrics.bad_head_descriptor);
            return None;
        }
        if unfinished {
            bump(&mut self.metrics.chain_too_long);
            return None;
        }
        for d in &out {
            let len = u64::from(d.len());
            if len == 0 || d.addr().0.checked_add(len).is_none() || !mem.check_range(d.addr(), len as usize, vm_memory::Permissions::Read) {
                bump(&mut self.metrics.descriptor_outside_ram);
                return None;
            }
        }
        Some(out)
    }

    /// The RAM page of a guest PFN, counting a refusal.
    fn ram_page(&mut self, pfn: u32, ram: &GuestRam) -> Option<u64> {
        let gpa = u64::from(pfn) << memvisor_abi::virtio::BALLOON_PAGE_SHIFT;
        match ram.ram_offset_of(gpa) {
            Some(off) => Some(off / PAGE),
            None if (MMIO_HOLE_START..MMIO_HOLE_END).contains(&gpa) => {
                bump(&mut self.metrics.pfn_in_hole);
                None
            }
            None => {
                bump(&mut self.metrics.pfn_outside_ram);
                None
            }
        }
    }

    /// Reads the PFN arrays of `descs` and applies `f` to each run of
    /// consecutive PFNs, as `(first PFN, count)`, in array order. Runs are
    /// cut at the VMM's read chunk; nothing is assumed about the values.
    fn for_each_run(&mut self, descs: &[Descriptor], mem: &GuestMemory, mut f: impl FnMut(&mut Self, u32, u32)) {
        let mut pfns = vec![0u32; PFN_CHUNK];
        for d in descs {
            if d.is_write_only() || d.len() % 4 != 0 {
                bump(&mut self.metrics.descriptor_malformed);
                continue;
            }
            let mut done = 0u64;
            let len = u64::from(d.len());
            while done < len {
                let want = (len - done) / 4;
                if self.pfn_budget == 0 {
                    self.metrics.pfns_over_budget = self.metrics.pfns_over_budget.saturating_add(want);
                    break;
                }
                let n = want.min(PFN_CHUNK as u64).min(self.pfn_budget) as usize;
                self.pfn_budget -= n as u64;
                let chunk = &mut pfns[..n];
                // SAFETY: the bytes of `chunk`, a plain u32 slice: any byte
                // pattern is a valid u32, and the view lives only for the
                // read below.
                let bytes = unsafe { std::slice::from_raw_parts_mut(chunk.as_mut_ptr().cast::<u8>(), n * 4) };
                if mem.read_slice(bytes, GuestAddress(d.addr().0 + done)).is_err() {
                    bump(&mut self.metrics.descriptor_outside_ram);
                    break;
                }
                // PFNs are little-endian (virtio 1.2 §5.5.6); a no-op on x86.
                chunk.iter_mut().for_each(|p| *p = u32::from_le(*p));
                pfn_runs(chunk, |first, count| f(self, first, count));
                done += n as u64 * 4;
            }
        }
    }

    /// The RAM pages of the PFN run `[pfn, pfn + count)` when all of them
    /// are contiguous guest RAM: `(first RAM page, count)`.
    fn ram_run(pfn: u32, count: u32, ram: &GuestRam) -> Option<(u64, u64)> {
        let shift = memvisor_abi::virtio::BALLOON_PAGE_SHIFT;
        let (first, last) = (u64::from(pfn) << shift, (u64::from(pfn) + u64::from(count) - 1) << shift);
        let (a, b) = (ram.ram_offset_of(first)?, ram.ram_offset_of(last)?);
        // Regions are in guest-physical order with gaps between them: equal
        // spans mean no gap inside the run.
        (b - a == last - first).then_some((a / PAGE, u64::from(count)))
    }

    fn inflate(&mut self, descs: &[Descriptor], ram: &GuestRam) {
        let mut release: Vec<(u64, u64)> = Vec::new();
        let mut add = |first: u64, count: u64| match release.last_mut() {
            Some((f, c)) if *f + *c == first => *c += count,
            _ => release.push((first, count)),
        };
        let count = |m: &mut BalloonMetrics, o: RunOutcome| {
            m.inflated_pages = m.inflated_pages.saturating_add(o.accepted);
            m.partial_host_page_pieces = m.partial_host_page_pieces.saturating_add(o.pending);
            m.duplicate_pfn = m.duplicate_pfn.saturating_add(o.duplicates);
        };
        self.for_each_run(descs, ram.memory(), |b, pfn, n| {
            if let Some((page, n)) = Self::ram_run(pfn, n, ram)
                && let Ok(o) = b.pages.inflate_run(page, n, &mut add)
            {
                count(&mut b.metrics, o);
                return;
            }
            // Not all RAM: page by page (runs of one), so each refusal is
            // counted.
            for pfn in (0..n).filter_map(|i| pfn.checked_add(i)) {
                let Some(page) = b.ram_page(pfn, ram) else { continue };
                match b.pages.inflate_run(page, 1, &mut add) {
                    Ok(o) => count(&mut b.metrics, o),
                    Err(_) => bump(&mut b.metrics.pfn_outside_ram),
                }
            }
        });
        let hp = self.host_page;
        let ranges: Vec<(u64, u64)> = merge_runs(release).into_iter().map(|(first, count)| (first * hp, count * hp)).collect();
        if ranges.is_empty() {
            return;
        }
        let seq = self.worker.submit(BatchKind::Inflate, ranges);
        if self.acked & F_MUST_TELL_HOST == 0 {
            // The driver may use ballooned pages once the inflate is
            // acknowledged (virtio 1.2 §5.5.6.1): they must be released by
            // then.
            self.worker.wait_for(seq);
        }
    }

    fn deflate(&mut self, descs: &[Descriptor], ram: &GuestRam) {
        let count = |m: &mut BalloonMetrics, asked: u64, taken: u64| {
            m.deflated_pages = m.deflated_pages.saturating_add(taken);
            m.deflate_not_in_balloon = m.deflate_not_in_balloon.saturating_add(asked - taken);
        };
        // A deflated page may have been released, and snapshots skip
        // released pages: marking it changed puts it in the next diff.
        // Its release must be done before the guest has it back (the
        // worker's module docs); every host page it touches is then no
        // longer complete, so no longer released.
        let give_back = |b: &mut Self, page: u64, n: u64| {
            b.worker.wait_overlapping(page * PAGE, n * PAGE);
            let taken = b.pages.deflate_run(page, n);
            if let Ok(t) = taken
                && t > 0
            {
                b.worker.forget(page * PAGE, n * PAGE);
                reclaim::mark_changed(ram, page * PAGE, n * PAGE);
            }
            taken
        };
        self.for_each_run(descs, ram.memory(), |b, pfn, n| {
            if let Some((page, n)) = Self::ram_run(pfn, n, ram)
                && let Ok(taken) = give_back(b, page, n)
            {
                count(&mut b.metrics, n, taken);
                return;
            }
            // As for inflate: page by page.
            for pfn in (0..n).filter_map(|i| pfn.checked_add(i)) {
                let Some(page) = b.ram_page(pfn, ram) else { continue };
                match give_back(b, page, 1) {
                    Ok(taken) => count(&mut b.metrics, 1, taken),
                    Err(_) => bump(&mut b.metrics.deflate_not_in_balloon),
                }
            }
        });
    }

    fn report(&mut self, descs: &[Descriptor], ram: &GuestRam) {
        let mut ranges = Vec::new();
        for d in descs {
            let (gpa, len) = (d.addr().0, u64::from(d.len()));
            // One RAM region, so RAM offsets are contiguous over the range.
            let (Some(first), Some(last)) = (ram.ram_offset_of(gpa), ram.ram_offset_of(gpa + len - 1)) else {
                bump(&mut self.metrics.descriptor_outside_ram);
                continue;
            };
            if last - first != len - 1 {
                bump(&mut self.metrics.descriptor_outside_ram);
                continue;
            }
            self.metrics.reported_bytes = self.metrics.reported_bytes.saturating_add(len);
            if let Some((unit, count)) = inner_units(first, len, self.host_page) {
                ranges.push((unit * self.host_page, count * self.host_page));
            }
        }
        if !ranges.is_empty() {
            // The driver reuses reported pages once the report is used:
            // released by then.
            let seq = self.worker.submit(BatchKind::Report, ranges);
            self.worker.wait_for(seq);
        }
    }

    fn take_stats(&mut self, descs: &[Descriptor], mem: &GuestMemory) {
        let Some(d) = descs.first() else { return };
        let n = (d.len() as usize).min(MAX_ENTRIES * memvisor_abi::virtio::stat::ENTRY_SIZE);
        let mut buf = vec![0u8; n];
        if mem.read_slice(&mut buf, d.addr()).is_ok() {
            self.stats = Some(GuestStats::parse(&buf));
            bump(&mut self.metrics.stats_updates);
        }
    }
}

impl VirtioDevice for Balloon {
    fn device_id(&self) -> u32 {
        DEVICE_ID_BALLOON
    }

    fn features(&self) -> u64 {
        F_VERSION_1 | F_MUST_TELL_HOST | F_STATS_VQ | F_DEFLATE_ON_OOM | F_REPORTING
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features & self.features();
    }

    fn acked_features(&self) -> u64 {
        self.acked
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; self.roles().len()]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut space = [0u8; CONFIG_SIZE as usize];
        space[CONFIG_NUM_PAGES as usize..][..4].copy_from_slice(&self.target_pages.to_le_bytes());
        space[CONFIG_ACTUAL as usize..][..4].copy_from_slice(&self.actual_pages.to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset).ok().and_then(|o| o.checked_add(i)).and_then(|o| space.get(o)).copied().unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` is driver-writable (§5.5.4).
        let mut actual = self.actual_pages.to_le_bytes();
        for (i, b) in data.iter().enumerate() {
            let o = offset.saturating_add(i as u64);
            if (CONFIG_ACTUAL..CONFIG_ACTUAL + 4).contains(&o) {
                actual[(o - CONFIG_ACTUAL) as usize] = *b;
            }
        }
        self.actual_pages = u32::from_le_bytes(actual);
        if let Some(c) = self.clock.as_mut().filter(|c| !c.met && self.actual_pages == self.target_pages) {
            c.met = true;
            self.metrics.last_target_to_actual_ns = ns_since(c.at);
        }
    }

    fn process_queue(&mut self, index: usize, queue: &mut Queue, ram: &GuestRam) -> bool {
        let Some(&role) = self.roles().get(index) else {
            bump(&mut self.metrics.bad_notify);
            return false;
        };
        let mem = ram.memory();
        // A notification's PFN arrays together name at most every page of
        // RAM once; what goes beyond is refused unread, so the work one
        // notification can cause is bounded by RAM, not by queue size ×
        // buffer length.
        self.pfn_budget = self.ram_bytes / PAGE;
        let chains: Vec<_> = match queue.iter(mem) {
            Ok(it) => it.collect(),
            Err(_) => {
                // The available index ran more than a queue ahead.
                bump(&mut self.metrics.descriptor_malformed);
                return false;
            }
        };
        let mut used = false;
        for chain in chains {
            let head = chain.head_index();
            let descs = self.descriptors(chain, mem);
            let mut hold = false;
            if let Some(descs) = descs {
                match role {
                    Role::Inflate => {
                        let t = std::time::Instant::now();
                        if let Some(c) = self.clock.as_mut().filter(|c| !c.inflate_seen) {
                            c.inflate_seen = true;
                            self.metrics.last_target_to_inflate_ns = ns_since(c.at);
                        }
                        self.inflate(&descs, ram);
                        let ns = ns_since(t);
                        self.metrics.inflate_ns = self.metrics.inflate_ns.saturating_add(ns);
                    }
                    Role::Deflate => self.deflate(&descs, ram),
                    Role::Reporting => self.report(&descs, ram),
                    Role::Stats => {
                        self.take_stats(&descs, mem);
                        // Held until the host wants fresh numbers; a
                        // previously held buffer goes back now.
                        if let Some(old) = self.stats_head.replace(head) {
                            used |= queue.add_used(mem, old, 0).is_ok();
                        }
                        hold = true;
                    }
                }
            }
            if !hold {
                used |= queue.add_used(mem, head, 0).is_ok();
            }
        }
        used
    }

    fn pending_used(&mut self, queues: &mut [Queue], ram: &GuestRam) -> bool {
        if !self.stats_requested {
            return false;
        }
        self.stats_requested = false;
        let Some(i) = self.roles().iter().position(|r| *r == Role::Stats) else { return false };
        let (Some(head), Some(q)) = (self.stats_head.take(), queues.get_mut(i)) else { return false };
        q.add_used(ram.memory(), head, 0).is_ok()
    }

    fn set_driver_ok(&mut self, ok: bool) {
        self.driver_ok = ok;
    }

    fn reset(&mut self) {
        // After a reset all memory is the guest's again (a new driver starts
        // with an empty balloon, as after a reboot): pages released so far
        // read as zero and fault back in on touch, once their releases are
        // done.
        self.worker.drain();
        self.worker.forget_all();
        self.pages = BalloonPages::new(self.ram_bytes, self.host_page);
        self.acked = 0;
        self.actual_pages = 0;
        self.stats_head = None;
        self.stats_requested = false;
        self.driver_ok = false;
        self.clock = None;
    }

    fn transport_rejected(&mut self, what: TransportReject) {
        let m = &mut self.metrics;
        bump(match what {
            TransportReject::BadQueueSize => &mut m.bad_queue_size,
            TransportReject::BadNotify => &mut m.bad_notify,
            TransportReject::BadQueueAddress => &mut m.bad_queue_address,
            TransportReject::BadRegister => &mut m.bad_register,
            TransportReject::BadStatus => &mut m.bad_status,
        });
    }
}

