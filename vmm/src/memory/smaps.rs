//! Reading /proc/self/smaps: what the kernel says about our mappings.
//!
//! A pure parser plus a sum over the mappings that make up one guest RAM
//! range (mbind and madvise may split one mmap into several VMAs).

use std::collections::BTreeMap;

/// One VMA from smaps: its range and its `Key: N kB` fields, in bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Vma {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// Fields in bytes (smaps reports kB).
    pub fields: BTreeMap<String, u64>,
}

/// Parses smaps text.
#[must_use]
pub fn parse(text: &str) -> Vec<Vma> {
    let mut vmas: Vec<Vma> = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let Some(first) = words.next() else { continue };
        if let Some(key) = first.strip_suffix(':') {
            // "Rss:   1234 kB"
            if let (Some(v), Some(vma)) = (words.next().and_then(|v| v.parse::<u64>().ok()), vmas.last_mut()) {
                let bytes = if words.next() == Some("kB") { v * 1024 } else { v };
                vma.fields.insert(key.to_string(), bytes);
            }
        } else if let Some((a, b)) = first.split_once('-')
            && let (Ok(start), Ok(end)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16))
        {
            vmas.push(Vma { start, end, fields: BTreeMap::new() });
        }
    }
    vmas
}

/// Sums each field over the VMAs inside `[start, end)`.
#[must_use]
pub fn sum_over(vmas: &[Vma], start: u64, end: u64) -> BTreeMap<String, u64> {
    let mut total = BTreeMap::new();
    for vma in vmas.iter().filter(|v| v.start >= start && v.end <= end) {
        for (k, v) in &vma.fields {
            *total.entry(k.clone()).or_insert(0) += v;
        }
    }
    total
}

/// Reads and sums /proc/self/smaps over `[start, end)`; empty on error.
#[must_use]
pub fn read_range(start: u64, end: u64) -> BTreeMap<String, u64> {
    std::fs::read_to_string("/proc/self/smaps").map(|t| sum_over(&parse(&t), start, end)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
7f0000000000-7f0000200000 rw-p 00000000 00:00 0
Size:               2048 kB
Rss:                2048 kB
AnonHugePages:      2048 kB
VmFlags: rd wr mr mw me ac hg
7f0000200000-7f0000400000 rw-p 00000000 00:00 0
Size:               2048 kB
Rss:                   8 kB
AnonHugePages:         0 kB
7f0000400000-7f0000401000 r--p 00000000 00:00 0
Rss:                   4 kB
";

    #[test]
    fn smaps_fields_are_parsed_in_bytes() {
        let v = parse(SAMPLE);
        assert_eq!(v.len(), 3);
        assert_eq!(v[0].start, 0x7f00_0000_0000);
        assert_eq!(v[0].fields["Rss"], 2048 * 1024);
        assert!(!v[0].fields.contains_key("VmFlags"));
    }

    #[test]
    fn sums_cover_only_the_range() {
        let v = parse(SAMPLE);
        let s = sum_over(&v, 0x7f00_0000_0000, 0x7f00_0040_0000);
        assert_eq!(s["Rss"], (2048 + 8) * 1024);
        assert_eq!(s["AnonHugePages"], 2048 * 1024);
    }
}
