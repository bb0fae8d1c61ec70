//! The pure, KVM-free core of the tiny guest's memory management.
//!
//! Nothing here touches hardware: page tables are read and written through
//! the [`paging::FrameMemory`] trait (or a `read_u64` closure for walks), and
//! the buddy allocator keeps its metadata in storage its caller provides. The
//! guest kernel plugs in its real memory; the unit tests plug in a fake one;
//! the VMM can reuse [`paging::walk`] to decode a guest's translations,
//! and [`replace::Sim`] to predict what the guest's page replacement does.
//! [`sync`] holds the spinlock and CPU sets the kernel shares between CPUs.
#![no_std]

pub mod buddy;
pub mod fault;
pub mod paging;
pub mod plan;
pub mod replace;
pub mod sync;
