//! Typed, validated VM configuration.
//!
//! Flags and the TOML file (`--config FILE`) share one shape, [`ConfigFile`]:
//! the file is read first, then every flag the user gave overrides its field.
//! [`VmConfig::validate`] checks what can be checked without touching the
//! host; host-dependent checks (NUMA nodes, huge-page reservations, available
//! memory) live with the code that needs the host (`memory::`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use memvisor_abi::layout::{PAGE_SIZE, PAGE_SIZE_2M};

use crate::size::{format_size, parse_size};
use crate::workload::Workload;

pub mod choices;

pub use choices::{Backing, DirtyMode, GuestPage, KernelDecompress, NumaPolicy};

/// Largest config file read (a config is a few hundred bytes).
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Default guest memory: 256 MiB.
pub const DEFAULT_MEM_SIZE: u64 = 256 << 20;

/// Most vCPUs a VM may have: the guest's per-CPU tables
/// (`memvisor_abi::smp::MAX_CPUS`). The host's KVM may allow fewer
/// (KVM_CAP_MAX_VCPUS), checked when the VM is created.
pub const MAX_VCPUS: u32 = memvisor_abi::smp::MAX_CPUS;

/// Errors in configuration values or files.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// A size string could not be parsed.
    #[error(transparent)]
    BadSize(#[from] crate::size::SizeError),
    /// Memory size zero.
    #[error("memory size must not be zero")]
    ZeroMemory,
    /// Memory size not a page multiple.
    #[error("memory size {0} is not a multiple of the 4 KiB page size")]
    NotPageMultiple(u64),
    /// Memory size not a multiple of the backing's huge page.
    #[error("memory size {size} is not a multiple of the {page} huge page size of backing {backing}")]
    NotHugePageMultiple {
        /// The size asked for.
        size: u64,
        /// The huge page size, human-readable.
        page: &'static str,
        /// The backing.
        backing: Backing,
    },
    /// A NUMA policy without nodes, or nodes without a policy.
    #[error("{0}")]
    Numa(String),
    /// A balloon target that is not a page multiple within guest memory.
    #[error("balloon target {} must be a multiple of 4 KiB and at most the guest memory ({})", format_size(*.0), format_size(*.1))]
    Balloon(u64, u64),
    /// A balloon workload that cannot run as configured.
    #[error("{0}")]
    BalloonWorkload(&'static str),
    /// A vCPU count out of range.
    #[error("vCPU count must be between 1 and {MAX_VCPUS}, not {0}")]
    BadVcpus(u32),
    /// The config file could not be read.
    #[error("cannot read config file {path}")]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid TOML for this schema.
    #[error("invalid config file {path}: {message}")]
    ParseFile {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// A list of NUMA nodes could not be parsed.
    #[error("invalid NUMA node list {0:?}: expected numbers and ranges like 0,2-3")]
    BadNodeList(String),
}

/// Parses a NUMA node list such as `0`, `0,1` or `0-3,6`.
///
/// # Errors
/// [`ConfigError::BadNodeList`] for malformed lists or nodes ≥ 1024.
pub fn parse_node_list(s: &str) -> Result<Vec<u32>, ConfigError> {
    let bad = || ConfigError::BadNodeList(s.to_string());
    let mut nodes = Vec::new();
    for part in s.split(',').map(str::trim) {
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (a.trim().parse::<u32>().map_err(|_| bad())?, b.trim().parse::<u32>().map_err(|_| bad())?),
            None => {
                let n = part.parse::<u32>().map_err(|_| bad())?;
                (n, n)
            }
        };
        if lo > hi || hi >= 1024 {
            return Err(bad());
        }
        nodes.extend(lo..=hi);
    }
    nodes.sort_unstable();
    nodes.dedup();
    Ok(nodes)
}

/// The configuration file's shape; every field optional so that flags can
/// override a partial file. Also what `--config` accepts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ConfigFile {
    /// Guest memory size, as a size string or a byte count.
    pub mem: Option<SizeValue>,
    /// Number of vCPUs.
    pub vcpus: Option<u32>,
    /// Host backing.
    pub backing: Option<Backing>,
    /// Populate all guest memory before boot.
    pub prefault: Option<bool>,
    /// mlock(2) guest memory.
    pub mlock: Option<bool>,
    /// NUMA policy.
    pub numa_policy: Option<NumaPolicy>,
    /// NUMA nodes, as a list string ("0-1") or an array.
    pub numa_nodes: Option<NodesValue>,
    /// Guest leaf size.
    pub guest_page: Option<GuestPage>,
    /// Kernel image.
    pub kernel: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: Option<String>,
    /// Initial ramdisk (Linux boot protocol kernels only).
    pub initrd: Option<PathBuf>,
    /// Who decompresses a bzImage's kernel.
    pub kernel_decompress: Option<KernelDecompress>,
    /// Control socket path.
    pub api_socket: Option<PathBuf>,
    /// Force a dirty-tracking mechanism.
    pub dirty_mode: Option<DirtyMode>,
    /// A workload after the self-test (`dirty:pages=N,...`).
    pub workload: Option<Workload>,
    /// Add a virtio balloon with this initial target (a size; "0" for
    /// none yet).
    pub balloon: Option<SizeValue>,
    /// What the threads' seccomp filters do with a forbidden call
    /// (`crate::seccomp`); not part of [`VmConfig`]: it is the process's,
    /// not the VM's (a snapshot does not carry it).
    pub seccomp: Option<crate::seccomp::SeccompMode>,
}

/// A size in a config file: `"256M"` or `268435456`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SizeValue {
    /// A byte count.
    Bytes(u64),
    /// A size string.
    Text(String),
}

/// NUMA nodes in a config file: `"0-1"` or `[0, 1]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum NodesValue {
    /// A list of node numbers.
    List(Vec<u32>),
    /// A node-list string.
    Text(String),
}

impl ConfigFile {
    /// Reads and parses a TOML config file.
    ///
    /// # Errors
    /// [`ConfigError::ReadFile`] or [`ConfigError::ParseFile`].
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = crate::fsutil::read_bounded_text(path, MAX_CONFIG_BYTES).map_err(|source| ConfigError::ReadFile { path: path.to_path_buf(), source })?;
        toml::from_str(&text).map_err(|e| ConfigError::ParseFile { path: path.to_path_buf(), message: e.message().to_string() })
    }

    /// Fields set in `over` replace those in `self`.
    #[must_use]
    pub fn merged_with(self, over: ConfigFile) -> ConfigFile {
        ConfigFile {
            mem: over.mem.or(self.mem),
            vcpus: over.vcpus.or(self.vcpus),
            backing: over.backing.or(self.backing),
            prefault: over.prefault.or(self.prefault),
            mlock: over.mlock.or(self.mlock),
            numa_policy: over.numa_policy.or(self.numa_policy),
            numa_nodes: over.numa_nodes.or(self.numa_nodes),
            guest_page: over.guest_page.or(self.guest_page),
            kernel: over.kernel.or(self.kernel),
            cmdline: over.cmdline.or(self.cmdline),
            initrd: over.initrd.or(self.initrd),
            kernel_decompress: over.kernel_decompress.or(self.kernel_decompress),
            api_socket: over.api_socket.or(self.api_socket),
            dirty_mode: over.dirty_mode.or(self.dirty_mode),
            workload: over.workload.or(self.workload),
            balloon: over.balloon.or(self.balloon),
            seccomp: over.seccomp.or(self.seccomp),
        }
    }

    /// Fills defaults and validates.
    ///
    /// # Errors
    /// Any [`ConfigError`] about the values.
    pub fn into_vm_config(self) -> Result<VmConfig, ConfigError> {
        let mem_size = match self.mem {
            None => DEFAULT_MEM_SIZE,
            Some(SizeValue::Bytes(b)) => b,
            Some(SizeValue::Text(t)) => parse_size(&t)?,
        };
        let numa_nodes = match self.numa_nodes {
            None => Vec::new(),
            Some(NodesValue::List(mut l)) => {
                l.sort_unstable();
                l.dedup();
                l
            }
            Some(NodesValue::Text(t)) => parse_node_list(&t)?,
        };
        let balloon = match self.balloon {
            None => None,
            Some(SizeValue::Bytes(b)) => Some(b),
            Some(SizeValue::Text(t)) => Some(parse_size(&t)?),
        };
        let config = VmConfig {
            balloon,
            mem_size,
            vcpus: self.vcpus.unwrap_or(1),
            backing: self.backing.unwrap_or(Backing::DEFAULT),
            prefault: self.prefault.unwrap_or(false),
            mlock: self.mlock.unwrap_or(false),
            numa_policy: self.numa_policy,
            numa_nodes,
            guest_page: self.guest_page.unwrap_or(GuestPage::M2),
            kernel: self.kernel,
            cmdline: self.cmdline.unwrap_or_default(),
            initrd: self.initrd,
            kernel_decompress: self.kernel_decompress.unwrap_or_default(),
            api_socket: self.api_socket,
            dirty_mode: self.dirty_mode,
            workload: self.workload,
        };
        config.validate()?;
        Ok(config)
    }
}

/// A complete, validated VM configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    /// Guest RAM in bytes.
    pub mem_size: u64,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Host backing of guest RAM.
    pub backing: Backing,
    /// Populate guest RAM before boot (`MADV_POPULATE_WRITE`).
    pub prefault: bool,
    /// Lock guest RAM in host memory.
    pub mlock: bool,
    /// NUMA policy, when any.
    pub numa_policy: Option<NumaPolicy>,
    /// NUMA nodes for the policy.
    pub numa_nodes: Vec<u32>,
    /// Leaf size the guest maps its RAM with.
    pub guest_page: GuestPage,
    /// Kernel image; `None` is the built-in tiny guest.
    pub kernel: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Initial ramdisk (Linux boot protocol kernels only).
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Who decompresses a bzImage's kernel (`crate::boot::decompress`).
    #[serde(default)]
    pub kernel_decompress: KernelDecompress,
    /// Control socket.
    pub api_socket: Option<PathBuf>,
    /// Forced dirty-tracking mechanism (`None`: the best available, when
    /// tracking is needed).
    pub dirty_mode: Option<DirtyMode>,
    /// Workload after the self-test (see [`crate::workload`]).
    pub workload: Option<Workload>,
    /// A virtio balloon with this initial target in bytes (`None`: no
    /// balloon device).
    #[serde(default)]
    pub balloon: Option<u64>,
}

impl Default for VmConfig {
    fn default() -> Self {
        ConfigFile::default().into_vm_config().expect("the defaults are valid")
    }
}

impl VmConfig {
    /// Checks the values against each other (not against the host).
    ///
    /// # Errors
    /// The first [`ConfigError`] found.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.mem_size == 0 {
            return Err(ConfigError::ZeroMemory);
        }
        if !self.mem_size.is_multiple_of(PAGE_SIZE) {
            return Err(ConfigError::NotPageMultiple(self.mem_size));
        }
        if let Some(page) = self.backing.hugetlb_page_size()
            && !self.mem_size.is_multiple_of(page)
        {
            return Err(ConfigError::NotHugePageMultiple {
                size: self.mem_size,
                page: if page == PAGE_SIZE_2M { "2 MiB" } else { "1 GiB" },
                backing: self.backing,
            });
        }
        if let Some(b) = self.balloon
            && (b > self.mem_size || b % PAGE_SIZE != 0)
        {
            return Err(ConfigError::Balloon(b, self.mem_size));
        }
        if let Some(w) = &self.workload {
            if w.uses_balloon() && self.balloon.is_none() {
                return Err(ConfigError::BalloonWorkload("the balloon workloads need a balloon device: add --balloon SIZE (0 for an empty one)"));
            }
            // Without rounds or oom the driver serves until shut down.
            if let Workload::Balloon(b) = w
                && b.rounds == 0 && b.oom_pages == 0 && self.api_socket.is_none()
            {
                return Err(ConfigError::BalloonWorkload("balloon without rounds=R or oom=SIZE serves until shut down: add --api-socket PATH (or give rounds or oom)"));
            }
        }
        if !(1..=MAX_VCPUS).contains(&self.vcpus) {
            return Err(ConfigError::BadVcpus(self.vcpus));
        }
        match (self.numa_policy, self.numa_nodes.is_empty()) {
            (Some(p), true) => return Err(ConfigError::Numa(format!("NUMA policy {p} needs --numa-nodes"))),
            (None, false) => return Err(ConfigError::Numa("--numa-nodes needs a --numa-policy".into())),
            (Some(NumaPolicy::Preferred), false) if self.numa_nodes.len() > 1 => {
                return Err(ConfigError::Numa("NUMA policy preferred takes exactly one node".into()));
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_lists_parse_ranges() {
        assert_eq!(parse_node_list("0").unwrap(), vec![0]);
        assert_eq!(parse_node_list("2,0-1,1").unwrap(), vec![0, 1, 2]);
        assert!(parse_node_list("1-0").is_err());
        assert!(parse_node_list("a").is_err());
        assert!(parse_node_list("5000").is_err());
    }

    #[test]
    fn defaults_are_256m_one_vcpu_thp_2m() {
        let c = VmConfig::default();
        assert_eq!(c.mem_size, 256 << 20);
        assert_eq!(c.vcpus, 1);
        assert_eq!(c.backing, Backing::Thp);
        assert_eq!(c.guest_page, GuestPage::M2);
    }

    #[test]
    fn memory_size_is_validated() {
        let mk = |mem: &str, backing| ConfigFile { mem: Some(SizeValue::Text(mem.into())), backing: Some(backing), ..Default::default() }.into_vm_config();
        assert!(matches!(mk("0", Backing::Anon), Err(ConfigError::ZeroMemory)));
        assert!(matches!(mk("1000", Backing::Anon), Err(ConfigError::NotPageMultiple(1000))));
        assert!(matches!(mk("3M", Backing::Hugetlb2M), Err(ConfigError::NotHugePageMultiple { .. })));
        assert!(matches!(mk("2M", Backing::Hugetlb1G), Err(ConfigError::NotHugePageMultiple { .. })));
        assert!(mk("4M", Backing::Hugetlb2M).is_ok());
    }

    #[test]
    fn vcpu_counts_outside_one_to_the_maximum_are_refused() {
        let mk = |n| ConfigFile { vcpus: Some(n), ..Default::default() }.into_vm_config();
        assert!(mk(2).is_ok());
        assert!(mk(MAX_VCPUS).is_ok());
        assert!(matches!(mk(0), Err(ConfigError::BadVcpus(0))));
        assert!(matches!(mk(MAX_VCPUS + 1), Err(ConfigError::BadVcpus(_))));
    }

    #[test]
    fn balloon_workloads_need_a_balloon_and_an_end() {
        let mk = |workload: &str, balloon: Option<&str>, socket: bool| {
            ConfigFile {
                workload: Some(workload.parse().unwrap()),
                balloon: balloon.map(|b| SizeValue::Text(b.into())),
                api_socket: socket.then(|| "/tmp/x.sock".into()),
                ..Default::default()
            }
            .into_vm_config()
        };
        assert!(mk("balloon:rounds=1", None, false).is_err());
        assert!(mk("balloon-hostile:mode=1", None, false).is_err());
        assert!(mk("balloon", Some("0"), false).is_err());
        assert!(mk("balloon", Some("0"), true).is_ok());
        assert!(mk("balloon:oom=64M", Some("128M"), false).is_ok());
        assert!(mk("balloon:rounds=1", Some("300M"), true).is_err(), "target above the memory");
    }

    #[test]
    fn numa_policy_and_nodes_go_together() {
        let c = ConfigFile { numa_policy: Some(NumaPolicy::Bind), ..Default::default() };
        assert!(matches!(c.into_vm_config(), Err(ConfigError::Numa(_))));
        let c = ConfigFile { numa_nodes: Some(NodesValue::Text("0".into())), ..Default::default() };
        assert!(matches!(c.into_vm_config(), Err(ConfigError::Numa(_))));
        let c = ConfigFile { numa_policy: Some(NumaPolicy::Preferred), numa_nodes: Some(NodesValue::List(vec![0, 1])), ..Default::default() };
        assert!(matches!(c.into_vm_config(), Err(ConfigError::Numa(_))));
    }

    #[test]
    fn toml_files_parse_and_flags_override_them() {
        let file: ConfigFile = toml::from_str("mem = \"1G\"\nbacking = \"thp\"\nnuma-policy = \"bind\"\nnuma-nodes = [0]\nguest-page = \"4k\"\n").unwrap();
        let flags = ConfigFile { backing: Some(Backing::Memfd), ..Default::default() };
        let c = file.merged_with(flags).into_vm_config().unwrap();
        assert_eq!(c.mem_size, 1 << 30);
        assert_eq!(c.backing, Backing::Memfd);
        assert_eq!(c.guest_page, GuestPage::K4);
        assert_eq!(c.numa_nodes, vec![0]);
        assert!(toml::from_str::<ConfigFile>("memory = 1").is_err(), "unknown keys are rejected");
        assert!(toml::from_str::<ConfigFile>("backing = \"bogus\"").is_err());
    }

    #[test]
    fn the_vmm_decompresses_a_bzimage_unless_told_otherwise() {
        assert_eq!(VmConfig::default().kernel_decompress, KernelDecompress::Vmm);
        let file: ConfigFile = toml::from_str("kernel-decompress = \"guest\"").unwrap();
        assert_eq!(file.clone().into_vm_config().unwrap().kernel_decompress, KernelDecompress::Guest);
        let flags = ConfigFile { kernel_decompress: Some(KernelDecompress::Vmm), ..Default::default() };
        assert_eq!(file.merged_with(flags).into_vm_config().unwrap().kernel_decompress, KernelDecompress::Vmm);
        assert!(toml::from_str::<ConfigFile>("kernel-decompress = \"host\"").is_err());
        // A snapshot's configuration from before the field reads as the default.
        let mut old = serde_json::to_value(VmConfig::default()).unwrap();
        old.as_object_mut().unwrap().remove("kernel_decompress");
        assert_eq!(serde_json::from_value::<VmConfig>(old).unwrap().kernel_decompress, KernelDecompress::Vmm);
    }
}
