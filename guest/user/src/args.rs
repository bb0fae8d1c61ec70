//! What the kernel passes a ring-3 task: one read-only page of [`TaskArgs`].

/// One virtual range for a task to work on.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Range {
    /// First byte (8-byte aligned).
    pub start: u64,
    /// Length in bytes (a multiple of 8).
    pub len: u64,
}

/// Workload parameters passed in the argument block.
pub const MAX_PARAMS: usize = 8;

/// How many ranges fit in the one-page argument block.
pub const MAX_RANGES: usize = (4096 - 16 - 8 * MAX_PARAMS) / size_of::<Range>();

/// The argument block, one 4 KiB page mapped read-only into the task; its
/// address arrives in `rdi`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct TaskArgs {
    /// Nonzero: enter the kernel with `syscall`; zero: with `int3`.
    pub syscall_insn: u64,
    /// Valid entries of `ranges`.
    pub nranges: u64,
    /// Workload parameters (`memvisor_abi::workload::WorkloadSpec::params`).
    pub params: [u64; MAX_PARAMS],
    /// The ranges.
    pub ranges: [Range; MAX_RANGES],
}

const _: () = assert!(size_of::<TaskArgs>() <= 4096);
