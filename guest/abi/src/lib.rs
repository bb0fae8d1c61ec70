//! The contract between memvisor's VMM and its tiny guest kernel.
//!
//! Everything both sides must agree on lives here, once: the guest-physical
//! layout ([`layout`]), the I/O ports ([`ports`]), the guest-paging workloads'
//! policies, patterns and swap requests ([`paging`]), the boot configuration the
//! VMM writes before the first instruction ([`boot`]), the virtio-mmio
//! devices announced on the kernel command line ([`cmdline`]) and the
//! fixed-size report messages the guest sends back ([`msg`]).
//!
//! The crate is `no_std`, has no dependencies and contains no `unsafe` beyond
//! the [`Pod`] byte views, so the VMM can decode anything a (possibly hostile)
//! guest writes without trusting it.
#![no_std]

pub mod boot;
pub mod cmdline;
pub mod layout;
pub mod msg;
pub mod paging;
pub mod ports;
pub mod smp;
pub mod splitmix;
pub mod virtio;
pub mod workload;

/// Plain-old-data: a `#[repr(C)]` type with no padding-sensitive invariants,
/// valid for every bit pattern, so it can be viewed as and built from bytes.
///
/// # Safety
/// Implementors must be `#[repr(C)]`, contain only integer fields (or arrays
/// of them) and have no padding bytes.
pub unsafe trait Pod: Copy + Sized {
    /// The value's bytes, in memory order.
    fn as_bytes(&self) -> &[u8] {
        // SAFETY: `Pod` guarantees no padding, so every byte is initialised,
        // and the slice borrows `self` for its lifetime.
        unsafe { core::slice::from_raw_parts((self as *const Self).cast::<u8>(), size_of::<Self>()) }
    }

    /// Builds a value from the first `size_of::<Self>()` bytes, or `None` when
    /// `bytes` is too short.
    fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < size_of::<Self>() {
            return None;
        }
        // SAFETY: the length was checked above, `read_unaligned` copes with
        // any alignment, and `Pod` types are valid for every bit pattern.
        Some(unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast::<Self>()) })
    }
}
