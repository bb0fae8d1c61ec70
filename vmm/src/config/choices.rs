//! The closed sets of choices a configuration names by string (backing,
//! NUMA policy, guest leaf size, dirty-tracking mechanism): one enum each,
//! with the same names in flags, config files, snapshots and reports.

use std::str::FromStr;

use serde::{Deserialize, Serialize};

use memvisor_abi::layout::{PAGE_SIZE_1G, PAGE_SIZE_2M};

macro_rules! string_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name { $($(#[$vm])* #[serde(rename = $text)] $variant),+ }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];
            /// The name used in flags, files and reports.
            #[must_use]
            pub fn as_str(self) -> &'static str { match self { $($name::$variant => $text),+ } }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result { f.write_str(self.as_str()) }
        }

        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s { $($text => Ok($name::$variant),)+ _ => Err(format!(
                    "invalid value {s:?}; expected one of: {}",
                    [$($text),+].join(", ")
                )) }
            }
        }
    };
}

string_enum! {
    /// What host memory backs guest RAM.
    Backing {
        /// Private anonymous memory, 4 KiB pages.
        Anon = "anon",
        /// A memfd mapped `MAP_SHARED` (shareable with another process).
        Memfd = "memfd",
        /// Private anonymous memory with `MADV_HUGEPAGE` (transparent huge pages).
        Thp = "thp",
        /// hugetlbfs 2 MiB pages (`MAP_HUGETLB | MAP_HUGE_2MB`).
        Hugetlb2M = "hugetlb-2m",
        /// hugetlbfs 1 GiB pages (`MAP_HUGETLB | MAP_HUGE_1GB`).
        Hugetlb1G = "hugetlb-1g",
    }
}

impl Backing {
    /// What `vmm run` uses without `--backing`: transparent huge pages.
    /// On the reference host the self-test's first touch of 1 GiB takes
    /// 504 ms with THP against 2750 ms with 4 KiB pages, boot time and the
    /// VMM's own memory are the same, no pool must be reserved (unlike
    /// hugetlb), lazy restore works, and the balloon frees whole huge pages
    /// faster (docs/PERFORMANCE.md, "Default backing"). Cloud Hypervisor
    /// and QEMU also back RAM with THP by default.
    pub const DEFAULT: Backing = Backing::Thp;

    /// The page size the host uses for this backing, when it is fixed.
    #[must_use]
    pub fn hugetlb_page_size(self) -> Option<u64> {
        match self {
            Backing::Hugetlb2M => Some(PAGE_SIZE_2M),
            Backing::Hugetlb1G => Some(PAGE_SIZE_1G),
            _ => None,
        }
    }
}

string_enum! {
    /// NUMA memory policy for guest RAM (mbind(2)).
    NumaPolicy {
        /// `MPOL_BIND`: only the given nodes.
        Bind = "bind",
        /// `MPOL_PREFERRED`: the first given node, others when it is full.
        Preferred = "preferred",
        /// `MPOL_INTERLEAVE`: round-robin over the given nodes, page by page.
        Interleave = "interleave",
    }
}

string_enum! {
    /// Leaf size the guest uses to map its RAM.
    GuestPage {
        /// 4 KiB PTEs.
        K4 = "4k",
        /// 2 MiB PDEs (PS=1).
        M2 = "2m",
        /// 1 GiB PDPTEs (PS=1), where the CPU offers them.
        G1 = "1g",
    }
}

impl GuestPage {
    /// log2 of the page size.
    #[must_use]
    pub fn shift(self) -> u32 {
        match self {
            GuestPage::K4 => 12,
            GuestPage::M2 => 21,
            GuestPage::G1 => 30,
        }
    }
}

string_enum! {
    /// Who decompresses a bzImage's kernel (`crate::boot::decompress`).
    #[derive(Default)]
    KernelDecompress {
        /// The VMM, at native speed, before boot; the kernel is entered
        /// as a vmlinux with the bzImage's setup header (the default).
        #[default]
        Vmm = "vmm",
        /// The guest: the bzImage's own decompressor runs first, at ring 0.
        Guest = "guest",
    }
}

string_enum! {
    /// How dirty pages are harvested (`crate::dirty`), best first.
    DirtyMode {
        /// Per-vCPU dirty rings + `KVM_RESET_DIRTY_RINGS`.
        Ring = "ring",
        /// `KVM_GET_DIRTY_LOG` + `KVM_CLEAR_DIRTY_LOG` (manual protect).
        Clear = "clear",
        /// `KVM_GET_DIRTY_LOG` (read and re-protect in one call).
        Bitmap = "bitmap",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_choice_parses_from_its_name() {
        for m in DirtyMode::ALL {
            assert_eq!(m.as_str().parse::<DirtyMode>().unwrap(), *m);
        }
        for b in Backing::ALL {
            assert_eq!(b.as_str().parse::<Backing>().unwrap(), *b);
        }
        assert!("fast".parse::<DirtyMode>().is_err());
        assert_eq!(DirtyMode::ALL[0], DirtyMode::Ring, "best first");
    }
}
