//! Loading the guest: the kernel image and the PVH boot data.
//!
//! memvisor boots ELF kernels with a PVH entry note (its own tiny guest, or
//! a Linux vmlinux built with CONFIG_PVH): the vCPU starts in 32-bit
//! protected mode with paging off at the PVH entry, `ebx` pointing at the
//! start info. The command line announces the VM's virtio-mmio devices
//! ([`cmdline`]).

pub mod cmdline;
pub mod elf;
pub mod pvh;

use std::path::{Path, PathBuf};

use thiserror::Error;
use vm_memory::GuestAddress;

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
    #[error("kernel command line of {0} bytes is too long (at most 4095, no NUL)")]
    CmdlineTooLong(usize),
    /// Too many memory-map entries.
    #[error("memory map of {0} entries does not fit its page")]
    TooManyMemmapEntries(usize),
    /// Guest memory write failed.
    #[error("cannot write boot data to guest memory: {0}")]
    WriteMemory(String),
}

/// Reads the kernel image: the file given, or the built-in tiny guest.
///
/// # Errors
/// [`BootError::ReadKernel`].
pub fn read_kernel(path: Option<&Path>) -> Result<std::borrow::Cow<'static, [u8]>, BootError> {
    match path {
        None => Ok(std::borrow::Cow::Borrowed(TINY_GUEST)),
        Some(p) => std::fs::read(p).map(std::borrow::Cow::Owned).map_err(|source| BootError::ReadKernel { path: p.to_path_buf(), source }),
    }
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
