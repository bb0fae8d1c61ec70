//! Which boot protocol a kernel image speaks, from its first bytes.
//!
//! The order is the (F): an ELF with a PVH entry note goes the PVH
//! way memvisor's own guest uses; a bzImage ("HdrS" at 0x202) and an ELF
//! without the note (a plain vmlinux) go through Linux's 64-bit boot
//! protocol with a zero page. Debian's vmlinux *has* the PVH note (Linux
//! with CONFIG_PVH), so it takes the PVH path unless the note is absent.

use crate::boot::{BootError, bzimage, elf};

/// A kernel image's boot protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// An ELF with a Xen PVH entry note (type 18): 32-bit entry, start info.
    Pvh {
        /// The PVH entry point.
        entry: u64,
    },
    /// A bzImage: loaded as linux-loader does, entered at its 64-bit entry.
    BzImage,
    /// An ELF without a PVH note: its segments loaded at their physical
    /// addresses, entered at its entry point in 64-bit mode (`startup_64`).
    Vmlinux,
}

impl KernelFormat {
    /// Whether this format boots through Linux's own boot protocol (zero page).
    #[must_use]
    pub fn is_linux_protocol(self) -> bool {
        !matches!(self, KernelFormat::Pvh { .. })
    }
}

impl std::fmt::Display for KernelFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KernelFormat::Pvh { entry } => write!(f, "ELF with a PVH entry at {entry:#x}"),
            KernelFormat::BzImage => f.write_str("bzImage"),
            KernelFormat::Vmlinux => f.write_str("ELF without a PVH note (vmlinux)"),
        }
    }
}

/// Tells the format of `image`. Pure; the image is checked further by
/// the loader of its format.
///
/// # Errors
/// [`BootError::NotAKernel`] when it is neither an ELF nor a bzImage.
pub fn detect(image: &[u8]) -> Result<KernelFormat, BootError> {
    if image.starts_with(b"\x7fELF") {
        return Ok(match elf::pvh_entry(image) {
            Some(entry) => KernelFormat::Pvh { entry },
            None => KernelFormat::Vmlinux,
        });
    }
    if bzimage::has_setup_header(image) {
        return Ok(KernelFormat::BzImage);
    }
    Err(BootError::NotAKernel)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bzimage_is_told_by_its_setup_header() {
        let image = bzimage::tests::fake_bzimage(0x020f, 1, 0x1000, 0x2000);
        assert_eq!(detect(&image).unwrap(), KernelFormat::BzImage);
        assert!(KernelFormat::BzImage.is_linux_protocol());
    }

    #[test]
    fn the_builtin_guest_is_pvh() {
        let f = detect(crate::boot::TINY_GUEST).unwrap();
        assert!(matches!(f, KernelFormat::Pvh { .. }), "{f}");
        assert!(!f.is_linux_protocol());
    }

    #[test]
    fn an_elf_without_a_note_is_a_vmlinux() {
        let mut image = crate::boot::TINY_GUEST.to_vec();
        // Rename every "Xen" note owner: the note is no longer a PVH entry.
        let mut i = 0;
        while let Some(pos) = image[i..].windows(4).position(|w| w == b"Xen\0") {
            image[i + pos..i + pos + 3].copy_from_slice(b"Nop");
            i += pos + 4;
        }
        assert_eq!(detect(&image).unwrap(), KernelFormat::Vmlinux);
    }

    #[test]
    fn anything_else_is_not_a_kernel() {
        assert!(matches!(detect(b"#!/bin/sh\necho hi\n"), Err(BootError::NotAKernel)));
        assert!(matches!(detect(&[]), Err(BootError::NotAKernel)));
    }
}
