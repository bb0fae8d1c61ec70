//! Workloads the VMM asks for in the boot configuration, run as ring-3
//! tasks after the self-test (`memvisor_abi::workload`).
//!
//! Each gets its own address space with a stack, a read-only argument page
//! and one physically contiguous buffer from the buddy allocator, mapped
//! at `USER_HEAP_BASE` with the configured leaf size where alignment allows.
//! The buffer's guest-physical address is reported first, so the VMM can
//! tell which guest-physical pages the task writes.

use memvisor_abi::layout::{PAGE_SIZE, USER_HEAP_BASE, USER_STACK_TOP};
use memvisor_abi::msg::Report;
use memvisor_abi::workload::{Event, WorkloadKind, WorkloadSpec};
use memvisor_guest_mm::paging::{MapError, PageTableEntry as Pte};
use memvisor_user::args::Range;
use memvisor_user::workloads;

use crate::Kernel;
use crate::console::{Dec, Hex};
use crate::report;
use crate::task::{self, TaskExit, TaskFrame, user_layout};

/// Exit status for a workload the kernel does not know or cannot set up.
const EXIT_BAD_WORKLOAD: u32 = 4;

/// Runs the workload in `spec`; returns the status to exit with (0: fine).
pub fn run(k: &mut Kernel, spec: &WorkloadSpec, tsc_khz: u64, kernel_regions: &[(u64, u64)]) -> u32 {
    let Some(kind) = WorkloadKind::from_raw(spec.kind) else {
        crate::println!("guest: unknown workload kind {}", Dec(u64::from(spec.kind)));
        return EXIT_BAD_WORKLOAD;
    };
    let p = spec.params;
    let (entry, buffer_pages, params) = match kind {
        WorkloadKind::None => return 0,
        WorkloadKind::Balloon => return crate::drivers::balloon::run(k, p),
        WorkloadKind::BalloonHostile => return crate::drivers::balloon_hostile::run(k, p[0]),
        WorkloadKind::Translation => return crate::translation::run(k, spec),
        WorkloadKind::Paging => return crate::vm::pager::run(k, spec, tsc_khz),
        WorkloadKind::Cow => return crate::vm::cow::run(k, spec),
        WorkloadKind::Shootdown => return crate::vm::shootdown::run(k, spec),
        WorkloadKind::Dirty => (workloads::dirty_rounds as *const () as usize as u64, p[3].max(1), [p[0], p[1], p[2], 0, 0, 0, 0, 0]),
        WorkloadKind::Checksum => (workloads::checksum_rounds as *const () as usize as u64, p[0].max(1), [p[0], p[1], p[2], p[3], tsc_khz, 0, 0, 0]),
    };
    for &(start, len) in kernel_regions {
        report::send(&Report::Workload { event: Event::KernelRegion, a: start, b: len });
    }
    // Watchers (the snapshot benchmark) wait for this line to know the
    // workload is under way. ~30 µs per byte, once.
    crate::println!("guest: workload starting");
    match run_task(k, entry, buffer_pages, params) {
        Ok(TaskExit::Exited(status)) => u32::try_from(status).unwrap_or(u32::MAX),
        Ok(TaskExit::Faulted(f)) => {
            crate::println!("guest: workload faulted: vector {} error {} cr2 {} rip {}", Dec(f.vector), Hex(f.error), Hex(f.cr2), Hex(f.rip));
            EXIT_BAD_WORKLOAD
        }
        Err(_) => {
            crate::println!("guest: cannot set up the workload ({} buffer pages)", Dec(buffer_pages));
            EXIT_BAD_WORKLOAD
        }
    }
}

fn run_task(k: &mut Kernel, entry: u64, buffer_pages: u64, params: [u64; 8]) -> Result<TaskExit, MapError> {
    let task = TaskFrame::new(k)?;
    let space = task.space;
    // One buddy block holds the whole buffer (physically contiguous).
    let order = buffer_pages.next_power_of_two().trailing_zeros() as usize;
    let buffer = k.frames_alloc(order).ok_or(MapError::OutOfFrames)?;
    let len = buffer_pages * PAGE_SIZE;
    space.map(&mut k.mapper, USER_HEAP_BASE, buffer, (PAGE_SIZE << order).max(len), k.leaf, Pte::WRITABLE | Pte::NO_EXECUTE)?;
    let args = &mut *task.args;
    args.nranges = 1;
    args.ranges[0] = Range { start: USER_HEAP_BASE, len };
    args.params = params;
    let (stack, stack_len) = task.stack();
    report::send(&Report::Workload { event: Event::KernelRegion, a: stack, b: stack_len });
    report::send(&Report::Workload { event: Event::BufferReady, a: buffer, b: buffer_pages });
    let exit = task::run(&space, entry, USER_STACK_TOP - 8, user_layout::ARGS, 0);
    let _ = k.buddy().free(buffer, order);
    task.release(k);
    Ok(exit)
}
