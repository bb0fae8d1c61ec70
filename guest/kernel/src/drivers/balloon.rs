//! The virtio-balloon driver and its service loop (workload `balloon`).
//!
//! The device is the first of the virtio-mmio windows the kernel command
//! line announces (`virtio_mmio.device=SIZE@ADDR:IRQ`, as Linux finds its
//! virtio-mmio devices) that holds a balloon; its interrupt is the IRQ
//! announced with it.
//!
//! The driver follows the host's target (`num_pages`): it inflates by
//! taking blocks from the buddy allocator (the largest that fit the
//! remaining target, up to 1 GiB, so host huge pages empty completely) and deflates by giving them back,
//! after a ring-3 task has written and verified every deflated page. PFN
//! arrays are filled by a ring-3 task too ([`memvisor_user::balloon`]):
//! ring-0 work is O(blocks), never O(pages). Free page reporting hands the
//! device whole free blocks of 2 MiB or more as single descriptors. Stats
//! are refreshed when the device hands their buffer back.
//!
//! Polling: the loop reads the interrupt status when it has nothing to do;
//! the VMM slows that poll down to one exit per millisecond or so.

use memvisor_abi::layout::{PAGE_SIZE, PAGE_SIZE_2M, USER_HEAP_BASE, USER_STACK_TOP};
use memvisor_abi::msg::Report;
use memvisor_abi::virtio::{CONFIG_ACTUAL, CONFIG_NUM_PAGES, CONFIG_SIZE, DEVICE_ID_BALLOON, F_DEFLATE_ON_OOM, F_MUST_TELL_HOST, F_REPORTING, F_STATS_VQ, F_VERSION_1, mmio, stat};
use memvisor_abi::paging::{Pattern, Policy};
use memvisor_abi::workload::{Event, WorkloadKind, WorkloadSpec};
use memvisor_guest_mm::paging::{FrameSource, MapError, PageSize, PageTableEntry as Pte};
use memvisor_user::args::{MAX_RANGES, Range};

use super::virtio_mmio::{Mmio, SetupError, Virtqueue};
use crate::Kernel;
use crate::report;
use crate::task::{self, TaskExit, TaskFrame, user_layout};

/// Blocks per inflate/deflate step (each one run of PFNs and, on deflate,
/// one window of the verifying task).
pub const STEP_BLOCKS: usize = 128;
/// Order of the PFN array: 2^8 pages = 1 MiB = 262144 PFNs (1 GiB per step).
const PFN_BUF_ORDER: usize = 8;
/// PFNs per step.
const STEP_PAGES: u64 = (PAGE_SIZE << PFN_BUF_ORDER) / 4;
/// Up to this many PFNs are written at ring 0 into a scratch page instead
/// of starting a ring-3 task.
const SMALL_PFNS: u64 = 256;
/// Pages of the block list (512 entries each).
const BLOCK_LIST_PAGES: u64 = 4;
/// The order of a 2 MiB block: the smallest block free page reporting
/// reports, and the allocation unit of the OOM allocation.
const ORDER_2M: usize = 9;
/// Inflate takes blocks up to this order (the buddy's largest, 1 GiB):
/// fewer, larger blocks mean less ring-0 work per step, and every block of
/// 2 MiB or more empties whole host huge pages.
const MAX_BLOCK_ORDER: usize = memvisor_guest_mm::buddy::MAX_ORDER;
/// Free page reporting: descriptors per chain, and the largest descriptor.
const REPORT_CHAIN: usize = 32;
const REPORT_MAX_LEN: u64 = 1 << 31;

/// The demand-paging run of `paging=1`: clock replacement, 16 frames for
/// 64 pages, 512 sequential accesses, half of them writes: minor faults on
/// first touches, evictions with write-back, and major faults on pages
/// read back from swap.
const PAGING_WARMUP: WorkloadSpec = WorkloadSpec {
    kind: WorkloadKind::Paging as u32,
    flags: 0,
    params: [Policy::Clock as u64, 16, Pattern::Seq as u64, 64, 512, 1, 50],
};

/// Exit status when the device cannot be driven.
pub const EXIT_NO_BALLOON: u32 = 5;

/// A stack of `(address, order)` blocks in arena pages.
struct BlockList {
    base: *mut u64,
    len: usize,
    cap: usize,
}

impl BlockList {
    fn push(&mut self, addr: u64, order: usize) -> bool {
        if self.len == self.cap {
            return false;
        }
        // SAFETY: len < cap entries of the list's arena pages.
        unsafe { self.base.add(self.len).write_volatile(addr | order as u64) };
        self.len += 1;
        true
    }

    fn pop(&mut self) -> Option<(u64, usize)> {
        self.len = self.len.checked_sub(1)?;
        // SAFETY: len < cap, written by `push`.
        let e = unsafe { self.base.add(self.len).read_volatile() };
        Some((e & !(PAGE_SIZE - 1), (e & (PAGE_SIZE - 1)) as usize))
    }
}

/// The running driver.
pub struct Balloon {
    /// The device's registers.
    pub m: Mmio,
    /// The inflate queue.
    pub inflate: Virtqueue,
    /// The deflate queue.
    pub deflate: Virtqueue,
    /// The stats queue, if negotiated.
    pub stats: Option<Virtqueue>,
    /// The free page reporting queue, if negotiated.
    pub reporting: Option<Virtqueue>,
    /// The device's IRQ (the IOAPIC input its interrupt raises), as announced.
    pub irq: u32,
    blocks: BlockList,
    /// Pages in the balloon.
    pub actual: u64,
    pfn_buf: u64,
    /// An arena page for small PFN arrays.
    pub scratch: u64,
    stats_page: u64,
    /// The features negotiated with the device.
    features: u64,
    /// The ring-3 task that fills PFN arrays, with the array mapped at
    /// `USER_HEAP_BASE`; kept for the driver's life.
    fill_task: Option<TaskFrame>,
}

fn setup_code(e: SetupError) -> u64 {
    match e {
        SetupError::NoDevice => 1,
        SetupError::FeaturesRefused => 2,
        SetupError::NoMemory => 3,
        SetupError::NoQueue => 4,
        SetupError::NoIrqRoute => 5,
    }
}

/// Reports (and prints) that the driver could not start; the status to
/// end with.
pub fn failed(e: SetupError) -> u32 {
    report::send(&Report::Workload { event: Event::BalloonFailed, a: setup_code(e), b: 0 });
    // A failure path: its ~30 µs per console byte do not matter.
    match e {
        SetupError::NoDevice => crate::println!("guest: no balloon: the command line announces no virtio-mmio balloon (no virtio_mmio.device=SIZE@ADDR:IRQ window holds device type 5)"),
        SetupError::FeaturesRefused => crate::println!("guest: no balloon: the device refused the features the driver needs"),
        SetupError::NoMemory => crate::println!("guest: no balloon: out of memory setting it up"),
        SetupError::NoQueue => crate::println!("guest: no balloon: a queue the driver needs is missing or too small"),
        SetupError::NoIrqRoute => crate::println!("guest: no balloon: its IRQ is not an input of the IOAPIC"),
    }
    EXIT_NO_BALLOON
}

/// The balloon among the announced virtio-mmio windows: the first that
/// holds one, with its IRQ. O(windows) probes, each a map call and three
/// register reads.
///
/// # Errors
/// [`SetupError::NoDevice`] when none does (or none is announced),
/// [`SetupError::NoMemory`] when a window cannot be mapped.
fn discover(k: &mut Kernel) -> Result<(Mmio, u32), SetupError> {
    let announced = k.virtio_mmio;
    for window in announced.as_slice() {
        // Too small to hold the registers and the balloon's configuration.
        if window.size < mmio::CONFIG + CONFIG_SIZE {
            continue;
        }
        match Mmio::probe(k, window, DEVICE_ID_BALLOON) {
            Ok(m) => return Ok((m, window.irq)),
            Err(SetupError::NoDevice) => {}
            Err(e) => return Err(e),
        }
    }
    Err(SetupError::NoDevice)
}

impl Balloon {
    /// Finds the device among the announced ones and starts it.
    /// `bad_queue_size` first offers that size for the inflate queue (the
    /// hostile workload).
    ///
    /// # Errors
    /// [`SetupError`].
    pub fn start(k: &mut Kernel, reporting: bool, bad_queue_size: Option<u32>) -> Result<Self, SetupError> {
        let (m, irq) = discover(k)?;
        // MUST_TELL_HOST: this driver always deflates through the queue and
        // waits for the device before it touches a deflated page, so it can
        // promise it (and the device then need not release before it
        // acknowledges an inflate).
        let mut want = F_VERSION_1 | F_MUST_TELL_HOST | F_STATS_VQ | F_DEFLATE_ON_OOM;
        if reporting {
            want |= F_REPORTING;
        }
        let features = m.negotiate(want)?;
        let inflate = Virtqueue::new(k, &m, 0, bad_queue_size)?;
        let deflate = Virtqueue::new(k, &m, 1, None)?;
        let mut next = 2;
        let stats = if features & F_STATS_VQ != 0 {
            next += 1;
            Some(Virtqueue::new(k, &m, next - 1, None)?)
        } else {
            None
        };
        let reporting = if features & F_REPORTING != 0 { Some(Virtqueue::new(k, &m, next, None)?) } else { None };
        let mut arena = || k.mapper.frames.alloc_table().map(|p| p.as_u64()).ok_or(SetupError::NoMemory);
        let scratch = arena()?;
        let stats_page = arena()?;
        // The pool hands out consecutive frames: the list is contiguous.
        let list = arena()?;
        for _ in 1..BLOCK_LIST_PAGES {
            arena()?;
        }
        let pfn_buf = k.frames_alloc(PFN_BUF_ORDER).ok_or(SetupError::NoMemory)?;
        // One ring-3 task, built once, fills every PFN array: building an
        // address space and mapping the array costs milliseconds at ring 0,
        // entering an existing task microseconds.
        let fill_task = TaskFrame::new(k).map_err(|_| SetupError::NoMemory)?;
        fill_task
            .space
            .map(&mut k.mapper, USER_HEAP_BASE, pfn_buf, PAGE_SIZE << PFN_BUF_ORDER, PageSize::Size2M, Pte::WRITABLE | Pte::NO_EXECUTE)
            .map_err(|_| SetupError::NoMemory)?;
        fill_task.args.ranges[0] = Range { start: USER_HEAP_BASE, len: PAGE_SIZE << PFN_BUF_ORDER };
        let blocks = BlockList { base: list as *mut u64, len: 0, cap: (BLOCK_LIST_PAGES * PAGE_SIZE / 8) as usize };
        m.driver_ok();
        let mut b = Balloon { m, inflate, deflate, stats, reporting, irq, blocks, actual: 0, pfn_buf, scratch, stats_page, features, fill_task: Some(fill_task) };
        // Warm the fill task up once: its first entry pays the host's
        // first-touch faults on its code, stack and the whole PFN array
        // (shadow paging here: ~0.6 ms measured); the first inflate should not.
        b.fill(&[(0, STEP_PAGES)]);
        b.post_stats(k);
        Ok(b)
    }

    /// Writes the statistics into their buffer and posts it (§5.5.6.3).
    fn post_stats(&mut self, k: &mut Kernel) {
        let Some(q) = self.stats.as_mut() else { return };
        let buddy = k.buddy();
        let (major, minor) = crate::vm::fault_counts();
        let entries = [(stat::MEMFREE, buddy.free_bytes()), (stat::MEMTOT, buddy.managed_bytes()), (stat::MAJFLT, major), (stat::MINFLT, minor)];
        let p = self.stats_page as *mut u8;
        for (i, (tag, value)) in entries.iter().enumerate() {
            // SAFETY: 4 packed 10-byte entries inside the stats page
            // (identity-mapped RW); unaligned writes are fine on x86.
            unsafe {
                p.add(i * stat::ENTRY_SIZE).cast::<u16>().write_unaligned(*tag);
                p.add(i * stat::ENTRY_SIZE + 2).cast::<u64>().write_unaligned(*value);
            }
        }
        q.submit(&self.m, &[(self.stats_page, (entries.len() * stat::ENTRY_SIZE) as u32, false)]);
    }

    /// Refills and reposts the stats buffer if the device handed it back.
    pub fn service_stats(&mut self, k: &mut Kernel) {
        if self.stats.as_mut().is_some_and(Virtqueue::poll_used) {
            self.post_stats(k);
        }
    }

    /// The PFNs of `runs` as one array: `(guest-physical address, count)`.
    fn fill(&mut self, runs: &[(u64, u64)]) -> (u64, u64) {
        let total: u64 = runs.iter().map(|r| r.1).sum();
        if total <= SMALL_PFNS {
            let out = self.scratch as *mut u32;
            let mut n = 0;
            for &(first, count) in runs {
                for j in 0..count {
                    // SAFETY: n < SMALL_PFNS entries of the scratch page.
                    unsafe { out.add(n).write_volatile((first + j) as u32) };
                    n += 1;
                }
            }
            return (self.scratch, total);
        }
        let Some(task) = self.fill_task.as_mut() else { return (self.pfn_buf, 0) };
        let n = runs.len().min(STEP_BLOCKS).min(MAX_RANGES - 1);
        for (i, &(first, count)) in runs.iter().take(n).enumerate() {
            task.args.ranges[i + 1] = Range { start: first, len: count };
        }
        task.args.nranges = n as u64 + 1;
        let entry = memvisor_user::balloon::fill_pfns as *const () as usize as u64;
        let filled = match task::run(&task.space, entry, USER_STACK_TOP - 8, user_layout::ARGS, 0) {
            TaskExit::Exited(v) => v,
            TaskExit::Faulted(_) => 0,
        };
        (self.pfn_buf, filled)
    }

    /// Gives back the fill task's frames (the driver is done).
    pub fn stop(&mut self, k: &mut Kernel) {
        if let Some(t) = self.fill_task.take() {
            t.release(k);
        }
    }

    fn set_actual(&mut self, pages: u64) {
        self.actual = pages;
        self.m.config_write(CONFIG_ACTUAL, pages as u32);
    }

    /// Takes up to `want` pages (one step) from the allocator into the
    /// balloon; returns how many.
    ///
    /// No CPU can still reach these frames through a stale translation when
    /// the host takes them: a frame reaches the buddy allocator only after
    /// every user mapping of it was shot down (`TaskFrame::release`, which
    /// also ends the verifying tasks that touched deflated pages, and the
    /// pager's evictions: `crate::tlb`), and the kernel's direct map, which
    /// still maps them, is never used for ballooned frames.
    pub fn inflate_step(&mut self, k: &mut Kernel, want: u64) -> u64 {
        let cap = want.min(STEP_PAGES);
        let mut runs = [(0u64, 0u64); STEP_BLOCKS];
        let (mut nr, mut pages) = (0, 0);
        while pages < cap && nr < STEP_BLOCKS && self.blocks.len < self.blocks.cap {
            let mut order = MAX_BLOCK_ORDER.min(63 - (cap - pages).leading_zeros() as usize);
            let addr = loop {
                if let Some(a) = k.frames_alloc(order) {
                    break Some(a);
                }
                if order == 0 {
                    break None;
                }
                order -= 1;
            };
            let Some(a) = addr else { break };
            if !self.blocks.push(a, order) {
                // The loop checks for room, so this cannot happen; should it,
                // the block goes back rather than being lost.
                let _ = k.buddy().free(a, order);
                break;
            }
            runs[nr] = (a / PAGE_SIZE, 1 << order);
            nr += 1;
            pages += 1 << order;
        }
        if pages == 0 {
            return 0;
        }
        let (buf, n) = self.fill(&runs[..nr]);
        self.inflate.submit_and_wait(&self.m, &[(buf, (n * 4) as u32, false)]);
        self.set_actual(self.actual + pages);
        pages
    }

    /// Takes up to `want` pages (one step) out of the balloon, tells the
    /// device, verifies them in ring 3 ([`Event::BalloonVerified`]) and
    /// frees them. Returns `(pages, bytes verified, bytes that read back
    /// right)`.
    pub fn deflate_step(&mut self, k: &mut Kernel, want: u64) -> (u64, u64, u64) {
        let cap = want.min(STEP_PAGES);
        let mut runs = [(0u64, 0u64); STEP_BLOCKS];
        let mut taken = [(0u64, 0u64); STEP_BLOCKS];
        let (mut nr, mut pages) = (0, 0);
        while pages < cap && nr < STEP_BLOCKS {
            let Some((a, mut order)) = self.blocks.pop() else { break };
            // Split a block bigger than what is left to deflate; the upper
            // halves stay in the balloon. With no room left to list one, the
            // block is deflated whole instead (a little more than asked;
            // the service loop inflates back to the target): no page is
            // ever lost from both the balloon and the allocator.
            while (1u64 << order) > cap - pages {
                if !self.blocks.push(a + (PAGE_SIZE << (order - 1)), order - 1) {
                    break;
                }
                order -= 1;
            }
            runs[nr] = (a / PAGE_SIZE, 1 << order);
            taken[nr] = (a, PAGE_SIZE << order);
            nr += 1;
            pages += 1 << order;
        }
        if pages == 0 {
            return (0, 0, 0);
        }
        let (buf, n) = self.fill(&runs[..nr]);
        self.deflate.submit_and_wait(&self.m, &[(buf, (n * 4) as u32, false)]);
        let good = verify(k, &taken[..nr]);
        for &(a, len) in &taken[..nr] {
            let _ = k.buddy().free(a, (len / PAGE_SIZE).trailing_zeros() as usize);
        }
        // The report, then `actual`: once the host sees it, the step is
        // complete and reported.
        report::send(&Report::Workload { event: Event::BalloonVerified, a: pages * PAGE_SIZE, b: good });
        self.set_actual(self.actual - pages);
        (pages, pages * PAGE_SIZE, good)
    }

    /// Reports every free block of 2 MiB or more (free page reporting,
    /// §5.5.6.5); returns `(bytes, blocks)`.
    pub fn report_free(&mut self, k: &mut Kernel) -> (u64, u64) {
        let Some(q) = self.reporting.as_mut() else { return (0, 0) };
        // Hold the blocks while they are reported (the scratch page lists
        // them), then give them back.
        let list = self.scratch as *mut u64;
        let cap = (PAGE_SIZE / 8) as usize;
        let mut n = 0;
        while n < cap {
            match k.buddy().alloc_largest() {
                Some((a, o)) if o >= ORDER_2M => {
                    // SAFETY: n < cap entries of the scratch page.
                    unsafe { list.add(n).write_volatile(a | o as u64) };
                    n += 1;
                }
                Some((a, o)) => {
                    let _ = k.buddy().free(a, o);
                    break;
                }
                None => break,
            }
        }
        let mut bytes = 0;
        let mut chain = [(0u64, 0u32, true); REPORT_CHAIN];
        let mut c = 0;
        for i in 0..n {
            // SAFETY: i < n, written above.
            let e = unsafe { list.add(i).read_volatile() };
            let (a, len) = (e & !(PAGE_SIZE - 1), PAGE_SIZE << (e & (PAGE_SIZE - 1)));
            let mut off = 0;
            while off < len {
                let part = (len - off).min(REPORT_MAX_LEN);
                chain[c] = (a + off, part as u32, true);
                c += 1;
                if c == REPORT_CHAIN {
                    q.submit_and_wait(&self.m, &chain[..c]);
                    c = 0;
                }
                off += part;
            }
            bytes += len;
        }
        if c > 0 {
            q.submit_and_wait(&self.m, &chain[..c]);
        }
        for i in 0..n {
            // SAFETY: as above.
            let e = unsafe { list.add(i).read_volatile() };
            let _ = k.buddy().free(e & !(PAGE_SIZE - 1), (e & (PAGE_SIZE - 1)) as usize);
        }
        (bytes, n as u64)
    }

    /// Deflate on OOM: allocates `pages` pages, deflating the balloon
    /// whenever the allocator runs dry when `VIRTIO_BALLOON_F_DEFLATE_ON_OOM`
    /// was negotiated (virtio 1.2 §5.5.6.1: without it the driver must not
    /// go below the target, so it allocates only what is free), verifies
    /// the allocation in ring 3 and frees it. Returns `(pages deflated,
    /// bytes that read back right)`, the bytes counting both the deflated
    /// pages (verified by each deflate step) and the allocation.
    pub fn oom_alloc(&mut self, k: &mut Kernel, pages: u64) -> (u64, u64) {
        let may_deflate = self.features & F_DEFLATE_ON_OOM != 0;
        let mut got = [(0u64, 0u64); STEP_BLOCKS];
        let (mut n, mut have, mut deflated, mut good) = (0, 0, 0, 0);
        while have < pages && n < STEP_BLOCKS {
            let order = ORDER_2M.min(63 - (pages - have).leading_zeros() as usize);
            match k.frames_alloc(order) {
                Some(a) => {
                    got[n] = (a, PAGE_SIZE << order);
                    n += 1;
                    have += 1 << order;
                }
                None if !may_deflate => break,
                None => {
                    let (d, _, ok) = self.deflate_step(k, (pages - have).max(1 << order));
                    if d == 0 {
                        break;
                    }
                    deflated += d;
                    good += ok;
                }
            }
        }
        let verified = verify(k, &got[..n]);
        for &(a, len) in &got[..n] {
            let _ = k.buddy().free(a, (len / PAGE_SIZE).trailing_zeros() as usize);
        }
        (deflated, good + verified)
    }
}

/// Runs the ring-3 task at `entry` with `windows` (physical, length) mapped
/// in order from `USER_HEAP_BASE` as `ranges[0..]`, then `extra` ranges;
/// returns its exit value.
///
/// # Errors
/// [`MapError`] when frames run out or the task faults.
pub fn run_user(k: &mut Kernel, entry: u64, windows: &[(u64, u64)], extra: &[Range]) -> Result<u64, MapError> {
    let task = TaskFrame::new(k)?;
    let space = task.space;
    let mut va = USER_HEAP_BASE;
    let mut n = 0;
    for &(phys, len) in windows.iter().take(MAX_RANGES) {
        va = va.next_multiple_of(len.next_power_of_two().min(PAGE_SIZE_2M));
        space.map(&mut k.mapper, va, phys, len, PageSize::Size2M, Pte::WRITABLE | Pte::NO_EXECUTE)?;
        task.args.ranges[n] = Range { start: va, len };
        n += 1;
        va += len;
    }
    for r in extra.iter().take(MAX_RANGES - n) {
        task.args.ranges[n] = *r;
        n += 1;
    }
    task.args.nranges = n as u64;
    let exit = task::run(&space, entry, USER_STACK_TOP - 8, user_layout::ARGS, 0);
    task.release(k);
    match exit {
        TaskExit::Exited(v) => Ok(v),
        TaskExit::Faulted(_) => Err(MapError::OutOfFrames),
    }
}

/// Writes and reads back the pattern over `blocks` in ring 3; the bytes
/// that read back right.
fn verify(k: &mut Kernel, blocks: &[(u64, u64)]) -> u64 {
    let entry = memvisor_user::entry::selftest_ram as *const () as usize as u64;
    run_user(k, entry, blocks, &[]).unwrap_or(0)
}

/// The `balloon` workload: `params` = [rounds, reporting (1: at start and
/// after each deflate, 2: only after deflates), OOM pages, interrupts,
/// paging first (1: a small demand-paging run before the driver starts, so
/// the stats have faults to report)].
pub fn run(k: &mut Kernel, params: [u64; 7]) -> u32 {
    let (rounds, reporting, oom, irq) = (params[0], params[1] != 0, params[2], params[3] != 0);
    let report_at_start = params[1] == 1;
    if params[4] != 0 && crate::vm::pager::run(k, &PAGING_WARMUP, 0) != 0 {
        return EXIT_NO_BALLOON;
    }
    let mut b = match Balloon::start(k, reporting, None) {
        Ok(b) => b,
        Err(e) => return failed(e),
    };
    if irq && let Err(e) = super::irq::enable(k, b.irq) {
        return failed(e);
    }
    let send = |event, a, b| report::send(&Report::Workload { event, a, b });
    if report_at_start {
        let (bytes, blocks) = b.report_free(k);
        send(Event::BalloonReported, bytes, blocks);
    }
    let (mut done, mut last_sent, mut was_full) = (0, u64::MAX, false);
    loop {
        let target = u64::from(b.m.config_read(CONFIG_NUM_PAGES));
        if target > b.actual {
            if b.inflate_step(k, target - b.actual) > 0 {
                // Counted here, not once the loop next sees the target met:
                // a host that lowers the target as soon as `actual` meets it
                // must not lose a round.
                was_full = true;
                continue;
            }
        } else if target < b.actual {
            b.deflate_step(k, b.actual - target);
            if b.actual == 0 && was_full {
                done += 1;
                was_full = false;
            }
            if reporting {
                let (bytes, blocks) = b.report_free(k);
                send(Event::BalloonReported, bytes, blocks);
            }
            continue;
        }
        if b.actual != last_sent {
            send(Event::BalloonActual, b.actual, target);
            last_sent = b.actual;
        }
        if rounds > 0 && done >= rounds {
            b.stop(k);
            return 0;
        }
        if oom > 0 && b.actual > 0 && b.actual == target {
            let (deflated, good) = b.oom_alloc(k, oom);
            send(Event::BalloonOomDeflated, deflated, good);
            send(Event::BalloonActual, b.actual, target);
            b.stop(k);
            return 0;
        }
        let isr = b.m.take_interrupts();
        if isr & mmio::INT_VRING != 0 {
            b.service_stats(k);
        }
        if irq && isr == 0 {
            super::irq::wait();
        }
    }
}
