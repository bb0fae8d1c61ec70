//! Post-copy: the guest runs on the destination before all of its memory
//! has arrived; a page it touches that is still on the source is fetched
//! on demand through userfaultfd while the source pushes the rest.
//!
//! At the switch the source sends the runs of pages the destination
//! lacks or holds stale (what the last harvests found), then the state.
//! The destination drops its stale copies (`MADV_DONTNEED`, so they are
//! missing again) and registers all of guest RAM with a userfaultfd in
//! missing mode (userfaultfd(2), Documentation/admin-guide/mm/userfaultfd.rst)
//! before the guest runs. From then on:
//!
//! - a fault on a pending page (the vCPU thread blocks in `KVM_RUN`) makes
//!   the fault thread ask the source for it ([`Kind::PageRequest`]); the
//!   receiver thread places it atomically with `UFFDIO_COPY`, which wakes
//!   the vCPU;
//! - a fault on any other missing page (never touched, or sent as zero)
//!   is a zero page, placed at once with `UFFDIO_ZEROPAGE`;
//! - the source sends the pending pages in RAM order, requested ones
//!   first, then [`Kind::PostcopyDone`]; the destination answers with the
//!   same frame once every page is in, and unregisters RAM.
//!
//! The guest's memory is split between the two hosts until then: a link
//! that fails during post-copy loses the guest. The destination stops the
//! VM with an error saying so; the source keeps the guest stopped and
//! reports it. Post-copy needs private anonymous guest RAM on the
//! destination (`anon` or `thp` backing): missing-mode faults on shared
//! memory would need hole punching to drop stale pages, and on hugetlbfs
//! whole huge pages at a time.

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use thiserror::Error;

use super::pages::RamMap;
use super::stream::{self, Kind, PAGE};
use super::transport::Conn;
use super::MigrationError;

/// Errors of post-copy.
#[derive(Debug, Error)]
pub enum PostcopyError {
    /// userfaultfd could not be set up or failed.
    #[error("{what}")]
    Uffd {
        /// What failed.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The source is gone while pages are still missing.
    #[error("post-copy lost its source with {missing} pages still there; the guest cannot continue: {why}")]
    Lost {
        /// Pages that never arrived.
        missing: u64,
        /// What happened.
        why: String,
    },
}

// The userfaultfd ABI (include/uapi/linux/userfaultfd.h): ioctl numbers
// as _IOWR/_IOR(0xAA, nr, size of the argument).
const UFFD_API: u64 = 0xAA;
const UFFDIO_API: libc::c_ulong = 0xC018_AA3F;
const UFFDIO_REGISTER: libc::c_ulong = 0xC020_AA00;
const UFFDIO_UNREGISTER: libc::c_ulong = 0x8010_AA01;
const UFFDIO_WAKE: libc::c_ulong = 0x8010_AA02;
const UFFDIO_COPY: libc::c_ulong = 0xC028_AA03;
const UFFDIO_ZEROPAGE: libc::c_ulong = 0xC020_AA04;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
/// `sizeof(struct uffd_msg)`.
const MSG_BYTES: usize = 32;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

fn uffd_err(what: &'static str) -> impl FnOnce(std::io::Error) -> PostcopyError {
    move |source| PostcopyError::Uffd { what, source }
}

/// A userfaultfd with guest RAM registered in missing mode.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    ranges: Vec<UffdRange>,
}

#[derive(Debug, Clone, Copy)]
struct UffdRange {
    start: u64,
    len: u64,
}

impl Uffd {
    /// Opens a userfaultfd and registers `ranges` (host address, bytes).
    ///
    /// # Errors
    /// [`PostcopyError::Uffd`].
    pub fn register(ranges: &[(u64, u64)]) -> Result<Self, PostcopyError> {
        // SAFETY: a plain system call with flags; the result is checked.
        let raw = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if raw < 0 {
            return Err(uffd_err("userfaultfd(2) failed")(std::io::Error::last_os_error()));
        }
        // SAFETY: a fresh descriptor we own from here on.
        let fd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
        let mut api = UffdioApi { api: UFFD_API, ..Default::default() };
        // SAFETY: UFFDIO_API with a struct uffdio_api of the right size.
        if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API, &raw mut api) } < 0 {
            return Err(uffd_err("UFFDIO_API failed")(std::io::Error::last_os_error()));
        }
        let uffd = Uffd { fd, ranges: ranges.iter().map(|&(start, len)| UffdRange { start, len }).collect() };
        for r in &uffd.ranges {
            let mut reg = UffdioRegister { range: UffdioRange { start: r.start, len: r.len }, mode: UFFDIO_REGISTER_MODE_MISSING, ioctls: 0 };
            // SAFETY: UFFDIO_REGISTER of a range of our own guest RAM
            // mapping, with a struct uffdio_register of the right size.
            if unsafe { libc::ioctl(uffd.fd.as_raw_fd(), UFFDIO_REGISTER, &raw mut reg) } < 0 {
                return Err(uffd_err("UFFDIO_REGISTER of guest RAM failed")(std::io::Error::last_os_error()));
            }
        }
        Ok(uffd)
    }

    /// Places `len` bytes from `src` at `dst` (a missing range) and wakes
    /// whoever waits on it. Returns the bytes placed before a page that
    /// exists already (EEXIST), or all.
    ///
    /// # Errors
    /// [`PostcopyError::Uffd`] for other failures.
    fn copy(&self, dst: u64, src: &[u8]) -> Result<u64, PostcopyError> {
        let mut c = UffdioCopy { dst, src: src.as_ptr() as u64, len: src.len() as u64, mode: 0, copy: 0 };
        // SAFETY: UFFDIO_COPY reads `len` bytes from our buffer and writes
        // guest RAM registered with this descriptor.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_COPY, &raw mut c) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EEXIST) {
                return Ok(u64::try_from(c.copy).unwrap_or(0));
            }
            if e.raw_os_error() == Some(libc::EAGAIN) {
                return Ok(u64::try_from(c.copy).unwrap_or(0));
            }
            return Err(uffd_err("UFFDIO_COPY failed")(e));
        }
        Ok(src.len() as u64)
    }

    /// Maps the zero page at `dst` (one page) and wakes its waiters; a
    /// page that appeared meanwhile is only woken.
    fn zero(&self, dst: u64) -> Result<(), PostcopyError> {
        let mut z = UffdioZeropage { range: UffdioRange { start: dst, len: PAGE }, mode: 0, zeropage: 0 };
        // SAFETY: UFFDIO_ZEROPAGE on one page of registered guest RAM.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_ZEROPAGE, &raw mut z) } < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EEXIST) || e.raw_os_error() == Some(libc::EAGAIN) {
                let mut w = UffdioRange { start: dst, len: PAGE };
                // SAFETY: UFFDIO_WAKE on a registered range.
                unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WAKE, &raw mut w) };
                return Ok(());
            }
            return Err(uffd_err("UFFDIO_ZEROPAGE failed")(e));
        }
        Ok(())
    }

    /// The faulting address of the next page fault, if one is queued.
    fn next_fault(&self) -> Result<Option<u64>, PostcopyError> {
        let mut msg = [0u8; MSG_BYTES];
        // SAFETY: reading one struct uffd_msg into a buffer of its size.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), msg.as_mut_ptr().cast(), MSG_BYTES) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EAGAIN) {
                return Ok(None);
            }
            return Err(uffd_err("reading the userfaultfd failed")(e));
        }
        if n as usize != MSG_BYTES || msg[0] != UFFD_EVENT_PAGEFAULT {
            return Ok(None);
        }
        // struct uffd_msg: event u8, three reserved fields to offset 8,
        // then pagefault.flags (u64) and pagefault.address (u64).
        Ok(Some(u64::from_le_bytes(msg[16..24].try_into().expect("8 bytes"))))
    }

    /// Waits up to `ms` for a fault to be queued.
    fn wait(&self, ms: i32) {
        let mut p = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one pollfd of ours.
        unsafe { libc::poll(&raw mut p, 1, ms) };
    }

    /// Unregisters guest RAM: from now on missing pages fill with zeros
    /// the usual way, and blocked faults are woken.
    fn unregister(&self) {
        for r in &self.ranges {
            let mut range = UffdioRange { start: r.start, len: r.len };
            // SAFETY: UFFDIO_UNREGISTER of a range we registered.
            unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_UNREGISTER, &raw mut range) };
        }
    }
}

/// Pages still to arrive, one bit each (RAM offset / page).
#[derive(Debug)]
struct Pending {
    bits: Vec<AtomicU64>,
    requested: Vec<AtomicU64>,
    left: AtomicU64,
}

impl Pending {
    fn new(ram_bytes: u64, runs: &[(u64, u64)]) -> Self {
        let words = (ram_bytes / PAGE).div_ceil(64) as usize;
        let p = Pending { bits: (0..words).map(|_| AtomicU64::new(0)).collect(), requested: (0..words).map(|_| AtomicU64::new(0)).collect(), left: AtomicU64::new(0) };
        for &(offset, pages) in runs {
            for page in offset / PAGE..offset / PAGE + pages {
                if p.bits[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::Relaxed) & (1 << (page % 64)) == 0 {
                    p.left.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        p
    }

    fn is_pending(&self, page: u64) -> bool {
        self.bits.get((page / 64) as usize).is_some_and(|w| w.load(Ordering::Acquire) & (1 << (page % 64)) != 0)
    }

    /// Marks `page` arrived; whether it was pending.
    fn arrived(&self, page: u64) -> bool {
        let was = self.bits.get((page / 64) as usize).is_some_and(|w| w.fetch_and(!(1 << (page % 64)), Ordering::AcqRel) & (1 << (page % 64)) != 0);
        if was {
            self.left.fetch_sub(1, Ordering::Relaxed);
        }
        was
    }

    /// Marks `page` requested; whether it was not yet.
    fn request(&self, page: u64) -> bool {
        self.requested.get((page / 64) as usize).is_some_and(|w| w.fetch_or(1 << (page % 64), Ordering::Relaxed) & (1 << (page % 64)) == 0)
    }
}

/// The destination's side of post-copy, prepared before the guest runs.
#[derive(Debug)]
pub struct Destination {
    uffd: Uffd,
    pending: Pending,
    ram: RamMap,
}

impl Destination {
    /// Drops the stale copies of `runs` (RAM offset, pages) that
    /// `was_written` says the destination holds, and registers all of
    /// `ram` with a userfaultfd.
    ///
    /// # Errors
    /// [`MigrationError::OutsideRam`] for a run outside RAM;
    /// [`PostcopyError`] when madvise or userfaultfd fail.
    pub fn prepare(ram: RamMap, runs: &[(u64, u64)], was_written: impl Fn(u64) -> bool) -> Result<Self, MigrationError> {
        for &(offset, pages) in runs {
            let host = ram.host(offset, pages * PAGE).ok_or_else(|| MigrationError::OutsideRam(format!("{pages} pending pages at RAM offset {offset:#x}")))?;
            let mut i = 0;
            while i < pages {
                if !was_written(offset + i * PAGE) {
                    i += 1;
                    continue;
                }
                // A stretch of written pages: one call.
                let mut j = i + 1;
                while j < pages && was_written(offset + j * PAGE) {
                    j += 1;
                }
                // SAFETY: pages of our own private anonymous guest RAM
                // (checked above); no vCPU runs yet. They read as missing
                // afterwards, which is what they are.
                let r = unsafe { libc::madvise(host.add((i * PAGE) as usize).cast(), ((j - i) * PAGE) as usize, libc::MADV_DONTNEED) };
                if r != 0 {
                    return Err(uffd_err("MADV_DONTNEED of stale pages failed")(std::io::Error::last_os_error()).into());
                }
                i = j;
            }
        }
        let uffd = Uffd::register(&ram.host_ranges())?;
        Ok(Destination { uffd, pending: Pending::new(ram.size(), runs), ram })
    }

    /// Pages still to arrive.
    #[must_use]
    pub fn missing(&self) -> u64 {
        self.pending.left.load(Ordering::Relaxed)
    }

    /// Serves faults until `stop`: pending pages are asked of the source
    /// through `writer`, the others zero-filled.
    ///
    /// # Errors
    /// [`PostcopyError`] when userfaultfd fails or the request cannot be
    /// sent.
    pub fn serve_faults(&self, writer: &Mutex<Conn>, stop: &AtomicBool) -> Result<(), PostcopyError> {
        while !stop.load(Ordering::Relaxed) {
            self.uffd.wait(50);
            while let Some(addr) = self.uffd.next_fault()? {
                let Some(offset) = self.ram.offset_of(addr) else { continue };
                let page = offset / PAGE;
                if self.pending.is_pending(page) {
                    if self.pending.request(page) {
                        let mut w = writer.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                        stream::write_frame(&mut *w, Kind::PageRequest, &[&stream::encode_runs(&[(page * PAGE, 1)])])
                            .and_then(|()| w.flush().map_err(|source| stream::StreamError::Io { what: "asking for a page", source }))
                            .map_err(|e| PostcopyError::Lost { missing: self.missing(), why: e.to_string() })?;
                    }
                } else {
                    self.uffd.zero(addr & !(PAGE - 1))?;
                }
            }
        }
        Ok(())
    }

    /// Receives the source's pages until [`Kind::PostcopyDone`], answers
    /// it and unregisters RAM.
    ///
    /// # Errors
    /// [`PostcopyError::Lost`] when the link fails or carries something
    /// invalid: the guest cannot go on.
    pub fn receive(&self, reader: &mut Conn, writer: &Mutex<Conn>) -> Result<(), PostcopyError> {
        let lost = |why: String| PostcopyError::Lost { missing: self.missing(), why };
        let mut buf = Vec::new();
        loop {
            let kind = stream::read_frame(reader, &mut buf).map_err(|e| lost(e.to_string()))?;
            match kind {
                Kind::Pages => {
                    let (offset, data) = stream::pages(&buf).map_err(|e| lost(e.to_string()))?;
                    self.place(offset, data).map_err(|e| lost(e.to_string()))?;
                }
                Kind::Zeros => {
                    for (offset, pages) in stream::runs(kind, &buf).map_err(|e| lost(e.to_string()))? {
                        for i in 0..pages {
                            let at = offset + i * PAGE;
                            if self.pending.is_pending(at / PAGE) {
                                let host = self.ram.host(at, PAGE).ok_or_else(|| lost(format!("a zero page at {at:#x} is outside guest RAM")))?;
                                self.uffd.zero(host as u64)?;
                                self.pending.arrived(at / PAGE);
                            }
                        }
                    }
                }
                Kind::PostcopyDone => {
                    if self.missing() > 0 {
                        return Err(lost("the source says it sent everything".into()));
                    }
                    self.uffd.unregister();
                    let mut w = writer.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    let _ = stream::write_frame(&mut *w, Kind::PostcopyDone, &[]);
                    let _ = w.flush();
                    return Ok(());
                }
                got => return Err(lost(format!("unexpected {got:?} frame"))),
            }
        }
    }

    /// Places the pending pages among `data` (pages from `offset`).
    fn place(&self, offset: u64, data: &[u8]) -> Result<(), MigrationError> {
        let pages = data.len() as u64 / PAGE;
        let host = self.ram.host(offset, pages * PAGE).ok_or_else(|| MigrationError::OutsideRam(format!("{pages} pages at RAM offset {offset:#x}")))?;
        let mut i = 0;
        while i < pages {
            if !self.pending.is_pending(offset / PAGE + i) {
                i += 1;
                continue;
            }
            // A stretch of pending pages: one UFFDIO_COPY.
            let mut j = i;
            while j < pages && self.pending.is_pending(offset / PAGE + j) {
                j += 1;
            }
            let src = &data[(i * PAGE) as usize..(j * PAGE) as usize];
            let mut done = 0;
            while done < src.len() as u64 {
                let n = self.uffd.copy(host as u64 + (i * PAGE) + done, &src[done as usize..])?;
                // A page that exists already (placed by a request that
                // raced this push) is skipped.
                done += if n == 0 { PAGE } else { n };
            }
            for p in i..j {
                self.pending.arrived(offset / PAGE + p);
            }
            i = j;
        }
        Ok(())
    }
}

/// The source's side: sends the pending runs (RAM offset, pages) of
/// `ram`, in order, pages the destination asks for first, then
/// [`Kind::PostcopyDone`], and waits for the destination's. Returns the
/// number of requests served.
///
/// # Errors
/// [`MigrationError`] when the link fails: the guest is lost.
pub fn serve_source(sender: &mut super::pages::Sender<Conn>, reader: Conn, ram: &RamMap, runs: &[(u64, u64)], timeout: Duration) -> Result<u64, MigrationError> {
    let (tx, rx) = std::sync::mpsc::channel::<Result<Option<(u64, u64)>, MigrationError>>();
    let reading = std::thread::spawn(move || {
        let mut reader = reader;
        let mut buf = Vec::new();
        loop {
            let msg = match stream::read_frame(&mut reader, &mut buf) {
                Ok(Kind::PageRequest) => stream::runs(Kind::PageRequest, &buf).map(|r| r.first().copied()).map_err(MigrationError::from),
                Ok(Kind::PostcopyDone) => {
                    let _ = tx.send(Ok(None));
                    return;
                }
                Ok(got) => Err(stream::StreamError::Unexpected { got, expected: "page requests" }.into()),
                Err(e) => Err(e.into()),
            };
            let failed = msg.is_err();
            if tx.send(msg).is_err() || failed {
                return;
            }
        }
    });
    let pending = Pending::new(ram.size(), runs);
    let mut served = 0;
    let mut sent = 0u64;
    for &(offset, pages) in runs {
        for page in offset / PAGE..offset / PAGE + pages {
            if sent.is_multiple_of(64) {
                served += serve_requests(sender, ram, &pending, &rx)?;
            }
            send_pending(sender, ram, &pending, page)?;
            sent += 1;
        }
    }
    served += serve_requests(sender, ram, &pending, &rx)?;
    sender.frame(Kind::PostcopyDone, &[])?;
    sender.flush()?;
    let deadline = Instant::now() + timeout;
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(Ok(None)) => break,
            Ok(Ok(Some(_))) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) if Instant::now() > deadline => return Err(MigrationError::Refused("the destination did not confirm that every page arrived".into())),
            Err(_) => {}
        }
    }
    let _ = reading.join();
    Ok(served)
}

/// Sends `page` if it has not been sent yet.
fn send_pending(sender: &mut super::pages::Sender<Conn>, ram: &RamMap, pending: &Pending, page: u64) -> Result<(), MigrationError> {
    if pending.arrived(page) {
        sender.send_runs(ram, &[(page * PAGE, PAGE)])?;
    }
    Ok(())
}

/// Sends the pages asked for so far, at once; returns how many requests.
fn serve_requests(
    sender: &mut super::pages::Sender<Conn>,
    ram: &RamMap,
    pending: &Pending,
    rx: &std::sync::mpsc::Receiver<Result<Option<(u64, u64)>, MigrationError>>,
) -> Result<u64, MigrationError> {
    let mut served = 0;
    while let Ok(msg) = rx.try_recv() {
        if let Some((offset, pages)) = msg? {
            for page in offset / PAGE..(offset / PAGE).saturating_add(pages) {
                send_pending(sender, ram, pending, page)?;
            }
            served += 1;
        }
    }
    if served > 0 {
        sender.flush()?;
    }
    Ok(served)
}

/// Whether a destination with this backing can take post-copy.
#[must_use]
pub fn supported(backing: crate::config::Backing) -> bool {
    matches!(backing, crate::config::Backing::Anon | crate::config::Backing::Thp)
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_pages_count_down_as_they_arrive() {
        let p = Pending::new(64 * PAGE, &[(0, 2), (10 * PAGE, 3), (PAGE, 1)]);
        assert_eq!(p.left.load(Ordering::Relaxed), 5, "a page listed twice counts once");
        assert!(p.is_pending(11) && !p.is_pending(5));
        assert!(p.arrived(11));
        assert!(!p.arrived(11), "a page placed twice arrives once");
        assert!(p.request(12) && !p.request(12));
        assert_eq!(p.left.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn a_missing_page_is_filled_from_the_source_or_with_zeros() {
        // A private anonymous mapping registered like guest RAM: a thread
        // touching it blocks until the fault is served.
        let len = 4 * PAGE as usize;
        // SAFETY: a fresh private anonymous mapping, unmapped below.
        let mem = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0) };
        assert_ne!(mem, libc::MAP_FAILED);
        let addr = mem as u64;
        let uffd = Uffd::register(&[(addr, len as u64)]).unwrap();
        let toucher = std::thread::spawn(move || {
            // SAFETY: reading our own mapping (the page faults to uffd).
            let a = unsafe { ((addr + PAGE) as *const u64).read_volatile() };
            // SAFETY: as above.
            let b = unsafe { ((addr + 2 * PAGE) as *const u64).read_volatile() };
            (a, b)
        });
        let mut served = 0;
        let deadline = Instant::now() + Duration::from_secs(10);
        while served < 2 && Instant::now() < deadline {
            uffd.wait(50);
            while let Some(fault) = uffd.next_fault().unwrap() {
                let page = fault & !(PAGE - 1);
                if page == addr + PAGE {
                    let data = vec![0x5au8; PAGE as usize];
                    assert_eq!(uffd.copy(page, &data).unwrap(), PAGE);
                } else {
                    uffd.zero(page).unwrap();
                }
                served += 1;
            }
        }
        assert_eq!(toucher.join().unwrap(), (0x5a5a_5a5a_5a5a_5a5a, 0));
        // A page placed already: EEXIST, reported as nothing copied.
        assert_eq!(uffd.copy(addr + PAGE, &vec![1u8; PAGE as usize]).unwrap(), 0);
        uffd.unregister();
        // SAFETY: our mapping, no longer used.
        unsafe { libc::munmap(mem, len) };
    }
}
