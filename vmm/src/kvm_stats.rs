//! KVM binary statistics: what KVM itself counts for the VM and each vCPU.
//!
//! KVM hands out a read-only "stats fd" per VM and per vCPU
//! (`KVM_GET_STATS_FD`, KVM api.rst §4.133, capability
//! `KVM_CAP_BINARY_STATS_FD`). Its contents are three blocks, found through
//! a header at offset 0:
//!
//! - the header: `flags`, `name_size`, `num_desc`, `id_offset`,
//!   `desc_offset`, `data_offset` (six `u32`, native endian);
//! - `num_desc` descriptors at `desc_offset`, each 16 bytes of fields
//!   (`flags: u32`, `exponent: i16`, `size: u16`, `offset: u32`,
//!   `bucket_size: u32`) followed by a NUL-padded name of `name_size` bytes;
//! - the data block at `data_offset`: descriptor `d`'s `d.size` values are
//!   `u64`s at `data_offset + d.offset`.
//!
//! This module owns the parsing (pure, over a byte image of the file, unit
//! tested with a synthetic file) and a small reader that takes a snapshot
//! of a live fd. It does not decide what the numbers mean for memory; the
//! memory report does that ([`crate::memory::report`]).

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;

use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::Serialize;
use thiserror::Error;

/// `KVM_CAP_BINARY_STATS_FD` (include/uapi/linux/kvm.h).
const KVM_CAP_BINARY_STATS_FD: libc::c_ulong = 203;

// KVM_GET_STATS_FD is `_IO(KVMIO, 0xce)` (include/uapi/linux/kvm.h); a VM
// and a vCPU ioctl alike. kvm-ioctls does not wrap it.
vmm_sys_util::ioctl_io_nr!(KVM_GET_STATS_FD, kvm_bindings::KVMIO, 0xce);

/// Size of `struct kvm_stats_header` (six `u32`).
pub const HEADER_SIZE: usize = 24;
/// Size of `struct kvm_stats_desc` without its name.
pub const DESC_FIXED_SIZE: usize = 16;

/// Bits of a descriptor's `flags` (include/uapi/linux/kvm.h, `KVM_STATS_*`).
const TYPE_MASK: u32 = 0xf;
const UNIT_SHIFT: u32 = 4;
const UNIT_MASK: u32 = 0xf0;
const BASE_SHIFT: u32 = 8;
const BASE_MASK: u32 = 0xf00;

/// Upper bounds that keep a corrupt file from making us allocate without
/// limit. Real files have a few dozen descriptors with names under 64 bytes.
const MAX_DESCRIPTORS: u32 = 4096;
const MAX_NAME_SIZE: u32 = 1024;
const MAX_FILE_SIZE: usize = 16 << 20;

/// Errors getting or parsing KVM statistics.
#[derive(Debug, Error)]
pub enum StatsError {
    /// The host KVM has no binary stats.
    #[error("this host's KVM does not offer binary statistics (KVM_CAP_BINARY_STATS_FD is absent)")]
    Unsupported,
    /// The ioctl failed.
    #[error("KVM_GET_STATS_FD failed")]
    GetFd(#[source] std::io::Error),
    /// Reading the fd failed.
    #[error("cannot read the KVM stats fd")]
    Read(#[source] std::io::Error),
    /// The file does not have the documented shape.
    #[error("malformed KVM stats file: {0}")]
    Malformed(String),
}

/// How a statistic accumulates (`KVM_STATS_TYPE_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StatKind {
    /// Only ever grows.
    Cumulative,
    /// A current value.
    Instant,
    /// The highest value seen.
    Peak,
    /// A histogram with equal buckets of `bucket_size`.
    LinearHistogram,
    /// A histogram with power-of-two buckets.
    LogHistogram,
    /// A type this code does not know.
    Other(u32),
}

/// The unit of a statistic (`KVM_STATS_UNIT_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StatUnit {
    /// A plain count.
    None,
    /// Bytes.
    Bytes,
    /// Seconds (scaled by the exponent, e.g. nanoseconds).
    Seconds,
    /// CPU cycles.
    Cycles,
    /// 0 or 1.
    Boolean,
    /// A unit this code does not know.
    Other(u32),
}

/// The stats file header (`struct kvm_stats_header`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Always 0 so far.
    pub flags: u32,
    /// Bytes reserved for each descriptor's name, NUL included.
    pub name_size: u32,
    /// Number of descriptors.
    pub num_desc: u32,
    /// Where the id string is ("kvm-PID" or "kvm-PID/vcpu-N").
    pub id_offset: u32,
    /// Where the descriptors start.
    pub desc_offset: u32,
    /// Where the data block starts.
    pub data_offset: u32,
}

/// One descriptor (`struct kvm_stats_desc`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Descriptor {
    /// The statistic's name, e.g. `pages_4k`.
    pub name: String,
    /// How it accumulates.
    pub kind: StatKind,
    /// Its unit.
    pub unit: StatUnit,
    /// Whether the exponent is a power of two (else of ten).
    pub base_pow2: bool,
    /// Scale: value × base^exponent is in `unit`.
    pub exponent: i16,
    /// Number of `u64` values (1, or the bucket count of a histogram).
    pub size: u16,
    /// Offset of the values from the start of the data block.
    pub offset: u32,
    /// Bucket width, for linear histograms.
    pub bucket_size: u32,
}

/// One statistic and its values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Stat {
    /// What it is.
    pub desc: Descriptor,
    /// Its values (one unless it is a histogram).
    pub values: Vec<u64>,
}

/// All statistics of one VM or vCPU at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// KVM's id for the object ("kvm-1234", "kvm-1234/vcpu-0").
    pub id: String,
    /// The statistics, in file order.
    pub stats: Vec<Stat>,
}

impl Snapshot {
    /// The statistic called `name`.
    #[must_use]
    pub fn get(&self, name: &str) -> Option<&Stat> {
        self.stats.iter().find(|s| s.desc.name == name)
    }

    /// The value of a single-valued statistic called `name`.
    #[must_use]
    pub fn value(&self, name: &str) -> Option<u64> {
        self.get(name).and_then(|s| if s.values.len() == 1 { s.values.first().copied() } else { None })
    }

    /// Every statistic as name → value (a number, or an array for
    /// histograms), for reports.
    #[must_use]
    pub fn to_map(&self) -> BTreeMap<String, serde_json::Value> {
        self.stats
            .iter()
            .map(|s| {
                let v = match s.values.as_slice() {
                    [one] => serde_json::Value::from(*one),
                    many => serde_json::Value::from(many.to_vec()),
                };
                (s.desc.name.clone(), v)
            })
            .collect()
    }
}

// KVM writes the stats file in native byte order, little-endian on x86-64.
fn u32_at(bytes: &[u8], at: usize) -> Result<u32, StatsError> {
    crate::bytes::u32_le(bytes, at).ok_or_else(|| StatsError::Malformed(format!("u32 at {at} is past the end ({} bytes)", bytes.len())))
}

fn u64_at(bytes: &[u8], at: usize) -> Result<u64, StatsError> {
    crate::bytes::u64_le(bytes, at).ok_or_else(|| StatsError::Malformed(format!("u64 at {at} is past the end ({} bytes)", bytes.len())))
}

fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// Parses the header at the start of `bytes`.
///
/// # Errors
/// [`StatsError::Malformed`] when `bytes` is too short or the sizes are
/// beyond any real file.
pub fn parse_header(bytes: &[u8]) -> Result<Header, StatsError> {
    if bytes.len() < HEADER_SIZE {
        return Err(StatsError::Malformed(format!("header needs {HEADER_SIZE} bytes, have {}", bytes.len())));
    }
    let h = Header {
        flags: u32_at(bytes, 0)?,
        name_size: u32_at(bytes, 4)?,
        num_desc: u32_at(bytes, 8)?,
        id_offset: u32_at(bytes, 12)?,
        desc_offset: u32_at(bytes, 16)?,
        data_offset: u32_at(bytes, 20)?,
    };
    if h.num_desc > MAX_DESCRIPTORS || h.name_size > MAX_NAME_SIZE {
        return Err(StatsError::Malformed(format!("{} descriptors with names of {} bytes is implausible", h.num_desc, h.name_size)));
    }
    Ok(h)
}

impl Header {
    /// Bytes per descriptor, name included.
    #[must_use]
    pub fn desc_stride(&self) -> usize {
        DESC_FIXED_SIZE + self.name_size as usize
    }

    /// One past the last descriptor byte.
    #[must_use]
    pub fn desc_end(&self) -> usize {
        self.desc_offset as usize + self.num_desc as usize * self.desc_stride()
    }
}

fn kind_of(flags: u32) -> StatKind {
    match flags & TYPE_MASK {
        0 => StatKind::Cumulative,
        1 => StatKind::Instant,
        2 => StatKind::Peak,
        3 => StatKind::LinearHistogram,
        4 => StatKind::LogHistogram,
        t => StatKind::Other(t),
    }
}

fn unit_of(flags: u32) -> StatUnit {
    match (flags & UNIT_MASK) >> UNIT_SHIFT {
        0 => StatUnit::None,
        1 => StatUnit::Bytes,
        2 => StatUnit::Seconds,
        3 => StatUnit::Cycles,
        4 => StatUnit::Boolean,
        u => StatUnit::Other(u),
    }
}

/// Parses the descriptors the header announces; `bytes` is the file image
/// from offset 0 at least up to [`Header::desc_end`].
///
/// # Errors
/// [`StatsError::Malformed`] when a descriptor lies past the end.
pub fn parse_descriptors(bytes: &[u8], header: &Header) -> Result<Vec<Descriptor>, StatsError> {
    if bytes.len() < header.desc_end() {
        return Err(StatsError::Malformed(format!("descriptors end at {}, file has {} bytes", header.desc_end(), bytes.len())));
    }
    let mut out = Vec::with_capacity(header.num_desc as usize);
    for i in 0..header.num_desc as usize {
        let at = header.desc_offset as usize + i * header.desc_stride();
        let flags = u32_at(bytes, at)?;
        let both = u32_at(bytes, at + 4)?;
        // `exponent: i16` then `size: u16`, native endian.
        let raw = both.to_ne_bytes();
        let exponent = i16::from_ne_bytes([raw[0], raw[1]]);
        let size = u16::from_ne_bytes([raw[2], raw[3]]);
        let name_at = at + DESC_FIXED_SIZE;
        out.push(Descriptor {
            name: c_string(&bytes[name_at..name_at + header.name_size as usize]),
            kind: kind_of(flags),
            unit: unit_of(flags),
            base_pow2: (flags & BASE_MASK) >> BASE_SHIFT == 1,
            exponent,
            size,
            offset: u32_at(bytes, at + 8)?,
            bucket_size: u32_at(bytes, at + 12)?,
        });
    }
    Ok(out)
}

/// One past the last byte of the data block the descriptors describe.
#[must_use]
pub fn data_end(header: &Header, descs: &[Descriptor]) -> usize {
    descs.iter().map(|d| header.data_offset as usize + d.offset as usize + 8 * d.size as usize).max().unwrap_or(header.data_offset as usize)
}

/// Parses a whole stats file image.
///
/// # Errors
/// [`StatsError::Malformed`] when any block lies outside `bytes`.
pub fn parse(bytes: &[u8]) -> Result<Snapshot, StatsError> {
    let header = parse_header(bytes)?;
    let descs = parse_descriptors(bytes, &header)?;
    let id = if header.id_offset as usize + header.name_size as usize <= bytes.len() {
        c_string(&bytes[header.id_offset as usize..header.id_offset as usize + header.name_size as usize])
    } else {
        String::new()
    };
    let mut stats = Vec::with_capacity(descs.len());
    for desc in descs {
        let base = header.data_offset as usize + desc.offset as usize;
        let values = (0..desc.size as usize).map(|i| u64_at(bytes, base + 8 * i)).collect::<Result<Vec<_>, _>>()?;
        stats.push(Stat { desc, values });
    }
    Ok(Snapshot { id, stats })
}

/// Whether this host's KVM offers binary stats.
#[must_use]
pub fn supported(kvm: &Kvm) -> bool {
    kvm.check_extension_raw(KVM_CAP_BINARY_STATS_FD) > 0
}

/// An open stats fd of a VM or a vCPU.
#[derive(Debug)]
pub struct StatsFd {
    file: File,
}

impl StatsFd {
    fn from_ioctl<F: AsRawFd>(fd: &F) -> Result<Self, StatsError> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new fd or
        // -1; `fd` is a live KVM VM or vCPU fd borrowed for the call.
        let ret = unsafe { vmm_sys_util::ioctl::ioctl(fd, KVM_GET_STATS_FD()) };
        if ret < 0 {
            return Err(StatsError::GetFd(std::io::Error::last_os_error()));
        }
        // SAFETY: `ret` is a fresh fd the kernel just gave us and nothing
        // else owns; the File closes it.
        Ok(StatsFd { file: unsafe { File::from_raw_fd(ret) } })
    }

    /// The stats fd of a VM; [`StatsError::Unsupported`] when `kvm` lacks
    /// the capability.
    ///
    /// # Errors
    /// [`StatsError::Unsupported`] or [`StatsError::GetFd`].
    pub fn for_vm(kvm: &Kvm, vm: &VmFd) -> Result<Self, StatsError> {
        if !supported(kvm) {
            return Err(StatsError::Unsupported);
        }
        Self::from_ioctl(vm)
    }

    /// The stats fd of a vCPU.
    ///
    /// # Errors
    /// [`StatsError::Unsupported`] or [`StatsError::GetFd`].
    pub fn for_vcpu(kvm: &Kvm, vcpu: &VcpuFd) -> Result<Self, StatsError> {
        if !supported(kvm) {
            return Err(StatsError::Unsupported);
        }
        Self::from_ioctl(vcpu)
    }

    fn read_prefix(&self, len: usize) -> Result<Vec<u8>, StatsError> {
        if len > MAX_FILE_SIZE {
            return Err(StatsError::Malformed(format!("a stats file of {len} bytes is implausible")));
        }
        let mut buf = vec![0u8; len];
        let mut done = 0;
        while done < len {
            match self.file.read_at(&mut buf[done..], done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(StatsError::Read(e)),
            }
        }
        buf.truncate(done);
        Ok(buf)
    }

    /// Reads every statistic now.
    ///
    /// # Errors
    /// [`StatsError::Read`] or [`StatsError::Malformed`].
    pub fn snapshot(&self) -> Result<Snapshot, StatsError> {
        // Header and descriptors first, to learn how long the data is
        // (the stats fd supports reads at any offset: KVM api.rst §4.133).
        let head = self.read_prefix(HEADER_SIZE)?;
        let header = parse_header(&head)?;
        let prefix = self.read_prefix(header.desc_end().max(header.id_offset as usize + header.name_size as usize))?;
        let descs = parse_descriptors(&prefix, &header)?;
        let whole = self.read_prefix(data_end(&header, &descs).max(prefix.len()))?;
        parse(&whole)
    }
}

/// Every KVM statistic of a VM and its vCPUs at one moment, as reports
/// show them; `unavailable` says why there are none.
#[derive(Debug, Clone, Default, Serialize)]
pub struct KvmStatsReport {
    /// Why the statistics could not be read (absent capability, failed
    /// ioctl); `None` when they were.
    pub unavailable: Option<String>,
    /// VM statistics by name.
    pub vm: BTreeMap<String, serde_json::Value>,
    /// Per-vCPU statistics by name, in vCPU order.
    pub vcpus: Vec<BTreeMap<String, serde_json::Value>>,
}

impl KvmStatsReport {
    /// A single-valued VM statistic.
    #[must_use]
    pub fn vm_value(&self, name: &str) -> Option<u64> {
        self.vm.get(name).and_then(serde_json::Value::as_u64)
    }

    /// A single-valued statistic of vCPU `index`.
    #[must_use]
    pub fn vcpu_value(&self, index: usize, name: &str) -> Option<u64> {
        self.vcpus.get(index).and_then(|m| m.get(name)).and_then(serde_json::Value::as_u64)
    }
}

/// Reads the statistics of `vm` and `vcpus`; never fails: what cannot be
/// read is explained in [`KvmStatsReport::unavailable`].
#[must_use]
pub fn collect(kvm: &Kvm, vm: &VmFd, vcpus: &[&VcpuFd]) -> KvmStatsReport {
    let read = || -> Result<KvmStatsReport, StatsError> {
        let vm_snap = StatsFd::for_vm(kvm, vm)?.snapshot()?;
        let mut out = KvmStatsReport { unavailable: None, vm: vm_snap.to_map(), vcpus: Vec::new() };
        for v in vcpus {
            out.vcpus.push(StatsFd::for_vcpu(kvm, v)?.snapshot()?.to_map());
        }
        Ok(out)
    };
    read().unwrap_or_else(|e| {
        let mut text = e.to_string();
        if let Some(src) = std::error::Error::source(&e) {
            text = format!("{text}: {src}");
        }
        log::warn!("no KVM statistics: {text}");
        KvmStatsReport { unavailable: Some(text), ..Default::default() }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAME_SIZE: usize = 48;

    /// Builds a stats file the way KVM lays it out: header, id, descriptors,
    /// data, with `stats` as (name, flags, values).
    fn synthetic(id: &str, stats: &[(&str, u32, &[u64])]) -> Vec<u8> {
        let id_offset = HEADER_SIZE;
        let desc_offset = id_offset + NAME_SIZE;
        let stride = DESC_FIXED_SIZE + NAME_SIZE;
        let data_offset = desc_offset + stats.len() * stride;
        let mut f = Vec::new();
        for v in [0u32, NAME_SIZE as u32, stats.len() as u32, id_offset as u32, desc_offset as u32, data_offset as u32] {
            f.extend_from_slice(&v.to_ne_bytes());
        }
        let name = |s: &str, f: &mut Vec<u8>| {
            let mut b = s.as_bytes().to_vec();
            b.resize(NAME_SIZE, 0);
            f.extend_from_slice(&b);
        };
        name(id, &mut f);
        let mut offset = 0u32;
        for (n, flags, values) in stats {
            f.extend_from_slice(&flags.to_ne_bytes());
            f.extend_from_slice(&(-9i16).to_ne_bytes());
            f.extend_from_slice(&(values.len() as u16).to_ne_bytes());
            f.extend_from_slice(&offset.to_ne_bytes());
            f.extend_from_slice(&0u32.to_ne_bytes());
            name(n, &mut f);
            offset += 8 * values.len() as u32;
        }
        for (_, _, values) in stats {
            for v in *values {
                f.extend_from_slice(&v.to_ne_bytes());
            }
        }
        f
    }

    #[test]
    fn synthetic_file_round_trips_names_kinds_units_and_values() {
        let file = synthetic(
            "kvm-42",
            &[
                ("pages_4k", 1, &[17]),
                ("pages_2m", 1, &[3]),
                ("remote_tlb_flush", 0, &[99]),
                ("halt_wait_hist", 4 | (2 << UNIT_SHIFT), &[1, 2, 3, 4]),
                ("max_mmu_page_hash_collisions", 2 | (1 << BASE_SHIFT), &[5]),
            ],
        );
        let snap = parse(&file).unwrap();
        assert_eq!(snap.id, "kvm-42");
        assert_eq!(snap.stats.len(), 5);
        assert_eq!(snap.value("pages_4k"), Some(17));
        assert_eq!(snap.value("pages_2m"), Some(3));
        assert_eq!(snap.value("pages_1g"), None);
        let hist = snap.get("halt_wait_hist").unwrap();
        assert_eq!(hist.desc.kind, StatKind::LogHistogram);
        assert_eq!(hist.desc.unit, StatUnit::Seconds);
        assert_eq!(hist.desc.exponent, -9);
        assert_eq!(hist.values, vec![1, 2, 3, 4]);
        assert_eq!(snap.value("halt_wait_hist"), None, "a histogram has no single value");
        let peak = snap.get("max_mmu_page_hash_collisions").unwrap();
        assert_eq!(peak.desc.kind, StatKind::Peak);
        assert!(peak.desc.base_pow2);
        assert_eq!(snap.get("remote_tlb_flush").unwrap().desc.kind, StatKind::Cumulative);
        let map = snap.to_map();
        assert_eq!(map["pages_2m"], serde_json::json!(3));
        assert_eq!(map["halt_wait_hist"], serde_json::json!([1, 2, 3, 4]));
    }

    #[test]
    fn truncated_files_are_errors_not_panics() {
        let file = synthetic("kvm-1", &[("pages_4k", 1, &[1]), ("pages_2m", 1, &[2])]);
        for len in [0, 10, HEADER_SIZE, HEADER_SIZE + NAME_SIZE + 5, file.len() - 1] {
            assert!(matches!(parse(&file[..len]), Err(StatsError::Malformed(_))), "length {len} must be rejected");
        }
        assert!(parse(&file).is_ok());
    }

    #[test]
    fn implausible_header_sizes_are_rejected() {
        let mut file = synthetic("kvm-1", &[("a", 0, &[1])]);
        file[8..12].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert!(matches!(parse_header(&file), Err(StatsError::Malformed(_))));
    }

    #[test]
    fn data_end_covers_the_last_value_of_every_stat() {
        let file = synthetic("kvm-1", &[("a", 0, &[1, 2]), ("b", 0, &[3])]);
        let h = parse_header(&file).unwrap();
        let d = parse_descriptors(&file, &h).unwrap();
        assert_eq!(data_end(&h, &d), file.len());
    }

    #[test]
    fn live_vm_and_vcpu_stats_are_readable() {
        let kvm = Kvm::new().unwrap();
        if !supported(&kvm) {
            // The capability is a fact of the host; say so rather than pass silently.
            let vm = kvm.create_vm().unwrap();
            assert!(matches!(StatsFd::for_vm(&kvm, &vm), Err(StatsError::Unsupported)));
            eprintln!("KVM_CAP_BINARY_STATS_FD absent: checked the error path only");
            return;
        }
        let vm = kvm.create_vm().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let vm_snap = StatsFd::for_vm(&kvm, &vm).unwrap().snapshot().unwrap();
        assert!(vm_snap.id.starts_with("kvm-"), "id {:?}", vm_snap.id);
        assert!(!vm_snap.stats.is_empty());
        // Every VM has the generic `remote_tlb_flush` counter (virt/kvm/kvm_main.c).
        assert!(vm_snap.get("remote_tlb_flush").is_some(), "names: {:?}", vm_snap.to_map().keys());
        let vcpu_snap = StatsFd::for_vcpu(&kvm, &vcpu).unwrap().snapshot().unwrap();
        assert!(vcpu_snap.id.contains("vcpu"), "id {:?}", vcpu_snap.id);
        assert!(vcpu_snap.get("halt_successful_poll").is_some(), "names: {:?}", vcpu_snap.to_map().keys());
    }

    #[test]
    fn collect_reads_the_vm_and_every_vcpu() {
        let kvm = Kvm::new().unwrap();
        let vm = kvm.create_vm().unwrap();
        let v0 = vm.create_vcpu(0).unwrap();
        let v1 = vm.create_vcpu(1).unwrap();
        let report = collect(&kvm, &vm, &[&v0, &v1]);
        if !supported(&kvm) {
            assert!(report.unavailable.as_deref().is_some_and(|r| r.contains("KVM_CAP_BINARY_STATS_FD")));
            return;
        }
        assert_eq!(report.unavailable, None);
        assert!(report.vm_value("remote_tlb_flush").is_some());
        assert_eq!(report.vcpus.len(), 2);
        assert!(report.vcpus[1].contains_key("halt_wakeup"));
    }
}
