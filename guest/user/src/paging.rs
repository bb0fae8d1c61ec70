//! The guest-paging workloads' ring-3 side (issue 6): the access loop over
//! a demand-paged region, and the copy-on-write fork check.
//!
//! Both run in memory the kernel maps lazily: every first touch, and every
//! touch of a page the kernel evicted, is a page fault the task never sees.
//! What they check is that the data survives: every word `w` of a page
//! holds [`word_tag`]`(page, version, w)`, and the task keeps the version
//! it last wrote in memory the kernel maps eagerly, so a lost write-back or a
//! wrong page read back from swap shows up as a mismatch.

use memvisor_abi::paging::{access, is_write, word_tag};
use memvisor_abi::workload::{Event, PAGING_PROBE_READ_ONLY, PAGING_PROBE_WILD};

use crate::args::TaskArgs;
use crate::sys::{event, exit, fork, yield_now};

const PAGE_WORDS: usize = 512;
/// The cow check's buffer on the task's own stack: two pages' worth of
/// words, so it spans at least two stack pages.
const STACK_CHUNKS: usize = 2;
/// Tag ids of the stack buffer's chunks, apart from every region page.
const STACK_TAG: u64 = 1 << 32;

/// Checks that every word of `page` (index `p`) holds version `v`; 1 if
/// any does not. Ring 3 runs at native speed, so reading the whole page is
/// cheap next to the fault that brought it in.
///
/// # Safety
/// `page` must point at a readable 4 KiB page of the task.
#[inline(always)]
unsafe fn mismatch(page: *const u64, p: u64, v: u64) -> u64 {
    let mut bad = false;
    let mut w = 0;
    while w < PAGE_WORDS {
        // SAFETY: the caller's page; w < PAGE_WORDS keeps the word inside it.
        bad |= unsafe { page.add(w).read_volatile() } != word_tag(p, v, w as u64);
        w += 1;
    }
    u64::from(bad)
}

/// Writes version `v` of page `p` into every word.
///
/// # Safety
/// `page` must point at a writable 4 KiB page of the task.
#[inline(always)]
unsafe fn stamp(page: *mut u64, p: u64, v: u64) {
    let mut w = 0;
    while w < PAGE_WORDS {
        // SAFETY: the caller's page; w < PAGE_WORDS keeps the word inside it.
        unsafe { page.add(w).write_volatile(word_tag(p, v, w as u64)) };
        w += 1;
    }
}

/// The paging access loop: `params` = [policy, frames, pattern, pages,
/// accesses, seed, write percent, probe]; `ranges[0]` is the demand-paged
/// region (`pages` pages), `ranges[1]` one eagerly mapped `u64` per page
/// (the version last written, zero at start). Access `i` reads page
/// [`access`]`(pattern, seed, i, pages)`, checks its version, and writes
/// the next version when [`is_write`] says so. Reports
/// [`Event::PagingChecked`], then makes the probe access the kernel asked
/// for (which kills the task), else exits with the mismatch count.
///
/// # Safety
/// Entered only by the kernel, with `args` valid and both ranges the
/// task's own writable memory.
#[inline(never)]
pub unsafe extern "C" fn paging_access(args: *const TaskArgs) -> ! {
    // SAFETY: the kernel passes a valid, mapped argument block.
    let a = unsafe { &*args };
    let sys = a.syscall_insn != 0;
    // SAFETY: nranges is 2 for this workload (the kernel sets it).
    let (region, versions) = unsafe { ((*a.ranges.as_ptr()).start as *mut u64, (*a.ranges.as_ptr().add(1)).start as *mut u64) };
    // SAFETY: as above.
    let region_len = unsafe { (*a.ranges.as_ptr()).len };
    let (pattern, pages, accesses, seed, write_pct, probe) = (a.params[2], a.params[3], a.params[4], a.params[5], a.params[6], a.params[7]);
    let mut bad = 0u64;
    let mut i = 0;
    while i < accesses {
        let p = access(pattern, seed, i, pages);
        let page = region.wrapping_add(p as usize * PAGE_WORDS);
        // SAFETY: p < pages: the version slot and the page are the task's.
        unsafe {
            let v = versions.add(p as usize).read_volatile();
            bad += mismatch(page, p, v);
            if is_write(seed, i, write_pct) {
                stamp(page, p, v + 1);
                versions.add(p as usize).write_volatile(v + 1);
            }
        }
        i += 1;
    }
    event(Event::PagingChecked as u64, accesses, bad, sys);
    if probe == u64::from(PAGING_PROBE_READ_ONLY) {
        // SAFETY: deliberately faulting: the argument page is read-only.
        unsafe { (args as *mut u64).write_volatile(1) };
    } else if probe == u64::from(PAGING_PROBE_WILD) {
        // SAFETY: deliberately faulting: just past the region nothing is mapped.
        let _ = unsafe { (region.wrapping_byte_add(region_len as usize) as *const u64).read_volatile() };
    }
    exit(bad, sys)
}

/// The copy-on-write check: `params` = [pages]; `ranges[0]` is the
/// demand-paged region. Writes version 1 of every page and of a buffer on
/// its own stack, forks, and then: the parent writes version 2 of the even
/// pages and of the stack buffer and yields; the child checks it still sees
/// version 1 everywhere (stack included), writes version 3 of the pages
/// divisible by 3 and of the stack buffer and yields; each then checks that
/// it sees exactly its own writes, reports [`Event::CowChecked`] (a = 0
/// parent, 1 child, b = mismatching pages and stack chunks) and exits with
/// the mismatch count.
///
/// # Safety
/// As [`paging_access`], with one range.
#[inline(never)]
pub unsafe extern "C" fn cow_fork(args: *const TaskArgs) -> ! {
    // SAFETY: the kernel passes a valid, mapped argument block.
    let a = unsafe { &*args };
    let sys = a.syscall_insn != 0;
    // SAFETY: nranges is 1 for this workload.
    let region = unsafe { (*a.ranges.as_ptr()).start } as *mut u64;
    let pages = a.params[0];
    let page = |p: u64| region.wrapping_add(p as usize * PAGE_WORDS);
    // Uninitialised: `stamp` writes every word before any is read, and
    // zero-initialising it compiled to a call to the kernel's `memset`
    // (through a pointer in kernel data), which ring 3 cannot reach.
    let mut stack = core::mem::MaybeUninit::<[u64; STACK_CHUNKS * PAGE_WORDS]>::uninit();
    let chunk = stack.as_mut_ptr().cast::<u64>();
    let chunk = |c: usize| chunk.wrapping_add(c * PAGE_WORDS);
    let mut p = 0;
    while p < pages {
        // SAFETY: p < pages, inside the region.
        unsafe { stamp(page(p), p, 1) };
        p += 1;
    }
    let mut c = 0;
    while c < STACK_CHUNKS {
        // SAFETY: chunk c of the buffer on this task's stack.
        unsafe { stamp(chunk(c), STACK_TAG + c as u64, 1) };
        c += 1;
    }
    let child = match fork(sys) {
        0 => true,
        1 => false,
        _ => exit(u64::MAX, sys),
    };
    let mut bad = 0u64;
    if child {
        p = 0;
        while p < pages {
            // SAFETY: as above.
            bad += unsafe { mismatch(page(p), p, 1) };
            p += 1;
        }
        c = 0;
        while c < STACK_CHUNKS {
            // SAFETY: as above.
            bad += unsafe { mismatch(chunk(c), STACK_TAG + c as u64, 1) };
            c += 1;
        }
    }
    let mine = |p: u64| if child { p.is_multiple_of(3) } else { p.is_multiple_of(2) };
    let version = if child { 3 } else { 2 };
    p = 0;
    while p < pages {
        if mine(p) {
            // SAFETY: as above.
            unsafe { stamp(page(p), p, version) };
        }
        p += 1;
    }
    c = 0;
    while c < STACK_CHUNKS {
        // SAFETY: as above.
        unsafe { stamp(chunk(c), STACK_TAG + c as u64, version) };
        c += 1;
    }
    yield_now(sys);
    p = 0;
    while p < pages {
        // SAFETY: as above.
        bad += unsafe { mismatch(page(p), p, if mine(p) { version } else { 1 }) };
        p += 1;
    }
    c = 0;
    while c < STACK_CHUNKS {
        // SAFETY: as above.
        bad += unsafe { mismatch(chunk(c), STACK_TAG + c as u64, version) };
        c += 1;
    }
    event(Event::CowChecked as u64, u64::from(child), bad, sys);
    exit(bad, sys)
}
