//! The device threads' list: the balloon's release thread
//! (`devices::virtio::balloon::worker`). It releases guest RAM and waits
//! for work; it opens nothing and talks to nobody.

use super::Allow::{self, Arg};

/// The calls, beyond [`super::common`]'s.
#[must_use]
pub fn allowed() -> Vec<Allow> {
    vec![
        // Releasing memfd and hugetlbfs backings: fallocate(PUNCH_HOLE |
        // KEEP_SIZE) on the backing file, that mode only (argument 1).
        Arg(libc::SYS_fallocate, 1, &[(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE) as u64]),
        // Anonymous and THP backings release with madvise(MADV_DONTNEED),
        // which is in the common list (glibc uses it too).
    ]
}
