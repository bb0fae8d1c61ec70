//! Ring-3 helpers of the balloon driver: the bulk work that would cost
//! ~1 µs per instruction at ring 0 on an emulating host.

use crate::args::TaskArgs;
use crate::sys::exit;

/// Expands runs of frames into a PFN array: `ranges[0]` is the array (the
/// task's window), `ranges[1..nranges]` are `(first PFN, count)` runs
/// (`start` = first PFN, `len` = count). Writes the PFNs as `u32`s in run
/// order, stopping when the array is full; exits with the number written.
///
/// # Safety
/// Entered only by the kernel, with `args` valid and `ranges[0]` the task's
/// own writable memory.
#[inline(never)]
pub unsafe extern "C" fn fill_pfns(args: *const TaskArgs) -> ! {
    // SAFETY: the kernel passes a valid, mapped argument block.
    let a = unsafe { &*args };
    let n = a.nranges.min(crate::args::MAX_RANGES as u64) as usize;
    let ranges = a.ranges.as_ptr();
    // SAFETY: nranges >= 1 for this task (the kernel sets it).
    let out = unsafe { *ranges };
    let base = out.start as *mut u32;
    let cap = out.len / 4;
    let mut written = 0u64;
    let mut i = 1;
    while i < n {
        // SAFETY: i < n <= MAX_RANGES.
        let r = unsafe { *ranges.add(i) };
        let mut j = 0;
        while j < r.len && written < cap {
            // SAFETY: written < cap, inside the array.
            unsafe { base.add(written as usize).write_volatile((r.start + j) as u32) };
            written += 1;
            j += 1;
        }
        i += 1;
    }
    exit(written, a.syscall_insn != 0)
}
