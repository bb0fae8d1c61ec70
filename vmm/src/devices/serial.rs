//! COM1: a 16550 UART from vm-superio, its output sent to a writer
//! (the terminal, or stderr when stdout carries JSON).

use std::io::Write;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};

/// The UART's interrupt line. The tiny guest polls and has no interrupt
/// controller, so there the line goes nowhere; a Linux guest's 8250 driver
/// sends output only when the transmitter-empty interrupt arrives, so its
/// VM connects the line to an irqfd on GSI 4, COM1's ISA IRQ
/// ([`SerialConsole::connect_irq`]).
#[derive(Debug, Default)]
pub struct SerialIrq(std::sync::OnceLock<vmm_sys_util::eventfd::EventFd>);

impl Trigger for SerialIrq {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        match self.0.get() {
            Some(fd) => fd.write(1),
            None => Ok(()),
        }
    }
}

/// The UART's saved registers (vm-superio's `SerialState`, which has no
/// serde support), in register order: DLL, DLM, IER, IIR, LCR, LSR, MCR,
/// MSR, SCR.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UartState {
    /// The nine registers.
    pub registers: [u8; 9],
    /// Bytes waiting in the receive FIFO.
    pub in_buffer: Vec<u8>,
}

/// The console UART.
pub struct SerialConsole {
    uart: Serial<SerialIrq, NoEvents, Box<dyn Write + Send>>,
}

impl std::fmt::Debug for SerialConsole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SerialConsole")
    }
}

impl SerialConsole {
    /// A UART writing to `out`.
    #[must_use]
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        SerialConsole { uart: Serial::new(SerialIrq::default(), out) }
    }

    /// Raises the UART's interrupts by writing `irqfd` (an irqfd on GSI 4,
    /// COM1's IRQ). Once only: a second call is ignored.
    pub fn connect_irq(&self, irqfd: vmm_sys_util::eventfd::EventFd) {
        if self.uart.interrupt_evt().0.set(irqfd).is_err() {
            log::warn!("the serial interrupt was connected already");
        }
    }

    /// A register write at `offset` (0..=7).
    pub fn write(&mut self, offset: u8, value: u8) {
        if let Err(e) = self.uart.write(offset, value) {
            log::warn!("serial output failed: {e:?}");
        }
    }

    /// A register read at `offset` (0..=7).
    pub fn read(&mut self, offset: u8) -> u8 {
        self.uart.read(offset)
    }

    /// The UART's registers, for a snapshot.
    #[must_use]
    pub fn state(&self) -> UartState {
        let s = self.uart.state();
        UartState {
            registers: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            in_buffer: s.in_buffer,
        }
    }

    /// A UART in the saved `state`, writing to `out`.
    ///
    /// # Errors
    /// A message when the state is invalid (e.g. an overfull FIFO).
    pub fn from_state(state: &UartState, out: Box<dyn Write + Send>) -> Result<Self, String> {
        let r = state.registers;
        let s = SerialState {
            baud_divisor_low: r[0],
            baud_divisor_high: r[1],
            interrupt_enable: r[2],
            interrupt_identification: r[3],
            line_control: r[4],
            line_status: r[5],
            modem_control: r[6],
            modem_status: r[7],
            scratch: r[8],
            in_buffer: state.in_buffer.clone(),
        };
        let uart = Serial::from_state(&s, SerialIrq::default(), NoEvents, out).map_err(|e| format!("invalid UART state: {e:?}"))?;
        Ok(SerialConsole { uart })
    }

    /// Flushes buffered output.
    pub fn flush(&mut self) {
        let _ = self.uart.writer_mut().flush();
    }
}
