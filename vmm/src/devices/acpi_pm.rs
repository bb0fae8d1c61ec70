//! The ACPI PM1 event and control registers the FADT points at
//! (`crate::boot::acpi`; ACPI 6.5 §4.8.3.1 and §4.8.3.2), at ports
//! `ACPI_PM1A_EVT` (status, then enable) and `ACPI_PM1A_CNT` (control).
//!
//! The platform raises no power-management event, so PM1 status always
//! reads 0 (its bits are write-1-to-clear: a write clears nothing that was
//! set) and the SCI never fires. PM1 enable holds what OSPM writes (ACPICA
//! enables the global-lock event there). PM1 control reads with `SCI_EN`
//! set, since the platform has no legacy mode to leave (the FADT's
//! `SMI_CMD` is 0), and keeps `SLP_TYP`; writing `SLP_EN` with the `\_S5`
//! sleep type powers the machine off, which ends the VM as a clean exit.
//! Registers are accessed a byte at a time: a 16-bit `out` is its two
//! bytes at consecutive ports.

use serde::{Deserialize, Serialize};

use memvisor_abi::ports;

use crate::boot::acpi::SLP_TYP_S5;

/// PM1 control bits (ACPI 6.5 §4.8.3.2.1, Table 4.13): `SCI_EN` bit 0,
/// `SLP_TYP` bits 12:10, `SLP_EN` bit 13 (write-only, reads 0).
const SCI_EN: u16 = 1 << 0;
const SLP_TYP_SHIFT: u16 = 10;
const SLP_TYP_MASK: u16 = 0b111 << SLP_TYP_SHIFT;
const SLP_EN: u16 = 1 << 13;

/// The registers that hold state, for snapshots.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcpiPmState {
    /// PM1 enable.
    pub enable: u16,
    /// PM1 control, without the bits that read as constants.
    pub control: u16,
}

/// What a write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PmAction {
    /// Nothing beyond the register.
    None,
    /// The guest entered S5: power off.
    PowerOff,
}

/// The PM1a event and control blocks.
#[derive(Debug, Default)]
pub struct AcpiPm {
    state: AcpiPmState,
}

/// Offsets in the six ports from `ACPI_PM1A_EVT`: status 0–1, enable 2–3,
/// control 4–5 (the control block follows the event block).
const ENABLE: u16 = 2;
const CONTROL: u16 = ports::ACPI_PM1A_CNT - ports::ACPI_PM1A_EVT;

impl AcpiPm {
    /// The device in a saved state.
    #[must_use]
    pub fn from_state(state: AcpiPmState) -> Self {
        AcpiPm { state: AcpiPmState { enable: state.enable, control: state.control & !(SCI_EN | SLP_EN) } }
    }

    /// Its state.
    #[must_use]
    pub fn state(&self) -> AcpiPmState {
        self.state
    }

    /// Whether `port` is one of the device's.
    #[must_use]
    pub fn decodes(port: u16) -> bool {
        (ports::ACPI_PM1A_EVT..ports::ACPI_PM1A_CNT + ports::ACPI_PM1_CNT_LEN).contains(&port)
    }

    /// Reads the byte at `port`.
    #[must_use]
    pub fn read(&self, port: u16) -> u8 {
        let offset = port.wrapping_sub(ports::ACPI_PM1A_EVT);
        let reg = match offset & !1 {
            ENABLE => self.state.enable,
            CONTROL => self.state.control | SCI_EN,
            _ => 0,
        };
        reg.to_le_bytes()[usize::from(offset & 1)]
    }

    /// Writes the byte `value` at `port`.
    pub fn write(&mut self, port: u16, value: u8) -> PmAction {
        let offset = port.wrapping_sub(ports::ACPI_PM1A_EVT);
        let reg = match offset & !1 {
            ENABLE => &mut self.state.enable,
            CONTROL => &mut self.state.control,
            // PM1 status: write 1 to clear, and nothing is ever set.
            _ => return PmAction::None,
        };
        let mut bytes = reg.to_le_bytes();
        bytes[usize::from(offset & 1)] = value;
        let new = u16::from_le_bytes(bytes);
        if offset & !1 != CONTROL {
            *reg = new;
            return PmAction::None;
        }
        *reg = new & !(SCI_EN | SLP_EN);
        let slp_typ = (new & SLP_TYP_MASK) >> SLP_TYP_SHIFT;
        if new & SLP_EN != 0 && slp_typ == u16::from(SLP_TYP_S5) { PmAction::PowerOff } else { PmAction::None }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CNT: u16 = ports::ACPI_PM1A_CNT;
    const EVT: u16 = ports::ACPI_PM1A_EVT;

    fn word(pm: &AcpiPm, port: u16) -> u16 {
        u16::from_le_bytes([pm.read(port), pm.read(port + 1)])
    }

    fn write_word(pm: &mut AcpiPm, port: u16, v: u16) -> PmAction {
        let [lo, hi] = v.to_le_bytes();
        let first = pm.write(port, lo);
        let second = pm.write(port + 1, hi);
        if first == PmAction::PowerOff { first } else { second }
    }

    #[test]
    fn status_reads_zero_and_sci_en_reads_set() {
        let mut pm = AcpiPm::default();
        assert_eq!(write_word(&mut pm, EVT, 0xffff), PmAction::None);
        assert_eq!(word(&pm, EVT), 0, "no event is ever pending");
        assert_eq!(word(&pm, CNT) & SCI_EN, SCI_EN, "always in ACPI mode");
        write_word(&mut pm, CNT, 0);
        assert_eq!(word(&pm, CNT), SCI_EN);
    }

    #[test]
    fn enable_keeps_what_the_guest_writes() {
        let mut pm = AcpiPm::default();
        write_word(&mut pm, EVT + 2, 0x0020);
        assert_eq!(word(&pm, EVT + 2), 0x0020, "GBL_EN");
        assert_eq!(AcpiPm::from_state(pm.state()).state(), pm.state());
    }

    #[test]
    fn slp_en_with_the_s5_type_powers_off_and_nothing_else_does() {
        let mut pm = AcpiPm::default();
        let s5 = u16::from(SLP_TYP_S5) << SLP_TYP_SHIFT;
        // Linux writes SLP_TYP first, then SLP_TYP | SLP_EN.
        assert_eq!(write_word(&mut pm, CNT, s5 | SCI_EN), PmAction::None);
        assert_eq!(word(&pm, CNT), s5 | SCI_EN, "SLP_TYP kept");
        assert_eq!(write_word(&mut pm, CNT, s5 | SLP_EN | SCI_EN), PmAction::PowerOff);
        assert_eq!(word(&pm, CNT) & SLP_EN, 0, "SLP_EN reads 0");
        let s3 = 3 << SLP_TYP_SHIFT;
        assert_eq!(write_word(&mut pm, CNT, s3 | SLP_EN), PmAction::None, "no other sleep state");
        assert!(AcpiPm::decodes(EVT) && AcpiPm::decodes(CNT + 1) && !AcpiPm::decodes(CNT + 2) && !AcpiPm::decodes(EVT - 1));
    }
}
