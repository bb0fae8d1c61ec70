//! Sending [`memvisor_abi::msg::Report`]s to the VMM.

use memvisor_abi::msg::{Message, Report};
use memvisor_abi::ports::{DEBUG_EXIT, MESSAGE};

use crate::io::outl;

/// The message being sent. One buffer suffices: the kernel is single-threaded
/// and the VMM has read the message when `out` returns.
static mut OUTBOX: Message = Message { kind: 0, arg: 0, data: [0; 7] };

/// Sends one report to the VMM.
pub fn send(report: &Report) {
    let ptr = &raw mut OUTBOX;
    // SAFETY: single-threaded kernel, no interrupts while writing; the
    // pointer is to a static. The kernel is identity-mapped and below 4 GiB,
    // so its virtual address is the guest-physical address the VMM reads.
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
