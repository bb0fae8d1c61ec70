//! Ring-3 tasks: their address spaces, entering them, and ending them.
//!
//! A task's address space is its own PML4. Slots 0 and 256 point at the
//! kernel's tables (kernel pages are supervisor-only there, except the
//! `.user` code); slot 1 ([`layout::USER_BASE`], 512 GiB) is private: stack,
//! argument page and whatever RAM window the task gets, all U=1 at every
//! level.
//!
//! [`run`] enters a task with `iretq` and returns when the task ends: by the
//! exit system call, or by any exception in ring 3, which becomes a
//! [`TaskExit::Faulted`] record the kernel can inspect (the trap dispatcher,
//! [`crate::dispatch`], decides which and calls [`end_task`]). The return is a
//! context switch back to the kernel stack saved on entry (the trap's IST
//! frame is simply abandoned). System calls arrive as `int3` through a DPL-3
//! gate with the number in `rax` (works on every host), or as `syscall` when
//! the VMM set `FLAG_SYSCALL_INSN`. Both come back to ring 3 through the
//! same `iretq` (the `syscall` stub builds an interrupt-shaped frame):
//! `sysretq` would save a few cycles but needs its own return path and the
//! canonical-RIP check that makes it a classic hazard, and the only system
//! call that exists today, exit, never returns.

use core::arch::global_asm;
use core::sync::atomic::{AtomicU64, Ordering};

use memvisor_abi::layout::{self, PAGE_SIZE};
use memvisor_guest_mm::paging::{FrameMemory, MapError, PageSize, PageTableEntry as Pte, PhysAddr, VirtAddr};

use memvisor_abi::smp::MAX_CPUS;

use crate::gdt::{USER_CS, USER_DS};
use crate::{cpu, percpu};
use crate::paging::{KERNEL_SLOTS, KernelMapper};

/// How a task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskExit {
    /// The task called exit with this status.
    Exited(u64),
    /// The task raised an exception.
    Faulted(Fault),
}

/// An exception raised in ring 3.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// The vector (e.g. 14 for #PF).
    pub vector: u64,
    /// The error code (0 for vectors without one).
    pub error: u64,
    /// CR2 for a page fault, else 0.
    pub cr2: u64,
    /// The faulting instruction.
    pub rip: u64,
}

/// A task's address space.
#[derive(Debug, Clone, Copy)]
pub struct AddressSpace {
    /// Its PML4.
    pub root: PhysAddr,
}

impl AddressSpace {
    /// A new address space sharing the kernel's slots of `kernel_root`.
    ///
    /// # Errors
    /// [`MapError::OutOfFrames`].
    pub fn new(m: &mut KernelMapper, kernel_root: PhysAddr) -> Result<Self, MapError> {
        let root = m.new_root()?;
        for slot in KERNEL_SLOTS {
            let entry = m.mem.table(kernel_root)[slot];
            m.mem.table(root)[slot] = entry;
        }
        Ok(Self { root })
    }

    /// Maps `[va, va + len)` to `[phys, ..)` for ring 3 with `flags` (U is
    /// added), with leaves up to `max`.
    ///
    /// # Errors
    /// [`MapError`].
    pub fn map(&self, m: &mut KernelMapper, va: u64, phys: u64, len: u64, max: PageSize, flags: u64) -> Result<(), MapError> {
        let v = VirtAddr::new(va).ok_or(MapError::Misaligned)?;
        let p = PhysAddr::new(phys).ok_or(MapError::Misaligned)?;
        m.map_range(self.root, v, p, len, max, flags | Pte::USER)
    }
}

/// A fresh task: its address space, a 16 KiB stack from the buddy
/// allocator and a read-only argument page from the table pool (zero, and
/// identity-mapped RW for the kernel). [`TaskFrame::release`] gives the
/// stack and every table frame back.
pub struct TaskFrame {
    /// The address space.
    pub space: AddressSpace,
    /// The argument page, as the kernel writes it.
    pub args: &'static mut memvisor_user::args::TaskArgs,
    stack: u64,
    pool_mark: u64,
}

impl TaskFrame {
    /// Builds the address space, stack and argument page.
    ///
    /// # Errors
    /// [`MapError`] when frames run out.
    pub fn new(k: &mut crate::Kernel) -> Result<Self, MapError> {
        use memvisor_guest_mm::paging::FrameSource;
        let pool_mark = k.mapper.frames.mark();
        let space = AddressSpace::new(&mut k.mapper, k.root)?;
        // Stack: fresh frames from the buddy, zero.
        let stack = k.frames_alloc(2).ok_or(MapError::OutOfFrames)?;
        space.map(&mut k.mapper, user_layout::STACK_BOTTOM, stack, user_layout::STACK_PAGES * PAGE_SIZE, PageSize::Size4K, Pte::WRITABLE | Pte::NO_EXECUTE)?;
        let args_pa = k.mapper.frames.alloc_table().ok_or(MapError::OutOfFrames)?;
        space.map(&mut k.mapper, user_layout::ARGS, args_pa.as_u64(), PAGE_SIZE, PageSize::Size4K, Pte::NO_EXECUTE)?;
        // SAFETY: the frame is in the arena (identity-mapped RW at ring 0),
        // page sized and aligned, zero, and used for nothing else until
        // `release` hands it back to the pool.
        let args = unsafe { &mut *(args_pa.as_u64() as *mut memvisor_user::args::TaskArgs) };
        args.syscall_insn = u64::from(k.syscall_insn);
        Ok(TaskFrame { space, args, stack, pool_mark })
    }

    /// Maps a stack for CPU `cpu` (≥ 1) in this space, for a task of that
    /// CPU that shares the space (the shootdown readers, the dirty
    /// workload's writers): 16 KiB of fresh frames from the buddy allocator
    /// at [`user_layout::cpu_stack`]. Returns their guest-physical address
    /// (an order-2 block, for the caller to give back).
    ///
    /// # Errors
    /// [`MapError`] when frames run out.
    pub fn map_cpu_stack(&self, k: &mut crate::Kernel, cpu: usize) -> Result<u64, MapError> {
        let stack = k.frames_alloc(2).ok_or(MapError::OutOfFrames)?;
        if let Err(e) = self.space.map(&mut k.mapper, user_layout::cpu_stack(cpu), stack, user_layout::STACK_PAGES * PAGE_SIZE, PageSize::Size4K, Pte::WRITABLE | Pte::NO_EXECUTE) {
            let _ = k.buddy().free(stack, 2);
            return Err(e);
        }
        Ok(stack)
    }

    /// The stack's guest-physical address and length.
    pub fn stack(&self) -> (u64, u64) {
        (self.stack, user_layout::STACK_PAGES * PAGE_SIZE)
    }

    /// Gives back the stack and the table frames, once no CPU can still
    /// use a translation of the space ([`crate::tlb::shootdown_space`]:
    /// with one CPU, or when none runs in it, that costs nothing).
    pub fn release(self, k: &mut crate::Kernel) {
        crate::tlb::shootdown_space_remote(self.space.root.as_u64());
        let _ = k.buddy().free(self.stack, 2);
        k.mapper.frames.release_to(self.pool_mark);
    }
}

/// The kernel's PML4, restored when a task ends (the same on every CPU;
/// written once at boot, before any task or other CPU runs).
static KERNEL_ROOT: AtomicU64 = AtomicU64::new(0);
/// RFLAGS a task starts with: IF clear with one CPU (nothing interrupts
/// ring 3), IF set once other CPUs are up, so a CPU running a task takes
/// TLB shootdown interrupts ([`crate::tlb`]). Read by `task_enter`.
#[unsafe(no_mangle)]
static TASK_USER_RFLAGS: AtomicU64 = AtomicU64::new(RFLAGS_RESERVED);
/// How the task running on each CPU ended, written before switching back.
static mut LAST_EXIT: [TaskExit; MAX_CPUS as usize] = [TaskExit::Exited(0); MAX_CPUS as usize];

/// RFLAGS bit 1 reads as one (SDM Vol. 1 §3.4.3); bit 9 is IF.
const RFLAGS_RESERVED: u64 = 0x2;
const RFLAGS_IF: u64 = 0x200;

// task_enter(rip, rsp, cr3, arg0, arg1): saves the callee-saved registers
// and the stack pointer (in this CPU's block, crate::percpu), switches to
// the task's tables and irets to ring 3 with TASK_USER_RFLAGS. It "returns"
// when task_resume_kernel restores that stack.
global_asm!(
    r#"
    .global task_enter
task_enter:
    push rbx
    push rbp
    push r12
    push r13
    push r14
    push r15
    mov gs:[{kernel_rsp}], rsp
    mov cr3, rdx
    push {user_ss}
    push rsi
    push [rip + TASK_USER_RFLAGS]
    push {user_cs}
    push rdi
    mov rdi, rcx
    mov rsi, r8
    xor eax, eax
    xor ebx, ebx
    xor ecx, ecx
    xor edx, edx
    xor ebp, ebp
    xor r8d, r8d
    xor r9d, r9d
    xor r10d, r10d
    xor r11d, r11d
    xor r12d, r12d
    xor r13d, r13d
    xor r14d, r14d
    xor r15d, r15d
    iretq

    .global task_resume_kernel
task_resume_kernel:
    mov rsp, gs:[{kernel_rsp}]
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbp
    pop rbx
    ret
    "#,
    user_ss = const USER_DS as u64,
    user_cs = const USER_CS as u64,
    kernel_rsp = const percpu::offsets::TASK_KERNEL_RSP,
);

unsafe extern "C" {
    fn task_enter(rip: u64, rsp: u64, cr3: u64, arg0: u64, arg1: u64);
    fn task_resume_kernel() -> !;
}

/// Remembers the kernel's root for the switch back from tasks.
pub fn set_kernel_root(root: PhysAddr) {
    KERNEL_ROOT.store(root.as_u64(), Ordering::Release);
}

/// Lets tasks take interrupts (set once other CPUs are up).
pub fn set_user_interrupts(on: bool) {
    TASK_USER_RFLAGS.store(if on { RFLAGS_RESERVED | RFLAGS_IF } else { RFLAGS_RESERVED }, Ordering::Release);
}

/// Records that this CPU now runs in `root` (0: the kernel's), before it
/// loads that CR3. `xchg`: a full barrier, which [`crate::tlb::shootdown`]
/// relies on (a CPU entering a space either is seen by a concurrent
/// shootdown or walks the tables after its PTE store).
pub fn set_current_root(root: u64) {
    percpu::this().current_root.swap(root, Ordering::AcqRel);
}

/// Switches this CPU into `space` at ring 0 (a kernel thread working on a
/// task's memory, as the shootdown workload's writer does), recording it
/// for TLB shootdowns; [`leave_space`] switches back.
pub fn enter_space(space: &AddressSpace) {
    set_current_root(space.root.as_u64());
    // SAFETY: every task space maps the kernel's slots.
    unsafe { cpu::write_cr3(space.root.as_u64()) };
}

/// Back to the kernel's own tables after [`enter_space`].
pub fn leave_space() {
    // SAFETY: the kernel root maps everything the kernel runs.
    unsafe { cpu::write_cr3(KERNEL_ROOT.load(Ordering::Acquire)) };
    set_current_root(0);
}

/// Runs a task in `space` from `entry` with `rsp`, passing `arg0`/`arg1`
/// in rdi/rsi, until it exits or faults.
pub fn run(space: &AddressSpace, entry: u64, rsp: u64, arg0: u64, arg1: u64) -> TaskExit {
    let here = percpu::this();
    let t0 = crate::io::rdtsc();
    set_current_root(space.root.as_u64());
    // SAFETY: the address space maps the kernel's slots (so the code after
    // the CR3 switch keeps running) and the task's entry and stack; the
    // task comes back only through task_resume_kernel, which restores the
    // registers task_enter saved.
    let exit = unsafe {
        task_enter(entry, rsp, space.root.as_u64(), arg0, arg1);
        (&raw const LAST_EXIT).cast::<TaskExit>().add(percpu::index()).read()
    };
    percpu::bump(&here.tasks, 1);
    percpu::bump(&here.task_tsc, crate::io::rdtsc().wrapping_sub(t0));
    exit
}

/// Ends the running task: back to the kernel stack [`run`] saved, which
/// returns `exit`.
pub fn end_task(exit: TaskExit) -> ! {
    // SAFETY: this CPU's own slot; the kernel root maps everything the
    // kernel runs; task_resume_kernel returns into `run`.
    unsafe {
        (&raw mut LAST_EXIT).cast::<TaskExit>().add(percpu::index()).write(exit);
        cpu::write_cr3(KERNEL_ROOT.load(Ordering::Acquire));
        set_current_root(0);
        task_resume_kernel()
    }
}

/// Where ring-3 stacks and argument pages go in every task.
pub mod user_layout {
    use super::{PAGE_SIZE, layout};
    /// The task's argument page (read-only for the task).
    pub const ARGS: u64 = layout::USER_BASE + 0x20_0000;
    /// A page nothing maps, for the unmapped-access check.
    pub const UNMAPPED: u64 = layout::USER_BASE + 0x30_0000;
    /// Lowest address of the stack.
    pub const STACK_BOTTOM: u64 = layout::USER_STACK_TOP - layout::USER_STACK_SIZE;
    /// Pages of stack.
    pub const STACK_PAGES: u64 = layout::USER_STACK_SIZE / PAGE_SIZE;
    /// Where CPU `cpu`'s (≥ 1) stack goes in a space several CPUs share:
    /// from `USER_BASE + 4 MiB`, 32 KiB apart (an unmapped gap below each).
    pub const fn cpu_stack(cpu: usize) -> u64 {
        layout::USER_BASE + (4 << 20) + (cpu as u64 - 1) * 2 * layout::USER_STACK_SIZE
    }
}
