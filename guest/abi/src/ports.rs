//! I/O ports the guest uses to talk to the VMM.
//!
//! Port I/O, not MMIO, because an `out` is one instruction at ring 0 and one
//! exit to the VMM (on this project's reference host every ring-0
//! instruction is emulated, so short paths matter).

/// First 16550 UART (COM1), the guest's console. PC convention.
pub const COM1: u16 = 0x3f8;
/// Number of registers of a 16550 UART (offsets 0..=7).
pub const COM1_LEN: u16 = 8;
/// COM1's interrupt line: ISA IRQ 4, which the in-kernel IOAPIC has as
/// GSI 4 (PC convention; Linux's 8250 driver assumes it for 0x3f8).
pub const COM1_GSI: u32 = 4;

/// The i8042 keyboard controller's data port (PC convention).
pub const I8042_DATA: u16 = 0x60;
/// The i8042's command/status port; writing 0xfe (pulse the reset line)
/// resets the machine, which is how Linux reboots by default on a PC
/// (`reboot=k`).
pub const I8042_COMMAND: u16 = 0x64;

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

/// Writing a 32-bit guest-physical address here asks the VMM to start the
/// application processor an [`crate::smp::ApStart`] at that address names.
pub const AP_START: u16 = 0x620;

/// The ACPI PM1a event block: PM1 status (2 bytes, write 1 to clear) then
/// PM1 enable (2 bytes) (ACPI 6.5 §4.8.3.1). The FADT points here; ports
/// from `0x600` up are memvisor's own, none a PC device decodes.
pub const ACPI_PM1A_EVT: u16 = 0x640;
/// Length of the PM1a event block (FADT `PM1_EVT_LEN`).
pub const ACPI_PM1_EVT_LEN: u16 = 4;
/// The ACPI PM1a control block: PM1 control, 2 bytes (ACPI 6.5 §4.8.3.2).
pub const ACPI_PM1A_CNT: u16 = ACPI_PM1A_EVT + ACPI_PM1_EVT_LEN;
/// Length of the PM1a control block (FADT `PM1_CNT_LEN`).
pub const ACPI_PM1_CNT_LEN: u16 = 2;
/// The ACPI System Control Interrupt: ISA IRQ 9, GSI 9, as on PCs with a
/// PIIX4 or ICH power-management function (FADT `SCI_INT`). memvisor never
/// raises it: no PM1 event is ever pending.
pub const ACPI_SCI_GSI: u32 = 9;
