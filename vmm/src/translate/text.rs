//! An [`Explanation`] as text for people: the guest walk, the host side and
//! the reference counts, in the order the hardware does them.

use std::fmt::Write as _;

use super::{Explanation, Flags};
use crate::host::TranslationMode;

fn size(bytes: u64) -> &'static str {
    match bytes {
        0x4000_0000 => "1 GiB",
        0x20_0000 => "2 MiB",
        _ => "4 KiB",
    }
}

/// Flags as `P RW US ... NX`, set ones in capitals, clear ones as `-`.
#[must_use]
pub fn flags(f: &Flags) -> String {
    let all = [
        (f.p, "P"),
        (f.rw, "RW"),
        (f.us, "US"),
        (f.pwt, "PWT"),
        (f.pcd, "PCD"),
        (f.a, "A"),
        (f.d, "D"),
        (f.ps, "PS"),
        (f.g, "G"),
        (f.nx, "NX"),
    ];
    all.iter().map(|(on, name)| if *on { (*name).to_string() } else { "-".repeat(name.len()) }).collect::<Vec<_>>().join(" ")
}

/// The explanation as text.
#[must_use]
pub fn to_text(e: &Explanation) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "guest-virtual {:#018x}", e.gva);
    let _ = writeln!(
        s,
        "  indices: PML4 {} | PDPT {} | PD {} | PT {} | offset {:#x}",
        (e.gva >> 39) & 511,
        (e.gva >> 30) & 511,
        (e.gva >> 21) & 511,
        (e.gva >> 12) & 511,
        e.gva & 0xfff
    );
    let _ = writeln!(s, "  CR3 = {:#x} (guest-physical address of the PML4); MAXPHYADDR {} bits", e.cr3, e.phys_bits);
    for st in &e.steps {
        let leaf = st.entry == "PTE" || (st.flags.ps && st.entry != "PML4E");
        let _ = writeln!(
            s,
            "  {:<5} {:<4} table at {:#014x} [{:>3}] @ {:#014x} = {:#018x}  {}  -> {} {:#x}",
            st.entry,
            st.table,
            st.table_gpa,
            st.index,
            st.entry_gpa,
            st.raw,
            flags(&st.flags),
            if leaf { "page frame" } else { "next table" },
            st.points_to
        );
    }
    let _ = writeln!(
        s,
        "  => guest-physical {:#x} ({} page, {}{}{})",
        e.gpa,
        size(e.leaf_bytes),
        if e.writable { "writable" } else { "read-only" },
        if e.user { ", user" } else { ", supervisor" },
        if e.no_execute { ", no-execute" } else { ", executable" }
    );
    match (&e.kvm.agrees, &e.kvm.error) {
        (Some(true), _) => {
            // x86 KVM fills `writeable` and `usermode` with constants, so
            // only the address is compared.
            let _ = writeln!(s, "  KVM_TRANSLATE agrees: {:#x} (its own walk; x86 KVM does not report permissions)", e.kvm.gpa);
        }
        (_, Some(err)) => {
            let _ = writeln!(s, "  KVM_TRANSLATE not available on this host ({err}); the walk is not cross-checked");
        }
        _ => {}
    }
    let _ = writeln!(s, "host side (every guest-physical address the walk touched):");
    for t in &e.touched {
        match &t.host {
            Some(h) => {
                let hpa = h.hpa.map_or_else(|| if h.swapped { "swapped out".to_string() } else { "no frame".to_string() }, |a| format!("{a:#x}"));
                let _ = writeln!(
                    s,
                    "  {:<11} gpa {:#014x} -> slot {} hva {:#014x} -> hpa {} ({})",
                    t.what,
                    h.gpa,
                    h.slot,
                    h.hva,
                    hpa,
                    h.page.label()
                );
            }
            None => {
                let _ = writeln!(s, "  {:<11} outside every memslot", t.what);
            }
        }
    }
    let r = &e.refs;
    let _ = writeln!(s, "memory references for this translation (TLB miss, no paging-structure caches):");
    let _ = writeln!(s, "  native walk of these tables:         {}", r.native);
    let _ = writeln!(
        s,
        "  nested (EPT/NPT) walk:               {} with host levels {:?}; (n+1)(m+1)-1 = ({}+1)({}+1)-1 = {}",
        r.nested,
        r.host_levels,
        r.guest_levels,
        r.host_levels.last().copied().unwrap_or(4),
        r.nested_formula
    );
    let _ = writeln!(s, "  shadow-paging walk:                  {}", r.shadow);
    let _ = writeln!(s, "  this host: {} — {}", e.mode.describe(), reading(e.mode));
    s
}

/// What the counts mean on a host in `mode`.
#[must_use]
pub fn reading(mode: TranslationMode) -> &'static str {
    match mode {
        TranslationMode::Ept | TranslationMode::Npt => "a TLB miss pays the nested count (less what paging-structure caches hold)",
        TranslationMode::PvmShadow | TranslationMode::Shadow => {
            "a TLB miss pays the shadow count; there is no 2D walk. Guest page-table updates trap to KVM instead"
        }
        TranslationMode::Unknown => "unknown host mode: read the three counts as bounds",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_show_set_bits_by_name_and_clear_ones_as_dashes() {
        let f = Flags::decode(0x8000_0000_0000_0083);
        assert_eq!(flags(&f), "P RW -- --- --- - - PS - NX");
        assert_eq!(size(2 << 20), "2 MiB");
        assert!(reading(TranslationMode::PvmShadow).contains("no 2D walk"));
        assert!(reading(TranslationMode::Ept).contains("nested count"));
    }
}
