//! Files in and out. Reading: [`read_bounded`] reads only a regular file
//! no larger than a stated cap, so a path naming `/dev/zero`, a FIFO or a
//! huge file (or a symlink to one) is refused before anything is read.
//! Writing so that a crash never leaves a half-written file: write a
//! temporary file beside the target, fsync it, rename it over the target,
//! fsync the directory. [`WriteBehind`] makes the fsync of a large file
//! cheaper by flushing it while it is written; [`create_direct`] opens one
//! that bypasses the page cache altogether.

use std::io::{Read, Write};
use std::path::Path;

/// Reads `path` whole when it is a regular file (after symlinks) of at
/// most `cap` bytes; its size is checked on the open file before reading,
/// and the read stops at `cap` whatever the file does meanwhile.
///
/// # Errors
/// The open's or read's error, or `InvalidInput` with a message naming the
/// file's type or its size against `cap`.
pub fn read_bounded(path: &Path, cap: u64) -> std::io::Result<Vec<u8>> {
    let file = std::fs::File::open(path)?;
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        let kind = describe(&meta.file_type());
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{} is {kind}, not a regular file", path.display())));
    }
    if meta.len() > cap {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{} is {} bytes, more than the {cap} allowed", path.display(), meta.len())));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.take(cap.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > cap {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{} grew past the {cap} bytes allowed while it was read", path.display())));
    }
    Ok(bytes)
}

/// [`read_bounded`] as text.
///
/// # Errors
/// As [`read_bounded`], or `InvalidData` when the file is not UTF-8.
pub fn read_bounded_text(path: &Path, cap: u64) -> std::io::Result<String> {
    String::from_utf8(read_bounded(path, cap)?).map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{} is not UTF-8 text", path.display())))
}

/// What a file that is not regular is, for messages.
fn describe(t: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt as _;
    if t.is_dir() {
        "a directory"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// Writes `bytes` to `path` atomically.
///
/// # Errors
/// The I/O error; the target is then unchanged and no temporary remains.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Creates (or truncates) `path` for writing with `O_DIRECT` (open(2)):
/// writes then go from the caller's buffer to the disk, with no copy into
/// the page cache and no writeback to wait for at the fsync. Returns the
/// file and whether it is direct: a file system that refuses `O_DIRECT`
/// (open fails with EINVAL) gets an ordinary file instead.
///
/// A direct write's buffer address, length and file offset must be
/// multiples of the device's logical block size (512 bytes or 4 KiB);
/// callers write whole 4 KiB pages, and fall back to [`set_direct`]`(false)`
/// if a write still fails with EINVAL.
///
/// # Errors
/// The I/O error of the open.
pub fn create_direct(path: &Path) -> std::io::Result<(std::fs::File, bool)> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    match options.clone().custom_flags(libc::O_DIRECT).open(path) {
        Ok(f) => Ok((f, true)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok((options.open(path)?, false)),
        Err(e) => Err(e),
    }
}

/// Switches `O_DIRECT` on or off for an open file (fcntl(2) `F_SETFL`,
/// which Linux lets change that flag).
///
/// # Errors
/// The I/O error of fcntl.
pub fn set_direct(file: &std::fs::File, on: bool) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL only reads the open file's status flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let flags = if on { flags | libc::O_DIRECT } else { flags & !libc::O_DIRECT };
    // SAFETY: F_SETFL changes only the status flags of our own open file.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Writeback started as a large file is written, rather than left to its
/// final fsync: the disk writes one window while the caller fills the
/// next, so writing and flushing overlap instead of running one after the
/// other (a 2 GiB file stays below `vm.dirty_background_ratio` on a host
/// with 24 GiB, so the kernel itself would not start before the fsync).
/// Dirty pages are bounded too: before starting a window, the caller waits
/// for the one [`WriteBehind::LAG`] windows back. It is no durability
/// guarantee (sync_file_range(2) flushes neither metadata nor the disk's
/// cache): the caller still fsyncs at the end, which then finds little left.
#[derive(Debug)]
pub struct WriteBehind<'a> {
    file: &'a std::fs::File,
    /// Writeback was started for everything before this file offset.
    started: u64,
    /// Writeback has completed for everything before this offset.
    waited: u64,
}

impl<'a> WriteBehind<'a> {
    /// Bytes per writeback window: large enough to keep a virtio disk's
    /// queue full, small enough that the first window's flush starts early.
    pub const WINDOW: u64 = 16 << 20;
    /// Windows in flight before the writer waits (at most 80 MiB dirty).
    pub const LAG: u64 = 4;

    /// Write-behind for `file`, written from offset 0 upwards.
    #[must_use]
    pub fn new(file: &'a std::fs::File) -> Self {
        WriteBehind { file, started: 0, waited: 0 }
    }

    /// Notes that the file has been written up to `end` (offsets only grow;
    /// holes in between are fine): starts writeback of the window behind
    /// it once a whole one has accumulated.
    ///
    /// # Errors
    /// The I/O error sync_file_range(2) reports (e.g. EIO, ENOSPC).
    pub fn written_to(&mut self, end: u64) -> std::io::Result<()> {
        use std::os::fd::AsRawFd as _;
        if end < self.started + Self::WINDOW {
            return Ok(());
        }
        let fd = self.file.as_raw_fd();
        let range = |from: u64, to: u64| (i64::try_from(from).unwrap_or(i64::MAX), i64::try_from(to - from).unwrap_or(i64::MAX));
        let (off, len) = range(self.started, end);
        // SAFETY: sync_file_range only reads the arguments; `fd` is open for
        // as long as `self` borrows the file.
        if unsafe { libc::sync_file_range(fd, off, len, libc::SYNC_FILE_RANGE_WRITE) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        self.started = end;
        let settled = self.started.saturating_sub(Self::LAG * Self::WINDOW);
        if settled > self.waited {
            let (off, len) = range(self.waited, settled);
            let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER;
            // SAFETY: as above.
            if unsafe { libc::sync_file_range(fd, off, len, flags) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            self.waited = settled;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_within_the_cap_are_read() {
        let dir = std::env::temp_dir().join(format!("memvisor-read-bounded-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let small = dir.join("small");
        std::fs::write(&small, b"hello").unwrap();
        assert_eq!(read_bounded(&small, 5).unwrap(), b"hello");
        let e = read_bounded(&small, 4).unwrap_err().to_string();
        assert!(e.contains("5 bytes, more than the 4 allowed"), "{e}");
        let e = read_bounded(Path::new("/dev/zero"), 1 << 20).unwrap_err().to_string();
        assert!(e.contains("a character device"), "{e}");
        let link = dir.join("zero-link");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        assert!(read_bounded(&link, 1 << 20).unwrap_err().to_string().contains("not a regular file"), "a symlink to a device is refused");
        assert!(read_bounded(&dir, 1 << 20).unwrap_err().to_string().contains("a directory"));
        std::fs::write(dir.join("bad"), [0xff, 0xfe]).unwrap();
        assert!(read_bounded_text(&dir.join("bad"), 10).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn atomic_writes_replace_the_file_and_leave_no_temporary() {
        let dir = std::env::temp_dir().join(format!("memvisor-fsutil-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("r.json");
        write_atomic(&f, b"one").unwrap();
        write_atomic(&f, b"two").unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        assert!(write_atomic(&dir.join("missing/x"), b"x").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn direct_files_take_page_aligned_writes_and_can_turn_buffered() {
        use std::os::unix::fs::FileExt as _;
        let path = std::env::temp_dir().join(format!("memvisor-fsutil-direct-{}", std::process::id()));
        let (f, direct) = create_direct(&path).unwrap();
        // A page-aligned buffer: an anonymous mapping's first pages.
        let page = vec![0x5au8; 3 * 4096];
        let at = page.as_ptr().align_offset(4096);
        let aligned = &page[at..at + 4096];
        f.write_all_at(aligned, 8192).unwrap();
        if direct {
            // Unaligned offsets are refused while direct, taken once not.
            assert!(f.write_all_at(&aligned[..100], 3).is_err());
            set_direct(&f, false).unwrap();
        }
        f.write_all_at(&aligned[..100], 3).unwrap();
        f.sync_all().unwrap();
        let back = std::fs::read(&path).unwrap();
        assert_eq!(back.len(), 3 * 4096);
        assert!(back[3..103].iter().chain(&back[8192..]).all(|&b| b == 0x5a));
        assert!(back[..3].iter().chain(&back[103..8192]).all(|&b| b == 0));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn write_behind_leaves_the_file_as_written() {
        use std::os::unix::fs::FileExt as _;
        let path = std::env::temp_dir().join(format!("memvisor-fsutil-wb-{}", std::process::id()));
        let f = std::fs::File::create(&path).unwrap();
        let mut wb = WriteBehind::new(&f);
        let block = vec![0xa5u8; 1 << 20];
        // Past several windows, with a hole in the middle.
        let mut end = 0;
        for i in 0..(WriteBehind::WINDOW * (WriteBehind::LAG + 3)) >> 20 {
            if i % 7 == 3 {
                continue;
            }
            f.write_all_at(&block, i << 20).unwrap();
            end = (i + 1) << 20;
            wb.written_to(end).unwrap();
        }
        assert!(wb.waited > 0 && wb.started > wb.waited, "writeback was started and waited for: {wb:?}");
        f.sync_all().unwrap();
        let back = std::fs::read(&path).unwrap();
        assert_eq!(back.len() as u64, end);
        for (i, mib) in back.chunks(1 << 20).enumerate() {
            let expect = if i % 7 == 3 { 0 } else { 0xa5 };
            assert!(mib.iter().all(|&b| b == expect), "MiB {i}");
        }
        std::fs::remove_file(&path).unwrap();
    }
}
