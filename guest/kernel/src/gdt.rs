//! The kernel's GDT and the 64-bit TSS of every CPU.
//!
//! Owns the segment layout (ring-0 and ring-3 code and data, in the order
//! `syscall`/`sysret` need: SDM Vol. 2B, SYSCALL/SYSRET, STAR layout), one
//! TSS per CPU with its RSP0 and the IST stacks every exception handler
//! runs on, and the boot CPU's stacks (an application processor's come from
//! the kernel arena, [`crate::smp`]). One GDT serves every CPU: the code
//! and data descriptors are shared and read-only, and CPU `i` has its own
//! TSS descriptor at selector `0x28 + 16 i` (a TSS descriptor is busy while
//! loaded, so CPUs cannot share one). Linux keeps a whole GDT per CPU
//! because its GDT also holds per-CPU TLS entries; this kernel has none. The IST matters here beyond the usual #DF reason: the
//! precompiled `core` uses the red zone, so no handler may run on the stack
//! of the code it interrupted.

use core::arch::asm;

/// Ring-0 64-bit code selector.
pub const KERNEL_CS: u16 = 0x08;
/// Ring-0 data selector.
pub const KERNEL_DS: u16 = 0x10;
/// Ring-3 data selector with RPL 3 (STAR[63:48] + 8 for `sysret`).
pub const USER_DS: u16 = 0x18 | 3;
/// Ring-3 64-bit code selector with RPL 3 (STAR[63:48] + 16 for `sysret`).
pub const USER_CS: u16 = 0x20 | 3;
/// The first TSS descriptor's selector: CPU `i`'s is `0x28 + 16 i` (a
/// 64-bit TSS descriptor takes two GDT slots).
const TSS_SEL_BASE: u16 = 0x28;

/// IST slot (1-based, as in the IDT gate) for faults, traps and system calls.
pub const IST_TRAPS: u8 = 1;
/// IST slot for the double fault: a separate stack, so a fault while
/// handling a fault still gets a good stack.
pub const IST_DOUBLE_FAULT: u8 = 2;

const STACK_SIZE: usize = 16 * 1024;

#[repr(C, align(16))]
struct Stack([u8; STACK_SIZE]);

/// Stacks in .bss: zero by the VMM's contract, no initialisation needed.
static mut TRAP_STACK: Stack = Stack([0; STACK_SIZE]);
static mut DOUBLE_FAULT_STACK: Stack = Stack([0; STACK_SIZE]);
static mut RSP0_STACK: Stack = Stack([0; STACK_SIZE]);
/// The boot CPU's stack for `syscall` entries (the entry stub in idt.rs
/// finds each CPU's through `crate::percpu`).
static mut SYSCALL_STACK: Stack = Stack([0; STACK_SIZE]);

/// The 64-bit TSS (SDM Vol. 3A §8.7, Figure 8-11).
#[repr(C, packed(4))]
struct Tss {
    reserved0: u32,
    rsp: [u64; 3],
    reserved1: u64,
    ist: [u64; 7],
    reserved2: u64,
    reserved3: u16,
    iomap_base: u16,
}

const CPUS: usize = memvisor_abi::smp::MAX_CPUS as usize;

static mut TSS: [Tss; CPUS] = [const { Tss { reserved0: 0, rsp: [0; 3], reserved1: 0, ist: [0; 7], reserved2: 0, reserved3: 0, iomap_base: 0 } }; CPUS];

/// Entries: five segment descriptors, then two slots per CPU's TSS.
const GDT_ENTRIES: usize = 5 + 2 * CPUS;

/// Descriptors (SDM Vol. 3A §3.4.5): G=1, L=1 for code, P=1, DPL in bits 45-46.
#[repr(C, align(16))]
struct Gdt([u64; GDT_ENTRIES]);

static mut GDT: Gdt = Gdt(gdt_entries());

const fn gdt_entries() -> [u64; GDT_ENTRIES] {
    let mut e = [0; GDT_ENTRIES];
    e[1] = 0x00af_9a00_0000_ffff; // 0x08 ring-0 code, 64-bit
    e[2] = 0x00cf_9200_0000_ffff; // 0x10 ring-0 data
    e[3] = 0x00cf_f200_0000_ffff; // 0x18 ring-3 data
    e[4] = 0x00af_fa00_0000_ffff; // 0x20 ring-3 code, 64-bit
    // 0x28 + 16 i: CPU i's TSS, filled when the CPU starts.
    e
}

/// The stacks one CPU's TSS points at (tops, 16-byte aligned).
#[derive(Debug, Clone, Copy)]
pub struct CpuStacks {
    /// RSP0: the stack of an interrupt from ring 3 through a gate without
    /// IST (every gate here has one, so it is a backstop).
    pub rsp0: u64,
    /// IST slot [`IST_TRAPS`].
    pub traps: u64,
    /// IST slot [`IST_DOUBLE_FAULT`].
    pub double_fault: u64,
}

/// The boot CPU's `syscall` stack top.
pub fn boot_syscall_stack_top() -> u64 {
    top(&raw mut SYSCALL_STACK)
}

/// Fills CPU `cpu`'s TSS and its GDT descriptor.
///
/// # Safety
/// On CPU `cpu` (or before it starts), once; `cpu < MAX_CPUS`.
unsafe fn set_tss(cpu: usize, stacks: CpuStacks) -> u16 {
    let tss = (&raw mut TSS).cast::<Tss>().wrapping_add(cpu);
    let gdt = &raw mut GDT;
    // SAFETY: only CPU `cpu` writes its TSS and its two GDT slots.
    unsafe {
        (*tss).rsp[0] = stacks.rsp0;
        (*tss).ist[usize::from(IST_TRAPS) - 1] = stacks.traps;
        (*tss).ist[usize::from(IST_DOUBLE_FAULT) - 1] = stacks.double_fault;
        // No I/O permission bitmap: its offset is past the TSS limit.
        (*tss).iomap_base = size_of::<Tss>() as u16;
        let base = tss as u64;
        let limit = size_of::<Tss>() as u64 - 1;
        // 64-bit available TSS, type 9, present (SDM Vol. 3A §8.2.3, Figure 8-4).
        (*gdt).0[5 + 2 * cpu] = (limit & 0xffff) | ((base & 0xff_ffff) << 16) | (0x89 << 40) | (((limit >> 16) & 0xf) << 48) | (((base >> 24) & 0xff) << 56);
        (*gdt).0[6 + 2 * cpu] = base >> 32;
    }
    TSS_SEL_BASE + 16 * cpu as u16
}

/// An application processor's GDT and TSS: loads the shared GDT and its
/// own TSS (the VMM started it with the boot CPU's segment registers,
/// `memvisor_abi::smp`, so CS, SS and DS are already the kernel's).
///
/// # Safety
/// Once, on CPU `cpu` (≥ 1), at ring 0, before it takes any exception.
pub unsafe fn init_ap(cpu: usize, stacks: CpuStacks) {
    // SAFETY: the caller's guarantees; the GDT is loaded unchanged.
    let sel = unsafe { set_tss(cpu, stacks) };
    let ptr = Pointer { limit: (size_of::<Gdt>() - 1) as u16, base: &raw const GDT as u64 };
    // SAFETY: the GDT is static and valid; its descriptor for this CPU's
    // TSS was just written and is not busy.
    unsafe { asm!("lgdt [{ptr}]", "ltr {sel:x}", ptr = in(reg) &raw const ptr, sel = in(reg) u64::from(sel), options(nostack, preserves_flags)) };
}

#[repr(C, packed)]
struct Pointer {
    limit: u16,
    base: u64,
}

fn top(stack: *mut Stack) -> u64 {
    stack as u64 + STACK_SIZE as u64
}

/// Loads the GDT and the boot CPU's TSS and reloads every segment register.
///
/// # Safety
/// Call once, at ring 0, on the boot path, before any handler can run.
pub unsafe fn init() {
    let gdt = &raw mut GDT;
    let stacks = CpuStacks { rsp0: top(&raw mut RSP0_STACK), traps: top(&raw mut TRAP_STACK), double_fault: top(&raw mut DOUBLE_FAULT_STACK) };
    // SAFETY: the boot CPU, once, before the others start.
    let tss_sel = unsafe { set_tss(0, stacks) };
    let ptr = Pointer { limit: (size_of::<Gdt>() - 1) as u16, base: gdt as u64 };
    // SAFETY: the GDT is static and valid; the far return reloads CS with
    // the same-privilege 64-bit code segment; ltr marks the TSS busy once.
    unsafe {
        asm!(
            "lgdt [{ptr}]",
            "push {cs}",
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",
            "retfq",
            "2:",
            "mov ss, {ds:x}",
            "mov ds, {ds:x}",
            "mov es, {ds:x}",
            "ltr {tss:x}",
            ptr = in(reg) &raw const ptr,
            cs = const KERNEL_CS as u64,
            tmp = out(reg) _,
            ds = in(reg) u64::from(KERNEL_DS),
            tss = in(reg) u64::from(tss_sel),
        );
    }
}
