//! Benchmarks (`vmm bench ...`).

/// Which benchmark.
#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// Boot time and VMM memory overhead.
    Boot,
}

/// Runs a benchmark.
///
/// # Errors
/// Whatever the benchmark fails with.
pub fn run(bench: BenchCommand) -> Result<u32, Box<dyn std::error::Error>> {
    match bench {
        BenchCommand::Boot => Err("not implemented yet".into()),
    }
}
