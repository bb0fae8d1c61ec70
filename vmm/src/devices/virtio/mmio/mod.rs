//! The virtio-mmio transport, modern layout (virtio 1.2 §4.2.2, version 2).
//!
//! Owns the registers, the device status state machine (§2.1, §3.1.1),
//! feature negotiation, the queues (`virtio-queue`'s [`Queue`]) and the
//! interrupt: the interrupt status register plus an irqfd (an `EventFd`
//! KVM turns into an edge on the device's GSI of the in-kernel IOAPIC), so
//! a guest with interrupts is woken and a polling guest sees the status
//! register. A queue notification is handled synchronously, inside the
//! guest's MMIO write exit: when the write returns to the guest, the used
//! ring is already updated.
//!
//! A guest that polls the interrupt status and finds nothing twice in a row
//! is *idle-polling*; the run loop then waits up to a millisecond for host
//! work before re-entering it ([`MmioTransport::take_idle_hint`]), so a
//! polling guest does not burn a host CPU.

use virtio_bindings::virtio_mmio as reg;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use memvisor_abi::virtio::{mmio::MAGIC, status};

use super::{TransportReject, VirtioDevice};
use crate::memory::GuestRam;

pub mod state;

/// `VendorID`: "MVSR" (any value is allowed; §4.2.2).
const VENDOR_ID: u32 = u32::from_le_bytes(*b"MVSR");
/// The modern layout's version (§4.2.2).
const VERSION: u32 = 2;
/// Consecutive idle polls before the run loop is told to back off.
const IDLE_POLLS: u32 = 2;

/// Whether `v` is a device status a driver may leave set: only the bits a
/// driver may set (NEEDS_RESET is the device's, §2.1), each with the bits
/// §3.1.1 orders before it (DRIVER needs ACKNOWLEDGE, FEATURES_OK needs
/// DRIVER, DRIVER_OK needs FEATURES_OK; FAILED goes with anything).
fn status_is_valid(v: u32) -> bool {
    let known = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK | status::FAILED;
    let needs = |bit: u32, before: u32| v & bit == 0 || v & before != 0;
    v & !known == 0 && needs(status::DRIVER, status::ACKNOWLEDGE) && needs(status::FEATURES_OK, status::DRIVER) && needs(status::DRIVER_OK, status::FEATURES_OK)
}

/// A device behind the MMIO registers.
#[derive(Debug)]
pub struct MmioTransport<D: VirtioDevice> {
    /// The device.
    pub device: D,
    base: u64,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<Queue>,
    interrupt_status: u32,
    config_generation: u32,
    irqfd: Option<EventFd>,
    idle_polls: u32,
    idle_hint: bool,
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// `device` at guest-physical `base`; interrupts go to `irqfd` when given.
    #[must_use]
    pub fn new(device: D, base: u64, irqfd: Option<EventFd>) -> Self {
        MmioTransport {
            device,
            base,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues: Vec::new(),
            interrupt_status: 0,
            config_generation: 0,
            irqfd,
            idle_polls: 0,
            idle_hint: false,
        }
    }

    /// Interrupts go to `irqfd` from now on (a restored transport is built
    /// before its VM, which the irqfd needs).
    pub fn set_irqfd(&mut self, irqfd: Option<EventFd>) {
        self.irqfd = irqfd;
    }

    /// Whether `addr` is in this device's window.
    #[must_use]
    pub fn contains(&self, addr: u64) -> bool {
        (self.base..self.base + memvisor_abi::layout::VIRTIO_MMIO_SIZE).contains(&addr)
    }

    /// Whether the driver has set `DRIVER_OK`.
    #[must_use]
    pub fn driver_ok(&self) -> bool {
        self.status & status::DRIVER_OK != 0
    }

    /// The device status register.
    #[must_use]
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Whether the guest polled idle since the last call.
    pub fn take_idle_hint(&mut self) -> bool {
        std::mem::take(&mut self.idle_hint)
    }

    /// Raises interrupt status `bits` and the irqfd.
    pub fn signal(&mut self, bits: u32) {
        self.interrupt_status |= bits;
        if let Some(fd) = &self.irqfd
            && let Err(e) = fd.write(1)
        {
            log::warn!("virtio-mmio: cannot signal the irqfd: {e}");
        }
    }

    /// The configuration changed (e.g. a new balloon target).
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        if self.driver_ok() {
            self.signal(reg::VIRTIO_MMIO_INT_CONFIG);
        }
    }

    /// Hands back buffers the device finished outside a notification.
    pub fn flush_pending(&mut self, ram: &GuestRam) {
        if self.driver_ok() && self.device.pending_used(&mut self.queues, ram) {
            self.signal(reg::VIRTIO_MMIO_INT_VRING);
        }
    }

    /// A guest read of `data.len()` bytes at `addr` (inside the window).
    pub fn read(&mut self, addr: u64, data: &mut [u8]) {
        let offset = addr - self.base;
        if offset >= u64::from(reg::VIRTIO_MMIO_CONFIG) {
            self.device.read_config(offset - u64::from(reg::VIRTIO_MMIO_CONFIG), data);
            return;
        }
        if data.len() != 4 {
            self.device.transport_rejected(TransportReject::BadRegister);
            data.fill(0);
            return;
        }
        let q = self.queues.get(self.queue_sel as usize);
        let v = match offset as u32 {
            reg::VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
            reg::VIRTIO_MMIO_VERSION => VERSION,
            reg::VIRTIO_MMIO_DEVICE_ID => self.device.device_id(),
            reg::VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            reg::VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            reg::VIRTIO_MMIO_QUEUE_NUM_MAX => q.map_or(0, |q| u32::from(q.max_size())),
            reg::VIRTIO_MMIO_QUEUE_READY => q.map_or(0, |q| u32::from(q.ready())),
            reg::VIRTIO_MMIO_INTERRUPT_STATUS => {
                if self.interrupt_status == 0 {
                    self.idle_polls = self.idle_polls.saturating_add(1);
                    self.idle_hint = self.idle_polls >= IDLE_POLLS;
                } else {
                    self.idle_polls = 0;
                }
                self.interrupt_status
            }
            reg::VIRTIO_MMIO_STATUS => self.status,
            reg::VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            _ => {
                self.device.transport_rejected(TransportReject::BadRegister);
                0
            }
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// A guest write at `addr` (inside the window).
    pub fn write(&mut self, addr: u64, data: &[u8], ram: &GuestRam) {
        let offset = addr - self.base;
        if offset >= u64::from(reg::VIRTIO_MMIO_CONFIG) {
            self.device.write_config(offset - u64::from(reg::VIRTIO_MMIO_CONFIG), data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            self.device.transport_rejected(TransportReject::BadRegister);
            return;
        };
        let v = u32::from_le_bytes(bytes);
        self.idle_polls = 0;
        match offset as u32 {
            reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::VIRTIO_MMIO_DRIVER_FEATURES => {
                // Only between DRIVER and FEATURES_OK (§3.1.1 steps 4-5).
                if self.status & status::DRIVER != 0 && self.status & status::FEATURES_OK == 0 {
                    match self.driver_features_sel {
                        0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
                        1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32),
                        _ => {}
                    }
                } else {
                    self.device.transport_rejected(TransportReject::BadRegister);
                }
            }
            reg::VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = v,
            reg::VIRTIO_MMIO_QUEUE_NUM => self.with_unready_queue(|q| {
                // virtio-queue ignores a bad size silently; refuse it here so it is counted.
                let ok = u16::try_from(v).is_ok_and(|n| n != 0 && n.is_power_of_two() && n <= q.max_size());
                if ok {
                    q.set_size(v as u16);
                }
                ok.then_some(()).ok_or(TransportReject::BadQueueSize)
            }),
            reg::VIRTIO_MMIO_QUEUE_READY => {
                let i = self.queue_sel as usize;
                let mem = ram.memory();
                match self.queues.get_mut(i) {
                    Some(q) if v == 1 => {
                        q.set_ready(true);
                        if !q.is_valid(mem) {
                            q.set_ready(false);
                            self.device.transport_rejected(TransportReject::BadQueueAddress);
                        }
                    }
                    Some(q) => q.set_ready(false),
                    None => self.device.transport_rejected(TransportReject::BadNotify),
                }
            }
            reg::VIRTIO_MMIO_QUEUE_NOTIFY => self.notify(v as usize, ram),
            reg::VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt_status &= !v,
            reg::VIRTIO_MMIO_STATUS => self.set_status(v),
            reg::VIRTIO_MMIO_QUEUE_DESC_LOW => self.set_ring_address(|q| q.set_desc_table_address(Some(v), None)),
            reg::VIRTIO_MMIO_QUEUE_DESC_HIGH => self.set_ring_address(|q| q.set_desc_table_address(None, Some(v))),
            reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW => self.set_ring_address(|q| q.set_avail_ring_address(Some(v), None)),
            reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH => self.set_ring_address(|q| q.set_avail_ring_address(None, Some(v))),
            reg::VIRTIO_MMIO_QUEUE_USED_LOW => self.set_ring_address(|q| q.set_used_ring_address(Some(v), None)),
            reg::VIRTIO_MMIO_QUEUE_USED_HIGH => self.set_ring_address(|q| q.set_used_ring_address(None, Some(v))),
            _ => self.device.transport_rejected(TransportReject::BadRegister),
        }
    }

    /// Applies `f` to the selected queue if it exists and is not ready
    /// (queue registers are frozen while it is; §4.2.3.2).
    fn with_unready_queue(&mut self, f: impl FnOnce(&mut Queue) -> Result<(), TransportReject>) {
        let i = self.queue_sel as usize;
        let result = match self.queues.get_mut(i) {
            Some(q) if !q.ready() => f(q),
            _ => Err(TransportReject::BadRegister),
        };
        if let Err(why) = result {
            self.device.transport_rejected(why);
        }
    }

    /// One half of a ring address of the selected, unready queue.
    fn set_ring_address(&mut self, f: impl FnOnce(&mut Queue)) {
        self.with_unready_queue(|q| {
            f(q);
            Ok(())
        });
    }

    /// A driver write of the device status (virtio 1.2 §2.1, §3.1.1).
    ///
    /// 0 resets the device (§2.1.1, §4.2.3.1). Otherwise the write may only
    /// add bits ("The driver MUST NOT clear a device status bit", §2.1.1),
    /// and the bits it leaves set must follow §3.1.1's order: DRIVER needs
    /// ACKNOWLEDGE, FEATURES_OK needs DRIVER, DRIVER_OK needs FEATURES_OK;
    /// FAILED may be added at any time; NEEDS_RESET is the device's to set.
    /// Any other write is refused (counted) and changes nothing. FEATURES_OK
    /// is checked once, when it is first set (§3.1.1 step 5); setting it
    /// again changes nothing, so queues the driver has set up, and buffers
    /// the device holds in them (the stats buffer), stay as they are.
    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        if !status_is_valid(v) || self.status & !v != 0 {
            self.device.transport_rejected(TransportReject::BadStatus);
            return;
        }
        let mut v = v;
        if v & status::FEATURES_OK != 0 && self.status & status::FEATURES_OK == 0 {
            // §3.1.1 step 5: accept only features the device offered, with
            // VERSION_1 (this is a modern-only device); otherwise leave
            // FEATURES_OK clear for the driver to see.
            let offered = self.device.features();
            let f = self.driver_features;
            if f & !offered != 0 || f & memvisor_abi::virtio::F_VERSION_1 == 0 {
                v &= !(status::FEATURES_OK | status::DRIVER_OK);
            } else {
                self.device.ack_features(f);
                self.queues = self.device.queue_max_sizes().into_iter().filter_map(|n| Queue::new(n).ok()).collect();
            }
        }
        self.status = v;
        self.device.set_driver_ok(v & status::DRIVER_OK != 0);
    }

    fn reset(&mut self) {
        self.status = 0;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.queues.clear();
        self.interrupt_status = 0;
        self.device.reset();
    }

    fn notify(&mut self, index: usize, ram: &GuestRam) {
        if !self.driver_ok() {
            self.device.transport_rejected(TransportReject::BadNotify);
            return;
        }
        let Some(q) = self.queues.get_mut(index).filter(|q| q.ready()) else {
            self.device.transport_rejected(TransportReject::BadNotify);
            return;
        };
        if self.device.process_queue(index, q, ram) {
            self.signal(reg::VIRTIO_MMIO_INT_VRING);
        }
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::config::VmConfig;
    use crate::devices::virtio::balloon::Balloon;
    use memvisor_abi::virtio::{F_STATS_VQ, F_VERSION_1, mmio as r};

    const BASE: u64 = crate::layout::BALLOON.base.0;

    fn rd(t: &mut MmioTransport<Balloon>, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(BASE + off, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(t: &mut MmioTransport<Balloon>, ram: &GuestRam, off: u64, v: u32) {
        t.write(BASE + off, &v.to_le_bytes(), ram);
    }

    fn setup() -> (GuestRam, MmioTransport<Balloon>) {
        let ram = GuestRam::new(&VmConfig { mem_size: 4 << 20, backing: crate::config::Backing::Anon, ..VmConfig::default() }).unwrap();
        let t = MmioTransport::new(Balloon::new(&ram, 0), BASE, None);
        (ram, t)
    }

    fn negotiate(t: &mut MmioTransport<Balloon>, ram: &GuestRam, features: u64) -> u32 {
        wr(t, ram, r::STATUS, 0);
        wr(t, ram, r::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        wr(t, ram, r::DRIVER_FEATURES_SEL, 0);
        wr(t, ram, r::DRIVER_FEATURES, features as u32);
        wr(t, ram, r::DRIVER_FEATURES_SEL, 1);
        wr(t, ram, r::DRIVER_FEATURES, (features >> 32) as u32);
        wr(t, ram, r::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        rd(t, r::STATUS)
    }

    /// The selected queue with `size` entries, its descriptor table, avail
    /// and used rings at 0x10000, 0x11000 and 0x12000, made ready; then
    /// DRIVER_OK.
    fn ready_queue(t: &mut MmioTransport<Balloon>, ram: &GuestRam, size: u32) {
        wr(t, ram, r::QUEUE_NUM, size);
        for (reg, addr) in [(r::QUEUE_DESC_LOW, 0x10000u32), (r::QUEUE_AVAIL_LOW, 0x11000), (r::QUEUE_USED_LOW, 0x12000)] {
            wr(t, ram, reg, addr);
        }
        wr(t, ram, r::QUEUE_READY, 1);
        wr(t, ram, r::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK);
    }

    #[test]
    fn the_guests_register_offsets_match_virtio_bindings() {
        let pairs = [
            (r::MAGIC_VALUE, reg::VIRTIO_MMIO_MAGIC_VALUE),
            (r::VERSION, reg::VIRTIO_MMIO_VERSION),
            (r::DEVICE_ID, reg::VIRTIO_MMIO_DEVICE_ID),
            (r::DEVICE_FEATURES, reg::VIRTIO_MMIO_DEVICE_FEATURES),
            (r::DEVICE_FEATURES_SEL, reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL),
            (r::DRIVER_FEATURES, reg::VIRTIO_MMIO_DRIVER_FEATURES),
            (r::DRIVER_FEATURES_SEL, reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL),
            (r::QUEUE_SEL, reg::VIRTIO_MMIO_QUEUE_SEL),
            (r::QUEUE_NUM_MAX, reg::VIRTIO_MMIO_QUEUE_NUM_MAX),
            (r::QUEUE_NUM, reg::VIRTIO_MMIO_QUEUE_NUM),
            (r::GUEST_PAGE_SIZE, reg::VIRTIO_MMIO_GUEST_PAGE_SIZE),
            (r::QUEUE_ALIGN, reg::VIRTIO_MMIO_QUEUE_ALIGN),
            (r::QUEUE_PFN, reg::VIRTIO_MMIO_QUEUE_PFN),
            (r::QUEUE_READY, reg::VIRTIO_MMIO_QUEUE_READY),
            (r::QUEUE_NOTIFY, reg::VIRTIO_MMIO_QUEUE_NOTIFY),
            (r::INTERRUPT_STATUS, reg::VIRTIO_MMIO_INTERRUPT_STATUS),
            (r::INTERRUPT_ACK, reg::VIRTIO_MMIO_INTERRUPT_ACK),
            (r::STATUS, reg::VIRTIO_MMIO_STATUS),
            (r::QUEUE_DESC_LOW, reg::VIRTIO_MMIO_QUEUE_DESC_LOW),
            (r::QUEUE_DESC_HIGH, reg::VIRTIO_MMIO_QUEUE_DESC_HIGH),
            (r::QUEUE_AVAIL_LOW, reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW),
            (r::QUEUE_AVAIL_HIGH, reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH),
            (r::QUEUE_USED_LOW, reg::VIRTIO_MMIO_QUEUE_USED_LOW),
            (r::QUEUE_USED_HIGH, reg::VIRTIO_MMIO_QUEUE_USED_HIGH),
            (r::CONFIG_GENERATION, reg::VIRTIO_MMIO_CONFIG_GENERATION),
            (r::CONFIG, reg::VIRTIO_MMIO_CONFIG),
        ];
        for (ours, theirs) in pairs {
            assert_eq!(ours, u64::from(theirs));
        }
        assert_eq!((r::INT_VRING, r::INT_CONFIG), (reg::VIRTIO_MMIO_INT_VRING, reg::VIRTIO_MMIO_INT_CONFIG));
    }

    #[test]
    fn registers_identify_a_modern_balloon() {
        let (_ram, mut t) = setup();
        assert_eq!(rd(&mut t, r::MAGIC_VALUE), r::MAGIC);
        assert_eq!(rd(&mut t, r::VERSION), 2);
        assert_eq!(rd(&mut t, r::DEVICE_ID), 5);
        wr(&mut t, &_ram, r::DEVICE_FEATURES_SEL, 1);
        assert_eq!(rd(&mut t, r::DEVICE_FEATURES), 1, "VIRTIO_F_VERSION_1 is offered");
    }

    #[test]
    fn features_without_version_1_or_not_offered_are_refused() {
        let (ram, mut t) = setup();
        assert_eq!(negotiate(&mut t, &ram, F_STATS_VQ) & status::FEATURES_OK, 0);
        assert_eq!(negotiate(&mut t, &ram, F_VERSION_1 | (1 << 40)) & status::FEATURES_OK, 0);
        assert_ne!(negotiate(&mut t, &ram, F_VERSION_1 | F_STATS_VQ) & status::FEATURES_OK, 0);
        // DRIVER_OK needs FEATURES_OK first.
        wr(&mut t, &ram, r::STATUS, 0);
        wr(&mut t, &ram, r::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK);
        assert!(!t.driver_ok());
        assert_eq!(t.device.metrics.bad_status, 1);
        // Refused features leave FEATURES_OK, and a DRIVER_OK with it, clear.
        negotiate(&mut t, &ram, F_STATS_VQ);
        wr(&mut t, &ram, r::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK);
        assert_eq!(rd(&mut t, r::STATUS), status::ACKNOWLEDGE | status::DRIVER);
    }

    #[test]
    fn status_bits_out_of_order_are_refused_and_change_nothing() {
        let (ram, mut t) = setup();
        // DRIVER before ACKNOWLEDGE, FEATURES_OK before DRIVER (§3.1.1).
        wr(&mut t, &ram, r::STATUS, status::DRIVER);
        wr(&mut t, &ram, r::STATUS, status::ACKNOWLEDGE | status::FEATURES_OK);
        assert_eq!((rd(&mut t, r::STATUS), t.device.metrics.bad_status), (0, 2));
        // NEEDS_RESET is the device's bit (§2.1).
        wr(&mut t, &ram, r::STATUS, status::ACKNOWLEDGE | status::NEEDS_RESET);
        assert_eq!((rd(&mut t, r::STATUS), t.device.metrics.bad_status), (0, 3));
        wr(&mut t, &ram, r::STATUS, status::ACKNOWLEDGE);
        wr(&mut t, &ram, r::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        assert_eq!(rd(&mut t, r::STATUS), status::ACKNOWLEDGE | status::DRIVER);
        // FAILED may be added at any point.
        wr(&mut t, &ram, r::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FAILED);
        assert_eq!(rd(&mut t, r::STATUS), status::ACKNOWLEDGE | status::DRIVER | status::FAILED);
        assert_eq!(t.device.metrics.bad_status, 3);
    }

    #[test]
    fn clearing_a_status_bit_is_refused_except_by_writing_zero() {
        let (ram, mut t) = setup();
        negotiate(&mut t, &ram, F_VERSION_1);
        let all = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
        wr(&mut t, &ram, r::STATUS, all);
        assert!(t.driver_ok());
        // Dropping DRIVER_OK, or FEATURES_OK, without a reset (§2.1.1).
        wr(&mut t, &ram, r::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        wr(&mut t, &ram, r::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        assert_eq!((rd(&mut t, r::STATUS), t.device.metrics.bad_status), (all, 2));
        assert!(t.driver_ok() && t.device.info().driver_ok, "the device is still live");
        wr(&mut t, &ram, r::STATUS, 0);
        assert_eq!(rd(&mut t, r::STATUS), 0);
        assert!(!t.device.info().driver_ok);
    }

    #[test]
    fn features_ok_set_again_keeps_the_queues_and_the_accepted_features() {
        let (ram, mut t) = setup();
        let s = negotiate(&mut t, &ram, F_VERSION_1 | F_STATS_VQ);
        assert_ne!(s & status::FEATURES_OK, 0);
        wr(&mut t, &ram, r::QUEUE_SEL, 2);
        wr(&mut t, &ram, r::QUEUE_NUM, 8);
        for (reg, addr) in [(r::QUEUE_DESC_LOW, 0x10000u32), (r::QUEUE_AVAIL_LOW, 0x11000), (r::QUEUE_USED_LOW, 0x12000)] {
            wr(&mut t, &ram, reg, addr);
        }
        wr(&mut t, &ram, r::QUEUE_READY, 1);
        assert_eq!(rd(&mut t, r::QUEUE_READY), 1);
        // The same status again, and with DRIVER_OK: no second check, no
        // new queues (a rebuilt queue 2 would be unready and a stats buffer
        // the device holds would name a queue that no longer exists).
        wr(&mut t, &ram, r::STATUS, s);
        wr(&mut t, &ram, r::STATUS, s | status::DRIVER_OK);
        assert_eq!(rd(&mut t, r::QUEUE_READY), 1, "queue 2 survived");
        assert_eq!(t.device.info().features, F_VERSION_1 | F_STATS_VQ);
        assert_eq!(t.device.metrics.bad_status, 0);
        // Features cannot change after FEATURES_OK (§3.1.1 step 5).
        wr(&mut t, &ram, r::DRIVER_FEATURES, 0);
        assert_eq!(t.device.metrics.bad_register, 1);
    }

    #[test]
    fn an_inflate_buffer_is_checked_page_by_page_and_used() {
        let (ram, mut t) = setup();
        let mem = ram.memory();
        negotiate(&mut t, &ram, F_VERSION_1);
        wr(&mut t, &ram, r::QUEUE_SEL, 0);
        assert_eq!(rd(&mut t, r::QUEUE_NUM_MAX), 256);
        wr(&mut t, &ram, r::QUEUE_NUM, 100);
        assert_eq!(t.device.metrics.bad_queue_size, 1, "a size that is not a power of two is counted");
        ready_queue(&mut t, &ram, 8);
        assert_eq!(rd(&mut t, r::QUEUE_READY), 1);
        // PFNs: two good ones, a duplicate, one in the MMIO hole, one beyond RAM.
        for (i, pfn) in [0x100u32, 0x101, 0x100, 0xd0000, 0x5000].iter().enumerate() {
            mem.write_obj(*pfn, GuestAddress(0x20000 + 4 * i as u64)).unwrap();
        }
        mem.write_obj(0x20000u64, GuestAddress(0x10000)).unwrap(); // addr
        mem.write_obj(20u32, GuestAddress(0x10008)).unwrap(); // len; flags 0, next 0
        mem.write_obj(0u16, GuestAddress(0x11004)).unwrap(); // ring[0] = head 0
        mem.write_obj(1u16, GuestAddress(0x11002)).unwrap(); // avail idx
        wr(&mut t, &ram, r::QUEUE_NOTIFY, 0);
        assert_eq!(mem.read_obj::<u16>(GuestAddress(0x12002)).unwrap(), 1, "the buffer was used");
        assert_eq!(rd(&mut t, r::INTERRUPT_STATUS), r::INT_VRING);
        // The release thread's calls are in the folded metrics once done.
        t.device.finish_releases();
        let m = &t.device.metrics();
        assert_eq!((m.inflated_pages, m.duplicate_pfn, m.pfn_in_hole, m.pfn_outside_ram), (2, 1, 1, 1));
        assert_eq!(m.released_bytes, 8192);
        wr(&mut t, &ram, r::INTERRUPT_ACK, r::INT_VRING);
        // A new target: configuration-change interrupt and generation.
        let generation = rd(&mut t, r::CONFIG_GENERATION);
        assert!(t.device.set_target(1 << 20));
        t.config_changed();
        assert_eq!(rd(&mut t, r::INTERRUPT_STATUS), r::INT_CONFIG);
        assert_ne!(rd(&mut t, r::CONFIG_GENERATION), generation);
        assert_eq!(rd(&mut t, r::CONFIG), 256, "num_pages");
        // A notification for a queue that does not exist is counted.
        wr(&mut t, &ram, r::QUEUE_NOTIFY, 9);
        assert_eq!(t.device.metrics.bad_notify, 1);
        // A reset empties the balloon: the memory is the guest's again.
        assert_eq!(t.device.info().balloon_bytes, 8192);
        wr(&mut t, &ram, r::STATUS, 0);
        assert_eq!(t.device.info().balloon_bytes, 0);
        assert!(!t.driver_ok());
    }

    #[test]
    fn one_notification_reads_at_most_rams_pages_of_pfns() {
        // 256 chains, each naming all 4 MiB of RAM as its PFN array: 256 M
        // PFNs for 1024 pages of RAM. Unbounded, one notification kept the
        // device busy for minutes (the balloon_queue fuzz target found it).
        let (ram, mut t) = setup();
        let mem = ram.memory();
        negotiate(&mut t, &ram, F_VERSION_1);
        wr(&mut t, &ram, r::QUEUE_SEL, 0);
        ready_queue(&mut t, &ram, 256);
        let len = (4u32 << 20) - 4096;
        for i in 0..256u64 {
            mem.write_obj(0u64, GuestAddress(0x10000 + 16 * i)).unwrap(); // addr
            mem.write_obj(len, GuestAddress(0x10008 + 16 * i)).unwrap(); // len; flags 0
            mem.write_obj(0u16, GuestAddress(0x1000c + 16 * i)).unwrap();
            mem.write_obj(i as u16, GuestAddress(0x11004 + 2 * i)).unwrap(); // ring[i] = head i
        }
        mem.write_obj(256u16, GuestAddress(0x11002)).unwrap(); // avail idx
        wr(&mut t, &ram, r::QUEUE_NOTIFY, 0);
        assert_eq!(mem.read_obj::<u16>(GuestAddress(0x12002)).unwrap(), 256, "every chain was used");
        t.device.finish_releases();
        let m = t.device.metrics();
        let read = m.inflated_pages + m.duplicate_pfn + m.pfn_in_hole + m.pfn_outside_ram;
        assert!(read <= 1024, "at most RAM's 1024 pages of PFNs were read: {m:?}");
        assert_eq!(read + m.pfns_over_budget, 256 * u64::from(len / 4), "the rest was refused unread and counted: {m:?}");
    }
}
