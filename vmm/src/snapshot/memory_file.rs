//! Guest memory in and out of `memory.bin`.
//!
//! Writing reads guest RAM straight from its host mapping (the vCPU is
//! stopped) and `pwrite`s it with a CRC per chunk: with `O_DIRECT` from two
//! threads where the file system takes it, else through the page cache,
//! starting the file's writeback as it goes ([`crate::fsutil::WriteBehind`]);
//! a full image skips pages that were never touched (pagemap or SEEK_DATA,
//! see [`pages_to_save`]), leaving holes.
//! Reading verifies each chunk's CRC before any byte reaches guest memory.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use crate::dirty::PageRange;
use crate::memory::GuestRam;
use crate::snapshot::SnapshotError;
use crate::snapshot::format::{Chunk, plan_chunks};

const PAGE: u64 = 4096;

/// `/proc/self/pagemap` bits (Documentation/admin-guide/mm/pagemap.rst):
/// bit 63 page present, bit 62 page swapped.
const PAGEMAP_PRESENT: u64 = 1 << 63;
const PAGEMAP_SWAPPED: u64 = 1 << 62;

/// Adds `[off, off + len)` to `runs`, merging with the previous run only
/// when it is in the same region (a run never crosses regions, so every
/// chunk maps to one host range).
fn push_run(runs: &mut Vec<(u64, u64)>, region_start: u64, off: u64, len: u64) {
    match runs.last_mut() {
        Some(last) if last.0 >= region_start && last.0 + last.1 == off => last.1 += len,
        _ => runs.push((off, len)),
    }
}

/// Which pages of `ram` a full snapshot must save, as runs of (RAM offset,
/// length), none crossing a region boundary:
/// - anonymous memory: every page present or swapped out (pagemap), so
///   pages that were never touched stay holes and none in swap is lost;
/// - memfd/hugetlb memory: the file's data (SEEK_DATA/SEEK_HOLE, which
///   counts swapped shmem pages; hugetlbfs reports everything as data);
/// - a lazily restored region: all of it (untouched pages are in the image
///   file, not in this process).
///
/// # Errors
/// [`SnapshotError::Io`] when pagemap or lseek fails.
pub fn pages_to_save(ram: &GuestRam) -> Result<Vec<(u64, u64)>, SnapshotError> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut base = 0;
    for r in ram.regions() {
        let m = &r.mapping;
        if m.from_image() {
            push_run(&mut runs, base, base, r.range.size);
        } else if let Some(fd) = m.fd() {
            data_runs(fd.as_raw_fd(), r.range.size, base, &mut runs)?;
        } else {
            present_runs(m.as_ptr() as u64, r.range.size, base, &mut runs)?;
        }
        base += r.range.size;
    }
    Ok(runs)
}

fn present_runs(addr: u64, size: u64, base: u64, runs: &mut Vec<(u64, u64)>) -> Result<(), SnapshotError> {
    const BATCH: u64 = 64 * 1024;
    let pagemap = File::open("/proc/self/pagemap").map_err(io_err("opening /proc/self/pagemap"))?;
    let pages = size / PAGE;
    let mut buf = vec![0u8; (BATCH * 8) as usize];
    let mut done = 0;
    while done < pages {
        let n = BATCH.min(pages - done);
        let bytes = &mut buf[..(n * 8) as usize];
        pagemap.read_exact_at(bytes, (addr / PAGE + done) * 8).map_err(io_err("reading /proc/self/pagemap"))?;
        for (i, e) in bytes.chunks_exact(8).enumerate() {
            let entry = u64::from_le_bytes(e.try_into().expect("8-byte chunk"));
            if entry & (PAGEMAP_PRESENT | PAGEMAP_SWAPPED) != 0 {
                push_run(runs, base, base + (done + i as u64) * PAGE, PAGE);
            }
        }
        done += n;
    }
    Ok(())
}

fn data_runs(fd: i32, size: u64, base: u64, runs: &mut Vec<(u64, u64)>) -> Result<(), SnapshotError> {
    let mut pos: i64 = 0;
    let end = i64::try_from(size).unwrap_or(i64::MAX);
    while pos < end {
        // SAFETY: lseek on our own memfd only moves its file offset.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            // ENXIO: no data at or after `pos`.
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            return Err(io_err("lseek(SEEK_DATA) on guest memory")(std::io::Error::last_os_error()));
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) }.min(end);
        if hole <= data {
            break;
        }
        let start = (data as u64) / PAGE * PAGE;
        let stop = (hole as u64).div_ceil(PAGE) * PAGE;
        push_run(runs, base, base + start, stop.min(size) - start);
        pos = hole;
    }
    Ok(())
}

fn io_err(what: &'static str) -> impl Fn(std::io::Error) -> SnapshotError + Copy {
    move |source| SnapshotError::Io { what: what.into(), source }
}

/// Converts guest page ranges into runs of RAM offsets (dropping anything
/// outside RAM, which a correct harvest never contains); runs never cross
/// a region boundary.
#[must_use]
pub fn ranges_to_runs(ram: &GuestRam, ranges: &[PageRange]) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut region_start = u64::MAX;
    for r in ranges {
        for page in r.first..r.end() {
            if let Some((off, start)) = ram.ram_offset_of(page * PAGE).zip(ram.region_offset_of(page * PAGE)) {
                if start != region_start {
                    region_start = start;
                    runs.push((off, PAGE));
                } else {
                    push_run(&mut runs, start, off, PAGE);
                }
            }
        }
    }
    runs
}

/// `runs` without the bytes of `holes`: both are ascending, disjoint
/// `(RAM offset, length)` runs; a run cut by a hole becomes the pieces on
/// either side (so no result crosses a region boundary a run did not).
#[must_use]
pub fn subtract(runs: &[(u64, u64)], holes: &[(u64, u64)]) -> Vec<(u64, u64)> {
    if holes.is_empty() {
        return runs.to_vec();
    }
    let mut out = Vec::with_capacity(runs.len());
    let mut h = 0;
    for &(start, len) in runs {
        let end = start + len;
        let mut at = start;
        // Holes wholly before this run cannot cut it or any later one.
        while h < holes.len() && holes[h].0 + holes[h].1 <= at {
            h += 1;
        }
        let mut i = h;
        while at < end && i < holes.len() && holes[i].0 < end {
            let (hs, he) = (holes[i].0, holes[i].0 + holes[i].1);
            if hs > at {
                out.push((at, hs - at));
            }
            at = at.max(he);
            i += 1;
        }
        if at < end {
            out.push((at, end - at));
        }
    }
    out
}

/// Guest RAM bytes of a chunk.
fn chunk_bytes<'a>(ram: &'a GuestRam, c: &Chunk) -> Result<&'a [u8], SnapshotError> {
    let ptr = ram.host_range(c.ram_offset, c.len).ok_or_else(|| SnapshotError::Corrupt(format!("chunk at RAM offset {:#x} is outside guest RAM", c.ram_offset)))?;
    // SAFETY: `host_range` checked the range lies inside one live mapping;
    // the vCPU is stopped, so the guest does not write it while we read.
    Ok(unsafe { std::slice::from_raw_parts(ptr, c.len as usize) })
}

/// Bytes of guest RAM a full-image writer takes at a time (a *group*):
/// it finds the group's zero pages, CRCs the chunks of its data and
/// `pwrite`s each stretch of data straight from guest memory. Measured on
/// the reference host's virtio disk (2 GiB, O_DIRECT, two threads; 4
/// rounds): 1 MiB writes gave 507–631 MB/s, 4 MiB ones 474–600.
const WRITE_GROUP_BYTES: u64 = 1 << 20;

/// Writes a full image: the pages of `runs` of guest RAM that are not all
/// zero, each chunk at its RAM offset in `file`, and returns the chunks
/// with their CRCs. Zero pages are left out: the file is created empty
/// and sized to RAM afterwards, so they are holes, which read back as
/// zeros, and a restore leaves them untouched (fresh RAM is zero). Each
/// page is tested just before its chunk's CRC reads it, so the test costs
/// a pass over pages that are already in the cache; a page that holds
/// data usually fails it in its first 64 bytes.
///
/// With `direct` (`file` opened by [`crate::fsutil::create_direct`]) two
/// threads take turns over groups: each tests and CRCs its group and
/// `pwrite`s it straight from guest memory, so one thread's CRCs overlap
/// the other's write and nothing is copied into the page cache.
/// On the reference host `vmm bench snapshot` writes 2 GiB this way at
/// 405–646 MB/s; in a C probe of the two strategies, alternating on the
/// same disk, direct writes never fell below 450 MB/s where the buffered
/// path below swung between 281 and 603 (docs/PERFORMANCE.md). A file
/// system that takes `O_DIRECT` at open but
/// then refuses a write of whole pages (EINVAL) gets the buffered path.
///
/// # Errors
/// [`SnapshotError::Io`] (e.g. ENOSPC); [`SnapshotError::Corrupt`] when a
/// run lies outside guest RAM.
pub fn write(ram: &GuestRam, file: &File, runs: &[(u64, u64)], direct: bool) -> Result<Vec<Chunk>, SnapshotError> {
    let groups = write_groups(runs);
    if direct {
        match write_direct(ram, file, &groups) {
            Ok(chunks) => return Ok(chunks),
            Err(WriteFailure::Io(e)) if e.raw_os_error() == Some(libc::EINVAL) => {
                ::log::debug!("O_DIRECT write refused ({e}); writing memory.bin through the page cache");
                crate::fsutil::set_direct(file, false).map_err(io_err("turning O_DIRECT off on memory.bin"))?;
            }
            Err(WriteFailure::Io(e)) => return Err(io_err("writing memory.bin")(e)),
            Err(WriteFailure::Snapshot(e)) => return Err(e),
        }
    }
    write_buffered(ram, file, &groups)
}

/// Why [`write_direct`] stopped: an I/O error is kept raw so that the
/// caller can tell EINVAL (direct I/O refused) from the rest.
enum WriteFailure {
    Io(std::io::Error),
    Snapshot(SnapshotError),
}

/// Cuts `runs` into groups of at most [`WRITE_GROUP_BYTES`], each inside
/// one run. A run never crosses a region ([`pages_to_save`], [`subtract`]),
/// so a group is one host range and, in a full image, one file range; RAM
/// offsets alone would not tell, since they run on across the MMIO hole.
fn write_groups(runs: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut groups = Vec::new();
    for &(start, len) in runs {
        let mut off = 0;
        while off < len {
            let n = (len - off).min(WRITE_GROUP_BYTES);
            groups.push((start + off, n));
            off += n;
        }
    }
    groups
}
const _: () = assert!(WRITE_GROUP_BYTES.is_multiple_of(crate::snapshot::format::CHUNK_BYTES));

/// Runs of RAM `(offset, length)`.
type Runs = Vec<(u64, u64)>;

/// One group of a full image: its data pages as runs (zero pages cut out)
/// and their chunks, CRCs computed. The caller writes each run at its RAM
/// offset.
fn plan_group(ram: &GuestRam, group: (u64, u64)) -> Result<(Runs, Vec<Chunk>), SnapshotError> {
    let bytes = chunk_bytes(ram, &Chunk { ram_offset: group.0, file_offset: group.0, len: group.1, crc32: 0 })?;
    let mut data = Vec::new();
    crate::memory::zero::data_runs(bytes, group.0, &mut data);
    let mut chunks = plan_chunks(&data, false);
    for c in &mut chunks {
        c.crc32 = crc32fast::hash(chunk_bytes(ram, c)?);
    }
    Ok((data, chunks))
}

/// The direct path of [`write`]: returns the chunks written, in RAM order.
fn write_direct(ram: &GuestRam, file: &File, groups: &[(u64, u64)]) -> Result<Vec<Chunk>, WriteFailure> {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    // One writer: takes the next group until none is left or the other
    // writer failed; returns (group index, its chunks) for the groups it wrote.
    let writer = || -> Result<Vec<(usize, Vec<Chunk>)>, WriteFailure> {
        let mut done = Vec::new();
        while !failed.load(Ordering::Relaxed) {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(&group) = groups.get(i) else { break };
            let result = (|| {
                let (data, chunks) = plan_group(ram, group).map_err(WriteFailure::Snapshot)?;
                for &(start, len) in &data {
                    let bytes = chunk_bytes(ram, &Chunk { ram_offset: start, file_offset: start, len, crc32: 0 }).map_err(WriteFailure::Snapshot)?;
                    file.write_all_at(bytes, start).map_err(WriteFailure::Io)?;
                }
                Ok(chunks)
            })();
            match result {
                Ok(chunks) => done.push((i, chunks)),
                Err(e) => {
                    failed.store(true, Ordering::Relaxed);
                    return Err(e);
                }
            }
        }
        Ok(done)
    };
    let (front, back) = std::thread::scope(|scope| {
        let other = scope.spawn(writer);
        let mine = writer();
        (mine, other.join().unwrap_or_else(|_| Err(WriteFailure::Snapshot(SnapshotError::Corrupt("a snapshot writer thread panicked".into())))))
    });
    let mut by_group: Vec<Option<Vec<Chunk>>> = vec![None; groups.len()];
    for (i, chunks) in front?.into_iter().chain(back?) {
        by_group[i] = Some(chunks);
    }
    Ok(by_group.into_iter().flatten().flatten().collect())
}

/// The buffered path of [`write`]: one thread, group by group, starting
/// the disk's writeback behind itself ([`crate::fsutil::WriteBehind`]) so
/// that the caller's fsync waits only for the tail.
fn write_buffered(ram: &GuestRam, file: &File, groups: &[(u64, u64)]) -> Result<Vec<Chunk>, SnapshotError> {
    let mut behind = crate::fsutil::WriteBehind::new(file);
    let failed = io_err("writing memory.bin");
    let mut all = Vec::new();
    for &group in groups {
        let (data, chunks) = plan_group(ram, group)?;
        for &(start, len) in &data {
            let bytes = chunk_bytes(ram, &Chunk { ram_offset: start, file_offset: start, len, crc32: 0 })?;
            file.write_all_at(bytes, start).map_err(failed)?;
            behind.written_to(start + len).map_err(failed)?;
        }
        all.extend(chunks);
    }
    Ok(all)
}

/// Below this many bytes [`copy_out`] copies on the calling thread: a
/// thread's start and join (tens of µs) would cost more than the copy.
const SPLIT_COPY_BYTES: u64 = 1 << 20;

/// Copies `runs` of guest RAM into `buf` (reused; resized), packed in
/// chunk order, and returns the chunks (CRCs not yet computed) with the
/// buffer. This is all a diff snapshot does while the vCPU is stopped; a
/// large copy is split over two threads (the reference host has two
/// cores), a small one (a diff's final stop usually copies a page or two)
/// is not worth starting a thread for.
///
/// # Errors
/// [`SnapshotError::Corrupt`] when a run is outside guest RAM.
pub fn copy_out(ram: &GuestRam, runs: &[(u64, u64)], mut buf: Vec<u8>) -> Result<(Vec<Chunk>, Vec<u8>), SnapshotError> {
    let chunks = plan_chunks(runs, true);
    let total: u64 = chunks.iter().map(|c| c.len).sum();
    buf.resize(total as usize, 0);
    let sources = chunks.iter().map(|c| chunk_bytes(ram, c)).collect::<Result<Vec<&[u8]>, _>>()?;
    let half = chunks.len() / 2;
    let split_at = chunks.get(half).map_or(buf.len(), |c| c.file_offset as usize);
    let (front, back) = buf.split_at_mut(split_at);
    let copy = |dst: &mut [u8], srcs: &[&[u8]]| {
        let mut at = 0;
        for s in srcs {
            dst[at..at + s.len()].copy_from_slice(s);
            at += s.len();
        }
    };
    if total < SPLIT_COPY_BYTES {
        copy(front, &sources[..half]);
        copy(back, &sources[half..]);
    } else {
        std::thread::scope(|scope| {
            scope.spawn(|| copy(back, &sources[half..]));
            copy(front, &sources[..half]);
        });
    }
    Ok((chunks, buf))
}

/// Reads every chunk straight into guest RAM and verifies its CRC there
/// (no bounce buffer; the chunks are split over two threads). On a
/// mismatch the restore is abandoned: the guest memory written is the new
/// VM's own and is thrown away with it, and no file is changed.
///
/// # Errors
/// [`SnapshotError::Corrupt`] on a CRC mismatch or a chunk outside RAM,
/// [`SnapshotError::Io`] on a short read.
pub fn apply(ram: &GuestRam, file: &File, chunks: &[Chunk]) -> Result<(), SnapshotError> {
    let load = |part: &[Chunk], first: usize| -> Result<(), SnapshotError> {
        for (n, c) in part.iter().enumerate() {
            let i = first + n;
            let ptr = ram.host_range(c.ram_offset, c.len).ok_or_else(|| SnapshotError::Corrupt(format!("chunk {i} is outside guest RAM")))?;
            // SAFETY: the range lies inside one live mapping (checked above);
            // no vCPU runs during a restore and the two threads load
            // disjoint chunks (a validated manifest has no overlaps).
            let dst = unsafe { std::slice::from_raw_parts_mut(ptr, c.len as usize) };
            file.read_exact_at(dst, c.file_offset).map_err(|source| SnapshotError::Io { what: format!("reading memory chunk {i}"), source })?;
            if crc32fast::hash(dst) != c.crc32 {
                return Err(SnapshotError::Corrupt(format!("memory chunk {i} (RAM offset {:#x}) fails its checksum", c.ram_offset)));
            }
        }
        Ok(())
    };
    let half = chunks.len() / 2;
    std::thread::scope(|scope| {
        let back = scope.spawn(|| load(&chunks[half..], half));
        let front = load(&chunks[..half], 0);
        front.and(back.join().unwrap_or_else(|_| Err(SnapshotError::Corrupt("a restore thread panicked".into()))))
    })
}

/// Verifies every chunk's CRC without writing guest memory.
///
/// # Errors
/// As [`apply`].
pub fn verify(file: &File, chunks: &[Chunk]) -> Result<(), SnapshotError> {
    let mut buf = Vec::new();
    for (i, c) in chunks.iter().enumerate() {
        buf.resize(c.len as usize, 0);
        file.read_exact_at(&mut buf, c.file_offset).map_err(|source| SnapshotError::Io { what: format!("reading memory chunk {i}"), source })?;
        if crc32fast::hash(&buf) != c.crc32 {
            return Err(SnapshotError::Corrupt(format!("memory chunk {i} (RAM offset {:#x}) fails its checksum", c.ram_offset)));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::VmConfig;

    #[test]
    fn write_groups_stay_inside_their_runs() {
        let g = WRITE_GROUP_BYTES;
        // One long run: groups of WRITE_GROUP_BYTES, the last one shorter.
        assert_eq!(write_groups(&[(0, 2 * g + 4096)]), [(0, g), (g, g), (2 * g, 4096)]);
        // Runs with gaps between them: a group each.
        assert_eq!(write_groups(&[(0, 4096), (8192, 4096), (20480, 4096)]), [(0, 4096), (8192, 4096), (20480, 4096)]);
        assert!(write_groups(&[]).is_empty());
        // Two runs meeting at one RAM offset (as the regions either side
        // of the MMIO hole do): no group spans them.
        assert_eq!(write_groups(&[(0, 8192), (8192, 8192)]), [(0, 8192), (8192, 8192)]);
    }

    /// 8 MiB of anonymous guest RAM with a distinct word in every page
    /// but the untouched ones.
    fn patterned_ram() -> GuestRam {
        let ram = GuestRam::new(&VmConfig { mem_size: 8 << 20, backing: crate::config::Backing::Anon, ..VmConfig::default() }).unwrap();
        let m = &ram.regions()[0].mapping;
        for page in (0..m.size() as u64 / PAGE).filter(|p| p % 5 != 3) {
            // SAFETY: writing inside our own fresh mapping.
            unsafe { m.as_ptr().add((page * PAGE + page % 512 * 8) as usize).cast::<u64>().write_unaligned(page * 0x9e37_79b9 + 1) };
        }
        ram
    }

    #[test]
    fn a_full_image_written_either_way_reads_back_into_the_same_memory() {
        let ram = patterned_ram();
        let runs = pages_to_save(&ram).unwrap();
        assert!(runs.len() > 1, "untouched pages are holes between the runs: {runs:?}");
        for direct in [true, false] {
            let path = std::env::temp_dir().join(format!("memvisor-memfile-{}-{direct}", std::process::id()));
            let (file, is_direct) = if direct { crate::fsutil::create_direct(&path).unwrap() } else { (File::create(&path).unwrap(), false) };
            let chunks = write(&ram, &file, &runs, is_direct).unwrap();
            file.sync_all().unwrap();
            assert_eq!(chunks.iter().map(|c| c.len).sum::<u64>(), runs.iter().map(|r| r.1).sum::<u64>());
            assert!(chunks.iter().all(|c| c.file_offset == c.ram_offset));
            let back = File::open(&path).unwrap();
            verify(&back, &chunks).unwrap();
            let copy = GuestRam::new(&VmConfig { mem_size: 8 << 20, backing: crate::config::Backing::Anon, ..VmConfig::default() }).unwrap();
            apply(&copy, &back, &chunks).unwrap();
            let (a, b) = (&ram.regions()[0].mapping, &copy.regions()[0].mapping);
            // SAFETY: reading our own mappings, both 8 MiB.
            let same = unsafe { std::slice::from_raw_parts(a.as_ptr(), a.size()) == std::slice::from_raw_parts(b.as_ptr(), b.size()) };
            assert!(same, "direct {direct}: the restored memory differs");
            std::fs::remove_file(&path).unwrap();
        }
    }

    #[test]
    fn zero_pages_are_holes_in_the_image_and_stay_untouched_by_a_restore() {
        let ram = patterned_ram();
        let m = &ram.regions()[0].mapping;
        let pages = m.size() as u64 / PAGE;
        // Every third page that holds data is zeroed again: resident, but
        // holding nothing.
        let zeroed: Vec<u64> = (0..pages).filter(|p| p % 5 != 3 && p % 3 == 0).collect();
        for p in &zeroed {
            // SAFETY: a page inside our own mapping.
            unsafe { std::ptr::write_bytes(m.as_ptr().add((p * PAGE) as usize), 0, PAGE as usize) };
        }
        let runs = pages_to_save(&ram).unwrap();
        let listed: u64 = runs.iter().map(|r| r.1 / PAGE).sum();
        assert_eq!(listed, (0..pages).filter(|p| p % 5 != 3).count() as u64, "zeroed pages are still resident, so listed");
        let data_pages = listed - zeroed.len() as u64;
        for direct in [true, false] {
            let path = std::env::temp_dir().join(format!("memvisor-memfile-zero-{}-{direct}", std::process::id()));
            let (file, is_direct) = if direct { crate::fsutil::create_direct(&path).unwrap() } else { (File::create(&path).unwrap(), false) };
            let chunks = write(&ram, &file, &runs, is_direct).unwrap();
            file.set_len(ram.size()).unwrap();
            file.sync_all().unwrap();
            assert_eq!(chunks.iter().map(|c| c.len).sum::<u64>(), data_pages * PAGE, "direct {direct}: only data pages are saved");
            for c in &chunks {
                assert!(zeroed.iter().all(|p| p * PAGE < c.ram_offset || p * PAGE >= c.ram_offset + c.len), "direct {direct}: chunk {c:?} holds a zero page");
            }
            let allocated = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&path).unwrap()) * 512;
            assert!(allocated <= data_pages * PAGE + (64 << 10), "direct {direct}: zero pages are holes: {allocated} bytes allocated for {} of data", data_pages * PAGE);
            let back = File::open(&path).unwrap();
            verify(&back, &chunks).unwrap();
            let copy = GuestRam::new(&VmConfig { mem_size: 8 << 20, backing: crate::config::Backing::Anon, ..VmConfig::default() }).unwrap();
            apply(&copy, &back, &chunks).unwrap();
            // Before the comparison below reads (and so maps) every page.
            let resident: u64 = pages_to_save(&copy).unwrap().iter().map(|r| r.1 / PAGE).sum();
            assert_eq!(resident, data_pages, "direct {direct}: the restore wrote no zero page (they stay holes in RAM too)");
            let (a, b) = (&ram.regions()[0].mapping, &copy.regions()[0].mapping);
            // SAFETY: reading our own mappings, both 8 MiB.
            let same = unsafe { std::slice::from_raw_parts(a.as_ptr(), a.size()) == std::slice::from_raw_parts(b.as_ptr(), b.size()) };
            assert!(same, "direct {direct}: the restored memory differs");
            std::fs::remove_file(&path).unwrap();
        }
    }

    #[test]
    fn a_full_image_of_ram_split_by_the_mmio_hole_writes_both_sides() {
        // Two regions (below and above the hole), the pages on either side
        // of the boundary touched: their RAM offsets follow each other.
        let config = VmConfig { mem_size: crate::layout::MMIO_HOLE_START.0 + (8 << 20), backing: crate::config::Backing::Anon, ..VmConfig::default() };
        let ram = GuestRam::new(&config).unwrap();
        assert_eq!(ram.regions().len(), 2);
        let below = ram.regions()[0].range.size;
        for (off, word) in [(below - PAGE, 0x1111u64), (below, 0x2222), (below + PAGE, 0x3333)] {
            let p = ram.host_range(off, PAGE).unwrap();
            // SAFETY: a page inside our own mapping (host_range checked it).
            unsafe { p.cast::<u64>().write(word) };
        }
        let runs = pages_to_save(&ram).unwrap();
        let path = std::env::temp_dir().join(format!("memvisor-memfile-split-{}", std::process::id()));
        let (file, direct) = crate::fsutil::create_direct(&path).unwrap();
        let chunks = write(&ram, &file, &runs, direct).unwrap();
        assert_eq!(chunks.iter().map(|c| c.len).sum::<u64>(), 3 * PAGE);
        let copy = GuestRam::new(&config).unwrap();
        apply(&copy, &File::open(&path).unwrap(), &chunks).unwrap();
        for (off, word) in [(below - PAGE, 0x1111u64), (below, 0x2222), (below + PAGE, 0x3333)] {
            // SAFETY: as above, in the copy.
            assert_eq!(unsafe { copy.host_range(off, PAGE).unwrap().cast::<u64>().read() }, word);
        }
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_failed_direct_write_reports_the_error() {
        let ram = patterned_ram();
        let runs = pages_to_save(&ram).unwrap();
        let path = std::env::temp_dir().join(format!("memvisor-memfile-ro-{}", std::process::id()));
        std::fs::write(&path, b"").unwrap();
        // Opened read-only: every write fails with EBADF, not EINVAL, so
        // no fallback hides it.
        let file = File::open(&path).unwrap();
        let e = write(&ram, &file, &runs, true).unwrap_err();
        assert!(matches!(&e, SnapshotError::Io { source, .. } if source.raw_os_error() == Some(libc::EBADF)), "{e}");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn subtract_cuts_holes_out_of_runs() {
        let p = PAGE;
        // A hole inside a run, one over a run's end and the next's start,
        // one covering a run, and one beyond everything.
        let runs = [(0, 10 * p), (20 * p, 5 * p), (30 * p, 2 * p), (40 * p, 4 * p)];
        let holes = [(2 * p, 3 * p), (8 * p, 14 * p), (30 * p, 2 * p), (100 * p, p)];
        assert_eq!(subtract(&runs, &holes), [(0, 2 * p), (5 * p, 3 * p), (22 * p, 3 * p), (40 * p, 4 * p)]);
        assert_eq!(subtract(&runs, &[]), runs);
        assert_eq!(subtract(&[], &holes), []);
        // A hole spanning several runs removes them all.
        assert_eq!(subtract(&runs, &[(0, 50 * p)]), []);
    }
}
