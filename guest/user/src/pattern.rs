//! The RAM pattern: every 8-byte word gets a value derived from its own
//! address, so a page that aliases another, a lost write or a stuck bit all
//! show up when the pattern is read back.

/// The value the word at `addr` holds while the pattern is in place.
#[inline(always)]
#[must_use]
pub const fn word_at(addr: u64) -> u64 {
    addr ^ 0xa5c3_5a3c_9669_0ff0
}

/// Writes the pattern over `len` bytes at `start`.
///
/// # Safety
/// `start..start + len` must be writable memory owned by the caller,
/// `start` 8-byte aligned and `len` a multiple of 8.
#[inline(always)]
pub unsafe fn fill(start: *mut u64, len: u64) {
    let mut p = start;
    let end = start.wrapping_byte_add(len as usize);
    while p < end {
        // SAFETY: p is inside the caller's range and aligned.
        unsafe { p.write_volatile(word_at(p as u64)) };
        p = p.wrapping_add(1);
    }
}

/// Reads the pattern back over `len` bytes at `start`, zeroing each word
/// after reading it (free RAM goes back to the allocator zero). Returns the
/// bytes that held the expected value.
///
/// # Safety
/// As for [`fill`].
#[inline(always)]
pub unsafe fn verify_and_zero(start: *mut u64, len: u64) -> u64 {
    let mut p = start;
    let end = start.wrapping_byte_add(len as usize);
    let mut good = 0u64;
    while p < end {
        // SAFETY: p is inside the caller's range and aligned.
        let v = unsafe { p.read_volatile() };
        good = good.wrapping_add(u64::from(v == word_at(p as u64)) * 8);
        // SAFETY: as above.
        unsafe { p.write_volatile(0) };
        p = p.wrapping_add(1);
    }
    good
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec;

    use super::*;

    #[test]
    fn pattern_round_trips_and_leaves_zeros() {
        let mut buf = vec![0u64; 1024];
        // SAFETY: the buffer is ours, aligned, 8 KiB long.
        unsafe { fill(buf.as_mut_ptr(), 8192) };
        assert!(buf.iter().all(|w| *w != 0));
        // SAFETY: as above.
        assert_eq!(unsafe { verify_and_zero(buf.as_mut_ptr(), 8192) }, 8192);
        assert!(buf.iter().all(|w| *w == 0));
    }

    #[test]
    fn a_corrupted_word_is_not_counted() {
        let mut buf = vec![0u64; 16];
        // SAFETY: the buffer is ours, aligned, 128 bytes long.
        unsafe { fill(buf.as_mut_ptr(), 128) };
        buf[3] ^= 1 << 17;
        // SAFETY: as above.
        assert_eq!(unsafe { verify_and_zero(buf.as_mut_ptr(), 128) }, 120);
    }
}
