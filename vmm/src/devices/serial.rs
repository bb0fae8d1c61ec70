//! COM1: a 16550 UART from vm-superio, its output sent to a writer
//! (the terminal, or stderr when stdout carries JSON).

use std::io::Write;

use vm_superio::{Serial, Trigger};

/// The UART's interrupt line. memvisor has no interrupt controller for the
/// tiny guest (it polls), so the line goes nowhere.
#[derive(Debug, Default)]
pub struct NoInterrupt;

impl Trigger for NoInterrupt {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The console UART.
pub struct SerialConsole {
    uart: Serial<NoInterrupt, vm_superio::serial::NoEvents, Box<dyn Write + Send>>,
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
        SerialConsole { uart: Serial::new(NoInterrupt, out) }
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

    /// Flushes buffered output.
    pub fn flush(&mut self) {
        let _ = self.uart.writer_mut().flush();
    }
}
