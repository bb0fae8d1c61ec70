//! The TLB shootdown workload's ring-3 reader.
//!
//! Every CPU but the boot CPU runs one reader in a shared address space
//! (like threads of one process): `ranges[0]` is the shared region of
//! `pages` pages, `ranges[1]` the [`Control`] page. A reader keeps every
//! region page's translation hot in its TLB (it reads, or in write-protect
//! mode writes, each page in a loop) and watches [`Control::round`]. The boot
//! CPU changes one page per round and then publishes the round; the reader
//! then checks that page once:
//! - **remap**: word 0 of every frame holds its tag; the reader must read
//!   [`Control::expect`], the tag of the frame the page maps now;
//! - **write-protect**: the reader's write to the page must fault.
//!
//! A check that sees the old translation (the old frame's tag, or a write
//! that went through) is **stale**. With the kernel's shootdown it cannot
//! happen: the reader's CPU acknowledged the flush before the round was
//! published. The reader reports its checks and stale count
//! (`Event::ShootdownReader`, `Event::ShootdownStale`) and exits with the
//! stale count.
//!
//! Writes go through [`try_write`]: one instruction the kernel knows
//! ([`TRY_WRITE_INSN`]), so that a write-protection fault there is turned
//! into a return value (the kernel resumes at [`TRY_WRITE_RESUME`] with
//! `rax = 1`), as Linux's exception tables do for `copy_to_user`.

use core::arch::global_asm;

use memvisor_abi::workload::{Event, SHOOTDOWN_WRITE_PROTECT};

use crate::args::TaskArgs;
use crate::sys::{event, exit, shootdown};

/// Most CPUs the control page has slots for (`memvisor_abi::smp::MAX_CPUS`).
pub const SLOTS: usize = 64;
/// Tag marker in word 0 of each frame: `TAG | frame index`.
pub const TAG: u64 = 0x5d00_0000_0000_0000;
/// Words per page.
const PAGE_WORDS: usize = 512;
/// PTE bits this code touches (SDM Vol. 3A §4.5, Table 4-20).
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_ADDR: u64 = 0x000f_ffff_ffff_f000;

/// One round's change of page `p`'s PTE `e`: the new PTE, and (remap) the
/// tag readers must see from now on. Remap points the page at its other
/// frame (frame `p` or `pages + p` of the contiguous run at `frames`);
/// write-protect clears W.
#[inline(always)]
#[must_use]
pub fn change(e: u64, p: u64, pages: u64, frames: u64, wp: bool) -> (u64, u64) {
    if wp {
        return (e & !PTE_WRITABLE, 0);
    }
    let other = if e & PTE_ADDR == frames + p * 4096 { pages + p } else { p };
    ((e & !PTE_ADDR) | (frames + other * 4096), TAG | other)
}

/// The page the boot CPU and the readers share (mapped read-write for all).
#[repr(C)]
#[derive(Debug)]
pub struct Control {
    /// The last round published (0: none yet).
    pub round: u64,
    /// The page that round changed.
    pub page: u64,
    /// Remap: the tag that page must show from now on.
    pub expect: u64,
    /// Nonzero: the readers finish.
    pub stop: u64,
    /// Reader `cpu` sets `ready[cpu]` once its loop runs.
    pub ready: [u64; SLOTS],
    /// Reader `cpu` stores the last round it checked.
    pub seen: [u64; SLOTS],
}

const _: () = assert!(size_of::<Control>() <= 4096);

/// The control page, through a pointer whose validity was promised once
/// ([`ControlPage::new`]). Every field is one aligned `u64`, read and
/// written with single volatile accesses; a reader writes only its own
/// `ready` and `seen` slots, the writer everything else.
#[derive(Debug, Clone, Copy)]
pub struct ControlPage(*mut Control);

impl ControlPage {
    /// The control page at `p`.
    ///
    /// # Safety
    /// `p` must point at a mapped, writable [`Control`] for as long as the
    /// value is used.
    #[inline(always)]
    #[must_use]
    pub const unsafe fn new(p: *mut Control) -> Self {
        ControlPage(p)
    }

    /// Whether reader `cpu` runs.
    #[inline(always)]
    #[must_use]
    pub fn ready(self, cpu: usize) -> bool {
        // SAFETY: `new`'s promise; the index is masked into the array.
        unsafe { (&raw const (*self.0).ready[cpu & (SLOTS - 1)]).read_volatile() != 0 }
    }

    /// Marks reader `cpu` running.
    #[inline(always)]
    pub fn set_ready(self, cpu: usize) {
        // SAFETY: as in `ready`.
        unsafe { (&raw mut (*self.0).ready[cpu & (SLOTS - 1)]).write_volatile(1) };
    }

    /// The last round reader `cpu` checked.
    #[inline(always)]
    #[must_use]
    pub fn seen(self, cpu: usize) -> u64 {
        // SAFETY: as in `ready`.
        unsafe { (&raw const (*self.0).seen[cpu & (SLOTS - 1)]).read_volatile() }
    }

    /// Records that reader `cpu` checked `round`.
    #[inline(always)]
    pub fn set_seen(self, cpu: usize, round: u64) {
        // SAFETY: as in `ready`.
        unsafe { (&raw mut (*self.0).seen[cpu & (SLOTS - 1)]).write_volatile(round) };
    }

    /// The last round published, and whether the readers should stop.
    #[inline(always)]
    #[must_use]
    pub fn round_and_stop(self) -> (u64, bool) {
        // SAFETY: as in `ready`.
        unsafe { ((&raw const (*self.0).round).read_volatile(), (&raw const (*self.0).stop).read_volatile() != 0) }
    }

    /// The page and expected tag of the round last published (read after
    /// [`ControlPage::round_and_stop`]: x86 keeps loads in order, and
    /// [`ControlPage::publish`] stores them before the round).
    #[inline(always)]
    #[must_use]
    pub fn page_and_expect(self) -> (u64, u64) {
        // SAFETY: as in `ready`.
        unsafe { ((&raw const (*self.0).page).read_volatile(), (&raw const (*self.0).expect).read_volatile()) }
    }

    /// Publishes `round`: its page and expected tag first, the round last.
    #[inline(always)]
    pub fn publish(self, page: u64, expect: u64, round: u64) {
        // SAFETY: as in `ready`.
        unsafe {
            (&raw mut (*self.0).page).write_volatile(page);
            (&raw mut (*self.0).expect).write_volatile(expect);
            (&raw mut (*self.0).round).write_volatile(round);
        }
    }

    /// Tells the readers to finish.
    #[inline(always)]
    pub fn stop(self) {
        // SAFETY: as in `ready`.
        unsafe { (&raw mut (*self.0).stop).write_volatile(1) };
    }

    /// Spins until every reader of the mask `readers` has checked `round`
    /// (`round` 0: until every one runs).
    #[inline(always)]
    pub fn wait_readers(self, readers: u64, round: u64) {
        let mut m = readers;
        while m != 0 {
            let c = m.trailing_zeros() as usize;
            while !(if round == 0 { self.ready(c) } else { self.seen(c) >= round }) {
                core::hint::spin_loop();
            }
            m &= m - 1;
        }
    }
}

global_asm!(
    r#"
    .pushsection .user.text.shootdown, "ax"
    .global shootdown_try_write
    .global shootdown_try_write_insn
    .global shootdown_try_write_resume
shootdown_try_write:
    xor eax, eax
shootdown_try_write_insn:
    mov qword ptr [rdi], rsi
shootdown_try_write_resume:
    ret
    .popsection
    "#
);

unsafe extern "C" {
    fn shootdown_try_write(addr: *mut u64, value: u64) -> u64;
    /// The write instruction of [`try_write`] (for the kernel's fixup).
    #[link_name = "shootdown_try_write_insn"]
    pub static TRY_WRITE_INSN: u8;
    /// Where [`try_write`] resumes after a fixed-up fault.
    #[link_name = "shootdown_try_write_resume"]
    pub static TRY_WRITE_RESUME: u8;
}

/// Writes `value` at `addr`; `true` if the write faulted (the kernel
/// resumed after it).
///
/// # Safety
/// `addr` must be a page of the shared region.
#[inline(always)]
unsafe fn try_write(addr: *mut u64, value: u64) -> bool {
    // SAFETY: the caller's address; a fault there is fixed up by the kernel.
    unsafe { shootdown_try_write(addr, value) != 0 }
}

/// The reader: `params` = [pages, mode]; `cpu` arrives in `rsi`.
///
/// # Safety
/// Entered only by the kernel, with `args` valid, `ranges[0]` the shared
/// region and `ranges[1]` the control page.
#[inline(never)]
pub unsafe extern "C" fn reader(args: *const TaskArgs, cpu: u64) -> ! {
    // SAFETY: the kernel passes a valid, mapped argument block.
    let a = unsafe { &*args };
    let sys = a.syscall_insn != 0;
    // SAFETY: nranges is 2 for this workload.
    let (region, control) = unsafe { ((*a.ranges.as_ptr()).start as *mut u64, (*a.ranges.as_ptr().add(1)).start as *mut Control) };
    // SAFETY: ranges[1] is the task's control page, mapped RW.
    let control = unsafe { ControlPage::new(control) };
    let (pages, wp) = (a.params[0], a.params[1] == SHOOTDOWN_WRITE_PROTECT);
    let slot = (cpu as usize) & (SLOTS - 1);
    let page = |p: u64| region.wrapping_add(p as usize * PAGE_WORDS);
    // Each reader writes its own word of a page (word 1 + slot), never the tag.
    let mine = |p: u64| page(p).wrapping_add(1 + slot);
    control.set_ready(slot);
    let (mut last, mut checks, mut stale, mut sink) = (0u64, 0u64, 0u64, 0u64);
    loop {
        let mut p = 0;
        while p < pages {
            // SAFETY: p < pages: a page of the region.
            unsafe {
                if wp {
                    // A page protected this round faults here too: that is
                    // the protection working, not a check.
                    let _ = try_write(mine(p), sink);
                } else {
                    sink = sink.wrapping_add(page(p).read_volatile());
                }
            }
            p += 1;
        }
        let (round, stop) = control.round_and_stop();
        if round != last {
            let (p, expect) = control.page_and_expect();
            let p = p % pages.max(1);
            let old = if wp {
                // SAFETY: a page of the region.
                !unsafe { try_write(mine(p), round) }
            } else {
                // SAFETY: as above.
                unsafe { page(p).read_volatile() != expect }
            };
            checks += 1;
            stale += u64::from(old);
            control.set_seen(slot, round);
            last = round;
        }
        if stop {
            break;
        }
    }
    core::hint::black_box(sink);
    event(Event::ShootdownReader as u64, cpu, checks, sys);
    event(Event::ShootdownStale as u64, cpu, stale, sys);
    exit(stale, sys)
}

/// The writer as a ring-3 task (`writer=user`): the same rounds as the
/// kernel's writer, but its PTE stores run natively, through a user
/// mapping of the region's leaf table (`ranges[2]`), as a guest kernel's
/// do on a host that does not emulate ring 0. `params` = [pages, mode,
/// rounds, frames, readers mask, skip (0: shootdown, 1: flush only here,
/// 2: no flush)]; flushes through [`shootdown`](crate::sys::shootdown).
/// Reports one `Event::ShootdownSample` per round.
///
/// # Safety
/// Entered only by the kernel, with `args` valid and its three ranges the
/// task's: region, control page, leaf table.
#[inline(never)]
pub unsafe extern "C" fn writer(args: *const TaskArgs) -> ! {
    // SAFETY: the kernel passes a valid, mapped argument block.
    let a = unsafe { &*args };
    let sys = a.syscall_insn != 0;
    // SAFETY: nranges is 3 for the user writer.
    let (region, control, table) =
        unsafe { ((*a.ranges.as_ptr()).start, (*a.ranges.as_ptr().add(1)).start as *mut Control, (*a.ranges.as_ptr().add(2)).start as *mut u64) };
    // SAFETY: ranges[1] is the task's control page, mapped RW.
    let control = unsafe { ControlPage::new(control) };
    let (pages, wp, rounds, frames, readers, skip) = (a.params[0], a.params[1] == SHOOTDOWN_WRITE_PROTECT, a.params[2], a.params[3], a.params[4], a.params[5]);
    let pages = pages.clamp(1, PAGE_WORDS as u64);
    // Entry `p` of the leaf table the task sees at ranges[2] (p < pages ≤ 512).
    let pte = |p: u64| table.wrapping_add(p as usize);
    control.wait_readers(readers, 0);
    let mut r = 0;
    while r < rounds {
        let p = r % pages;
        // SAFETY (the PTE accesses): entries of the region's leaf table,
        // mapped RW into this task; single aligned volatile accesses.
        if wp && r > 0 {
            let prev = (r - 1) % pages;
            // SAFETY: see above.
            unsafe { pte(prev).write_volatile(pte(prev).read_volatile() | PTE_WRITABLE) };
        }
        // SAFETY: see above.
        let (new, expect) = change(unsafe { pte(p).read_volatile() }, p, pages, frames, wp);
        let t0 = crate::translation::rdtsc();
        // SAFETY: see above.
        unsafe { pte(p).write_volatile(new) };
        let targets = if skip < 2 { shootdown(region + p * 4096, skip == 1, sys) } else { 0 };
        let ticks = crate::translation::rdtsc().wrapping_sub(t0);
        control.publish(p, expect, r + 1);
        control.wait_readers(readers, r + 1);
        event(Event::ShootdownSample as u64, ticks, targets, sys);
        r += 1;
    }
    control.stop();
    exit(0, sys)
}
