//! Demand paging with a bounded frame pool and swap: the `paging` workload.
//!
//! The task's region (`pages` pages at [`REGION_BASE`]) starts with page
//! tables but no leaves. A fault on a region page takes a frame from a pool
//! of `frames` frames: a never-used one while any is left (fresh RAM is
//! zero), else the policy's victim ([`memvisor_guest_mm::replace`]), whose
//! PTE is cleared and flushed (`invlpg`, and a shootdown of any other CPU
//! in the space: `crate::tlb`) and whose data goes to swap only when its
//! D bit says it was written since it was loaded. The faulting page is then
//! read back from swap (major fault, it was written back before), or zeroed
//! (minor fault in a recycled frame; the swap device does the zeroing), and
//! mapped. Swap slot = page index: every page has its own slot, so a page's
//! swap copy stays valid while the page is resident and clean.
//!
//! The Accessed bits the policies read are cleared with a flush each,
//! so the next access sets them again even on a CPU whose TLB still held
//! the translation.

use memvisor_abi::layout::PAGE_SIZE;
use memvisor_abi::msg::Report;
use memvisor_abi::paging::{Policy, SwapOp};
use memvisor_abi::workload::{Event, PAGING_MEASURE, PAGING_PROBE_READ_ONLY, PAGING_PROBE_WILD, WorkloadSpec};
use memvisor_guest_mm::fault::{ERR_PRESENT, FaultKind, PageInfo, classify};
use memvisor_guest_mm::paging::{MapError, PageSize, PageTableEntry as Pte, VirtAddr};
use memvisor_guest_mm::replace::Replacer;
use memvisor_user::args::Range;

use super::swapdev::{self, SwapIoError};
use super::{Active, REGION_BASE, flush_page, region_page, report_fatal, set_active};
use crate::Kernel;
use crate::console::Dec;
use crate::trap::{PAGE_FAULT, TrapFrame};
use crate::io::rdtsc;
use crate::task::{self, TaskExit, TaskFrame, user_layout};

/// Most pages of a region (8 page tables).
pub const MAX_PAGES: u64 = 4096;
/// Most frames of a pool.
pub const MAX_FRAMES: u64 = 1024;
/// Page tables a region may need.
const MAX_TABLES: usize = (MAX_PAGES / 512) as usize;
/// Where the task's version array (one `u64` per page, eagerly mapped)
/// lies: 1 GiB above the region, in the task's private PML4 slot.
const VERSIONS_BASE: u64 = REGION_BASE + (1 << 30);
/// `owner` value of a frame holding no page.
const NO_PAGE: u16 = u16::MAX;

/// Exit status when the workload cannot be set up.
const EXIT_BAD_WORKLOAD: u32 = 4;
/// Exit status when the task was killed by a fault it did not ask for.
const EXIT_KILLED: u32 = 5;

/// The pager's counters (the events it reports).
#[derive(Debug, Clone, Copy, Default)]
struct Stats {
    minor: u64,
    major: u64,
    evictions: u64,
    writebacks: u64,
    zeroed: u64,
    tsc: u64,
}

/// The state of one run.
struct Pager {
    /// The task's address space (its PML4).
    root: u64,
    pages: u64,
    /// Guest-physical address of frame 0 (the pool is contiguous).
    pool: u64,
    /// The region's page tables, one per 512 pages (identity-mapped).
    tables: [u64; MAX_TABLES],
    replacer: Replacer<'static>,
    stats: Stats,
}

// Per-page and per-frame arrays, in .bss (zero; `owner` is set at start).
static mut IN_SWAP: [bool; MAX_PAGES as usize] = [false; MAX_PAGES as usize];
static mut OWNER: [u16; MAX_FRAMES as usize] = [0; MAX_FRAMES as usize];
static mut AGE: [u64; MAX_FRAMES as usize] = [0; MAX_FRAMES as usize];
static mut LOADED: [u64; MAX_FRAMES as usize] = [0; MAX_FRAMES as usize];
static mut PAGER: Option<Pager> = None;

fn pager() -> Option<&'static mut Pager> {
    let p = &raw mut PAGER;
    // SAFETY: single-threaded kernel with interrupts off: the workload code
    // and the trap handler never run at the same time, and each takes this
    // reference only for the duration of one call.
    unsafe { (*p).as_mut() }
}

fn in_swap() -> &'static mut [bool; MAX_PAGES as usize] {
    let p = &raw mut IN_SWAP;
    // SAFETY: as for `pager`.
    unsafe { &mut *p }
}

fn owner() -> &'static mut [u16; MAX_FRAMES as usize] {
    let p = &raw mut OWNER;
    // SAFETY: as for `pager`.
    unsafe { &mut *p }
}

impl Pager {
    /// The PTE of region page `p` (p < pages).
    #[inline(always)]
    fn pte(&self, p: u64) -> *mut u64 {
        // The tables come from the kernel's pool, identity-mapped.
        (self.tables[(p / 512) as usize] as *mut u64).wrapping_add((p % 512) as usize)
    }

    fn frame_pa(&self, f: usize) -> u64 {
        self.pool + f as u64 * PAGE_SIZE
    }

    /// Resolves a fault on region page `p`.
    fn load(&mut self, p: u64, major: bool) -> Result<(), SwapIoError> {
        let (tables, root) = (self.tables, self.root);
        // Reads and clears the A bit of the page in frame f.
        let test_and_clear = |f: usize| {
            let page = owner()[f];
            if page == NO_PAGE {
                return false;
            }
            let pte = (tables[usize::from(page) / 512] as *mut u64).wrapping_add(usize::from(page) % 512);
            // SAFETY: the PTE of a resident region page, in a table of the
            // task's space; the task is stopped in this trap.
            unsafe {
                let e = pte.read_volatile();
                if e & Pte::ACCESSED == 0 {
                    return false;
                }
                pte.write_volatile(e & !Pte::ACCESSED);
            }
            flush_page(root, REGION_BASE + u64::from(page) * PAGE_SIZE);
            true
        };
        self.replacer.tick(test_and_clear);
        let (f, evict) = self.replacer.frame_for_fault(test_and_clear).ok_or(SwapIoError)?;
        let pa = self.frame_pa(f);
        if evict {
            let old = u64::from(owner()[f]);
            let pte = self.pte(old);
            // SAFETY: as above; the page leaves the address space here.
            let e = unsafe { pte.replace(0) };
            // Every CPU drops the old translation before the frame is
            // written to swap and reused.
            flush_page(root, REGION_BASE + old * PAGE_SIZE);
            self.stats.evictions += 1;
            if e & Pte::DIRTY != 0 {
                swapdev::request(SwapOp::Write, pa, old)?;
                in_swap()[old as usize] = true;
                self.stats.writebacks += 1;
            }
        }
        if major {
            swapdev::request(SwapOp::Read, pa, p)?;
            self.stats.major += 1;
            super::count_fault(true);
        } else {
            if evict {
                // A recycled frame holds its last page's data.
                swapdev::request(SwapOp::Zero, pa, 0)?;
                self.stats.zeroed += 1;
            }
            self.stats.minor += 1;
            super::count_fault(false);
        }
        owner()[f] = p as u16;
        // SAFETY: as above; the entry is not present (the fault says so).
        unsafe { self.pte(p).write_volatile(pa | Pte::PRESENT | Pte::WRITABLE | Pte::USER | Pte::NO_EXECUTE) };
        Ok(())
    }
}

/// A ring-3 page fault while the paging workload runs.
pub fn page_fault(frame: &mut TrapFrame) -> bool {
    let start = rdtsc();
    let cr2 = crate::cpu::read_cr2();
    let Some(pager) = pager() else { return false };
    let page = region_page(cr2, pager.pages);
    let info = PageInfo { in_region: page.is_some(), in_swap: page.is_some_and(|p| in_swap()[p as usize]), cow: false };
    let kind = classify(frame.error, info);
    let resolved = match (kind, page) {
        (FaultKind::Minor | FaultKind::Major, Some(p)) => match pager.load(p, kind == FaultKind::Major) {
            Ok(()) => true,
            Err(SwapIoError) => {
                crate::println!("guest: swap device error on page {}", Dec(p));
                false
            }
        },
        _ => report_fatal(kind, cr2, frame.error),
    };
    pager.stats.tsc += rdtsc().wrapping_sub(start);
    resolved
}

/// Runs the paging workload; returns the exit status (0: every access read
/// back what was last written, and any probe fault was the one asked for).
pub fn run(k: &mut Kernel, spec: &WorkloadSpec, tsc_khz: u64) -> u32 {
    let p = spec.params;
    let (Some(policy), frames, pages) = (Policy::from_raw(p[0]), p[1], p[3]) else {
        crate::println!("guest: unknown paging policy {}", Dec(p[0]));
        return EXIT_BAD_WORKLOAD;
    };
    if !(1..=MAX_FRAMES).contains(&frames) || !(1..=MAX_PAGES).contains(&pages) {
        crate::println!("guest: paging needs 1..={} frames and 1..={} pages", Dec(MAX_FRAMES), Dec(MAX_PAGES));
        return EXIT_BAD_WORKLOAD;
    }
    if spec.flags & PAGING_MEASURE != 0 {
        measure_copies(k, tsc_khz);
    }
    let probe = spec.flags & (PAGING_PROBE_READ_ONLY | PAGING_PROBE_WILD);
    let params = [p[0], p[1], p[2], p[3], p[4], p[5], p[6], u64::from(probe)];
    let exit = match run_task(k, policy, frames, pages, params, tsc_khz) {
        Ok(e) => e,
        Err(_) => {
            crate::println!("guest: cannot set up the paging workload ({} pages, {} frames)", Dec(pages), Dec(frames));
            return EXIT_BAD_WORKLOAD;
        }
    };
    match exit {
        TaskExit::Exited(mismatches) => u32::try_from(mismatches).unwrap_or(u32::MAX),
        TaskExit::Faulted(f) => {
            // Only the probe's own #PF, at the address it targets, counts as
            // asked for: a task killed by a swap I/O error (a not-present
            // fault in the region) or by another exception must not pass.
            let pf = f.vector == PAGE_FAULT;
            let ro = probe == PAGING_PROBE_READ_ONLY && f.cr2 == user_layout::ARGS && f.error & ERR_PRESENT != 0;
            let wild = probe == PAGING_PROBE_WILD && f.cr2 == REGION_BASE + pages * PAGE_SIZE && f.error & ERR_PRESENT == 0;
            if pf && (ro || wild) { 0 } else { EXIT_KILLED }
        }
    }
}

/// Times one 4 KiB copy and one zeroing at ring 0 and through the swap
/// device, between two page-table-pool frames (identity-mapped, so ring 0
/// reaches them whatever the direct map's leaf size), and reports them.
fn measure_copies(k: &mut Kernel, tsc_khz: u64) {
    use memvisor_guest_mm::paging::FrameSource;
    let mark = k.mapper.frames.mark();
    if let (Some(a), Some(b)) = (k.mapper.frames.alloc_table(), k.mapper.frames.alloc_table()) {
        let (a, b) = (a.as_u64(), b.as_u64());
        let ns = |ticks: u64| (ticks * 1_000_000).checked_div(tsc_khz).unwrap_or(0);
        let t0 = rdtsc();
        // SAFETY: two distinct pool frames, identity-mapped RW at ring 0,
        // used for nothing else until they go back to the pool below.
        unsafe { core::ptr::copy_nonoverlapping(a as *const u8, b as *mut u8, PAGE_SIZE as usize) };
        let t1 = rdtsc();
        let _ = swapdev::request(SwapOp::Copy, b, a);
        let t2 = rdtsc();
        // SAFETY: as above.
        unsafe { core::ptr::write_bytes(b as *mut u8, 0, PAGE_SIZE as usize) };
        let t3 = rdtsc();
        let _ = swapdev::request(SwapOp::Zero, a, 0);
        let t4 = rdtsc();
        crate::report::send(&Report::Workload { event: Event::PagingCopyCost, a: ns(t1 - t0), b: ns(t2 - t1) });
        crate::report::send(&Report::Workload { event: Event::PagingZeroCost, a: ns(t3 - t2), b: ns(t4 - t3) });
    }
    k.mapper.frames.release_to(mark);
}

fn order_of(pages: u64) -> usize {
    pages.next_power_of_two().trailing_zeros() as usize
}

fn run_task(k: &mut Kernel, policy: Policy, frames: u64, pages: u64, params: [u64; 8], tsc_khz: u64) -> Result<TaskExit, MapError> {
    let task = TaskFrame::new(k)?;
    let root = task.space.root;
    let mut tables = [0u64; MAX_TABLES];
    for (i, t) in tables.iter_mut().enumerate().take(pages.div_ceil(512) as usize) {
        let va = VirtAddr::new(REGION_BASE + i as u64 * (512 * PAGE_SIZE)).ok_or(MapError::Misaligned)?;
        *t = k.mapper.leaf_table(root, va, PageSize::Size4K, true)?.as_u64();
    }
    let version_pages = (pages * 8).div_ceil(PAGE_SIZE);
    let versions = k.frames_alloc(order_of(version_pages)).ok_or(MapError::OutOfFrames)?;
    task.space.map(&mut k.mapper, VERSIONS_BASE, versions, version_pages * PAGE_SIZE, PageSize::Size4K, Pte::WRITABLE | Pte::NO_EXECUTE)?;
    let Some(pool) = k.frames_alloc(order_of(frames)) else {
        let _ = k.buddy().free(versions, order_of(version_pages));
        return Err(MapError::OutOfFrames);
    };
    let args = &mut *task.args;
    args.nranges = 2;
    args.ranges[0] = Range { start: REGION_BASE, len: pages * PAGE_SIZE };
    args.ranges[1] = Range { start: VERSIONS_BASE, len: pages * 8 };
    args.params = params;

    owner()[..frames as usize].fill(NO_PAGE);
    in_swap()[..pages as usize].fill(false);
    let (age, loaded) = (&raw mut AGE, &raw mut LOADED);
    // SAFETY: single-threaded; no task runs yet, so nothing else holds
    // references to these arrays; they live for the whole program.
    let (age, loaded) = unsafe { (&mut *age, &mut *loaded) };
    let (age, loaded) = (&mut age[..frames as usize], &mut loaded[..frames as usize]);
    let replacer = Replacer::new(policy, age, loaded);
    let slot = &raw mut PAGER;
    // SAFETY: as above.
    unsafe { *slot = Some(Pager { root: root.as_u64(), pages, pool, tables, replacer, stats: Stats::default() }) };
    set_active(Active::Paging);
    let entry = memvisor_user::paging::paging_access as *const () as usize as u64;
    let exit = task::run(&task.space, entry, memvisor_abi::layout::USER_STACK_TOP - 8, user_layout::ARGS, 0);
    set_active(Active::None);
    // SAFETY: as above; the task has ended.
    let s = unsafe { (*slot).take() }.map(|p| p.stats).unwrap_or_default();
    for (event, a, b) in [
        (Event::PagingFaults, s.minor, s.major),
        (Event::PagingEvictions, s.evictions, s.writebacks),
        (Event::PagingCost, s.zeroed, (s.tsc * 1000).checked_div(tsc_khz).unwrap_or(0)),
    ] {
        crate::report::send(&Report::Workload { event, a, b });
    }
    // Give the buddy allocator its frames back zero, as it hands them out
    // (a native memset in the VMM, not ~350 µs of ring-0 stores each).
    let used = (s.minor + s.major).min(frames);
    for f in 0..used {
        let _ = swapdev::request(SwapOp::Zero, pool + f * PAGE_SIZE, 0);
    }
    for v in 0..version_pages {
        let _ = swapdev::request(SwapOp::Zero, versions + v * PAGE_SIZE, 0);
    }
    let _ = k.buddy().free(pool, order_of(frames));
    let _ = k.buddy().free(versions, order_of(version_pages));
    task.release(k);
    Ok(exit)
}
