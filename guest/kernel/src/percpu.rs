//! Per-CPU data, reached through the GS base.
//!
//! Every CPU has one [`PerCpu`] block in a static array; its GS base
//! (IA32_GS_BASE) points at it, so `gs:[offset]` is the CPU's own copy of a
//! field in one instruction, from Rust ([`this`]) and from the entry stubs
//! (`task_enter`, the `syscall` entry, the IPI handlers), which name fields
//! by their [`core::mem::offset_of!`].
//!
//! No `swapgs`: the ring-3 code this kernel runs is its own (`.user`) and
//! never loads GS or its base, so the kernel's GS base stays put across
//! ring transitions. A kernel that ran foreign ring-3 code would keep the
//! user's GS base in IA32_KERNEL_GS_BASE and `swapgs` on every entry and
//! exit, as Linux does.
//!
//! The set of CPUs that are up ([`online`]) lives here too: the boot CPU is
//! in it from [`init`], each application processor from the end of its
//! bring-up ([`crate::smp`]).

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use memvisor_abi::msg::{CpuStats, Message};
use memvisor_abi::paging::SwapRequest;
use memvisor_abi::smp::MAX_CPUS;
use memvisor_guest_mm::sync::CpuSet;

use crate::cpu;

/// IA32_GS_BASE (SDM Vol. 4, Table 2-2).
const IA32_GS_BASE: u32 = 0xc000_0101;

/// One CPU's own data. The first fields are read by assembly at fixed
/// offsets ([`core::mem::offset_of!`]); the counters are written only by
/// their own CPU (plain loads and stores, no `lock`) and read by the boot
/// CPU once the CPU is idle.
#[repr(C, align(64))]
pub struct PerCpu {
    /// This block's own address: `gs:[0]`, so [`this`] is one load.
    pub self_ptr: u64,
    /// The CPU's index (vCPU id = APIC id).
    pub cpu: u64,
    /// The kernel stack pointer `task_enter` saved (`crate::task`).
    pub task_kernel_rsp: u64,
    /// The user stack pointer while the `syscall` stub switches stacks.
    pub syscall_user_rsp: u64,
    /// Top of the stack the `syscall` stub switches to.
    pub syscall_stack_top: u64,
    /// The task address space (PML4) this CPU runs in, 0 in the kernel's
    /// own: which CPUs a TLB shootdown must reach ([`crate::tlb`]).
    pub current_root: AtomicU64,
    /// Inter-processor interrupts taken (bumped by the IPI stubs).
    pub ipis_received: AtomicU64,
    /// Shootdown requests carried out and acknowledged.
    pub shootdowns_acked: AtomicU64,
    /// Shootdowns started.
    pub shootdowns_sent: AtomicU64,
    /// Inter-processor interrupts sent.
    pub ipis_sent: AtomicU64,
    /// Ring-3 tasks run.
    pub tasks: AtomicU64,
    /// TSC ticks spent in them.
    pub task_tsc: AtomicU64,
    /// Bytes the self-test's RAM task verified here.
    pub selftest_bytes: AtomicU64,
    /// The message this CPU is sending ([`crate::report`]): one per CPU,
    /// so CPUs report without a lock.
    pub outbox: UnsafeCell<Message>,
    /// The swap-device request this CPU is making (`crate::vm::swapdev`),
    /// likewise.
    pub swap: UnsafeCell<SwapRequest>,
}

// SAFETY: the blocks are shared between CPUs only through atomics, through
// fields written once before the CPU starts, or through the outbox and the
// swap request, which only their own CPU touches.
unsafe impl Sync for PerCpu {}

impl PerCpu {
    const fn new() -> Self {
        PerCpu {
            self_ptr: 0,
            cpu: 0,
            task_kernel_rsp: 0,
            syscall_user_rsp: 0,
            syscall_stack_top: 0,
            current_root: AtomicU64::new(0),
            ipis_received: AtomicU64::new(0),
            shootdowns_acked: AtomicU64::new(0),
            shootdowns_sent: AtomicU64::new(0),
            ipis_sent: AtomicU64::new(0),
            tasks: AtomicU64::new(0),
            task_tsc: AtomicU64::new(0),
            selftest_bytes: AtomicU64::new(0),
            outbox: UnsafeCell::new(Message { kind: 0, arg: 0, data: [0; 7] }),
            swap: UnsafeCell::new(SwapRequest { op: 0, status: 0, gpa: 0, slot: 0 }),
        }
    }

    /// The CPU's counters as reported.
    pub fn stats(&self) -> CpuStats {
        let r = |c: &AtomicU64| c.load(Ordering::Acquire);
        CpuStats {
            tasks: r(&self.tasks),
            task_tsc: r(&self.task_tsc),
            selftest_bytes: r(&self.selftest_bytes),
            ipis_received: r(&self.ipis_received),
            shootdowns_acked: r(&self.shootdowns_acked),
            shootdowns_sent: r(&self.shootdowns_sent),
            ipis_sent: r(&self.ipis_sent),
        }
    }
}

/// Adds `n` to one of this CPU's own counters (no `lock`: only its CPU
/// writes it).
#[inline(always)]
pub fn bump(counter: &AtomicU64, n: u64) {
    counter.store(counter.load(Ordering::Relaxed).wrapping_add(n), Ordering::Release);
}

/// Offsets the assembly uses.
pub mod offsets {
    use super::PerCpu;
    /// [`PerCpu::cpu`].
    pub const CPU: usize = core::mem::offset_of!(PerCpu, cpu);
    /// [`PerCpu::task_kernel_rsp`].
    pub const TASK_KERNEL_RSP: usize = core::mem::offset_of!(PerCpu, task_kernel_rsp);
    /// [`PerCpu::syscall_user_rsp`].
    pub const SYSCALL_USER_RSP: usize = core::mem::offset_of!(PerCpu, syscall_user_rsp);
    /// [`PerCpu::syscall_stack_top`].
    pub const SYSCALL_STACK_TOP: usize = core::mem::offset_of!(PerCpu, syscall_stack_top);
    /// [`PerCpu::ipis_received`].
    pub const IPIS_RECEIVED: usize = core::mem::offset_of!(PerCpu, ipis_received);
    /// [`PerCpu::shootdowns_acked`].
    pub const SHOOTDOWNS_ACKED: usize = core::mem::offset_of!(PerCpu, shootdowns_acked);
}

struct Blocks(UnsafeCell<[PerCpu; MAX_CPUS as usize]>);
// SAFETY: see `PerCpu`'s Sync; the array itself is never moved.
unsafe impl Sync for Blocks {}

/// Every CPU's block, in .bss.
static BLOCKS: Blocks = Blocks(UnsafeCell::new([const { PerCpu::new() }; MAX_CPUS as usize]));

/// CPUs that are up.
static ONLINE: CpuSet = CpuSet::new();
/// Whether more than one is: one byte to test on paths that must cost a
/// uniprocessor nothing (every emulated instruction costs ~1 µs here).
static SMP: AtomicBool = AtomicBool::new(false);

/// Sets up CPU `cpu`'s block and points its GS base at it; `syscall_stack_top`
/// is the stack its `syscall` entry uses. Marks the CPU online.
///
/// # Safety
/// Once per CPU, on that CPU, at ring 0, before anything reads `gs:`;
/// `cpu < MAX_CPUS`.
pub unsafe fn init(cpu: usize, syscall_stack_top: u64) {
    let block = block_ptr(cpu);
    // SAFETY: the caller's CPU is the only one touching this block now
    // (the others have not started, or use their own).
    unsafe {
        (*block).self_ptr = block as u64;
        (*block).cpu = cpu as u64;
        (*block).syscall_stack_top = syscall_stack_top;
        cpu::wrmsr(IA32_GS_BASE, block as u64);
    }
}

/// Marks the calling CPU online (the end of its bring-up).
pub fn set_online() {
    ONLINE.insert(index());
    if ONLINE.len() > 1 {
        SMP.store(true, Ordering::Release);
    }
}

fn block_ptr(cpu: usize) -> *mut PerCpu {
    let base = BLOCKS.0.get().cast::<PerCpu>();
    base.wrapping_add(cpu.min(MAX_CPUS as usize - 1))
}

/// CPU `cpu`'s block (any CPU may read another's atomics).
pub fn of(cpu: usize) -> &'static PerCpu {
    // SAFETY: a static block; shared access follows PerCpu's rules.
    unsafe { &*block_ptr(cpu) }
}

/// The calling CPU's block.
#[inline(always)]
pub fn this() -> &'static PerCpu {
    let p: u64;
    // SAFETY: GS points at this CPU's block from `init` on (the kernel
    // calls it before anything else).
    unsafe { core::arch::asm!("mov {}, gs:[0]", out(reg) p, options(nostack, readonly, preserves_flags)) };
    // SAFETY: `self_ptr` is the block's own static address.
    unsafe { &*(p as *const PerCpu) }
}

/// The calling CPU's index.
#[inline(always)]
pub fn index() -> usize {
    let c: u64;
    // SAFETY: as in `this`.
    unsafe { core::arch::asm!("mov {}, gs:[{off}]", out(reg) c, off = const offsets::CPU, options(nostack, readonly, preserves_flags)) };
    c as usize
}

/// CPUs that are up, as a mask.
#[inline(always)]
pub fn online() -> u64 {
    ONLINE.bits()
}

/// Whether more than one CPU is up: everything SMP costs is behind this.
#[inline(always)]
pub fn is_smp() -> bool {
    SMP.load(Ordering::Acquire)
}
