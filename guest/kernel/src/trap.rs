//! What a trap is: the vector numbers the kernel uses and the frame the
//! entry stubs save.
//!
//! A leaf: it imports nothing from the kernel, so the IDT that produces
//! these frames ([`crate::idt`]), the dispatcher that reads them
//! ([`crate::dispatch`]) and the workloads that resolve them ([`crate::vm`])
//! can all name them without naming each other.

/// #DE, divide error (SDM Vol. 3A §6.15, Table 6-1).
pub const DIVIDE_ERROR: u64 = 0;
/// #BP, the `int3` breakpoint: the system-call gate.
pub const BREAKPOINT: u64 = 3;
/// #UD, invalid opcode.
pub const INVALID_OPCODE: u64 = 6;
/// #DF, double fault.
pub const DOUBLE_FAULT: u64 = 8;
/// #GP, general protection.
pub const GENERAL_PROTECTION: u64 = 13;
/// #PF, page fault.
pub const PAGE_FAULT: u64 = 14;
/// Not a vector: the mark the `syscall` entry stub puts in the frame.
pub const SYSCALL_MARK: u64 = 0x100;

/// The registers a trap saved, lowest address first (the stub's pushes in
/// reverse, then what the CPU pushed: SDM Vol. 3A §6.14.2, Figure 6-9).
/// The layout is the entry stubs' (`idt.rs`): change both together.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct TrapFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    /// The vector (or [`SYSCALL_MARK`]).
    pub vector: u64,
    /// The CPU's error code, or 0 for vectors without one.
    pub error: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

impl TrapFrame {
    /// Whether the trap came from ring 3.
    #[inline(always)]
    pub fn is_from_user(&self) -> bool {
        self.cs & 3 == 3
    }

    /// Whether this is a system call: `int3` through the DPL-3 gate or the
    /// `syscall` instruction.
    #[inline(always)]
    pub fn is_syscall(&self) -> bool {
        self.vector == BREAKPOINT || self.vector == SYSCALL_MARK
    }
}
