//! The guest's own virtual memory for ring-3 tasks (issue 6): demand
//! paging with a bounded frame pool, swap through the VMM's paravirtual
//! swap device, page replacement, and copy-on-write fork.
//!
//! Two workloads use it, one at a time: [`pager`] (`paging:...`) and
//! [`cow`] (`cow:...`). While one runs, [`page_fault`] and [`syscall`]
//! (called first by [`crate::dispatch`] for ring-3 traps) route
//! the task's page faults and its fork/yield/exit calls to it; otherwise
//! they decline and traps keep their default meaning (the task ends).
//!
//! Every fault is classified by [`memvisor_guest_mm::fault::classify`]:
//! minor (first touch, zero frame), major (read back from swap),
//! copy-on-write, protection (reported, task killed) or invalid (reported,
//! task killed). Every PTE the kernel clears or restricts while its
//! address space is live is followed by a flush on every CPU that may hold
//! it ([`flush_page`]: `invlpg` here, a shootdown IPI elsewhere): on
//! hardware a stale TLB entry would let the task keep using an evicted
//! frame. [`shootdown`] is the workload that shows it across CPUs.

pub mod cow;
pub mod pager;
pub mod shootdown;
pub mod swapdev;

use core::sync::atomic::{AtomicU8, Ordering};

use memvisor_abi::layout::{PAGE_SIZE, USER_HEAP_BASE};
use memvisor_abi::msg::Report;
use memvisor_abi::workload::Event;
use memvisor_guest_mm::fault::FaultKind;

use crate::trap::TrapFrame;

/// Where a task's demand-paged region starts.
pub const REGION_BASE: u64 = USER_HEAP_BASE;

/// Which workload owns ring-3 faults now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Active {
    None = 0,
    Paging = 1,
    Cow = 2,
    /// The shootdown workload: its readers' faults, on every CPU.
    Shootdown = 3,
}

/// The active workload. The paging and cow workloads run one task on the
/// boot CPU while the other CPUs idle with no task (`crate::smp` posts
/// tasks only for the self-test and the shootdown workload), so only the
/// shootdown workload's faults come from other CPUs.
static ACTIVE: AtomicU8 = AtomicU8::new(Active::None as u8);

fn set_active(a: Active) {
    ACTIVE.store(a as u8, Ordering::Release);
}

/// The active workload.
#[inline(always)]
fn active() -> Active {
    match ACTIVE.load(Ordering::Acquire) {
        1 => Active::Paging,
        2 => Active::Cow,
        3 => Active::Shootdown,
        _ => Active::None,
    }
}

/// Page faults the kernel resolved since boot: `(major, minor)`. Major:
/// read back from swap; minor: a zero frame or a copy-on-write copy, with
/// no I/O (as Linux counts them). The balloon driver reports these.
static mut FAULTS: (u64, u64) = (0, 0);

/// Counts one resolved fault.
fn count_fault(major: bool) {
    let f = &raw mut FAULTS;
    // SAFETY: single-threaded kernel; the trap handlers that call this
    // and the readers never run at the same time.
    unsafe {
        if major { (*f).0 += 1 } else { (*f).1 += 1 }
    }
}

/// `(major, minor)` faults resolved since boot.
#[must_use]
pub fn fault_counts() -> (u64, u64) {
    let f = &raw const FAULTS;
    // SAFETY: as for `count_fault`.
    unsafe { *f }
}

/// Drops the translation of `va` in the address space `root`, on every CPU
/// that may cache it (this one with `invlpg`, others by IPI: see
/// [`crate::tlb`]; with one CPU only the `invlpg`).
#[inline(always)]
pub fn flush_page(root: u64, va: u64) {
    crate::tlb::shootdown(root, va, 1);
}

/// The page of the `pages`-page range at `base` that `va` falls in, if any.
#[inline(always)]
fn page_index(va: u64, base: u64, pages: u64) -> Option<u64> {
    let off = va.wrapping_sub(base);
    if off < pages * PAGE_SIZE { Some(off / PAGE_SIZE) } else { None }
}

/// The region page `va` falls in, if it is inside `pages` pages.
#[inline(always)]
fn region_page(va: u64, pages: u64) -> Option<u64> {
    page_index(va, REGION_BASE, pages)
}

/// Reports a fault that kills the task; `false` so the caller kills it.
fn report_fatal(kind: FaultKind, cr2: u64, error: u64) -> bool {
    let event = if kind == FaultKind::Invalid { Event::InvalidAccess } else { Event::ProtectionFault };
    crate::report::send(&Report::Workload { event, a: cr2, b: error });
    false
}

/// A ring-3 page fault: `true` when resolved (the task retries the access),
/// `false` when the task must end (the default path then records it).
pub fn page_fault(frame: &mut TrapFrame) -> bool {
    match active() {
        Active::None => false,
        Active::Paging => pager::page_fault(frame),
        Active::Cow => cow::page_fault(frame),
        Active::Shootdown => shootdown::page_fault(frame),
    }
}

/// A ring-3 system call: `true` when handled here.
pub fn syscall(frame: &mut TrapFrame) -> bool {
    match active() {
        Active::Cow => cow::syscall(frame),
        Active::Shootdown => shootdown::syscall(frame),
        Active::None | Active::Paging => false,
    }
}
