//! Guest memory in and out of `memory.bin`.
//!
//! Writing reads guest RAM straight from its host mapping (the vCPU is
//! stopped) and `pwrite`s it, one chunk at a time with its CRC; a full
//! image skips pages that were never touched (mincore(2)), leaving holes.
//! Reading verifies each chunk's CRC before any byte reaches guest memory.

use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::dirty::PageRange;
use crate::memory::GuestRam;
use crate::snapshot::SnapshotError;
use crate::snapshot::format::{Chunk, plan_chunks};

const PAGE: u64 = 4096;

/// Runs of resident pages of every region, as (RAM offset, length).
///
/// # Errors
/// [`SnapshotError::Io`] when mincore fails.
pub fn resident_runs(ram: &GuestRam) -> Result<Vec<(u64, u64)>, SnapshotError> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut base = 0;
    for r in ram.regions() {
        let pages = r.range.size / PAGE;
        let mut vec = vec![0u8; pages as usize];
        // SAFETY: mincore only reports residency of our own mapping into a
        // vector of one byte per page.
        let rc = unsafe { libc::mincore(r.mapping.as_ptr().cast(), r.mapping.size(), vec.as_mut_ptr()) };
        if rc != 0 {
            return Err(SnapshotError::Io { what: "mincore on guest memory".into(), source: std::io::Error::last_os_error() });
        }
        for (i, v) in vec.iter().enumerate() {
            if v & 1 == 1 {
                let off = base + i as u64 * PAGE;
                match runs.last_mut() {
                    Some(last) if last.0 + last.1 == off => last.1 += PAGE,
                    _ => runs.push((off, PAGE)),
                }
            }
        }
        base += r.range.size;
    }
    Ok(runs)
}

/// Converts guest page ranges into runs of RAM offsets (dropping anything
/// outside RAM, which a correct harvest never contains).
#[must_use]
pub fn ranges_to_runs(ram: &GuestRam, ranges: &[PageRange]) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for r in ranges {
        for page in r.first..r.end() {
            if let Some(off) = ram.ram_offset_of(page * PAGE) {
                match runs.last_mut() {
                    Some(last) if last.0 + last.1 == off => last.1 += PAGE,
                    _ => runs.push((off, PAGE)),
                }
            }
        }
    }
    runs
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
    for c in &mut chunks {
        let bytes = chunk_bytes(ram, c)?;
        c.crc32 = crc32fast::hash(bytes);
        file.write_all_at(bytes, c.file_offset).map_err(|source| SnapshotError::Io { what: "writing memory.bin".into(), source })?;
    }
    Ok(chunks)
}

/// Copies `runs` of guest RAM into `buf` (reused; resized), packed in
/// chunk order, and returns the chunks (CRCs not yet computed) with the
/// buffer. This is all a diff snapshot does while the vCPU is stopped; the
/// copy is split over two threads (the reference host has two cores).
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
    std::thread::scope(|scope| {
        scope.spawn(|| copy(back, &sources[half..]));
        copy(front, &sources[..half]);
    });
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
