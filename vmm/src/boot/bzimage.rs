//! The bzImage setup header: checking it before anything is loaded.
//!
//! All offsets and rules are from the Linux boot protocol,
//! Documentation/arch/x86/boot.rst ("The Real-Mode Kernel Header" and
//! "Details of Header Fields"). memvisor enters a bzImage at its 64-bit
//! entry (boot.rst, "64-bit Boot Protocol"), so it needs protocol 2.12 or
//! later with `XLF_KERNEL_64` set; the real-mode setup code is never run
//! and so never loaded. Loading itself is linux-loader's
//! (`linux_loader::loader::bzimage::BzImage`).

use linux_loader::loader::bootparam::{LOADED_HIGH, XLF_KERNEL_64, setup_header};
use vm_memory::ByteValued;

use crate::boot::BootError;
use crate::bytes::{u16_le, u32_le};

/// Offset of the setup header in the image and in the zero page (boot.rst:
/// the header starts at 0x1f1 with `setup_sects`).
pub const SETUP_HEADER_OFFSET: usize = 0x1f1;
/// Offset of the "HdrS" magic (boot.rst, `header` field).
pub const HDRS_OFFSET: usize = 0x202;
/// "HdrS" as the little-endian `u32` at [`HDRS_OFFSET`].
pub const HDRS_MAGIC: u32 = u32::from_le_bytes(*b"HdrS");
/// Offset of the protocol version (boot.rst, `version` field).
const VERSION_OFFSET: usize = 0x206;
/// Protocol 2.12 added `xloadflags` and with it `XLF_KERNEL_64`.
pub const MIN_PROTOCOL: u16 = 0x020c;
/// `setup_sects` 0 means 4 (boot.rst, "setup_sects").
const DEFAULT_SETUP_SECTS: u64 = 4;
/// Size of a sector, in which `setup_sects` counts.
const SECTOR: u64 = 512;
/// `syssize` counts 16-byte paragraphs (boot.rst, "syssize").
const PARAGRAPH: u64 = 16;
/// The 64-bit entry lies 0x200 bytes into the loaded protected-mode code
/// (boot.rst, "64-bit Boot Protocol").
pub const ENTRY_64_OFFSET: u64 = 0x200;

/// What memvisor needs to know about a bzImage.
#[derive(Debug, Clone, Copy)]
pub struct BzImageInfo {
    /// The setup header as the image carries it.
    pub header: setup_header,
    /// Bytes of the real-mode part (boot sector and setup): the
    /// protected-mode code follows them in the file.
    pub setup_size: u64,
    /// Bytes of protected-mode code the header announces (`syssize`).
    pub kernel_size: u64,
}

impl BzImageInfo {
    /// The protocol version as "major.minor".
    #[must_use]
    pub fn protocol(&self) -> String {
        let v = self.header.version;
        format!("{}.{:02}", v >> 8, v & 0xff)
    }

    /// One past the last byte the kernel needs in place when loaded at
    /// `load`: its decompressor works in `init_size` bytes from where it
    /// runs, which is `load` rounded up to `kernel_alignment`, and never
    /// below `pref_address` (boot.rst, "init_size" and "pref_address";
    /// arch/x86/boot/compressed/head_64.S does the same sums).
    #[must_use]
    pub fn footprint_end(&self, load: u64) -> u64 {
        let h = self.header;
        let align = u64::from(h.kernel_alignment).max(1);
        let run_at = load.div_ceil(align).saturating_mul(align).max(h.pref_address);
        run_at.saturating_add(u64::from(h.init_size)).max(load.saturating_add(self.kernel_size))
    }
}

/// Whether `image` carries the "HdrS" magic of a setup header.
#[must_use]
pub fn has_setup_header(image: &[u8]) -> bool {
    u32_le(image, HDRS_OFFSET) == Some(HDRS_MAGIC)
}

/// Reads and checks the setup header of `image`.
///
/// # Errors
/// [`BootError::BadBzImage`] when the header is missing, too old for a
/// 64-bit entry, or the file is shorter than the header says.
pub fn parse(image: &[u8]) -> Result<BzImageInfo, BootError> {
    let bad = |why: String| BootError::BadBzImage(why);
    if !has_setup_header(image) {
        return Err(bad("no \"HdrS\" magic at 0x202".into()));
    }
    let version = u16_le(image, VERSION_OFFSET).unwrap_or(0);
    let mut header = setup_header::default();
    let size = std::mem::size_of::<setup_header>();
    let bytes = image.get(SETUP_HEADER_OFFSET..SETUP_HEADER_OFFSET + size).ok_or_else(|| bad("the file ends inside the setup header".into()))?;
    header.as_mut_slice().copy_from_slice(bytes);
    if version < MIN_PROTOCOL {
        return Err(bad(format!("boot protocol {}.{:02} is older than 2.12, which a 64-bit entry needs", version >> 8, version & 0xff)));
    }
    let xloadflags = header.xloadflags;
    if xloadflags & XLF_KERNEL_64 == 0 {
        return Err(bad("the kernel has no 64-bit entry (XLF_KERNEL_64 is clear)".into()));
    }
    if header.loadflags & LOADED_HIGH == 0 {
        return Err(bad("not a bzImage: LOADED_HIGH is clear, the kernel wants to be loaded at 0x10000".into()));
    }
    let sects = match header.setup_sects {
        0 => DEFAULT_SETUP_SECTS,
        n => u64::from(n),
    };
    let setup_size = (sects + 1) * SECTOR;
    let kernel_size = u64::from(header.syssize) * PARAGRAPH;
    let need = setup_size + kernel_size;
    if (image.len() as u64) < need {
        return Err(bad(format!("truncated: the header announces {need} bytes, the file has {}", image.len())));
    }
    Ok(BzImageInfo { header, setup_size, kernel_size })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A fake bzImage: a setup header with `setup_sects` = 1 and
    /// `kernel` bytes of protected-mode code, `file_len` bytes long.
    pub(crate) fn fake_bzimage(version: u16, xloadflags: u16, kernel: u32, file_len: usize) -> Vec<u8> {
        let mut h = setup_header { setup_sects: 1, syssize: kernel / 16, header: HDRS_MAGIC, version, loadflags: LOADED_HIGH, xloadflags, ..Default::default() };
        h.kernel_alignment = 0x20_0000;
        h.pref_address = 0x100_0000;
        h.init_size = 0x400_0000;
        h.initrd_addr_max = 0x7fff_ffff;
        h.cmdline_size = 2047;
        h.code32_start = 0x10_0000;
        let mut image = vec![0u8; file_len.max(SETUP_HEADER_OFFSET + std::mem::size_of::<setup_header>())];
        image[SETUP_HEADER_OFFSET..SETUP_HEADER_OFFSET + std::mem::size_of::<setup_header>()].copy_from_slice(h.as_slice());
        image.truncate(file_len.max(HDRS_OFFSET + 4));
        image
    }

    #[test]
    fn a_64_bit_capable_header_is_accepted() {
        let info = parse(&fake_bzimage(0x020f, XLF_KERNEL_64, 0x1000, 1024 + 0x1000)).unwrap();
        assert_eq!((info.setup_size, info.kernel_size), (1024, 0x1000));
        assert_eq!(info.protocol(), "2.15");
    }

    #[test]
    fn old_protocols_32_bit_kernels_and_truncated_files_are_refused() {
        let e = parse(&fake_bzimage(0x020b, XLF_KERNEL_64, 0x1000, 1024 + 0x1000)).unwrap_err();
        assert!(e.to_string().contains("older than 2.12"), "{e}");
        let e = parse(&fake_bzimage(0x020f, 0, 0x1000, 1024 + 0x1000)).unwrap_err();
        assert!(e.to_string().contains("no 64-bit entry"), "{e}");
        let e = parse(&fake_bzimage(0x020f, XLF_KERNEL_64, 0x1000, 1024 + 0x800)).unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
        let e = parse(&fake_bzimage(0x020f, XLF_KERNEL_64, 0x1000, 0x300)).unwrap_err();
        assert!(e.to_string().contains("setup header") || e.to_string().contains("truncated"), "{e}");
        assert!(!has_setup_header(b"\x7fELF"));
    }

    #[test]
    fn the_footprint_covers_the_decompressor_buffer() {
        let info = parse(&fake_bzimage(0x020f, XLF_KERNEL_64, 0x1000, 1024 + 0x1000)).unwrap();
        // Loaded at 1 MiB, it runs at pref_address (16 MiB) with init_size after it.
        assert_eq!(info.footprint_end(0x10_0000), 0x100_0000 + 0x400_0000);
        // Loaded higher, it runs at the next kernel_alignment boundary.
        assert_eq!(info.footprint_end(0x210_0000), 0x220_0000 + 0x400_0000);
    }
}
