//! Reading little-endian integers out of untrusted byte buffers (ELF
//! headers, KVM's binary statistics, snapshot chunk tables): `None` when
//! the field does not lie wholly inside the buffer, never a panic.

/// The `u16` at `at`.
#[must_use]
pub fn u16_le(bytes: &[u8], at: usize) -> Option<u16> {
    bytes.get(at..at.checked_add(2)?)?.try_into().ok().map(u16::from_le_bytes)
}

/// The `u32` at `at`.
#[must_use]
pub fn u32_le(bytes: &[u8], at: usize) -> Option<u32> {
    bytes.get(at..at.checked_add(4)?)?.try_into().ok().map(u32::from_le_bytes)
}

/// The `u64` at `at`.
#[must_use]
pub fn u64_le(bytes: &[u8], at: usize) -> Option<u64> {
    bytes.get(at..at.checked_add(8)?)?.try_into().ok().map(u64::from_le_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_inside_the_buffer_are_read_and_others_are_none() {
        let b = [1u8, 0, 0, 0, 0, 0, 0, 0, 2];
        assert_eq!(u16_le(&b, 0), Some(1));
        assert_eq!(u32_le(&b, 0), Some(1));
        assert_eq!(u64_le(&b, 0), Some(1));
        assert_eq!(u64_le(&b, 1), Some(2 << 56));
        assert_eq!(u64_le(&b, 2), None);
        assert_eq!(u32_le(&b, usize::MAX), None, "no overflow on wild offsets");
    }
}
