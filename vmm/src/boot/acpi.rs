//! The ACPI tables: how a Linux guest learns its CPUs and interrupt
//! controllers (ACPI 6.5, chapter 5).
//!
//! [`tables`] builds them as bytes, a pure function of the vCPU count;
//! [`write`] puts each at its address of the layout (`memvisor_abi::layout`,
//! `ACPI_*`): the RSDP in the BIOS area OSPM scans, the others in the
//! "ACPI data" range of the memory map. The RSDP leads to the XSDT, which
//! lists the FADT and the MADT; the FADT points at the FACS and the DSDT.
//! Linux is also told the RSDP's address directly: the zero page's
//! `acpi_rsdp_addr` ([`super::zero_page`]) and the PVH start info's
//! `rsdp_paddr` ([`super::pvh`]).
//!
//! **Full fixed hardware, not hardware-reduced.** Firecracker and Cloud
//! Hypervisor set the FADT's `HW_REDUCED_ACPI` flag, and Linux then drops
//! the legacy PIC and the PIT timer set-up and creates no ISA IRQs 0–15
//! (`acpi_reduced_hw_init`): a device on an ISA IRQ works only once the
//! DSDT describes it. memvisor's guests use ISA IRQs that no table
//! describes: COM1 on IRQ 4 and the balloon announced on the command line
//! with IRQ 5. So the FADT keeps the PC platform (8259 PICs, PIT, ISA IRQs)
//! and points at a PM1 event and control block, whose ports the VMM
//! answers (`crate::devices::acpi_pm`); there is no PM timer (optional
//! since ACPI 5.0: `PM_TMR_LEN` 0) and no GPE block, and `SMI_CMD` 0 says
//! the platform is always in ACPI mode.
//!
//! **Interrupt routing is KVM's default** (`KVM_CREATE_IRQCHIP`, KVM
//! api.rst): GSI *n* is IOAPIC pin *n* for every *n* < 24, and the PIC's pin
//! *n* for *n* < 16; the in-kernel PIT raises GSI 0. So ISA IRQ 0 is GSI 0
//! and needs no interrupt source override. (QEMU's MADT maps IRQ 0 to GSI 2
//! because QEMU programs KVM's routing to wire the PIT to IOAPIC pin 2, as
//! on a real PC; with KVM's default routing that override would send
//! Linux's timer to a pin nothing raises.) The one override the MADT has is
//! for the SCI, to say it is level-triggered and active high, as KVM
//! asserts lines.

use acpi_tables::Aml;
use acpi_tables::aml::{Name, Package, Path};
use acpi_tables::facs::FACS;
use acpi_tables::fadt::{FADTBuilder, Flags, PmProfile};
use acpi_tables::madt::{EnabledStatus, IoApic, LocalInterruptController, MADT, ProcessorLocalApic};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use vm_memory::{Bytes, GuestAddress};
use zerocopy::byteorder::little_endian::{U16, U32};
use zerocopy::{Immutable, IntoBytes};

use memvisor_abi::ports;

use crate::boot::BootError;
use crate::layout::{self, abi};
use crate::memory::GuestMemory;

/// The OEM ID in every table's header (ACPI 6.5 §5.2.6, Table 5.4).
pub const OEM_ID: [u8; 6] = *b"MEMVSR";
/// The OEM revision in every table's header.
const OEM_REVISION: u32 = 1;
/// The FADT's hypervisor vendor identity (ACPI 6.5 §5.2.9, Table 5.9,
/// "Hypervisor Vendor Identity").
const HYPERVISOR_VENDOR: [u8; 8] = *b"MEMVISOR";
/// DSDT revision 2: integers are 64 bits wide (ACPI 6.5 §5.2.11.1).
const DSDT_REVISION: u8 = 2;
/// The `SLP_TYP` value of the S5 (soft-off) state, which `\_S5` names and
/// the PM1 control block's `SLP_TYP` field carries (ACPI 6.5 §7.4.2 and
/// §4.8.3.2.1); any 3-bit value will do, as long as the two agree.
pub const SLP_TYP_S5: u8 = 5;

/// IA-PC boot architecture flags of the FADT (ACPI 6.5 §5.2.9.3, Table
/// 5.11): `LEGACY_DEVICES` (COM1 is an ISA device no table describes),
/// `8042` (the i8042 whose reset line `reboot=k` pulls), `VGA Not Present`,
/// `CMOS RTC Not Present` (the VMM answers no RTC ports).
const IAPC_LEGACY_DEVICES: u16 = 1 << 0;
const IAPC_8042: u16 = 1 << 1;
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

/// MADT entry types (ACPI 6.5 §5.2.12, Table 5.21) of the entries
/// acpi_tables has no type for.
const MADT_INTERRUPT_SOURCE_OVERRIDE: u8 = 2;
const MADT_LOCAL_APIC_NMI: u8 = 4;
/// MADT flags: `PCAT_COMPAT`, the system also has dual 8259s (ACPI 6.5
/// §5.2.12, Table 5.20): KVM's in-kernel irqchip has them.
const MADT_PCAT_COMPAT: u32 = 1;
/// Offset of the MADT's flags: after the 36-byte header and the local
/// interrupt controller address (ACPI 6.5 §5.2.12, Table 5.19).
const MADT_FLAGS_OFFSET: usize = 40;
/// MPS INTI flags (ACPI 6.5 §5.2.12.5, Table 5.26): polarity in bits 1:0
/// (01 active high), trigger mode in bits 3:2 (01 edge, 11 level).
const INTI_ACTIVE_HIGH: u16 = 0b01;
const INTI_EDGE: u16 = 0b01 << 2;
const INTI_LEVEL: u16 = 0b11 << 2;
/// ACPI processor UID 0xff in a Local APIC NMI entry: all processors
/// (ACPI 6.5 §5.2.12.7, Table 5.28).
const ALL_PROCESSORS: u8 = 0xff;
/// The LAPIC input NMIs arrive on: LINT1, as `crate::boot::cpu::set_lint`
/// wires it.
const NMI_LINT: u8 = 1;
/// Offset of the checksum byte in a table header (ACPI 6.5 §5.2.6).
const CHECKSUM_OFFSET: usize = 9;

/// An Interrupt Source Override entry (ACPI 6.5 §5.2.12.5, Table 5.25).
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, IntoBytes, Immutable)]
struct InterruptSourceOverride {
    kind: u8,
    length: u8,
    /// 0: ISA.
    bus: u8,
    /// The ISA IRQ.
    source: u8,
    /// The GSI it arrives on.
    gsi: U32,
    flags: U16,
}

impl Aml for InterruptSourceOverride {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(self.as_bytes());
    }
}

/// A Local APIC NMI entry (ACPI 6.5 §5.2.12.7, Table 5.28).
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, IntoBytes, Immutable)]
struct LocalApicNmi {
    kind: u8,
    length: u8,
    processor_uid: u8,
    flags: U16,
    lint: u8,
}

impl Aml for LocalApicNmi {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(self.as_bytes());
    }
}

/// One table, and where it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    /// Its guest-physical address.
    pub addr: GuestAddress,
    /// Its bytes, checksum included.
    pub bytes: Vec<u8>,
}

/// The bytes of anything acpi_tables can serialise.
fn bytes_of(aml: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    aml.to_aml_bytes(&mut bytes);
    bytes
}

/// Sets the header checksum of `table` so that all its bytes sum to zero
/// (ACPI 6.5 §5.2.6, "Checksum").
fn set_checksum(table: &mut [u8]) {
    table[CHECKSUM_OFFSET] = 0;
    let sum = table.iter().fold(0u8, |acc, b| acc.wrapping_add(*b));
    table[CHECKSUM_OFFSET] = sum.wrapping_neg();
}

/// The MADT for `cpus` vCPUs: one enabled Local APIC per vCPU (APIC id =
/// ACPI processor UID = vCPU index, the id `crate::boot::cpu::fix_cpuid`
/// puts in CPUID leaves 1 and 0xb), the IOAPIC with GSIs from 0, the SCI's
/// override and LINT1 as every CPU's NMI input.
fn madt(cpus: u8) -> Vec<u8> {
    let lapic = u32::try_from(abi::LAPIC_BASE).expect("the LAPIC is below 4 GiB");
    let ioapic = u32::try_from(abi::IOAPIC_BASE).expect("the IOAPIC is below 4 GiB");
    let mut madt = MADT::new(OEM_ID, *b"MVSRAPIC", OEM_REVISION, LocalInterruptController::Address(lapic));
    for cpu in 0..cpus {
        madt.add_structure(ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled));
    }
    // IOAPIC id 0: what KVM's IOAPIC ID register reads after reset.
    madt.add_structure(IoApic::new(0, ioapic, 0));
    let sci = u8::try_from(ports::ACPI_SCI_GSI).expect("the SCI is an ISA IRQ");
    madt.add_structure(InterruptSourceOverride {
        kind: MADT_INTERRUPT_SOURCE_OVERRIDE,
        length: size_of::<InterruptSourceOverride>() as u8,
        bus: 0,
        source: sci,
        gsi: ports::ACPI_SCI_GSI.into(),
        flags: (INTI_ACTIVE_HIGH | INTI_LEVEL).into(),
    });
    madt.add_structure(LocalApicNmi {
        kind: MADT_LOCAL_APIC_NMI,
        length: size_of::<LocalApicNmi>() as u8,
        processor_uid: ALL_PROCESSORS,
        flags: (INTI_ACTIVE_HIGH | INTI_EDGE).into(),
        lint: NMI_LINT,
    });
    let mut bytes = bytes_of(&madt);
    // acpi_tables writes the flags as zero; PCAT_COMPAT is set here.
    bytes[MADT_FLAGS_OFFSET..MADT_FLAGS_OFFSET + 4].copy_from_slice(&MADT_PCAT_COMPAT.to_le_bytes());
    set_checksum(&mut bytes);
    bytes
}

/// The FADT: full fixed hardware with the PM1a event and control blocks at
/// the VMM's ports, the SCI on IRQ 9, no SMI command port (always in ACPI
/// mode), no PM timer and no GPE block (lengths 0), the FACS and the DSDT.
fn fadt() -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, *b"MVSRFACP", OEM_REVISION)
        .firmware_ctrl_64(abi::ACPI_FACS)
        .dsdt_64(abi::ACPI_DSDT)
        .preferred_pm_profile(PmProfile::Unspecified)
        // WBINVD: the CPU flushes caches correctly (required on IA-PC);
        // PROC_C1: every CPU supports C1 (`hlt`); PWR_BUTTON and
        // SLP_BUTTON: no fixed-feature buttons (Table 5.10).
        .flag(Flags::Wbinvd)
        .flag(Flags::ProcC1)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.sci_int = u16::try_from(ports::ACPI_SCI_GSI).expect("the SCI is an ISA IRQ").into();
    fadt.pm1a_evt_blk = u32::from(ports::ACPI_PM1A_EVT).into();
    fadt.pm1_evt_len = ports::ACPI_PM1_EVT_LEN as u8;
    fadt.pm1a_cnt_blk = u32::from(ports::ACPI_PM1A_CNT).into();
    fadt.pm1_cnt_len = ports::ACPI_PM1_CNT_LEN as u8;
    fadt.iapc_boot_arch = (IAPC_LEGACY_DEVICES | IAPC_8042 | IAPC_VGA_NOT_PRESENT | IAPC_CMOS_RTC_NOT_PRESENT).into();
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(HYPERVISOR_VENDOR).into();
    bytes_of(&fadt.finalize())
}

/// The DSDT: the `\_S5` object, whose `SLP_TYP` the PM1 control block
/// turns into a power-off (ACPI 6.5 §7.4.2.5). No device is described: the
/// CPUs are in the MADT and the ISA devices are legacy ones.
fn dsdt() -> Vec<u8> {
    let mut dsdt = Sdt::new(*b"DSDT", 36, DSDT_REVISION, OEM_ID, *b"MVSRDSDT", OEM_REVISION);
    // Package { SLP_TYPa, SLP_TYPb, reserved, reserved }.
    let s5 = Name::new(Path::new("_S5_"), &Package::new(vec![&SLP_TYP_S5, &SLP_TYP_S5, &0u8, &0u8]));
    dsdt.append_slice(&bytes_of(&s5));
    dsdt.as_slice().to_vec()
}

/// Every table for a VM of `cpus` vCPUs (1 to 255: one APIC id each), in
/// address order.
///
/// # Errors
/// [`BootError::Acpi`] for a count the MADT cannot hold.
pub fn tables(cpus: u32) -> Result<Vec<Table>, BootError> {
    let count = u8::try_from(cpus).ok().filter(|&n| n > 0 && n < u8::MAX).ok_or_else(|| BootError::Acpi(format!("{cpus} vCPUs do not fit xAPIC ids 0..=254")))?;
    let mut xsdt = XSDT::new(OEM_ID, *b"MVSRXSDT", OEM_REVISION);
    xsdt.add_entry(abi::ACPI_FADT);
    xsdt.add_entry(abi::ACPI_MADT);
    let all = vec![
        Table { addr: layout::ACPI_RSDP, bytes: bytes_of(&Rsdp::new(OEM_ID, abi::ACPI_XSDT)) },
        Table { addr: layout::ACPI_XSDT, bytes: bytes_of(&xsdt) },
        Table { addr: layout::ACPI_FADT, bytes: fadt() },
        Table { addr: layout::ACPI_FACS, bytes: bytes_of(&FACS::new()) },
        Table { addr: layout::ACPI_DSDT, bytes: dsdt() },
        Table { addr: layout::ACPI_MADT, bytes: madt(count) },
    ];
    if let Some(t) = all.iter().find(|t| t.bytes.len() as u64 > abi::ACPI_TABLE_MAX) {
        return Err(BootError::Acpi(format!("the table at {:#x} has {} bytes, more than its {} in the layout", t.addr.0, t.bytes.len(), abi::ACPI_TABLE_MAX)));
    }
    Ok(all)
}

/// Writes the tables for `cpus` vCPUs into guest memory.
///
/// # Errors
/// [`BootError::Acpi`] or [`BootError::WriteMemory`].
pub fn write(memory: &GuestMemory, cpus: u32) -> Result<(), BootError> {
    for t in tables(cpus)? {
        memory.write_slice(&t.bytes, t.addr).map_err(|e| BootError::WriteMemory(format!("ACPI table at {:#x}: {e}", t.addr.0)))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b))
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    fn table(all: &[Table], addr: u64) -> &[u8] {
        &all.iter().find(|t| t.addr.0 == addr).unwrap().bytes
    }

    /// The MADT's entries as (type, bytes).
    fn madt_entries(madt: &[u8]) -> Vec<(u8, &[u8])> {
        let mut out = Vec::new();
        let mut at = 44;
        while at < madt.len() {
            let (kind, len) = (madt[at], usize::from(madt[at + 1]));
            assert!(len >= 2 && at + len <= madt.len(), "entry at {at} of length {len} overruns the table");
            out.push((kind, &madt[at..at + len]));
            at += len;
        }
        out
    }

    #[test]
    fn every_table_sums_to_zero_and_says_its_length() {
        for cpus in [1, 2, 4, 64] {
            let all = tables(cpus).unwrap();
            // The FACS has no checksum (ACPI 6.5 §5.2.10, Table 5.14).
            for t in all.iter().filter(|t| t.addr.0 != abi::ACPI_FACS) {
                assert_eq!(sum(&t.bytes), 0, "{cpus} CPUs: table at {:#x}", t.addr.0);
            }
            let rsdp = table(&all, abi::ACPI_RSDP);
            assert_eq!(&rsdp[..8], b"RSD PTR ");
            assert_eq!(sum(&rsdp[..20]), 0, "the ACPI 1.0 checksum covers the first 20 bytes");
            assert_eq!((rsdp[15], u32_at(rsdp, 20), u64_at(rsdp, 24)), (2, 36, abi::ACPI_XSDT), "revision 2, length, XSDT");
            for (addr, sig) in [(abi::ACPI_XSDT, b"XSDT"), (abi::ACPI_FADT, b"FACP"), (abi::ACPI_DSDT, b"DSDT"), (abi::ACPI_MADT, b"APIC")] {
                let t = table(&all, addr);
                assert_eq!(&t[..4], sig);
                assert_eq!(u32_at(t, 4) as usize, t.len(), "{sig:?}'s length field");
            }
        }
    }

    #[test]
    fn the_xsdt_lists_the_fadt_and_the_madt_and_the_fadt_points_at_facs_and_dsdt() {
        let all = tables(2).unwrap();
        let xsdt = table(&all, abi::ACPI_XSDT);
        assert_eq!((u64_at(xsdt, 36), u64_at(xsdt, 44), xsdt.len()), (abi::ACPI_FADT, abi::ACPI_MADT, 52));
        let fadt = table(&all, abi::ACPI_FADT);
        // ACPI 6.5 Table 5.9 offsets: X_FIRMWARE_CTRL 132, X_DSDT 140.
        assert_eq!((u64_at(fadt, 132), u64_at(fadt, 140)), (abi::ACPI_FACS, abi::ACPI_DSDT));
        // SCI_INT 46, SMI_CMD 48, PM1a_EVT_BLK 56, PM1a_CNT_BLK 64, PM_TMR_BLK 76,
        // PM1_EVT_LEN 88, PM1_CNT_LEN 89, PM_TMR_LEN 91, Flags 112 (HW_REDUCED_ACPI is bit 20).
        assert_eq!(u16::from_le_bytes([fadt[46], fadt[47]]), 9);
        assert_eq!((u32_at(fadt, 48), u32_at(fadt, 56), u32_at(fadt, 64), u32_at(fadt, 76)), (0, 0x640, 0x644, 0));
        assert_eq!((fadt[88], fadt[89], fadt[91]), (4, 2, 0));
        assert_eq!(u32_at(fadt, 112) & (1 << 20), 0, "full fixed hardware, not hardware-reduced");
        let facs = table(&all, abi::ACPI_FACS);
        assert_eq!((&facs[..4], u32_at(facs, 4)), (&b"FACS"[..], 64));
    }

    #[test]
    fn the_madt_has_one_enabled_lapic_per_cpu_the_ioapic_the_sci_override_and_lint1_nmi() {
        for cpus in [1u8, 2, 4, 64] {
            let all = tables(u32::from(cpus)).unwrap();
            let madt = table(&all, abi::ACPI_MADT);
            assert_eq!(u32_at(madt, 36), 0xfee0_0000, "local APIC address");
            assert_eq!(u32_at(madt, 40), 1, "PCAT_COMPAT");
            let entries = madt_entries(madt);
            let lapics: Vec<(u8, u8, u32)> = entries.iter().filter(|(k, _)| *k == 0).map(|(_, e)| (e[2], e[3], u32_at(e, 4))).collect();
            let want: Vec<(u8, u8, u32)> = (0..cpus).map(|i| (i, i, 1)).collect();
            assert_eq!(lapics, want, "(UID, APIC id, enabled) per CPU");
            let ioapics: Vec<&[u8]> = entries.iter().filter(|(k, _)| *k == 1).map(|(_, e)| *e).collect();
            assert_eq!(ioapics.len(), 1);
            assert_eq!((ioapics[0][2], u32_at(ioapics[0], 4), u32_at(ioapics[0], 8)), (0, 0xfec0_0000, 0), "id, address, GSI base");
            let overrides: Vec<&[u8]> = entries.iter().filter(|(k, _)| *k == 2).map(|(_, e)| *e).collect();
            assert_eq!(overrides.len(), 1, "no override for IRQ 0: KVM's PIT raises GSI 0");
            let o = overrides[0];
            assert_eq!((o.len(), o[2], o[3], u32_at(o, 4), u16::from_le_bytes([o[8], o[9]])), (10, 0, 9, 9, 0b1101), "ISA IRQ 9 -> GSI 9, level, active high");
            let nmis: Vec<&[u8]> = entries.iter().filter(|(k, _)| *k == 4).map(|(_, e)| *e).collect();
            assert_eq!(nmis.len(), 1);
            assert_eq!((nmis[0].len(), nmis[0][2], nmis[0][5]), (6, 0xff, 1), "every CPU's LINT1");
            assert_eq!(entries.len(), usize::from(cpus) + 3);
        }
    }

    #[test]
    fn the_dsdt_names_s5() {
        let all = tables(1).unwrap();
        let dsdt = table(&all, abi::ACPI_DSDT);
        // NameOp, "_S5_", PackageOp, PkgLength, NumElements 4, BytePrefix 5, BytePrefix 5, Zero, Zero.
        assert_eq!(&dsdt[36..], &[0x08, b'_', b'S', b'5', b'_', 0x12, 0x08, 4, 0x0a, 5, 0x0a, 5, 0, 0]);
    }

    #[test]
    fn counts_beyond_xapic_ids_are_refused() {
        assert!(matches!(tables(0), Err(BootError::Acpi(_))));
        assert!(matches!(tables(255), Err(BootError::Acpi(_))));
        assert!(tables(254).is_ok());
    }
}
