//! Reports from the guest to the VMM.
//!
//! The guest stores a [`Message`] in its memory and writes the message's
//! guest-physical address to [`crate::ports::MESSAGE`]. Messages are fixed
//! size so the VMM reads exactly [`Message::SIZE`] bytes and never follows a
//! guest-provided length; [`Report::decode`] turns one into a typed report and
//! rejects anything malformed.

use crate::Pod;

/// One guest → VMM message. `kind` selects the meaning of `arg` and `data`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Message {
    /// A [`MsgKind`] as `u32`.
    pub kind: u32,
    /// Kind-specific small argument.
    pub arg: u32,
    /// Kind-specific payload.
    pub data: [u64; 7],
}
// SAFETY: repr(C), integer fields only, 64 bytes with no padding.
unsafe impl Pod for Message {}

impl Message {
    /// Size in bytes of every message.
    pub const SIZE: usize = size_of::<Self>();
}

/// Message kinds.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsgKind {
    /// First sign of life, sent by the first Rust code that runs.
    Hello = 1,
    /// Kernel initialised (paging, descriptor tables, allocator); the
    /// self-test and workloads come after.
    Ready = 2,
    /// One self-test check.
    Check = 3,
    /// Page-table statistics.
    PageTables = 4,
    /// Physical-memory statistics.
    Frames = 5,
    /// The guest has finished its work and idles until told otherwise.
    Idle = 6,
    /// A workload event ([`crate::workload::Event`]).
    Workload = 7,
    /// An application processor came up ([`crate::smp`]).
    CpuOnline = 8,
    /// One CPU's figures, sent by the boot CPU before the guest ends.
    CpuStats = 9,
}

/// Self-test checks ([`Report::Check`]).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckId {
    /// A ring-3 task wrote and verified a pattern over all free RAM.
    RamPattern = 1,
    /// A ring-3 write to a read-only page faulted with P|W|U.
    ReadOnlyWrite = 2,
    /// A ring-3 instruction fetch from an NX page faulted with P|U|I.
    NxFetch = 3,
    /// A ring-3 read of a kernel (supervisor) page faulted with P|U.
    UserReadsKernel = 4,
    /// A ring-3 read of an unmapped page faulted with U (P clear).
    Unmapped = 5,
}

impl CheckId {
    /// All checks, in the order the guest runs them.
    pub const ALL: [CheckId; 5] = [Self::RamPattern, Self::ReadOnlyWrite, Self::NxFetch, Self::UserReadsKernel, Self::Unmapped];

    /// Decodes a raw id.
    #[must_use]
    pub fn from_raw(raw: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|c| *c as u32 == raw)
    }

    /// A short human name.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::RamPattern => "ring-3 pattern over all free RAM",
            Self::ReadOnlyWrite => "write to read-only page faults",
            Self::NxFetch => "fetch from NX page faults",
            Self::UserReadsKernel => "ring-3 access to kernel page faults",
            Self::Unmapped => "access to unmapped page faults",
        }
    }
}

/// Page-fault error-code bits (SDM Vol. 3A §4.7, Figure 4-12).
pub mod pf {
    /// The fault was a protection violation (P=1), not a non-present page.
    pub const PRESENT: u64 = 1 << 0;
    /// The access was a write.
    pub const WRITE: u64 = 1 << 1;
    /// The access came from CPL 3.
    pub const USER: u64 = 1 << 2;
    /// A reserved bit was set in a paging-structure entry.
    pub const RESERVED: u64 = 1 << 3;
    /// The access was an instruction fetch (with NX enabled).
    pub const FETCH: u64 = 1 << 4;
}

/// A decoded [`Message`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Report {
    /// See [`MsgKind::Hello`]. `tsc` is the guest's TSC when it was sent.
    Hello { tsc: u64 },
    /// See [`MsgKind::Ready`].
    Ready {
        /// TSC when ready.
        tsc: u64,
        /// log2 of the leaf size actually used for RAM (after any fallback).
        page_shift: u32,
        /// Whether the CPU offers 1 GiB pages (CPUID 8000_0001h EDX bit 26).
        has_1g_pages: bool,
    },
    /// See [`MsgKind::Check`].
    Check {
        /// Which check.
        id: CheckId,
        /// Whether it passed.
        passed: bool,
        /// Expected value (a page-fault error code, or bytes for the pattern test).
        expected: u64,
        /// What was observed.
        got: u64,
        /// Faulting address (CR2), when the check is about a fault.
        cr2: u64,
        /// Faulting instruction, when the check is about a fault.
        rip: u64,
    },
    /// See [`MsgKind::PageTables`].
    PageTables {
        /// Page-table pages built, all levels.
        table_pages: u64,
        /// Leaf entries written, by size: 4 KiB, 2 MiB, 1 GiB.
        leaves: [u64; 3],
    },
    /// See [`MsgKind::Frames`].
    Frames {
        /// RAM the memory map offered, bytes.
        ram_bytes: u64,
        /// Bytes the buddy allocator manages.
        managed_bytes: u64,
        /// Bytes free in the buddy allocator.
        free_bytes: u64,
    },
    /// See [`MsgKind::Workload`].
    Workload {
        /// The event.
        event: crate::workload::Event,
        /// First value (see the event).
        a: u64,
        /// Second value.
        b: u64,
    },
    /// See [`MsgKind::CpuOnline`].
    CpuOnline {
        /// The CPU's index (its vCPU id and APIC id).
        cpu: u32,
        /// Its TSC when it reached its idle loop.
        tsc: u64,
    },
    /// See [`MsgKind::CpuStats`].
    CpuStats {
        /// The CPU.
        cpu: u32,
        /// The figures.
        stats: CpuStats,
    },
    /// See [`MsgKind::Idle`]. `status` is what the guest would have exited with.
    Idle {
        /// The would-be exit status.
        status: u32,
    },
}

/// One CPU's counters ([`Report::CpuStats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuStats {
    /// Ring-3 tasks the CPU ran.
    pub tasks: u64,
    /// TSC ticks it spent in them (entry to exit, kernel time in their
    /// traps included).
    pub task_tsc: u64,
    /// Bytes the self-test's RAM task verified on this CPU.
    pub selftest_bytes: u64,
    /// Inter-processor interrupts it took (wake-ups and shootdowns).
    pub ipis_received: u64,
    /// TLB shootdown requests it carried out and acknowledged.
    pub shootdowns_acked: u64,
    /// TLB shootdowns it started (each waits for every target's ack).
    pub shootdowns_sent: u64,
    /// Inter-processor interrupts it sent.
    pub ipis_sent: u64,
}

/// Why a [`Message`] could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// The kind is not one this ABI defines.
    UnknownKind(u32),
    /// A field holds a value its kind does not allow.
    BadField(&'static str),
}

impl Report {
    /// Encodes the report as a message.
    #[must_use]
    pub fn encode(&self) -> Message {
        let mut m = Message::default();
        match *self {
            Report::Hello { tsc } => {
                m.kind = MsgKind::Hello as u32;
                m.data[0] = tsc;
            }
            Report::Ready { tsc, page_shift, has_1g_pages } => {
                m.kind = MsgKind::Ready as u32;
                m.arg = page_shift;
                m.data[0] = tsc;
                m.data[1] = u64::from(has_1g_pages);
            }
            Report::Check { id, passed, expected, got, cr2, rip } => {
                m.kind = MsgKind::Check as u32;
                m.arg = id as u32;
                m.data = [u64::from(passed), expected, got, cr2, rip, 0, 0];
            }
            Report::PageTables { table_pages, leaves } => {
                m.kind = MsgKind::PageTables as u32;
                m.data = [table_pages, leaves[0], leaves[1], leaves[2], 0, 0, 0];
            }
            Report::Frames { ram_bytes, managed_bytes, free_bytes } => {
                m.kind = MsgKind::Frames as u32;
                m.data = [ram_bytes, managed_bytes, free_bytes, 0, 0, 0, 0];
            }
            Report::Workload { event, a, b } => {
                m.kind = MsgKind::Workload as u32;
                m.arg = event as u32;
                m.data[0] = a;
                m.data[1] = b;
            }
            Report::Idle { status } => {
                m.kind = MsgKind::Idle as u32;
                m.arg = status;
            }
            Report::CpuOnline { cpu, tsc } => {
                m.kind = MsgKind::CpuOnline as u32;
                m.arg = cpu;
                m.data[0] = tsc;
            }
            Report::CpuStats { cpu, stats: s } => {
                m.kind = MsgKind::CpuStats as u32;
                m.arg = cpu;
                m.data = [s.tasks, s.task_tsc, s.selftest_bytes, s.ipis_received, s.shootdowns_acked, s.shootdowns_sent, s.ipis_sent];
            }
        }
        m
    }

    /// Decodes a message.
    ///
    /// # Errors
    /// [`DecodeError`] for an unknown kind or a field out of range.
    pub fn decode(m: &Message) -> Result<Report, DecodeError> {
        let d = &m.data;
        Ok(match m.kind {
            k if k == MsgKind::Hello as u32 => Report::Hello { tsc: d[0] },
            k if k == MsgKind::Ready as u32 => {
                if !matches!(m.arg, 12 | 21 | 30) {
                    return Err(DecodeError::BadField("page_shift"));
                }
                Report::Ready { tsc: d[0], page_shift: m.arg, has_1g_pages: d[1] != 0 }
            }
            k if k == MsgKind::Check as u32 => Report::Check {
                id: CheckId::from_raw(m.arg).ok_or(DecodeError::BadField("check id"))?,
                passed: d[0] != 0,
                expected: d[1],
                got: d[2],
                cr2: d[3],
                rip: d[4],
            },
            k if k == MsgKind::PageTables as u32 => Report::PageTables { table_pages: d[0], leaves: [d[1], d[2], d[3]] },
            k if k == MsgKind::Frames as u32 => Report::Frames { ram_bytes: d[0], managed_bytes: d[1], free_bytes: d[2] },
            k if k == MsgKind::Idle as u32 => Report::Idle { status: m.arg },
            k if k == MsgKind::CpuOnline as u32 || k == MsgKind::CpuStats as u32 => {
                if m.arg >= crate::smp::MAX_CPUS {
                    return Err(DecodeError::BadField("cpu"));
                }
                if k == MsgKind::CpuOnline as u32 {
                    Report::CpuOnline { cpu: m.arg, tsc: d[0] }
                } else {
                    let stats = CpuStats { tasks: d[0], task_tsc: d[1], selftest_bytes: d[2], ipis_received: d[3], shootdowns_acked: d[4], shootdowns_sent: d[5], ipis_sent: d[6] };
                    Report::CpuStats { cpu: m.arg, stats }
                }
            }
            k if k == MsgKind::Workload as u32 => Report::Workload {
                event: crate::workload::Event::from_raw(m.arg).ok_or(DecodeError::BadField("workload event"))?,
                a: d[0],
                b: d[1],
            },
            k => return Err(DecodeError::UnknownKind(k)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_report_round_trips() {
        let reports = [
            Report::Hello { tsc: 7 },
            Report::Ready { tsc: 9, page_shift: 21, has_1g_pages: true },
            Report::Check { id: CheckId::NxFetch, passed: true, expected: 0x15, got: 0x15, cr2: 1, rip: 2 },
            Report::PageTables { table_pages: 4, leaves: [1, 2, 3] },
            Report::Frames { ram_bytes: 1, managed_bytes: 2, free_bytes: 3 },
            Report::Idle { status: 3 },
            Report::Workload { event: crate::workload::Event::Checksum, a: 1, b: 2 },
            Report::CpuOnline { cpu: 3, tsc: 99 },
            Report::CpuStats { cpu: 1, stats: CpuStats { tasks: 1, task_tsc: 2, selftest_bytes: 3, ipis_received: 4, shootdowns_acked: 5, shootdowns_sent: 6, ipis_sent: 7 } },
        ];
        for r in reports {
            let m = r.encode();
            let back = Message::from_bytes(m.as_bytes()).unwrap();
            assert_eq!(Report::decode(&back), Ok(r));
        }
    }

    #[test]
    fn garbage_is_rejected_not_trusted() {
        let m = Message { kind: 999, ..Default::default() };
        assert_eq!(Report::decode(&m), Err(DecodeError::UnknownKind(999)));
        let m = Message { kind: MsgKind::Check as u32, arg: 77, ..Default::default() };
        assert_eq!(Report::decode(&m), Err(DecodeError::BadField("check id")));
        let m = Message { kind: MsgKind::Ready as u32, arg: 13, ..Default::default() };
        assert!(Report::decode(&m).is_err());
        let m = Message { kind: MsgKind::CpuStats as u32, arg: crate::smp::MAX_CPUS, ..Default::default() };
        assert_eq!(Report::decode(&m), Err(DecodeError::BadField("cpu")));
    }
}
