//! Sending [`memvisor_abi::msg::Report`]s to the VMM.

use memvisor_abi::msg::Report;
use memvisor_abi::ports::{DEBUG_EXIT, MESSAGE};

use crate::io::outl;
use crate::percpu;

/// Sends one report to the VMM, from this CPU's own outbox (so CPUs report
/// without a lock: the VMM has read the message when `out` returns).
pub fn send(report: &Report) {
    let ptr = percpu::this().outbox.get();
    // SAFETY: only this CPU touches its outbox, and never from an interrupt
    // handler (none sends reports); the kernel is identity-mapped and below
    // 4 GiB, so the outbox's virtual address is the guest-physical address
    // the VMM reads.
    unsafe { ptr.write_volatile(report.encode()) };
    outl(MESSAGE, ptr as usize as u32);
}

/// Ends the VM with `status` as the VMM's exit status.
pub fn exit(status: u32) -> ! {
    outl(DEBUG_EXIT, status);
    loop {
        // SAFETY: hlt only waits; the VMM does not resume us after an exit.
        unsafe { core::arch::asm!("cli; hlt", options(nomem, nostack)) };
    }
}
