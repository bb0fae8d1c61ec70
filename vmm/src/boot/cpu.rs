//! What a VMM fixes in a vCPU before Linux runs: CPUID leaves, boot MSRs
//! and the local APIC's LINT pins. Pure functions over the values KVM
//! hands out; [`crate::vcpu`] reads and writes them.
//!
//! The choices follow what Firecracker and Cloud Hypervisor do (their
//! `cpuid` and `regs.rs`/`interrupts.rs`), with sources cited per value.

use kvm_bindings::{kvm_cpuid_entry2, kvm_msr_entry};

/// Leaf 1: EBX[31:24] is the initial APIC id, EBX[23:16] the number of
/// addressable logical processors, EBX[15:8] the CLFLUSH line size in
/// 8-byte units (SDM Vol. 2A, CPUID, Table 3-8).
const LEAF1_APIC_ID_SHIFT: u32 = 24;
const LEAF1_LOGICAL_COUNT_SHIFT: u32 = 16;
/// Leaf 1 ECX bit 31: "hypervisor present", reserved for software
/// (Linux `X86_FEATURE_HYPERVISOR`; KVM api.rst, KVM_GET_SUPPORTED_CPUID).
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX bit 28: HTT, the count in EBX[23:16] is valid.
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// Leaves 0xb and 0x1f: extended topology (SDM Vol. 2A, CPUID, leaf 0BH).
/// ECX[15:8] is the level type, 1 = SMT, 2 = core, 0 = invalid.
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;
/// KVM's signature leaf and its features leaf (Linux
/// Documentation/virt/kvm/x86/cpuid.rst): EBX, ECX, EDX of 0x40000000
/// spell "KVMKVMKVM\0\0\0", EAX is the highest KVM leaf.
pub const KVM_CPUID_SIGNATURE: u32 = 0x4000_0000;
/// The KVM features leaf (kvm-clock is bit 3, KVM_FEATURE_CLOCKSOURCE2).
pub const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];

/// Applies the fixes for vCPU `cpu` of `count` to KVM's supported CPUID:
/// the APIC id and processor count in leaf 1, the hypervisor bit, the
/// x2APIC ids and a one-thread-per-core topology in leaves 0xb and 0x1f,
/// and KVM's signature leaf (its features leaf is kept as KVM reports it:
/// the supported bits are KVM's to say). Entries KVM did not list are not
/// invented, except the signature leaf, without which Linux looks for no
/// KVM features at all.
pub fn fix_cpuid(entries: &mut Vec<kvm_cpuid_entry2>, cpu: u32, count: u32) {
    let count = count.max(1);
    // Bits of the x2APIC id that number the cores: ceil(log2(count)).
    let core_bits = u32::BITS - (count - 1).leading_zeros();
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (cpu << LEAF1_APIC_ID_SHIFT) | ((count & 0xff) << LEAF1_LOGICAL_COUNT_SHIFT);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            0xb | 0x1f => {
                // EAX: bits to shift the x2APIC id right to get the next
                // level's id; EBX: logical processors at this level; ECX:
                // the level number and type; EDX: the x2APIC id.
                (e.eax, e.ebx, e.ecx) = match e.index {
                    0 => (0, 1, (LEVEL_TYPE_SMT << 8)),
                    1 => (core_bits, count, (LEVEL_TYPE_CORE << 8) | 1),
                    n => (0, 0, n & 0xff),
                };
                e.edx = cpu;
            }
            KVM_CPUID_SIGNATURE => {
                [e.ebx, e.ecx, e.edx] = KVM_SIGNATURE;
                e.eax = e.eax.max(KVM_CPUID_FEATURES);
            }
            _ => {}
        }
    }
    if !entries.iter().any(|e| e.function == KVM_CPUID_SIGNATURE) {
        let [ebx, ecx, edx] = KVM_SIGNATURE;
        entries.push(kvm_cpuid_entry2 { function: KVM_CPUID_SIGNATURE, eax: KVM_CPUID_FEATURES, ebx, ecx, edx, ..Default::default() });
    }
}

/// Leaf 1 ECX bit 13: CMPXCHG16B (SDM Vol. 2A, CPUID, Table 3-10).
const LEAF1_ECX_CX16: u32 = 1 << 13;

/// Hides the CPU features whose instructions KVM's PVM flavour cannot
/// emulate at CPL0 (it answers them with KVM_EXIT_INTERNAL_ERROR; measured
/// in docs' host facts): `lock cmpxchg16b`, which Linux's SLUB allocator
/// uses on every allocation once CPUID says CX16 (first seen right after
/// "Memory: ... available" at `rip` in `___slab_alloc`). Only for PVM hosts:
/// elsewhere the guest keeps every feature KVM supports.
pub fn hide_unemulated_features(entries: &mut [kvm_cpuid_entry2]) {
    for e in entries.iter_mut().filter(|e| e.function == 1) {
        e.ecx &= !LEAF1_ECX_CX16;
    }
}

/// MSR indices (SDM Vol. 4, Table 2-2).
mod msr {
    pub const IA32_TSC: u32 = 0x10;
    pub const IA32_SYSENTER_CS: u32 = 0x174;
    pub const IA32_SYSENTER_ESP: u32 = 0x175;
    pub const IA32_SYSENTER_EIP: u32 = 0x176;
    pub const IA32_MISC_ENABLE: u32 = 0x1a0;
    pub const IA32_MTRR_DEF_TYPE: u32 = 0x2ff;
    pub const IA32_STAR: u32 = 0xc000_0081;
    pub const IA32_LSTAR: u32 = 0xc000_0082;
    pub const IA32_CSTAR: u32 = 0xc000_0083;
    pub const IA32_FMASK: u32 = 0xc000_0084;
    pub const IA32_KERNEL_GS_BASE: u32 = 0xc000_0102;
}
/// IA32_MISC_ENABLE bit 0: fast-strings enable (SDM Vol. 4, Table 2-2).
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// IA32_MTRR_DEF_TYPE: bit 11 enables the MTRRs, type 6 is write-back,
/// the default for memory no variable MTRR covers (SDM Vol. 3A §11.11.2.1).
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_TYPE_WRBACK: u64 = 6;

/// The MSRs set at boot, as (index, value): the SYSENTER and SYSCALL MSRs
/// cleared, the TSC at zero, fast strings on and write-back as the default
/// memory type (Firecracker's `create_boot_msr_entries`).
#[must_use]
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    let e = |index: u32, data: u64| kvm_msr_entry { index, data, ..Default::default() };
    vec![
        e(msr::IA32_SYSENTER_CS, 0),
        e(msr::IA32_SYSENTER_ESP, 0),
        e(msr::IA32_SYSENTER_EIP, 0),
        e(msr::IA32_STAR, 0),
        e(msr::IA32_CSTAR, 0),
        e(msr::IA32_KERNEL_GS_BASE, 0),
        e(msr::IA32_FMASK, 0),
        e(msr::IA32_LSTAR, 0),
        e(msr::IA32_TSC, 0),
        e(msr::IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        e(msr::IA32_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_TYPE_WRBACK),
    ]
}

/// Local APIC register offsets of the LVT LINT0 and LINT1 entries (SDM
/// Vol. 3A §11.4.1, Table 11-1) and the delivery-mode field, bits 10:8
/// (§11.5.1): ExtINT is 0b111, NMI 0b100.
const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const DELIVERY_MODE_MASK: u32 = 0x700;
const DELIVERY_EXTINT: u32 = 0x700;
const DELIVERY_NMI: u32 = 0x400;

/// Wires the local APIC's LINT pins as on a PC (the MP specification's
/// virtual-wire mode): LINT0 takes the 8259 PIC's interrupts (ExtINT),
/// LINT1 takes NMIs. `regs` is a `kvm_lapic_state`'s register page.
pub fn set_lint(regs: &mut [u8]) {
    for (offset, mode) in [(APIC_LVT_LINT0, DELIVERY_EXTINT), (APIC_LVT_LINT1, DELIVERY_NMI)] {
        let Some(field) = regs.get_mut(offset..offset + 4) else { continue };
        let old = u32::from_le_bytes([field[0], field[1], field[2], field[3]]);
        field.copy_from_slice(&((old & !DELIVERY_MODE_MASK) | mode).to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 { function, index, ebx: 0x0002_0800, ..Default::default() }
    }

    fn find(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> kvm_cpuid_entry2 {
        *entries.iter().find(|e| e.function == function && e.index == index).unwrap()
    }

    #[test]
    fn leaf_1_carries_the_apic_id_and_the_hypervisor_bit() {
        let mut c = vec![leaf(1, 0)];
        fix_cpuid(&mut c, 3, 4);
        let l1 = find(&c, 1, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ebx & 0xffff, 0x0800, "the CLFLUSH size is kept");
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(l1.edx & LEAF1_EDX_HTT, 0);
    }

    #[test]
    fn extended_topology_gives_each_cpu_its_x2apic_id() {
        let mut c = vec![leaf(0xb, 0), leaf(0xb, 1), leaf(0xb, 2), leaf(0x1f, 0)];
        fix_cpuid(&mut c, 5, 6);
        for (f, i) in [(0xb, 0), (0xb, 1), (0xb, 2), (0x1f, 0)] {
            assert_eq!(find(&c, f, i).edx, 5);
        }
        let core = find(&c, 0xb, 1);
        assert_eq!((core.eax, core.ebx, (core.ecx >> 8) & 0xff), (3, 6, LEVEL_TYPE_CORE));
        assert_eq!((find(&c, 0xb, 2).ecx >> 8) & 0xff, 0, "levels past the core are invalid");
    }

    #[test]
    fn the_kvm_signature_leaf_is_added_or_corrected() {
        let mut c = vec![leaf(1, 0)];
        fix_cpuid(&mut c, 0, 1);
        let sig = find(&c, KVM_CPUID_SIGNATURE, 0);
        let bytes: Vec<u8> = [sig.ebx, sig.ecx, sig.edx].iter().flat_map(|r| r.to_le_bytes()).collect();
        assert_eq!(bytes, b"KVMKVMKVM\0\0\0");
        assert_eq!(sig.eax, KVM_CPUID_FEATURES);
        let mut c = vec![kvm_cpuid_entry2 { function: KVM_CPUID_SIGNATURE, eax: 0x4000_0010, ..Default::default() }];
        fix_cpuid(&mut c, 0, 1);
        assert_eq!(c.len(), 1);
        assert_eq!(find(&c, KVM_CPUID_SIGNATURE, 0).eax, 0x4000_0010);
        assert_eq!(find(&c, KVM_CPUID_SIGNATURE, 0).ebx, KVM_SIGNATURE[0]);
    }

    #[test]
    fn pvm_hosts_hide_cmpxchg16b_and_nothing_else() {
        let mut c = vec![kvm_cpuid_entry2 { function: 1, ecx: 0x8120_2000, edx: 0x0f8b_fbff, ..Default::default() }];
        hide_unemulated_features(&mut c);
        assert_eq!((c[0].ecx, c[0].edx), (0x8120_0000, 0x0f8b_fbff));
    }

    #[test]
    fn boot_msrs_enable_fast_strings_and_write_back_mtrrs() {
        let m = boot_msrs();
        let get = |i| m.iter().find(|e| e.index == i).map(|e| e.data);
        assert_eq!(get(msr::IA32_MISC_ENABLE), Some(1));
        assert_eq!(get(msr::IA32_MTRR_DEF_TYPE), Some(0x806));
        assert_eq!(get(msr::IA32_LSTAR), Some(0));
    }

    #[test]
    fn lint0_is_extint_and_lint1_is_nmi_keeping_the_other_bits() {
        let mut regs = vec![0u8; 0x400];
        regs[APIC_LVT_LINT0..APIC_LVT_LINT0 + 4].copy_from_slice(&0x0001_0000u32.to_le_bytes());
        set_lint(&mut regs);
        let at = |o: usize| u32::from_le_bytes(regs[o..o + 4].try_into().unwrap());
        assert_eq!(at(APIC_LVT_LINT0), 0x0001_0700, "mask bit kept, ExtINT set");
        assert_eq!(at(APIC_LVT_LINT1), 0x400);
    }
}
