//! The boot self-test, reported check by check through `Report::Check`.
//!
//! Each CPU gets a task address space with a stack, a read-only argument
//! page and a window onto its share of the free frames: the kernel drains
//! the buddy allocator, maps each block at `USER_HEAP_BASE + physical
//! address` (so virtual and physical alignment agree and the configured
//! leaf size is used wherever the block allows) in the space of the CPU
//! with the smallest share so far, and the CPUs' ring-3 tasks write a
//! pattern over their windows in parallel and read it back, leaving it
//! zero (one CPU: one task over all free RAM). Four probe tasks in the
//! boot CPU's space then provoke one page fault each and the kernel
//! compares the error codes (SDM Vol. 3A §4.7): write to the read-only argument page (P|W|U = 0x7),
//! fetch from the NX stack (P|U|I = 0x15), read of a kernel page (P|U =
//! 0x5), read of an unmapped page (U = 0x4).

use memvisor_abi::layout::{USER_HEAP_BASE, USER_STACK_TOP};
use memvisor_abi::msg::{CheckId, Report, pf};
use memvisor_guest_mm::buddy::FRAME_SIZE;
use memvisor_guest_mm::paging::{MapError, PageTableEntry as Pte};
use memvisor_user::args::{MAX_RANGES, Range};
use memvisor_user::entry;

use core::sync::atomic::Ordering;

use memvisor_abi::smp::MAX_CPUS as CPUS;

use crate::Kernel;
use crate::console::{Dec, Hex};
use crate::smp::{self, Task};
use crate::task::{self, TaskExit, TaskFrame, user_layout};
use crate::trap::PAGE_FAULT;
use crate::{percpu, report};

const MAX_CPUS: usize = CPUS as usize;

/// A word in kernel data for the "ring 3 reads a kernel page" probe.
static KERNEL_PROBE_TARGET: u64 = 0x6b65_726e_656c;

/// Blocks are not halved below 2 MiB (order 9), so 2 MiB leaves stay usable.
const SPLIT_MIN_ORDER: usize = 9;

/// Most buddy blocks the RAM task can take (one argument page of ranges).
const MAX_BLOCKS: usize = MAX_RANGES;

/// Runs every check; returns whether all passed.
///
/// # Errors
/// [`MapError`] if the task's tables cannot be built.
pub fn run(k: &mut Kernel) -> Result<bool, MapError> {
    // One RAM task per CPU, each in its own address space with its share of
    // the free frames; they run in parallel (crate::smp). The boot CPU's
    // space then serves the probes.
    let cpus = smp::count().min(MAX_CPUS);
    let mut frames: [Option<TaskFrame>; MAX_CPUS] = [const { None }; MAX_CPUS];
    for slot in frames.iter_mut().take(cpus) {
        *slot = Some(TaskFrame::new(k)?);
    }
    let mut shares = [0u64; MAX_CPUS];

    // Drain the allocator into the windows, each block to the CPU with the
    // least so far; a block larger than a fair share is halved first (its
    // halves are buddy blocks too), down to 2 MiB, so shares end up even.
    let expected = k.buddy().free_bytes();
    let fair = expected.div_ceil(cpus as u64);
    let mut halves = [(0u64, 0usize); 64];
    let mut nhalves = 0;
    // The argument page's ranges double as the list of blocks to give back
    // (one range per block: start - USER_HEAP_BASE is its address, the
    // length its order), so no second list has to be cleared at ring 0.
    loop {
        let c = (0..cpus).min_by_key(|&c| shares[c]).unwrap_or(0);
        let Some(task) = frames[c].as_mut() else { break };
        if task.args.nranges as usize >= MAX_BLOCKS {
            // Give back what is still held; the check then reports the
            // shortfall.
            for &(pa, order) in &halves[..nhalves] {
                let _ = k.buddy().free(pa, order);
            }
            break;
        }
        let next = if nhalves > 0 {
            nhalves -= 1;
            Some(halves[nhalves])
        } else {
            k.buddy().alloc_largest()
        };
        let Some((pa, mut order)) = next else { break };
        while cpus > 1 && order > SPLIT_MIN_ORDER && FRAME_SIZE << order > fair && nhalves < halves.len() {
            order -= 1;
            halves[nhalves] = (pa + (FRAME_SIZE << order), order);
            nhalves += 1;
        }
        let len = FRAME_SIZE << order;
        task.space.map(&mut k.mapper, USER_HEAP_BASE + pa, pa, len, k.leaf, Pte::WRITABLE | Pte::NO_EXECUTE)?;
        let args = &mut *task.args;
        args.ranges[args.nranges as usize] = Range { start: USER_HEAP_BASE + pa, len };
        args.nranges += 1;
        shares[c] += len;
    }
    let sys = u64::from(k.syscall_insn);
    let rsp = USER_STACK_TOP - 8;
    let entry = entry::selftest_ram as *const () as usize as u64;
    let space = frames[0].as_ref().expect("cpus >= 1: the boot CPU's task was built above").space;
    let mut got = 0u64;
    let t0 = crate::io::rdtsc();
    smp::run_everywhere(
        |cpu| Task { space: frames.get(cpu).and_then(Option::as_ref).map_or(space, |t| t.space), entry, rsp, arg0: user_layout::ARGS, arg1: sys },
        |cpu, exit| {
            let bytes = match exit {
                TaskExit::Exited(bytes) => bytes,
                TaskExit::Faulted(f) => {
                    crate::println!("guest: RAM task on CPU {} faulted: vector {} error {} cr2 {} rip {}", Dec(cpu as u64), Dec(f.vector), Hex(f.error), Hex(f.cr2), Hex(f.rip));
                    0
                }
            };
            percpu::of(cpu).selftest_bytes.store(bytes, Ordering::Release);
            got += bytes;
        },
    );
    let t1 = crate::io::rdtsc();
    for task in frames.iter().take(cpus).flatten() {
        for r in &task.args.ranges[..task.args.nranges as usize] {
            // Blocks come back exactly as they were handed out.
            let order = (r.len / FRAME_SIZE).trailing_zeros() as usize;
            let _ = k.buddy().free(r.start - USER_HEAP_BASE, order);
        }
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
    for task in frames.into_iter().flatten() {
        task.release(k);
    }
    Ok(all)
}

fn report_check(id: CheckId, passed: bool, expected: u64, got: u64, cr2: u64, rip: u64) -> bool {
    report::send(&Report::Check { id, passed, expected, got, cr2, rip });
    passed
}
