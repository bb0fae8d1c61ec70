//! Ring-3 memory workloads the VMM asks for (`vmm run --workload ...`).
//!
//! Like everything in this crate they avoid bounds checks and calls into
//! kernel code: raw pointers and wrapping arithmetic only.

use memvisor_abi::workload::{Event, dirty_page};

use crate::args::TaskArgs;
use crate::sys::{event, exit};
use crate::versioned::{self, PAGE_WORDS};

/// Dirty rounds: `params` = [pages per round, rounds, seed, CPUs, sync
/// page]; `ranges[0]` is the buffer; `cpu` (in `rsi`) is this task's CPU.
/// In round `r`, page [`dirty_page`]`(seed, r, i, buffer pages)` gets one
/// word written for each `i`, then CPU 0's task reports
/// [`Event::RoundDone`] (the VMM harvests before the call returns).
///
/// With several CPUs (`params[3]` > 1) every CPU's task runs this in one
/// address space and writes the pages with `i % CPUs == cpu`, so each
/// round's writes land in every vCPU's dirty ring; the sync page (word 0:
/// the round CPU 0 has released, word `8 + c`: the rounds CPU `c` has
/// finished) keeps the rounds in step: CPU 0 reports a round once every
/// CPU finished it, and the others start the next one only after that
/// report returned, so no write of round `r + 1` lands before round `r`'s
/// harvest.
///
/// # Safety
/// Entered only by the kernel, with `args` valid, `ranges[0]` the task's
/// own writable buffer and, with several CPUs, `params[4]` its sync page.
#[inline(never)]
pub unsafe extern "C" fn dirty_rounds(args: *const TaskArgs, cpu: u64) -> ! {
    // SAFETY: the kernel passes a valid, mapped argument block.
    let a = unsafe { &*args };
    let sys = a.syscall_insn != 0;
    // SAFETY: nranges >= 1 for this workload (the kernel sets it).
    let buf = unsafe { (*a.ranges.as_ptr()).start } as *mut u64;
    // SAFETY: as above.
    let buffer_pages = unsafe { (*a.ranges.as_ptr()).len } / 4096;
    let (pages, rounds, seed) = (a.params[0], a.params[1], a.params[2]);
    let (cpus, sync) = (a.params[3].clamp(1, 64), a.params[4] as *mut u64);
    // Words of the sync page (single aligned volatile accesses; `c` < 64).
    let released = || -> u64 {
        // SAFETY: with several CPUs the kernel maps the sync page RW.
        unsafe { sync.read_volatile() }
    };
    let finished = |c: u64| -> u64 {
        // SAFETY: as above; word 8 + c < 512.
        unsafe { sync.add(8 + c as usize).read_volatile() }
    };
    let mut r = 0;
    while r < rounds {
        while cpus > 1 && cpu != 0 && released() < r {
            core::hint::spin_loop();
        }
        let start = rdtsc();
        let mut i = cpu;
        while i < pages {
            let p = dirty_page(seed, r, i, buffer_pages);
            // SAFETY: p < buffer_pages, so the word is inside the buffer.
            unsafe { buf.add((p * PAGE_WORDS + r % PAGE_WORDS) as usize).write_volatile(r ^ i) };
            i += cpus;
        }
        if cpus > 1 {
            // SAFETY: as for `finished`.
            unsafe { sync.add(8 + cpu as usize).write_volatile(r + 1) };
            if cpu == 0 {
                let mut c = 1;
                while c < cpus {
                    while finished(c) <= r {
                        core::hint::spin_loop();
                    }
                    c += 1;
                }
            }
        }
        if cpu == 0 {
            event(Event::RoundDone as u64, r, rdtsc().wrapping_sub(start), sys);
            if cpus > 1 {
                // SAFETY: as for `released`.
                unsafe { sync.write_volatile(r + 1) };
            }
        }
        r += 1;
    }
    if cpu == 0 {
        // Touch every buffer page once more after logging ended, so the
        // VMM's last look at KVM's mappings shows whether large ones came back.
        let mut p = 0;
        while p < buffer_pages {
            // SAFETY: p < buffer_pages.
            unsafe { buf.add((p * PAGE_WORDS) as usize).write_volatile(p) };
            p += 1;
        }
    }
    exit(0, sys)
}

/// An FNV-1a style checksum of `words` words from `p`.
///
/// # Safety
/// `p` must be valid for `words` reads.
#[inline(always)]
unsafe fn checksum(p: *const u64, words: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let mut i = 0;
    while i < words {
        // SAFETY: i < words, within the caller's range.
        h = (h ^ unsafe { p.add(i as usize).read_volatile() }).wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    h
}

#[inline(always)]
fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: rdtsc only reads the time-stamp counter (allowed at CPL 3
    // unless CR4.TSD, which the kernel leaves clear).
    unsafe { core::arch::asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Checksum rounds: `params` = [pages, rounds, milliseconds between
/// rounds, seed, TSC kHz]; `ranges[0]` is the buffer. Fills every page
/// (round 0), then in each round `r` ≥ 1: waits, checks that every page
/// holds what it must after round `r - 1` ([`versioned`]), rewrites the
/// pages round `r` selects, and reports the buffer's checksum. After the
/// last round it checks once more. Reports [`Event::Mismatch`] (round,
/// pages that differ) for every check that found differences and exits
/// with the number of such checks. The checksums depend only on the
/// parameters, so a run restored from a snapshot reports the same
/// checksum for each round as the run that was snapshotted.
///
/// # Safety
/// As [`dirty_rounds`].
#[inline(never)]
pub unsafe extern "C" fn checksum_rounds(args: *const TaskArgs) -> ! {
    // SAFETY: the kernel passes a valid, mapped argument block.
    let a = unsafe { &*args };
    let sys = a.syscall_insn != 0;
    // SAFETY: nranges >= 1 for this workload.
    let buf = unsafe { (*a.ranges.as_ptr()).start } as *mut u64;
    let (pages, rounds, ms, seed, tsc_khz) = (a.params[0], a.params[1], a.params[2], a.params[3], a.params[4]);
    let words = pages * PAGE_WORDS;
    let mut mismatches = 0;
    let mut r = 0;
    while r < rounds {
        if r > 0 {
            let start = rdtsc();
            while rdtsc().wrapping_sub(start) < ms.wrapping_mul(tsc_khz) {
                core::hint::spin_loop();
            }
            // SAFETY: the buffer holds `pages` pages.
            let bad = unsafe { versioned::differing_pages(buf, pages, seed, r - 1) };
            if bad > 0 {
                mismatches += 1;
                event(Event::Mismatch as u64, r, bad, sys);
            }
        }
        let mut p = 0;
        while p < pages {
            if versioned::rewritten(seed, r, p) {
                // SAFETY: p < pages: page p is inside the buffer.
                unsafe { versioned::write_page(buf.add((p * PAGE_WORDS) as usize), seed, p, r) };
            }
            p += 1;
        }
        // SAFETY: the buffer holds `words` words.
        let c = unsafe { checksum(buf, words) };
        event(Event::Checksum as u64, r, c, sys);
        r += 1;
    }
    let bad = if rounds > 0 {
        // SAFETY: as above.
        unsafe { versioned::differing_pages(buf, pages, seed, rounds.wrapping_sub(1)) }
    } else {
        0
    };
    if bad > 0 {
        mismatches += 1;
        event(Event::Mismatch as u64, rounds, bad, sys);
    }
    exit(mismatches, sys)
}
