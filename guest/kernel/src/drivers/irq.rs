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

use memvisor_abi::layout::{IOAPIC_BASE, LAPIC_BASE, PAGE_SIZE};
use memvisor_guest_mm::paging::{MapError, PageSize, PageTableEntry as Pte, PhysAddr, VirtAddr};

use super::virtio_mmio::SetupError;
use crate::Kernel;
use crate::gdt::KERNEL_CS;

/// The balloon's interrupt vector (above the 32 exception vectors).
pub const VECTOR: u8 = 0x30;
/// The LAPIC's spurious-interrupt vector (same stub; it only EOIs).
const SPURIOUS: u8 = 0x31;
/// LAPIC registers (SDM Vol. 3A §11.4.1, Table 11-1).
const LAPIC_EOI: u64 = 0xb0;
const LAPIC_SVR: u64 = 0xf0;
const LAPIC_LVT_LINT0: u64 = 0x350;
const LAPIC_LVT_LINT1: u64 = 0x360;
/// SVR bit 8: APIC software enable; LVT bit 16: masked.
const SVR_ENABLE: u32 = 1 << 8;
const LVT_MASKED: u32 = 1 << 16;
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
    eoi = const LAPIC_BASE + LAPIC_EOI,
);

unsafe extern "C" {
    fn balloon_irq_entry();
}

fn map_uncached(k: &mut Kernel, addr: u64) -> Result<(), SetupError> {
    let va = VirtAddr::new(addr).ok_or(SetupError::NoMemory)?;
    let pa = PhysAddr::new(addr).ok_or(SetupError::NoMemory)?;
    match k.mapper.map_range(k.root, va, pa, PAGE_SIZE, PageSize::Size4K, Pte::WRITABLE | Pte::NO_EXECUTE | Pte::CACHE_DISABLE) {
        Ok(()) | Err(MapError::AlreadyMapped(_)) => Ok(()),
        Err(_) => Err(SetupError::NoMemory),
    }
}

fn write32(addr: u64, v: u32) {
    // SAFETY: `addr` is a LAPIC or IOAPIC register, mapped by `enable`.
    unsafe { (addr as *mut u32).write_volatile(v) };
}

fn read32(addr: u64) -> u32 {
    // SAFETY: as for `write32`.
    unsafe { (addr as *const u32).read_volatile() }
}

/// Writes the interrupt gate for `vector` into the loaded IDT (read back
/// with `sidt`; SDM Vol. 3A §6.14.1 for the gate layout: present, DPL 0,
/// type 0xE, no IST).
fn set_gate(vector: u8, handler: u64) {
    let mut idtr = [0u8; 10];
    // SAFETY: sidt stores 10 bytes into the buffer.
    unsafe { asm!("sidt [{}]", in(reg) idtr.as_mut_ptr(), options(nostack, preserves_flags)) };
    let mut base = [0u8; 8];
    base.copy_from_slice(&idtr[2..10]);
    let gate = (u64::from_le_bytes(base) + 16 * u64::from(vector)) as *mut u64;
    let low = (handler & 0xffff) | (u64::from(KERNEL_CS) << 16) | (0x8e << 40) | (((handler >> 16) & 0xffff) << 48);
    // SAFETY: the IDT is the kernel's static table (identity-mapped RW data),
    // 256 gates long; the kernel is single-threaded and IF is clear.
    unsafe {
        gate.write_volatile(low);
        gate.add(1).write_volatile(handler >> 32);
    }
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
    write32(LAPIC_BASE + LAPIC_LVT_LINT0, LVT_MASKED);
    write32(LAPIC_BASE + LAPIC_LVT_LINT1, LVT_MASKED);
    write32(LAPIC_BASE + LAPIC_SVR, SVR_ENABLE | u32::from(SPURIOUS));
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
