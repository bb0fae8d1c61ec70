//! Loading the guest: the kernel image and its boot data.
//!
//! [`format::detect`] tells how a kernel boots. ELF kernels with a PVH
//! entry note (memvisor's own tiny guest, or a Linux vmlinux built with
//! CONFIG_PVH) start in 32-bit protected mode with paging off at the PVH
//! entry, `ebx` pointing at the start info ([`pvh`]). A bzImage or an ELF
//! without the note goes through Linux's 64-bit boot protocol with a zero
//! page ([`linux`]). Boot files are read with a size bound ([`file`]). The
//! command line announces the VM's virtio-mmio devices ([`cmdline`]), and
//! the ACPI tables the CPUs and interrupt controllers ([`acpi`]).

pub mod acpi;
pub mod bzimage;
pub mod cmdline;
pub mod cpu;
pub mod decompress;
pub mod elf;
pub mod file;
pub mod format;
pub mod initrd;
pub mod linux;
pub mod long_mode;
pub mod pvh;
pub mod zero_page;

use std::path::{Path, PathBuf};

use thiserror::Error;
use vm_memory::GuestAddress;

use crate::config::KernelDecompress;
use crate::layout;
use crate::memory::GuestRam;

/// The built-in tiny guest, built from guest/kernel by vmm/build.rs.
pub static TINY_GUEST: &[u8] = include_bytes!(env!("MEMVISOR_GUEST_ELF"));

/// Errors loading a guest.
#[derive(Debug, Error)]
pub enum BootError {
    /// The kernel file could not be read.
    #[error("cannot read kernel {path}")]
    ReadKernel {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A boot file could not be opened or read.
    #[error("cannot read {which} {path}")]
    ReadFile {
        /// Kernel or initrd.
        which: file::BootFile,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A boot file is a directory, a device, a FIFO or a socket.
    #[error("{which} {path} is {what}, not a regular file")]
    NotRegularFile {
        /// Kernel or initrd.
        which: file::BootFile,
        /// The file.
        path: PathBuf,
        /// What it is instead.
        what: &'static str,
    },
    /// A boot file is empty.
    #[error("{which} {path} is empty")]
    FileEmpty {
        /// Kernel or initrd.
        which: file::BootFile,
        /// The file.
        path: PathBuf,
    },
    /// A boot file is larger than its bound.
    #[error("{which} {path} has {size} bytes, more than {what} ({limit} bytes)")]
    FileTooLarge {
        /// Kernel or initrd.
        which: file::BootFile,
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The bound it exceeds.
        limit: u64,
        /// What the bound is.
        what: &'static str,
    },
    /// Neither an ELF nor a bzImage.
    #[error("kernel is not an x86-64 ELF executable (no ELF magic) nor a bzImage (no \"HdrS\" at 0x202)")]
    NotAKernel,
    /// A bzImage whose setup header memvisor cannot boot.
    #[error("kernel is not a bootable bzImage: {0}")]
    BadBzImage(String),
    /// An initrd for a kernel that takes none here.
    #[error("an initrd needs a kernel booted through Linux's boot protocol (a bzImage or a vmlinux); this one is {0}")]
    InitrdNotSupported(String),
    /// No room for the initrd.
    #[error("initrd of {size} bytes does not fit between the kernel's end {low:#x} and {high:#x} (the end of RAM below the MMIO hole, or the kernel's initrd_addr_max)")]
    InitrdDoesNotFit {
        /// Its size.
        size: u64,
        /// Lowest address it may start at.
        low: u64,
        /// One past the highest address it may end at.
        high: u64,
    },
    /// The command line holds a NUL byte.
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    /// Not an ELF file.
    #[error("kernel is not an x86-64 ELF executable: {0}")]
    NotElf(String),
    /// An ELF for another architecture or class.
    #[error("kernel is not an x86-64 ELF executable: {0}")]
    WrongArch(String),
    /// The image does not fit in guest RAM.
    #[error("kernel does not fit in guest RAM: it spans {start:#x}..{end:#x}, RAM below the MMIO hole ends at {ram_end:#x}")]
    DoesNotFit {
        /// Lowest load address.
        start: u64,
        /// One past the highest.
        end: u64,
        /// Where usable RAM ends.
        ram_end: u64,
    },
    /// No PVH entry.
    #[error("kernel has no usable entry: no PVH entry note (Xen ELF note 18, XEN_ELFNOTE_PHYS32_ENTRY)")]
    NoPvhEntry,
    /// linux-loader failed.
    #[error("cannot load kernel: {0}")]
    Load(String),
    /// The command line is too long.
    #[error("kernel command line of {0} bytes is too long for this kernel (PVH: at most 4095; Linux boot protocol: the kernel's cmdline_size, 2047 for a vmlinux)")]
    CmdlineTooLong(usize),
    /// Too many memory-map entries.
    #[error("memory map of {0} entries does not fit its page")]
    TooManyMemmapEntries(usize),
    /// The bzImage's payload could not be found or decompressed.
    #[error("cannot decompress the bzImage's kernel")]
    Decompress(#[from] decompress::DecompressError),
    /// The ACPI tables cannot be built.
    #[error("cannot build the ACPI tables: {0}")]
    Acpi(String),
    /// Guest memory write failed.
    #[error("cannot write boot data to guest memory: {0}")]
    WriteMemory(String),
    /// Setting up the VM or vCPU for the kernel failed.
    #[error(transparent)]
    Vm(#[from] crate::vm::VmError),
}

/// Reads the kernel image: the file given (a regular file of at most
/// [`file::KERNEL_MAX`] bytes, checked before reading), or the built-in
/// tiny guest.
///
/// # Errors
/// The errors of [`file::read_bounded`].
pub fn read_kernel(path: Option<&Path>) -> Result<std::borrow::Cow<'static, [u8]>, BootError> {
    match path {
        None => Ok(std::borrow::Cow::Borrowed(TINY_GUEST)),
        Some(p) => file::read_bounded(file::BootFile::Kernel, p, file::KERNEL_MAX, file::KERNEL_MAX).map(std::borrow::Cow::Owned),
    }
}

/// Reads an initrd for a guest with `mem_size` bytes of RAM: a regular
/// file of at most [`file::INITRD_MAX`] bytes that fits in RAM below the
/// MMIO hole, checked before reading.
///
/// # Errors
/// The errors of [`file::read_bounded`].
pub fn read_initrd(path: &Path, mem_size: u64) -> Result<Vec<u8>, BootError> {
    let room = layout::ram_ranges(mem_size).first().map_or(0, |r| r.size);
    file::read_bounded(file::BootFile::Initrd, path, file::INITRD_MAX, room)
}

/// Loads `image` for Linux's 64-bit boot protocol when it is a bzImage or a
/// vmlinux without a PVH note (a bzImage decompressed as `decompress`
/// says): loads it with `initrd` and `cmdline`
/// ([`linux::load`]), writes the ACPI tables of `cpus` vCPUs
/// ([`acpi::write`]), gives the VM its in-kernel irqchip and PIT and
/// returns the 64-bit entry, at which the caller creates vCPU 0
/// (`crate::vcpu::create_linux`) and the others
/// (`crate::vcpu::create_linux_ap`). Returns `None` for a PVH kernel, which
/// the caller loads with [`load_kernel`].
///
/// # Errors
/// Any [`BootError`]; [`BootError::InitrdNotSupported`] for an initrd
/// with a PVH kernel.
pub fn load_linux(vm: &crate::vm::Vm, image: &[u8], decompress: KernelDecompress, initrd: Option<&Path>, cmdline: &str, cpus: u32) -> Result<Option<linux::LinuxEntry>, BootError> {
    let format = format::detect(image)?;
    if !format.is_linux_protocol() {
        return match initrd {
            Some(_) => Err(BootError::InitrdNotSupported(format.to_string())),
            None => Ok(None),
        };
    }
    let initrd_bytes = initrd.map(|p| read_initrd(p, vm.ram().size())).transpose()?;
    let entry = linux::load(vm.ram(), image, format, decompress, initrd_bytes.as_deref(), cmdline)?;
    acpi::write(vm.ram().memory(), cpus)?;
    log::info!("booting a {format} at {:#x}, zero page at {:#x}, initrd {:x?}", entry.rip, entry.zero_page, entry.initrd);
    linux::prepare_vm(vm)?;
    Ok(Some(entry))
}

/// Checks and loads `image` and returns its PVH entry. The boot data is
/// written separately ([`pvh::write_boot_data`]).
///
/// # Errors
/// Any [`BootError`] about the image.
pub fn load_kernel(ram: &GuestRam, image: &[u8]) -> Result<GuestAddress, BootError> {
    // The image must sit in the first RAM range, from 1 MiB.
    let ram_end = layout::ram_ranges(ram.size()).first().map_or(0, |r| r.end().0);
    elf::inspect(image, layout::abi::HIGH_MEMORY, ram_end)?;
    elf::load(ram.memory(), image)
}
