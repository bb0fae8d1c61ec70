//! Snapshots: full and incremental (diff), and loading a chain of them.
//!
//! A full snapshot is taken on the vCPU thread while the vCPU is stopped
//! ([`take`]); a diff saves only the pages dirty tracking harvested since
//! the previous snapshot of the same VM, in two stops with a pre-copy of
//! the pages in between ([`diff`]). Each snapshot is written into a
//! temporary directory beside its destination, every file fsynced, then
//! renamed into place, so a crash or ENOSPC midway leaves earlier
//! snapshots whole and no half-written one behind. [`chain`] reads a
//! snapshot and its ancestors back, checking every manifest and checksum
//! before the guest runs.

pub mod chain;
pub mod diff;
pub mod format;
pub mod irqchip;
pub mod memory_file;
pub mod msrs;
pub mod vcpu_state;

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::devices::DevicesState;
use crate::dirty::{DirtyError, DirtyTracker};
use format::{FormatError, Manifest, ParentRef, RegionRecord, SnapshotKind};
use vcpu_state::VcpuState;

pub use chain::{Chain, Loaded, OpenChain, load_chain, open_chain};

/// Errors taking or loading snapshots.
#[derive(Debug, Error)]
pub enum SnapshotError {
    /// A file operation failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A KVM ioctl failed.
    #[error("{what} failed")]
    Kvm {
        /// Which.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// KVM offers a part of the vCPU's state (its capability is present)
    /// but did not read it: a snapshot without it would not resume the
    /// guest as it was.
    #[error("KVM offers the vCPU's {what} but {ioctl} failed")]
    VcpuStateUnreadable {
        /// The part, in words.
        what: &'static str,
        /// The ioctl that failed.
        ioctl: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// KVM lists an MSR as saveable (KVM_GET_MSR_INDEX_LIST) but did not
    /// read it.
    #[error("KVM lists MSR {index:#x} as saveable but did not read it")]
    MsrUnreadable {
        /// The MSR.
        index: u32,
    },
    /// KVM did not take a saved MSR's value back (KVM_SET_MSRS stopped
    /// at it).
    #[error("KVM refused to restore MSR {index:#x} (value {value:#x})")]
    MsrRefused {
        /// The MSR.
        index: u32,
        /// The saved value.
        value: u64,
    },
    /// The snapshot's contents are damaged.
    #[error("snapshot is corrupted: {0}")]
    Corrupt(String),
    /// The manifest is invalid or does not fit its chain.
    #[error("invalid snapshot {dir}: {source}")]
    Format {
        /// The snapshot directory.
        dir: PathBuf,
        /// What is wrong.
        #[source]
        source: FormatError,
    },
    /// A diff's base is gone.
    #[error("the base snapshot {base} of {dir} is missing")]
    MissingBase {
        /// The diff.
        dir: PathBuf,
        /// The base it names.
        base: PathBuf,
    },
    /// The destination exists.
    #[error("snapshot destination {0} already exists")]
    Exists(PathBuf),
    /// The snapshot does not match what the restore asked for.
    #[error("snapshot does not match: {0}")]
    Mismatch(String),
    /// Dirty logging was paused or harvested by something else since the
    /// last snapshot, so a diff could miss pages.
    #[error("dirty logging was switched or harvested by something else since the last snapshot; take a full snapshot")]
    LogInterrupted,
    /// A diff without a previous snapshot.
    #[error("no previous snapshot of this VM to take a diff against; take a full snapshot first")]
    NoBase,
    /// The VM has something snapshots cannot save yet.
    #[error("{0}")]
    Unsupported(String),
    /// The balloon's saved state does not fit together or with the VM.
    #[error("snapshot is corrupted: the balloon's saved state is invalid")]
    BalloonState(#[from] crate::devices::virtio::balloon::state::BalloonStateError),
    /// Dirty tracking failed.
    #[error(transparent)]
    Dirty(#[from] DirtyError),
}

pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let what = what.into();
    move |source| SnapshotError::Io { what, source }
}

/// Maps a failed KVM ioctl `what` to [`SnapshotError::Kvm`].
pub(crate) fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> SnapshotError {
    move |e| SnapshotError::Kvm { what, source: std::io::Error::from_raw_os_error(e.errno()) }
}

/// `state.json`: everything but memory.
#[derive(Debug, Serialize, Deserialize)]
pub struct SavedState {
    /// The vCPUs (one today).
    pub vcpus: Vec<VcpuState>,
    /// The devices.
    pub devices: DevicesState,
    /// The PICs and IOAPIC, when the VM has an in-kernel irqchip (absent in
    /// snapshots written before it was saved).
    #[serde(default)]
    pub irqchip: Option<irqchip::IrqchipState>,
    /// Whether the guest had finished its work (it must not be re-entered).
    pub guest_idle: bool,
    /// The guest's would-be exit status when idle.
    pub idle_status: u32,
}

/// The previous snapshot of a running VM, for diffs.
#[derive(Debug, Default)]
pub struct SnapshotChain {
    /// The last snapshot taken (or restored from).
    pub last: Option<ParentRef>,
    /// The previous diff's page buffer, reused so a diff does not pay for
    /// faulting in fresh memory.
    pub spare: Option<Vec<u8>>,
    /// The previous diff's buffer for the pages copied at its second stop
    /// (reused likewise: that copy is inside the pause).
    pub spare_late: Option<Vec<u8>>,
    /// Pages harvested from the dirty log since the last snapshot that no
    /// captured snapshot holds yet (a diff that failed between its stops
    /// leaves them here, and the next diff includes them). Empty after
    /// every capture.
    pub pending: Vec<crate::dirty::PageRange>,
    /// The tracker's generation right after the last snapshot's own
    /// start/harvest: if it moved, something else harvested or switched
    /// logging since, and a diff would miss pages.
    pub generation: u64,
}

/// What a snapshot cost.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotInfo {
    /// The directory written.
    pub dir: PathBuf,
    /// Full or diff.
    pub kind: SnapshotKind,
    /// Bytes of guest memory saved.
    pub memory_bytes: u64,
    /// Time the vCPU was stopped for the final (or only) stop, which saves
    /// the vCPU state, microseconds.
    pub pause_us: f64,
    /// A diff's first stop, which only harvests the dirty log (0 for a
    /// full snapshot or a one-stop diff), microseconds.
    pub precopy_pause_us: f64,
    /// Both stops together, microseconds.
    pub total_pause_us: f64,
    /// Of which: harvesting dirty pages (both harvests of a diff).
    pub harvest_us: f64,
    /// A diff's bytes copied between the stops, with the guest running.
    pub precopied_bytes: u64,
    /// A diff's bytes copied in its final stop (pages written since the
    /// first stop, and the VMM's writes).
    pub late_bytes: u64,
}

/// What [`take`] needs from the live VM.
#[derive(Debug)]
pub struct Live<'a> {
    /// KVM system fd (MSR list).
    pub kvm: &'a kvm_ioctls::Kvm,
    /// The VM fd.
    pub vm_fd: &'a kvm_ioctls::VmFd,
    /// The stopped vCPUs, in index order.
    pub vcpus: Vec<&'a kvm_ioctls::VcpuFd>,
    /// Guest RAM.
    pub ram: &'a crate::memory::GuestRam,
    /// The configuration.
    pub config: &'a crate::config::VmConfig,
    /// Device state.
    pub devices: DevicesState,
    /// Idle flag and status.
    pub guest_idle: Option<u32>,
    /// Whether the VM has an in-kernel irqchip (its state and the LAPIC's
    /// are saved then).
    pub irqchip: bool,
    /// RAM byte ranges `(offset, length)`, ascending, that hold nothing to
    /// save: the host pages a balloon has released. Reading them to save
    /// them would fault them back in (a hugetlbfs hole takes a huge page
    /// from the pool); a restore releases them again.
    pub skip: Vec<(u64, u64)>,
}

/// What a snapshot captured while the vCPU was stopped, still to be made
/// durable by [`Captured::persist`] (which may run after the vCPU resumed).
#[derive(Debug)]
pub struct Captured {
    dir: PathBuf,
    /// The temporary directory (a full snapshot has written memory.bin
    /// there already; a diff creates it when persisting).
    tmp: Option<PathBuf>,
    manifest: Manifest,
    state: SavedState,
    /// A diff's pages, packed in chunk order, once merged; `None` for a
    /// full snapshot, whose memory.bin is already written.
    diff_data: Option<Vec<u8>>,
    /// A diff's pages from both stops, still to be merged into `diff_data`
    /// (done by [`Captured::persist`], with the vCPU running).
    merge: Option<diff::Pending>,
    pause_us: f64,
    precopy_pause_us: f64,
    harvest_us: f64,
    precopied_bytes: u64,
    late_bytes: u64,
}

/// Page buffers a persisted diff hands back for the next one to reuse.
#[derive(Debug, Default)]
pub struct Spares {
    /// The diff's page buffer ([`SnapshotChain::spare`]).
    pub pages: Option<Vec<u8>>,
    /// The buffer of its final stop ([`SnapshotChain::spare_late`]).
    pub late: Option<Vec<u8>>,
}

impl SnapshotChain {
    /// Keeps `spares` for the next diff.
    pub fn keep(&mut self, spares: Spares) {
        if spares.pages.is_some() {
            self.spare = spares.pages;
        }
        if spares.late.is_some() {
            self.spare_late = spares.late;
        }
    }
}

/// Takes a snapshot into `dir` (which must not exist) and makes it durable
/// before returning.
///
/// # Errors
/// Any [`SnapshotError`]; `dir` is then not created.
pub fn take(live: &Live<'_>, tracker: &mut DirtyTracker, chain: &mut SnapshotChain, dir: &Path, kind: SnapshotKind) -> Result<SnapshotInfo, SnapshotError> {
    let captured = capture(live, tracker, chain, dir, kind)?;
    match captured.persist() {
        Ok((info, spares)) => {
            chain.keep(spares);
            Ok(info)
        }
        Err(e) => {
            chain.last = None;
            Err(e)
        }
    }
}

/// The part of a snapshot that needs the vCPU stopped: vCPU and device
/// state, and guest memory: a full snapshot writes memory.bin directly; a
/// diff harvests the dirty pages and copies them into a buffer, so the
/// vCPU can resume while [`Captured::persist`] writes them out. This takes
/// a diff in one stop ([`diff::begin`] then [`diff::finish`] with no
/// pre-copy between); the control server uses the two stops.
///
/// `chain.last` names the new snapshot from here on; if persisting fails
/// the caller must clear it (the pages it harvested are gone from the dirty
/// log, so the next snapshot must be full).
///
/// # Errors
/// Any [`SnapshotError`].
pub fn capture(live: &Live<'_>, tracker: &mut DirtyTracker, chain: &mut SnapshotChain, dir: &Path, kind: SnapshotKind) -> Result<Captured, SnapshotError> {
    if kind == SnapshotKind::Diff {
        let pre = diff::begin(live, tracker, chain, dir)?;
        return diff::finish(live, tracker, chain, pre);
    }
    let start = Instant::now();
    if dir.exists() {
        return Err(SnapshotError::Exists(dir.to_path_buf()));
    }
    let dir = absolute(dir)?;
    let state = save_state(live)?;
    let mut manifest = new_manifest(live, kind, None);
    let tmp = temp_sibling(&dir)?;
    // (Re)start dirty logging first, so the next diff holds exactly what
    // changes after this snapshot (and nothing harvested before it is
    // pending any more: this snapshot holds all of memory).
    let written = tracker.start(live.vm_fd, live.ram).map_err(SnapshotError::from).and_then(|()| {
        let runs = memory_file::subtract(&memory_file::pages_to_save(live.ram)?, &live.skip);
        let mem_path = tmp.join(format::MEMORY_FILE);
        let (mem, direct) = crate::fsutil::create_direct(&mem_path).map_err(io(format!("creating {}", mem_path.display())))?;
        let chunks = memory_file::write(live.ram, &mem, &runs, direct)?;
        // A full image is as long as RAM, holes included.
        mem.set_len(live.ram.size()).map_err(io("sizing memory.bin"))?;
        mem.sync_all().map_err(io("syncing memory.bin"))?;
        Ok(chunks)
    });
    match written {
        Ok(chunks) => {
            manifest.chunks = chunks;
            manifest.memory_file_len = live.ram.size();
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    }
    chain.pending.clear();
    chain.last = Some(ParentRef { dir: dir.clone(), id: manifest.id.clone(), manifest_crc32: 0 });
    chain.generation = tracker.generation();
    let pause_us = start.elapsed().as_secs_f64() * 1e6;
    Ok(Captured { dir, tmp: Some(tmp), manifest, state, diff_data: None, merge: None, pause_us, precopy_pause_us: 0.0, harvest_us: 0.0, precopied_bytes: 0, late_bytes: 0 })
}

/// Saves vCPU, irqchip and device state (the vCPU stopped).
fn save_state(live: &Live<'_>) -> Result<SavedState, SnapshotError> {
    Ok(SavedState {
        vcpus: live.vcpus.iter().map(|v| VcpuState::save(live.kvm, v, live.irqchip)).collect::<Result<_, _>>()?,
        irqchip: if live.irqchip { Some(irqchip::IrqchipState::save(live.vm_fd)?) } else { None },
        devices: live.devices.clone(),
        guest_idle: live.guest_idle.is_some(),
        idle_status: live.guest_idle.unwrap_or(0),
    })
}

/// A manifest with no memory chunks yet.
fn new_manifest(live: &Live<'_>, kind: SnapshotKind, parent: Option<ParentRef>) -> Manifest {
    Manifest {
        magic: format::MAGIC.into(),
        version: format::VERSION,
        kind,
        id: format::new_id(),
        parent,
        config: live.config.clone(),
        regions: live.ram.regions().iter().map(|r| RegionRecord { guest_start: r.range.start.0, size: r.range.size }).collect(),
        state_crc32: 0,
        memory_file_len: 0,
        chunk_count: 0,
        chunks_crc32: 0,
        manifest_crc32: 0,
        chunks: Vec::new(),
    }
}

impl Captured {
    /// How long the capture's final (or only) stop kept the vCPU stopped,
    /// microseconds (not counting leaving and re-entering `KVM_RUN`).
    #[must_use]
    pub fn pause_us(&self) -> f64 {
        self.pause_us
    }

    /// A diff's bytes pre-copied, and copied in its final stop.
    #[must_use]
    pub fn copied_bytes(&self) -> (u64, u64) {
        (self.precopied_bytes, self.late_bytes)
    }

    /// Of which harvesting the dirty pages, microseconds.
    #[must_use]
    pub fn harvest_us(&self) -> f64 {
        self.harvest_us
    }

    /// Merges a diff's pages ([`diff::merge`]), writes what is left, fsyncs
    /// every file and renames the snapshot into place. When writing or the rename fails the temporary directory is
    /// removed and no snapshot is created (a destination that appeared
    /// meanwhile is left as it was). Also returns the diff's page buffers,
    /// for the next diff to reuse ([`SnapshotChain::keep`]).
    ///
    /// # Errors
    /// [`SnapshotError::Io`] (e.g. ENOSPC); [`SnapshotError::Corrupt`] when
    /// a diff's pages do not merge (a bug).
    pub fn persist(mut self) -> Result<(SnapshotInfo, Spares), SnapshotError> {
        let mut late = None;
        if let Some(m) = self.merge.take() {
            let (chunks, data) = diff::merge(&m.d1_runs, m.d1_buf, &m.d2_runs, &m.d2_buf, &m.region_starts)?;
            self.manifest.memory_file_len = data.len() as u64;
            self.manifest.chunks = chunks;
            self.diff_data = Some(data);
            late = Some(m.d2_buf);
        }
        let tmp = match self.tmp.take() {
            Some(t) => t,
            None => temp_sibling(&self.dir)?,
        };
        if let Err(e) = self.write_rest(&tmp) {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        if let Err(e) = std::fs::rename(&tmp, &self.dir) {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(io(format!("renaming {} to {}", tmp.display(), self.dir.display()))(e));
        }
        if let Some(p) = self.dir.parent() {
            File::open(p).and_then(|f| f.sync_all()).map_err(io("syncing the snapshot's parent directory"))?;
        }
        let info = SnapshotInfo {
            dir: self.dir,
            kind: self.manifest.kind,
            memory_bytes: self.manifest.chunks.iter().map(|c| c.len).sum(),
            pause_us: self.pause_us,
            precopy_pause_us: self.precopy_pause_us,
            total_pause_us: self.pause_us + self.precopy_pause_us,
            harvest_us: self.harvest_us,
            precopied_bytes: self.precopied_bytes,
            late_bytes: self.late_bytes,
        };
        Ok((info, Spares { pages: self.diff_data, late }))
    }

    fn write_rest(&mut self, tmp: &Path) -> Result<(), SnapshotError> {
        if let Some(data) = &self.diff_data {
            // Over the final content: after the merge, so a page recopied
            // at a diff's second stop is checksummed as saved.
            for c in &mut self.manifest.chunks {
                let start = c.file_offset as usize;
                c.crc32 = crc32fast::hash(&data[start..start + c.len as usize]);
            }
            write_file_synced(&tmp.join(format::MEMORY_FILE), data)?;
        }
        let chunks = format::encode_chunks(&self.manifest.chunks);
        self.manifest.chunk_count = self.manifest.chunks.len() as u64;
        self.manifest.chunks_crc32 = crc32fast::hash(&chunks);
        write_file_synced(&tmp.join(format::CHUNKS_FILE), &chunks)?;
        let state_json = serde_json::to_vec(&self.state).map_err(|e| SnapshotError::Corrupt(format!("cannot encode state: {e}")))?;
        self.manifest.state_crc32 = crc32fast::hash(&state_json);
        write_file_synced(&tmp.join(format::STATE_FILE), &state_json)?;
        if let Some(parent) = self.manifest.parent.as_mut() {
            parent.manifest_crc32 = parent_checksum(parent)?;
        }
        self.manifest.seal();
        let text = serde_json::to_vec_pretty(&self.manifest).map_err(|e| SnapshotError::Corrupt(format!("cannot encode manifest: {e}")))?;
        write_file_synced(&tmp.join(format::MANIFEST_FILE), &text)?;
        File::open(tmp).and_then(|f| f.sync_all()).map_err(io("syncing the snapshot directory"))
    }
}

/// The checksum of the manifest `parent` names, read from disk (it was
/// written and renamed into place before this diff: persists are one at a
/// time), after checking it is the snapshot the link names.
fn parent_checksum(parent: &ParentRef) -> Result<u32, SnapshotError> {
    let path = parent.dir.join(format::MANIFEST_FILE);
    let text = crate::fsutil::read_bounded(&path, format::MAX_MANIFEST_BYTES).map_err(io(format!("reading {}", path.display())))?;
    let m: Manifest = serde_json::from_slice(&text).map_err(|e| SnapshotError::Corrupt(format!("{}: {e}", path.display())))?;
    if m.id != parent.id || m.manifest_crc32 != m.checksum() {
        return Err(SnapshotError::Corrupt(format!("the base snapshot at {} changed since this diff was started; take a full snapshot", parent.dir.display())));
    }
    Ok(m.manifest_crc32)
}

/// Touches every page of a reused diff buffer ([`SnapshotChain::spare`])
/// while the guest still runs, just before the vCPU is stopped for a diff.
/// Hosts that are themselves VMs may reclaim memory a process has not
/// touched for a few seconds (measured on this project's nested PVM hosts:
/// 5–10 µs per page to touch it again); without this the diff's pause
/// pays for it, page by page, while copying.
pub fn warm(buf: &mut [u8]) {
    for page in buf.chunks_mut(memvisor_abi::layout::PAGE_SIZE as usize) {
        if let Some(b) = page.first_mut() {
            let p: *mut u8 = b;
            // SAFETY: `p` comes from a live `&mut u8`; a volatile write of
            // the byte's own value keeps the compiler from dropping it.
            unsafe { p.write_volatile(p.read_volatile()) };
        }
    }
}

fn absolute(dir: &Path) -> Result<PathBuf, SnapshotError> {
    std::path::absolute(dir).map_err(io(format!("resolving {}", dir.display())))
}

/// The temporary directory a snapshot into `dir` is written in:
/// `.NAME.tmp-PID` beside it. The parent must exist (a snapshot never
/// creates directories above its own). Temporary directories of the same
/// name left by a process that no longer runs (killed mid-snapshot) are
/// removed first, each with a warning.
fn temp_sibling(dir: &Path) -> Result<PathBuf, SnapshotError> {
    let name = snapshot_name(dir);
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !parent.is_dir() {
        return Err(SnapshotError::Io {
            what: format!("the snapshot's parent directory {} does not exist (a snapshot creates only its own directory)", parent.display()),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        });
    }
    remove_abandoned(parent, &name);
    let tmp = temp_dir_of(dir);
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).map_err(io(format!("creating {}", tmp.display())))?;
    Ok(tmp)
}

fn snapshot_name(dir: &Path) -> String {
    dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "snapshot".into())
}

/// The temporary directory this process writes a snapshot into `dir` in
/// before renaming it into place: `.NAME.tmp-PID` beside it.
#[must_use]
pub fn temp_dir_of(dir: &Path) -> PathBuf {
    dir.with_file_name(format!(".{}.tmp-{}", snapshot_name(dir), std::process::id()))
}

/// Removes `.NAME.tmp-PID` directories in `parent` whose process is gone.
fn remove_abandoned(parent: &Path, name: &str) {
    let prefix = format!(".{name}.tmp-");
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    for entry in entries.flatten() {
        let file = entry.file_name();
        let Some(pid) = file.to_str().and_then(|f| f.strip_prefix(&prefix)).and_then(|p| p.parse::<i32>().ok()) else { continue };
        if pid == std::process::id() as i32 || process_exists(pid) {
            continue;
        }
        match std::fs::remove_dir_all(entry.path()) {
            Ok(()) => log::warn!("removed {}, left unfinished by process {pid}, which no longer runs", entry.path().display()),
            Err(e) => log::warn!("cannot remove {}, left unfinished by process {pid}: {e}", entry.path().display()),
        }
    }
}

/// Whether process `pid` exists (kill(2) with signal 0).
fn process_exists(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists; nothing is sent.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

fn write_file_synced(path: &Path, bytes: &[u8]) -> Result<(), SnapshotError> {
    let mut f = File::create(path).map_err(io(format!("creating {}", path.display())))?;
    f.write_all(bytes).map_err(io(format!("writing {}", path.display())))?;
    f.sync_all().map_err(io(format!("syncing {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A captured diff into `dir`, whose parent (a manifest alone) is
    /// written beside it as `base`.
    fn captured(dir: &Path) -> Captured {
        let config = crate::config::VmConfig { mem_size: 1 << 20, backing: crate::config::Backing::Anon, ..crate::config::VmConfig::default() };
        let base_dir = dir.with_file_name("base");
        let mut base = Manifest {
            magic: format::MAGIC.into(),
            version: format::VERSION,
            kind: SnapshotKind::Full,
            id: "parent".into(),
            parent: None,
            config: config.clone(),
            regions: vec![RegionRecord { guest_start: 0, size: 1 << 20 }],
            state_crc32: 0,
            memory_file_len: 1 << 20,
            chunk_count: 0,
            chunks_crc32: 0,
            manifest_crc32: 0,
            chunks: Vec::new(),
        };
        base.seal();
        std::fs::create_dir_all(&base_dir).unwrap();
        std::fs::write(base_dir.join(format::MANIFEST_FILE), serde_json::to_vec(&base).unwrap()).unwrap();
        let manifest = Manifest {
            kind: SnapshotKind::Diff,
            id: "child".into(),
            parent: Some(ParentRef { dir: base_dir, id: "parent".into(), manifest_crc32: 0 }),
            memory_file_len: 4096,
            manifest_crc32: 0,
            chunks: format::plan_chunks(&[(0, 4096)], true),
            ..base
        };
        let state = SavedState { vcpus: Vec::new(), irqchip: None, devices: crate::devices::Devices::new(Box::new(std::io::sink())).state(), guest_idle: false, idle_status: 0 };
        Captured { dir: dir.to_path_buf(), tmp: None, manifest, state, diff_data: Some(vec![7; 4096]), merge: None, pause_us: 0.0, precopy_pause_us: 0.0, harvest_us: 0.0, precopied_bytes: 0, late_bytes: 0 }
    }

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("memvisor-snapshot-unit-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_persisted_diff_is_renamed_into_place_with_every_file() {
        let root = scratch("ok");
        let dest = root.join("snap");
        let (info, spares) = captured(&dest).persist().unwrap();
        assert_eq!(info.memory_bytes, 4096);
        assert_eq!(spares.pages.map(|s| s.len()), Some(4096), "the page buffer comes back for reuse");
        let mut names: Vec<String> = std::fs::read_dir(&dest).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        assert_eq!(names, ["chunks.bin", "manifest.json", "memory.bin", "state.json"]);
        assert_eq!(std::fs::read_dir(&root).unwrap().count(), 2, "the base and the snapshot; no temporary directory is left");
        let written: Manifest = serde_json::from_slice(&std::fs::read(dest.join(format::MANIFEST_FILE)).unwrap()).unwrap();
        let base: Manifest = serde_json::from_slice(&std::fs::read(root.join("base").join(format::MANIFEST_FILE)).unwrap()).unwrap();
        assert_eq!(written.parent.as_ref().map(|p| p.manifest_crc32), Some(base.manifest_crc32), "the link holds the base's checksum");
        assert_eq!(written.manifest_crc32, written.checksum(), "the manifest is sealed");
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn a_failed_rename_leaves_no_temporary_directory() {
        let root = scratch("rename");
        let dest = root.join("snap");
        // A destination that appeared after the capture checked for it: a
        // non-empty directory, which rename(2) will not replace (ENOTEMPTY).
        std::fs::create_dir(&dest).unwrap();
        std::fs::write(dest.join("someone-else"), b"x").unwrap();
        let e = captured(&dest).persist().unwrap_err();
        assert!(e.to_string().starts_with("renaming"), "{e}");
        let mut left: Vec<_> = std::fs::read_dir(&root).unwrap().map(|e| e.unwrap().file_name()).collect();
        left.sort();
        assert_eq!(left, [std::ffi::OsString::from("base"), std::ffi::OsString::from("snap")], "only the base and the destination are left, untouched");
        assert_eq!(std::fs::read_dir(&dest).unwrap().count(), 1);
        let _ = std::fs::remove_dir_all(&root);
    }
}
