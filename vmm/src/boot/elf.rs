//! Checking and loading an x86-64 ELF kernel with a PVH entry.
//!
//! [`inspect`] is a pure check of the headers (so a bad file gets a precise
//! message before anything is written to guest memory); [`load`] then hands
//! the image to linux-loader, which copies the `PT_LOAD` segments to their
//! physical addresses and finds the PVH entry note.

use std::io::Cursor;

use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use vm_memory::GuestAddress;

use crate::memory::GuestMemory;

use crate::boot::BootError;
use crate::bytes::{u16_le as u16_at, u32_le as u32_at, u64_le as u64_at};

/// ELF constants (System V ABI, "ELF Header" and "Program Header").
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const EM_X86_64: u16 = 62;
const ET_EXEC: u16 = 2;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
/// The PVH entry note: owner "Xen", type `XEN_ELFNOTE_PHYS32_ENTRY` (18),
/// a 32-bit physical entry (Xen `public/elfnote.h`; Linux
/// `arch/x86/platform/pvh/head.S` emits it).
const XEN_NOTE_NAME: &[u8] = b"Xen\0";
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;

/// What [`inspect`] learned about an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ElfSummary {
    /// Lowest physical address of a loadable segment.
    pub load_start: u64,
    /// One past the highest physical byte of a loadable segment.
    pub load_end: u64,
    /// The ELF entry point (not the PVH one).
    pub entry: u64,
}


/// Checks that `image` is a little-endian x86-64 executable ELF whose
/// loadable segments lie in `[min_addr, ram_end)`.
///
/// # Errors
/// [`BootError::NotElf`], [`BootError::WrongArch`] or [`BootError::DoesNotFit`].
pub fn inspect(image: &[u8], min_addr: u64, ram_end: u64) -> Result<ElfSummary, BootError> {
    let not_elf = |why: &str| BootError::NotElf(why.to_string());
    if image.len() < EHDR_SIZE || &image[..4] != b"\x7fELF" {
        return Err(not_elf("no ELF magic"));
    }
    if image[4] != ELFCLASS64 || image[5] != ELFDATA2LSB {
        return Err(BootError::WrongArch("not a 64-bit little-endian ELF".into()));
    }
    let machine = u16_at(image, 18).ok_or_else(|| not_elf("truncated header"))?;
    if machine != EM_X86_64 {
        return Err(BootError::WrongArch(format!("ELF machine {machine}, not x86-64 ({EM_X86_64})")));
    }
    if u16_at(image, 16) != Some(ET_EXEC) {
        return Err(not_elf("not an executable (ET_EXEC) image"));
    }
    let entry = u64_at(image, 24).ok_or_else(|| not_elf("truncated header"))?;
    let phoff = u64_at(image, 32).ok_or_else(|| not_elf("truncated header"))?;
    let phentsize = u16_at(image, 54).ok_or_else(|| not_elf("truncated header"))?;
    let phnum = u16_at(image, 56).ok_or_else(|| not_elf("truncated header"))?;
    if usize::from(phentsize) != PHDR_SIZE {
        return Err(not_elf("unexpected program header size"));
    }
    let mut load_start = u64::MAX;
    let mut load_end = 0u64;
    // Every loadable segment's [paddr, paddr + memsz): two that overlap
    // would load over each other, in an order the loader picks.
    let mut segments: Vec<(u64, u64)> = Vec::new();
    for i in 0..u64::from(phnum) {
        let off = phoff
            .checked_add(i * PHDR_SIZE as u64)
            .and_then(|o| usize::try_from(o).ok())
            .filter(|o| o.checked_add(PHDR_SIZE).is_some_and(|end| end <= image.len()))
            .ok_or_else(|| not_elf("program headers outside the file"))?;
        if u32_at(image, off) != Some(PT_LOAD) {
            continue;
        }
        let file_off = u64_at(image, off + 8).unwrap_or(0);
        let paddr = u64_at(image, off + 24).unwrap_or(0);
        let filesz = u64_at(image, off + 32).unwrap_or(0);
        let memsz = u64_at(image, off + 40).unwrap_or(0);
        if file_off.checked_add(filesz).is_none_or(|e| e > image.len() as u64) {
            return Err(not_elf("a segment extends past the end of the file"));
        }
        let end = paddr.checked_add(memsz).ok_or_else(|| not_elf("segment address overflows"))?;
        if let Some(&(s, e)) = segments.iter().find(|&&(s, e)| paddr < e && s < end) {
            return Err(BootError::NotElf(format!("loadable segments overlap: [{paddr:#x}, {end:#x}) and [{s:#x}, {e:#x})")));
        }
        segments.push((paddr, end));
        load_start = load_start.min(paddr);
        load_end = load_end.max(end);
    }
    if load_end == 0 {
        return Err(not_elf("no loadable segments"));
    }
    if load_start < min_addr || load_end > ram_end {
        return Err(BootError::DoesNotFit { start: load_start, end: load_end, ram_end });
    }
    Ok(ElfSummary { load_start, load_end, entry })
}

/// The PVH entry of `image` when one of its `PT_NOTE` segments holds a Xen
/// note of type 18 (`XEN_ELFNOTE_PHYS32_ENTRY`); `None` otherwise, and
/// for anything that is not a well-formed 64-bit ELF. Pure: used to tell a
/// PVH kernel from a plain vmlinux before anything is loaded.
#[must_use]
pub fn pvh_entry(image: &[u8]) -> Option<u64> {
    if image.len() < EHDR_SIZE || &image[..4] != b"\x7fELF" || image[4] != ELFCLASS64 {
        return None;
    }
    let phoff = usize::try_from(u64_at(image, 32)?).ok()?;
    let phnum = usize::from(u16_at(image, 56)?);
    (0..phnum).find_map(|i| {
        let off = phoff.checked_add(i.checked_mul(PHDR_SIZE)?)?;
        if u32_at(image, off)? != PT_NOTE {
            return None;
        }
        let start = usize::try_from(u64_at(image, off + 8)?).ok()?;
        let len = usize::try_from(u64_at(image, off + 32)?).ok()?;
        let notes = image.get(start..start.checked_add(len)?)?;
        xen_note(notes, XEN_ELFNOTE_PHYS32_ENTRY)
    })
}

/// The value of the Xen note of type `kind` in a `PT_NOTE` segment's bytes
/// (System V ABI, "Note Section": namesz, descsz, type, then the name and
/// the descriptor, each padded to 4 bytes).
fn xen_note(notes: &[u8], kind: u32) -> Option<u64> {
    let pad4 = |n: usize| n.checked_add(3).map(|v| v & !3);
    let mut at = 0usize;
    while at + 12 <= notes.len() {
        let namesz = usize::try_from(u32_at(notes, at)?).ok()?;
        let descsz = usize::try_from(u32_at(notes, at + 4)?).ok()?;
        let ty = u32_at(notes, at + 8)?;
        let name_at = at + 12;
        let desc_at = name_at.checked_add(pad4(namesz)?)?;
        if ty == kind && notes.get(name_at..name_at.checked_add(namesz)?) == Some(XEN_NOTE_NAME) {
            return match descsz {
                4 => u32_at(notes, desc_at).map(u64::from),
                8 => u64_at(notes, desc_at),
                _ => None,
            };
        }
        at = desc_at.checked_add(pad4(descsz)?)?;
    }
    None
}

/// Loads a plain vmlinux's segments at their physical addresses and returns
/// its (physical) entry point: the 64-bit entry of Linux's boot protocol,
/// `startup_64`, which wants `rsi` to point at the zero page.
///
/// # Errors
/// [`BootError::Load`] when linux-loader fails.
pub fn load_vmlinux(memory: &GuestMemory, image: &[u8]) -> Result<GuestAddress, BootError> {
    let mut reader = Cursor::new(image);
    let result = Elf::load(memory, None, &mut reader, None).map_err(|e| BootError::Load(e.to_string()))?;
    Ok(result.kernel_load)
}

/// Loads `image` into guest memory and returns its PVH entry point.
///
/// # Errors
/// [`BootError::Load`] when linux-loader fails, [`BootError::NoPvhEntry`]
/// when the image has no PVH entry note.
pub fn load(memory: &GuestMemory, image: &[u8]) -> Result<GuestAddress, BootError> {
    let mut reader = Cursor::new(image);
    let result = Elf::load(memory, None, &mut reader, None).map_err(|e| BootError::Load(e.to_string()))?;
    match result.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(entry) => Ok(entry),
        _ => Err(BootError::NoPvhEntry),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF header + one PT_LOAD, built by hand.
    fn tiny_elf(machine: u16, paddr: u64, memsz: u64) -> Vec<u8> {
        let mut b = vec![0u8; EHDR_SIZE + PHDR_SIZE];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = ELFCLASS64;
        b[5] = ELFDATA2LSB;
        b[16..18].copy_from_slice(&ET_EXEC.to_le_bytes());
        b[18..20].copy_from_slice(&machine.to_le_bytes());
        b[24..32].copy_from_slice(&paddr.to_le_bytes());
        b[32..40].copy_from_slice(&(EHDR_SIZE as u64).to_le_bytes());
        b[54..56].copy_from_slice(&(PHDR_SIZE as u16).to_le_bytes());
        b[56..58].copy_from_slice(&1u16.to_le_bytes());
        let p = EHDR_SIZE;
        b[p..p + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
        b[p + 24..p + 32].copy_from_slice(&paddr.to_le_bytes());
        b[p + 40..p + 48].copy_from_slice(&memsz.to_le_bytes());
        b
    }

    #[test]
    fn a_good_header_is_summarised() {
        let s = inspect(&tiny_elf(EM_X86_64, 0x10_0000, 0x1000), 0x10_0000, 1 << 30).unwrap();
        assert_eq!((s.load_start, s.load_end), (0x10_0000, 0x10_1000));
    }

    #[test]
    fn non_elf_and_wrong_arch_are_rejected() {
        assert!(matches!(inspect(b"hello world", 0, 1 << 30), Err(BootError::NotElf(_))));
        assert!(matches!(inspect(&tiny_elf(183, 0x10_0000, 0x1000), 0, 1 << 30), Err(BootError::WrongArch(_))));
        let mut truncated = tiny_elf(EM_X86_64, 0x10_0000, 0x1000);
        truncated.truncate(EHDR_SIZE + 10);
        assert!(matches!(inspect(&truncated, 0, 1 << 30), Err(BootError::NotElf(_))));
    }

    #[test]
    fn overlapping_load_segments_are_refused() {
        // tiny_elf's segment at 1 MiB, and a second one over its end.
        let mut b = tiny_elf(EM_X86_64, 0x10_0000, 0x2000);
        b[56..58].copy_from_slice(&2u16.to_le_bytes());
        let mut second = vec![0u8; PHDR_SIZE];
        second[..4].copy_from_slice(&PT_LOAD.to_le_bytes());
        second[24..32].copy_from_slice(&0x10_1000u64.to_le_bytes());
        second[40..48].copy_from_slice(&0x1000u64.to_le_bytes());
        b.extend_from_slice(&second);
        let e = inspect(&b, 0x10_0000, 1 << 30).unwrap_err().to_string();
        assert!(e.contains("loadable segments overlap"), "{e}");
        // Moved to where the first ends, it loads.
        let at = EHDR_SIZE + PHDR_SIZE + 24;
        b[at..at + 8].copy_from_slice(&0x10_2000u64.to_le_bytes());
        assert!(inspect(&b, 0x10_0000, 1 << 30).is_ok());
    }

    /// `tiny_elf` plus a PT_NOTE segment holding `notes`.
    fn elf_with_notes(notes: &[u8]) -> Vec<u8> {
        let mut b = tiny_elf(EM_X86_64, 0x10_0000, 0x1000);
        b[56..58].copy_from_slice(&2u16.to_le_bytes());
        let p = EHDR_SIZE + PHDR_SIZE;
        b.resize(p + PHDR_SIZE, 0);
        let file_off = b.len() as u64;
        b[p..p + 4].copy_from_slice(&PT_NOTE.to_le_bytes());
        b[p + 8..p + 16].copy_from_slice(&file_off.to_le_bytes());
        b[p + 32..p + 40].copy_from_slice(&(notes.len() as u64).to_le_bytes());
        b.extend_from_slice(notes);
        b
    }

    fn note(name: &[u8], ty: u32, desc: &[u8]) -> Vec<u8> {
        let mut n = Vec::new();
        n.extend_from_slice(&(name.len() as u32).to_le_bytes());
        n.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        n.extend_from_slice(&ty.to_le_bytes());
        n.extend_from_slice(name);
        n.resize(n.len().next_multiple_of(4), 0);
        n.extend_from_slice(desc);
        n.resize(n.len().next_multiple_of(4), 0);
        n
    }

    #[test]
    fn the_pvh_note_is_found_among_other_notes() {
        let mut notes = note(b"Xen\0", 6, b"linux\0");
        notes.extend(note(b"GNU\0", 3, &[0xab; 20]));
        notes.extend(note(b"Xen\0", XEN_ELFNOTE_PHYS32_ENTRY, &0x100_0850u32.to_le_bytes()));
        assert_eq!(pvh_entry(&elf_with_notes(&notes)), Some(0x100_0850));
        // Debian's vmlinux stores the entry as 8 bytes.
        let eight = note(b"Xen\0", XEN_ELFNOTE_PHYS32_ENTRY, &0x100_0850u64.to_le_bytes());
        assert_eq!(pvh_entry(&elf_with_notes(&eight)), Some(0x100_0850));
    }

    #[test]
    fn no_pvh_note_without_the_xen_owner_or_the_type() {
        assert_eq!(pvh_entry(&tiny_elf(EM_X86_64, 0x10_0000, 0x1000)), None);
        let other_owner = note(b"Nop\0", XEN_ELFNOTE_PHYS32_ENTRY, &1u32.to_le_bytes());
        assert_eq!(pvh_entry(&elf_with_notes(&other_owner)), None);
        let other_type = note(b"Xen\0", 17, &1u32.to_le_bytes());
        assert_eq!(pvh_entry(&elf_with_notes(&other_type)), None);
        // A note whose sizes run past its segment ends the search quietly.
        let mut broken = note(b"Xen\0", XEN_ELFNOTE_PHYS32_ENTRY, &1u32.to_le_bytes());
        broken[4..8].copy_from_slice(&1000u32.to_le_bytes());
        assert_eq!(pvh_entry(&elf_with_notes(&broken)), None);
        assert_eq!(pvh_entry(b"MZ not an elf"), None);
    }

    #[test]
    fn an_image_larger_than_ram_does_not_fit() {
        let r = inspect(&tiny_elf(EM_X86_64, 0x10_0000, 64 << 20), 0x10_0000, 32 << 20);
        assert!(matches!(r, Err(BootError::DoesNotFit { .. })));
    }
}
