//! Workloads the VMM asks for in the boot configuration, run as ring-3
//! tasks after the self-test (`memvisor_abi::workload`).
//!
//! Each gets its own address space with a stack, a read-only argument page
//! and one physically contiguous buffer from the buddy allocator, mapped
//! at `USER_HEAP_BASE` with the configured leaf size where alignment allows.
//! The buffer's guest-physical address is reported first, so the VMM can
//! tell which guest-physical pages the task writes. With several CPUs the
//! dirty workload's task runs on every CPU, each writing its share.

use memvisor_abi::layout::{PAGE_SIZE, USER_HEAP_BASE, USER_STACK_SIZE, USER_STACK_TOP};
use memvisor_abi::msg::Report;
use memvisor_abi::paging::SwapOp;
use memvisor_abi::workload::{Event, WorkloadKind, WorkloadSpec};
use memvisor_guest_mm::paging::{MapError, PageSize, PageTableEntry as Pte};
use memvisor_guest_mm::sync::cpus_of;
use memvisor_user::args::Range;
use memvisor_user::workloads;

use crate::Kernel;
use crate::console::{Dec, Hex};
use crate::smp::{self, Task};
use crate::task::{self, TaskExit, TaskFrame, user_layout};
use crate::{percpu, report};

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
        WorkloadKind::Ticker => (workloads::ticker as *const () as usize as u64, p[2].max(1), [p[0], p[1], p[2], p[3], tsc_khz, 0, 0, 0]),
    };
    for &(start, len) in kernel_regions {
        report::send(&Report::Workload { event: Event::KernelRegion, a: start, b: len });
    }
    // Watchers (the snapshot benchmark) wait for this line to know the
    // workload is under way. ~30 µs per byte, once.
    crate::println!("guest: workload starting");
    match run_task(k, kind, entry, buffer_pages, params) {
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

fn run_task(k: &mut Kernel, kind: WorkloadKind, entry: u64, buffer_pages: u64, params: [u64; 8]) -> Result<TaskExit, MapError> {
    let mut task = TaskFrame::new(k)?;
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
    let exit = if kind == WorkloadKind::Dirty && smp::count() > 1 { dirty_everywhere(k, &mut task, entry)? } else { task::run(&space, entry, USER_STACK_TOP - 8, user_layout::ARGS, 0) };
    let _ = k.buddy().free(buffer, order);
    task.release(k);
    Ok(exit)
}

/// Where the dirty workload's sync page goes (above the largest buffer).
const SYNC_VA: u64 = USER_HEAP_BASE + (2 << 30);

/// The dirty workload on every CPU: one task per CPU in the same space,
/// each writing its share of every round (`memvisor_user::workloads::dirty_rounds`),
/// so every vCPU's dirty ring holds part of each round. The other CPUs'
/// stacks and the sync page are reported as kernel regions (their pages
/// are dirtied too, for a reason). Returns how CPU 0's task ended (a task
/// of another CPU that faults makes the whole run fault).
fn dirty_everywhere(k: &mut Kernel, task: &mut TaskFrame, entry: u64) -> Result<TaskExit, MapError> {
    let space = task.space;
    let others = percpu::online() & !1;
    let sync = k.frames_alloc(0).ok_or(MapError::OutOfFrames)?;
    space.map(&mut k.mapper, SYNC_VA, sync, PAGE_SIZE, PageSize::Size4K, Pte::WRITABLE | Pte::NO_EXECUTE)?;
    let mut stacks = [0u64; memvisor_abi::smp::MAX_CPUS as usize];
    for cpu in cpus_of(others) {
        stacks[cpu] = task.map_cpu_stack(k, cpu)?;
        report::send(&Report::Workload { event: Event::KernelRegion, a: stacks[cpu], b: USER_STACK_SIZE });
    }
    report::send(&Report::Workload { event: Event::KernelRegion, a: sync, b: PAGE_SIZE });
    let args = &mut *task.args;
    args.params[3] = smp::count() as u64;
    args.params[4] = SYNC_VA;
    let mut exit = TaskExit::Exited(0);
    smp::run_everywhere(
        |cpu| Task { space, entry, rsp: if cpu == 0 { USER_STACK_TOP - 8 } else { user_layout::cpu_stack(cpu) + USER_STACK_SIZE - 8 }, arg0: user_layout::ARGS, arg1: cpu as u64 },
        |cpu, e| {
            if cpu == 0 || matches!(e, TaskExit::Faulted(_)) {
                exit = e;
            }
        },
    );
    // Back to the buddy allocator zero (its convention), by the swap device.
    let _ = crate::vm::swapdev::request(SwapOp::Zero, sync, 0);
    let _ = k.buddy().free(sync, 0);
    for cpu in cpus_of(others) {
        for q in 0..USER_STACK_SIZE / PAGE_SIZE {
            let _ = crate::vm::swapdev::request(SwapOp::Zero, stacks[cpu] + q * PAGE_SIZE, 0);
        }
        let _ = k.buddy().free(stacks[cpu], 2);
    }
    Ok(exit)
}
