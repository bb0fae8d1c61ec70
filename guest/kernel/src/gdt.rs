//! The kernel's GDT and 64-bit TSS.
//!
//! Owns the segment layout (ring-0 and ring-3 code and data, in the order
//! `syscall`/`sysret` need: SDM Vol. 2B, SYSCALL/SYSRET, STAR layout), the TSS
//! with RSP0 and the IST stacks every exception handler runs on, and the
//! stacks themselves. The IST matters here beyond the usual #DF reason: the
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
/// The TSS selector.
const TSS_SEL: u16 = 0x28;

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
/// The stack `syscall` entries switch to (read by the entry stub in idt.rs).
#[unsafe(no_mangle)]
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

static mut TSS: Tss = Tss { reserved0: 0, rsp: [0; 3], reserved1: 0, ist: [0; 7], reserved2: 0, reserved3: 0, iomap_base: 0 };

/// Descriptors (SDM Vol. 3A §3.4.5): G=1, L=1 for code, P=1, DPL in bits 45-46.
#[repr(C, align(16))]
struct Gdt([u64; 7]);

static mut GDT: Gdt = Gdt([
    0,
    0x00af_9a00_0000_ffff, // 0x08 ring-0 code, 64-bit
    0x00cf_9200_0000_ffff, // 0x10 ring-0 data
    0x00cf_f200_0000_ffff, // 0x18 ring-3 data
    0x00af_fa00_0000_ffff, // 0x20 ring-3 code, 64-bit
    0,                     // 0x28 TSS, low half (filled at run time)
    0,                     // 0x30 TSS, high half
]);

#[repr(C, packed)]
struct Pointer {
    limit: u16,
    base: u64,
}

fn top(stack: *mut Stack) -> u64 {
    stack as u64 + STACK_SIZE as u64
}

/// Loads the GDT and TSS and reloads every segment register.
///
/// # Safety
/// Call once, at ring 0, on the boot path, before any handler can run.
pub unsafe fn init() {
    let tss = &raw mut TSS;
    let gdt = &raw mut GDT;
    // SAFETY: single-threaded boot, nothing else uses these statics yet.
    unsafe {
        (*tss).rsp[0] = top(&raw mut RSP0_STACK);
        (*tss).ist[usize::from(IST_TRAPS) - 1] = top(&raw mut TRAP_STACK);
        (*tss).ist[usize::from(IST_DOUBLE_FAULT) - 1] = top(&raw mut DOUBLE_FAULT_STACK);
        // No I/O permission bitmap: its offset is past the TSS limit.
        (*tss).iomap_base = size_of::<Tss>() as u16;
        let base = tss as u64;
        let limit = size_of::<Tss>() as u64 - 1;
        // 64-bit available TSS, type 9, present (SDM Vol. 3A §8.2.3, Figure 8-4).
        (*gdt).0[5] = (limit & 0xffff) | ((base & 0xff_ffff) << 16) | (0x89 << 40) | (((limit >> 16) & 0xf) << 48) | (((base >> 24) & 0xff) << 56);
        (*gdt).0[6] = base >> 32;
    }
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
            tss = in(reg) u64::from(TSS_SEL),
        );
    }
}
