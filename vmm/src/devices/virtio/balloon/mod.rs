//! The virtio balloon: a guest gives memory back and the host really frees it.
//!
//! [`device`] speaks virtio (queues, configuration, statistics);
//! [`pages`] is the pure bookkeeping of which pages are in the balloon and
//! which host pages that frees; [`reclaim`] makes the system calls, on the
//! device's own thread ([`worker`], which also orders them against the
//! guest's deflates and snapshots);
//! [`stats`] parses the guest's statistics; [`metrics`] counts everything,
//! including every hostile input refused. docs/ballooning.md is the
//! user's guide.

pub mod device;
pub mod metrics;
pub mod pages;
pub mod reclaim;
pub mod state;
pub mod stats;
pub mod worker;

pub use device::{Balloon, BalloonInfo};
