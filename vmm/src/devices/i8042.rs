//! The i8042 keyboard controller, for its one job in a VM: the reset line.
//! A guest that writes 0xfe (pulse output port bit 0, the CPU reset line)
//! to the command port 0x64 asks the machine to reset; Linux does this to
//! reboot (`reboot=k`, its default on a PC), and memvisor ends the VM
//! cleanly, as Firecracker does. vm-superio's `I8042Device` decodes the
//! command; reads answer 0 (no keyboard, output buffer empty).

use std::cell::Cell;

use vm_superio::{I8042Device, Trigger};

/// Set when the guest pulsed the reset line.
#[derive(Debug, Default)]
pub struct ResetLine(Cell<bool>);

impl Trigger for ResetLine {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.set(true);
        Ok(())
    }
}

/// The controller at ports 0x60..=0x64.
#[derive(Debug)]
pub struct I8042(I8042Device<ResetLine>);

impl Default for I8042 {
    fn default() -> Self {
        I8042(I8042Device::new(ResetLine::default()))
    }
}

impl I8042 {
    /// A write at `offset` from port 0x60; whether it reset the machine.
    pub fn write(&mut self, offset: u8, value: u8) -> bool {
        // The trigger cannot fail.
        let _ = self.0.write(offset, value);
        self.0.reset_evt().0.replace(false)
    }

    /// A read at `offset` from port 0x60.
    pub fn read(&mut self, offset: u8) -> u8 {
        self.0.read(offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_reset_command_on_the_command_port_resets() {
        let mut k = I8042::default();
        assert!(!k.write(0, 0xfe), "0xfe on the data port is a keyboard byte");
        assert!(!k.write(4, 0xad), "another command");
        assert!(k.write(4, 0xfe));
        assert!(!k.write(4, 0xaa), "the line is reported once");
        assert_eq!(k.read(4), 0);
    }
}
