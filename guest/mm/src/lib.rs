//! The pure, KVM-free core of the tiny guest's memory management.
//!
//! Nothing here touches hardware: page tables are read and written through
//! the [`paging::FrameMemory`] trait (or a `read_u64` closure for walks), and
//! the buddy allocator keeps its metadata in storage its caller provides. The
//! guest kernel plugs in its real memory; the unit tests plug in a fake one;
//! the VMM can reuse [`paging::walk`] to decode a guest's translations.
#![no_std]

pub mod buddy;
pub mod paging;
pub mod plan;
