//! Device drivers: virtio-mmio ([`virtio_mmio`]) and the balloon on top of
//! it ([`balloon`], [`balloon_hostile`]). They poll: the kernel runs with
//! interrupts off, and every queue notification is completed by the VMM
//! before the notifying write returns.

pub mod balloon;
pub mod balloon_hostile;
pub mod virtio_mmio;
