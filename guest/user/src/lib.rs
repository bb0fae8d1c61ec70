//! Ring-3 code of memvisor's tiny guest.
//!
//! Everything here runs in user mode (the kernel's linker script places this
//! crate's code in the user-accessible `.user` section), so it must never call
//! into kernel-only code: no panics, no bounds-checked indexing, no calls to
//! `memcpy`/`memset` (the kernel provides those, at ring 0 addresses). Loops
//! use raw pointers and wrapping arithmetic for that reason. The pure parts
//! ([`pattern`], [`versioned`]) are ordinary functions the VMM can also run natively.
//!
//! [`args`] is the layout the kernel hands a task; [`sys`] the system-call
//! numbers and the two ways of entering the kernel; [`entry`] the task entry
//! points.
#![no_std]

pub mod args;
pub mod balloon;
pub mod entry;
pub mod paging;
pub mod pattern;
pub mod shootdown;
pub mod sys;
pub mod translation;
pub mod versioned;
pub mod workloads;
