//! What the VMM writes into guest memory before the first instruction.
//!
//! The guest is entered the PVH way (Xen `docs/misc/pvh.pandoc`): 32-bit
//! protected mode, paging off, `ebx` holding the guest-physical address of an
//! [`HvmStartInfo`]. memvisor adds its own [`BootConfig`] at
//! [`crate::layout::BOOT_CONFIG`].
//!
//! **Fresh RAM is zero.** Every byte of guest RAM the VMM has not written
//! (the boot data and the kernel image) reads as zero at the first
//! instruction. The guest relies on this: its .bss, its allocator metadata
//! and the page tables it builds from never-used frames are not cleared
//! (clearing one 4 KiB page costs ~350 µs at ring 0 on an emulating host).

use crate::Pod;
use crate::workload::WorkloadSpec;

/// `hvm_start_info.magic` (Xen `arch-x86/hvm/start_info.h`).
pub const HVM_START_MAGIC: u32 = 0x336e_c578;
/// Start-info version 1 adds the memory map fields.
pub const HVM_START_VERSION: u32 = 1;
/// E820 type of usable RAM (ACPI spec §15, "Address Range Types").
pub const E820_RAM: u32 = 1;
/// E820 type of reserved ranges.
pub const E820_RESERVED: u32 = 2;
/// E820 type of ranges holding ACPI tables ("ACPI reclaim memory", ACPI
/// 6.5 §15.1, Table 15.1): not RAM until the OS has read the tables.
pub const E820_ACPI: u32 = 3;

/// Xen's `struct hvm_start_info`, version 1.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HvmStartInfo {
    /// Must be [`HVM_START_MAGIC`].
    pub magic: u32,
    /// [`HVM_START_VERSION`].
    pub version: u32,
    /// SIF_xxx flags; memvisor sets none.
    pub flags: u32,
    /// Number of modules (an initrd counts as one).
    pub nr_modules: u32,
    /// Guest-physical address of the module list.
    pub modlist_paddr: u64,
    /// Guest-physical address of the NUL-terminated command line.
    pub cmdline_paddr: u64,
    /// Guest-physical address of the ACPI RSDP (0: none).
    pub rsdp_paddr: u64,
    /// Guest-physical address of the memory map.
    pub memmap_paddr: u64,
    /// Number of [`HvmMemmapEntry`] at `memmap_paddr`.
    pub memmap_entries: u32,
    /// Must be zero.
    pub reserved: u32,
}
// SAFETY: repr(C), integer fields only, 56 bytes with no padding.
unsafe impl Pod for HvmStartInfo {}

/// Xen's `struct hvm_memmap_table_entry`: one E820-style range.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HvmMemmapEntry {
    /// Guest-physical start.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// [`E820_RAM`], [`E820_RESERVED`] or [`E820_ACPI`].
    pub kind: u32,
    /// Must be zero.
    pub reserved: u32,
}
// SAFETY: repr(C), integer fields only, 24 bytes with no padding.
unsafe impl Pod for HvmMemmapEntry {}

/// `BootConfig.magic`: "MVBC".
pub const BOOT_CONFIG_MAGIC: u32 = u32::from_le_bytes(*b"MVBC");
/// Bumped whenever [`BootConfig`] changes shape.
pub const BOOT_CONFIG_VERSION: u32 = 2;

/// [`BootConfig::flags`]: after its workloads the guest idles (`hlt`) instead
/// of exiting, because a control socket may still send it work.
pub const FLAG_IDLE_AT_END: u32 = 1 << 0;
/// [`BootConfig::flags`]: skip the self-test (benchmarks that time boot).
pub const FLAG_SKIP_SELFTEST: u32 = 1 << 1;
/// [`BootConfig::flags`]: `syscall`/`sysret` work from ring 3 on this host.
/// Not set on KVM's PVM flavour, where the guest falls back to `int3`.
pub const FLAG_SYSCALL_INSN: u32 = 1 << 2;

/// memvisor's own boot parameters, at [`crate::layout::BOOT_CONFIG`].
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BootConfig {
    /// [`BOOT_CONFIG_MAGIC`].
    pub magic: u32,
    /// [`BOOT_CONFIG_VERSION`].
    pub version: u32,
    /// log2 of the leaf size the guest should use for its RAM mapping:
    /// 12 (4 KiB), 21 (2 MiB) or 30 (1 GiB).
    pub guest_page_shift: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// TSC frequency in kHz (`KVM_GET_TSC_KHZ`), 0 when unknown.
    pub tsc_khz: u64,
    /// Host TSC when the VMM process started, for boot-time reports.
    pub vmm_start_tsc: u64,
    /// The workload to run after the self-test.
    pub workload: WorkloadSpec,
    /// vCPUs the VM has (1 ..= [`crate::smp::MAX_CPUS`]; 0 reads as 1):
    /// the guest starts CPUs 1 .. `cpus` ([`crate::smp`]). Added in version 2.
    pub cpus: u32,
    /// Zero.
    pub reserved: u32,
}
// SAFETY: repr(C), integer fields only (WorkloadSpec is Pod), no padding:
// 4*4 + 8*2 + 64 + 4*2 bytes.
unsafe impl Pod for BootConfig {}

impl BootConfig {
    /// Whether the magic and version are the ones this crate defines.
    #[must_use]
    pub fn is_valid(&self) -> bool {
        self.magic == BOOT_CONFIG_MAGIC && self.version == BOOT_CONFIG_VERSION
    }

    /// The CPUs to run on: [`BootConfig::cpus`] clamped to
    /// 1 ..= [`crate::smp::MAX_CPUS`].
    #[must_use]
    pub fn cpu_count(&self) -> u32 {
        self.cpus.clamp(1, crate::smp::MAX_CPUS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structs_have_their_abi_sizes() {
        assert_eq!(size_of::<HvmStartInfo>(), 56);
        assert_eq!(size_of::<HvmMemmapEntry>(), 24);
        assert_eq!(size_of::<BootConfig>(), 32 + size_of::<WorkloadSpec>() + 8);
    }

    #[test]
    fn boot_config_round_trips_through_bytes() {
        let c = BootConfig { magic: BOOT_CONFIG_MAGIC, version: BOOT_CONFIG_VERSION, guest_page_shift: 21, ..Default::default() };
        let back = BootConfig::from_bytes(c.as_bytes()).unwrap();
        assert_eq!(back, c);
        assert!(back.is_valid());
        assert!(BootConfig::from_bytes(&[0u8; 3]).is_none());
    }

    #[test]
    fn cpu_count_is_clamped_to_what_the_guest_supports() {
        let c = |cpus| BootConfig { cpus, ..Default::default() }.cpu_count();
        assert_eq!((c(0), c(1), c(4), c(64), c(1000)), (1, 1, 4, 64, 64));
    }
}
