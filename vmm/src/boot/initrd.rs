//! Where the initrd goes: as high as possible in RAM below the MMIO hole,
//! page-aligned, its last byte at or below the kernel's `initrd_addr_max`,
//! clear of the kernel (boot.rst, "ramdisk_image" and "initrd_addr_max":
//! "the initrd should typically be located as high in memory as possible").

use crate::boot::BootError;
use crate::layout::abi::PAGE_SIZE;

/// `initrd_addr_max` of a kernel without a setup header (a plain vmlinux):
/// the value x86-64 kernels put in theirs (arch/x86/boot/header.S).
pub const DEFAULT_INITRD_ADDR_MAX: u64 = 0x7fff_ffff;

/// The guest-physical address for an initrd of `size` bytes.
///
/// - `kernel_end`: one past the kernel's footprint; the initrd starts at or
///   above it.
/// - `low_ram_end`: one past the last byte of RAM below the MMIO hole.
/// - `addr_max`: the kernel's `initrd_addr_max`, the highest address the
///   initrd's last byte may have.
///
/// # Errors
/// [`BootError::InitrdDoesNotFit`] when no page-aligned place exists.
pub fn place(size: u64, kernel_end: u64, low_ram_end: u64, addr_max: u64) -> Result<u64, BootError> {
    let no_room = || BootError::InitrdDoesNotFit { size, low: kernel_end, high: low_ram_end.min(addr_max.saturating_add(1)) };
    if size == 0 {
        return Err(no_room());
    }
    let top = low_ram_end.min(addr_max.saturating_add(1));
    let start = top.checked_sub(size).ok_or_else(no_room)? & !(PAGE_SIZE - 1);
    if start < kernel_end.next_multiple_of(PAGE_SIZE) {
        return Err(no_room());
    }
    Ok(start)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn the_initrd_goes_to_the_top_of_low_ram_page_aligned() {
        let at = place(2 * MIB + 5, 64 * MIB, 256 * MIB, DEFAULT_INITRD_ADDR_MAX).unwrap();
        assert_eq!(at % PAGE_SIZE, 0);
        assert!(at + 2 * MIB + 5 <= 256 * MIB);
        assert!(256 * MIB - (at + 2 * MIB + 5) < PAGE_SIZE, "as high as possible");
    }

    #[test]
    fn initrd_addr_max_caps_it_below_the_end_of_ram() {
        // 3 GiB of low RAM, a kernel that takes initrds up to 2 GiB - 1.
        let at = place(MIB, 64 * MIB, 3 << 30, DEFAULT_INITRD_ADDR_MAX).unwrap();
        assert_eq!(at + MIB, 2 << 30);
        // A kernel that takes them anywhere below 4 GiB: the hole caps it.
        let at = place(MIB, 64 * MIB, 3 << 30, u64::from(u32::MAX)).unwrap();
        assert_eq!(at + MIB, 3 << 30);
    }

    #[test]
    fn an_initrd_that_would_overlap_the_kernel_does_not_fit() {
        assert!(place(64 * MIB, 64 * MIB, 128 * MIB, DEFAULT_INITRD_ADDR_MAX).is_ok());
        let e = place(64 * MIB + 1, 64 * MIB, 128 * MIB, DEFAULT_INITRD_ADDR_MAX).unwrap_err();
        assert!(matches!(e, BootError::InitrdDoesNotFit { .. }), "{e}");
        assert!(place(256 * MIB, 64 * MIB, 128 * MIB, DEFAULT_INITRD_ADDR_MAX).is_err());
        assert!(place(0, 64 * MIB, 128 * MIB, DEFAULT_INITRD_ADDR_MAX).is_err());
    }

    #[test]
    fn a_kernel_end_inside_a_page_keeps_that_page_for_the_kernel() {
        // Exactly room for one page above a kernel ending mid-page.
        let end = 10 * PAGE_SIZE + 1;
        assert!(place(PAGE_SIZE, end, 12 * PAGE_SIZE, DEFAULT_INITRD_ADDR_MAX).is_ok());
        assert!(place(PAGE_SIZE, end, 11 * PAGE_SIZE + 100, DEFAULT_INITRD_ADDR_MAX).is_err());
    }
}
