//! The virtio-balloon device as both sides see it: the virtio-mmio
//! register offsets the guest driver uses, and the balloon's feature bits,
//! configuration layout and statistics tags. Where the device is, the guest
//! learns from the kernel command line ([`crate::cmdline`]).
//!
//! Numbers are from the virtio 1.2 specification (OASIS, "Virtual I/O
//! Device (VIRTIO) Version 1.2"): §4.2.2 for the MMIO registers (§4.2.4
//! for the legacy ones), §2.1 for the status bits, §5.5 for the balloon.
//! The VMM takes the transport's register offsets from `virtio-bindings`;
//! the `no_std` guest cannot, so they are repeated here for it (a unit test
//! in the VMM checks that the two agree).

/// virtio-mmio register offsets (§4.2.2, "MMIO Device Register Layout").
pub mod mmio {
    /// "virt" in little endian.
    pub const MAGIC_VALUE: u64 = 0x000;
    /// 2 for the modern (virtio 1.x) layout, 1 for the legacy one (§4.2.4).
    pub const VERSION: u64 = 0x004;
    /// Device type (5: balloon, §5).
    pub const DEVICE_ID: u64 = 0x008;
    /// Feature bits of the set chosen by `DEVICE_FEATURES_SEL`.
    pub const DEVICE_FEATURES: u64 = 0x010;
    /// Which 32 feature bits `DEVICE_FEATURES` shows.
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    /// Feature bits the driver accepts, of the set `DRIVER_FEATURES_SEL` chose.
    pub const DRIVER_FEATURES: u64 = 0x020;
    /// Which 32 feature bits `DRIVER_FEATURES` writes.
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    /// Legacy only (§4.2.4): the guest's page size, the unit of `QUEUE_PFN`.
    pub const GUEST_PAGE_SIZE: u64 = 0x028;
    /// Selects the queue the queue registers refer to.
    pub const QUEUE_SEL: u64 = 0x030;
    /// Largest size of the selected queue (0: no such queue).
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    /// Size of the selected queue.
    pub const QUEUE_NUM: u64 = 0x038;
    /// Legacy only: alignment of the selected queue's used ring.
    pub const QUEUE_ALIGN: u64 = 0x03c;
    /// Legacy only: page number of the selected queue (0: not in use).
    pub const QUEUE_PFN: u64 = 0x040;
    /// The selected queue is ready.
    pub const QUEUE_READY: u64 = 0x044;
    /// Writing a queue index notifies the device.
    pub const QUEUE_NOTIFY: u64 = 0x050;
    /// Bit 0: used buffer; bit 1: configuration change.
    pub const INTERRUPT_STATUS: u64 = 0x060;
    /// Acknowledges interrupt status bits.
    pub const INTERRUPT_ACK: u64 = 0x064;
    /// Device status (§2.1).
    pub const STATUS: u64 = 0x070;
    /// Descriptor table address, low 32 bits.
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    /// Descriptor table address, high 32 bits.
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    /// Available ring address, low.
    pub const QUEUE_AVAIL_LOW: u64 = 0x090;
    /// Available ring address, high.
    pub const QUEUE_AVAIL_HIGH: u64 = 0x094;
    /// Used ring address, low.
    pub const QUEUE_USED_LOW: u64 = 0x0a0;
    /// Used ring address, high.
    pub const QUEUE_USED_HIGH: u64 = 0x0a4;
    /// Changes whenever the configuration space changes.
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    /// Device-specific configuration space.
    pub const CONFIG: u64 = 0x100;
    /// `MAGIC_VALUE`'s value.
    pub const MAGIC: u32 = 0x7472_6976;
    /// Interrupt status: a used buffer was added.
    pub const INT_VRING: u32 = 1;
    /// Interrupt status: the configuration changed.
    pub const INT_CONFIG: u32 = 2;
}

/// Device status bits (§2.1).
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device needs a reset.
    pub const NEEDS_RESET: u32 = 64;
    /// The driver gave up.
    pub const FAILED: u32 = 128;
}

/// Device type of the balloon (§5, "Device Types").
pub const DEVICE_ID_BALLOON: u32 = 5;
/// `VIRTIO_F_VERSION_1` (§6): a modern device.
pub const F_VERSION_1: u64 = 1 << 32;
/// `VIRTIO_BALLOON_F_MUST_TELL_HOST` (§5.5.3): the driver tells the host
/// (deflates) before it uses a page from the balloon, and waits for the
/// deflate to be used.
pub const F_MUST_TELL_HOST: u64 = 1 << 0;
/// `VIRTIO_BALLOON_F_STATS_VQ` (§5.5.3): a statistics queue exists.
pub const F_STATS_VQ: u64 = 1 << 1;
/// `VIRTIO_BALLOON_F_DEFLATE_ON_OOM` (§5.5.3): the guest may deflate when
/// it runs out of memory.
pub const F_DEFLATE_ON_OOM: u64 = 1 << 2;
/// `VIRTIO_BALLOON_F_REPORTING` (§5.5.3): a free page reporting queue exists.
pub const F_REPORTING: u64 = 1 << 5;

/// Offset of `num_pages` (the host's target, 4 KiB pages) in the
/// configuration space (§5.5.4).
pub const CONFIG_NUM_PAGES: u64 = 0;
/// Offset of `actual` (pages the driver holds in the balloon).
pub const CONFIG_ACTUAL: u64 = 4;
/// Size of the configuration space memvisor exposes (`num_pages`,
/// `actual`, `free_page_hint_cmd_id`, `poison_val`).
pub const CONFIG_SIZE: u64 = 16;
/// The balloon's page size: PFNs are in 4 KiB units whatever the guest's
/// page size (§5.5.6).
pub const BALLOON_PAGE_SHIFT: u32 = 12;

/// Statistics tags (§5.5.6.3): each statistic is a `u16` tag then a `u64`
/// value, packed (10 bytes).
pub mod stat {
    /// Bytes swapped in.
    pub const SWAP_IN: u16 = 0;
    /// Bytes swapped out.
    pub const SWAP_OUT: u16 = 1;
    /// Major faults.
    pub const MAJFLT: u16 = 2;
    /// Minor faults.
    pub const MINFLT: u16 = 3;
    /// Free memory, bytes.
    pub const MEMFREE: u16 = 4;
    /// Total memory, bytes.
    pub const MEMTOT: u16 = 5;
    /// Available memory, bytes.
    pub const AVAIL: u16 = 6;
    /// Disk caches, bytes.
    pub const CACHES: u16 = 7;
    /// Huge page allocations.
    pub const HTLB_PGALLOC: u16 = 8;
    /// Failed huge page allocations.
    pub const HTLB_PGFAIL: u16 = 9;
    /// Size of one packed statistic.
    pub const ENTRY_SIZE: usize = 10;
}

/// Split virtqueue descriptor flags (§2.7.5).
pub mod desc {
    /// The buffer continues in the `next` descriptor.
    pub const F_NEXT: u16 = 1;
    /// Device-writable buffer.
    pub const F_WRITE: u16 = 2;
}
