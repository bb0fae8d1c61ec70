//! Devices announced on the kernel command line, as Linux reads them.
//!
//! A machine without ACPI or a device tree tells the kernel where its
//! virtio-mmio devices are with one word per device (Linux,
//! `Documentation/admin-guide/kernel-parameters.txt` and
//! `drivers/virtio/virtio_mmio.c`, `vm_cmdline_set`):
//!
//! ```text
//! virtio_mmio.device=<size>@<baseaddr>:<irq>[:<id>]
//! ```
//!
//! `<size>` is parsed like Linux's `memparse` (a C integer: `0x` hex, a
//! leading `0` octal, else decimal; then an optional `K`, `M`, `G`, `T`,
//! `P` or `E` suffix, either case), `<baseaddr>` like `%lli` (a C
//! integer), `<irq>` like `%u` (decimal, and never 0), `<id>` like `%d`;
//! nothing may follow. memvisor's VMM writes such words ([`VirtioMmioDevice`]'s
//! `Display`), QEMU's `microvm` machine appends its own
//! (`virtio_mmio.device=512@0xfeb02e00:47`), and the guest finds its
//! devices by parsing them. Pure and allocation-free: the guest kernel runs
//! this at ring 0 on its boot path.
//!
//! Words are separated by ASCII whitespace. Linux also lets a value be
//! quoted; no announcement needs quotes, so quoted words are not parsed.

use core::fmt;

/// The parameter name, with its `=`.
pub const VIRTIO_MMIO_DEVICE: &[u8] = b"virtio_mmio.device=";

/// One virtio-mmio device: its register window and its interrupt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VirtioMmioDevice {
    /// Guest-physical base of the register window.
    pub base: u64,
    /// Size of the window in bytes.
    pub size: u64,
    /// The interrupt line (on x86, the GSI: the IOAPIC input).
    pub irq: u32,
    /// Linux's platform device id, when given.
    pub id: Option<i32>,
}

/// Why a `virtio_mmio.device=` value was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnnouncementError {
    /// The size is missing, not a number, or too large.
    BadSize,
    /// No `@` and address after the size, or an address that is not a
    /// number or too large.
    BadAddress,
    /// No `:` and IRQ after the address, an IRQ that is not a decimal
    /// number, or IRQ 0 (Linux refuses it).
    BadIrq,
    /// Something after the IRQ that is not `:` and a decimal id.
    BadId,
    /// The window wraps around the end of the address space.
    Wraps,
}

/// A C integer as `strtoull(s, &end, 0)` reads it: `0x`/`0X` and hex
/// digits, a leading `0` and octal digits, or decimal. Returns the value
/// and the rest, or `None` when there is no digit or the value overflows.
fn c_integer(s: &[u8]) -> Option<(u64, &[u8])> {
    let (radix, digits) = match s {
        [b'0', b'x' | b'X', rest @ ..] if rest.first().is_some_and(u8::is_ascii_hexdigit) => (16, rest),
        [b'0', ..] => (8, s),
        _ => (10, s),
    };
    let mut value: u64 = 0;
    let mut used = 0;
    for &b in digits {
        let Some(d) = (b as char).to_digit(radix) else { break };
        value = value.checked_mul(u64::from(radix))?.checked_add(u64::from(d))?;
        used += 1;
    }
    (used > 0).then(|| (value, &digits[used..]))
}

/// Linux's `memparse`: a C integer with an optional binary suffix.
fn memparse(s: &[u8]) -> Option<(u64, &[u8])> {
    let (value, rest) = c_integer(s)?;
    let shift = match rest.first().map(u8::to_ascii_uppercase) {
        Some(b'K') => 10,
        Some(b'M') => 20,
        Some(b'G') => 30,
        Some(b'T') => 40,
        Some(b'P') => 50,
        Some(b'E') => 60,
        _ => return Some((value, rest)),
    };
    let scaled = value.checked_mul(1 << shift)?;
    Some((scaled, &rest[1..]))
}

/// A decimal number (`%u`); `None` without a digit or on overflow.
fn decimal(s: &[u8]) -> Option<(u32, &[u8])> {
    let used = s.iter().take_while(|b| b.is_ascii_digit()).count();
    if used == 0 {
        return None;
    }
    let mut value: u32 = 0;
    for &b in &s[..used] {
        value = value.checked_mul(10)?.checked_add(u32::from(b - b'0'))?;
    }
    Some((value, &s[used..]))
}

impl VirtioMmioDevice {
    /// Parses a value: the text after `virtio_mmio.device=`.
    ///
    /// # Errors
    /// [`AnnouncementError`]: which part is wrong.
    pub fn parse(value: &[u8]) -> Result<Self, AnnouncementError> {
        let (size, rest) = memparse(value).ok_or(AnnouncementError::BadSize)?;
        let rest = rest.strip_prefix(b"@").ok_or(AnnouncementError::BadAddress)?;
        let (base, rest) = c_integer(rest).ok_or(AnnouncementError::BadAddress)?;
        let rest = rest.strip_prefix(b":").ok_or(AnnouncementError::BadIrq)?;
        let (irq, rest) = decimal(rest).ok_or(AnnouncementError::BadIrq)?;
        if irq == 0 {
            return Err(AnnouncementError::BadIrq);
        }
        let id = match rest {
            [] => None,
            [b':', id @ ..] => {
                let (negative, digits) = match id {
                    [b'-', d @ ..] => (true, d),
                    d => (false, d),
                };
                match decimal(digits) {
                    Some((v, [])) => {
                        let v = i32::try_from(v).map_err(|_| AnnouncementError::BadId)?;
                        Some(if negative { -v } else { v })
                    }
                    _ => return Err(AnnouncementError::BadId),
                }
            }
            _ => return Err(AnnouncementError::BadId),
        };
        if size > 0 && base.checked_add(size - 1).is_none() {
            return Err(AnnouncementError::Wraps);
        }
        Ok(VirtioMmioDevice { base, size, irq, id })
    }

    /// The announcement in one command-line word: `None` when `word` is
    /// not a `virtio_mmio.device=` word, else what [`Self::parse`] makes of it.
    #[must_use]
    pub fn from_word(word: &[u8]) -> Option<Result<Self, AnnouncementError>> {
        word.strip_prefix(VIRTIO_MMIO_DEVICE).map(Self::parse)
    }
}

/// The word Linux reads: `virtio_mmio.device=4K@0xd0000000:5`. The size
/// takes the largest of the suffixes K, M and G that divides it exactly.
impl fmt::Display for VirtioMmioDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("virtio_mmio.device=")?;
        let suffix = [(30, "G"), (20, "M"), (10, "K")].into_iter().find(|&(shift, _)| self.size != 0 && self.size.trailing_zeros() >= shift);
        match suffix {
            Some((shift, s)) => write!(f, "{}{s}", self.size >> shift)?,
            None => write!(f, "{}", self.size)?,
        }
        write!(f, "@{:#x}:{}", self.base, self.irq)?;
        if let Some(id) = self.id {
            write!(f, ":{id}")?;
        }
        Ok(())
    }
}

/// The words of a command line (separated by ASCII whitespace).
pub fn words(line: &[u8]) -> impl Iterator<Item = &[u8]> {
    line.split(u8::is_ascii_whitespace).filter(|w| !w.is_empty())
}

/// Every well-formed `virtio_mmio.device=` announcement of `line`, in
/// command-line order; malformed ones are skipped (Linux refuses them too).
pub fn virtio_mmio_devices(line: &[u8]) -> impl Iterator<Item = VirtioMmioDevice> + '_ {
    words(line).filter_map(VirtioMmioDevice::from_word).filter_map(Result::ok)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::string::ToString;
    use std::vec::Vec;

    use super::*;

    fn dev(base: u64, size: u64, irq: u32, id: Option<i32>) -> VirtioMmioDevice {
        VirtioMmioDevice { base, size, irq, id }
    }

    #[test]
    fn linux_documentation_examples_parse() {
        // kernel-parameters.txt / virtio_mmio.c's own examples.
        assert_eq!(VirtioMmioDevice::parse(b"0x100@0x100b0000:48"), Ok(dev(0x100b_0000, 0x100, 48, None)));
        assert_eq!(VirtioMmioDevice::parse(b"1K@0x1001e000:74"), Ok(dev(0x1001_e000, 1024, 74, None)));
    }

    #[test]
    fn qemu_microvm_announcements_parse() {
        let line = b"console=ttyS0 virtio_mmio.device=512@0xfeb02e00:47 virtio_mmio.device=512@0xfeb02c00:46";
        let found: Vec<_> = virtio_mmio_devices(line).collect();
        assert_eq!(found, [dev(0xfeb0_2e00, 512, 47, None), dev(0xfeb0_2c00, 512, 46, None)]);
    }

    #[test]
    fn sizes_take_memparse_suffixes_in_either_case() {
        for (text, size) in [("4K", 4096), ("4k", 4096), ("2M", 2 << 20), ("1g", 1 << 30), ("1T", 1 << 40), ("1p", 1 << 50), ("1E", 1 << 60), ("0x1000", 4096), ("010", 8), ("0", 0)] {
            let value = std::format!("{text}@0xd0000000:5");
            assert_eq!(VirtioMmioDevice::parse(value.as_bytes()).map(|d| d.size), Ok(size), "{text}");
        }
    }

    #[test]
    fn addresses_are_c_integers() {
        for (text, base) in [("0xd0000000", 0xd000_0000), ("0XFEB00000", 0xfeb0_0000), ("3489660928", 0xd000_0000), ("0", 0)] {
            let value = std::format!("4K@{text}:5");
            assert_eq!(VirtioMmioDevice::parse(value.as_bytes()).map(|d| d.base), Ok(base), "{text}");
        }
    }

    #[test]
    fn the_optional_id_is_read() {
        assert_eq!(VirtioMmioDevice::parse(b"4K@0xd0000000:5:3"), Ok(dev(0xd000_0000, 4096, 5, Some(3))));
        assert_eq!(VirtioMmioDevice::parse(b"4K@0xd0000000:5:-1"), Ok(dev(0xd000_0000, 4096, 5, Some(-1))));
    }

    #[test]
    fn malformed_values_say_what_is_wrong() {
        use AnnouncementError::*;
        for (text, err) in [
            ("", BadSize),
            ("K@0xd0000000:5", BadSize),
            ("99999999999999999999@0x0:5", BadSize),
            ("16E@0x0:5", BadSize),
            ("4K", BadAddress),
            ("4K@", BadAddress),
            ("4K@zz:5", BadAddress),
            ("4K 0xd0000000:5", BadAddress),
            ("4K@0xd0000000", BadIrq),
            ("4K@0xd0000000:", BadIrq),
            ("4K@0xd0000000:0", BadIrq),
            ("4K@0xd0000000:0x5", BadIrq),
            ("4K@0xd0000000:5x", BadId),
            ("4K@0xd0000000:5:", BadId),
            ("4K@0xd0000000:5:1:2", BadId),
            ("4K@0xd0000000:5:99999999999", BadId),
            ("4K@0xfffffffffffff800:5", Wraps),
        ] {
            assert_eq!(VirtioMmioDevice::parse(text.as_bytes()), Err(err), "{text:?}");
        }
    }

    #[test]
    fn other_words_are_not_announcements() {
        assert_eq!(VirtioMmioDevice::from_word(b"console=ttyS0"), None);
        assert_eq!(VirtioMmioDevice::from_word(b"virtio_mmio.device"), None);
        assert_eq!(VirtioMmioDevice::from_word(b"virtio_mmio.device="), Some(Err(AnnouncementError::BadSize)));
        let line = b"virtio_mmio.device=bad\tvirtio_mmio.device=4K@0x1000:5\n";
        assert_eq!(virtio_mmio_devices(line).collect::<Vec<_>>(), [dev(0x1000, 4096, 5, None)], "malformed ones are skipped, tabs and newlines separate");
        assert_eq!(virtio_mmio_devices(b"").count(), 0);
    }

    #[test]
    fn display_writes_what_linux_parses() {
        assert_eq!(dev(0xd000_0000, 0x1000, 5, None).to_string(), "virtio_mmio.device=4K@0xd0000000:5");
        assert_eq!(dev(0xfeb0_2e00, 512, 47, None).to_string(), "virtio_mmio.device=512@0xfeb02e00:47");
        assert_eq!(dev(0x1_0000_0000, 2 << 20, 9, Some(2)).to_string(), "virtio_mmio.device=2M@0x100000000:9:2");
        assert_eq!(dev(0, 3 << 30, 1, None).to_string(), "virtio_mmio.device=3G@0x0:1");
        for d in [dev(0xd000_0000, 0x1000, 5, None), dev(0xfeb0_2e00, 512, 47, Some(-1)), dev(0x1000, 1536, 23, Some(7))] {
            let word = d.to_string();
            assert_eq!(VirtioMmioDevice::from_word(word.as_bytes()), Some(Ok(d)), "{word}");
        }
    }
}
