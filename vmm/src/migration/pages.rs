//! Guest memory on the stream: the source's [`Sender`] turns runs of RAM
//! into [`Kind::Pages`] and [`Kind::Zeros`] frames, the destination's
//! [`PageSink`] puts them back into its RAM.
//!
//! Both work on a [`RamMap`]: guest RAM as host addresses, region by
//! region, at RAM offsets (the regions concatenated in guest-physical
//! order, as snapshots number them; both sides have the same layout, the
//! handshake checked). Every range either side touches is checked to lie
//! inside one region first: a frame naming memory outside guest RAM is an
//! error and nothing is written.
//!
//! The source reads guest memory while the guest runs. A page that
//! changes while it is read is in the dirty log and is sent again in the
//! next round, so what a round sends may be torn, never what the last
//! round sends (the guest is stopped then). Each data page is copied into
//! the frame buffer before the frame's CRC is computed, so the checksum
//! always matches the bytes on the wire. A page that is all zero when it
//! is read travels as 16 bytes of a [`Kind::Zeros`] run.

use std::io::Write;
use std::time::{Duration, Instant};

use super::MigrationError;
use super::stream::{self, HEADER_BYTES, Kind, PAGE};
use crate::memory::GuestRam;

/// Pages per [`Kind::Pages`] frame at most (1 MiB).
const FRAME_PAGES: u64 = 256;
/// Zero runs per [`Kind::Zeros`] frame at most (64 KiB of payload).
const FRAME_RUNS: usize = 4096;

/// Guest RAM as host addresses.
#[derive(Debug, Clone)]
pub struct RamMap {
    /// (RAM offset, host address, bytes) per region, in RAM order.
    regions: Vec<(u64, usize, u64)>,
}

// SAFETY: only addresses; who reads or writes through them keeps the
// memory mapped (a RamLease on the source, the destination owns its RAM)
// and says why in a SAFETY comment there.
unsafe impl Send for RamMap {}
// SAFETY: as above.
unsafe impl Sync for RamMap {}

impl RamMap {
    /// The regions of `ram`. The addresses stay valid as long as `ram`.
    #[must_use]
    pub fn of(ram: &GuestRam) -> Self {
        let mut offset = 0;
        let regions = ram
            .regions()
            .iter()
            .map(|r| {
                let region = (offset, r.mapping.as_ptr() as usize, r.range.size);
                offset += r.range.size;
                region
            })
            .collect();
        RamMap { regions }
    }

    /// Host memory given as (address, bytes) pairs, in RAM order.
    ///
    /// # Safety
    /// Each range must stay mapped, readable and writable as long as the
    /// map is used.
    #[cfg(test)]
    #[must_use]
    pub unsafe fn from_raw(parts: &[(*mut u8, u64)]) -> Self {
        let mut offset = 0;
        let regions = parts
            .iter()
            .map(|&(p, size)| {
                let region = (offset, p as usize, size);
                offset += size;
                region
            })
            .collect();
        RamMap { regions }
    }

    /// Total bytes.
    #[must_use]
    pub fn size(&self) -> u64 {
        self.regions.iter().map(|r| r.2).sum()
    }

    /// Every region as (host address, bytes).
    #[must_use]
    pub fn host_ranges(&self) -> Vec<(u64, u64)> {
        self.regions.iter().map(|r| (r.1 as u64, r.2)).collect()
    }

    /// The RAM offset of host address `addr`, when it is guest RAM.
    #[must_use]
    pub fn offset_of(&self, addr: u64) -> Option<u64> {
        self.regions.iter().find(|r| addr >= r.1 as u64 && addr < r.1 as u64 + r.2).map(|r| r.0 + (addr - r.1 as u64))
    }

    /// The host address of `len` bytes at `offset`, when they lie inside
    /// one region.
    #[must_use]
    pub fn host(&self, offset: u64, len: u64) -> Option<*mut u8> {
        let end = offset.checked_add(len)?;
        self.regions.iter().find(|r| offset >= r.0 && end <= r.0 + r.2).map(|r| (r.1 + (offset - r.0) as usize) as *mut u8)
    }
}

/// Puts guest memory on the stream.
#[derive(Debug)]
pub struct Sender<W: Write> {
    w: W,
    /// A frame being built: header room, the RAM offset, then pages.
    buf: Vec<u8>,
    /// RAM offset of the first page in `buf`, when it holds any.
    data_at: Option<u64>,
    /// Zero runs not sent yet.
    zeros: Vec<(u64, u64)>,
    /// Bytes written to the link.
    pub sent_bytes: u64,
    /// Pages sent with their contents.
    pub data_pages: u64,
    /// Pages sent as zero markers.
    pub zero_pages: u64,
    /// Bytes per second at most.
    limit: Option<u64>,
    started: Instant,
}

impl<W: Write> Sender<W> {
    /// A sender writing to `w` at most `limit` bytes per second.
    pub fn new(w: W, limit: Option<u64>) -> Self {
        let mut buf = Vec::with_capacity(HEADER_BYTES + 8 + (FRAME_PAGES * PAGE) as usize);
        buf.resize(HEADER_BYTES + 8, 0);
        Sender { w, buf, data_at: None, zeros: Vec::new(), sent_bytes: 0, data_pages: 0, zero_pages: 0, limit, started: Instant::now() }
    }

    /// The writer.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.w
    }

    /// Sends the pages of `runs` (RAM offset, bytes; page multiples) of
    /// `ram`: data pages in [`Kind::Pages`] frames, zero pages as runs.
    /// Frames go out as they fill; call [`Sender::flush`] to send the rest.
    ///
    /// # Errors
    /// [`MigrationError::OutsideRam`] for a run outside RAM (a bug);
    /// [`MigrationError::Stream`] when the link fails.
    pub fn send_runs(&mut self, ram: &RamMap, runs: &[(u64, u64)]) -> Result<(), MigrationError> {
        for &(start, len) in runs {
            let host = ram.host(start, len).ok_or_else(|| MigrationError::OutsideRam(format!("run at {start:#x} of {len} bytes")))?;
            for i in 0..len / PAGE {
                // SAFETY: inside one region (checked above), kept mapped by
                // the caller's lease. The guest may be writing this page:
                // a torn copy is resent (module docs); it is read as raw
                // bytes, which any value is.
                let page = unsafe { std::slice::from_raw_parts(host.add((i * PAGE) as usize).cast_const(), PAGE as usize) };
                self.page(start + i * PAGE, page)?;
            }
        }
        Ok(())
    }

    /// Queues one page.
    fn page(&mut self, offset: u64, page: &[u8]) -> Result<(), MigrationError> {
        if crate::memory::zero::is_zero(page) {
            self.zero_pages += 1;
            match self.zeros.last_mut() {
                Some(last) if last.0 + last.1 * PAGE == offset => last.1 += 1,
                _ => {
                    if self.zeros.len() >= FRAME_RUNS {
                        self.flush_zeros()?;
                    }
                    self.zeros.push((offset, 1));
                }
            }
            return Ok(());
        }
        let pages_in = (self.buf.len() - HEADER_BYTES - 8) as u64 / PAGE;
        let follows = self.data_at.is_some_and(|at| at + pages_in * PAGE == offset);
        if !follows || pages_in >= FRAME_PAGES {
            self.flush_data()?;
            self.data_at = Some(offset);
        }
        self.buf.extend_from_slice(page);
        self.data_pages += 1;
        Ok(())
    }

    fn flush_data(&mut self) -> Result<(), MigrationError> {
        let Some(at) = self.data_at.take() else { return Ok(()) };
        self.buf[HEADER_BYTES..HEADER_BYTES + 8].copy_from_slice(&at.to_le_bytes());
        let h = stream::header(Kind::Pages, &[&self.buf[HEADER_BYTES..]]);
        self.buf[..HEADER_BYTES].copy_from_slice(&h);
        let result = self.w.write_all(&self.buf).map_err(|source| stream::StreamError::Io { what: "sending pages", source });
        let n = self.buf.len() as u64;
        self.buf.truncate(HEADER_BYTES + 8);
        result?;
        self.sent(n);
        Ok(())
    }

    fn flush_zeros(&mut self) -> Result<(), MigrationError> {
        if self.zeros.is_empty() {
            return Ok(());
        }
        let payload = stream::encode_runs(&self.zeros);
        self.zeros.clear();
        self.frame(Kind::Zeros, &[&payload])
    }

    /// Sends everything queued.
    ///
    /// # Errors
    /// [`MigrationError::Stream`].
    pub fn flush(&mut self) -> Result<(), MigrationError> {
        self.flush_data()?;
        self.flush_zeros()?;
        self.w.flush().map_err(|source| stream::StreamError::Io { what: "sending pages", source })?;
        Ok(())
    }

    /// Sends a frame (after what is queued, so frames keep their order).
    ///
    /// # Errors
    /// [`MigrationError::Stream`].
    pub fn frame(&mut self, kind: Kind, payload: &[&[u8]]) -> Result<(), MigrationError> {
        if kind != Kind::Zeros {
            self.flush_data()?;
            self.flush_zeros()?;
        }
        stream::write_frame(&mut self.w, kind, payload)?;
        self.sent((HEADER_BYTES + payload.iter().map(|p| p.len()).sum::<usize>()) as u64);
        Ok(())
    }

    /// Sends a JSON frame.
    ///
    /// # Errors
    /// [`MigrationError::Stream`].
    pub fn json(&mut self, kind: Kind, value: &impl serde::Serialize) -> Result<(), MigrationError> {
        let bytes = serde_json::to_vec(value).map_err(|e| stream::StreamError::Malformed { kind, why: e.to_string() })?;
        self.frame(kind, &[&bytes])
    }

    /// Counts `n` bytes sent and, under a bandwidth limit, sleeps until
    /// the average rate is back within it.
    fn sent(&mut self, n: u64) {
        self.sent_bytes += n;
        if let Some(limit) = self.limit.filter(|l| *l > 0) {
            let due = Duration::from_secs_f64(self.sent_bytes as f64 / limit as f64);
            if let Some(wait) = due.checked_sub(self.started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
}

/// Puts pages from the stream into the destination's RAM.
#[derive(Debug)]
pub struct PageSink {
    ram: RamMap,
    /// One bit per page: written by a [`Kind::Pages`] frame (so a later
    /// zero marker must clear it; one never written reads as zero already).
    written: Vec<u64>,
    /// Pages received with data.
    pub data_pages: u64,
    /// Pages received as zero markers.
    pub zero_pages: u64,
}

impl PageSink {
    /// A sink writing into `ram`, which must be fresh (all zero).
    #[must_use]
    pub fn new(ram: RamMap) -> Self {
        let pages = ram.size() / PAGE;
        PageSink { written: vec![0; pages.div_ceil(64) as usize], ram, data_pages: 0, zero_pages: 0 }
    }

    /// The RAM it writes.
    #[must_use]
    pub fn ram(&self) -> &RamMap {
        &self.ram
    }

    /// Whether the page at `offset` was written.
    #[must_use]
    pub fn was_written(&self, offset: u64) -> bool {
        let p = (offset / PAGE) as usize;
        self.written.get(p / 64).is_some_and(|w| w & (1 << (p % 64)) != 0)
    }

    fn mark(&mut self, offset: u64, pages: u64, on: bool) {
        for p in offset / PAGE..offset / PAGE + pages {
            let (w, b) = ((p / 64) as usize, p % 64);
            if on {
                self.written[w] |= 1 << b;
            } else {
                self.written[w] &= !(1 << b);
            }
        }
    }

    /// A [`Kind::Pages`] payload: checked, then copied into RAM.
    ///
    /// # Errors
    /// [`MigrationError::Stream`] for a malformed payload;
    /// [`MigrationError::OutsideRam`]; nothing is written then.
    pub fn pages(&mut self, payload: &[u8]) -> Result<(), MigrationError> {
        let (offset, data) = stream::pages(payload)?;
        let len = data.len() as u64;
        let dst = self.ram.host(offset, len).ok_or_else(|| MigrationError::OutsideRam(format!("{} pages at RAM offset {offset:#x}", len / PAGE)))?;
        // SAFETY: inside one region of the destination's own RAM (checked
        // above); no vCPU runs it yet, so nothing else writes it.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
        self.mark(offset, len / PAGE, true);
        self.data_pages += len / PAGE;
        Ok(())
    }

    /// A [`Kind::Zeros`] payload: every run checked, then the pages that
    /// were written before cleared (the others are zero already and stay
    /// untouched, so they take no host memory).
    ///
    /// # Errors
    /// As [`PageSink::pages`].
    pub fn zeros(&mut self, payload: &[u8]) -> Result<(), MigrationError> {
        let runs = stream::runs(Kind::Zeros, payload)?;
        let mut hosts = Vec::with_capacity(runs.len());
        for &(offset, pages) in &runs {
            let host = self.ram.host(offset, pages * PAGE).ok_or_else(|| MigrationError::OutsideRam(format!("{pages} zero pages at RAM offset {offset:#x}")))?;
            hosts.push(host);
        }
        for (&(offset, pages), host) in runs.iter().zip(hosts) {
            for i in 0..pages {
                if self.was_written(offset + i * PAGE) {
                    // SAFETY: inside one region (checked above), as in `pages`.
                    unsafe { std::ptr::write_bytes(host.add((i * PAGE) as usize), 0, PAGE as usize) };
                }
            }
            self.mark(offset, pages, false);
            self.zero_pages += pages;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::stream::read_frame;

    /// Two "regions" of host memory, as guest RAM split by the MMIO hole.
    fn ram(pages: [usize; 2]) -> (Vec<Vec<u8>>, RamMap) {
        let mut mem: Vec<Vec<u8>> = pages.iter().map(|&p| vec![0u8; p * PAGE as usize]).collect();
        let parts: Vec<(*mut u8, u64)> = mem.iter_mut().map(|m| (m.as_mut_ptr(), m.len() as u64)).collect();
        // SAFETY: the vectors are returned with the map and outlive it in
        // every test (never resized).
        let map = unsafe { RamMap::from_raw(&parts) };
        (mem, map)
    }

    fn deliver(wire: &[u8], sink: &mut PageSink) -> Vec<Kind> {
        let mut r = wire;
        let mut buf = Vec::new();
        let mut kinds = Vec::new();
        while !r.is_empty() {
            let kind = read_frame(&mut r, &mut buf).unwrap();
            match kind {
                Kind::Pages => sink.pages(&buf).unwrap(),
                Kind::Zeros => sink.zeros(&buf).unwrap(),
                _ => {}
            }
            kinds.push(kind);
        }
        kinds
    }

    #[test]
    fn data_pages_travel_whole_and_zero_pages_as_markers() {
        let (mut src, src_map) = ram([300, 8]);
        for p in [0usize, 1, 2, 7, 299] {
            src[0][p * 4096 + 17] = p as u8 + 1;
        }
        src[1][4096 * 3] = 9;
        let mut sender = Sender::new(Vec::new(), None);
        // All of RAM, as round 0 sends it: runs cut at the region boundary.
        sender.send_runs(&src_map, &[(0, 300 * PAGE), (300 * PAGE, 8 * PAGE)]).unwrap();
        sender.flush().unwrap();
        assert_eq!((sender.data_pages, sender.zero_pages), (6, 302));
        let wire = std::mem::take(sender.get_mut());
        // 6 data pages cost their bytes; 302 zero pages cost a few runs.
        assert!(wire.len() < 6 * 4096 + 400, "{} bytes on the wire", wire.len());
        let (dst, dst_map) = ram([300, 8]);
        let mut sink = PageSink::new(dst_map);
        let kinds = deliver(&wire, &mut sink);
        assert!(kinds.contains(&Kind::Zeros) && kinds.contains(&Kind::Pages));
        assert_eq!(src, dst, "the destination's RAM is the source's");
        assert_eq!((sink.data_pages, sink.zero_pages), (6, 302));
    }

    #[test]
    fn a_page_zeroed_after_it_was_sent_is_cleared_on_the_destination() {
        let (mut src, src_map) = ram([4, 0]);
        src[0][100] = 1;
        src[0][4096 + 100] = 2;
        let (dst, dst_map) = ram([4, 0]);
        let mut sink = PageSink::new(dst_map);
        let mut sender = Sender::new(Vec::new(), None);
        sender.send_runs(&src_map, &[(0, 4 * PAGE)]).unwrap();
        sender.flush().unwrap();
        deliver(&std::mem::take(sender.get_mut()), &mut sink);
        assert_eq!(dst[0][100], 1);
        // The guest zeroes page 0 and the next round resends it.
        src[0][100] = 0;
        sender.send_runs(&src_map, &[(0, PAGE)]).unwrap();
        sender.flush().unwrap();
        deliver(&std::mem::take(sender.get_mut()), &mut sink);
        assert_eq!(src, dst);
        assert!(!sink.was_written(0) && sink.was_written(PAGE));
    }

    #[test]
    fn frames_naming_memory_outside_ram_write_nothing() {
        let (dst, dst_map) = ram([4, 2]);
        let mut sink = PageSink::new(dst_map);
        let page = vec![7u8; 4096];
        // Across the region boundary, and past the end of RAM.
        for offset in [3 * PAGE, 6 * PAGE, u64::MAX - PAGE + 1] {
            let payload = [&offset.to_le_bytes()[..], &page, &page].concat();
            let e = sink.pages(&payload).unwrap_err();
            assert!(matches!(e, MigrationError::OutsideRam(_) | MigrationError::Stream(_)), "{offset:#x}: {e}");
        }
        // A zero run past the end: refused before any run is applied.
        let runs = stream::encode_runs(&[(0, 1), (5 * PAGE, 2)]);
        assert!(matches!(sink.zeros(&runs), Err(MigrationError::OutsideRam(_))));
        assert!(dst.iter().all(|r| r.iter().all(|&b| b == 0)));
        assert_eq!((sink.data_pages, sink.zero_pages), (0, 0));
    }

    #[test]
    fn the_bandwidth_limit_paces_the_sender() {
        let (mut src, map) = ram([64, 0]);
        src[0].iter_mut().for_each(|b| *b = 1);
        // 256 KiB at 2 MiB/s: about 125 ms.
        let mut sender = Sender::new(std::io::sink(), Some(2 << 20));
        let t = Instant::now();
        sender.send_runs(&map, &[(0, 64 * PAGE)]).unwrap();
        sender.flush().unwrap();
        let took = t.elapsed();
        assert!(took >= Duration::from_millis(120), "{took:?}");
    }
}
