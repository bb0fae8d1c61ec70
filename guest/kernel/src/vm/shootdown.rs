//! The `shootdown` workload: one CPU changes translations that the others
//! are using, and the others must never see the old ones.
//!
//! One address space is shared by every CPU, like the threads of one
//! process. Every CPU but the boot CPU (BSP) runs a ring-3 reader
//! ([`memvisor_user::shootdown`]) that keeps the translations of `pages`
//! shared pages hot in its TLB. The BSP works in the same space at ring 0
//! (a kernel thread of that process) and, round after round, changes one
//! page's PTE:
//! - **remap**: points the page at its other frame (each page has two, A and
//!   B, whose word 0 holds a tag naming the frame): an unmap and a map, the
//!   old frame being reused when the page flips back;
//! - **write-protect**: clears W (and gives it back, to the previous page,
//!   with no flush: a stale read-only entry only costs a spurious fault).
//!
//! After the store it shoots the page down ([`crate::tlb::shootdown`]:
//! `invlpg` here, an IPI to every reader, wait for every ack), then
//! publishes the round in the shared control page and waits until every
//! reader has checked it. The time from the PTE store to the last ack is
//! the round's latency sample.
//!
//! With `SHOOTDOWN_SKIP` the BSP flushes only its own TLB and interrupts no
//! one: what a kernel without shootdowns would do. On hardware with a TLB
//! that the guest controls (EPT/NPT), a reader's cached translation then
//! outlives the change and its check sees the old frame or a write goes
//! through: **stale**. docs/smp.md says what this host shows.

use core::sync::atomic::{AtomicU64, Ordering};

use memvisor_abi::layout::{PAGE_SIZE, USER_STACK_SIZE};
use memvisor_abi::msg::Report;
use memvisor_abi::paging::SwapOp;
use memvisor_abi::workload::{Event, SHOOTDOWN_SKIP_IPI, SHOOTDOWN_SKIP_LOCAL, SHOOTDOWN_USER_WRITER, SHOOTDOWN_WRITE_PROTECT, WorkloadSpec};
use memvisor_guest_mm::fault::{ERR_PRESENT, ERR_WRITE, FaultKind};
use memvisor_guest_mm::paging::{MapError, PageSize, PageTableEntry as Pte, VirtAddr};
use memvisor_guest_mm::sync::cpus_of;
use memvisor_user::args::Range;
use memvisor_user::shootdown::{Control, ControlPage, TAG, TRY_WRITE_INSN, TRY_WRITE_RESUME, change};

use super::{Active, REGION_BASE, region_page, report_fatal, set_active, swapdev};
use crate::console::Dec;
use crate::smp::{self, Task};
use crate::task::{self, TaskExit, TaskFrame, user_layout};
use crate::trap::TrapFrame;
use crate::{Kernel, io, percpu, tlb};

/// Most shared pages (one page table; the VMM's `MAX_SHOOTDOWN_PAGES`).
pub const MAX_PAGES: u64 = 64;
/// Most rounds (the VMM's `MAX_SHOOTDOWN_ROUNDS`).
const MAX_ROUNDS: u64 = 4096;
/// Where the 2 × `pages` frames are mapped once more, for the BSP to write
/// their tags.
const FRAMES_VA: u64 = REGION_BASE + (256 << 20);
/// The control page.
const CONTROL_VA: u64 = REGION_BASE + (512 << 20);
/// The region's leaf table, mapped for the ring-3 writer (`writer=user`).
const TABLE_VA: u64 = REGION_BASE + (768 << 20);
/// Exit statuses.
const EXIT_BAD_WORKLOAD: u32 = 4;
const EXIT_STALE: u32 = 6;

/// The leaf table of the shared region (its first `SD_PAGES` entries),
/// for the readers' fault handler on the other CPUs.
static SD_TABLE: AtomicU64 = AtomicU64::new(0);
static SD_PAGES: AtomicU64 = AtomicU64::new(0);

/// A ring-3 page fault while the workload runs (on a reader's CPU): a
/// write-protection fault at the reader's one known write instruction is
/// turned into "the write faulted" (`rax = 1`, resume after it), as an
/// exception table entry would; a write to a page that is writable again
/// by now (the BSP gave W back) is retried.
pub fn page_fault(frame: &mut TrapFrame) -> bool {
    let cr2 = crate::cpu::read_cr2();
    let pages = SD_PAGES.load(Ordering::Acquire);
    let insn = &raw const TRY_WRITE_INSN as u64;
    if let Some(p) = region_page(cr2, pages)
        && frame.error & (ERR_PRESENT | ERR_WRITE) == ERR_PRESENT | ERR_WRITE
        && frame.rip == insn
    {
        let pte = (SD_TABLE.load(Ordering::Acquire) as *const u64).wrapping_add(p as usize);
        // SAFETY: the region's leaf table (identity-mapped pool frame),
        // alive while the workload runs; one aligned load.
        if unsafe { pte.read_volatile() } & Pte::WRITABLE == 0 {
            frame.rax = 1;
            frame.rip = &raw const TRY_WRITE_RESUME as u64;
        }
        return true;
    }
    report_fatal(FaultKind::Protection, cr2, frame.error)
}

/// `SYS_SHOOTDOWN` from the ring-3 writer: shoots down one page of its
/// space; returns the CPUs interrupted.
pub fn syscall(frame: &mut TrapFrame) -> bool {
    if frame.rax != memvisor_user::sys::SYS_SHOOTDOWN {
        return false;
    }
    let va = frame.rdi & !(PAGE_SIZE - 1);
    frame.rax = if frame.rsi != 0 {
        tlb::invlpg(va);
        0
    } else {
        let root = percpu::this().current_root.load(Ordering::Relaxed);
        u64::from(tlb::shootdown(root, va, 1).targets)
    };
    true
}

/// Runs the workload; the exit status (0 unless a reader saw a stale
/// translation although the shootdowns were on, or the set-up failed).
pub fn run(k: &mut Kernel, spec: &WorkloadSpec) -> u32 {
    let (pages, rounds) = (spec.params[0], spec.params[1]);
    if !(1..=MAX_PAGES).contains(&pages) || !(1..=MAX_ROUNDS).contains(&rounds) {
        crate::println!("guest: shootdown needs 1..={} pages and 1..={} rounds", Dec(MAX_PAGES), Dec(MAX_ROUNDS));
        return EXIT_BAD_WORKLOAD;
    }
    // Watchers (the snapshot tests) wait for this line; ~30 µs per byte, once.
    crate::println!("guest: workload starting");
    match run_readers(k, spec) {
        Ok(stale) if stale > 0 && spec.flags & SHOOTDOWN_SKIP_IPI == 0 => EXIT_STALE,
        Ok(_) => 0,
        Err(_) => {
            crate::println!("guest: cannot set up the shootdown workload ({} pages)", Dec(pages));
            EXIT_BAD_WORKLOAD
        }
    }
}

fn order_of(pages: u64) -> usize {
    pages.next_power_of_two().trailing_zeros() as usize
}

/// Sets up, runs the rounds, tears down; the stale checks of all readers.
fn run_readers(k: &mut Kernel, spec: &WorkloadSpec) -> Result<u64, MapError> {
    let (pages, rounds) = (spec.params[0], spec.params[1]);
    let wp = spec.params[2] == SHOOTDOWN_WRITE_PROTECT;
    let skip_ipi = spec.flags & SHOOTDOWN_SKIP_IPI != 0;
    let skip_local = spec.flags & SHOOTDOWN_SKIP_LOCAL != 0;
    let user_writer = spec.flags & SHOOTDOWN_USER_WRITER != 0;
    let readers = percpu::online() & !1;
    let task = TaskFrame::new(k)?;
    let space = task.space;
    let root = space.root;
    let frames_order = order_of(2 * pages);
    let frames = k.frames_alloc(frames_order).ok_or(MapError::OutOfFrames)?;
    let frame = |i: u64| frames + i * PAGE_SIZE;
    let Some(control_pa) = k.frames_alloc(0) else {
        let _ = k.buddy().free(frames, frames_order);
        return Err(MapError::OutOfFrames);
    };
    let rw = Pte::WRITABLE | Pte::NO_EXECUTE;
    space.map(&mut k.mapper, FRAMES_VA, frames, 2 * pages * PAGE_SIZE, PageSize::Size4K, rw)?;
    space.map(&mut k.mapper, REGION_BASE, frames, pages * PAGE_SIZE, PageSize::Size4K, rw)?;
    space.map(&mut k.mapper, CONTROL_VA, control_pa, PAGE_SIZE, PageSize::Size4K, rw)?;
    let region = VirtAddr::new(REGION_BASE).ok_or(MapError::Misaligned)?;
    let table = k.mapper.leaf_table(root, region, PageSize::Size4K, true)?.as_u64();
    let mut stacks = [0u64; memvisor_abi::smp::MAX_CPUS as usize];
    for cpu in cpus_of(readers) {
        stacks[cpu] = task.map_cpu_stack(k, cpu)?;
    }
    let args = &mut *task.args;
    args.nranges = 2;
    args.ranges[0] = Range { start: REGION_BASE, len: pages * PAGE_SIZE };
    args.ranges[1] = Range { start: CONTROL_VA, len: PAGE_SIZE };
    args.params[0] = pages;
    args.params[1] = spec.params[2];

    task::enter_space(&space);
    for i in 0..2 * pages {
        // SAFETY: the frames window maps all 2 × pages frames RW in the
        // space this CPU now runs in.
        unsafe { ((FRAMES_VA + i * PAGE_SIZE) as *mut u64).write_volatile(TAG | i) };
    }
    SD_TABLE.store(table, Ordering::Release);
    SD_PAGES.store(pages, Ordering::Release);
    set_active(Active::Shootdown);
    // SAFETY: the control page is mapped RW at CONTROL_VA in the space this
    // CPU runs in until `leave_space` below, after its last use.
    let control = unsafe { ControlPage::new(CONTROL_VA as *mut Control) };
    let entry = memvisor_user::shootdown::reader as *const () as usize as u64;
    for cpu in cpus_of(readers) {
        smp::post(cpu, Task { space, entry, rsp: user_layout::cpu_stack(cpu) + USER_STACK_SIZE - 8, arg0: user_layout::ARGS, arg1: cpu as u64 });
    }
    control.wait_readers(readers, 0);
    if user_writer {
        // The writer in ring 3, its PTE stores native.
        space.map(&mut k.mapper, TABLE_VA, table, PAGE_SIZE, PageSize::Size4K, rw)?;
        let args = &mut *task.args;
        args.nranges = 3;
        args.ranges[2] = Range { start: TABLE_VA, len: PAGE_SIZE };
        args.params[2] = rounds;
        args.params[3] = frames;
        args.params[4] = readers;
        args.params[5] = if !skip_ipi { 0 } else if skip_local { 2 } else { 1 };
        let entry = memvisor_user::shootdown::writer as *const () as usize as u64;
        let _ = task::run(&space, entry, memvisor_abi::layout::USER_STACK_TOP - 8, user_layout::ARGS, 0);
        task::enter_space(&space);
    }
    let pte = |p: u64| (table as *mut u64).wrapping_add(p as usize);
    for r in 0..if user_writer { 0 } else { rounds } {
        let p = r % pages;
        let va = REGION_BASE + p * PAGE_SIZE;
        if wp && r > 0 {
            // Giving W back needs no flush: a stale read-only entry
            // faults, and the handler retries.
            let prev = (r - 1) % pages;
            // SAFETY: as above.
            unsafe { pte(prev).write_volatile(pte(prev).read_volatile() | Pte::WRITABLE) };
        }
        // SAFETY: as above (p may be prev: read again).
        let (new, expect) = change(unsafe { pte(p).read_volatile() }, p, pages, frames, wp);
        let t0 = io::rdtsc();
        // SAFETY: as above; one aligned store.
        unsafe { pte(p).write_volatile(new) };
        let shot = if skip_ipi {
            if !skip_local {
                tlb::invlpg(va);
            }
            tlb::Shot::default()
        } else {
            tlb::shootdown(root.as_u64(), va, 1)
        };
        let ticks = io::rdtsc().wrapping_sub(t0);
        control.publish(p, expect, r + 1);
        control.wait_readers(readers, r + 1);
        crate::report::send(&Report::Workload { event: Event::ShootdownSample, a: ticks, b: u64::from(shot.targets) });
    }
    control.stop();
    let mut stale = 0;
    for cpu in cpus_of(readers) {
        if let TaskExit::Exited(s) = smp::wait(cpu) {
            stale += s;
        } else {
            stale += 1;
        }
    }
    set_active(Active::None);
    task::leave_space();
    // Frames go back to the buddy allocator zero (its convention): the
    // swap device zeroes them natively, one exit each.
    for i in 0..2 * pages {
        let _ = swapdev::request(SwapOp::Zero, frame(i), 0);
    }
    let _ = swapdev::request(SwapOp::Zero, control_pa, 0);
    let _ = k.buddy().free(frames, frames_order);
    let _ = k.buddy().free(control_pa, 0);
    for cpu in cpus_of(readers) {
        let _ = swapdev::request(SwapOp::Zero, stacks[cpu], 0);
        for q in 1..4 {
            let _ = swapdev::request(SwapOp::Zero, stacks[cpu] + q * PAGE_SIZE, 0);
        }
        let _ = k.buddy().free(stacks[cpu], 2);
    }
    task.release(k);
    Ok(stale)
}
