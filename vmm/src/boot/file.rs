//! Reading boot files (kernel, initrd) with a size bound.
//!
//! Nothing is read before its size is known and checked: the file is opened
//! without blocking (a FIFO would otherwise wait for a writer), `fstat` on
//! that same descriptor says whether it is a regular file and how long it
//! is, and only then are exactly that many bytes read. `/dev/zero`, a FIFO
//! or a directory is refused with one line saying what it is; a file larger
//! than its cap or than guest RAM is refused before a byte of it is read.
//!
//! This module owns the checks on the host file; what the bytes must look
//! like is [`super::format`]'s business.

use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use crate::boot::BootError;

/// Largest kernel image memvisor reads: 256 MiB. A distribution's vmlinux
/// is ~50-60 MiB (Debian 6.1 cloud: 53 MB), a bzImage ~8-15 MiB; the cap only
/// stops a wrong path from filling host memory.
pub const KERNEL_MAX: u64 = 256 << 20;
/// Largest initrd memvisor reads: 1 GiB (it must also fit in guest RAM
/// below the MMIO hole, which is checked separately).
pub const INITRD_MAX: u64 = 1 << 30;

/// Which boot file, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootFile {
    /// The kernel image.
    Kernel,
    /// The initial ramdisk.
    Initrd,
}

impl std::fmt::Display for BootFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BootFile::Kernel => "kernel",
            BootFile::Initrd => "initrd",
        })
    }
}

/// What a path is, when it is not a regular file.
fn describe(ft: std::fs::FileType) -> &'static str {
    if ft.is_dir() {
        "a directory"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_block_device() {
        "a block device"
    } else if ft.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// Checks a file's size against `cap` and `room` (the guest RAM it may
/// occupy) before anything is read. Pure, so the rules are unit-tested.
///
/// # Errors
/// [`BootError::FileTooLarge`], [`BootError::FileEmpty`].
pub fn check_size(which: BootFile, path: &Path, size: u64, cap: u64, room: u64) -> Result<(), BootError> {
    if size == 0 {
        return Err(BootError::FileEmpty { which, path: path.to_path_buf() });
    }
    let limit = cap.min(room);
    if size > limit {
        let what = if cap <= room { "the largest memvisor reads" } else { "guest RAM below the MMIO hole" };
        return Err(BootError::FileTooLarge { which, path: path.to_path_buf(), size, limit, what });
    }
    Ok(())
}

/// Reads the regular file at `path` after checking its size against `cap`
/// and `room` ([`check_size`]).
///
/// # Errors
/// [`BootError::ReadFile`] when it cannot be opened or read (or shrank
/// while being read), [`BootError::NotRegularFile`], and the errors of
/// [`check_size`].
pub fn read_bounded(which: BootFile, path: &Path, cap: u64, room: u64) -> Result<Vec<u8>, BootError> {
    let io_err = |source| BootError::ReadFile { which, path: path.to_path_buf(), source };
    // O_NONBLOCK: opening a FIFO for reading must not wait for a writer.
    // It changes nothing for a regular file's reads.
    let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY).open(path).map_err(io_err)?;
    let meta = file.metadata().map_err(io_err)?;
    if !meta.file_type().is_file() {
        return Err(BootError::NotRegularFile { which, path: path.to_path_buf(), what: describe(meta.file_type()) });
    }
    let size = meta.len();
    check_size(which, path, size, cap, room)?;
    let len = usize::try_from(size).map_err(|_| BootError::FileTooLarge { which, path: path.to_path_buf(), size, limit: cap, what: "the largest memvisor reads" })?;
    let mut bytes = Vec::with_capacity(len);
    // At most `size` bytes even if the file grows meanwhile.
    file.take(size).read_to_end(&mut bytes).map_err(io_err)?;
    if bytes.len() != len {
        return Err(io_err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, format!("it shrank from {size} to {} bytes while being read", bytes.len()))));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("memvisor-boot-file-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        dir
    }

    #[test]
    fn a_regular_file_within_its_bounds_is_read_whole() {
        let p = tmp("ok");
        std::fs::write(&p, b"0123456789").unwrap();
        assert_eq!(read_bounded(BootFile::Initrd, &p, 100, 100).unwrap(), b"0123456789");
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn sizes_over_the_cap_or_the_room_are_refused_before_reading() {
        let p = Path::new("/k");
        assert!(check_size(BootFile::Kernel, p, 10, 10, 10).is_ok());
        let e = check_size(BootFile::Kernel, p, 11, 10, 100).unwrap_err();
        assert!(e.to_string().contains("the largest memvisor reads"), "{e}");
        let e = check_size(BootFile::Initrd, p, 11, 100, 10).unwrap_err();
        assert!(e.to_string().contains("guest RAM"), "{e}");
        assert!(matches!(check_size(BootFile::Initrd, p, 0, 100, 100), Err(BootError::FileEmpty { .. })));
    }

    #[test]
    fn dev_zero_a_directory_and_a_fifo_are_refused_without_blocking() {
        let e = read_bounded(BootFile::Kernel, Path::new("/dev/zero"), KERNEL_MAX, KERNEL_MAX).unwrap_err();
        assert!(e.to_string().contains("a character device"), "{e}");
        let e = read_bounded(BootFile::Kernel, Path::new("/"), KERNEL_MAX, KERNEL_MAX).unwrap_err();
        assert!(e.to_string().contains("a directory"), "{e}");
        let p = tmp("fifo");
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: `c` is a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = read_bounded(BootFile::Initrd, &p, INITRD_MAX, INITRD_MAX).unwrap_err();
        assert!(e.to_string().contains("a FIFO"), "{e}");
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn a_missing_file_names_its_path() {
        let e = read_bounded(BootFile::Initrd, Path::new("/nonexistent/initrd"), 1, 1).unwrap_err();
        assert!(crate::error_chain(&e).contains("/nonexistent/initrd"));
    }
}
