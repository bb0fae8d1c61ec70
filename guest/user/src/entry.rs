//! Task entry points. The kernel starts a task at one of these with `iretq`,
//! `rsp` at the top of the task's stack and the arguments in `rdi`/`rsi`.
//! None returns: each ends with [`crate::sys::exit`], or faults on purpose.

use crate::args::TaskArgs;
use crate::pattern;
use crate::sys::exit;

/// The self-test's RAM task: writes the pattern over every range in `args`,
/// then reads all of it back (zeroing it), and exits with the number of
/// bytes that verified.
///
/// # Safety
/// Entered only by the kernel, with `args` pointing at a valid [`TaskArgs`]
/// whose ranges are writable memory of this task.
#[inline(never)]
pub unsafe extern "C" fn selftest_ram(args: *const TaskArgs) -> ! {
    // SAFETY: the kernel passes a valid, mapped argument block.
    let args = unsafe { &*args };
    let n = args.nranges.min(crate::args::MAX_RANGES as u64) as usize;
    let ranges = args.ranges.as_ptr();
    let mut i = 0;
    while i < n {
        // SAFETY: i < n <= MAX_RANGES; the range is the task's own memory.
        unsafe {
            let r = *ranges.add(i);
            pattern::fill(r.start as *mut u64, r.len);
        }
        i += 1;
    }
    let mut good = 0u64;
    i = 0;
    while i < n {
        // SAFETY: as above.
        unsafe {
            let r = *ranges.add(i);
            good = good.wrapping_add(pattern::verify_and_zero(r.start as *mut u64, r.len));
        }
        i += 1;
    }
    exit(good, args.syscall_insn != 0)
}

/// Reads the word at `addr`; expected to fault. Exits with the value read
/// if it does not.
///
/// # Safety
/// Entered only by the kernel.
#[inline(never)]
pub unsafe extern "C" fn probe_read(addr: *const u64, syscall_insn: u64) -> ! {
    // SAFETY: the point is to fault; if the read succeeds it read mapped memory.
    let v = unsafe { addr.read_volatile() };
    exit(v, syscall_insn != 0)
}

/// Writes the word at `addr`; expected to fault.
///
/// # Safety
/// Entered only by the kernel.
#[inline(never)]
pub unsafe extern "C" fn probe_write(addr: *mut u64, syscall_insn: u64) -> ! {
    // SAFETY: the point is to fault; if it does not, the page was the task's.
    unsafe { addr.write_volatile(0x5a5a) };
    exit(0, syscall_insn != 0)
}

/// Calls `addr` as code; expected to fault on the fetch.
///
/// # Safety
/// Entered only by the kernel.
#[inline(never)]
pub unsafe extern "C" fn probe_exec(addr: usize, syscall_insn: u64) -> ! {
    // SAFETY: the point is to fault on the fetch; the page holds zeros,
    // which would decode as `add [rax], al` if it were executable.
    let f: extern "C" fn() = unsafe { core::mem::transmute::<usize, extern "C" fn()>(addr) };
    f();
    exit(0, syscall_insn != 0)
}
