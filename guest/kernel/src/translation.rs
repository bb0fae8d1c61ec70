//! The translation benchmark's guest side: a ring-3 task over a buffer of
//! the asked working set, mapped with the configured leaf size
//! (`memvisor_abi::workload::WorkloadKind::Translation`; the task's code is
//! `memvisor_user::translation::entry`, the same code the VMM runs natively).
//!
//! One buddy block holds at most 1 GiB and RAM has a hole below 4 GiB, so
//! the buffer is built from several blocks, largest first, mapped one after
//! another at `USER_HEAP_BASE`. Taking blocks in non-increasing size keeps
//! every block's virtual offset a multiple of its size, so virtual and
//! physical alignment agree and 2 MiB (or 1 GiB) leaves are used wherever
//! the leaf size asks for them. The kernel never touches the buffer itself:
//! ring 0 is emulated on some hosts; building and warming happen at ring 3.

use memvisor_abi::layout::{PAGE_SIZE, USER_HEAP_BASE, USER_STACK_TOP};
use memvisor_abi::workload::WorkloadSpec;
use memvisor_guest_mm::buddy::MAX_ORDER;
use memvisor_guest_mm::paging::{MapError, PageSize, PageTableEntry as Pte};
use memvisor_user::args::Range;

use crate::Kernel;
use crate::console::{Dec, Hex};
use crate::task::{self, TaskExit, TaskFrame, user_layout};

/// Most blocks one buffer is built from.
const MAX_BLOCKS: usize = 64;

/// Exit status when the buffer cannot be built or the task faults.
const EXIT_FAILED: u32 = 4;

/// Runs the translation workload; returns the exit status.
pub fn run(k: &mut Kernel, spec: &WorkloadSpec) -> u32 {
    let bytes = spec.params[1];
    match run_task(k, spec) {
        Ok(TaskExit::Exited(status)) => u32::try_from(status).unwrap_or(u32::MAX),
        Ok(TaskExit::Faulted(f)) => {
            crate::println!("guest: translation workload faulted: vector {} error {} cr2 {} rip {}", Dec(f.vector), Hex(f.error), Hex(f.cr2), Hex(f.rip));
            EXIT_FAILED
        }
        Err(_) => {
            crate::println!("guest: cannot build a {} byte translation buffer from free RAM", Dec(bytes));
            EXIT_FAILED
        }
    }
}

fn run_task(k: &mut Kernel, spec: &WorkloadSpec) -> Result<TaskExit, MapError> {
    let bytes = spec.params[1];
    if !bytes.is_power_of_two() || bytes < 2 * PAGE_SIZE {
        return Err(MapError::Misaligned);
    }
    let task = TaskFrame::new(k)?;
    let space = task.space;
    // Blocks no smaller than the leaf, where the buffer allows.
    let leaf_order = (k.leaf.shift() - PageSize::Size4K.shift()) as usize;
    let buffer_order = (bytes / PAGE_SIZE).trailing_zeros() as usize;
    let min_order = leaf_order.min(buffer_order);
    let mut blocks = [(0u64, 0usize); MAX_BLOCKS];
    let mut n = 0;
    let mut done = 0u64;
    let mut order = buffer_order.min(MAX_ORDER);
    let mut result = Ok(());
    while done < bytes {
        order = order.min(((bytes - done) / PAGE_SIZE).trailing_zeros() as usize);
        if order < min_order || n == MAX_BLOCKS {
            result = Err(MapError::OutOfFrames);
            break;
        }
        let Some(pa) = k.frames_alloc(order) else {
            // Smaller blocks, down to the leaf size; below that the buffer
            // cannot be built (not enough free RAM).
            if order == min_order {
                result = Err(MapError::OutOfFrames);
                break;
            }
            order -= 1;
            continue;
        };
        blocks[n] = (pa, order);
        n += 1;
        let len = PAGE_SIZE << order;
        if let Err(e) = space.map(&mut k.mapper, USER_HEAP_BASE + done, pa, len, k.leaf, Pte::WRITABLE | Pte::NO_EXECUTE) {
            result = Err(e);
            break;
        }
        done += len;
    }
    let exit = result.map(|()| {
        let args = &mut *task.args;
        args.nranges = 1;
        args.ranges[0] = Range { start: USER_HEAP_BASE, len: bytes };
        args.params = [spec.params[0], bytes, spec.params[2], spec.params[3], spec.params[4], 0, 0, 0];
        let entry = memvisor_user::translation::entry as *const () as usize as u64;
        task::run(&space, entry, USER_STACK_TOP - 8, user_layout::ARGS, 0)
    });
    for &(pa, order) in &blocks[..n] {
        let _ = k.buddy().free(pa, order);
    }
    task.release(k);
    exit
}
