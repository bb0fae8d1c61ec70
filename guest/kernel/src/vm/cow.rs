//! Copy-on-write fork: the `cow` workload, with the kernel's two-task
//! scheduler (a parent and its one forked child).
//!
//! Both tasks' page tables are built before the parent starts (so that the
//! trap handler never needs the page-table allocator, and `fork` costs only
//! PTE writes at emulated ring 0): their own PML4, the tables of the stack
//! and argument page, and an empty leaf table for the region. The parent's
//! region is demand-paged from a pool of fresh (zero) frames.
//!
//! `fork` shares every writable user page of the parent — the present
//! region pages and the stack — copy-on-write: it makes each PTE read-only
//! with the software COW bit, copies it into the child's table and counts
//! the frame twice; the parent's PTEs are `invlpg`-ed, since the parent
//! keeps running in that address space (and shot down on any other CPU
//! running in it, `crate::tlb`). (The child's own stack frames,
//! allocated with its page tables, are then unused until both tasks end.)
//! The argument page and the ring-3 code are read-only and already the
//! same in both. A write to a COW page faults (present, write): if its
//! frame is still shared, the VMM copies it to a fresh frame that the
//! writer maps writable; if the other task has already copied away, the
//! writer just gets write access back. Both tasks write their stacks at
//! once, so the stack pages they touch are copied on the first write and
//! reused on the second.
//!
//! Scheduling is cooperative: `yield` switches to the other task if it is
//! alive, by swapping the trap frame the `iretq` will restore and loading
//! the other task's CR3; when one task exits the other continues; when
//! both have, `task::run` returns the sum of their statuses. COW pages are
//! not swapped (no reverse map from a shared frame to its PTEs).

use memvisor_abi::layout::{PAGE_SIZE, USER_STACK_TOP};
use memvisor_abi::msg::Report;
use memvisor_abi::paging::SwapOp;
use memvisor_abi::workload::{Event, WorkloadSpec};
use memvisor_guest_mm::fault::{FaultKind, PageInfo, classify};
use memvisor_guest_mm::paging::{MapError, PageSize, PageTableEntry as Pte, VirtAddr};
use memvisor_user::args::Range;
use memvisor_user::sys::{SYS_EXIT, SYS_FORK, SYS_YIELD};

use super::swapdev;
use super::{Active, REGION_BASE, flush_page, page_index, region_page, report_fatal, set_active};
use crate::Kernel;
use crate::console::Dec;
use crate::trap::TrapFrame;
use crate::task::{self, TaskExit, TaskFrame, user_layout};

/// Most pages of a COW region (one page table).
pub const MAX_PAGES: u64 = 512;
/// The user stack's pages (all inside one page table: the stack lies in
/// the first 2 MiB of the user range, `memvisor_abi::layout`).
const STACK_PAGES: usize = user_layout::STACK_PAGES as usize;
/// Frames whose sharing is counted: the pool (at most two per region page
/// plus one copy per stack page), then the parent's own stack frames.
const MAX_REFS: usize = PARENT_STACK_REFS + STACK_PAGES;
/// Where the parent's stack frames' counts start in `refs`.
const PARENT_STACK_REFS: usize = 2 * MAX_PAGES as usize + STACK_PAGES;
/// PTE bit 9, ignored by the CPU (SDM Vol. 3A §4.5, Table 4-20): the page
/// is shared copy-on-write.
const COW: u64 = 1 << 9;
/// Exit status when the workload cannot be set up.
const EXIT_BAD_WORKLOAD: u32 = 4;
/// Exit status when a task was killed by a fault.
const EXIT_KILLED: u32 = 5;

/// One task of the pair.
#[derive(Clone, Copy)]
struct Task {
    root: u64,
    table: u64,
    /// The stack's first PTE (the leaf table is identity-mapped).
    stack_ptes: u64,
    stack: u64,
    alive: bool,
    saved: Option<TrapFrame>,
}

struct Cow {
    pages: u64,
    pool: u64,
    pool_frames: u64,
    next_frame: u64,
    refs: [u8; MAX_REFS],
    tasks: [Task; 2],
    current: usize,
    forked: bool,
    status: u64,
    copies: u64,
    reuses: u64,
    stack_copies: u64,
    stack_reuses: u64,
}

/// A page `fork` shares: region page `p`, or stack page `i` (from the bottom).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Shared {
    Region(u64),
    Stack(usize),
}

impl Shared {
    fn va(self) -> u64 {
        match self {
            Shared::Region(p) => REGION_BASE + p * PAGE_SIZE,
            Shared::Stack(i) => user_layout::STACK_BOTTOM + i as u64 * PAGE_SIZE,
        }
    }
}

/// The stack page `va` falls in, if any.
fn stack_page(va: u64) -> Option<usize> {
    page_index(va, user_layout::STACK_BOTTOM, STACK_PAGES as u64).map(|i| i as usize)
}

static mut COW_STATE: Option<Cow> = None;

fn state() -> Option<&'static mut Cow> {
    let p = &raw mut COW_STATE;
    // SAFETY: single-threaded kernel with interrupts off: the workload code
    // and the trap handler never run at the same time, and each takes this
    // reference only for the duration of one call.
    unsafe { (*p).as_mut() }
}

impl Cow {
    fn pte(&self, task: usize, page: Shared) -> *mut u64 {
        // The tables come from the kernel's pool, identity-mapped.
        match page {
            Shared::Region(p) => (self.tasks[task].table as *mut u64).wrapping_add(p as usize),
            Shared::Stack(i) => (self.tasks[task].stack_ptes as *mut u64).wrapping_add(i),
        }
    }

    fn alloc(&mut self) -> Option<u64> {
        if self.next_frame >= self.pool_frames {
            return None;
        }
        self.next_frame += 1;
        Some(self.pool + (self.next_frame - 1) * PAGE_SIZE)
    }

    /// The sharing count of the frame `pte` maps: a pool frame, or one of
    /// the parent's stack frames (the only frames a COW PTE can hold).
    fn frame_index(&self, pte: u64) -> usize {
        let pa = pte & Pte::ADDR_MASK;
        let stack = self.tasks[0].stack;
        if pa >= stack && pa < stack + STACK_PAGES as u64 * PAGE_SIZE {
            PARENT_STACK_REFS + ((pa - stack) / PAGE_SIZE) as usize
        } else {
            (pa.wrapping_sub(self.pool) / PAGE_SIZE) as usize
        }
    }

    /// Resolves a fault on `page`, whose PTE in the current task's table is
    /// `pte`, holding `e` (read once by the fault handler: every instruction
    /// of this path is emulated on a PVM host).
    fn resolve(&mut self, kind: FaultKind, page: Shared, pte: *mut u64, e: u64) -> bool {
        let new = match kind {
            FaultKind::Minor if matches!(page, Shared::Region(_)) => {
                // Fresh pool frames are zero (the VMM's contract).
                let Some(pa) = self.alloc() else { return false };
                let f = self.frame_index(pa);
                self.refs[f] = 1;
                pa | Pte::PRESENT | Pte::WRITABLE | Pte::USER | Pte::NO_EXECUTE
            }
            FaultKind::CopyOnWrite => {
                let f = self.frame_index(e);
                let writable = (e | Pte::WRITABLE) & !COW;
                if self.refs[f] > 1 {
                    let Some(pa) = self.alloc() else { return false };
                    if swapdev::request(SwapOp::Copy, pa, e & Pte::ADDR_MASK).is_err() {
                        return false;
                    }
                    self.refs[f] -= 1;
                    let g = self.frame_index(pa);
                    self.refs[g] = 1;
                    match page {
                        Shared::Region(_) => self.copies += 1,
                        Shared::Stack(_) => self.stack_copies += 1,
                    }
                    (writable & !Pte::ADDR_MASK) | pa
                } else {
                    match page {
                        Shared::Region(_) => self.reuses += 1,
                        Shared::Stack(_) => self.stack_reuses += 1,
                    }
                    writable
                }
            }
            _ => return false,
        };
        // SAFETY: as above.
        unsafe { pte.write_volatile(new) };
        if kind == FaultKind::CopyOnWrite {
            // The read-only translation may be cached; a not-present one
            // never is (SDM Vol. 3A §4.10.2).
            flush_page(self.tasks[self.current].root, page.va());
        }
        true
    }

    /// Shares the parent's region and stack with the child, copy-on-write.
    fn fork(&mut self, frame: &mut TrapFrame) -> bool {
        if self.forked {
            return false;
        }
        let region = (0..self.pages).map(Shared::Region);
        for page in region.chain((0..STACK_PAGES).map(Shared::Stack)) {
            let (parent, child) = (self.pte(0, page), self.pte(1, page));
            // SAFETY: PTEs of both tables; the parent is stopped in this trap.
            unsafe {
                let e = parent.read_volatile();
                if e & Pte::PRESENT == 0 {
                    continue;
                }
                let shared = (e & !Pte::WRITABLE) | COW;
                parent.write_volatile(shared);
                child.write_volatile(shared);
                let f = self.frame_index(e);
                self.refs[f] += 1;
            }
            crate::tlb::invlpg(page.va());
        }
        // One shootdown for all of them on the other CPUs that may run in
        // the parent's space (none today: the pair runs on one CPU).
        crate::tlb::shootdown_space_remote(self.tasks[0].root);
        let mut child = *frame;
        child.rax = 0;
        self.tasks[1].saved = Some(child);
        self.tasks[1].alive = true;
        self.forked = true;
        true
    }

    /// Switches the trap's return to the other task if it is alive.
    fn switch(&mut self, frame: &mut TrapFrame, keep_current: bool) -> bool {
        let other = 1 - self.current;
        let Some(next) = self.tasks[other].saved.filter(|_| self.tasks[other].alive) else { return false };
        self.tasks[self.current].saved = keep_current.then_some(*frame);
        *frame = next;
        crate::task::set_current_root(self.tasks[other].root);
        // SAFETY: every task's PML4 shares the kernel's slots, so the
        // handler keeps running; the trap returns into that task.
        unsafe { crate::cpu::write_cr3(self.tasks[other].root) };
        self.current = other;
        true
    }
}

/// A ring-3 page fault while the cow workload runs.
pub fn page_fault(frame: &mut TrapFrame) -> bool {
    let cr2 = crate::cpu::read_cr2();
    let Some(s) = state() else { return false };
    let page = region_page(cr2, s.pages).map(Shared::Region).or_else(|| stack_page(cr2).map(Shared::Stack));
    let entry = page.map(|p| {
        let pte = s.pte(s.current, p);
        // SAFETY: the current task's PTE for a region or stack page; the
        // task is stopped in this trap.
        (p, pte, unsafe { pte.read_volatile() })
    });
    let cow = entry.is_some_and(|(_, _, e)| e & COW != 0);
    let kind = classify(frame.error, PageInfo { in_region: page.is_some(), in_swap: false, cow });
    match (kind, entry) {
        (FaultKind::Minor | FaultKind::CopyOnWrite, Some((p, pte, e))) => {
            let resolved = s.resolve(kind, p, pte, e);
            if resolved {
                super::count_fault(false);
            }
            resolved
        }
        _ => report_fatal(kind, cr2, frame.error),
    }
}

/// fork, yield and exit while the cow workload runs.
pub fn syscall(frame: &mut TrapFrame) -> bool {
    let Some(s) = state() else { return false };
    match frame.rax {
        SYS_FORK => {
            frame.rax = if s.current == 0 && s.fork(frame) { 1 } else { u64::MAX };
            true
        }
        SYS_YIELD => {
            frame.rax = 0;
            s.switch(frame, true);
            true
        }
        SYS_EXIT => {
            s.status = s.status.saturating_add(frame.rdi);
            s.tasks[s.current].alive = false;
            if !s.switch(frame, false) {
                task::end_task(TaskExit::Exited(s.status));
            }
            true
        }
        _ => false,
    }
}

/// Runs the cow workload; returns the exit status (0: both tasks saw
/// exactly their own writes).
pub fn run(k: &mut Kernel, spec: &WorkloadSpec) -> u32 {
    let pages = spec.params[0];
    if !(1..=MAX_PAGES).contains(&pages) {
        crate::println!("guest: cow needs 1..={} pages", Dec(MAX_PAGES));
        return EXIT_BAD_WORKLOAD;
    }
    match run_tasks(k, pages) {
        Ok(TaskExit::Exited(s)) => u32::try_from(s).unwrap_or(u32::MAX),
        Ok(TaskExit::Faulted(_)) => EXIT_KILLED,
        Err(_) => {
            crate::println!("guest: cannot set up the cow workload ({} pages)", Dec(pages));
            EXIT_BAD_WORKLOAD
        }
    }
}

fn run_tasks(k: &mut Kernel, pages: u64) -> Result<TaskExit, MapError> {
    let mut parent = TaskFrame::new(k)?;
    let mut child = TaskFrame::new(k)?;
    let va = VirtAddr::new(REGION_BASE).ok_or(MapError::Misaligned)?;
    let stack_va = VirtAddr::new(user_layout::STACK_BOTTOM).ok_or(MapError::Misaligned)?;
    let mut tasks = [parent.space.root, child.space.root].map(|root| Task { root: root.as_u64(), table: 0, stack_ptes: 0, stack: 0, alive: true, saved: None });
    for (t, frame) in tasks.iter_mut().zip([&parent, &child]) {
        t.table = k.mapper.leaf_table(frame.space.root, va, PageSize::Size4K, true)?.as_u64();
        let stack_table = k.mapper.leaf_table(frame.space.root, stack_va, PageSize::Size4K, true)?.as_u64();
        t.stack_ptes = stack_table + 8 * stack_va.index(memvisor_guest_mm::paging::Level::Pt) as u64;
        t.stack = frame.stack().0;
    }
    tasks[1].alive = false;
    // Each region page needs at most two frames (one per task), each stack
    // page at most one copy besides the parent's own frame.
    let pool_frames = 2 * pages + STACK_PAGES as u64;
    let order = pool_frames.next_power_of_two().trailing_zeros() as usize;
    let pool = k.frames_alloc(order).ok_or(MapError::OutOfFrames)?;
    for frame in [&mut parent, &mut child] {
        let args = &mut *frame.args;
        args.nranges = 1;
        args.ranges[0] = Range { start: REGION_BASE, len: pages * PAGE_SIZE };
        args.params[0] = pages;
    }
    let mut refs = [0; MAX_REFS];
    // The parent owns its stack frames until fork shares them.
    refs[PARENT_STACK_REFS..].fill(1);
    let cow = Cow {
        pages,
        pool,
        pool_frames,
        next_frame: 0,
        refs,
        tasks,
        current: 0,
        forked: false,
        status: 0,
        copies: 0,
        reuses: 0,
        stack_copies: 0,
        stack_reuses: 0,
    };
    let p = &raw mut COW_STATE;
    // SAFETY: single-threaded; no task runs yet.
    unsafe { *p = Some(cow) };
    set_active(Active::Cow);
    let entry = memvisor_user::paging::cow_fork as *const () as usize as u64;
    let exit = task::run(&parent.space, entry, USER_STACK_TOP - 8, user_layout::ARGS, 0);
    set_active(Active::None);
    // SAFETY: as above; both tasks have ended.
    let s = unsafe { (*p).take() };
    let (used, copies, reuses, stack) = s.map_or((0, 0, 0, (0, 0)), |s| (s.next_frame, s.copies, s.reuses, (s.stack_copies, s.stack_reuses)));
    crate::report::send(&Report::Workload { event: Event::CowCopies, a: copies, b: reuses });
    crate::report::send(&Report::Workload { event: Event::CowStackCopies, a: stack.0, b: stack.1 });
    for f in 0..used {
        let _ = swapdev::request(SwapOp::Zero, pool + f * PAGE_SIZE, 0);
    }
    let _ = k.buddy().free(pool, order);
    child.release(k);
    parent.release(k);
    Ok(exit)
}
