//! Diff snapshots in two stops, with a pre-copy round between them, as
//! live migration does.
//!
//! 1. [`begin`] (vCPU stopped, briefly): harvests the dirty log (D1) and
//!    plans where its pages go; nothing is copied.
//! 2. [`Precopy::copy`] (vCPU running): copies D1's pages out of guest
//!    memory. The guest may be writing them meanwhile, so some copies may
//!    be torn or stale; step 3 fixes exactly those.
//! 3. [`finish`] (vCPU stopped): harvests again (D2: every page written
//!    by the guest or the VMM since step 1, the VMM's writes merged by the
//!    tracker as for any harvest), copies only D2's pages, and saves vCPU,
//!    irqchip and device state.
//! 4. [`merge`] (vCPU running, in [`super::Captured::persist`]): builds the
//!    diff's pages over D1 ∪ D2, each page from D2 where it is in D2, else
//!    from D1; the chunk CRCs are computed afterwards over this final
//!    content.
//!
//! Invariant: every page written by the guest or the VMM since the
//! previous snapshot is in D1 ∪ D2 (the log is continuous: D1 holds what
//! was written up to step 1, D2 what was written from step 1 to step 3),
//! and any page written after its D1 copy was taken is in D2 (it was
//! written after step 1). So the saved content of every page equals its
//! content at the second stop, which is when the vCPU state is saved.
//!
//! Harvested pages leave the dirty log. Until a snapshot holding them has
//! been captured they are kept in [`SnapshotChain::pending`], so a diff
//! that fails between the stops loses nothing: the next one includes them.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::dirty::{DirtyTracker, Harvest, ranges};
use crate::snapshot::format::{Chunk, ParentRef, SnapshotKind, plan_chunks};
use crate::snapshot::{Captured, Live, SnapshotChain, SnapshotError, absolute, memory_file};

const PAGE: u64 = 4096;

/// A diff between its two stops: D1's pages, planned at the first stop and
/// copied (by [`Precopy::copy`]) while the guest runs.
#[derive(Debug)]
pub struct Precopy {
    dir: PathBuf,
    parent: ParentRef,
    /// D1 as runs of (RAM offset, length), ascending, none crossing a region.
    runs: Vec<(u64, u64)>,
    /// The host address of each run's first byte (as an integer, so the
    /// plan can move to the thread that copies; valid while the VM's RAM
    /// stays mapped).
    sources: Vec<usize>,
    /// D1's pages, packed in run order, once copied.
    buf: Vec<u8>,
    copied: bool,
    pause_us: f64,
    harvest_us: f64,
}

/// What [`finish`] leaves for [`merge`], done after the vCPU resumed.
#[derive(Debug)]
pub struct Pending {
    /// D1: runs and their (pre-copied) pages.
    pub d1_runs: Vec<(u64, u64)>,
    /// D1's pages, packed.
    pub d1_buf: Vec<u8>,
    /// D2: runs and their pages, copied with the vCPU stopped.
    pub d2_runs: Vec<(u64, u64)>,
    /// D2's pages, packed.
    pub d2_buf: Vec<u8>,
    /// RAM offsets where a region begins (no run may cross one).
    pub region_starts: Vec<u64>,
}

impl Precopy {
    /// Bytes of D1.
    #[must_use]
    pub fn bytes(&self) -> u64 {
        self.runs.iter().map(|r| r.1).sum()
    }

    /// How long the first stop kept the vCPU stopped, microseconds.
    #[must_use]
    pub fn pause_us(&self) -> f64 {
        self.pause_us
    }

    /// Copies D1's pages out of guest memory into the buffer (resized here,
    /// outside any stop). The guest may run and write these pages meanwhile;
    /// [`finish`] recopies every page written since [`begin`].
    ///
    /// # Safety
    /// The guest RAM of the VM whose [`begin`] produced this plan must stay
    /// mapped for the whole call (the control server holds a
    /// [`crate::control::RamLease`]; the bench owns the VM).
    pub unsafe fn copy(&mut self) {
        let total = self.bytes() as usize;
        self.buf.resize(total, 0);
        // One thread: the guest runs meanwhile, and on the reference host's
        // two cores a second copier would compete with the vCPU thread.
        let mut at = 0;
        for (r, &src) in self.runs.iter().zip(&self.sources) {
            let len = r.1 as usize;
            // SAFETY: `src` is the host address of a run that lies inside
            // one guest RAM mapping (checked by `host_range` in `begin`),
            // mapped for this call (the caller's contract); `buf[at..]`
            // holds `len` bytes (the buffer is the runs' total). The guest
            // may write the source meanwhile: a raw copy makes no claim that
            // it does not, and `finish` recopies such pages.
            unsafe { std::ptr::copy_nonoverlapping(src as *const u8, self.buf[at..at + len].as_mut_ptr(), len) };
            at += len;
        }
        self.copied = true;
    }
}

/// Runs the calling thread under `SCHED_BATCH` while held (sched(7)):
/// its wakeups do not preempt other threads. The thread that takes a diff
/// is woken by the vCPU thread at the end of each stop; under the default
/// policy it may preempt the vCPU thread on the same CPU before the vCPU
/// is back in `KVM_RUN` (measured on the reference host: 3.5 ms added to
/// the first stop, with the pre-copy then running in the vCPU's place).
/// The previous policy comes back on drop; a thread that cannot switch
/// runs on as it was.
#[derive(Debug)]
pub struct BatchPolicy {
    previous: Option<(libc::c_int, libc::sched_param)>,
    /// Not `Send`: the policy is the creating thread's.
    _thread: std::marker::PhantomData<*const ()>,
}

impl BatchPolicy {
    /// Switches the calling thread to `SCHED_BATCH`.
    #[must_use]
    pub fn enter() -> Self {
        let mut param = libc::sched_param { sched_priority: 0 };
        // SAFETY: pid 0 is the calling thread; `param` is a valid out-pointer.
        let policy = unsafe { libc::sched_getscheduler(0) };
        // SAFETY: as above.
        if policy < 0 || unsafe { libc::sched_getparam(0, &mut param) } != 0 {
            return BatchPolicy { previous: None, _thread: std::marker::PhantomData };
        }
        let batch = libc::sched_param { sched_priority: 0 };
        // SAFETY: pid 0 is the calling thread; `batch` is a valid sched_param
        // (priority 0, as SCHED_BATCH requires).
        if unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &batch) } != 0 {
            log::debug!("cannot run the snapshot thread under SCHED_BATCH: {}", std::io::Error::last_os_error());
            return BatchPolicy { previous: None, _thread: std::marker::PhantomData };
        }
        BatchPolicy { previous: Some((policy, param)), _thread: std::marker::PhantomData }
    }
}

impl Drop for BatchPolicy {
    fn drop(&mut self) {
        if let Some((policy, param)) = self.previous {
            // SAFETY: pid 0 is the calling thread (the guard is not Send, so
            // it drops on the thread that made it); `param` came from
            // sched_getparam for this policy.
            unsafe { libc::sched_setscheduler(0, policy, &param) };
        }
    }
}

/// Checks a diff may be taken now: there is a previous snapshot, and the
/// dirty log has been on everywhere and harvested only by this chain since.
fn check_chain(tracker: &DirtyTracker, chain: &SnapshotChain) -> Result<ParentRef, SnapshotError> {
    let last = chain.last.clone().ok_or(SnapshotError::NoBase)?;
    if !tracker.logging_everywhere() || tracker.generation() != chain.generation {
        return Err(SnapshotError::LogInterrupted);
    }
    Ok(last)
}

/// Harvests into [`SnapshotChain::pending`] and returns the time taken:
/// from here the harvested pages are out of the dirty log, and `pending`
/// holds them until a snapshot holding them is captured. The chain's
/// generation follows this harvest, which is the chain's own.
fn harvest_pending(live: &Live<'_>, tracker: &mut DirtyTracker, chain: &mut SnapshotChain) -> Result<(Harvest, f64), SnapshotError> {
    let t = Instant::now();
    let h = tracker.harvest(live.vm_fd, live.ram)?;
    chain.generation = tracker.generation();
    chain.pending = ranges::union(&chain.pending, h.all());
    Ok((h, t.elapsed().as_secs_f64() * 1e6))
}

/// The first stop of a diff (vCPU stopped): harvests D1 (with any pages a
/// failed diff left in [`SnapshotChain::pending`]) and plans its copy.
///
/// # Errors
/// [`SnapshotError::Exists`], [`SnapshotError::NoBase`],
/// [`SnapshotError::LogInterrupted`], a harvest failure.
pub fn begin(live: &Live<'_>, tracker: &mut DirtyTracker, chain: &mut SnapshotChain, dir: &Path) -> Result<Precopy, SnapshotError> {
    let start = Instant::now();
    if dir.exists() {
        return Err(SnapshotError::Exists(dir.to_path_buf()));
    }
    let parent = check_chain(tracker, chain)?;
    let dir = absolute(dir)?;
    let (_, harvest_us) = harvest_pending(live, tracker, chain)?;
    let runs = memory_file::subtract(&memory_file::ranges_to_runs(live.ram, &chain.pending), &live.skip);
    let sources = runs
        .iter()
        .map(|&(off, len)| live.ram.host_range(off, len).map(|p| p as usize))
        .collect::<Option<Vec<usize>>>()
        .ok_or_else(|| SnapshotError::Corrupt("a dirty page run is outside guest RAM".into()))?;
    let buf = chain.spare.take().unwrap_or_default();
    Ok(Precopy { dir, parent, runs, sources, buf, copied: false, pause_us: start.elapsed().as_secs_f64() * 1e6, harvest_us })
}

/// The second stop of a diff (vCPU stopped): harvests D2, copies its pages
/// and saves vCPU and device state. A plan that was not pre-copied is
/// copied here (a one-stop diff). The pages are merged by
/// [`super::Captured::persist`].
///
/// # Errors
/// As [`begin`]; [`SnapshotError::LogInterrupted`] too when the chain
/// moved or the log was harvested elsewhere since [`begin`].
pub fn finish(live: &Live<'_>, tracker: &mut DirtyTracker, chain: &mut SnapshotChain, mut pre: Precopy) -> Result<Captured, SnapshotError> {
    let start = Instant::now();
    let one_stop = !pre.copied;
    if one_stop {
        // SAFETY: the vCPU is stopped and `live` borrows the VM's RAM, so
        // it is mapped and nothing writes it.
        unsafe { pre.copy() };
    }
    if pre.dir.exists() {
        return Err(SnapshotError::Exists(pre.dir.clone()));
    }
    let parent = check_chain(tracker, chain)?;
    if parent.id != pre.parent.id {
        return Err(SnapshotError::LogInterrupted);
    }
    let (d2, harvest_us) = harvest_pending(live, tracker, chain)?;
    let d2_runs = memory_file::subtract(&memory_file::ranges_to_runs(live.ram, d2.all()), &live.skip);
    let (_, d2_buf) = memory_file::copy_out(live.ram, &d2_runs, chain.spare_late.take().unwrap_or_default())?;
    let precopied_bytes = pre.bytes();
    let state = super::save_state(live)?;
    let manifest = super::new_manifest(live, SnapshotKind::Diff, Some(pre.parent));
    let mut region_starts = Vec::new();
    let mut base = 0;
    for r in live.ram.regions() {
        region_starts.push(base);
        base += r.range.size;
    }
    let late_bytes = d2_buf.len() as u64;
    // Everything harvested since the last snapshot is now held by this one.
    chain.pending.clear();
    chain.last = Some(ParentRef { dir: pre.dir.clone(), id: manifest.id.clone(), manifest_crc32: 0 });
    chain.generation = tracker.generation();
    let pause_us = start.elapsed().as_secs_f64() * 1e6;
    let (precopy_pause_us, pause_us) = if one_stop { (0.0, pre.pause_us + pause_us) } else { (pre.pause_us, pause_us) };
    Ok(Captured {
        dir: pre.dir,
        tmp: None,
        manifest,
        state,
        diff_data: None,
        merge: Some(Pending { d1_runs: pre.runs, d1_buf: pre.buf, d2_runs, d2_buf, region_starts }),
        pause_us,
        precopy_pause_us,
        harvest_us: pre.harvest_us + harvest_us,
        precopied_bytes: if one_stop { 0 } else { precopied_bytes },
        late_bytes,
    })
}

/// Checks that `runs` are page-aligned, ascending and disjoint, and fill
/// `buf_len` bytes.
fn check_runs(runs: &[(u64, u64)], buf_len: usize, what: &str) -> Result<(), SnapshotError> {
    let bad = |why: &str| Err(SnapshotError::Corrupt(format!("{what}: {why}")));
    let mut end = 0;
    let mut total = 0;
    for (i, &(start, len)) in runs.iter().enumerate() {
        if start % PAGE != 0 || len % PAGE != 0 || len == 0 {
            return bad("a run is not whole pages");
        }
        if i > 0 && start < end {
            return bad("runs overlap or are out of order");
        }
        end = start + len;
        total += len;
    }
    if total != buf_len as u64 {
        return bad("the page buffer does not match its runs");
    }
    Ok(())
}

fn pages_of(runs: &[(u64, u64)]) -> impl Iterator<Item = u64> + '_ {
    runs.iter().flat_map(|&(start, len)| (0..len / PAGE).map(move |i| start + i * PAGE))
}

/// Merges D1 and D2 into the diff's pages: returns the chunks (CRCs not
/// yet computed) over D1 ∪ D2 and their content packed in chunk order,
/// each page taken from D2 when it is in D2 (its content at the second
/// stop), else from D1. Runs are (RAM offset, length), whole pages,
/// ascending and disjoint; each buffer holds its runs' pages packed in
/// order; no run of the result crosses an offset in `region_starts`.
/// When D2 ⊆ D1 (the usual case) D1's buffer is patched in place.
///
/// # Errors
/// [`SnapshotError::Corrupt`] when runs and buffers do not fit together.
pub fn merge(d1_runs: &[(u64, u64)], mut d1_buf: Vec<u8>, d2_runs: &[(u64, u64)], d2_buf: &[u8], region_starts: &[u64]) -> Result<(Vec<Chunk>, Vec<u8>), SnapshotError> {
    check_runs(d1_runs, d1_buf.len(), "pre-copied pages")?;
    check_runs(d2_runs, d2_buf.len(), "pages of the final stop")?;
    // Each D2 page's slot in D1's buffer, or None when it is in D2 only.
    let mut d1_pages = pages_of(d1_runs).enumerate().peekable();
    let slots: Vec<Option<usize>> = pages_of(d2_runs)
        .map(|page| {
            while d1_pages.next_if(|&(_, p)| p < page).is_some() {}
            d1_pages.next_if(|&(_, p)| p == page).map(|(i, _)| i)
        })
        .collect();
    let page = PAGE as usize;
    if slots.iter().all(Option::is_some) {
        for (j, slot) in slots.iter().enumerate() {
            if let Some(i) = *slot {
                d1_buf[i * page..(i + 1) * page].copy_from_slice(&d2_buf[j * page..(j + 1) * page]);
            }
        }
        return Ok((plan_chunks(d1_runs, true), d1_buf));
    }
    // Some pages are in D2 only: build the union afresh, in RAM order.
    let only_d2 = slots.iter().filter(|s| s.is_none()).count();
    let mut out = Vec::with_capacity(d1_buf.len() + only_d2 * page);
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut push = |off: u64, bytes: &[u8]| {
        out.extend_from_slice(bytes);
        match runs.last_mut() {
            Some(last) if last.0 + last.1 == off && region_starts.binary_search(&off).is_err() => last.1 += PAGE,
            _ => runs.push((off, PAGE)),
        }
    };
    let mut a = pages_of(d1_runs).enumerate().peekable();
    let mut b = pages_of(d2_runs).enumerate().peekable();
    loop {
        match (a.peek().copied(), b.peek().copied()) {
            (Some((i, p)), Some((_, q))) if p < q => {
                push(p, &d1_buf[i * page..(i + 1) * page]);
                a.next();
            }
            (Some((_, p)), Some((j, q))) => {
                // In D2 (and in D1 too when p == q): D2's copy wins.
                push(q, &d2_buf[j * page..(j + 1) * page]);
                if p == q {
                    a.next();
                }
                b.next();
            }
            (Some((i, p)), None) => {
                push(p, &d1_buf[i * page..(i + 1) * page]);
                a.next();
            }
            (None, Some((j, q))) => {
                push(q, &d2_buf[j * page..(j + 1) * page]);
                b.next();
            }
            (None, None) => break,
        }
    }
    Ok((plan_chunks(&runs, true), out))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Packed pages for `runs`, each page filled with `tag` + its page number.
    fn pages(runs: &[(u64, u64)], tag: u8) -> Vec<u8> {
        pages_of(runs).flat_map(|p| std::iter::repeat_n(tag.wrapping_add((p / PAGE) as u8), PAGE as usize)).collect()
    }

    /// The (RAM page, fill byte) of every page of a merge's result.
    fn content(chunks: &[Chunk], data: &[u8]) -> Vec<(u64, u8)> {
        let mut out = Vec::new();
        for c in chunks {
            for i in 0..c.len / PAGE {
                let at = (c.file_offset + i * PAGE) as usize;
                let page = &data[at..at + PAGE as usize];
                assert!(page.iter().all(|&b| b == page[0]), "a page is uniform");
                out.push(((c.ram_offset + i * PAGE) / PAGE, page[0]));
            }
        }
        out
    }

    const D1: u8 = 0x10;
    const D2: u8 = 0x80;

    #[test]
    fn a_d2_inside_d1_overwrites_its_pages_in_place() {
        let d1 = [(0, 4 * PAGE), (10 * PAGE, 2 * PAGE)];
        let d2 = [(PAGE, PAGE), (11 * PAGE, PAGE)];
        let (chunks, data) = merge(&d1, pages(&d1, D1), &d2, &pages(&d2, D2), &[0]).unwrap();
        assert_eq!(chunks, plan_chunks(&d1, true));
        assert_eq!(content(&chunks, &data), [(0, D1), (1, D2 + 1), (2, D1 + 2), (3, D1 + 3), (10, D1 + 10), (11, D2 + 11)]);
    }

    #[test]
    fn a_page_in_d2_only_is_added_in_ram_order() {
        let d1 = [(2 * PAGE, PAGE), (8 * PAGE, PAGE)];
        let d2 = [(5 * PAGE, PAGE)];
        let (chunks, data) = merge(&d1, pages(&d1, D1), &d2, &pages(&d2, D2), &[0]).unwrap();
        assert_eq!(chunks.iter().map(|c| (c.ram_offset, c.len)).collect::<Vec<_>>(), [(2 * PAGE, PAGE), (5 * PAGE, PAGE), (8 * PAGE, PAGE)]);
        assert_eq!(content(&chunks, &data), [(2, D1 + 2), (5, D2 + 5), (8, D1 + 8)]);
    }

    #[test]
    fn overlapping_and_adjacent_runs_merge_into_one_with_d2_winning() {
        // D1 pages 0-3, D2 pages 2-6: overlap on 2-3, D2 extends past D1.
        let d1 = [(0, 4 * PAGE)];
        let d2 = [(2 * PAGE, 5 * PAGE)];
        let (chunks, data) = merge(&d1, pages(&d1, D1), &d2, &pages(&d2, D2), &[0]).unwrap();
        assert_eq!(chunks.iter().map(|c| (c.ram_offset, c.len, c.file_offset)).collect::<Vec<_>>(), [(0, 7 * PAGE, 0)]);
        assert_eq!(content(&chunks, &data), [(0, D1), (1, D1 + 1), (2, D2 + 2), (3, D2 + 3), (4, D2 + 4), (5, D2 + 5), (6, D2 + 6)]);
    }

    #[test]
    fn adjacent_pages_of_two_regions_stay_in_two_chunks() {
        // Region 1 starts at RAM offset 4 pages: page 3 (D1) and page 4 (D2
        // only) are adjacent in RAM but not in one mapping.
        let d1 = [(3 * PAGE, PAGE)];
        let d2 = [(4 * PAGE, PAGE)];
        let (chunks, data) = merge(&d1, pages(&d1, D1), &d2, &pages(&d2, D2), &[0, 4 * PAGE]).unwrap();
        assert_eq!(chunks.iter().map(|c| (c.ram_offset, c.len)).collect::<Vec<_>>(), [(3 * PAGE, PAGE), (4 * PAGE, PAGE)]);
        assert_eq!(content(&chunks, &data), [(3, D1 + 3), (4, D2 + 4)]);
    }

    #[test]
    fn an_empty_d1_or_d2_gives_the_other() {
        let some = [(PAGE, 2 * PAGE)];
        let (chunks, data) = merge(&[], Vec::new(), &some, &pages(&some, D2), &[0]).unwrap();
        assert_eq!(content(&chunks, &data), [(1, D2 + 1), (2, D2 + 2)]);
        let (chunks, data) = merge(&some, pages(&some, D1), &[], &[], &[0]).unwrap();
        assert_eq!(content(&chunks, &data), [(1, D1 + 1), (2, D1 + 2)]);
    }

    #[test]
    fn runs_that_do_not_fit_their_buffer_or_overlap_are_refused() {
        let d1 = [(0, 2 * PAGE)];
        assert!(merge(&d1, vec![0; PAGE as usize], &[], &[], &[0]).is_err());
        let overlapping = [(0, 2 * PAGE), (PAGE, PAGE)];
        assert!(merge(&overlapping, vec![0; 3 * PAGE as usize], &[], &[], &[0]).is_err());
    }

    #[test]
    fn merged_chunks_get_crcs_of_the_final_content() {
        // The CRCs are computed by persist over the merged buffer: check the
        // buffer a chunk points at holds D2's bytes for a page in both.
        let d1 = [(0, 2 * PAGE)];
        let d2 = [(PAGE, PAGE)];
        let (chunks, data) = merge(&d1, pages(&d1, D1), &d2, &pages(&d2, D2), &[0]).unwrap();
        let c = &chunks[0];
        let bytes = &data[c.file_offset as usize..(c.file_offset + c.len) as usize];
        let mut expected = vec![D1; PAGE as usize];
        expected.extend(std::iter::repeat_n(D2 + 1, PAGE as usize));
        assert_eq!(crc32fast::hash(bytes), crc32fast::hash(&expected));
    }

    /// A running micro guest with a full snapshot taken, for the KVM tests.
    struct Guest {
        w: crate::page_writer::PageWriter,
        config: crate::config::VmConfig,
        chain: SnapshotChain,
        root: PathBuf,
    }

    const MEM: u64 = 64 << 20;

    impl Guest {
        fn new(name: &str) -> Guest {
            let mut w = crate::page_writer::PageWriter::new(MEM, crate::config::Backing::Anon, crate::dirty::DirtyMode::Bitmap).unwrap();
            w.pass(FIRST, 16, 1).unwrap();
            let root = std::env::temp_dir().join(format!("memvisor-diff-unit-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&root);
            std::fs::create_dir_all(&root).unwrap();
            let mut g = Guest { w, config: crate::config::VmConfig { mem_size: MEM, backing: crate::config::Backing::Anon, ..crate::config::VmConfig::default() }, chain: SnapshotChain::default(), root };
            let dir = g.root.join("full");
            let (live, tracker, chain) = g.parts();
            crate::snapshot::take(&live, tracker, chain, &dir, SnapshotKind::Full).unwrap();
            g
        }

        fn parts(&mut self) -> (Live<'_>, &mut DirtyTracker, &mut SnapshotChain) {
            let w = &mut self.w;
            let devices = crate::devices::Devices::new(Box::new(std::io::sink())).state();
            let live = Live { kvm: w.vm.kvm(), vm_fd: w.vm.fd(), vcpus: vec![&w.vcpu], ram: w.vm.ram(), config: &self.config, devices, guest_idle: None, irqchip: w.vm.has_irqchip(), skip: Vec::new() };
            (live, &mut w.tracker, &mut self.chain)
        }

        /// The guest pages a persisted snapshot holds.
        fn saved_pages(dir: &Path) -> Vec<u64> {
            let chain = crate::snapshot::load_chain(dir).unwrap();
            let chunks = &chain.links.last().unwrap().manifest.chunks;
            // One region at guest-physical 0: RAM offset = address.
            chunks.iter().flat_map(|c| (0..c.len / PAGE).map(move |i| c.ram_offset / PAGE + i)).collect()
        }
    }

    impl Drop for Guest {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }

    const FIRST: u64 = crate::page_writer::FIRST_DATA_PAGE;

    #[test]
    fn a_diff_that_failed_between_its_stops_leaves_its_pages_to_the_next() {
        let mut g = Guest::new("retry");
        g.w.pass(FIRST + 100, 8, 1).unwrap();
        let lost = g.root.join("lost");
        let (live, tracker, chain) = g.parts();
        let pre = begin(&live, tracker, chain, &lost).unwrap();
        // The diff fails after its first stop harvested pages 100..108.
        drop(pre);
        g.w.pass(FIRST + 200, 4, 1).unwrap();
        let next = g.root.join("next");
        let (live, tracker, chain) = g.parts();
        crate::snapshot::take(&live, tracker, chain, &next, SnapshotKind::Diff).unwrap();
        let saved = Guest::saved_pages(&next);
        for page in (FIRST + 100..FIRST + 108).chain(FIRST + 200..FIRST + 204) {
            assert!(saved.contains(&page), "page {page} is in the next diff: {saved:?}");
        }
        assert!(g.chain.pending.is_empty(), "nothing is pending once a diff holds it");
    }

    #[test]
    fn a_harvest_elsewhere_between_the_stops_refuses_the_diff() {
        let mut g = Guest::new("elsewhere");
        g.w.pass(FIRST + 100, 8, 1).unwrap();
        let dir = g.root.join("diff");
        let (live, tracker, chain) = g.parts();
        let mut pre = begin(&live, tracker, chain, &dir).unwrap();
        // SAFETY: the guest's RAM lives as long as `g`.
        unsafe { pre.copy() };
        let (live, tracker, chain) = g.parts();
        tracker.harvest(live.vm_fd, live.ram).unwrap();
        let e = finish(&live, tracker, chain, pre).unwrap_err();
        assert!(matches!(e, SnapshotError::LogInterrupted), "{e}");
        assert!(!dir.exists());
    }

    #[test]
    fn a_two_stop_diff_saves_each_page_as_of_the_second_stop() {
        let mut g = Guest::new("two-stop");
        g.w.pass(FIRST + 100, 8, 1).unwrap();
        let dir = g.root.join("diff");
        let (live, tracker, chain) = g.parts();
        let mut pre = begin(&live, tracker, chain, &dir).unwrap();
        // SAFETY: the guest's RAM lives as long as `g`.
        unsafe { pre.copy() };
        // Between the stops the guest rewrites page 103 (in D1) and writes
        // page 300 (D2 only); each pass writes a new value.
        g.w.pass(FIRST + 103, 1, 1).unwrap();
        g.w.pass(FIRST + 300, 1, 1).unwrap();
        let (live, tracker, chain) = g.parts();
        let captured = finish(&live, tracker, chain, pre).unwrap();
        let (info, _) = captured.persist().unwrap();
        // The 8 pages, and the page the VMM wrote the pass's parameters to.
        assert!(info.precopied_bytes >= 8 * PAGE, "{info:?}");
        assert!(info.late_bytes >= 2 * PAGE, "{info:?}");
        let saved = Guest::saved_pages(&dir);
        assert!(saved.contains(&(FIRST + 300)), "{saved:?}");
        // Every saved page equals guest memory now (the guest is stopped).
        let chain = crate::snapshot::load_chain(&dir).unwrap();
        let link = chain.links.last().unwrap();
        let file = std::fs::File::open(dir.join(crate::snapshot::format::MEMORY_FILE)).unwrap();
        let ram = g.w.vm.ram();
        for c in &link.manifest.chunks {
            let mut buf = vec![0u8; c.len as usize];
            std::os::unix::fs::FileExt::read_exact_at(&file, &mut buf, c.file_offset).unwrap();
            let p = ram.host_range(c.ram_offset, c.len).unwrap();
            // SAFETY: inside guest RAM (host_range), the vCPU is not running.
            let live_bytes = unsafe { std::slice::from_raw_parts(p, c.len as usize) };
            assert!(buf == live_bytes, "chunk at {:#x} holds guest memory as it is", c.ram_offset);
            assert_eq!(crc32fast::hash(&buf), c.crc32);
        }
    }
}
