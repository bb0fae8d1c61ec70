//! The native side of the translation benchmark: the same workload code
//! (`memvisor_user::translation`) over a buffer in the VMM process, mapped
//! with the same host backing the guest's RAM would have.

use memvisor_user::translation::{self, Workload};

use memvisor::config::Backing;
use memvisor::memory::backing::HostMapping;
use memvisor::memory::MemoryError;

/// One workload's native repetitions: (TSC ticks, accesses) each.
#[derive(Debug, Clone)]
pub struct NativeRun {
    /// (ticks, accesses) per timed repetition.
    pub reps: Vec<(u64, u64)>,
}

/// Runs `workloads` over a `bytes` buffer of `backing`: build, one untimed
/// warm-up repetition, then `reps` timed ones, exactly as the guest task
/// does (`memvisor_user::translation::entry`).
///
/// # Errors
/// [`MemoryError`] when the buffer cannot be mapped.
pub fn run(backing: Backing, bytes: u64, workloads: &[Workload], reps: u64, steps: u64, seed: u64) -> Result<Vec<(Workload, NativeRun)>, MemoryError> {
    // A hugetlb mapping is a whole number of its pages (a 4 MiB buffer of
    // 1 GiB pages maps one page and uses its first 4 MiB).
    let buffer = HostMapping::new(backing, bytes.next_multiple_of(backing.hugetlb_page_size().unwrap_or(4096)))?;
    let base = buffer.as_ptr();
    let mut out = Vec::new();
    for &w in workloads {
        // SAFETY: `buffer` is a live private mapping of `bytes` bytes (a
        // power of two of at least two pages, page aligned), used by nothing
        // else, and outlives these calls.
        let mut state = unsafe { translation::prepare(w, base, bytes, seed) };
        // SAFETY: as above, after `prepare`.
        state = unsafe { translation::run(w, base, bytes, steps, state) };
        let n = translation::accesses(w, bytes, steps);
        let mut samples = Vec::new();
        for _ in 0..reps {
            let t0 = translation::rdtsc();
            // SAFETY: as above.
            state = unsafe { translation::run(w, base, bytes, steps, state) };
            samples.push((translation::rdtsc().wrapping_sub(t0), n));
        }
        // The final state keeps the work observable to the optimiser.
        std::hint::black_box(state);
        out.push((w, NativeRun { reps: samples }));
    }
    Ok(out)
}
