//! Building the Linux zero page (`struct boot_params`) as a pure function.
//!
//! Field meanings are from Documentation/arch/x86/zero-page.rst and
//! boot.rst ("Details of Header Fields"). For a bzImage the setup header
//! is the kernel's own, with the fields a boot loader writes filled in; a
//! plain vmlinux has none, so the few fields Linux reads at its 64-bit
//! entry are made up the way boot.rst says a loader sets them.

use linux_loader::loader::bootparam::{E820_MAX_ENTRIES_ZEROPAGE, LOADED_HIGH, boot_e820_entry, boot_params, setup_header};

use memvisor_abi::boot::HvmMemmapEntry;

use crate::boot::BootError;
use crate::boot::bzimage::HDRS_MAGIC;

/// `boot_flag`: the boot sector signature (boot.rst, "boot_flag").
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// `type_of_loader` 0xff: "undefined" boot loader, for loaders without an
/// assigned id (boot.rst, "type_of_loader").
pub const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// Longest command line of a kernel that does not say (`cmdline_size`
/// missing: a vmlinux): x86's `COMMAND_LINE_SIZE` is 2048 with the NUL
/// (arch/x86/include/asm/setup.h).
pub const DEFAULT_CMDLINE_MAX: u32 = 2047;
/// `kernel_alignment` of a vmlinux, which has no header: x86-64's
/// `CONFIG_PHYSICAL_ALIGN` default (2 MiB).
const DEFAULT_KERNEL_ALIGNMENT: u32 = 0x20_0000;

/// What goes into the zero page.
#[derive(Debug, Clone)]
pub struct ZeroPageSpec<'a> {
    /// The bzImage's setup header as loaded (linux-loader has set
    /// `code32_start`), or `None` for a vmlinux.
    pub header: Option<setup_header>,
    /// Where the NUL-terminated command line is.
    pub cmdline_addr: u64,
    /// Its length without the NUL.
    pub cmdline_len: usize,
    /// The initrd as `(address, size)`.
    pub initrd: Option<(u64, u64)>,
    /// The memory map ([`crate::layout::e820_map`]).
    pub e820: &'a [HvmMemmapEntry],
    /// Where the ACPI RSDP is, if the guest has ACPI tables.
    pub acpi_rsdp: Option<u64>,
}

/// The longest command line (without its NUL) the kernel of `header` takes.
#[must_use]
pub fn cmdline_max(header: Option<&setup_header>) -> u32 {
    match header {
        // cmdline_size exists from protocol 2.06, which the 64-bit entry
        // (2.12) implies.
        Some(h) if h.cmdline_size != 0 => h.cmdline_size,
        _ => DEFAULT_CMDLINE_MAX,
    }
}

/// Builds the zero page.
///
/// # Errors
/// [`BootError::CmdlineTooLong`] when the command line exceeds the
/// kernel's `cmdline_size`, [`BootError::TooManyMemmapEntries`] when the
/// map does not fit the 128 entries of `e820_table`, and
/// [`BootError::WriteMemory`] for an address above 4 GiB.
pub fn build(spec: &ZeroPageSpec<'_>) -> Result<boot_params, BootError> {
    let max = cmdline_max(spec.header.as_ref());
    if spec.cmdline_len > max as usize {
        return Err(BootError::CmdlineTooLong(spec.cmdline_len));
    }
    if spec.e820.len() > E820_MAX_ENTRIES_ZEROPAGE {
        return Err(BootError::TooManyMemmapEntries(spec.e820.len()));
    }
    let below_4g = |addr: u64, what: &str| u32::try_from(addr).map_err(|_| BootError::WriteMemory(format!("the {what} at {addr:#x} is above 4 GiB")));

    let mut params = boot_params::default();
    let mut hdr = spec.header.unwrap_or_else(|| setup_header {
        boot_flag: BOOT_FLAG_MAGIC,
        header: HDRS_MAGIC,
        kernel_alignment: DEFAULT_KERNEL_ALIGNMENT,
        ..Default::default()
    });
    hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    // LOADED_HIGH: the protected-mode code is at 1 MiB or above (always,
    // here). CAN_USE_HEAP stays as the kernel has it (clear): it describes
    // the real-mode setup's heap (`heap_end_ptr`), and the 64-bit entry
    // runs no setup code.
    hdr.loadflags |= LOADED_HIGH;
    hdr.cmd_line_ptr = below_4g(spec.cmdline_addr, "command line")?;
    if spec.header.is_none() {
        // A loader writes cmdline_size only for a kernel without a header
        // to read it from; the vmlinux gets the buffer's real length.
        hdr.cmdline_size = spec.cmdline_len as u32;
    }
    if let Some((addr, size)) = spec.initrd {
        hdr.ramdisk_image = below_4g(addr, "initrd")?;
        hdr.ramdisk_size = u32::try_from(size).map_err(|_| BootError::WriteMemory(format!("an initrd of {size} bytes does not fit ramdisk_size")))?;
    }
    params.hdr = hdr;
    // `acpi_rsdp_addr` (zero-page.rst, offset 0x070; boot protocol 2.14):
    // Linux's `x86_default_get_root_pointer` reads it before it would scan
    // the BIOS area for the RSDP.
    params.acpi_rsdp_addr = spec.acpi_rsdp.unwrap_or(0);
    for (slot, e) in params.e820_table.iter_mut().zip(spec.e820) {
        *slot = boot_e820_entry { addr: e.addr, size: e.size, r#type: e.kind };
    }
    params.e820_entries = spec.e820.len() as u8;
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout;

    fn spec<'a>(header: Option<setup_header>, e820: &'a [HvmMemmapEntry], initrd: Option<(u64, u64)>) -> ZeroPageSpec<'a> {
        ZeroPageSpec { header, cmdline_addr: layout::abi::CMDLINE, cmdline_len: 30, initrd, e820, acpi_rsdp: Some(layout::abi::ACPI_RSDP) }
    }

    #[test]
    fn a_vmlinux_gets_a_made_up_header_with_the_loader_fields() {
        let map = layout::e820_map(512 << 20);
        let p = build(&spec(None, &map, Some((0x1000_0000, 0x1234)))).unwrap();
        let h = p.hdr;
        assert_eq!({ h.header }, HDRS_MAGIC);
        assert_eq!({ h.boot_flag }, BOOT_FLAG_MAGIC);
        assert_eq!(h.type_of_loader, 0xff);
        assert_eq!(h.loadflags & LOADED_HIGH, LOADED_HIGH);
        assert_eq!({ h.cmd_line_ptr }, layout::abi::CMDLINE as u32);
        assert_eq!({ h.cmdline_size }, 30);
        assert_eq!(({ h.ramdisk_image }, { h.ramdisk_size }), (0x1000_0000, 0x1234));
        assert_eq!({ p.acpi_rsdp_addr }, layout::abi::ACPI_RSDP);
    }

    #[test]
    fn the_e820_table_is_the_layouts_map() {
        let map = layout::e820_map(6 << 30);
        let p = build(&spec(None, &map, None)).unwrap();
        assert_eq!(usize::from(p.e820_entries), map.len());
        for (z, m) in p.e820_table.iter().zip(&map) {
            assert_eq!(({ z.addr }, { z.size }, { z.r#type }), (m.addr, m.size, m.kind));
        }
        assert_eq!(({ p.hdr.ramdisk_image }, { p.hdr.ramdisk_size }), (0, 0));
    }

    #[test]
    fn a_bzimage_keeps_its_header_and_limits() {
        let kernel = setup_header { header: HDRS_MAGIC, version: 0x020f, cmdline_size: 20, init_size: 0x100_0000, ..Default::default() };
        let map = layout::e820_map(256 << 20);
        let e = build(&spec(Some(kernel), &map, None)).unwrap_err();
        assert!(matches!(e, BootError::CmdlineTooLong(30)), "{e}");
        let kernel = setup_header { cmdline_size: 2047, ..kernel };
        let p = build(&spec(Some(kernel), &map, None)).unwrap();
        assert_eq!(({ p.hdr.version }, { p.hdr.init_size }, { p.hdr.cmdline_size }), (0x020f, 0x100_0000, 2047));
        assert_eq!(p.hdr.type_of_loader, LOADER_TYPE_UNDEFINED);
    }

    #[test]
    fn a_map_beyond_128_entries_is_refused() {
        let map = vec![HvmMemmapEntry::default(); E820_MAX_ENTRIES_ZEROPAGE + 1];
        assert!(matches!(build(&spec(None, &map, None)), Err(BootError::TooManyMemmapEntries(_))));
    }
}
