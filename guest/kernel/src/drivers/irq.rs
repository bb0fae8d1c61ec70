//! Taking the balloon's interrupt instead of polling: the LAPIC, the
//! IOAPIC redirection entry for the balloon's GSI, one IDT gate, and a wait
//! that halts until an interrupt arrives.
//!
//! The VMM's in-kernel irqchip (KVM_CREATE_IRQCHIP) delivers the irqfd as
//! an edge on the IOAPIC pin of the IRQ the command line announced with the
//! device (`virtio_mmio.device=SIZE@ADDR:IRQ`); this routes it as a fixed interrupt
//! to APIC 0 on [`VECTOR`], whose handler only acknowledges it (EOI): the
//! driver reads the device's interrupt status itself after waking. The
//! legacy PIC and LAPIC LINT0 are masked so nothing else arrives.

use core::arch::{asm, global_asm};

use memvisor_abi::layout::{IOAPIC_BASE, LAPIC_BASE};

use super::virtio_mmio::SetupError;
use crate::Kernel;

/// The balloon's interrupt vector (above the 32 exception vectors).
pub const VECTOR: u8 = 0x30;
/// The LAPIC's spurious-interrupt vector (same stub; it only EOIs).
const SPURIOUS: u8 = 0x31;
/// IOAPIC index/data registers and the first redirection entry
/// (82093AA datasheet §3.1, §3.2.4).
const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;
const IOAPICVER: u32 = 0x01;
const IOREDTBL: u32 = 0x10;
/// The 8259A PICs' data (mask) ports.
const PIC1_DATA: u16 = 0x21;
const PIC2_DATA: u16 = 0xa1;

global_asm!(
    r#"
    .global balloon_irq_entry
balloon_irq_entry:
    push rax
    mov eax, {eoi}
    mov dword ptr [rax], 0
    pop rax
    iretq
    "#,
    eoi = const crate::apic::EOI_ADDR,
);

unsafe extern "C" {
    fn balloon_irq_entry();
}

fn map_uncached(k: &mut Kernel, addr: u64) -> Result<(), SetupError> {
    crate::paging::map_mmio(&mut k.mapper, k.root, addr).map_err(|_| SetupError::NoMemory)
}

fn write32(addr: u64, v: u32) {
    // SAFETY: `addr` is a LAPIC or IOAPIC register, mapped by `enable`.
    unsafe { (addr as *mut u32).write_volatile(v) };
}

fn read32(addr: u64) -> u32 {
    // SAFETY: as for `write32`.
    unsafe { (addr as *const u32).read_volatile() }
}

fn set_gate(vector: u8, handler: u64) {
    // SAFETY: interrupts are off and nothing routes `vector` yet; the
    // handler EOIs and returns with iretq. IST 0: the interrupt arrives
    // only in the driver's `wait` (or in ring 3, onto RSP0), never on the
    // stack of code that uses the red zone.
    unsafe { crate::idt::set_gate(vector, handler, 0) };
}

/// Routes `gsi`, the balloon's, to [`VECTOR`] on this CPU.
///
/// # Errors
/// [`SetupError::NoMemory`] when the register pages cannot be mapped,
/// [`SetupError::NoIrqRoute`] when `gsi` is not one of the IOAPIC's pins
/// (QEMU's `microvm` puts its virtio IRQs on a second IOAPIC, GSI 24 up,
/// unless started with `ioapic2=off`).
pub fn enable(k: &mut Kernel, gsi: u32) -> Result<(), SetupError> {
    map_uncached(k, LAPIC_BASE)?;
    map_uncached(k, IOAPIC_BASE)?;
    // IOAPICVER bits 23:16: the highest redirection entry (82093AA §3.2.2).
    write32(IOAPIC_BASE + IOREGSEL, IOAPICVER);
    if gsi > (read32(IOAPIC_BASE + IOWIN) >> 16) & 0xff {
        return Err(SetupError::NoIrqRoute);
    }
    let handler = balloon_irq_entry as *const () as usize as u64;
    set_gate(VECTOR, handler);
    set_gate(SPURIOUS, handler);
    crate::io::outb(PIC1_DATA, 0xff);
    crate::io::outb(PIC2_DATA, 0xff);
    crate::apic::enable(SPURIOUS);
    // Low word: vector, fixed delivery, physical destination, edge, active
    // high, unmasked; high word: destination APIC 0.
    let index = IOREDTBL + 2 * gsi;
    write32(IOAPIC_BASE + IOREGSEL, index + 1);
    write32(IOAPIC_BASE + IOWIN, 0);
    write32(IOAPIC_BASE + IOREGSEL, index);
    write32(IOAPIC_BASE + IOWIN, u32::from(VECTOR));
    let _ = read32(IOAPIC_BASE + IOWIN);
    Ok(())
}

/// Halts until an interrupt arrives (`sti; hlt`: the instruction after
/// `sti` runs before any interrupt, so one raised since the caller last
/// looked wakes the `hlt` rather than being lost), then masks interrupts
/// again.
pub fn wait() {
    // SAFETY: the only enabled interrupt is ours, whose handler EOIs and
    // returns; IF is cleared again before returning.
    unsafe { asm!("sti", "hlt", "cli", options(nomem, nostack)) };
}
