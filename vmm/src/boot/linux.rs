//! Booting Linux through its own boot protocol: a bzImage or a plain
//! vmlinux, an optional initrd, the command line and the zero page, entered
//! at the 64-bit entry (Documentation/arch/x86/boot.rst, "64-bit Boot
//! Protocol").
//!
//! [`load`] writes guest memory: the kernel (linux-loader; a bzImage's
//! kernel decompressed by [`super::decompress`] first, unless the guest's
//! own decompressor is to run), the initrd at
//! the place [`super::initrd::place`] picks, the command line, the zero page
//! ([`super::zero_page::build`], which points Linux at the ACPI tables
//! [`super::load_linux`] writes), the boot GDT and page tables
//! ([`super::long_mode`]). [`prepare_vm`] adds what a Linux guest expects
//! of the platform (KVM's in-kernel PIC/IOAPIC/LAPIC and PIT); the vCPU is
//! set up by [`crate::vcpu::create_linux`].
//!
//! On KVM's PVM flavour the guest's CPL0 `cpuid` reports features that the
//! VMM's CPUID table does not list (XSAVE, SMAP, POPCNT, AVX...), while
//! KVM's emulator cannot run their instructions at CPL0. Measured with
//! Debian's 6.1 cloud kernel: `xrstor` (FPU init) is fatal, so the command
//! line needs `noxsave`; `int3`, `clac`/`stac`, Linux's hweight `popcnt`
//! and `fwait` are finished by the VMM ([`crate::unemulated`]), each at the
//! cost of an exit, which `nosmap` and `clearcpuid=151` avoid; the SIMD
//! users of `kernel_fpu_begin()` (its `ldmxcsr` is fatal) are kept away with
//! `clearcpuid=129,137,147,148,151,153` (PCLMULQDQ, SSSE3, SSE4.1, SSE4.2,
//! POPCNT, AES; arch/x86/include/asm/cpufeatures.h word 4).

use std::io::Cursor;

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{KernelLoader, bzimage::BzImage, load_cmdline};
use vm_memory::{Bytes, GuestAddress};

use crate::boot::format::KernelFormat;
use crate::boot::zero_page::{self, ZeroPageSpec};
use crate::boot::{BootError, bzimage, decompress, elf, initrd, long_mode};
use crate::config::KernelDecompress;
use crate::layout::{self, abi};
use crate::memory::{GuestMemory, GuestRam};
use crate::timeline;
use crate::vm::{Vm, VmError};

/// Where a loaded Linux is entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinuxEntry {
    /// The 64-bit entry point.
    pub rip: u64,
    /// The zero page (`rsi` at entry).
    pub zero_page: u64,
    /// The initrd as loaded: `(address, size)`.
    pub initrd: Option<(u64, u64)>,
    /// One past the kernel's footprint.
    pub kernel_end: u64,
}

/// Protocol 2.03 introduced `initrd_addr_max`; older kernels take initrds
/// up to 0x37ffffff (boot.rst, "initrd_addr_max").
const INITRD_ADDR_MAX_BEFORE_2_03: u64 = 0x37ff_ffff;

/// One past the last byte of RAM below the MMIO hole.
fn low_ram_end(ram: &GuestRam) -> u64 {
    layout::ram_ranges(ram.size()).first().map_or(0, |r| r.end().0)
}

/// Loads the kernel `image` of `format` (a Linux-protocol one), `initrd`
/// and `cmdline` into guest memory with the zero page, the boot GDT and the
/// page tables. A bzImage is decompressed by the VMM and entered as its
/// vmlinux, or entered at its own decompressor, as `decompress` says.
///
/// # Errors
/// Any [`BootError`] about the image, the initrd, the command line or
/// guest memory.
pub fn load(ram: &GuestRam, image: &[u8], format: KernelFormat, decompress: KernelDecompress, initrd_image: Option<&[u8]>, cmdline: &str) -> Result<LinuxEntry, BootError> {
    let memory = ram.memory();
    let ram_end = low_ram_end(ram);
    let write = |bytes: &[u8], addr: u64| memory.write_slice(bytes, GuestAddress(addr)).map_err(|e| BootError::WriteMemory(e.to_string()));

    let (header, rip, kernel_end) = match format {
        KernelFormat::BzImage if decompress == KernelDecompress::Vmm => load_decompressed(memory, image, ram_end)?,
        KernelFormat::BzImage => {
            let info = bzimage::parse(image)?;
            let end = info.footprint_end(abi::HIGH_MEMORY);
            if end > ram_end {
                return Err(BootError::DoesNotFit { start: abi::HIGH_MEMORY, end, ram_end });
            }
            // Loaded at `code32_start` (1 MiB); linux-loader copies the
            // protected-mode code there and hands the header back.
            let loaded = BzImage::load(memory, None, &mut Cursor::new(image), Some(layout::HIGH_MEMORY)).map_err(|e| BootError::Load(e.to_string()))?;
            let header = loaded.setup_header.ok_or_else(|| BootError::Load("linux-loader returned no setup header".into()))?;
            let load = loaded.kernel_load.0;
            (Some(header), load + bzimage::ENTRY_64_OFFSET, info.footprint_end(load))
        }
        KernelFormat::Vmlinux => {
            let summary = elf::inspect(image, abi::HIGH_MEMORY, ram_end)?;
            let entry = elf::load_vmlinux(memory, image)?;
            (None, entry.0, summary.load_end)
        }
        KernelFormat::Pvh { .. } => return Err(BootError::Load("a PVH kernel is not loaded through Linux's boot protocol".into())),
    };

    let max = zero_page::cmdline_max(header.as_ref()) as usize;
    let line = Cmdline::try_from(cmdline, max + 1).map_err(|_| BootError::CmdlineTooLong(cmdline.len()))?;
    let cmdline_len = line.as_cstring().map_err(|_| BootError::CmdlineNul)?.as_bytes().len();
    load_cmdline(memory, layout::CMDLINE, &line).map_err(|e| BootError::WriteMemory(e.to_string()))?;

    let initrd = match initrd_image {
        None => None,
        Some(bytes) => {
            let addr_max = match header {
                Some(h) if h.version >= 0x0203 => u64::from(h.initrd_addr_max),
                Some(_) => INITRD_ADDR_MAX_BEFORE_2_03,
                None => initrd::DEFAULT_INITRD_ADDR_MAX,
            };
            let size = bytes.len() as u64;
            let at = initrd::place(size, kernel_end, ram_end, addr_max)?;
            write(bytes, at)?;
            Some((at, size))
        }
    };

    let e820 = layout::e820_map(ram.size());
    // The ACPI tables are written by the caller ([`super::load_linux`]).
    let params = zero_page::build(&ZeroPageSpec { header, cmdline_addr: abi::CMDLINE, cmdline_len, initrd, e820: &e820, acpi_rsdp: Some(abi::ACPI_RSDP) })?;
    LinuxBootConfigurator::write_bootparams(&BootParams::new(&params, layout::ZERO_PAGE), memory).map_err(|e| BootError::WriteMemory(e.to_string()))?;
    write(&long_mode::gdt_bytes(), abi::LINUX_GDT)?;
    write(&long_mode::page_table_bytes(), abi::BOOT_PML4)?;
    Ok(LinuxEntry { rip, zero_page: abi::ZERO_PAGE, initrd, kernel_end })
}

/// Decompresses the kernel of the bzImage `image` ([`decompress`]) and
/// loads it as a vmlinux, below `ram_end`; returns the bzImage's setup
/// header (what the zero page carries, as for a vmlinux loaded by a boot
/// loader that has the bzImage: boot.rst, "64-bit Boot Protocol"), the
/// vmlinux's entry (`startup_64`) and the end of its footprint.
fn load_decompressed(memory: &GuestMemory, image: &[u8], ram_end: u64) -> Result<(Option<setup_header>, u64, u64), BootError> {
    let info = bzimage::parse(image)?;
    let payload = decompress::payload(image, &info)?;
    let started = std::time::Instant::now();
    // The vmlinux must fit in RAM from 1 MiB to the MMIO hole.
    let vmlinux = decompress::decompress(&payload, ram_end.saturating_sub(abi::HIGH_MEMORY))?;
    timeline::mark("decompress kernel");
    log::info!(
        "decompressed the bzImage's {} payload ({} bytes at {:#x}) to {} bytes in {:.1} ms",
        payload.compression,
        payload.bytes.len(),
        payload.offset,
        vmlinux.len(),
        started.elapsed().as_secs_f64() * 1e3
    );
    let summary = elf::inspect(&vmlinux, abi::HIGH_MEMORY, ram_end)?;
    let entry = elf::load_vmlinux(memory, &vmlinux)?;
    Ok((Some(info.header), entry.0, summary.load_end))
}

/// `KVM_PIT_SPEAKER_DUMMY` (KVM api.rst, KVM_CREATE_PIT2): port 0x61 (the
/// PC speaker and PIT channel 2 gate) is emulated in the kernel too.
const KVM_PIT_SPEAKER_DUMMY: u32 = 1;

/// Gives the VM what Linux expects of a PC: KVM's in-kernel interrupt
/// controllers (PIC, IOAPIC, one LAPIC per vCPU), unless a device made
/// them already, and the in-kernel PIT. Must come before the vCPU.
///
/// # Errors
/// [`VmError::Kvm`].
pub fn prepare_vm(vm: &Vm) -> Result<(), VmError> {
    if !vm.has_irqchip() {
        vm.create_irqchip()?;
    }
    let config = kvm_bindings::kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
    vm.fd().create_pit2(config).map_err(|source| VmError::Kvm { what: "KVM_CREATE_PIT2", source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::VmConfig;

    fn ram(mem: u64) -> GuestRam {
        GuestRam::new(&VmConfig { mem_size: mem, ..VmConfig::default() }).unwrap()
    }

    /// A fake bzImage whose protected-mode code is `code` bytes.
    fn bzimage(code: u32) -> Vec<u8> {
        let mut image = bzimage::tests::fake_bzimage(0x020f, linux_loader::loader::bootparam::XLF_KERNEL_64, code, 1024 + code as usize);
        image[1024..1024 + 4].copy_from_slice(b"CODE");
        image
    }

    fn read<T: vm_memory::ByteValued>(ram: &GuestRam, addr: u64) -> T {
        ram.memory().read_obj(GuestAddress(addr)).unwrap()
    }

    #[test]
    fn a_bzimage_is_loaded_at_1_mib_and_entered_0x200_in() {
        let ram = ram(256 << 20);
        let initrd = vec![0x5a; 10_000];
        let e = load(&ram, &bzimage(0x1000), KernelFormat::BzImage, KernelDecompress::Guest, Some(&initrd), "console=ttyS0").unwrap();
        assert_eq!(e.rip, 0x10_0200);
        assert_eq!(read::<[u8; 4]>(&ram, 0x10_0000), *b"CODE");
        let (at, size) = e.initrd.unwrap();
        assert_eq!((size, at % abi::PAGE_SIZE), (10_000, 0));
        assert!(at >= e.kernel_end && at + size <= 256 << 20);
        assert_eq!(read::<[u8; 4]>(&ram, at), [0x5a; 4]);
        let params: linux_loader::loader::bootparam::boot_params = read(&ram, abi::ZERO_PAGE);
        assert_eq!(({ params.hdr.ramdisk_image }, { params.hdr.ramdisk_size }), (at as u32, 10_000));
        assert_eq!({ params.hdr.cmd_line_ptr }, abi::CMDLINE as u32);
        assert_eq!(params.hdr.type_of_loader, 0xff);
        assert_eq!(usize::from(params.e820_entries), layout::e820_map(256 << 20).len());
        assert_eq!(&read::<[u8; 14]>(&ram, abi::CMDLINE), b"console=ttyS0\0");
    }

    /// A bzImage (the fake header, protocol 2.15) whose payload is a
    /// legacy LZ4 frame of a one-segment vmlinux: 16 bytes at 16 MiB,
    /// entered there.
    fn bzimage_with_vmlinux() -> Vec<u8> {
        let mut elf = vec![0u8; 64 + 56];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        elf[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        elf[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
        elf[24..32].copy_from_slice(&0x100_0000u64.to_le_bytes()); // e_entry
        elf[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        elf[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        elf[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
        let ph = 64;
        elf[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        elf[ph + 8..ph + 16].copy_from_slice(&120u64.to_le_bytes()); // p_offset
        for at in [16, 24] {
            elf[ph + at..ph + at + 8].copy_from_slice(&0x100_0000u64.to_le_bytes()); // p_vaddr, p_paddr
        }
        elf[ph + 32..ph + 40].copy_from_slice(&16u64.to_le_bytes()); // p_filesz
        elf[ph + 40..ph + 48].copy_from_slice(&0x1000u64.to_le_bytes()); // p_memsz
        elf.extend_from_slice(b"VMLINUX-SEGMENT!");
        let block = lz4_flex::block::compress(&elf);
        let mut payload = 0x184c_2102u32.to_le_bytes().to_vec();
        payload.extend_from_slice(&(block.len() as u32).to_le_bytes());
        payload.extend_from_slice(&block);
        payload.extend_from_slice(&(elf.len() as u32).to_le_bytes());
        let code = payload.len().next_multiple_of(16);
        let mut image = bzimage::tests::fake_bzimage(0x020f, linux_loader::loader::bootparam::XLF_KERNEL_64, code as u32, 1024 + code);
        image[1024..1024 + payload.len()].copy_from_slice(&payload);
        image[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes()); // payload_length
        image
    }

    #[test]
    fn a_bzimage_decompressed_by_the_vmm_is_entered_as_its_vmlinux_with_its_header() {
        let ram = ram(256 << 20);
        let initrd = vec![0x5a; 10_000];
        let e = load(&ram, &bzimage_with_vmlinux(), KernelFormat::BzImage, KernelDecompress::Vmm, Some(&initrd), "console=ttyS0").unwrap();
        assert_eq!(e.rip, 0x100_0000, "startup_64, the vmlinux's entry, not the bzImage's 0x200");
        assert_eq!(&read::<[u8; 16]>(&ram, 0x100_0000), b"VMLINUX-SEGMENT!");
        assert_eq!(e.kernel_end, 0x100_1000, "the vmlinux's footprint, not the decompressor's init_size");
        let params: linux_loader::loader::bootparam::boot_params = read(&ram, abi::ZERO_PAGE);
        // The bzImage's own header, with the loader's fields.
        assert_eq!(({ params.hdr.version }, { params.hdr.init_size }, { params.hdr.cmdline_size }), (0x020f, 0x400_0000, 2047));
        assert_eq!((params.hdr.type_of_loader, { params.hdr.cmd_line_ptr }), (0xff, abi::CMDLINE as u32));
        assert_eq!({ params.hdr.ramdisk_size }, 10_000);
        // The guest's way leaves the payload alone and enters at 0x200.
        let e = load(&ram, &bzimage_with_vmlinux(), KernelFormat::BzImage, KernelDecompress::Guest, None, "").unwrap();
        assert_eq!(e.rip, 0x10_0200);
    }

    #[test]
    fn a_kernel_whose_decompressor_needs_more_than_ram_does_not_fit() {
        // The fake header's init_size (64 MiB) from pref_address (16 MiB).
        let e = load(&ram(64 << 20), &bzimage(0x1000), KernelFormat::BzImage, KernelDecompress::Guest, None, "").unwrap_err();
        assert!(matches!(e, BootError::DoesNotFit { .. }), "{e}");
    }

    #[test]
    fn an_initrd_too_big_for_the_room_above_the_kernel_is_refused() {
        let initrd = vec![0u8; 200 << 20];
        let e = load(&ram(256 << 20), &bzimage(0x1000), KernelFormat::BzImage, KernelDecompress::Guest, Some(&initrd), "").unwrap_err();
        assert!(matches!(e, BootError::InitrdDoesNotFit { .. }), "{e}");
    }

    #[test]
    fn a_command_line_longer_than_the_kernel_takes_is_refused() {
        let long = "x".repeat(3000);
        let e = load(&ram(256 << 20), &bzimage(0x1000), KernelFormat::BzImage, KernelDecompress::Guest, None, &long).unwrap_err();
        assert!(matches!(e, BootError::CmdlineTooLong(3000)), "{e}");
    }
}
