//! Writing the PVH boot data: start info, memory map, command line,
//! memvisor's boot configuration (Xen `docs/misc/pvh.pandoc`) and the ACPI
//! tables the start info's `rsdp_paddr` points at (a Linux vmlinux entered
//! the PVH way reads them; memvisor's own guest does not).

use vm_memory::Bytes;

use crate::memory::GuestMemory;

use memvisor_abi::Pod;
use memvisor_abi::boot::{BootConfig, HVM_START_MAGIC, HVM_START_VERSION, HvmStartInfo};

use crate::boot::BootError;
use crate::layout::{self, abi};

/// Writes everything the guest reads at entry; the ACPI tables for
/// `config.cpus` vCPUs.
///
/// # Errors
/// [`BootError::CmdlineTooLong`], [`BootError::TooManyMemmapEntries`],
/// [`BootError::Acpi`] or [`BootError::WriteMemory`].
pub fn write_boot_data(memory: &GuestMemory, mem_size: u64, cmdline: &str, config: &BootConfig) -> Result<(), BootError> {
    let write = |bytes: &[u8], addr| memory.write_slice(bytes, addr).map_err(|e| BootError::WriteMemory(e.to_string()));

    if cmdline.len() as u64 >= abi::CMDLINE_MAX || cmdline.contains('\0') {
        return Err(BootError::CmdlineTooLong(cmdline.len()));
    }
    log::debug!("kernel command line: {cmdline:?}");
    let mut line = cmdline.as_bytes().to_vec();
    line.push(0);
    write(&line, layout::CMDLINE)?;

    let map = layout::e820_map(mem_size);
    if map.len() as u64 > abi::PVH_MEMMAP_MAX_ENTRIES {
        return Err(BootError::TooManyMemmapEntries(map.len()));
    }
    for (i, entry) in map.iter().enumerate() {
        write(entry.as_bytes(), layout::PVH_MEMMAP.unchecked_add_entry(i))?;
    }
    let start_info = HvmStartInfo {
        magic: HVM_START_MAGIC,
        version: HVM_START_VERSION,
        cmdline_paddr: abi::CMDLINE,
        memmap_paddr: abi::PVH_MEMMAP,
        memmap_entries: map.len() as u32,
        rsdp_paddr: abi::ACPI_RSDP,
        ..Default::default()
    };
    crate::boot::acpi::write(memory, config.cpus)?;
    write(start_info.as_bytes(), layout::PVH_START_INFO)?;
    write(config.as_bytes(), layout::BOOT_CONFIG)?;
    Ok(())
}

/// Address arithmetic for the memory-map table.
trait MemmapEntryAddr {
    fn unchecked_add_entry(self, i: usize) -> vm_memory::GuestAddress;
}

impl MemmapEntryAddr for vm_memory::GuestAddress {
    fn unchecked_add_entry(self, i: usize) -> vm_memory::GuestAddress {
        vm_memory::GuestAddress(self.0 + (i * size_of::<memvisor_abi::boot::HvmMemmapEntry>()) as u64)
    }
}
