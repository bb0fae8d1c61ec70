//! The balloon in a snapshot: its device state, its transport's, and the
//! checked restore of both.
//!
//! Saved: the target (`num_pages`), the `actual` the driver last wrote, the
//! accepted features, the pages in the balloon as runs of 4 KiB RAM pages
//! (the per-huge-page piece counts, and so which host pages are released
//! and which pieces are pending, follow from them), the statistics last
//! received, the stats buffer the device holds and whether the host asked
//! for fresh numbers, `DRIVER_OK` as the device saw it, and the metrics.
//! Not saved: the clock of the last target change (an `Instant` of the
//! old process; its timings stay in the metrics, and the next change
//! starts a new clock).
//!
//! Released host pages hold nothing: a snapshot does not save them
//! ([`Balloon::released_ram_ranges`]) and a restore releases them again in
//! the new RAM ([`restore`]), so the reclaimed memory stays with the host.
//! Everything is checked before use: the file is untrusted input.

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use super::device::{Balloon, Role};
use super::metrics::BalloonMetrics;
use super::pages::{BalloonPages, PAGE};
use super::worker::BatchKind;
use super::stats::GuestStats;
use crate::devices::virtio::VirtioDevice;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::mmio::state::{TransportState, TransportStateError};
use crate::memory::GuestRam;

/// The version of [`BalloonState`] this build writes and reads; a record
/// of another version is refused (bumped whenever its meaning changes).
pub const STATE_VERSION: u32 = 1;

/// The balloon device's own state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonState {
    /// [`STATE_VERSION`].
    pub version: u32,
    /// Guest RAM the page set covers, bytes.
    pub ram_bytes: u64,
    /// The host page size releases were made in (the backing's).
    pub host_page_bytes: u64,
    /// Features the driver accepted.
    pub acked: u64,
    /// The host's target, 4 KiB pages (`num_pages`, virtio 1.2 §5.5.4).
    pub target_pages: u32,
    /// What the driver last wrote to `actual`, 4 KiB pages.
    pub actual_pages: u32,
    /// Pages in the balloon: ascending, disjoint runs of 4 KiB RAM pages
    /// `(first page, count)`.
    pub pages: Vec<(u64, u64)>,
    /// The statistics the guest last sent.
    pub stats: Option<GuestStats>,
    /// The head of the stats buffer the device holds, if any.
    pub stats_head: Option<u16>,
    /// Whether the host asked for fresh statistics not yet handed out.
    pub stats_requested: bool,
    /// Whether the driver had set `DRIVER_OK`.
    pub driver_ok: bool,
    /// The counters.
    pub metrics: BalloonMetrics,
}

/// The balloon as a snapshot holds it: transport and device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedBalloon {
    /// The virtio-mmio transport.
    pub transport: TransportState,
    /// The device.
    pub device: BalloonState,
}

/// Why a saved balloon was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BalloonStateError {
    /// Another record version.
    #[error("balloon state version {0} is not supported (this build reads version {STATE_VERSION})")]
    Version(u32),
    /// Saved for another RAM size or host page size.
    #[error("the balloon was saved for {saved_ram} bytes of RAM in {saved_page}-byte host pages, not {ram} in {page}")]
    Geometry {
        /// Saved RAM size.
        saved_ram: u64,
        /// Saved host page size.
        saved_page: u64,
        /// This VM's RAM size.
        ram: u64,
        /// This VM's host page size.
        page: u64,
    },
    /// A target larger than RAM.
    #[error("the balloon target of {0} pages is larger than guest RAM")]
    Target(u32),
    /// Features the device does not offer.
    #[error("accepted features {0:#x} include some the balloon does not offer")]
    Features(u64),
    /// A page run that is empty, out of order, overlapping or beyond RAM.
    #[error("balloon page run {index} (first page {first:#x}, {count} pages) {why}")]
    PageRun {
        /// Run index.
        index: usize,
        /// First page.
        first: u64,
        /// Pages.
        count: u64,
        /// What is wrong with it.
        why: String,
    },
    /// A stats buffer without a stats queue, or beyond it.
    #[error("the held statistics buffer {head:?} is not inside a statistics queue")]
    StatsHead {
        /// The saved head.
        head: Option<u16>,
    },
    /// The device's `DRIVER_OK` disagrees with the transport's status.
    #[error("the device's DRIVER_OK ({device}) disagrees with the transport's status {status:#x}")]
    DriverOk {
        /// The device's flag.
        device: bool,
        /// The transport's status.
        status: u32,
    },
    /// The transport's state.
    #[error("virtio-mmio transport")]
    Transport(#[source] TransportStateError),
}

impl Balloon {
    /// The device's state, for a snapshot.
    #[must_use]
    pub fn device_state(&self) -> BalloonState {
        BalloonState {
            version: STATE_VERSION,
            ram_bytes: self.ram_bytes,
            host_page_bytes: self.host_page,
            acked: self.acked,
            target_pages: self.target_pages,
            actual_pages: self.actual_pages,
            pages: self.pages.runs(),
            stats: self.stats.clone(),
            stats_head: self.stats_head,
            stats_requested: self.stats_requested,
            driver_ok: self.driver_ok,
            metrics: self.metrics(),
        }
    }

    /// The RAM byte ranges `(offset, length)` of host pages the balloon has
    /// released, ascending: they hold nothing the guest may read, so a
    /// snapshot skips them.
    #[must_use]
    pub fn released_ram_ranges(&self) -> Vec<(u64, u64)> {
        let hp = self.host_page;
        self.pages
            .released_host_runs()
            .into_iter()
            .map(|(first, n)| {
                let start = first * hp;
                // The last host page may be cut short by the end of RAM.
                (start, (n * hp).min(self.ram_bytes - start))
            })
            .collect()
    }

    /// The device as `state` describes it, for `ram`.
    ///
    /// # Errors
    /// [`BalloonStateError`] for a record of another version, geometry or
    /// with pages, features or a target that do not fit.
    pub fn restore(ram: &GuestRam, state: &BalloonState) -> Result<Self, BalloonStateError> {
        if state.version != STATE_VERSION {
            return Err(BalloonStateError::Version(state.version));
        }
        let mut b = Balloon::new(ram, 0);
        if (state.ram_bytes, state.host_page_bytes) != (b.ram_bytes, b.host_page) {
            return Err(BalloonStateError::Geometry { saved_ram: state.ram_bytes, saved_page: state.host_page_bytes, ram: b.ram_bytes, page: b.host_page });
        }
        if u64::from(state.target_pages) * PAGE > b.ram_bytes {
            return Err(BalloonStateError::Target(state.target_pages));
        }
        if state.acked & !b.features() != 0 {
            return Err(BalloonStateError::Features(state.acked));
        }
        b.pages = pages_from_runs(&state.pages, b.ram_bytes, b.host_page)?;
        b.acked = state.acked;
        b.target_pages = state.target_pages;
        b.actual_pages = state.actual_pages;
        b.stats.clone_from(&state.stats);
        b.stats_head = state.stats_head;
        b.stats_requested = state.stats_requested;
        b.driver_ok = state.driver_ok;
        b.metrics = state.metrics.clone();
        Ok(b)
    }
}

/// The page set the runs describe; each run must start past the previous
/// one's end and end inside RAM.
fn pages_from_runs(runs: &[(u64, u64)], ram_bytes: u64, host_page: u64) -> Result<BalloonPages, BalloonStateError> {
    let mut pages = BalloonPages::new(ram_bytes, host_page);
    let ram_pages = pages.ram_pages();
    let mut end = 0;
    for (index, &(first, count)) in runs.iter().enumerate() {
        let bad = |why: String| BalloonStateError::PageRun { index, first, count, why };
        let beyond = || bad(format!("ends beyond the {ram_pages} pages of guest RAM"));
        let run_end = first.checked_add(count).ok_or_else(beyond)?;
        if count == 0 {
            return Err(bad("is empty".into()));
        }
        if first < end {
            return Err(bad("overlaps or precedes the previous run".into()));
        }
        if run_end > ram_pages {
            return Err(beyond());
        }
        // In order and disjoint, so nothing is a duplicate; inside RAM, so
        // nothing is refused. Releases are the caller's ([`restore`]).
        pages.inflate_run(first, count, |_, _| {}).map_err(|_| beyond())?;
        end = run_end;
    }
    Ok(pages)
}

/// The balloon's state, for a snapshot (the vCPU stopped).
#[must_use]
pub fn save(t: &MmioTransport<Balloon>) -> SavedBalloon {
    SavedBalloon { transport: t.transport_state(), device: t.device.device_state() }
}

/// The balloon at `base` as `saved` describes it, in new guest RAM `ram`
/// that already holds the snapshot's memory, interrupting through `irqfd`.
/// The host pages the balloon had released are released again in `ram`
/// (a chain's base may hold their old contents, and a page of a diff's
/// first stop may have been ballooned before its second), so the restored
/// VMM does not hold the memory the guest gave back.
///
/// # Errors
/// [`BalloonStateError`] for any inconsistent record; nothing is released
/// then.
pub fn restore(saved: &SavedBalloon, ram: &GuestRam, base: u64, irqfd: Option<EventFd>) -> Result<MmioTransport<Balloon>, BalloonStateError> {
    let device = Balloon::restore(ram, &saved.device)?;
    let status = saved.transport.status;
    let driver_ok = status & memvisor_abi::virtio::status::DRIVER_OK != 0;
    if device.driver_ok != driver_ok {
        return Err(BalloonStateError::DriverOk { device: device.driver_ok, status });
    }
    let stats_queue = device.roles().iter().position(|r| *r == Role::Stats);
    let t = MmioTransport::restore(device, base, irqfd, &saved.transport, ram).map_err(BalloonStateError::Transport)?;
    let d = &t.device;
    // A held buffer is a descriptor index of the stats queue (§2.7.5: heads
    // are below the queue size); a request needs a held buffer
    // (Balloon::request_stats).
    let sizes = t.queue_sizes();
    let head_ok = match d.stats_head {
        Some(h) => stats_queue.and_then(|i| sizes.get(i)).is_some_and(|&n| h < n),
        None => !d.stats_requested,
    };
    if !head_ok {
        return Err(BalloonStateError::StatsHead { head: d.stats_head });
    }
    // On the device's release thread, waited for: the guest does not run
    // before they are done. A failure is logged there and leaves those
    // pages unreclaimed.
    let ranges = d.released_ram_ranges();
    if !ranges.is_empty() {
        let seq = d.worker.submit(BatchKind::Restore, ranges);
        d.worker.wait_for(seq);
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::VmConfig;

    fn ram(mem: u64) -> GuestRam {
        GuestRam::new(&VmConfig { mem_size: mem, backing: crate::config::Backing::Anon, ..VmConfig::default() }).unwrap()
    }

    fn state(ram: &GuestRam) -> BalloonState {
        let mut b = Balloon::new(ram, 0);
        b.acked = memvisor_abi::virtio::F_VERSION_1;
        b.target_pages = 300;
        b.actual_pages = 264;
        b.pages.inflate_run(8, 256, |_, _| {}).unwrap();
        b.pages.inflate_run(600, 8, |_, _| {}).unwrap();
        b.metrics.inflated_pages = 264;
        b.stats = Some(GuestStats { free_memory: Some(5), ..GuestStats::default() });
        b.device_state()
    }

    #[test]
    fn a_device_state_round_trips_through_json() {
        let ram = ram(4 << 20);
        let s = state(&ram);
        let back: BalloonState = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        let b = Balloon::restore(&ram, &back).unwrap();
        assert_eq!(b.device_state(), s);
        assert_eq!(b.info().balloon_bytes, 264 * PAGE);
        assert_eq!(b.released_ram_ranges(), [(8 * PAGE, 256 * PAGE), (600 * PAGE, 8 * PAGE)]);
    }

    #[test]
    fn pending_pieces_of_huge_host_pages_come_back_pending() {
        let ram = ram(8 << 20);
        let mut b = Balloon::new(&ram, 0);
        // As if the RAM were backed by 2 MiB pages: one whole, 3/4 of another.
        (b.host_page, b.pages) = (2 << 20, BalloonPages::new(8 << 20, 2 << 20));
        b.pages.inflate_run(0, 512, |_, _| {}).unwrap();
        b.pages.inflate_run(512, 384, |_, _| {}).unwrap();
        let s = b.device_state();
        let pages = pages_from_runs(&s.pages, s.ram_bytes, s.host_page_bytes).unwrap();
        assert_eq!((pages.pages(), pages.released_pages(), pages.pending_pages()), (896, 512, 384));
        assert_eq!(pages.released_host_runs(), [(0, 1)]);
    }

    #[test]
    fn bad_device_records_are_refused() {
        let ram = ram(4 << 20);
        let check = |f: &dyn Fn(&mut BalloonState), want: &str| {
            let mut s = state(&ram);
            f(&mut s);
            let e = Balloon::restore(&ram, &s).map(|_| ()).unwrap_err();
            assert!(e.to_string().contains(want), "{e}");
        };
        check(&|s| s.version = 2, "version 2 is not supported");
        check(&|s| s.ram_bytes = 8 << 20, "saved for 8388608 bytes");
        check(&|s| s.host_page_bytes = 2 << 20, "2097152-byte host pages");
        check(&|s| s.target_pages = 1025, "larger than guest RAM");
        check(&|s| s.acked = 1 << 40, "does not offer");
        // Pages beyond the 1024 of RAM, overlapping, out of order, empty,
        // overflowing.
        check(&|s| s.pages.push((1020, 8)), "run 2 (first page 0x3fc, 8 pages) ends beyond the 1024 pages");
        check(&|s| s.pages.push((605, 1)), "run 2 (first page 0x25d, 1 pages) overlaps or precedes");
        check(&|s| s.pages.insert(0, (700, 1)), "run 1 (first page 0x8, 256 pages) overlaps or precedes");
        check(&|s| s.pages.push((900, 0)), "run 2 (first page 0x384, 0 pages) is empty");
        check(&|s| s.pages.push((u64::MAX, 2)), "run 2 (first page 0xffffffffffffffff, 2 pages) ends beyond");
    }

    #[test]
    fn a_truncated_or_mistyped_record_does_not_decode() {
        let ram = ram(4 << 20);
        let text = serde_json::to_string(&state(&ram)).unwrap();
        assert!(serde_json::from_str::<BalloonState>(&text[..text.len() / 2]).is_err());
        let typo = text.replace("\"target_pages\":300", "\"target_pages\":-1");
        assert!(serde_json::from_str::<BalloonState>(&typo).is_err());
        let unknown = text.replacen('{', "{\"surprise\":1,", 1);
        assert!(serde_json::from_str::<BalloonState>(&unknown).is_err(), "unknown fields are refused");
    }
}
