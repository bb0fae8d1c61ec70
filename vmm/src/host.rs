//! What kind of host KVM we run on: how it does the second dimension of
//! address translation.
//!
//! Read from the KVM modules' parameters: kvm_intel's `ept`, kvm_amd's
//! `npt`, and whether the PVM flavour (`kvm_pvm`) is loaded. Shadow paging
//! is never called EPT.

use std::path::Path;

use serde::Serialize;

/// How KVM translates guest-physical to host-physical addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TranslationMode {
    /// Intel VT-x with Extended Page Tables: a hardware 2D walk.
    Ept,
    /// AMD-V with Nested Page Tables: a hardware 2D walk.
    Npt,
    /// KVM's PVM flavour: guest page tables shadowed in software.
    PvmShadow,
    /// VT-x/AMD-V with EPT/NPT off: shadow paging in software.
    Shadow,
    /// No KVM module recognised.
    Unknown,
}

impl TranslationMode {
    /// A human description.
    #[must_use]
    pub fn describe(self) -> &'static str {
        match self {
            Self::Ept => "hardware EPT (Intel): two-dimensional walk in hardware",
            Self::Npt => "hardware NPT (AMD): two-dimensional walk in hardware",
            Self::PvmShadow => "shadow paging (KVM PVM flavour, no hardware EPT/NPT)",
            Self::Shadow => "shadow paging (EPT/NPT disabled)",
            Self::Unknown => "unknown (no kvm_intel, kvm_amd or kvm_pvm module found)",
        }
    }

    /// Whether this host runs guest code at CPL0 through an emulator
    /// (PVM), which makes ring-0 paths expensive and `syscall` unusable.
    #[must_use]
    pub fn is_pvm(self) -> bool {
        self == Self::PvmShadow
    }

    /// Whether KVM shadows the guest's page tables in software (PVM, or
    /// EPT/NPT off) rather than walking them in hardware.
    #[must_use]
    pub fn is_shadow(self) -> bool {
        matches!(self, Self::PvmShadow | Self::Shadow)
    }
}

fn param_enabled(path: &Path) -> Option<bool> {
    let v = std::fs::read_to_string(path).ok()?;
    Some(matches!(v.trim(), "Y" | "y" | "1"))
}

/// Detects the mode under `sys_module` (normally `/sys/module`).
#[must_use]
pub fn detect_in(sys_module: &Path) -> TranslationMode {
    if sys_module.join("kvm_pvm").exists() {
        return TranslationMode::PvmShadow;
    }
    if let Some(ept) = param_enabled(&sys_module.join("kvm_intel/parameters/ept")) {
        return if ept { TranslationMode::Ept } else { TranslationMode::Shadow };
    }
    if let Some(npt) = param_enabled(&sys_module.join("kvm_amd/parameters/npt")) {
        return if npt { TranslationMode::Npt } else { TranslationMode::Shadow };
    }
    TranslationMode::Unknown
}

/// Detects this host's mode.
#[must_use]
pub fn detect() -> TranslationMode {
    detect_in(Path::new("/sys/module"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake(files: &[(&str, &str)]) -> tempdir::Dir {
        let d = tempdir::Dir::new();
        for (path, content) in files {
            let p = d.path().join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, content).unwrap();
        }
        d
    }

    mod tempdir {
        pub struct Dir(std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let p = std::env::temp_dir().join(format!("memvisor-host-test-{}-{n}", std::process::id()));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
            pub fn path(&self) -> &std::path::Path {
                &self.0
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn ept_npt_pvm_and_shadow_are_told_apart() {
        assert_eq!(detect_in(fake(&[("kvm_intel/parameters/ept", "Y\n")]).path()), TranslationMode::Ept);
        assert_eq!(detect_in(fake(&[("kvm_intel/parameters/ept", "N\n")]).path()), TranslationMode::Shadow);
        assert_eq!(detect_in(fake(&[("kvm_amd/parameters/npt", "1\n")]).path()), TranslationMode::Npt);
        assert_eq!(detect_in(fake(&[("kvm_pvm/parameters/x", "N"), ("kvm_intel/parameters/ept", "Y")]).path()), TranslationMode::PvmShadow);
        assert_eq!(detect_in(fake(&[]).path()), TranslationMode::Unknown);
    }
}
