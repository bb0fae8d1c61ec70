//! Guest memory in and out of `memory.bin`.
//!
//! Writing reads guest RAM straight from its host mapping (the vCPU is
//! stopped) and `pwrite`s it, one chunk at a time with its CRC, starting
//! the file's writeback as it goes ([`crate::fsutil::WriteBehind`]); a
//! full image skips pages that were never touched (pagemap or SEEK_DATA,
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

fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> SnapshotError {
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

/// Writes `runs` of guest RAM to `file` and returns the chunks with CRCs.
/// `packed` packs them (diff); otherwise each lands at its RAM offset (full).
///
/// # Errors
/// [`SnapshotError::Io`] (e.g. ENOSPC).
pub fn write(ram: &GuestRam, file: &File, runs: &[(u64, u64)], packed: bool) -> Result<Vec<Chunk>, SnapshotError> {
    let mut chunks = plan_chunks(runs, packed);
    // The disk flushes what is written while the rest is copied; the
    // caller's fsync then waits only for the tail.
    let mut behind = crate::fsutil::WriteBehind::new(file);
    let failed = |source| SnapshotError::Io { what: "writing memory.bin".into(), source };
    for c in &mut chunks {
        let bytes = chunk_bytes(ram, c)?;
        c.crc32 = crc32fast::hash(bytes);
        file.write_all_at(bytes, c.file_offset).map_err(failed)?;
        behind.written_to(c.file_offset + c.len).map_err(failed)?;
    }
    Ok(chunks)
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
