//! The virtio-mmio transport's state in a snapshot, and its checked
//! restore.
//!
//! Saved: the registers a driver reads back or that steer later accesses
//! (device status, feature selects, the negotiated features, queue select,
//! interrupt status, configuration generation) and each queue as
//! `virtio-queue` keeps it ([`virtio_queue::QueueState`]: sizes, ready
//! flag, the three ring addresses, the next available and used indices and
//! the event-index flag). Not saved: the idle-poll hint (a run-loop
//! heuristic that starts again from zero) and the irqfd, which the restore
//! makes anew in the new VM.
//!
//! A snapshot file is untrusted input, so [`MmioTransport::restore`]
//! accepts only a state the live transport itself could have reached:
//! statuses in §3.1.1's order, features the device offers, exactly the
//! queues the negotiated features give with their maximum sizes, sizes that
//! are powers of two, and ready queues whose rings lie in guest RAM.

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::eventfd::EventFd;

use memvisor_abi::virtio::{F_VERSION_1, mmio::INT_CONFIG, mmio::INT_VRING, status};

use super::{MmioTransport, status_is_valid};
use crate::devices::virtio::VirtioDevice;
use crate::memory::GuestRam;

/// One queue as saved (a serialisable mirror of [`QueueState`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueRecord {
    /// The device's maximum size (`QueueNumMax`).
    pub max_size: u16,
    /// The size the driver chose (`QueueNum`).
    pub size: u16,
    /// `QueueReady`.
    pub ready: bool,
    /// Guest-physical address of the descriptor table.
    pub desc_table: u64,
    /// Guest-physical address of the available ring.
    pub avail_ring: u64,
    /// Guest-physical address of the used ring.
    pub used_ring: u64,
    /// The next available-ring entry the device will read.
    pub next_avail: u16,
    /// The next used-ring entry the device will write.
    pub next_used: u16,
    /// Whether `VIRTIO_F_EVENT_IDX` suppression is on for this queue.
    pub event_idx: bool,
}

/// The transport's registers and queues.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransportState {
    /// Device status.
    pub status: u32,
    /// `DeviceFeaturesSel`.
    pub device_features_sel: u32,
    /// `DriverFeaturesSel`.
    pub driver_features_sel: u32,
    /// The features the driver wrote (negotiated once `FEATURES_OK` is set).
    pub driver_features: u64,
    /// `QueueSel`.
    pub queue_sel: u32,
    /// `InterruptStatus`.
    pub interrupt_status: u32,
    /// `ConfigGeneration`.
    pub config_generation: u32,
    /// Every queue, in index order (none before `FEATURES_OK`).
    pub queues: Vec<QueueRecord>,
}

/// Why a saved transport state was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportStateError {
    /// Status bits a driver cannot set, or set out of order.
    #[error("device status {0:#x} is not one a driver can reach (virtio 1.2 §3.1.1)")]
    BadStatus(u32),
    /// Interrupt status bits other than used-buffer and configuration change.
    #[error("interrupt status {0:#x} has bits other than used-buffer and configuration change")]
    BadInterruptStatus(u32),
    /// Negotiated features the device does not offer, or without VERSION_1.
    #[error("negotiated features {found:#x} are not a subset of the offered {offered:#x} with VIRTIO_F_VERSION_1")]
    BadFeatures {
        /// Saved.
        found: u64,
        /// Offered by the device.
        offered: u64,
    },
    /// The transport's features disagree with the device's.
    #[error("the transport negotiated features {transport:#x} but the device accepted {device:#x}")]
    FeaturesDisagree {
        /// The transport's.
        transport: u64,
        /// The device's.
        device: u64,
    },
    /// A queue count that the negotiated features do not give.
    #[error("{found} queues saved, but the negotiated features give {expected}")]
    QueueCount {
        /// Saved.
        found: usize,
        /// Expected.
        expected: usize,
    },
    /// A queue whose maximum size is not the device's.
    #[error("queue {index}'s maximum size {found} is not the device's {expected}")]
    QueueMaxSize {
        /// Queue index.
        index: usize,
        /// Saved.
        found: u16,
        /// The device's.
        expected: u16,
    },
    /// A queue size that is zero, above the maximum or not a power of two.
    #[error("queue {index}'s size {size} is not a power of two of at most {max} (virtio 1.2 §2.7)")]
    QueueSize {
        /// Queue index.
        index: usize,
        /// Saved.
        size: u16,
        /// The maximum.
        max: u16,
    },
    /// Ring addresses `virtio-queue` refuses (misaligned, §2.7 table 2.3).
    #[error("queue {index}'s ring addresses are misaligned")]
    Misaligned {
        /// Queue index.
        index: usize,
    },
    /// A ready queue whose rings are not in guest RAM.
    #[error("queue {index} is ready but its rings are not inside guest RAM")]
    RingsOutsideRam {
        /// Queue index.
        index: usize,
    },
}

impl From<&Queue> for QueueRecord {
    fn from(q: &Queue) -> Self {
        let s = q.state();
        QueueRecord {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx: s.event_idx_enabled,
        }
    }
}

impl QueueRecord {
    /// The queue this record describes, checked against `max` (the
    /// device's maximum for this index) and, when ready, against `ram`.
    fn to_queue(self, index: usize, max: u16, ram: &GuestRam) -> Result<Queue, TransportStateError> {
        if self.max_size != max {
            return Err(TransportStateError::QueueMaxSize { index, found: self.max_size, expected: max });
        }
        if self.size == 0 || !self.size.is_power_of_two() || self.size > max {
            return Err(TransportStateError::QueueSize { index, size: self.size, max });
        }
        let state = QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        };
        // Size and maximum were checked above, so what is left to refuse
        // is the rings' alignment.
        let q = Queue::try_from(state).map_err(|_| TransportStateError::Misaligned { index })?;
        if q.ready() && !q.is_valid(ram.memory()) {
            return Err(TransportStateError::RingsOutsideRam { index });
        }
        Ok(q)
    }
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// The transport's state, for a snapshot (the vCPU stopped).
    #[must_use]
    pub fn transport_state(&self) -> TransportState {
        TransportState {
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            queues: self.queues.iter().map(QueueRecord::from).collect(),
        }
    }

    /// A transport at `base` for `device` (already restored) in the saved
    /// `state`, raising `irqfd` (made anew in the new VM) from here on.
    /// Interrupts in flight at the snapshot are in the saved IOAPIC and
    /// LAPIC state and the interrupt status register, so nothing is raised
    /// here.
    ///
    /// # Errors
    /// [`TransportStateError`] for any state the live transport could not
    /// have reached; nothing is built then.
    pub fn restore(device: D, base: u64, irqfd: Option<EventFd>, state: &TransportState, ram: &GuestRam) -> Result<Self, TransportStateError> {
        let s = state;
        if !status_is_valid(s.status) {
            return Err(TransportStateError::BadStatus(s.status));
        }
        if s.interrupt_status & !(INT_VRING | INT_CONFIG) != 0 {
            return Err(TransportStateError::BadInterruptStatus(s.interrupt_status));
        }
        let negotiated = s.status & status::FEATURES_OK != 0;
        let offered = device.features();
        if negotiated && (s.driver_features & !offered != 0 || s.driver_features & F_VERSION_1 == 0) {
            return Err(TransportStateError::BadFeatures { found: s.driver_features, offered });
        }
        // The device's accepted features are the transport's once
        // FEATURES_OK is set (set_status), and none before.
        let expected_acked = if negotiated { s.driver_features } else { 0 };
        if device.acked_features() != expected_acked {
            return Err(TransportStateError::FeaturesDisagree { transport: expected_acked, device: device.acked_features() });
        }
        let maxes = if negotiated { device.queue_max_sizes() } else { Vec::new() };
        if s.queues.len() != maxes.len() {
            return Err(TransportStateError::QueueCount { found: s.queues.len(), expected: maxes.len() });
        }
        let queues = s.queues.iter().zip(&maxes).enumerate().map(|(i, (q, &max))| q.to_queue(i, max, ram)).collect::<Result<Vec<_>, _>>()?;
        let mut t = MmioTransport::new(device, base, irqfd);
        t.status = s.status;
        t.device_features_sel = s.device_features_sel;
        t.driver_features_sel = s.driver_features_sel;
        t.driver_features = s.driver_features;
        t.queue_sel = s.queue_sel;
        t.interrupt_status = s.interrupt_status;
        t.config_generation = s.config_generation;
        t.queues = queues;
        Ok(t)
    }

    /// The queue sizes of the restored transport, for the device's own
    /// checks (a held stats buffer must be inside its queue).
    #[must_use]
    pub fn queue_sizes(&self) -> Vec<u16> {
        self.queues.iter().map(QueueT::size).collect()
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::config::VmConfig;
    use crate::devices::virtio::balloon::Balloon;
    use crate::devices::virtio::balloon::state::{self as bstate, BalloonStateError, SavedBalloon};
    use memvisor_abi::virtio::{F_STATS_VQ, mmio as r};

    const BASE: u64 = crate::layout::BALLOON.base.0;
    const ALL: u32 = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

    fn wr(t: &mut MmioTransport<Balloon>, ram: &GuestRam, off: u64, v: u32) {
        t.write(BASE + off, &v.to_le_bytes(), ram);
    }

    /// A driven transport: VERSION_1 | STATS_VQ negotiated, queues 0 and 2
    /// set up and ready, one inflate processed, a stats buffer held and
    /// a configuration change pending.
    fn live() -> (GuestRam, MmioTransport<Balloon>) {
        let ram = GuestRam::new(&VmConfig { mem_size: 4 << 20, ..VmConfig::default() }).unwrap();
        let mut t = MmioTransport::new(Balloon::new(&ram, 0), BASE, None);
        let mem = ram.memory();
        wr(&mut t, &ram, r::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        wr(&mut t, &ram, r::DRIVER_FEATURES_SEL, 0);
        wr(&mut t, &ram, r::DRIVER_FEATURES, F_STATS_VQ as u32);
        wr(&mut t, &ram, r::DRIVER_FEATURES_SEL, 1);
        wr(&mut t, &ram, r::DRIVER_FEATURES, 1);
        wr(&mut t, &ram, r::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        for (q, base) in [(0u32, 0x10000u32), (2, 0x20000)] {
            wr(&mut t, &ram, r::QUEUE_SEL, q);
            wr(&mut t, &ram, r::QUEUE_NUM, 8);
            for (reg, addr) in [(r::QUEUE_DESC_LOW, base), (r::QUEUE_AVAIL_LOW, base + 0x1000), (r::QUEUE_USED_LOW, base + 0x2000)] {
                wr(&mut t, &ram, reg, addr);
            }
            wr(&mut t, &ram, r::QUEUE_READY, 1);
        }
        wr(&mut t, &ram, r::STATUS, ALL);
        // Inflate PFN 0x100 (descriptor 0 -> a one-PFN array at 0x30000).
        mem.write_obj(0x100u32, GuestAddress(0x30000)).unwrap();
        mem.write_obj(0x30000u64, GuestAddress(0x10000)).unwrap();
        mem.write_obj(4u32, GuestAddress(0x10008)).unwrap();
        mem.write_obj(0u16, GuestAddress(0x11004)).unwrap();
        mem.write_obj(1u16, GuestAddress(0x11002)).unwrap();
        wr(&mut t, &ram, r::QUEUE_NOTIFY, 0);
        // A stats buffer (descriptor 3 of queue 2), held by the device.
        mem.write_obj(0x31000u64, GuestAddress(0x20000 + 3 * 16)).unwrap();
        mem.write_obj(10u32, GuestAddress(0x20000 + 3 * 16 + 8)).unwrap();
        mem.write_obj(3u16, GuestAddress(0x21004)).unwrap();
        mem.write_obj(1u16, GuestAddress(0x21002)).unwrap();
        wr(&mut t, &ram, r::QUEUE_NOTIFY, 2);
        wr(&mut t, &ram, r::QUEUE_SEL, 2);
        assert!(t.device.set_target(1 << 20));
        t.config_changed();
        (ram, t)
    }

    fn refused(ram: &GuestRam, saved: &SavedBalloon) -> String {
        crate::error_chain(&bstate::restore(saved, ram, BASE, None).map(|_| ()).unwrap_err())
    }

    #[test]
    fn a_driven_balloon_round_trips_with_its_queues() {
        let (ram, t) = live();
        let saved = bstate::save(&t);
        assert_eq!(saved.transport.queues.len(), 3);
        assert_eq!((saved.transport.queues[0].next_avail, saved.transport.queues[0].next_used), (1, 1));
        assert_eq!(saved.device.stats_head, Some(3));
        let text = serde_json::to_string(&saved).unwrap();
        let back: SavedBalloon = serde_json::from_str(&text).unwrap();
        let mut r = bstate::restore(&back, &ram, BASE, None).unwrap();
        assert_eq!(bstate::save(&r), saved, "every field came back");
        assert_eq!(r.device.info().balloon_bytes, 4096);
        // The restored transport goes on where the live one was: the next
        // inflate is read from avail entry 1 and used at used entry 1.
        let mem = ram.memory();
        mem.write_obj(0x101u32, GuestAddress(0x30000)).unwrap();
        mem.write_obj(0u16, GuestAddress(0x11006)).unwrap();
        mem.write_obj(2u16, GuestAddress(0x11002)).unwrap();
        wr(&mut r, &ram, r::QUEUE_NOTIFY, 0);
        assert_eq!(mem.read_obj::<u16>(GuestAddress(0x12002)).unwrap(), 2, "used idx advanced from the saved next_used");
        assert_eq!(r.device.info().balloon_bytes, 8192);
        let mut b = [0u8; 4];
        r.read(BASE + r::INTERRUPT_STATUS, &mut b);
        assert_eq!(u32::from_le_bytes(b) & r::INT_CONFIG, r::INT_CONFIG, "the pending configuration change survived");
    }

    #[test]
    fn inconsistent_transport_records_are_refused() {
        let (ram, t) = live();
        let good = bstate::save(&t);
        let check = |f: &dyn Fn(&mut SavedBalloon), want: &str| {
            let mut s = good.clone();
            f(&mut s);
            let e = refused(&ram, &s);
            assert!(e.contains(want), "{e}");
        };
        check(&|s| s.transport.queues[0].size = 100, "queue 0's size 100 is not a power of two");
        check(&|s| s.transport.queues[1].size = 0, "queue 1's size 0");
        check(&|s| s.transport.queues[0].size = 512, "queue 0's size 512");
        check(&|s| s.transport.queues[0].max_size = 128, "maximum size 128");
        check(&|s| s.transport.queues[2].used_ring = 0x4000_0000, "queue 2 is ready but its rings are not inside guest RAM");
        check(&|s| s.transport.queues[0].desc_table = 0x10001, "misaligned");
        check(&|s| s.transport.queues.pop().map(|_| ()).unwrap_or(()), "2 queues saved, but the negotiated features give 3");
        check(&|s| s.transport.status = status::ACKNOWLEDGE | status::DRIVER_OK, "device status 0x5");
        check(&|s| s.transport.status |= status::NEEDS_RESET, "is not one a driver can reach");
        check(&|s| s.transport.interrupt_status = 0x10, "interrupt status 0x10");
        check(&|s| s.transport.driver_features = 1 << 40 | F_VERSION_1, "not a subset");
        check(&|s| s.transport.driver_features = F_VERSION_1, "but the device accepted 0x100000002");
        // Cross-checks between device and transport.
        check(&|s| s.device.driver_ok = false, "DRIVER_OK (false) disagrees");
        check(&|s| s.device.stats_head = Some(8), "statistics buffer Some(8)");
        check(&|s| (s.device.stats_head, s.device.stats_requested) = (None, true), "statistics buffer None");
        check(&|s| s.device.pages.push((2000, 1)), "beyond the 1024 pages");
        assert!(bstate::restore(&good, &ram, BASE, None).is_ok());
        let e = bstate::restore(&SavedBalloon { device: bstate::BalloonState { version: 9, ..good.device.clone() }, ..good.clone() }, &ram, BASE, None).map(|_| ()).unwrap_err();
        assert_eq!(e, BalloonStateError::Version(9));
    }

    #[test]
    fn a_fresh_device_before_features_ok_has_no_queues() {
        let ram = GuestRam::new(&VmConfig { mem_size: 4 << 20, ..VmConfig::default() }).unwrap();
        let t = MmioTransport::new(Balloon::new(&ram, 1 << 20), BASE, None);
        let mut saved = bstate::save(&t);
        assert!(saved.transport.queues.is_empty());
        bstate::restore(&saved, &ram, BASE, None).unwrap();
        saved.transport.queues.push(QueueRecord { max_size: 256, size: 8, ready: false, desc_table: 0, avail_ring: 0, used_ring: 0, next_avail: 0, next_used: 0, event_idx: false });
        assert!(refused(&ram, &saved).contains("1 queues saved, but the negotiated features give 0"));
    }
}
