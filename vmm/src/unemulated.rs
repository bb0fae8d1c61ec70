//! Finishing, in the VMM, guest instructions KVM's emulator gives up on.
//!
//! On KVM's PVM flavour guest CPL0 code runs through KVM's instruction
//! emulator, which cannot deliver a software interrupt outside real mode
//! (`int3` there is `KVM_EXIT_INTERNAL_ERROR`; see the host facts). Linux
//! executes `int3` at CPL0 on purpose: `int3_selftest()` in
//! `alternative_instructions()` on every boot, and `text_poke_bp()` relies
//! on its handler. The VMM does what the CPU would: it raises #BP (vector 3,
//! a trap: the return address is the byte after `int3`; SDM Vol. 3A §6.15,
//! "Interrupt 3—Breakpoint Exception") through KVM_SET_VCPU_EVENTS.
//! `clac`/`stac` (SMAP's access-flag toggles, which Linux patches into
//! every user-memory access when the CPU has SMAP) fail the same way; the
//! VMM clears or sets RFLAGS.AC and steps over them. That costs an exit
//! per user access: the `nosmap` command-line parameter avoids it.
//! `popcnt` fails too; Linux patches exactly two encodings of it into
//! `hweight32/64` (arch/x86/include/asm/arch_hweight.h: `popcnt %edi,%eax`
//! and `popcnt %rdi,%rax`) when the CPU has POPCNT, and the VMM computes
//! those two (`clearcpuid=151`, X86_FEATURE_POPCNT, spares the exits).
//! `fwait` fails too (Linux's FPU save paths end with it): with no
//! unmasked x87 exception pending (FSW.ES clear) it does nothing, so the
//! VMM steps over it, and raises #MF (vector 16, a fault) otherwise (SDM
//! Vol. 2A, "WAIT/FWAIT").
//! `verw` fails too: Linux's `mds_clear_cpu_buffers()` runs it before
//! every `sti; hlt` of the idle loop when the CPU reports MDS or MMIO
//! stale-data bugs (and at every return to user space under MDS), so an
//! SMP guest dies the first time its boot CPU idles, waiting for an AP.
//! The VMM does what is architectural: ZF says whether the selector in the
//! memory operand names a segment writable at the current privilege level
//! (SDM Vol. 2B, "VERR/VERW"), and the instruction is stepped over. The
//! microarchitectural buffer clearing it stands for cannot be had from the
//! VMM; on this host the guest's ring 0 does not run natively anyway, and
//! `mds=off mmio_stale_data=off` on the command line spares the exits.
//! Anything else stays an error.

use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestRam;

/// The `int3` opcode (SDM Vol. 2A, "INT n/INTO/INT3/INT1").
const INT3: u8 = 0xcc;
/// #BP's vector.
const BP_VECTOR: u8 = 3;
/// `fwait` (SDM Vol. 2A, "WAIT/FWAIT").
const FWAIT: u8 = 0x9b;
/// FSW.ES, the x87 exception summary bit (SDM Vol. 1 §8.1.3.1).
const FSW_ES: u16 = 1 << 7;
/// #MF's vector (SDM Vol. 3A §6.15, "Interrupt 16—x87 FPU Floating-Point Error").
const MF_VECTOR: u8 = 16;
/// `clac` and `stac` (SDM Vol. 2A, "CLAC", Vol. 2B, "STAC").
const CLAC: [u8; 3] = [0x0f, 0x01, 0xca];
const STAC: [u8; 3] = [0x0f, 0x01, 0xcb];
/// RFLAGS.AC, the alignment-check / access-control flag (SDM Vol. 1 §3.4.3).
const RFLAGS_AC: u64 = 1 << 18;
/// `popcnt %edi,%eax` and `popcnt %rdi,%rax` (SDM Vol. 2B, "POPCNT":
/// F3 0F B8 /r, with REX.W for 64 bits; ModRM 0xc7 is eax/rax <- edi/rdi).
const POPCNT32: [u8; 4] = [0xf3, 0x0f, 0xb8, 0xc7];
const POPCNT64: [u8; 5] = [0xf3, 0x48, 0x0f, 0xb8, 0xc7];
/// Arithmetic flags POPCNT writes (SDM Vol. 2B, "POPCNT", Flags Affected:
/// ZF from the source, OF SF AF CF PF cleared).
const RFLAGS_CF: u64 = 1 << 0;
const RFLAGS_PF: u64 = 1 << 2;
const RFLAGS_AF: u64 = 1 << 4;
const RFLAGS_ZF: u64 = 1 << 6;
const RFLAGS_SF: u64 = 1 << 7;
const RFLAGS_OF: u64 = 1 << 11;
/// `verw m16` with a RIP-relative operand, Linux's only form: `0F 00 /5`
/// with ModRM 0x2d (mod 00, reg 5, r/m 101: RIP + disp32; SDM Vol. 2B,
/// "VERR/VERW", and Vol. 2A §2.2.1.6), 7 bytes with the displacement.
const VERW_RIP: [u8; 3] = [0x0f, 0x00, 0x2d];
const VERW_RIP_LEN: usize = 7;
/// Longest instruction [`classify`] looks at.
const MAX_INSN: usize = VERW_RIP_LEN;

/// What the VMM does about an instruction KVM could not emulate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fixup {
    /// Raise exception `vector` with `rip` advanced by `advance` (a trap).
    Trap {
        /// The exception vector.
        vector: u8,
        /// Bytes to step over.
        advance: u64,
    },
    /// `rax` = population count of `rdi` (its low 32 bits when not
    /// `wide`, the result zero-extended), flags as POPCNT sets them.
    Popcnt {
        /// 64-bit operands.
        wide: bool,
        /// Bytes to step over.
        advance: u64,
    },
    /// `fwait`: step over it, or raise #MF when an x87 exception is pending.
    Fwait,
    /// Set RFLAGS.AC to `set` and step over `advance` bytes.
    SetAc {
        /// The new value of AC.
        set: bool,
        /// Bytes to step over.
        advance: u64,
    },
    /// `verw` of the selector at `rip + advance + disp`: ZF as
    /// [`verw_zf`] says, then step over `advance` bytes.
    Verw {
        /// The RIP-relative displacement.
        disp: i32,
        /// Bytes to step over.
        advance: u64,
    },
}

/// The fix-up for the instruction starting with `bytes`, if there is one.
#[must_use]
pub fn classify(bytes: &[u8]) -> Option<Fixup> {
    match bytes {
        [INT3, ..] => Some(Fixup::Trap { vector: BP_VECTOR, advance: 1 }),
        [FWAIT, ..] => Some(Fixup::Fwait),
        [a, b, c, ..] if [*a, *b, *c] == CLAC => Some(Fixup::SetAc { set: false, advance: 3 }),
        [a, b, c, ..] if [*a, *b, *c] == STAC => Some(Fixup::SetAc { set: true, advance: 3 }),
        _ if bytes.starts_with(&POPCNT64) => Some(Fixup::Popcnt { wide: true, advance: 5 }),
        _ if bytes.starts_with(&POPCNT32) => Some(Fixup::Popcnt { wide: false, advance: 4 }),
        [a, b, c, d0, d1, d2, d3, ..] if [*a, *b, *c] == VERW_RIP => {
            Some(Fixup::Verw { disp: i32::from_le_bytes([*d0, *d1, *d2, *d3]), advance: VERW_RIP_LEN as u64 })
        }
        _ => None,
    }
}

/// Reads `buf.len()` bytes at guest-virtual `gva`, translated by KVM with
/// the guest's tables; `None` when unmapped or when they cross a page.
fn read_virtual(vcpu: &VcpuFd, ram: &GuestRam, gva: u64, buf: &mut [u8]) -> Option<()> {
    let t = vcpu.translate_gva(gva).ok().filter(|t| t.valid != 0)?;
    if (t.physical_address & 0xfff) as usize + buf.len() > 0x1000 {
        return None;
    }
    ram.memory().read_slice(buf, GuestAddress(t.physical_address)).ok()
}

/// Whether `verw` of `selector` sets ZF, given the GDT descriptor it names
/// (`None`: outside the GDT) and the current privilege level (SDM Vol. 2B,
/// "VERR/VERW"): a non-null selector of a data segment (S = 1, type bit 3
/// clear) that is writable (type bit 1) with DPL ≥ CPL and DPL ≥ RPL.
/// Selectors into an LDT count as not writable (Linux's kernel uses none).
#[must_use]
pub fn verw_zf(selector: u16, descriptor: Option<u64>, cpl: u8) -> bool {
    const TI_LDT: u16 = 1 << 2;
    if selector & !3 == 0 || selector & TI_LDT != 0 {
        return false;
    }
    let Some(d) = descriptor else { return false };
    // The access byte is bits 47:40 (SDM Vol. 3A §3.4.5).
    let access = (d >> 40) as u8;
    let (system, code, writable, dpl) = (access & 0x10 == 0, access & 0x08 != 0, access & 0x02 != 0, (access >> 5) & 3);
    let rpl = (selector & 3) as u8;
    !system && !code && writable && dpl >= cpl && dpl >= rpl
}

/// Finishes the instruction at the vCPU's `rip` when [`classify`] knows
/// how; `false` when it does not (or the instruction cannot be read), and
/// the internal error stands.
pub fn finish(vcpu: &VcpuFd, ram: &GuestRam) -> bool {
    let Ok(mut regs) = vcpu.get_regs() else { return false };
    // The bytes up to the end of the page (an instruction that crosses
    // it is not one of ours unless its first page says so).
    let in_page = (0x1000 - (regs.rip & 0xfff)) as usize;
    let mut bytes = [0u8; MAX_INSN];
    let n = MAX_INSN.min(in_page);
    if read_virtual(vcpu, ram, regs.rip, &mut bytes[..n]).is_none() {
        return false;
    }
    match classify(&bytes[..n]) {
        Some(Fixup::Trap { vector, advance }) => {
            regs.rip += advance;
            vcpu.set_regs(&regs).is_ok() && raise(vcpu, vector)
        }
        Some(Fixup::Fwait) => {
            let Ok(fpu) = vcpu.get_fpu() else { return false };
            if fpu.fsw & FSW_ES != 0 {
                // A fault: `rip` stays on the `fwait`.
                return raise(vcpu, MF_VECTOR);
            }
            regs.rip += 1;
            vcpu.set_regs(&regs).is_ok()
        }
        Some(Fixup::Popcnt { wide, advance }) => {
            (regs.rax, regs.rflags) = popcnt(regs.rdi, regs.rflags, wide);
            regs.rip += advance;
            vcpu.set_regs(&regs).is_ok()
        }
        Some(Fixup::SetAc { set, advance }) => {
            regs.rip += advance;
            regs.rflags = if set { regs.rflags | RFLAGS_AC } else { regs.rflags & !RFLAGS_AC };
            vcpu.set_regs(&regs).is_ok()
        }
        Some(Fixup::Verw { disp, advance }) => {
            regs.rip += advance;
            let Ok(sregs) = vcpu.get_sregs() else { return false };
            let mut sel = [0u8; 2];
            if read_virtual(vcpu, ram, regs.rip.wrapping_add_signed(i64::from(disp)), &mut sel).is_none() {
                return false;
            }
            let selector = u16::from_le_bytes(sel);
            let index = u64::from(selector & !7);
            let mut desc = [0u8; 8];
            let descriptor = (index + 7 <= u64::from(sregs.gdt.limit))
                .then(|| read_virtual(vcpu, ram, sregs.gdt.base + index, &mut desc))
                .flatten()
                .map(|()| u64::from_le_bytes(desc));
            let zf = verw_zf(selector, descriptor, (sregs.cs.selector & 3) as u8);
            regs.rflags = if zf { regs.rflags | RFLAGS_ZF } else { regs.rflags & !RFLAGS_ZF };
            vcpu.set_regs(&regs).is_ok()
        }
        None => false,
    }
}

/// Injects exception `vector` (no error code) at the vCPU's next entry.
fn raise(vcpu: &VcpuFd, vector: u8) -> bool {
    let Ok(mut events) = vcpu.get_vcpu_events() else { return false };
    events.exception.injected = 1;
    events.exception.nr = vector;
    events.exception.has_error_code = 0;
    events.exception.error_code = 0;
    vcpu.set_vcpu_events(&events).is_ok()
}

/// POPCNT's result and flags for `source` (SDM Vol. 2B, "POPCNT").
#[must_use]
pub fn popcnt(source: u64, rflags: u64, wide: bool) -> (u64, u64) {
    let source = if wide { source } else { source & 0xffff_ffff };
    let cleared = rflags & !(RFLAGS_CF | RFLAGS_PF | RFLAGS_AF | RFLAGS_ZF | RFLAGS_SF | RFLAGS_OF);
    (u64::from(source.count_ones()), if source == 0 { cleared | RFLAGS_ZF } else { cleared })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int3_becomes_a_breakpoint_trap_after_it() {
        assert_eq!(classify(&[0xcc, 0x90]), Some(Fixup::Trap { vector: 3, advance: 1 }));
        assert_eq!(classify(&[0x9b, 0x65]), Some(Fixup::Fwait));
    }

    #[test]
    fn clac_and_stac_toggle_ac_and_step_over() {
        assert_eq!(classify(&[0x0f, 0x01, 0xca]), Some(Fixup::SetAc { set: false, advance: 3 }));
        assert_eq!(classify(&[0x0f, 0x01, 0xcb, 0x90]), Some(Fixup::SetAc { set: true, advance: 3 }));
        assert_eq!(classify(&[0x0f, 0x01]), None, "cut short by the page end");
    }

    #[test]
    fn linux_hweight_popcnts_are_computed() {
        assert_eq!(classify(&[0xf3, 0x48, 0x0f, 0xb8, 0xc7]), Some(Fixup::Popcnt { wide: true, advance: 5 }));
        assert_eq!(classify(&[0xf3, 0x0f, 0xb8, 0xc7, 0x90]), Some(Fixup::Popcnt { wide: false, advance: 4 }));
        // Another register pair is not Linux's and is left alone.
        assert_eq!(classify(&[0xf3, 0x0f, 0xb8, 0xc1]), None);
        let all_arith = RFLAGS_CF | RFLAGS_PF | RFLAGS_AF | RFLAGS_SF | RFLAGS_OF | 0x2;
        assert_eq!(popcnt(0xffff_0000_0000_00ff, all_arith, true), (24, 0x2));
        assert_eq!(popcnt(0xffff_0000_0000_0000, 0x2, false), (0, 0x2 | RFLAGS_ZF), "the high half is not counted");
    }

    #[test]
    fn linux_verw_is_stepped_over_with_zf_from_the_descriptor() {
        // `verw 0x5fbe19(%rip)` in Linux 6.1's idle path, then `sti`.
        assert_eq!(classify(&[0x0f, 0x00, 0x2d, 0x19, 0xbe, 0x5f, 0x00, 0xfb]), Some(Fixup::Verw { disp: 0x5f_be19, advance: 7 }));
        assert_eq!(classify(&[0x0f, 0x00, 0x2d, 0x19, 0xbe]), None, "cut short by the page end");
        assert_eq!(classify(&[0x0f, 0x00, 0xe8]), None, "verw %ax is not Linux's form");
        // __KERNEL_DS (0x18): a flat writable data segment, DPL 0.
        let kernel_ds = 0x00cf_9300_0000_ffff;
        assert!(verw_zf(0x18, Some(kernel_ds), 0));
        assert!(!verw_zf(0x18, Some(kernel_ds), 3), "DPL below CPL");
        assert!(!verw_zf(0x1b, Some(kernel_ds), 0), "DPL below RPL");
        assert!(!verw_zf(0x10, Some(0x00af_9b00_0000_ffff), 0), "a code segment");
        assert!(!verw_zf(0x18, Some(0x00cf_9100_0000_ffff), 0), "read-only data");
        assert!(!verw_zf(0, Some(kernel_ds), 0), "the null selector");
        assert!(!verw_zf(0x1c, Some(kernel_ds), 0), "an LDT selector");
        assert!(!verw_zf(0x18, None, 0), "beyond the GDT's limit");
    }

    #[test]
    fn other_instructions_stay_errors() {
        // xrstor64 (%rdi), lock cmpxchg16b, int 0x80, nothing at all.
        for bytes in [&[0x48, 0x0f, 0xae, 0x2f][..], &[0xf0, 0x48, 0x0f, 0xc7, 0x4d, 0x20], &[0xcd, 0x80], &[]] {
            assert_eq!(classify(bytes), None, "{bytes:x?}");
        }
    }
}
