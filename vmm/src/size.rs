//! Byte sizes as people write them: `256M`, `1G`, `1073741824` parsed, and
//! counts printed with a binary unit. A leaf: flags, config files, the
//! workload specs and the reports all use it, and it uses nothing of theirs.

use thiserror::Error;

/// A size string that cannot be parsed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("invalid size {0:?}: expected a number of bytes with an optional K, M, G or T suffix (e.g. 256M, 1G, 1073741824)")]
pub struct SizeError(pub String);

/// Parses a memory size: plain bytes or a number with a binary suffix
/// (K, M, G, T; optionally followed by `iB` or `B`).
///
/// # Errors
/// [`SizeError`] for anything else, including overflow.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let bad = || SizeError(s.to_string());
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    if digits_end == 0 {
        return Err(bad());
    }
    let number: u64 = t[..digits_end].parse().map_err(|_| bad())?;
    let suffix = t[digits_end..].trim().to_ascii_uppercase();
    let shift = match suffix.as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(bad()),
    };
    number.checked_mul(1u64 << shift).ok_or_else(bad)
}

/// Formats a byte count with a binary unit, exact where possible ("256 MiB").
#[must_use]
pub fn format_size(bytes: u64) -> String {
    const UNITS: [(&str, u32); 4] = [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)];
    for (unit, shift) in UNITS {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{} {unit}", bytes >> shift);
        }
    }
    for (unit, shift) in UNITS {
        if bytes >= 1 << shift {
            return format!("{:.1} {unit}", bytes as f64 / (1u64 << shift) as f64);
        }
    }
    format!("{bytes} B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_and_without_suffixes() {
        assert_eq!(parse_size("256M").unwrap(), 256 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("1073741824").unwrap(), 1 << 30);
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size(" 3 MB ").unwrap(), 3 << 20);
    }

    #[test]
    fn bad_sizes_are_rejected() {
        for s in ["", "M", "12X", "-1", "1.5G", "99999999999999999999", "17179869184T"] {
            assert!(parse_size(s).is_err(), "{s:?} should be rejected");
        }
    }

    #[test]
    fn sizes_format_exactly_when_they_can() {
        assert_eq!(format_size(256 << 20), "256 MiB");
        assert_eq!(format_size(1 << 30), "1 GiB");
        assert_eq!(format_size((1 << 30) + (512 << 20)), "1536 MiB");
        assert_eq!(format_size(1000), "1000 B");
    }
}
