//! The application processors (APs): starting them, and giving them ring-3
//! tasks to run.
//!
//! **Start.** The VMM places each AP straight in 64-bit mode when asked
//! (`memvisor_abi::smp`; no INIT/SIPI, whose real-mode trampoline this
//! project's host would emulate instruction by instruction). The boot CPU
//! (BSP) gives AP `i` twelve frames of the kernel arena for its stacks
//! (kernel, trap IST, double-fault IST, RSP0, `syscall`), writes an
//! `ApStart` naming [`ap_entry`], the kernel stack, the kernel's page tables
//! and the AP's [`ApBoot`] block, and writes its address to the AP-start
//! port. The AP comes up with the BSP's control and segment registers (and
//! its GS base: the first thing it does is point GS at its own block),
//! loads its own TSS ([`crate::gdt::init_ap`]), enables its local APIC,
//! reports [`Report::CpuOnline`] and marks itself online; the BSP spins
//! until all are (it has no timer to end a `hlt` if one never comes). The
//! IDT is shared.
//!
//! **Work.** Each AP then waits in its idle loop, `sti; hlt` with
//! interrupts masked again before it looks at its mailbox (an interrupt
//! between the look and the `hlt` stays pending and ends the `hlt`: the
//! instruction after `sti` runs first, SDM Vol. 2B STI). Ring 0 costs ~1 µs
//! per instruction on this project's host, so a spinning idle CPU would burn
//! a host CPU; a halted one costs nothing. The BSP posts a task to an AP's
//! mailbox and sends it a wake-up IPI ([`WAKE_VECTOR`]); the AP runs the
//! task with [`crate::task::run`] (its GS-based per-CPU state makes that
//! reentrant across CPUs), stores how it ended and wakes the BSP, which
//! waits the same way. [`run_everywhere`] runs one task per CPU in
//! parallel, the BSP's own included.
//!
//! Memory management stays with the BSP: it owns the `Kernel` (buddy
//! allocator and page-table mapper, `&mut`), builds every task's address
//! space before posting it, and is the only CPU that edits page tables
//! (the TLB shootdowns of [`crate::tlb`] tell the others). APs run ring-3
//! code and the short trap paths of their tasks (system calls, the end of
//! the task), which touch only per-CPU state, the console (locked) and
//! their own outbox.

use core::arch::global_asm;
use core::sync::atomic::{AtomicU32, Ordering};

use memvisor_abi::msg::Report;
use memvisor_abi::ports::AP_START;
use memvisor_abi::smp::{AP_START_OK, ApStart, MAX_CPUS};
use memvisor_guest_mm::sync::cpus_of;

use crate::frames::AP_STACK_FRAMES;
use crate::gdt::{CpuStacks, IST_TRAPS};
use crate::task::{AddressSpace, TaskExit};
use crate::{Kernel, apic, gdt, idt, io, percpu, report, task, tlb};

/// Vector of the wake-up IPI (its handler only acknowledges it).
pub const WAKE_VECTOR: u8 = 0x40;
/// The LAPIC's spurious-interrupt vector (the same do-nothing handler).
const SPURIOUS_VECTOR: u8 = 0x4f;
/// The 8259A PICs' data (mask) ports: masked, so only the LAPIC delivers.
const PIC1_DATA: u16 = 0x21;
const PIC2_DATA: u16 = 0xa1;
/// Bytes of each stack carved out of an AP's [`AP_STACK_FRAMES`] frames:
/// kernel 16 KiB, trap IST 16 KiB, double-fault IST 4 KiB, RSP0 4 KiB,
/// `syscall` 8 KiB.
const KERNEL_STACK: u64 = 16 << 10;
const TRAP_STACK: u64 = 16 << 10;
const DF_STACK: u64 = 4 << 10;
const RSP0_STACK: u64 = 4 << 10;
const SYSCALL_STACK: u64 = 8 << 10;
const _: () = assert!(KERNEL_STACK + TRAP_STACK + DF_STACK + RSP0_STACK + SYSCALL_STACK == AP_STACK_FRAMES * 4096);

/// What an AP needs at its first instruction: the block `rdi` points at.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ApBoot {
    stacks: CpuStacks,
    syscall_top: u64,
    syscall_insn: bool,
}

/// Mailbox states.
const IDLE: u32 = 0;
const POSTED: u32 = 1;
const RUNNING: u32 = 2;
const DONE: u32 = 3;

/// One CPU's mailbox: a task posted by the BSP, and how it ended.
struct Mailbox {
    state: AtomicU32,
    task: Task,
    exit: TaskExit,
}

/// A ring-3 task to run: [`task::run`]'s arguments.
#[derive(Debug, Clone, Copy)]
pub struct Task {
    /// Its address space.
    pub space: AddressSpace,
    /// Entry point.
    pub entry: u64,
    /// Initial stack pointer.
    pub rsp: u64,
    /// `rdi`.
    pub arg0: u64,
    /// `rsi`.
    pub arg1: u64,
}

const NO_TASK: Task = Task { space: AddressSpace { root: memvisor_guest_mm::paging::PhysAddr::new_truncate(0) }, entry: 0, rsp: 0, arg0: 0, arg1: 0 };

static mut MAILBOX: [Mailbox; MAX_CPUS as usize] = [const { Mailbox { state: AtomicU32::new(IDLE), task: NO_TASK, exit: TaskExit::Exited(0) } }; MAX_CPUS as usize];
static mut AP_BOOT: [ApBoot; MAX_CPUS as usize] = [ApBoot { stacks: CpuStacks { rsp0: 0, traps: 0, double_fault: 0 }, syscall_top: 0, syscall_insn: false }; MAX_CPUS as usize];
/// The start requests (in .bss: their addresses are guest-physical, below
/// 4 GiB, as the 32-bit port write needs).
static mut AP_START_BLOCKS: [ApStart; MAX_CPUS as usize] = [ApStart { cpu: 0, status: 0, rip: 0, rsp: 0, arg: 0, cr3: 0 }; MAX_CPUS as usize];

fn mailbox(cpu: usize) -> *mut Mailbox {
    (&raw mut MAILBOX).cast::<Mailbox>().wrapping_add(cpu.min(MAX_CPUS as usize - 1))
}

global_asm!(
    r#"
    .global smp_wake_entry
smp_wake_entry:
    push rax
    inc qword ptr gs:[{ipis}]
    mov eax, {eoi}
    mov dword ptr [rax], 0
    pop rax
    iretq

    // rdi = &ApBoot, rsi = cpu (the VMM's contract), rsp = the kernel stack.
    .global ap_entry
ap_entry:
    xor ebp, ebp
    call ap_main
2:  cli
    hlt
    jmp 2b
    "#,
    ipis = const percpu::offsets::IPIS_RECEIVED,
    eoi = const apic::EOI_ADDR,
);

unsafe extern "C" {
    fn smp_wake_entry();
    fn ap_entry();
}

/// Why the APs could not all be started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmpError {
    /// No pool frames for the stacks, or for mapping the LAPIC.
    NoMemory,
    /// The VMM refused the start of this CPU (its status).
    Refused(u32, u32),
}

/// How long the BSP waits for the APs to come up: 2 s of TSC (bring-up takes
/// a few milliseconds here).
const BRING_UP_MS: u64 = 2000;

/// Starts CPUs 1 .. `cpus` and returns once all are online, or after
/// [`BRING_UP_MS`] (`tsc_khz` 0: without a bound) with those that came up
/// (the others get no work, and the console says which). With one CPU it
/// does nothing: every SMP cost (LAPIC, IPI gates, interrupts in ring 3)
/// is paid only by a VM that has other CPUs.
///
/// # Errors
/// [`SmpError`].
pub fn start_aps(k: &mut Kernel, cpus: u32, tsc_khz: u64) -> Result<(), SmpError> {
    if cpus <= 1 {
        return Ok(());
    }
    crate::paging::map_mmio(&mut k.mapper, k.root, memvisor_abi::layout::LAPIC_BASE).map_err(|_| SmpError::NoMemory)?;
    let wake = smp_wake_entry as *const () as usize as u64;
    // SAFETY: interrupts are off and nothing raises these vectors yet; both
    // handlers end in iretq. IST_TRAPS: an IPI arrives in ring 3 or in an
    // idle loop's `hlt`, never while a trap handler is on that stack (IF is
    // clear there).
    unsafe {
        idt::set_gate(WAKE_VECTOR, wake, IST_TRAPS);
        idt::set_gate(SPURIOUS_VECTOR, wake, IST_TRAPS);
        idt::set_gate(tlb::VECTOR, tlb::handler(), IST_TRAPS);
    }
    io::outb(PIC1_DATA, 0xff);
    io::outb(PIC2_DATA, 0xff);
    apic::enable(SPURIOUS_VECTOR);
    task::set_user_interrupts(true);
    let syscall_insn = k.syscall_insn;
    for cpu in 1..cpus.min(MAX_CPUS) as usize {
        let base = k.mapper.frames.alloc_contiguous(AP_STACK_FRAMES).ok_or(SmpError::NoMemory)?;
        let kernel = base + KERNEL_STACK;
        let traps = kernel + TRAP_STACK;
        let double_fault = traps + DF_STACK;
        let rsp0 = double_fault + RSP0_STACK;
        let syscall_top = rsp0 + SYSCALL_STACK;
        let boot = ApBoot { stacks: CpuStacks { rsp0, traps, double_fault }, syscall_top, syscall_insn };
        // SAFETY: the BSP writes AP `cpu`'s blocks before starting it; the
        // AP reads them only after the port write below.
        let block = unsafe {
            let b = (&raw mut AP_BOOT).cast::<ApBoot>().wrapping_add(cpu);
            b.write(boot);
            let s = (&raw mut AP_START_BLOCKS).cast::<ApStart>().wrapping_add(cpu);
            s.write_volatile(ApStart { cpu: cpu as u32, status: u32::MAX, rip: ap_entry as *const () as usize as u64, rsp: kernel, arg: b as u64, cr3: k.root.as_u64() });
            s
        };
        io::outl(AP_START, block as usize as u32);
        // SAFETY: the VMM wrote the status during the `out`.
        let status = unsafe { (&raw const (*block).status).read_volatile() };
        if status != AP_START_OK {
            return Err(SmpError::Refused(cpu as u32, status));
        }
    }
    let all = if cpus >= 64 { u64::MAX } else { (1u64 << cpus) - 1 };
    // Spinning, not halting: with no timer, a `hlt` would wait for good
    // for an AP that never comes up. A few milliseconds of ring-0 spin.
    let (t0, limit) = (io::rdtsc(), tsc_khz.saturating_mul(BRING_UP_MS));
    while percpu::online() & all != all && (limit == 0 || io::rdtsc().wrapping_sub(t0) < limit) {
        core::hint::spin_loop();
    }
    for cpu in cpus_of(all & !percpu::online()) {
        crate::println!("guest: CPU {} did not come up; it gets no work", crate::console::Dec(cpu as u64));
    }
    Ok(())
}

/// Halts with interrupts enabled until `done` holds: each IPI (or other
/// interrupt) wakes the CPU to look again.
fn wait_until(mut done: impl FnMut() -> bool) {
    while !done() {
        // SAFETY: the interrupts this kernel enables only acknowledge or
        // flush (their handlers return at once); IF is cleared again before
        // `done` is looked at, and `sti` delays interrupts by one
        // instruction, so one raised after the look wakes the `hlt`.
        unsafe { core::arch::asm!("sti", "hlt", "cli", options(nomem, nostack)) };
    }
}

/// The first Rust code of an AP, on its kernel stack (see the module docs).
#[unsafe(no_mangle)]
extern "C" fn ap_main(boot: *const ApBoot, cpu: u64) -> ! {
    let cpu = cpu as usize;
    // SAFETY: the BSP wrote the block before starting this CPU.
    let boot = unsafe { *boot };
    // SAFETY: this CPU, once, first: GS still holds the BSP's base (the VMM
    // copied the BSP's segment registers) until this line.
    unsafe {
        percpu::init(cpu, boot.syscall_top);
        gdt::init_ap(cpu, boot.stacks);
        if boot.syscall_insn {
            idt::enable_syscall();
        }
    }
    apic::enable(SPURIOUS_VECTOR);
    report::send(&Report::CpuOnline { cpu: cpu as u32, tsc: io::rdtsc() });
    percpu::set_online();
    idle_loop(cpu)
}

/// An AP's life after bring-up: run what is posted, halt otherwise.
fn idle_loop(cpu: usize) -> ! {
    let mb = mailbox(cpu);
    loop {
        // SAFETY: this CPU's mailbox; the BSP wrote `task` before storing
        // POSTED (Release), read here with Acquire.
        let state = unsafe { &(*mb).state };
        if state.load(Ordering::Acquire) == POSTED {
            state.store(RUNNING, Ordering::Relaxed);
            // SAFETY: as above; the BSP does not touch the task until DONE.
            let t = unsafe { (*mb).task };
            let exit = task::run(&t.space, t.entry, t.rsp, t.arg0, t.arg1);
            // SAFETY: as above; the BSP reads `exit` after DONE (Acquire).
            unsafe { (*mb).exit = exit };
            state.store(DONE, Ordering::Release);
            apic::send_ipi(0, WAKE_VECTOR);
            percpu::bump(&percpu::this().ipis_sent, 1);
            continue;
        }
        // SAFETY: as in `wait_until`.
        unsafe { core::arch::asm!("sti", "hlt", "cli", options(nomem, nostack)) };
    }
}

/// Posts `t` to AP `cpu` and wakes it.
pub fn post(cpu: usize, t: Task) {
    let mb = mailbox(cpu);
    // SAFETY: the AP is idle (its state is not POSTED or RUNNING: every
    // post is followed by a `wait` before the next), so only the BSP
    // touches the mailbox until the Release store.
    unsafe {
        (*mb).task = t;
        (*mb).state.store(POSTED, Ordering::Release);
    }
    apic::send_ipi(cpu, WAKE_VECTOR);
    percpu::bump(&percpu::this().ipis_sent, 1);
}

/// Waits until AP `cpu` has finished the task [`post`]ed to it; how it
/// ended.
pub fn wait(cpu: usize) -> TaskExit {
    let mb = mailbox(cpu);
    // SAFETY: the state is atomic; `exit` is read after DONE (Acquire).
    wait_until(|| unsafe { (*mb).state.load(Ordering::Acquire) } == DONE);
    // SAFETY: as above; IDLE hands the mailbox back for the next post.
    unsafe {
        (*mb).state.store(IDLE, Ordering::Relaxed);
        (*mb).exit
    }
}

/// Runs `task_of(cpu)` on every online CPU, in parallel (the BSP's own
/// on this CPU), and hands each CPU's end to `on_exit(cpu, exit)` (the
/// BSP's first). Closures rather than arrays: a table of 64 tasks would
/// cost hundreds of emulated stores to build at ring 0.
pub fn run_everywhere(task_of: impl Fn(usize) -> Task, mut on_exit: impl FnMut(usize, TaskExit)) {
    let others = percpu::online() & !1;
    for cpu in cpus_of(others) {
        post(cpu, task_of(cpu));
    }
    let t = task_of(0);
    on_exit(0, task::run(&t.space, t.entry, t.rsp, t.arg0, t.arg1));
    for cpu in cpus_of(others) {
        on_exit(cpu, wait(cpu));
    }
}

/// CPUs online.
pub fn count() -> usize {
    percpu::online().count_ones() as usize
}

/// Sends each online CPU's figures ([`Report::CpuStats`]).
pub fn report_stats() {
    for cpu in cpus_of(percpu::online()) {
        report::send(&Report::CpuStats { cpu: cpu as u32, stats: percpu::of(cpu).stats() });
    }
}
