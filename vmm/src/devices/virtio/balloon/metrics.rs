//! The balloon's counters: what it did and everything it refused.
//!
//! Every rejection of guest input has its own counter so that a test can
//! check that a hostile input was seen and refused, and the run report can
//! show it. Counters only grow (saturating); the `last_target_to_*` timings
//! start again from 0 at each target change.

use serde::{Deserialize, Serialize};

/// Device metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonMetrics {
    /// PFNs accepted into the balloon.
    pub inflated_pages: u64,
    /// PFNs taken out of the balloon.
    pub deflated_pages: u64,
    /// Host bytes released (`MADV_DONTNEED` or hole punching), in total.
    pub released_bytes: u64,
    /// Calls into the kernel to release memory.
    pub release_calls: u64,
    /// Nanoseconds spent in those calls.
    pub release_ns: u64,
    /// Nanoseconds spent handling inflate notifications on the vCPU
    /// thread: reading and checking PFNs and bookkeeping. The release
    /// calls run on the device's release thread and are not in it, unless
    /// the driver did not accept `VIRTIO_BALLOON_F_MUST_TELL_HOST` (then
    /// the notification waits for them).
    pub inflate_ns: u64,
    /// Nanoseconds from the last target change to the guest's first inflate
    /// notification after it (the guest's reaction: noticing the change,
    /// allocating, filling the PFN array).
    pub last_target_to_inflate_ns: u64,
    /// Nanoseconds from the last target change until the host pages of a
    /// balloon at least that big were released (the last release call of
    /// the inflate that got there returned); 0 until then.
    pub last_target_to_reclaimed_ns: u64,
    /// Nanoseconds from the last target change until the driver wrote an
    /// `actual` equal to it (for a deflate: the guest has taken its pages
    /// back, written and verified them); 0 until then.
    pub last_target_to_actual_ns: u64,
    /// Bytes the guest reported free (free page reporting).
    pub reported_bytes: u64,
    /// Host bytes released for free page reporting (part of `released_bytes`).
    pub reported_released_bytes: u64,
    /// Statistics buffers received.
    pub stats_updates: u64,
    /// Rejected: PFN beyond guest RAM.
    pub pfn_outside_ram: u64,
    /// Rejected: PFN inside the 32-bit MMIO hole.
    pub pfn_in_hole: u64,
    /// Rejected: PFN already in the balloon.
    pub duplicate_pfn: u64,
    /// Rejected: deflate of a PFN not in the balloon.
    pub deflate_not_in_balloon: u64,
    /// Pieces of huge host pages held back because the rest of the host
    /// page is not in the balloon (counted when they arrive).
    pub partial_host_page_pieces: u64,
    /// Rejected: a descriptor whose buffer is not inside guest RAM.
    pub descriptor_outside_ram: u64,
    /// Rejected: a descriptor of the wrong direction or length.
    pub descriptor_malformed: u64,
    /// Rejected, unread: PFNs beyond what one notification may carry (as
    /// many as guest RAM has pages; a driver has no more to give). Without
    /// this bound one notification of a full queue, each chain naming all
    /// of RAM as its PFN array, kept the device busy for minutes (found by
    /// the `balloon_queue` fuzz target).
    #[serde(default)]
    pub pfns_over_budget: u64,
    /// Rejected: a chain that loops, is longer than the queue or names a
    /// next descriptor beyond the table.
    pub chain_too_long: u64,
    /// Rejected: an available-ring entry whose head index is beyond the
    /// descriptor table, or whose head descriptor cannot be read.
    pub bad_head_descriptor: u64,
    /// Rejected: a queue size that is not a power of two (or too big).
    pub bad_queue_size: u64,
    /// Rejected: a notification for a missing or unready queue.
    pub bad_notify: u64,
    /// Rejected: queue rings outside guest RAM.
    pub bad_queue_address: u64,
    /// Rejected: register accesses of the wrong width or offset.
    pub bad_register: u64,
    /// Rejected: device status writes that clear a bit without resetting,
    /// or set bits out of order (virtio 1.2 §2.1.1, §3.1.1).
    pub bad_status: u64,
    /// Release calls the kernel refused (logged).
    pub release_errors: u64,
    /// Bytes of the release calls the kernel refused (not reclaimed).
    #[serde(default)]
    pub release_failed_bytes: u64,
}

impl BalloonMetrics {
    /// Every rejection counter summed (a quick "did anything go wrong").
    #[must_use]
    pub fn rejected(&self) -> u64 {
        self.pfn_outside_ram
            + self.pfn_in_hole
            + self.duplicate_pfn
            + self.deflate_not_in_balloon
            + self.descriptor_outside_ram
            + self.descriptor_malformed
            + self.pfns_over_budget
            + self.chain_too_long
            + self.bad_head_descriptor
            + self.bad_queue_size
            + self.bad_notify
            + self.bad_queue_address
            + self.bad_register
            + self.bad_status
    }
}

/// Adds one, saturating.
pub fn bump(counter: &mut u64) {
    *counter = counter.saturating_add(1);
}
