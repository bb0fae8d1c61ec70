//! The boot self-test, reported check by check through `Report::Check`.
//!
//! One task address space holds a stack, a read-only argument page and a
//! window onto every free frame: the kernel drains the buddy allocator,
//! maps each block at `USER_HEAP_BASE + physical address` (so virtual and
//! physical alignment agree and the configured leaf size is used wherever
//! the block allows), and a ring-3 task writes a pattern over all of it and
//! reads it back, leaving it zero. Four probe tasks in the same space then
//! provoke one page fault each and the kernel compares the error codes
//! (SDM Vol. 3A §4.7): write to the read-only argument page (P|W|U = 0x7),
//! fetch from the NX stack (P|U|I = 0x15), read of a kernel page (P|U =
//! 0x5), read of an unmapped page (U = 0x4).

use memvisor_abi::layout::{USER_HEAP_BASE, USER_STACK_TOP};
use memvisor_abi::msg::{CheckId, Report, pf};
use memvisor_guest_mm::buddy::FRAME_SIZE;
use memvisor_guest_mm::paging::{MapError, PageTableEntry as Pte};
use memvisor_user::args::{MAX_RANGES, Range};
use memvisor_user::entry;

use crate::Kernel;
use crate::console::{Dec, Hex};
use crate::trap::PAGE_FAULT;
use crate::report;
use crate::task::{self, TaskExit, TaskFrame, user_layout};

/// A word in kernel data for the "ring 3 reads a kernel page" probe.
static KERNEL_PROBE_TARGET: u64 = 0x6b65_726e_656c;

/// Most buddy blocks the RAM task can take (one argument page of ranges).
const MAX_BLOCKS: usize = MAX_RANGES;

/// Runs every check; returns whether all passed.
///
/// # Errors
/// [`MapError`] if the task's tables cannot be built.
pub fn run(k: &mut Kernel) -> Result<bool, MapError> {
    let task = TaskFrame::new(k)?;
    let (space, args) = (task.space, &mut *task.args);

    // Drain the allocator into the window.
    let expected = k.buddy().free_bytes();
    // The argument page's ranges double as the list of blocks to give back
    // (one range per block: start - USER_HEAP_BASE is its address, the
    // length its order), so no second list has to be cleared at ring 0.
    while (args.nranges as usize) < MAX_BLOCKS {
        let Some((pa, order)) = k.buddy().alloc_largest() else { break };
        let len = FRAME_SIZE << order;
        space.map(&mut k.mapper, USER_HEAP_BASE + pa, pa, len, k.leaf, Pte::WRITABLE | Pte::NO_EXECUTE)?;
        args.ranges[args.nranges as usize] = Range { start: USER_HEAP_BASE + pa, len };
        args.nranges += 1;
    }
    let sys = u64::from(k.syscall_insn);
    let rsp = USER_STACK_TOP - 8;
    let t0 = crate::io::rdtsc();
    let exit = task::run(&space, entry::selftest_ram as *const () as usize as u64, rsp, user_layout::ARGS, sys);
    let t1 = crate::io::rdtsc();
    let got = match exit {
        TaskExit::Exited(bytes) => bytes,
        TaskExit::Faulted(f) => {
            crate::println!("guest: RAM task faulted: vector {} error {} cr2 {} rip {}", Dec(f.vector), Hex(f.error), Hex(f.cr2), Hex(f.rip));
            0
        }
    };
    for r in &args.ranges[..args.nranges as usize] {
        // Blocks come back exactly as they were handed out.
        let order = (r.len / FRAME_SIZE).trailing_zeros() as usize;
        let _ = k.buddy().free(r.start - USER_HEAP_BASE, order);
    }
    let mut all = report_check(CheckId::RamPattern, got == expected, expected, got, 0, 0);
    k.selftest_ram_tsc = t1 - t0;

    let kernel_word = &raw const KERNEL_PROBE_TARGET as u64;
    let probes = [
        (CheckId::ReadOnlyWrite, entry::probe_write as *const () as usize, user_layout::ARGS, pf::PRESENT | pf::WRITE | pf::USER),
        (CheckId::NxFetch, entry::probe_exec as *const () as usize, user_layout::STACK_BOTTOM, pf::PRESENT | pf::USER | pf::FETCH),
        (CheckId::UserReadsKernel, entry::probe_read as *const () as usize, kernel_word, pf::PRESENT | pf::USER),
        (CheckId::Unmapped, entry::probe_read as *const () as usize, user_layout::UNMAPPED, pf::USER),
    ];
    for (id, f, target, want) in probes {
        let exit = task::run(&space, f as u64, rsp, target, sys);
        all &= match exit {
            TaskExit::Faulted(f) => {
                // A fault other than #PF shows its vector above the error code.
                let pf_at_target = f.vector == PAGE_FAULT && f.cr2 == target;
                let got = if f.vector == PAGE_FAULT { f.error } else { f.error | (f.vector << 32) };
                report_check(id, pf_at_target && got == want, want, got, f.cr2, f.rip)
            }
            // No fault at all: "no error code".
            TaskExit::Exited(_) => report_check(id, false, want, u64::MAX, 0, 0),
        };
    }
    task.release(k);
    Ok(all)
}

fn report_check(id: CheckId, passed: bool, expected: u64, got: u64, cr2: u64, rip: u64) -> bool {
    report::send(&Report::Check { id, passed, expected, got, cr2, rip });
    passed
}
