//! The kernel command line the guest gets: the user's text, then one
//! `virtio_mmio.device=SIZE@ADDR:IRQ` word per virtio-mmio device, so that
//! a guest finds its devices the way Linux's `virtio_mmio` driver does
//! (`Documentation/admin-guide/kernel-parameters.txt`; the syntax is
//! `memvisor_abi::cmdline`'s). Shared by every boot protocol.

use memvisor_abi::cmdline::VirtioMmioDevice;

use crate::layout::VirtioMmioSlot;

/// `user` unchanged, then an announcement of each of `devices`, separated
/// by spaces.
#[must_use]
pub fn with_virtio_mmio(user: &str, devices: &[VirtioMmioSlot]) -> String {
    let mut line = user.to_owned();
    for slot in devices {
        if !line.is_empty() && !line.ends_with(|c: char| c.is_ascii_whitespace()) {
            line.push(' ');
        }
        let announced = VirtioMmioDevice { base: slot.base.0, size: slot.size, irq: slot.gsi, id: None };
        line.push_str(&announced.to_string());
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::BALLOON;

    #[test]
    fn the_balloon_is_announced_after_the_users_text() {
        assert_eq!(with_virtio_mmio("", &[BALLOON]), "virtio_mmio.device=4K@0xd0000000:5");
        assert_eq!(with_virtio_mmio("console=ttyS0 quiet", &[BALLOON]), "console=ttyS0 quiet virtio_mmio.device=4K@0xd0000000:5");
        assert_eq!(with_virtio_mmio("quiet ", &[BALLOON]), "quiet virtio_mmio.device=4K@0xd0000000:5");
    }

    #[test]
    fn no_devices_leave_the_line_alone() {
        assert_eq!(with_virtio_mmio("", &[]), "");
        assert_eq!(with_virtio_mmio("memvisor.test=bad-tables", &[]), "memvisor.test=bad-tables");
    }

    #[test]
    fn every_device_is_announced_in_order_and_parses_back() {
        let second = VirtioMmioSlot { base: vm_memory::GuestAddress(0xd000_1000), size: 0x1000, gsi: 6 };
        let line = with_virtio_mmio("a", &[BALLOON, second]);
        assert_eq!(line, "a virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6");
        let parsed: Vec<_> = memvisor_abi::cmdline::virtio_mmio_devices(line.as_bytes()).map(|d| (d.base, d.size, d.irq)).collect();
        assert_eq!(parsed, [(0xd000_0000, 0x1000, 5), (0xd000_1000, 0x1000, 6)]);
    }
}
