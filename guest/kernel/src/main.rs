//! memvisor's tiny guest kernel.
//!
//! Entered the PVH way (see [`boot`]), it reports to the VMM through the ABI
//! in `memvisor-abi`.
#![no_std]
#![no_main]

mod boot;
mod console;
mod io;
mod report;
mod rt;

use memvisor_abi::msg::Report;

/// The first Rust code: called by the PVH entry in long mode with the boot
/// page tables, on the boot stack, with the start-info address.
#[unsafe(no_mangle)]
pub extern "C" fn kernel_main(start_info: u64) -> ! {
    report::send(&Report::Hello { tsc: io::rdtsc() });
    println!("memvisor guest: hello (start info at {start_info:#x})");
    report::exit(0)
}
