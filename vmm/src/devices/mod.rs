//! Emulated devices and the port-I/O and MMIO dispatch.
//!
//! The tiny guest needs only a UART, a debug-exit port and the message port
//! of the ABI; a VM started with `--balloon` also has a virtio-mmio balloon
//! ([`virtio`]); the ACPI PM1 registers ([`acpi_pm`]) are there for the
//! FADT's sake. Everything else a guest touches is logged once per address
//! and answered with all-ones, as an empty ISA bus would; nothing a guest
//! does here can stop the VMM.

pub mod acpi_pm;
pub mod i8042;
pub mod serial;
pub mod swap;
pub mod virtio;

use std::collections::HashSet;

use memvisor_abi::ports;

use serial::SerialConsole;
use virtio::balloon::Balloon;
use virtio::mmio::MmioTransport;

use crate::memory::GuestRam;

/// What the run loop must do after an I/O exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoAction {
    /// Nothing; resume the guest.
    Continue,
    /// The guest asked to end with this status.
    Exit(u32),
    /// The guest pulsed the reset line (i8042): it asked the machine to
    /// reset, which ends the VM.
    Reset,
    /// The guest sent a message at this guest-physical address.
    Message(u64),
    /// The guest asked the swap device to perform the request at this
    /// guest-physical address ([`swap::SwapDevice::handle`]).
    Swap(u64),
    /// The guest asked to start the application processor its
    /// `memvisor_abi::smp::ApStart` at this guest-physical address names.
    StartAp(u64),
    /// The guest entered the ACPI S5 state (soft off), which ends the VM.
    PowerOff,
}

/// Counters of accesses nobody handles.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct UnhandledStats {
    /// Port reads and writes to unhandled ports.
    pub port_accesses: u64,
    /// MMIO reads and writes to unhandled addresses.
    pub mmio_accesses: u64,
}

/// Saved device state.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DevicesState {
    /// COM1.
    pub uart: serial::UartState,
    /// The virtio balloon and its transport, when the VM has one. Absent
    /// in snapshots of VMs without one, which is every snapshot written
    /// before balloon state was saved (such VMs were refused then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<virtio::balloon::state::SavedBalloon>,
    /// The ACPI PM1 registers (absent in snapshots from before they
    /// existed: their reset state).
    #[serde(default)]
    pub acpi_pm: acpi_pm::AcpiPmState,
}

/// The devices of one VM.
#[derive(Debug)]
pub struct Devices {
    serial: SerialConsole,
    i8042: i8042::I8042,
    acpi_pm: acpi_pm::AcpiPm,
    /// The balloon, when the VM has one.
    pub balloon: Option<MmioTransport<Balloon>>,
    logged_ports: HashSet<u16>,
    logged_mmio: HashSet<u64>,
    unhandled: UnhandledStats,
    /// The paravirtual swap device (its store is not part of snapshots).
    pub swap: swap::SwapDevice,
}

/// Reads up to 4 little-endian bytes as a value.
fn le_value(data: &[u8]) -> u32 {
    data.iter().take(4).enumerate().fold(0u32, |v, (i, b)| v | (u32::from(*b) << (8 * i)))
}

impl Devices {
    /// Devices with the console writing to `console`.
    #[must_use]
    pub fn new(console: Box<dyn std::io::Write + Send>) -> Self {
        Devices {
            serial: SerialConsole::new(console),
            i8042: i8042::I8042::default(),
            acpi_pm: acpi_pm::AcpiPm::default(),
            balloon: None,
            logged_ports: HashSet::new(),
            logged_mmio: HashSet::new(),
            unhandled: UnhandledStats::default(),
            swap: swap::SwapDevice::default(),
        }
    }

    /// Devices restored from a snapshot, the console writing to `console`.
    /// The balloon, if any, is restored separately
    /// ([`virtio::balloon::state::restore`]: it needs guest RAM and an
    /// irqfd) and put in [`Devices::balloon`].
    ///
    /// # Errors
    /// A message when the saved state is invalid.
    pub fn from_state(state: &DevicesState, console: Box<dyn std::io::Write + Send>) -> Result<Self, String> {
        let mut d = Devices::new(Box::new(std::io::sink()));
        d.serial = SerialConsole::from_state(&state.uart, console)?;
        d.acpi_pm = acpi_pm::AcpiPm::from_state(state.acpi_pm);
        Ok(d)
    }

    /// Wires the UART's interrupt to `irqfd` (a VM with an in-kernel
    /// irqchip: GSI 4).
    pub fn connect_serial_irq(&self, irqfd: vmm_sys_util::eventfd::EventFd) {
        if !self.serial.connect_irq(irqfd) {
            log::warn!("the UART's interrupt line was connected already; kept the first");
        }
    }

    /// The devices' state, for a snapshot.
    #[must_use]
    pub fn state(&self) -> DevicesState {
        DevicesState { uart: self.serial.state(), balloon: self.balloon.as_ref().map(virtio::balloon::state::save), acpi_pm: self.acpi_pm.state() }
    }

    /// A port write.
    pub fn port_out(&mut self, port: u16, data: &[u8]) -> IoAction {
        match port {
            p if (ports::COM1..ports::COM1 + ports::COM1_LEN).contains(&p) => {
                for &b in data {
                    self.serial.write((p - ports::COM1) as u8, b);
                }
                IoAction::Continue
            }
            p if (ports::I8042_DATA..=ports::I8042_COMMAND).contains(&p) => {
                // Its registers are bytes; a wider access's upper bytes
                // belong to the next ports.
                let reset = data.first().is_some_and(|&b| self.i8042.write((p - ports::I8042_DATA) as u8, b));
                if reset { IoAction::Reset } else { IoAction::Continue }
            }
            p if acpi_pm::AcpiPm::decodes(p) => {
                let mut action = IoAction::Continue;
                for (port, &b) in (p..).zip(data).filter(|(port, _)| acpi_pm::AcpiPm::decodes(*port)) {
                    if self.acpi_pm.write(port, b) == acpi_pm::PmAction::PowerOff {
                        action = IoAction::PowerOff;
                    }
                }
                action
            }
            ports::DEBUG_EXIT => IoAction::Exit(le_value(data)),
            ports::MESSAGE if data.len() == 4 => IoAction::Message(u64::from(le_value(data))),
            ports::SWAP if data.len() == 4 => IoAction::Swap(u64::from(le_value(data))),
            ports::AP_START if data.len() == 4 => IoAction::StartAp(u64::from(le_value(data))),
            _ => {
                self.unhandled_port(port, "write");
                IoAction::Continue
            }
        }
    }

    /// A port read; fills `data`.
    pub fn port_in(&mut self, port: u16, data: &mut [u8]) {
        let byte = if (ports::COM1..ports::COM1 + ports::COM1_LEN).contains(&port) {
            Some(self.serial.read((port - ports::COM1) as u8))
        } else if (ports::I8042_DATA..=ports::I8042_COMMAND).contains(&port) {
            Some(self.i8042.read((port - ports::I8042_DATA) as u8))
        } else {
            None
        };
        if acpi_pm::AcpiPm::decodes(port) {
            // A wider access reads the registers' consecutive bytes.
            for (p, b) in (port..).zip(data.iter_mut()) {
                *b = if acpi_pm::AcpiPm::decodes(p) { self.acpi_pm.read(p) } else { 0xff };
            }
            return;
        }
        if let Some(v) = byte {
            data.fill(0);
            if let Some(b) = data.first_mut() {
                *b = v;
            }
        } else {
            self.unhandled_port(port, "read");
            data.fill(0xff);
        }
    }

    /// An MMIO read: the balloon's window, else all-ones.
    pub fn mmio_read(&mut self, addr: u64, data: &mut [u8]) {
        if let Some(b) = self.balloon.as_mut().filter(|b| b.contains(addr)) {
            b.read(addr, data);
            return;
        }
        self.unhandled_mmio(addr, "read");
        data.fill(0xff);
    }

    /// An MMIO write: the balloon's window, else dropped.
    pub fn mmio_write(&mut self, addr: u64, data: &[u8], ram: &GuestRam) {
        if let Some(b) = self.balloon.as_mut().filter(|b| b.contains(addr)) {
            b.write(addr, data, ram);
            return;
        }
        self.unhandled_mmio(addr, "write");
    }

    /// Whether a device saw the guest poll with nothing to do since the
    /// last call (the run loop then waits a little for host work).
    pub fn take_idle_hint(&mut self) -> bool {
        self.balloon.as_mut().is_some_and(MmioTransport::take_idle_hint)
    }

    /// Flushes the console.
    pub fn flush(&mut self) {
        self.serial.flush();
    }

    /// Counters of unhandled accesses.
    #[must_use]
    pub fn unhandled(&self) -> &UnhandledStats {
        &self.unhandled
    }

    fn unhandled_port(&mut self, port: u16, dir: &str) {
        self.unhandled.port_accesses += 1;
        if log_first(&mut self.logged_ports, port) {
            log::warn!("guest {dir} of unhandled I/O port {port:#x} (answered with all-ones; logged once)");
        }
    }

    fn unhandled_mmio(&mut self, addr: u64, dir: &str) {
        self.unhandled.mmio_accesses += 1;
        if log_first(&mut self.logged_mmio, addr) {
            log::warn!("guest {dir} of unhandled MMIO address {addr:#x} (answered with all-ones; logged once)");
        }
    }
}

/// Most unhandled addresses (ports, MMIO) remembered and logged: a guest
/// touching new addresses without end must not grow the VMM's memory or
/// its log without end; past this they are only counted.
const MAX_LOGGED_ADDRESSES: usize = 256;

/// Whether `addr` is new in `seen` and should be logged; once `seen` is
/// full, logs one last line saying so and then nothing.
fn log_first<T: std::hash::Hash + Eq>(seen: &mut HashSet<T>, addr: T) -> bool {
    if seen.len() >= MAX_LOGGED_ADDRESSES {
        return false;
    }
    if !seen.insert(addr) {
        return false;
    }
    if seen.len() == MAX_LOGGED_ADDRESSES {
        log::warn!("the guest touched {MAX_LOGGED_ADDRESSES} different unhandled addresses of one kind; further ones are counted, not logged");
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_exit_and_message_ports_decode_their_values() {
        let mut d = Devices::new(Box::new(std::io::sink()));
        assert_eq!(d.port_out(ports::DEBUG_EXIT, &[3, 0, 0, 0]), IoAction::Exit(3));
        assert_eq!(d.port_out(ports::MESSAGE, &[0, 0x10, 0, 0]), IoAction::Message(0x1000));
        // A byte-sized write to the message port is not a message.
        assert_eq!(d.port_out(ports::MESSAGE, &[1]), IoAction::Continue);
    }

    #[test]
    fn the_i8042_reset_command_resets_the_machine() {
        let mut d = Devices::new(Box::new(std::io::sink()));
        assert_eq!(d.port_out(ports::I8042_COMMAND, &[0xfe]), IoAction::Reset);
        assert_eq!(d.port_out(ports::I8042_DATA, &[0xfe]), IoAction::Continue);
        let mut status = [0xffu8];
        d.port_in(ports::I8042_COMMAND, &mut status);
        assert_eq!(status, [0], "no keyboard: the status port reads empty buffers");
        assert_eq!(d.unhandled().port_accesses, 0);
    }

    #[test]
    fn the_acpi_pm1_registers_answer_word_accesses_and_s5_powers_off() {
        let mut d = Devices::new(Box::new(std::io::sink()));
        let mut cnt = [0u8; 2];
        d.port_in(ports::ACPI_PM1A_CNT, &mut cnt);
        assert_eq!(cnt, [1, 0], "SCI_EN");
        let s5 = (u16::from(crate::boot::acpi::SLP_TYP_S5) << 10) | (1 << 13);
        assert_eq!(d.port_out(ports::ACPI_PM1A_CNT, &s5.to_le_bytes()), IoAction::PowerOff);
        let mut evt = [0xffu8; 4];
        d.port_in(ports::ACPI_PM1A_EVT, &mut evt);
        assert_eq!(evt, [0; 4]);
        assert_eq!(d.unhandled().port_accesses, 0);
    }

    #[test]
    fn unknown_ports_read_all_ones_and_are_counted() {
        let mut d = Devices::new(Box::new(std::io::sink()));
        let mut buf = [0u8; 2];
        d.port_in(0x1234, &mut buf);
        d.port_in(0x1234, &mut buf);
        assert_eq!(buf, [0xff, 0xff]);
        let mut m = [0u8; 4];
        d.mmio_read(0xd000_0000, &mut m);
        assert_eq!(m, [0xff; 4]);
        assert_eq!(d.unhandled().port_accesses, 2);
        assert_eq!(d.unhandled().mmio_accesses, 1);
    }

    #[test]
    fn a_guest_touching_endless_addresses_grows_only_a_counter() {
        let mut d = Devices::new(Box::new(std::io::sink()));
        let mut m = [0u8; 4];
        for i in 0..10_000u64 {
            d.mmio_read(0xd100_0000 + i * 8, &mut m);
        }
        assert_eq!(d.unhandled().mmio_accesses, 10_000);
        assert_eq!(d.logged_mmio.len(), MAX_LOGGED_ADDRESSES);
    }
}
