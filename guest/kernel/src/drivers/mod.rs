//! Device drivers: virtio-mmio ([`virtio_mmio`]) and the balloon on top of
//! it ([`balloon`], [`balloon_hostile`]). The kernel runs with interrupts
//! off and every queue notification is completed by the VMM before the
//! notifying write returns; to wait for the host the balloon driver polls,
//! or, asked to, halts until the device's interrupt ([`irq`]).

pub mod balloon;
pub mod balloon_hostile;
pub mod irq;
pub mod virtio_mmio;
