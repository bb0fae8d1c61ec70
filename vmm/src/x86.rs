//! Architectural bits of the x86-64 control registers and EFER that the VMM
//! sets (entry states) or reads (the page walk), defined once.

/// CR0.PE: protected mode (SDM Vol. 3A §2.5).
pub const CR0_PE: u64 = 1 << 0;
/// CR0.ET: always 1 on processors since the i486 (SDM Vol. 3A §2.5).
pub const CR0_ET: u64 = 1 << 4;
/// CR0.PG: paging (SDM Vol. 3A §2.5).
pub const CR0_PG: u64 = 1 << 31;
/// CR4.PAE: physical address extension, required by 4-level paging
/// (SDM Vol. 3A §2.5).
pub const CR4_PAE: u64 = 1 << 5;
/// CR4.LA57: 5-level paging (SDM Vol. 3A §2.5).
pub const CR4_LA57: u64 = 1 << 12;
/// EFER.LME: long mode enable (SDM Vol. 3A §2.2.1).
pub const EFER_LME: u64 = 1 << 8;
/// EFER.LMA: long mode active (SDM Vol. 3A §2.2.1).
pub const EFER_LMA: u64 = 1 << 10;
/// RFLAGS bit 1 is reserved and always 1 (SDM Vol. 1 §3.4.3).
pub const RFLAGS_RESERVED: u64 = 1 << 1;
