//! The IDT, the exception entry stubs and the `syscall` entry.
//!
//! Owns the gates of the vectors the kernel uses — #DE, int3 (the
//! system-call gate, DPL 3), #UD, #DF, #GP, #PF — and the `syscall` entry
//! (and the MSRs that point at it), all funnelled into one
//! [`TrapFrame`](crate::trap::TrapFrame) and one `call trap_dispatch`.
//! Every gate uses an IST stack (see [`crate::gdt`]). Only the vectors used are written, so building the IDT
//! costs a few dozen instructions on the boot path; an unused vector has
//! P=0, so reaching it is a #GP and then a #DF, which the kernel reports.
//!
//! What a trap *means* is not decided here: the stubs call the symbol
//! `trap_dispatch`, which [`crate::dispatch`] defines. The linker ties the
//! two, so this module imports nothing above it (the vectors and the frame
//! come from the leaf [`crate::trap`]); the call is the same direct `call`
//! a Rust path would give.

use core::arch::{asm, global_asm};

use crate::cpu;
use crate::gdt::{IST_DOUBLE_FAULT, IST_TRAPS, KERNEL_CS};
use crate::trap::{BREAKPOINT, DIVIDE_ERROR, DOUBLE_FAULT, GENERAL_PROTECTION, INVALID_OPCODE, PAGE_FAULT, SYSCALL_MARK};

// The stubs. Vectors without an error code push a 0 in its place so that
// every frame has the same shape. 15 pushes + vector + error + the CPU's 5
// words = 22 words, so RSP is 16-byte aligned at the call (the IST tops are).
global_asm!(
    r#"
    .macro TRAP_STUB name, vector, has_error
    .global \name
\name:
    .if \has_error == 0
    push 0
    .endif
    push \vector
    jmp trap_common
    .endm

    TRAP_STUB trap_de, 0, 0
    TRAP_STUB trap_bp, 3, 0
    TRAP_STUB trap_ud, 6, 0
    TRAP_STUB trap_df, 8, 1
    TRAP_STUB trap_gp, 13, 1
    TRAP_STUB trap_pf, 14, 1

trap_common:
    push rax
    push rbx
    push rcx
    push rdx
    push rsi
    push rdi
    push rbp
    push r8
    push r9
    push r10
    push r11
    push r12
    push r13
    push r14
    push r15
    mov rdi, rsp
    cld
    // `trap_dispatch(frame: &mut TrapFrame)`, defined in dispatch.rs
    // (#[no_mangle]); the frame's layout is `TrapFrame`'s in trap.rs.
    call trap_dispatch
    pop r15
    pop r14
    pop r13
    pop r12
    pop r11
    pop r10
    pop r9
    pop r8
    pop rbp
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rbx
    pop rax
    add rsp, 16
    iretq

    // `syscall` (SDM Vol. 2B): RIP in rcx, RFLAGS in r11, still on the user
    // stack. Build the frame an interrupt would have pushed, on this CPU's
    // kernel stack for it (GS is the kernel's: crate::percpu), and share
    // the path above; iretq returns to ring 3.
    .global syscall_entry
syscall_entry:
    mov gs:[{user_rsp}], rsp
    mov rsp, gs:[{stack_top}]
    push {user_ss}
    push gs:[{user_rsp}]
    push r11
    push {user_cs}
    push rcx
    push 0
    push {mark}
    jmp trap_common
    "#,
    user_rsp = const crate::percpu::offsets::SYSCALL_USER_RSP,
    stack_top = const crate::percpu::offsets::SYSCALL_STACK_TOP,
    user_ss = const crate::gdt::USER_DS as u64,
    user_cs = const crate::gdt::USER_CS as u64,
    mark = const SYSCALL_MARK,
);

unsafe extern "C" {
    fn trap_de();
    fn trap_bp();
    fn trap_ud();
    fn trap_df();
    fn trap_gp();
    fn trap_pf();
    /// The `syscall` entry point, for IA32_LSTAR.
    fn syscall_entry();
}

/// One 16-byte gate descriptor (SDM Vol. 3A §6.14.1, Figure 6-8).
#[repr(C, align(16))]
#[derive(Clone, Copy)]
struct Gate(u64, u64);

#[repr(C, align(16))]
struct Idt([Gate; 256]);

/// In .bss: zero, i.e. every gate not present, until [`init`] fills some.
static mut IDT: Idt = Idt([Gate(0, 0); 256]);

#[repr(C, packed)]
struct Pointer {
    limit: u16,
    base: u64,
}

/// An interrupt gate (type 0xE, so IF is cleared on entry), present, with
/// the given DPL and IST slot.
fn gate(handler: u64, dpl: u64, ist: u8) -> Gate {
    let low = (handler & 0xffff)
        | (u64::from(KERNEL_CS) << 16)
        | (u64::from(ist) << 32)
        | ((0x8e | (dpl << 5)) << 40)
        | (((handler >> 16) & 0xffff) << 48);
    Gate(low, handler >> 32)
}

/// Fills the gates the kernel uses and loads the IDT.
///
/// # Safety
/// Call once at ring 0 after [`crate::gdt::init`] (the gates name its
/// selector and IST slots).
pub unsafe fn init() {
    let idt = &raw mut IDT;
    let gates: [(u64, unsafe extern "C" fn(), u64, u8); 6] = [
        (DIVIDE_ERROR, trap_de, 0, IST_TRAPS),
        // DPL 3: ring 3 may `int3` here. It is the system-call path.
        (BREAKPOINT, trap_bp, 3, IST_TRAPS),
        (INVALID_OPCODE, trap_ud, 0, IST_TRAPS),
        (DOUBLE_FAULT, trap_df, 0, IST_DOUBLE_FAULT),
        (GENERAL_PROTECTION, trap_gp, 0, IST_TRAPS),
        (PAGE_FAULT, trap_pf, 0, IST_TRAPS),
    ];
    for (vector, handler, dpl, ist) in gates {
        // SAFETY: single-threaded boot; vector < 256.
        unsafe { (*idt).0[vector as usize] = gate(handler as usize as u64, dpl, ist) };
    }
    let ptr = Pointer { limit: (size_of::<Idt>() - 1) as u16, base: idt as u64 };
    // SAFETY: the IDT is static and its gates point at the stubs above.
    unsafe { asm!("lidt [{}]", in(reg) &raw const ptr, options(readonly, nostack, preserves_flags)) };
}

/// Writes the gate of `vector` in the loaded IDT: an interrupt gate (IF
/// cleared on entry) to `handler` at DPL 0 on IST slot `ist`. Used for the
/// interrupt vectors the kernel enables later (inter-processor interrupts,
/// the balloon's).
///
/// # Safety
/// At ring 0 with interrupts off, before `vector` can be raised; `handler`
/// must be an interrupt entry stub that ends in `iretq`.
pub unsafe fn set_gate(vector: u8, handler: u64, ist: u8) {
    let idt = &raw mut IDT;
    // SAFETY: vector < 256; the caller guarantees nothing takes this
    // vector while the gate is written.
    unsafe { (*idt).0[usize::from(vector)] = gate(handler, 0, ist) };
}

/// Makes the CPU triple-fault: an empty IDT, then an invalid opcode. #UD
/// finds no gate (#GP), which finds none (#DF), which finds none: shutdown.
/// The command-line test hook `memvisor.test=triple-fault` uses it so the
/// VMM's triple-fault path can be tested.
pub fn triple_fault() -> ! {
    let ptr = Pointer { limit: 0, base: 0 };
    // SAFETY: deliberately fatal; nothing runs afterwards.
    unsafe { asm!("lidt [{}]", "ud2", in(reg) &raw const ptr, options(noreturn, nostack)) }
}

/// Sets up `syscall` on this CPU: EFER.SCE, STAR, LSTAR (the entry stub
/// above) and FMASK (SDM Vol. 2B, SYSCALL; Vol. 4 for the MSR numbers).
///
/// # Safety
/// Call once per CPU at ring 0 after the GDT and its per-CPU block
/// (`crate::percpu::init`) are set up.
pub unsafe fn enable_syscall() {
    const EFER: u32 = 0xc000_0080;
    const STAR: u32 = 0xc000_0081;
    const LSTAR: u32 = 0xc000_0082;
    const FMASK: u32 = 0xc000_0084;
    // SAFETY: these MSRs exist on every x86-64 CPU; EFER keeps its bits and
    // gains SCE. STAR[47:32] = kernel CS (SS = +8), STAR[63:48] = 0x10 so
    // that sysret would load CS = 0x20|3 and SS = 0x18|3 (our GDT order).
    // FMASK clears TF, IF and DF on entry.
    unsafe {
        cpu::wrmsr(EFER, cpu::rdmsr(EFER) | 1);
        cpu::wrmsr(STAR, (0x10u64 << 48) | (u64::from(KERNEL_CS) << 32));
        cpu::wrmsr(LSTAR, syscall_entry as *const () as usize as u64);
        cpu::wrmsr(FMASK, 0x700);
    }
}
