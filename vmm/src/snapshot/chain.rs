//! Reading a snapshot and its ancestors back, in two steps.
//!
//! [`open_chain`] reads only the manifests (a few hundred bytes each),
//! follows the parent links, checks each manifest's header and its link to
//! its parent, and opens the memory files, checking their lengths. That is
//! all a restore needs to map guest RAM and hand it to KVM, which is the
//! longest step of a lazy restore (`crate::restore` registers the memslots
//! on a second thread from here on). [`OpenChain::load`] then reads what
//! is larger: each link's chunk table (`chunks.bin`, its CRC, decoding and
//! bounds) and the newest link's `state.json`. Every check of the old
//! one-step load is still made, in both steps together, before the guest
//! runs; memory checksums are checked by whoever reads the memory
//! ([`memory_file::apply`] / [`memory_file::verify`]).
//!
//! [`memory_file::apply`]: super::memory_file::apply
//! [`memory_file::verify`]: super::memory_file::verify

use std::fs::File;
use std::path::{Path, PathBuf};

use super::format::{self, Manifest};
use super::{SavedState, SnapshotError, io};

/// One snapshot of a chain.
#[derive(Debug)]
pub struct Loaded {
    /// Its directory.
    pub dir: PathBuf,
    /// Its manifest (its `chunks` are empty until [`OpenChain::load`]).
    pub manifest: Manifest,
    /// Its memory file, open.
    pub memory: File,
}

/// A snapshot and its ancestors, base first, all checked.
#[derive(Debug)]
pub struct Chain {
    /// Base (full) first, the requested snapshot last.
    pub links: Vec<Loaded>,
    /// The requested snapshot's state.
    pub state: SavedState,
}

impl Chain {
    /// The requested (newest) snapshot.
    #[must_use]
    pub fn top(&self) -> &Loaded {
        // Invariant: `open_chain` never builds an empty chain.
        &self.links[self.links.len() - 1]
    }
}

/// A chain whose manifests and memory files are open and checked, before
/// its chunk tables and state are read ([`OpenChain::load`]).
#[derive(Debug)]
pub struct OpenChain {
    /// Base first; never empty.
    links: Vec<Loaded>,
}

impl OpenChain {
    /// The requested (newest) snapshot.
    #[must_use]
    pub fn top(&self) -> &Loaded {
        &self.links[self.links.len() - 1]
    }

    /// The chain's first snapshot (a full one if the chain is sound; the
    /// caller checks).
    #[must_use]
    pub fn base(&self) -> &Loaded {
        &self.links[0]
    }

    /// Reads and checks every link's chunk table and the newest link's
    /// state.
    ///
    /// # Errors
    /// Any [`SnapshotError`].
    pub fn load(mut self) -> Result<Chain, SnapshotError> {
        for link in &mut self.links {
            load_chunks(link)?;
        }
        let top = self.top();
        let state_path = top.dir.join(format::STATE_FILE);
        let state_bytes = crate::fsutil::read_bounded(&state_path, format::MAX_STATE_BYTES).map_err(io(format!("reading {}", state_path.display())))?;
        if crc32fast::hash(&state_bytes) != top.manifest.state_crc32 {
            return Err(SnapshotError::Corrupt(format!("{} fails its checksum", state_path.display())));
        }
        let state: SavedState = serde_json::from_slice(&state_bytes).map_err(|e| SnapshotError::Corrupt(format!("{}: {e}", state_path.display())))?;
        if state.vcpus.is_empty() {
            return Err(SnapshotError::Corrupt("no vCPU state".into()));
        }
        Ok(Chain { links: self.links, state })
    }
}

/// Longest chain followed, against cycles in damaged manifests.
const MAX_CHAIN: usize = 1000;

/// One link's manifest (header checked) and memory file.
fn open_one(dir: &Path) -> Result<Loaded, SnapshotError> {
    let path = dir.join(format::MANIFEST_FILE);
    let text = crate::fsutil::read_bounded(&path, format::MAX_MANIFEST_BYTES).map_err(io(format!("reading {}", path.display())))?;
    let manifest: Manifest = serde_json::from_slice(&text).map_err(|e| SnapshotError::Corrupt(format!("{}: {e}", path.display())))?;
    manifest.validate_header().map_err(|source| SnapshotError::Format { dir: dir.to_path_buf(), source })?;
    let mem_path = dir.join(format::MEMORY_FILE);
    let memory = File::open(&mem_path).map_err(io(format!("opening {}", mem_path.display())))?;
    let len = memory.metadata().map_err(io(format!("reading {}", mem_path.display())))?.len();
    if len != manifest.memory_file_len {
        return Err(SnapshotError::Corrupt(format!("{} is {len} bytes, the manifest says {} (truncated?)", mem_path.display(), manifest.memory_file_len)));
    }
    Ok(Loaded { dir: dir.to_path_buf(), manifest, memory })
}

/// Reads, checks and decodes `link`'s chunk table into its manifest.
fn load_chunks(link: &mut Loaded) -> Result<(), SnapshotError> {
    let chunks_path = link.dir.join(format::CHUNKS_FILE);
    // The manifest says how many records there are (its header is checked:
    // at most one per page of RAM).
    let cap = link.manifest.chunk_count.saturating_mul(format::CHUNK_RECORD as u64);
    let chunks = crate::fsutil::read_bounded(&chunks_path, cap).map_err(io(format!("reading {}", chunks_path.display())))?;
    if crc32fast::hash(&chunks) != link.manifest.chunks_crc32 {
        return Err(SnapshotError::Corrupt(format!("{} fails its checksum", chunks_path.display())));
    }
    let format_error = |source| SnapshotError::Format { dir: link.dir.clone(), source };
    link.manifest.chunks = format::decode_chunks(&chunks, link.manifest.chunk_count).map_err(format_error)?;
    link.manifest.validate_chunks().map_err(format_error)
}

/// Opens `dir` and its ancestors and checks what their manifests say:
/// headers, the chain's links and the memory files' lengths.
///
/// # Errors
/// Any [`SnapshotError`].
pub fn open_chain(dir: &Path) -> Result<OpenChain, SnapshotError> {
    let mut links = vec![open_one(dir)?];
    loop {
        let child = &links[links.len() - 1];
        let Some(parent) = child.manifest.parent.clone() else { break };
        if links.len() >= MAX_CHAIN {
            return Err(SnapshotError::Corrupt("the snapshot chain is too long (a cycle?)".into()));
        }
        if !parent.dir.join(format::MANIFEST_FILE).exists() {
            return Err(SnapshotError::MissingBase { dir: child.dir.clone(), base: parent.dir });
        }
        let base = open_one(&parent.dir)?;
        child.manifest.check_parent(&base.manifest).map_err(|source| SnapshotError::Format { dir: child.dir.clone(), source })?;
        links.push(base);
    }
    links.reverse();
    Ok(OpenChain { links })
}

/// Loads `dir` and its ancestors and checks them all: [`open_chain`] and
/// [`OpenChain::load`] in one call.
///
/// # Errors
/// Any [`SnapshotError`].
pub fn load_chain(dir: &Path) -> Result<Chain, SnapshotError> {
    open_chain(dir)?.load()
}
