//! Benchmarks (`vmm bench ...`): one file per benchmark, plus the summary
//! statistics they share.

pub mod balloon;
pub mod boot;
pub mod dirty;
pub mod dirty_kernels;
pub mod page_writer;
pub mod snapshot;
pub mod stats;
pub mod translation;

/// Which benchmark.
#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// Balloon reclaim rate per backing against raw madvise/punch-hole, and re-fault time.
    Balloon(balloon::BalloonArgs),
    /// Boot time and VMM memory overhead, over fresh processes.
    Boot(boot::BootArgs),
    /// Dirty-page harvest cost per mechanism, against the raw ioctls.
    Dirty(dirty::DirtyArgs),
    /// Diff-snapshot pause, full-snapshot throughput and restore latency.
    Snapshot(snapshot::SnapshotArgs),
    /// What nested (or shadow) translation costs: the same workloads
    /// natively and in the guest, over working sets, leaf sizes and backings.
    Translation(translation::TranslationArgs),
}

/// Runs a benchmark.
///
/// # Errors
/// Whatever the benchmark fails with.
pub fn run(bench: BenchCommand) -> Result<u32, Box<dyn std::error::Error>> {
    match bench {
        BenchCommand::Balloon(args) => Ok(balloon::run(&args)?),
        BenchCommand::Boot(args) => Ok(boot::run(&args)?),
        BenchCommand::Dirty(args) => Ok(dirty::run(&args)?),
        BenchCommand::Snapshot(args) => Ok(snapshot::run(&args)?),
        BenchCommand::Translation(args) => Ok(translation::run(&args)?),
    }
}
