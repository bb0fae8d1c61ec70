//! memvisor: a small KVM hypervisor whose subject is memory.
//!
//! The layers, from the bottom:
//! - [`layout`] and [`config`]: the guest-physical map and the validated
//!   configuration (pure, unit-tested).
//! - [`memory`]: host mappings backing guest RAM, NUMA placement, memslots
//!   and the memory report.
//! - [`vm`] and [`vcpu`]: the KVM objects; [`boot`] loads the guest;
//!   [`kvm_stats`] reads what KVM counts for them.
//! - [`devices`]: the UART, the debug-exit and message ports, and the
//!   catch-all for accesses to nothing.
//! - [`vmm`]: the run loop; [`restore`]: starting a VM from snapshots;
//!   [`control`] and [`api`]: pause, resume and shutdown over a control
//!   socket.
//! - Benchmarks (`vmm bench`) live in [`bench`].

pub mod api;

pub mod boot;
pub mod bytes;
pub mod config;
pub mod control;
pub mod devices;
pub mod dirty;
pub mod fsutil;
pub mod guest_paging;
pub mod host;
pub mod kvm_stats;
pub mod layout;
pub mod machine;
pub mod memory;
pub mod migration;
pub mod observers;
pub mod ratelimit;
pub mod page_writer;
pub mod restore;
pub mod run_report;
pub mod seccomp;
pub mod signals;
pub mod size;
pub mod smp_report;
pub mod snapshot;
pub mod timeline;
pub mod translate;
pub mod unemulated;
pub mod vcpu;
pub mod vm;
pub mod vmm;
pub mod workload;
pub mod x86;

/// An error and its sources on one line ("cannot X: because Y"), each
/// source's text added only when the message does not already contain it.
#[must_use]
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let text = inner.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        src = inner.source();
    }
    s
}
