//! virtio devices: the virtio-mmio transport ([`mmio`]) and the devices
//! behind it ([`balloon`]).
//!
//! A device implements [`VirtioDevice`]: it says what it offers (device
//! type, features, queue sizes, configuration space) and handles a
//! notified queue. The transport owns everything common: the status state
//! machine, feature negotiation, queue set-up with the `virtio-queue` crate,
//! interrupt status and the irqfd. Nothing a guest writes can make either
//! panic or touch host memory outside guest RAM: every guest value is
//! checked, and rejections are counted, not fatal.

pub mod balloon;
pub mod mmio;

use virtio_queue::Queue;

use crate::memory::GuestRam;

/// A device behind a virtio transport.
pub trait VirtioDevice: Send + std::fmt::Debug {
    /// The virtio device type (§5).
    fn device_id(&self) -> u32;
    /// Feature bits the device offers (including `VIRTIO_F_VERSION_1`).
    fn features(&self) -> u64;
    /// The driver accepted `features` (a subset of [`Self::features`]).
    fn ack_features(&mut self, features: u64);
    /// The features accepted so far (0 before `FEATURES_OK` and after a
    /// reset).
    fn acked_features(&self) -> u64;
    /// Largest size of each queue that exists with the acknowledged
    /// features, in queue-index order.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Reads configuration space from `offset`; bytes past its end read 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes configuration space (only driver-writable fields change).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver notified queue `index`; returns whether used buffers were
    /// added (so the guest should be interrupted).
    fn process_queue(&mut self, index: usize, queue: &mut Queue, ram: &GuestRam) -> bool;
    /// Whether the device has used buffers to hand back outside a
    /// notification (e.g. a statistics request); drained by the transport.
    fn pending_used(&mut self, queues: &mut [Queue], ram: &GuestRam) -> bool;
    /// The driver set or cleared `DRIVER_OK`.
    fn set_driver_ok(&mut self, ok: bool);
    /// The driver reset the device.
    fn reset(&mut self);
    /// The transport rejected something the driver did; counted by the
    /// device's metrics.
    fn transport_rejected(&mut self, what: TransportReject);
}

/// Driver mistakes the transport rejects (and counts through the device).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportReject {
    /// A queue size that is zero, above the maximum or not a power of two.
    BadQueueSize,
    /// A notification for a queue that does not exist or is not ready.
    BadNotify,
    /// A queue marked ready whose rings are not in guest RAM.
    BadQueueAddress,
    /// A register access of the wrong width or to an unknown offset.
    BadRegister,
    /// A device status write that clears a bit (other than a reset), sets
    /// bits out of §3.1.1's order, or sets a bit the driver may not set.
    BadStatus,
}
