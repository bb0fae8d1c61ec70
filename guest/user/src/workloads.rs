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

/// The longest gaps the ticker keeps: enough that a migration's stop is
/// among them on a loaded host, where being preempted for a few
/// milliseconds is common.
const TOP_GAPS: usize = 32;

/// Ticker: `params` = [seconds, MiB per second, pages, fill, TSC kHz];
/// `ranges[0]` is the buffer (`memvisor_abi::workload::WorkloadKind::Ticker`).
///
/// # Safety
/// As [`dirty_rounds`].
#[inline(never)]
pub unsafe extern "C" fn ticker(args: *const TaskArgs) -> ! {
    // SAFETY: the kernel passes a valid, mapped argument block.
    let a = unsafe { &*args };
    let sys = a.syscall_insn != 0;
    // SAFETY: nranges >= 1 for this workload.
    let buf = unsafe { (*a.ranges.as_ptr()).start } as *mut u64;
    // SAFETY: as above.
    let pages = unsafe { (*a.ranges.as_ptr()).len } / 4096;
    let (secs, mibs, fill, tsc_khz) = (a.params[0], a.params[1], a.params[3], a.params[4]);
    if fill != 0 {
        let mut w = 0;
        while w < pages * PAGE_WORDS {
            // SAFETY: w < pages * PAGE_WORDS, inside the buffer.
            unsafe { buf.add(w as usize).write_volatile(w ^ 0x9e37_79b9_7f4a_7c15) };
            w += 1;
        }
    }
    let ticks_per_sec = tsc_khz.wrapping_mul(1000);
    // One page every `per_page` ticks (256 pages per MiB); 0: none.
    let per_page = ticks_per_sec.checked_div(mibs.wrapping_mul(256)).unwrap_or(0);
    let end = secs.wrapping_mul(ticks_per_sec);
    // The gaps, longest first, as (length, start) pairs. Accessed with
    // volatile operations only: plain ones let the compiler call memset or
    // memmove, which live in kernel text that ring 3 cannot reach.
    let mut gaps = core::mem::MaybeUninit::<[u64; 2 * TOP_GAPS]>::uninit();
    let top = gaps.as_mut_ptr().cast::<u64>();
    let mut k = 0;
    while k < 2 * TOP_GAPS {
        // SAFETY: k < 2 * TOP_GAPS, inside the array.
        unsafe { top.add(k).write_volatile(0) };
        k += 1;
    }
    let start = rdtsc();
    let mut last = start;
    let mut next_due = start;
    let mut page = 0;
    let mut written = 0u64;
    loop {
        let now = rdtsc();
        let gap = now.wrapping_sub(last);
        // SAFETY: every index below is < 2 * TOP_GAPS.
        if gap > unsafe { top.add(2 * (TOP_GAPS - 1)).read_volatile() } {
            let mut i = TOP_GAPS - 1;
            // SAFETY: as above (i - 1 >= 0 while i > 0).
            while i > 0 && unsafe { top.add(2 * (i - 1)).read_volatile() } < gap {
                // SAFETY: as above.
                unsafe {
                    top.add(2 * i).write_volatile(top.add(2 * (i - 1)).read_volatile());
                    top.add(2 * i + 1).write_volatile(top.add(2 * (i - 1) + 1).read_volatile());
                }
                i -= 1;
            }
            // SAFETY: as above.
            unsafe {
                top.add(2 * i).write_volatile(gap);
                top.add(2 * i + 1).write_volatile(last);
            }
        }
        last = now;
        if now.wrapping_sub(start) >= end {
            break;
        }
        if per_page != 0 {
            // Writes follow the time the task ran: after a stretch off the
            // CPU (a throttled vCPU) it does not catch up beyond 1 ms, as
            // a CPU-bound writer would not.
            if now.wrapping_sub(next_due) > tsc_khz && now > next_due {
                next_due = now.wrapping_sub(tsc_khz);
            }
            while next_due <= now {
                written += 1;
                // SAFETY: page < pages: inside the buffer.
                unsafe { buf.add((page * PAGE_WORDS + (written & (PAGE_WORDS - 1))) as usize).write_volatile(written) };
                page += 1;
                if page == pages {
                    page = 0;
                }
                next_due = next_due.wrapping_add(per_page);
            }
        }
    }
    // Ticks to nanoseconds (a gap of seconds × 10^6 fits in 64 bits).
    let ns = |ticks: u64| ticks.wrapping_mul(1_000_000).checked_div(tsc_khz).unwrap_or(0);
    let mut i = 0;
    while i < TOP_GAPS {
        // SAFETY: i < TOP_GAPS.
        let (gap, at) = unsafe { (top.add(2 * i).read_volatile(), top.add(2 * i + 1).read_volatile()) };
        if gap > 0 {
            event(Event::ClockGap as u64, ns(gap), at, sys);
        }
        i += 1;
    }
    event(Event::TickerDone as u64, written, ns(last.wrapping_sub(start)), sys);
    exit(0, sys)
}
