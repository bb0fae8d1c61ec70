//! The driver of the VMM's paravirtual swap device: one request in kernel
//! memory, one port write, and the VMM has copied (or zeroed) the 4 KiB
//! frame natively before the `out` completes.
//!
//! Why a device and not a reserved guest-physical swap area: on a host that
//! emulates ring 0 one instruction at a time, copying a page at ring 0
//! costs ~580 µs (`rep movsq` runs one iteration per emulated step) and
//! zeroing one ~350 µs, while an exit to the VMM costs ~30 µs and the VMM
//! copies 4 KiB natively in well under a microsecond (docs/guest-paging.md).

use memvisor_abi::paging::{SWAP_STATUS_OK, SWAP_STATUS_PENDING, SwapOp, SwapRequest};
use memvisor_abi::ports::SWAP;

use crate::io::outl;
use crate::percpu;

/// The VMM refused a request (bad frame, slot or operation) or did not
/// answer (no swap device).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SwapIoError;

/// Performs one request: `op` on the frame at guest-physical `gpa` with
/// `slot` (a swap slot, or the source frame of [`SwapOp::Copy`]).
///
/// # Errors
/// [`SwapIoError`].
pub fn request(op: SwapOp, gpa: u64, slot: u64) -> Result<(), SwapIoError> {
    // Each CPU has its own request (in its per-CPU block), so CPUs need no
    // lock: the VMM is done with it when `out` returns.
    let r = percpu::this().swap.get();
    // SAFETY: this CPU's own request, never touched by an interrupt
    // handler; a static the kernel's identity map covers below 4 GiB, so
    // its address is the guest-physical address the VMM reads and writes.
    unsafe { r.write_volatile(SwapRequest { op: op as u32, status: SWAP_STATUS_PENDING, gpa, slot }) };
    outl(SWAP, r as usize as u32);
    // SAFETY: as above; the VMM wrote the status during the `out`.
    let status = unsafe { (&raw const (*r).status).read_volatile() };
    if status == SWAP_STATUS_OK { Ok(()) } else { Err(SwapIoError) }
}
