//! Workloads the guest can run as ring-3 tasks, and how they are named.

use crate::Pod;

/// Which workload a [`WorkloadSpec`] asks for.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkloadKind {
    /// Only the self-test.
    None = 0,
    /// Dirty-page rounds (`dirty:pages=N,rounds=R,seed=S`): `params` =
    /// [pages per round, rounds, seed, buffer pages, log, warm-up rounds]
    /// (`log` = 0 asks the VMM not to track, for a baseline; the first
    /// `warm-up` rounds run before the VMM switches logging on; the guest
    /// ignores both). In round `r` a ring-3
    /// task writes page [`dirty_page`]`(seed, r, i, buffer)` of its buffer
    /// for `i` in `0..pages`, then reports [`Event::RoundDone`] and waits
    /// for the VMM to harvest.
    Dirty = 1,
    /// Memory checks across snapshots (`checksum:pages=N,rounds=R,ms=T`):
    /// `params` = [pages, rounds, milliseconds between rounds, seed]. A
    /// ring-3 task fills `pages` pages, then every round checks that each
    /// page holds what its last write put there, rewrites a pseudo-random
    /// eighth of the pages with a round-dependent pattern
    /// (`memvisor_user::versioned`) and reports the buffer's checksum
    /// ([`Event::Checksum`]); a check that finds differing pages reports
    /// [`Event::Mismatch`].
    Checksum = 2,
    /// Translation benchmark (`translation:ws=BYTES,workloads=MASK,...`):
    /// `params` = [workload mask (bit `w` runs workload `w` of
    /// `memvisor_user::translation::Workload`), working-set bytes, timed
    /// repetitions, accesses per repetition, seed]. A ring-3 task gets a
    /// buffer of the working set mapped with the configured leaf size and,
    /// per workload, reports [`Event::TranslationBegin`], builds and warms
    /// its data, reports [`Event::TranslationTimed`], one
    /// [`Event::TranslationRep`] per repetition and [`Event::TranslationEnd`].
    Translation = 20,
    /// Demand paging with a bounded frame pool and swap (issue 6;
    /// `paging:policy=P,frames=N,pattern=T,...`): `params` = [policy
    /// ([`crate::paging::Policy`]), frames, pattern
    /// ([`crate::paging::Pattern`]), pages, accesses, seed, write percent];
    /// `flags` = [`PAGING_PROBE_READ_ONLY`] or [`PAGING_PROBE_WILD`] to end
    /// with a deliberate bad access. A ring-3 task makes `accesses`
    /// accesses to a demand-paged region of `pages` pages while the kernel
    /// holds at most `frames` of them in RAM, then reports its counters
    /// ([`Event::PagingFaults`], [`Event::PagingEvictions`],
    /// [`Event::PagingChecked`]).
    Paging = 30,
    /// Copy-on-write fork (issue 6; `cow:pages=N`): `params` = [pages]. A
    /// ring-3 task fills `pages` demand-paged pages, forks, and parent and
    /// child each write their own subset and check they see only their own
    /// writes ([`Event::CowChecked`], [`Event::CowCopies`]).
    Cow = 31,
    /// The balloon driver's service loop (`balloon:rounds=R,report=0|1,oom=P,irq=0|1`):
    /// `params` = [rounds, free page reporting (0/1), OOM allocation in
    /// pages, wait for the interrupt (1) or poll (0)]. The guest initialises the virtio balloon, then follows the
    /// host's target; after every deflate it writes and verifies the pages
    /// it got back in ring 3 ([`Event::BalloonVerified`]). It ends after
    /// `rounds` returns of the balloon to zero (0: never), or, with `oom`,
    /// after allocating that many pages once the first inflate is done,
    /// deflating on OOM as needed ([`Event::BalloonOomDeflated`]).
    Balloon = 10,
    /// TLB shootdown (`shootdown:pages=N,rounds=R,mode=remap|wp,skip=0|1|2,writer=kernel|user`):
    /// `params` = [pages, rounds, mode ([`SHOOTDOWN_REMAP`] or
    /// [`SHOOTDOWN_WRITE_PROTECT`])]; `flags`: [`SHOOTDOWN_SKIP_IPI`] leaves
    /// the other CPUs' TLBs alone, [`SHOOTDOWN_SKIP_LOCAL`] the writer's own
    /// too (teaching modes: the stale translations they allow are what the
    /// shootdown prevents), [`SHOOTDOWN_USER_WRITER`] makes the PTE stores
    /// from ring 3 through a mapping of the leaf table. Every other CPU
    /// runs a ring-3 reader over `pages` shared pages while the boot CPU
    /// changes one page per round (points it at another frame, or takes
    /// away write access) and shoots it down; after each change the readers
    /// check what they see. Reports one [`Event::ShootdownSample`] per round
    /// and, per reader, [`Event::ShootdownReader`] and
    /// [`Event::ShootdownStale`].
    Shootdown = 41,
    /// Feeds the balloon one kind of hostile input (`balloon-hostile:mode=M`):
    /// `params` = [[`HostileMode`] as `u64`]. Reports
    /// [`Event::BalloonHostileDone`] and ends.
    BalloonHostile = 11,
    /// A guest that keeps time and dirties memory at a set rate, for
    /// migration (`ticker:secs=S,mibs=R,pages=N,fill=0|1`): `params` =
    /// [seconds, MiB per second, buffer pages, fill]. A ring-3 task
    /// (with `fill`, first writes data to every page of its buffer) reads
    /// the TSC in a loop for `seconds`, writing one word per page, page
    /// after page through the buffer, at `MiB per second` of pages of the
    /// time it runs (time off the CPU is not made up beyond 1 ms); the
    /// longest stretches between two of its TSC reads are the time it did
    /// not run (a migration's stop, host preemption). It reports the 32
    /// longest ([`Event::ClockGap`], longest first), then
    /// [`Event::TickerDone`].
    Ticker = 40,
}

/// What [`WorkloadKind::BalloonHostile`] feeds the device.
#[repr(u64)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostileMode {
    /// Inflate PFNs beyond the end of guest RAM.
    PfnOutsideRam = 1,
    /// Inflate PFNs inside the 32-bit MMIO hole.
    PfnInHole = 2,
    /// Inflate the same PFN twice.
    DuplicatePfn = 3,
    /// Inflate only part of a 2 MiB page (meaningful with huge-page
    /// backings: the host page must stay).
    PartialHugePage = 4,
    /// A descriptor whose buffer lies outside guest RAM.
    DescriptorOutsideRam = 5,
    /// A descriptor chain that loops.
    LoopingChain = 6,
    /// A queue size that is not a power of two.
    QueueSizeNotPowerOfTwo = 7,
    /// An available-ring entry naming a head descriptor beyond the queue.
    BadHeadIndex = 8,
    /// Bad input on the other queues: deflate PFNs outside RAM and not in
    /// the balloon, a free page report and a stats buffer outside RAM.
    OtherQueues = 9,
}

impl HostileMode {
    /// All modes.
    pub const ALL: [HostileMode; 9] = [
        Self::PfnOutsideRam,
        Self::PfnInHole,
        Self::DuplicatePfn,
        Self::PartialHugePage,
        Self::DescriptorOutsideRam,
        Self::LoopingChain,
        Self::QueueSizeNotPowerOfTwo,
        Self::BadHeadIndex,
        Self::OtherQueues,
    ];

    /// Decodes a raw mode.
    #[must_use]
    pub fn from_raw(raw: u64) -> Option<Self> {
        Self::ALL.into_iter().find(|m| *m as u64 == raw)
    }

    /// The name used on the command line.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::PfnOutsideRam => "pfn-outside-ram",
            Self::PfnInHole => "pfn-in-hole",
            Self::DuplicatePfn => "duplicate-pfn",
            Self::PartialHugePage => "partial-huge-page",
            Self::DescriptorOutsideRam => "descriptor-outside-ram",
            Self::LoopingChain => "looping-chain",
            Self::QueueSizeNotPowerOfTwo => "queue-size-not-power-of-two",
            Self::BadHeadIndex => "bad-head-index",
            Self::OtherQueues => "other-queues",
        }
    }
}

/// [`WorkloadSpec::flags`] of [`WorkloadKind::Paging`]: after its accesses
/// the task writes to its read-only argument page (a protection fault).
pub const PAGING_PROBE_READ_ONLY: u32 = 1;
/// [`WorkloadSpec::flags`] of [`WorkloadKind::Paging`]: after its accesses
/// the task reads an address outside every region it owns (an invalid
/// access).
pub const PAGING_PROBE_WILD: u32 = 2;
/// [`WorkloadSpec::flags`] of [`WorkloadKind::Paging`]: before the task
/// starts, the kernel times one 4 KiB copy and one zeroing at ring 0 and
/// through the swap device ([`Event::PagingCopyCost`],
/// [`Event::PagingZeroCost`]).
pub const PAGING_MEASURE: u32 = 4;

/// [`WorkloadKind::Shootdown`] `params[2]`: point the page at another frame.
pub const SHOOTDOWN_REMAP: u64 = 0;
/// [`WorkloadKind::Shootdown`] `params[2]`: clear the page's W bit.
pub const SHOOTDOWN_WRITE_PROTECT: u64 = 1;
/// [`WorkloadSpec::flags`] of [`WorkloadKind::Shootdown`]: change the PTE
/// but do not tell the other CPUs (no IPI).
pub const SHOOTDOWN_SKIP_IPI: u32 = 1;
/// [`WorkloadSpec::flags`] of [`WorkloadKind::Shootdown`]: nor flush the
/// writer's own TLB (with [`SHOOTDOWN_SKIP_IPI`]).
pub const SHOOTDOWN_SKIP_LOCAL: u32 = 2;
/// [`WorkloadSpec::flags`] of [`WorkloadKind::Shootdown`]: the writer is a
/// ring-3 task whose PTE stores run natively (on a host that emulates the
/// guest's ring 0, the kernel's own stores never do).
pub const SHOOTDOWN_USER_WRITER: u32 = 4;

impl WorkloadKind {
    /// Decodes a raw kind, `None` for unknown values.
    #[must_use]
    pub fn from_raw(raw: u32) -> Option<Self> {
        match raw {
            0 => Some(Self::None),
            1 => Some(Self::Dirty),
            2 => Some(Self::Checksum),
            10 => Some(Self::Balloon),
            11 => Some(Self::BalloonHostile),
            20 => Some(Self::Translation),
            30 => Some(Self::Paging),
            31 => Some(Self::Cow),
            40 => Some(Self::Ticker),
            41 => Some(Self::Shootdown),
            _ => None,
        }
    }
}

/// Workload events the guest reports (`Report::Workload`), with the
/// meaning of their two values.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The workload's buffer: a = guest-physical address, b = pages
    /// (physically contiguous, so page `p` is at `a + p * 4096`).
    BufferReady = 1,
    /// A dirty round finished: a = round, b = TSC ticks the round's writes
    /// took. The VMM harvests before the guest continues.
    RoundDone = 2,
    /// A checksum round: a = round, b = checksum of the buffer after the
    /// round's rewrites (a function of the workload's parameters only).
    Checksum = 3,
    /// The check at the start of round a (or after the last round, a =
    /// rounds) found b pages that differ from their last write.
    Mismatch = 4,
    /// The guest kernel's own bookkeeping region: a = guest-physical start,
    /// b = length in bytes (kernel image, page-table arena).
    KernelRegion = 5,
    /// The balloon driver met the target: a = pages in the balloon, b = the
    /// target it read.
    BalloonActual = 10,
    /// Pages deflated and verified in ring 3: a = bytes written and read
    /// back, b = bytes that read back right.
    BalloonVerified = 11,
    /// Free page reporting: a = bytes reported, b = blocks (of 2 MiB or more).
    BalloonReported = 12,
    /// Deflate on OOM: a = pages deflated, b = bytes of the allocation that
    /// then verified right.
    BalloonOomDeflated = 13,
    /// The hostile workload fed its input: a = [`HostileMode`], b = 1 when
    /// the device still answered afterwards.
    BalloonHostileDone = 14,
    /// The balloon driver could not start: a = step (1: no device, 2:
    /// features refused, 3: no memory for queues), b = detail.
    BalloonFailed = 15,
    /// A translation workload starts building its data: a = workload, b =
    /// units (nodes or words).
    TranslationBegin = 20,
    /// Its data is built and warmed; timed repetitions follow: a = workload.
    TranslationTimed = 21,
    /// One timed repetition: a = TSC ticks, b = accesses.
    TranslationRep = 22,
    /// The workload ended: a = workload, b = checksum of what it read.
    TranslationEnd = 23,
    /// Paging: a = minor faults (first touch, zero-filled), b = major
    /// faults (read back from swap).
    PagingFaults = 30,
    /// Paging: a = evictions, b = dirty write-backs (evictions of pages
    /// whose D bit was set).
    PagingEvictions = 31,
    /// Paging: a = accesses made, b = accesses that found other data than
    /// the page's last write (0 when swap works).
    PagingChecked = 32,
    /// A ring-3 protection fault the kernel cannot resolve (the task is
    /// killed): a = faulting address, b = error code.
    ProtectionFault = 33,
    /// A ring-3 access outside every region of the task (the task is
    /// killed): a = faulting address, b = error code.
    InvalidAccess = 34,
    /// Paging: a = recycled frames zero-filled (by the swap device), b =
    /// microseconds spent in the page-fault handler (0 when the TSC
    /// frequency is unknown).
    PagingCost = 35,
    /// Copy-on-write: a = 0 for the parent, 1 for the child, b = pages
    /// that showed another task's data or lost the task's own write.
    CowChecked = 36,
    /// Copy-on-write: a = pages copied on a write fault, b = write faults
    /// that found the frame no longer shared and only restored write access.
    CowCopies = 37,
    /// Paging with [`PAGING_MEASURE`]: a = nanoseconds one 4 KiB copy took
    /// at ring 0 (`rep movsq`), b = through the swap device (one exit).
    PagingCopyCost = 38,
    /// Paging with [`PAGING_MEASURE`]: a = nanoseconds zeroing one 4 KiB
    /// frame took at ring 0 (`rep stosq`), b = through the swap device.
    PagingZeroCost = 39,
    /// Copy-on-write: a = stack pages copied on a write fault, b = stack
    /// write faults that only restored write access (fork shares the stack
    /// copy-on-write like the region).
    CowStackCopies = 40,
    /// A ticker gap: a = nanoseconds between two consecutive TSC reads of
    /// the task's loop, b = the TSC at the first of them.
    ClockGap = 50,
    /// The ticker ended: a = page writes made, b = nanoseconds it ran.
    TickerDone = 51,
    /// Shootdown: one round's change: a = TSC ticks from the PTE store to
    /// the last acknowledgement (0 without a shootdown), b = CPUs
    /// interrupted (0 when skipped).
    ShootdownSample = 60,
    /// Shootdown: a reader's checks: a = its CPU, b = checks made after a
    /// change was published.
    ShootdownReader = 61,
    /// Shootdown: a = reader CPU, b = checks that saw the translation from
    /// before the change (a stale TLB entry).
    ShootdownStale = 62,
}

impl Event {
    /// Decodes a raw event.
    #[must_use]
    pub fn from_raw(raw: u32) -> Option<Self> {
        [
            Self::BufferReady,
            Self::RoundDone,
            Self::Checksum,
            Self::Mismatch,
            Self::KernelRegion,
            Self::BalloonActual,
            Self::BalloonVerified,
            Self::BalloonReported,
            Self::BalloonOomDeflated,
            Self::BalloonHostileDone,
            Self::BalloonFailed,
            Self::TranslationBegin,
            Self::TranslationTimed,
            Self::TranslationRep,
            Self::TranslationEnd,
            Self::PagingFaults,
            Self::PagingEvictions,
            Self::PagingChecked,
            Self::ProtectionFault,
            Self::InvalidAccess,
            Self::PagingCost,
            Self::CowChecked,
            Self::CowCopies,
            Self::PagingCopyCost,
            Self::PagingZeroCost,
            Self::CowStackCopies,
            Self::ClockGap,
            Self::TickerDone,
            Self::ShootdownSample,
            Self::ShootdownReader,
            Self::ShootdownStale,
        ]
        .into_iter()
        .find(|e| *e as u32 == raw)
    }
}

/// The page a dirty round writes: SplitMix64 (Steele, Lea and Flood,
/// "Fast splittable pseudorandom number generators", OOPSLA 2014) of
/// `seed`, `round` and `i`, reduced to `0..buffer_pages`. The guest and the
/// VMM both call this, so the VMM knows exactly which pages were written.
/// `buffer_pages` of zero yields 0.
#[inline(always)]
#[must_use]
pub const fn dirty_page(seed: u64, round: u64, i: u64, buffer_pages: u64) -> u64 {
    let z = seed ^ round.wrapping_mul(crate::splitmix::GOLDEN_GAMMA) ^ i.wrapping_mul(0xd1b5_4a32_d192_ed03);
    let z = crate::splitmix::finalise(z.wrapping_add(crate::splitmix::GOLDEN_GAMMA));
    if buffer_pages == 0 { 0 } else { z % buffer_pages }
}

/// A workload and its parameters, as written into the boot configuration.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkloadSpec {
    /// A [`WorkloadKind`] as `u32`.
    pub kind: u32,
    /// Workload-specific flags.
    pub flags: u32,
    /// Workload-specific parameters (documented with each kind).
    pub params: [u64; 7],
}
// SAFETY: repr(C), integer fields only, 64 bytes with no padding.
unsafe impl Pod for WorkloadSpec {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_pages_are_deterministic_and_spread() {
        assert_eq!(dirty_page(1, 2, 3, 1000), dirty_page(1, 2, 3, 1000));
        assert_ne!(dirty_page(1, 0, 0, 1 << 40), dirty_page(2, 0, 0, 1 << 40));
        let mut seen = [false; 64];
        for i in 0..1000 {
            seen[dirty_page(7, 0, i, 64) as usize] = true;
        }
        assert!(seen.iter().all(|&s| s), "1000 draws cover 64 pages");
        assert_eq!(dirty_page(7, 0, 0, 0), 0);
    }

    #[test]
    fn kinds_and_events_decode() {
        assert_eq!(WorkloadKind::from_raw(1), Some(WorkloadKind::Dirty));
        assert_eq!(WorkloadKind::from_raw(9), None);
        assert_eq!(Event::from_raw(5), Some(Event::KernelRegion));
        assert_eq!(Event::from_raw(0), None);
        assert_eq!(WorkloadKind::from_raw(10), Some(WorkloadKind::Balloon));
        assert_eq!(Event::from_raw(13), Some(Event::BalloonOomDeflated));
        assert_eq!(HostileMode::from_raw(7), Some(HostileMode::QueueSizeNotPowerOfTwo));
        assert_eq!(HostileMode::from_raw(9), Some(HostileMode::OtherQueues));
        assert_eq!(HostileMode::from_raw(10), None);
        assert_eq!(HostileMode::from_raw(0), None);
        assert_eq!(WorkloadKind::from_raw(20), Some(WorkloadKind::Translation));
        assert_eq!(Event::from_raw(22), Some(Event::TranslationRep));
        assert_eq!(WorkloadKind::from_raw(30), Some(WorkloadKind::Paging));
        assert_eq!(WorkloadKind::from_raw(31), Some(WorkloadKind::Cow));
        assert_eq!(Event::from_raw(37), Some(Event::CowCopies));
        assert_eq!(Event::from_raw(40), Some(Event::CowStackCopies));
        assert_eq!(WorkloadKind::from_raw(40), Some(WorkloadKind::Ticker));
        assert_eq!(Event::from_raw(51), Some(Event::TickerDone));
        assert_eq!(WorkloadKind::from_raw(41), Some(WorkloadKind::Shootdown));
        assert_eq!(Event::from_raw(62), Some(Event::ShootdownStale));
    }
}
