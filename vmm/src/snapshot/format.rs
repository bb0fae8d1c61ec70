//! The snapshot format: a directory holding a manifest, the vCPU and device
//! state, and one memory file.
//!
//! ```text
//! DIR/manifest.json   Manifest: magic, version, kind, id, parent (with the
//!                     checksum of the parent's manifest), config, layout,
//!                     checksums of state.json and chunks.bin, and its own
//!                     checksum
//! DIR/chunks.bin      every memory chunk: RAM offset, file offset, length,
//!                     CRC-32 (24-byte little-endian records)
//! DIR/state.json      vCPU and device state (serde; checksum in the manifest)
//! DIR/memory.bin      full: a sparse image of guest RAM (RAM offset = file
//!                     offset; pages never touched are holes)
//!                     diff: the dirty pages packed one after another
//! ```
//!
//! Every memory chunk is at most [`CHUNK_BYTES`] and carries a CRC-32
//! (CRC-32/ISO-HDLC, the zlib one; crc32fast computes it with PCLMULQDQ
//! where the CPU has it: a few GB/s, a small part of a snapshot's cost) of
//! its bytes. The manifest carries the CRC-32 of itself ([`Manifest::seal`])
//! and a diff's parent link the CRC-32 of its parent's manifest, which
//! covers the parent's chunk table and state through their checksums: a
//! diff is bound to its base by content, not by a directory name and an id
//! a user can edit. (CRC-32 finds damage and mix-ups, not a forger: who can
//! write the files can write a matching checksum.) Everything here is
//! pure: it validates manifests and chains without touching KVM or guest
//! memory.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::VmConfig;

/// `Manifest.magic`.
pub const MAGIC: &str = "memvisor-snapshot";
/// The format version this build writes and reads. Version 2 stores the
/// vCPU's and the irqchip's KVM structures through kvm-bindings' serde
/// support (arrays of bytes) where version 1 stored them as hex strings,
/// and leaves out MSRs that hold no state ([`super::msrs::to_save`]).
/// Version 3 seals the manifest and links a diff to its parent's
/// manifest checksum.
pub const VERSION: u32 = 3;
/// Largest memory chunk, in bytes: small enough that verifying one chunk on
/// a lazy fault is cheap (~25 µs of CRC), large enough to keep the manifest short.
pub const CHUNK_BYTES: u64 = 256 * 1024;
/// File names inside a snapshot directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// See the module docs.
pub const STATE_FILE: &str = "state.json";
/// See the module docs.
pub const MEMORY_FILE: &str = "memory.bin";
/// See the module docs.
pub const CHUNKS_FILE: &str = "chunks.bin";
/// Size of one encoded chunk: RAM offset, file offset (u64 each), length,
/// CRC (u32 each), little-endian.
pub const CHUNK_RECORD: usize = 24;
/// Largest manifest.json read: a manifest is a few KiB (the chunk table is
/// in chunks.bin).
pub const MAX_MANIFEST_BYTES: u64 = 1 << 20;
/// Largest state.json read: ~20 KiB per vCPU (XSAVE areas as JSON arrays)
/// for at most 64 vCPUs, plus device state, with room to spare.
pub const MAX_STATE_BYTES: u64 = 64 << 20;

/// Encodes chunks for chunks.bin.
#[must_use]
pub fn encode_chunks(chunks: &[Chunk]) -> Vec<u8> {
    let mut out = Vec::with_capacity(chunks.len() * CHUNK_RECORD);
    for c in chunks {
        out.extend_from_slice(&c.ram_offset.to_le_bytes());
        out.extend_from_slice(&c.file_offset.to_le_bytes());
        out.extend_from_slice(&u32::try_from(c.len).unwrap_or(u32::MAX).to_le_bytes());
        out.extend_from_slice(&c.crc32.to_le_bytes());
    }
    out
}

/// Decodes chunks.bin, which must hold exactly `count` records.
///
/// # Errors
/// [`FormatError::Inconsistent`] on a length mismatch.
pub fn decode_chunks(bytes: &[u8], count: u64) -> Result<Vec<Chunk>, FormatError> {
    if bytes.len() as u64 != count.saturating_mul(CHUNK_RECORD as u64) {
        return Err(FormatError::Inconsistent(format!("chunks.bin holds {} bytes, not {count} records", bytes.len())));
    }
    Ok(bytes
        .chunks_exact(CHUNK_RECORD)
        .map(|r| {
            // Every record is CHUNK_RECORD bytes (chunks_exact), so each
            // field is inside it.
            let u64_at = |o| crate::bytes::u64_le(r, o).unwrap_or(0);
            let u32_at = |o| crate::bytes::u32_le(r, o).unwrap_or(0);
            Chunk { ram_offset: u64_at(0), file_offset: u64_at(8), len: u64::from(u32_at(16)), crc32: u32_at(20) }
        })
        .collect())
}

/// Full or incremental.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SnapshotKind {
    /// All of guest memory (sparse).
    Full,
    /// Only pages dirtied since the parent snapshot.
    Diff,
}

/// One chunk of memory data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    /// Offset in guest RAM (regions concatenated in guest-physical order).
    pub ram_offset: u64,
    /// Offset in memory.bin.
    pub file_offset: u64,
    /// Length in bytes (a multiple of 4096, at most [`CHUNK_BYTES`]).
    pub len: u64,
    /// CRC-32 of the bytes.
    pub crc32: u32,
}

/// The parent of a diff snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentRef {
    /// Its directory (absolute).
    pub dir: PathBuf,
    /// Its id, to name it in messages.
    pub id: String,
    /// Its manifest's checksum ([`Manifest::manifest_crc32`]): the link
    /// holds only to that very snapshot. Filled when the diff is written
    /// (the parent is on disk by then); zero until.
    pub manifest_crc32: u32,
}

/// A RAM region as recorded: guest-physical start and size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionRecord {
    /// Guest-physical start.
    pub guest_start: u64,
    /// Size in bytes.
    pub size: u64,
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`MAGIC`].
    pub magic: String,
    /// [`VERSION`].
    pub version: u32,
    /// Full or diff.
    pub kind: SnapshotKind,
    /// A unique id.
    pub id: String,
    /// For diffs: the snapshot this one applies on top of.
    pub parent: Option<ParentRef>,
    /// The VM configuration.
    pub config: VmConfig,
    /// The RAM layout.
    pub regions: Vec<RegionRecord>,
    /// CRC-32 of state.json.
    pub state_crc32: u32,
    /// Length of memory.bin.
    pub memory_file_len: u64,
    /// Number of chunks in chunks.bin.
    pub chunk_count: u64,
    /// CRC-32 of chunks.bin.
    pub chunks_crc32: u32,
    /// CRC-32 of this manifest as JSON with this field zero ([`Manifest::seal`]).
    pub manifest_crc32: u32,
    /// The memory chunks, in RAM order: stored in chunks.bin (a JSON list
    /// of thousands of chunks would dominate a lazy restore's start-up).
    #[serde(skip)]
    pub chunks: Vec<Chunk>,
}

/// What is wrong with a manifest or a chain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// Not a memvisor snapshot.
    #[error("not a memvisor snapshot (magic {0:?})")]
    BadMagic(String),
    /// Written by another version.
    #[error("snapshot format version {found} is not supported: written by {} memvisor (this build reads version {VERSION}){}", if *.found < VERSION { "an older" } else { "a newer" }, if *.found < VERSION { "; take the snapshot again with this build" } else { "" })]
    BadVersion {
        /// The version found.
        found: u32,
    },
    /// A full snapshot with a parent, or a diff without one.
    #[error("{0}")]
    Inconsistent(String),
    /// A chunk outside RAM or the file, or misaligned.
    #[error("chunk {index} is invalid: {why}")]
    BadChunk {
        /// Chunk index.
        index: usize,
        /// Why.
        why: &'static str,
    },
}

/// The total RAM size of a layout.
#[must_use]
pub fn ram_size(regions: &[RegionRecord]) -> Option<u64> {
    regions.iter().try_fold(0u64, |acc, r| acc.checked_add(r.size))
}

impl Manifest {
    /// The CRC-32 of this manifest's JSON with `manifest_crc32` zero.
    #[must_use]
    pub fn checksum(&self) -> u32 {
        let unsealed = Manifest { manifest_crc32: 0, chunks: Vec::new(), ..self.clone() };
        // Serialising a plain struct of strings and integers cannot fail.
        serde_json::to_vec(&unsealed).map_or(0, |bytes| crc32fast::hash(&bytes))
    }

    /// Sets [`manifest_crc32`](Self::manifest_crc32), last before writing.
    pub fn seal(&mut self) {
        self.manifest_crc32 = self.checksum();
    }

    /// Checks the manifest on its own: [`validate_header`](Self::validate_header),
    /// then [`validate_chunks`](Self::validate_chunks).
    ///
    /// # Errors
    /// [`FormatError`].
    pub fn validate(&self) -> Result<(), FormatError> {
        self.validate_header()?;
        self.validate_chunks()
    }

    /// Checks what does not need the chunk table: magic, version,
    /// kind/parent agreement, and the sizes of the layout, the
    /// configuration and (for a full snapshot) the memory file. A restore
    /// maps guest RAM once this holds, while the chunk table is still being
    /// read.
    ///
    /// # Errors
    /// [`FormatError`].
    pub fn validate_header(&self) -> Result<(), FormatError> {
        if self.magic != MAGIC {
            return Err(FormatError::BadMagic(self.magic.clone()));
        }
        if self.version != VERSION {
            return Err(FormatError::BadVersion { found: self.version });
        }
        if self.manifest_crc32 != self.checksum() {
            return Err(FormatError::Inconsistent("the manifest fails its checksum (damaged or edited)".into()));
        }
        match (self.kind, &self.parent) {
            (SnapshotKind::Full, Some(_)) => return Err(FormatError::Inconsistent("a full snapshot must not have a parent".into())),
            (SnapshotKind::Diff, None) => return Err(FormatError::Inconsistent("a diff snapshot has no parent".into())),
            _ => {}
        }
        let ram = ram_size(&self.regions).ok_or_else(|| FormatError::Inconsistent("the layout's size overflows".into()))?;
        if self.kind == SnapshotKind::Full && self.memory_file_len != ram {
            return Err(FormatError::Inconsistent(format!("a full snapshot's memory file must hold all {ram} bytes of RAM, not {}", self.memory_file_len)));
        }
        if ram != self.config.mem_size {
            return Err(FormatError::Inconsistent(format!("layout holds {ram} bytes but the config says {}", self.config.mem_size)));
        }
        // Chunks are page multiples that do not overlap: at most one per page.
        if self.chunk_count > ram / 4096 {
            return Err(FormatError::Inconsistent(format!("{} chunks for {ram} bytes of RAM (at most one per 4 KiB page)", self.chunk_count)));
        }
        Ok(())
    }

    /// Checks that every chunk lies inside RAM and the memory file, in RAM
    /// order without overlaps (after [`validate_header`](Self::validate_header)).
    ///
    /// # Errors
    /// [`FormatError::BadChunk`], or [`FormatError::Inconsistent`] for a
    /// layout whose size overflows.
    pub fn validate_chunks(&self) -> Result<(), FormatError> {
        let ram = ram_size(&self.regions).ok_or_else(|| FormatError::Inconsistent("the layout's size overflows".into()))?;
        let mut prev_end = 0;
        for (index, c) in self.chunks.iter().enumerate() {
            let bad = |why| Err(FormatError::BadChunk { index, why });
            if c.len == 0 || c.len > CHUNK_BYTES || c.len % 4096 != 0 || c.ram_offset % 4096 != 0 {
                return bad("length or alignment");
            }
            if c.ram_offset.checked_add(c.len).is_none_or(|e| e > ram) {
                return bad("outside guest RAM");
            }
            if c.file_offset.checked_add(c.len).is_none_or(|e| e > self.memory_file_len) {
                return bad("outside the memory file");
            }
            if c.ram_offset < prev_end {
                return bad("overlaps the previous chunk");
            }
            prev_end = c.ram_offset + c.len;
        }
        Ok(())
    }

    /// Checks that `self` can be applied on top of `parent` (same layout).
    ///
    /// # Errors
    /// [`FormatError::Inconsistent`].
    pub fn check_parent(&self, parent: &Manifest) -> Result<(), FormatError> {
        let Some(p) = &self.parent else {
            return Err(FormatError::Inconsistent("not a diff snapshot".into()));
        };
        if p.manifest_crc32 != parent.manifest_crc32 || p.id != parent.id {
            return Err(FormatError::Inconsistent(format!(
                "the base snapshot at {} ({}, manifest checksum {:08x}) is not the one this diff was taken on top of ({}, {:08x})",
                p.dir.display(),
                parent.id,
                parent.manifest_crc32,
                p.id,
                p.manifest_crc32
            )));
        }
        if parent.regions != self.regions {
            return Err(FormatError::Inconsistent("the diff's memory layout differs from its base".into()));
        }
        Ok(())
    }
}

/// Splits runs of RAM bytes (offset, length; page multiples) into chunks of
/// at most [`CHUNK_BYTES`], placing them in the file either at their RAM
/// offset (`packed == false`, a sparse full image) or one after another.
/// The CRCs are left zero for the caller to fill.
#[must_use]
pub fn plan_chunks(runs: &[(u64, u64)], packed: bool) -> Vec<Chunk> {
    let mut out = Vec::new();
    let mut file_pos = 0;
    for &(start, len) in runs {
        let mut off = 0;
        while off < len {
            let n = (len - off).min(CHUNK_BYTES);
            let ram_offset = start + off;
            out.push(Chunk { ram_offset, file_offset: if packed { file_pos } else { ram_offset }, len: n, crc32: 0 });
            file_pos += n;
            off += n;
        }
    }
    out
}

/// A fresh snapshot id: time and pid, enough to tell snapshots apart.
#[must_use]
pub fn new_id() -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    format!("{:x}-{:x}-{:x}", now.as_secs(), now.subsec_nanos(), std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        let config = VmConfig { mem_size: 8 << 20, backing: crate::config::Backing::Anon, ..VmConfig::default() };
        Manifest {
            magic: MAGIC.into(),
            version: VERSION,
            kind: SnapshotKind::Full,
            id: "a".into(),
            parent: None,
            config,
            regions: vec![RegionRecord { guest_start: 0, size: 8 << 20 }],
            state_crc32: 0,
            memory_file_len: 8 << 20,
            chunk_count: 0,
            chunks_crc32: 0,
            manifest_crc32: 0,
            chunks: plan_chunks(&[(0, 1 << 20), (4 << 20, 8192)], false),
        }
        .sealed()
    }

    impl Manifest {
        fn sealed(mut self) -> Self {
            self.seal();
            self
        }
    }

    #[test]
    fn a_good_manifest_validates_and_round_trips() {
        let m = manifest();
        m.validate().unwrap();
        let text = serde_json::to_string(&m).unwrap();
        let mut back = serde_json::from_str::<Manifest>(&text).unwrap();
        assert!(back.chunks.is_empty(), "chunks live in chunks.bin");
        back.chunks = m.chunks.clone();
        assert_eq!(back, m);
    }

    #[test]
    fn chunk_records_round_trip() {
        let c = plan_chunks(&[(0, CHUNK_BYTES + 4096)], true);
        let bytes = encode_chunks(&c);
        assert_eq!(bytes.len(), 2 * CHUNK_RECORD);
        assert_eq!(decode_chunks(&bytes, 2).unwrap(), c);
        assert!(decode_chunks(&bytes, 3).is_err());
        assert!(decode_chunks(&bytes[1..], 2).is_err());
    }

    #[test]
    fn chunks_are_split_and_placed() {
        let c = plan_chunks(&[(0, CHUNK_BYTES * 2 + 4096)], true);
        assert_eq!(c.len(), 3);
        assert_eq!(c[2].len, 4096);
        assert_eq!(c[2].file_offset, CHUNK_BYTES * 2);
        let sparse = plan_chunks(&[(1 << 20, 4096)], false);
        assert_eq!(sparse[0].file_offset, 1 << 20);
    }

    #[test]
    fn an_edited_manifest_fails_its_checksum() {
        let mut m = manifest();
        m.id = "edited".into();
        let e = m.validate().unwrap_err().to_string();
        assert!(e.contains("fails its checksum"), "{e}");
        m.seal();
        m.validate().unwrap();
    }

    #[test]
    fn a_diff_is_bound_to_its_base_by_content_not_by_name() {
        let base = manifest();
        let mut diff = manifest();
        diff.kind = SnapshotKind::Diff;
        diff.id = "b".into();
        diff.parent = Some(ParentRef { dir: "/x".into(), id: "a".into(), manifest_crc32: base.manifest_crc32 });
        diff.check_parent(&base).unwrap();
        // Another snapshot put in the base's place with the base's id (and
        // a checksum of its own that matches its content) is refused.
        let mut impostor = manifest();
        impostor.state_crc32 = 0x1234;
        impostor.seal();
        impostor.validate().unwrap();
        assert_eq!(impostor.id, base.id);
        let e = diff.check_parent(&impostor).unwrap_err().to_string();
        assert!(e.contains("is not the one this diff was taken on top of"), "{e}");
    }

    #[test]
    fn wrong_magic_version_and_kind_are_rejected() {
        let mut m = manifest();
        m.magic = "other".into();
        m.seal();
        assert!(matches!(m.validate(), Err(FormatError::BadMagic(_))));
        let mut m = manifest();
        m.version = 99;
        assert_eq!(m.validate(), Err(FormatError::BadVersion { found: 99 }));
        assert!(m.validate().unwrap_err().to_string().contains("version 99 is not supported: written by a newer memvisor"));
        m.version = VERSION - 1;
        let e = m.validate().unwrap_err().to_string();
        assert!(e.contains(&format!("version {} is not supported: written by an older memvisor (this build reads version {VERSION}); take the snapshot again", VERSION - 1)), "{e}");
        let mut m = manifest();
        m.kind = SnapshotKind::Diff;
        m.seal();
        assert!(matches!(m.validate(), Err(FormatError::Inconsistent(_))));
        let mut m = manifest();
        m.chunk_count = (8 << 20) / 4096 + 1;
        m.seal();
        assert!(m.validate().unwrap_err().to_string().contains("at most one per 4 KiB page"));
    }

    #[test]
    fn chunks_outside_ram_or_file_are_rejected() {
        let mut m = manifest();
        m.chunks.push(Chunk { ram_offset: 8 << 20, file_offset: 0, len: 4096, crc32: 0 });
        assert!(matches!(m.validate(), Err(FormatError::BadChunk { why: "outside guest RAM", .. })));
        let mut m = manifest();
        m.memory_file_len = 4096;
        m.seal();
        assert!(matches!(m.validate(), Err(FormatError::Inconsistent(_))), "a full image must hold all of RAM");
        m.kind = SnapshotKind::Diff;
        m.parent = Some(ParentRef { dir: "/x".into(), id: "p".into(), manifest_crc32: 0 });
        m.seal();
        assert!(matches!(m.validate(), Err(FormatError::BadChunk { why: "outside the memory file", .. })));
        let mut m = manifest();
        m.chunks[0].len = 100;
        assert!(m.validate().is_err());
    }

    #[test]
    fn a_diff_must_match_its_parent() {
        let base = manifest();
        let mut diff = manifest();
        diff.kind = SnapshotKind::Diff;
        diff.id = "b".into();
        diff.parent = Some(ParentRef { dir: "/x".into(), id: "a".into(), manifest_crc32: base.manifest_crc32 });
        diff.check_parent(&base).unwrap();
        diff.parent = Some(ParentRef { dir: "/x".into(), id: "zzz".into(), manifest_crc32: base.manifest_crc32 });
        assert!(diff.check_parent(&base).is_err());
        diff.parent = Some(ParentRef { dir: "/x".into(), id: "a".into(), manifest_crc32: base.manifest_crc32 });
        diff.regions[0].size = 4 << 20;
        assert!(diff.check_parent(&base).is_err());
    }
}
