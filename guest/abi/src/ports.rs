//! I/O ports the guest uses to talk to the VMM.
//!
//! Port I/O, not MMIO, because an `out` is one instruction at ring 0 and one
//! exit to the VMM (on this project's reference host every ring-0
//! instruction is emulated, so short paths matter).

/// First 16550 UART (COM1), the guest's console. PC convention.
pub const COM1: u16 = 0x3f8;
/// Number of registers of a 16550 UART (offsets 0..=7).
pub const COM1_LEN: u16 = 8;
/// COM1's interrupt: ISA IRQ 4 (PC convention), GSI 4 in KVM's default
/// routing, which wires GSIs 0-15 to both the PIC and the IOAPIC.
pub const COM1_GSI: u32 = 4;

/// The i8042 keyboard controller's command port (PC convention). Writing
/// 0xfe ([`I8042_RESET`]) pulses the CPU reset line: Linux's `reboot=k`
/// (and its fallback after ACPI) restarts the machine this way.
pub const I8042_COMMAND: u16 = 0x64;
/// The i8042 command "pulse output line 0" (the reset line).
pub const I8042_RESET: u8 = 0xfe;

/// Writing a 32-bit value here ends the VM with that value as the exit
/// status. (QEMU's `isa-debug-exit` lives at the same port; memvisor does not
/// apply QEMU's `(v << 1) | 1` encoding.)
pub const DEBUG_EXIT: u16 = 0xf4;

/// Writing a 32-bit guest-physical address here hands the VMM one
/// [`crate::msg::Message`] stored at that address.
pub const MESSAGE: u16 = 0x600;

/// Writing a 32-bit guest-physical address here hands the VMM one
/// [`crate::paging::SwapRequest`] stored at that address (the paravirtual
/// swap device of the guest-paging workloads).
pub const SWAP: u16 = 0x610;
