//! The VMM decompresses a bzImage's kernel itself, at native speed.
//!
//! A bzImage carries the kernel (`vmlinux`, an ELF) compressed, and a small
//! decompressor that the guest runs at ring 0 before the kernel proper. On
//! a host that emulates guest ring-0 code (KVM's PVM flavour, ~1 µs per
//! instruction) that decompressor is most of an early boot: Debian's 6.1
//! cloud kernel prints "Linux version" ~100 s after entry through the
//! bzImage and ~15 s after entry through its vmlinux. So memvisor, by
//! default, takes the compressed payload out of the bzImage
//! ([`payload`]), decompresses it ([`decompress`]) and enters the vmlinux
//! through the 64-bit boot protocol with the bzImage's own setup header in
//! the zero page, as a loader that boots a vmlinux does (boot.rst, "64-bit
//! Boot Protocol"); `--kernel-decompress guest` keeps the old way.
//!
//! Where the payload is: boot protocol 2.08 added `payload_offset` (from
//! the start of the protected-mode code, `(setup_sects + 1) * 512` bytes
//! into the file) and `payload_length` (Documentation/arch/x86/boot.rst,
//! "Details of Header Fields"). What it is: the compressor is told by its
//! magic bytes, as the kernel's own `decompress_method()` does
//! (lib/decompress.c); every format the kernel builds appends the
//! uncompressed size as a 4-byte little-endian trailer (scripts/Makefile.lib,
//! `size_append`; gzip's own trailer ISIZE is the same number), and that
//! size is checked against a cap before anything is allocated and again
//! against what the stream produced.
//!
//! Decompression bombs: the output is capped ([`DECOMPRESSED_MAX`], and the
//! caller passes the smaller of it and guest RAM); a stream that would
//! produce more stops at the cap with [`DecompressError::TooLarge`], and the
//! LZMA dictionaries and zstd windows a header asks for are bounded
//! ([`DICTIONARY_MAX`]) before they are allocated.
//!
//! This module owns the bytes only: it does not load anything. The pure
//! functions here are fuzzed (vmm/fuzz, target `bzimage_loader`).

use std::io::Read;

use thiserror::Error;

use crate::boot::bzimage::BzImageInfo;
use crate::bytes::u32_le;

/// The most bytes a payload may decompress to: 256 MiB, the same bound as
/// a kernel file ([`super::file::KERNEL_MAX`]). Debian's 6.1 cloud kernel
/// decompresses to 53 MB (a stripped vmlinux and its relocations).
pub const DECOMPRESSED_MAX: u64 = 256 << 20;
/// The largest LZMA dictionary or zstd window a payload may ask for:
/// 128 MiB. The kernel's builds use at most 64 MiB (`lzma -9`, xz's
/// `scripts/xz_wrap.sh` 32 MiB) and a 128 MiB zstd window (`zstd -22
/// --ultra`, window log 27).
pub const DICTIONARY_MAX: u64 = 128 << 20;
/// Boot protocol 2.08 added `payload_offset` and `payload_length`.
pub const MIN_PAYLOAD_PROTOCOL: u16 = 0x0208;
/// The magic of LZ4's legacy frame (`lz4 -l`), which the kernel's build
/// uses (lib/decompress_unlz4.c, `ARCHIVE_MAGICNUMBER`).
const LZ4_LEGACY_MAGIC: u32 = 0x184c_2102;
/// A legacy LZ4 block decompresses to at most 8 MiB
/// (lib/decompress_unlz4.c, `LZ4_DEFAULT_UNCOMPRESSED_CHUNK_SIZE`).
const LZ4_LEGACY_BLOCK: usize = 8 << 20;

/// A compressor the kernel's build may use (`CONFIG_KERNEL_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// `CONFIG_KERNEL_GZIP`: a gzip member.
    Gzip,
    /// `CONFIG_KERNEL_BZIP2`.
    Bzip2,
    /// `CONFIG_KERNEL_LZMA`: the legacy `.lzma` format.
    Lzma,
    /// `CONFIG_KERNEL_XZ`: an xz stream (LZMA2 with the x86 BCJ filter).
    Xz,
    /// `CONFIG_KERNEL_LZO`: lzop's format.
    Lzo,
    /// `CONFIG_KERNEL_LZ4`: LZ4's legacy frame.
    Lz4,
    /// `CONFIG_KERNEL_ZSTD`: a zstd frame.
    Zstd,
}

impl Compression {
    /// The compressor whose magic `bytes` start with, as lib/decompress.c's
    /// `compressed_formats` table tells them.
    #[must_use]
    pub fn from_magic(bytes: &[u8]) -> Option<Compression> {
        const MAGICS: &[(&[u8], Compression)] = &[
            (&[0x1f, 0x8b], Compression::Gzip),
            (&[0x1f, 0x9e], Compression::Gzip),
            (b"BZh", Compression::Bzip2),
            (&[0x5d, 0x00, 0x00], Compression::Lzma),
            (&[0xfd, b'7', b'z', b'X', b'Z', 0x00], Compression::Xz),
            (&[0x89, b'L', b'Z', b'O'], Compression::Lzo),
            (&[0x02, 0x21, 0x4c, 0x18], Compression::Lz4),
            (&[0x28, 0xb5, 0x2f, 0xfd], Compression::Zstd),
        ];
        MAGICS.iter().find(|(magic, _)| bytes.starts_with(magic)).map(|&(_, c)| c)
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Compression::Gzip => "gzip",
            Compression::Bzip2 => "bzip2",
            Compression::Lzma => "lzma",
            Compression::Xz => "xz",
            Compression::Lzo => "lzo",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        })
    }
}

/// Why a payload could not be found or decompressed.
#[derive(Debug, Error)]
pub enum DecompressError {
    /// The header predates the payload fields.
    #[error("boot protocol {}.{:02} has no payload_offset (2.08 added it); boot it with --kernel-decompress guest", .0 >> 8, .0 & 0xff)]
    OldProtocol(u16),
    /// The payload fields point outside the file.
    #[error("the payload ({length} bytes at {offset:#x}) lies outside the {file_len}-byte file")]
    Outside {
        /// Offset in the file.
        offset: u64,
        /// Its length.
        length: u64,
        /// The file's length.
        file_len: usize,
    },
    /// Too short for a stream and its size trailer.
    #[error("the payload has {0} bytes, too few for a compressed kernel and its size trailer")]
    TooShort(usize),
    /// No known magic.
    #[error("the payload's compression is unknown (magic {0:02x?})")]
    UnknownFormat(Vec<u8>),
    /// A format memvisor does not decompress.
    #[error("{0} payloads are not decompressed by memvisor; boot it with --kernel-decompress guest")]
    Unsupported(Compression),
    /// The output would pass the cap.
    #[error("the payload decompresses to more than {limit} bytes (the cap: the smaller of {DECOMPRESSED_MAX} bytes and guest RAM below the MMIO hole){}", announced.map(|a| format!("; its trailer announces {a}")).unwrap_or_default())]
    TooLarge {
        /// The cap.
        limit: u64,
        /// The size the trailer announces, when that is what passes it.
        announced: Option<u64>,
    },
    /// The stream is damaged or ends early.
    #[error("the {compression} data is corrupt or truncated: {detail}")]
    Corrupt {
        /// The format.
        compression: Compression,
        /// The decoder's message.
        detail: String,
    },
    /// The output's length is not the trailer's.
    #[error("the payload decompressed to {got} bytes, its size trailer says {want}")]
    SizeMismatch {
        /// What came out.
        got: u64,
        /// What the trailer says.
        want: u64,
    },
    /// The output is not an ELF.
    #[error("the decompressed payload is not an ELF (it starts with {0:02x?})")]
    NotElf(Vec<u8>),
}

/// A bzImage's compressed kernel, found by [`payload`].
#[derive(Debug, Clone, Copy)]
pub struct Payload<'a> {
    /// Its compressor.
    pub compression: Compression,
    /// The payload as the header delimits it: the compressed stream and
    /// the 4-byte size trailer.
    pub bytes: &'a [u8],
    /// Where it starts in the file.
    pub offset: usize,
    /// The decompressed size the trailer announces.
    pub announced: u64,
}

impl Payload<'_> {
    /// The compressed stream without the size trailer (gzip keeps it: it is
    /// the member's own ISIZE field).
    fn stream(&self) -> &[u8] {
        match self.compression {
            Compression::Gzip => self.bytes,
            _ => &self.bytes[..self.bytes.len() - 4],
        }
    }
}

/// Finds the compressed kernel in `image`, a bzImage whose header
/// [`super::bzimage::parse`] read into `info`. Pure.
///
/// # Errors
/// [`DecompressError::OldProtocol`], [`DecompressError::Outside`],
/// [`DecompressError::TooShort`], [`DecompressError::UnknownFormat`].
pub fn payload<'a>(image: &'a [u8], info: &BzImageInfo) -> Result<Payload<'a>, DecompressError> {
    let h = info.header;
    if h.version < MIN_PAYLOAD_PROTOCOL {
        return Err(DecompressError::OldProtocol(h.version));
    }
    let offset = info.setup_size + u64::from(h.payload_offset);
    let length = u64::from(h.payload_length);
    let outside = || DecompressError::Outside { offset, length, file_len: image.len() };
    let start = usize::try_from(offset).map_err(|_| outside())?;
    let end = usize::try_from(offset + length).map_err(|_| outside())?;
    let bytes = image.get(start..end).ok_or_else(outside)?;
    // At least a magic and the trailer.
    if bytes.len() < 8 {
        return Err(DecompressError::TooShort(bytes.len()));
    }
    let compression = Compression::from_magic(bytes).ok_or_else(|| DecompressError::UnknownFormat(bytes[..bytes.len().min(6)].to_vec()))?;
    let announced = u64::from(u32_le(bytes, bytes.len() - 4).unwrap_or(0));
    Ok(Payload { compression, bytes, offset: start, announced })
}

/// Decompresses `payload` into a buffer of at most `cap` bytes (the caller
/// passes the smaller of [`DECOMPRESSED_MAX`] and the guest RAM the kernel
/// may occupy) and checks that the result is as long as the trailer says
/// and is an ELF.
///
/// # Errors
/// [`DecompressError::TooLarge`] before anything is allocated when the
/// trailer announces more than `cap`, or as soon as the stream passes it;
/// [`DecompressError::Corrupt`], [`DecompressError::SizeMismatch`],
/// [`DecompressError::NotElf`], [`DecompressError::Unsupported`].
pub fn decompress(payload: &Payload<'_>, cap: u64) -> Result<Vec<u8>, DecompressError> {
    let cap = cap.min(DECOMPRESSED_MAX);
    if payload.announced > cap {
        return Err(DecompressError::TooLarge { limit: cap, announced: Some(payload.announced) });
    }
    let c = payload.compression;
    let corrupt = |detail: String| DecompressError::Corrupt { compression: c, detail };
    let stream = payload.stream();
    // The announced size bounds the first allocation (it is at most the cap).
    let want = usize::try_from(payload.announced).unwrap_or(0);
    let dict_kib = u32::try_from(DICTIONARY_MAX / 1024).unwrap_or(u32::MAX);
    let out = match c {
        Compression::Gzip => read_capped(flate2::read::GzDecoder::new(stream), want, cap, c)?,
        Compression::Xz => read_capped(lzma_rust2::XzReader::new_mem_limit(stream, false, dict_kib), want, cap, c)?,
        Compression::Lzma => {
            let reader = lzma_rust2::LzmaReader::new_mem_limit(stream, dict_kib, None).map_err(|e| corrupt(e.to_string()))?;
            read_capped(reader, want, cap, c)?
        }
        Compression::Zstd => {
            let reader = ruzstd::decoding::StreamingDecoder::new_with_max_window_size(stream, DICTIONARY_MAX).map_err(|e| corrupt(e.to_string()))?;
            read_capped(reader, want, cap, c)?
        }
        Compression::Lz4 => lz4_legacy(stream, want, cap)?,
        Compression::Bzip2 | Compression::Lzo => return Err(DecompressError::Unsupported(c)),
    };
    if out.len() as u64 != payload.announced {
        return Err(DecompressError::SizeMismatch { got: out.len() as u64, want: payload.announced });
    }
    if !out.starts_with(b"\x7fELF") {
        return Err(DecompressError::NotElf(out[..out.len().min(4)].to_vec()));
    }
    Ok(out)
}

/// Reads `reader` to its end into a buffer that may grow to `cap` bytes.
fn read_capped(reader: impl Read, want: usize, cap: u64, c: Compression) -> Result<Vec<u8>, DecompressError> {
    let mut out = Vec::with_capacity(want);
    // One byte past the cap tells a stream that is exactly `cap` long from
    // one that goes on.
    reader.take(cap.saturating_add(1)).read_to_end(&mut out).map_err(|e| DecompressError::Corrupt { compression: c, detail: e.to_string() })?;
    if out.len() as u64 > cap {
        return Err(DecompressError::TooLarge { limit: cap, announced: None });
    }
    Ok(out)
}

/// Decompresses LZ4's legacy frame (`lz4 -l`; lib/decompress_unlz4.c): the
/// magic, then blocks, each a 4-byte little-endian compressed length and
/// an independent LZ4 block of at most 8 MiB decompressed; the magic may
/// come again (concatenated frames). lz4_flex decodes the blocks; the
/// framing is this small loop because lz4_flex reads only LZ4's current
/// frame format.
fn lz4_legacy(stream: &[u8], want: usize, cap: u64) -> Result<Vec<u8>, DecompressError> {
    let corrupt = |detail: String| DecompressError::Corrupt { compression: Compression::Lz4, detail };
    let cap = usize::try_from(cap).unwrap_or(usize::MAX);
    let mut out: Vec<u8> = Vec::with_capacity(want);
    let mut at = 0usize;
    while at < stream.len() {
        let len = u32_le(stream, at).ok_or_else(|| corrupt(format!("{} stray bytes at the end", stream.len() - at)))?;
        at += 4;
        if len == LZ4_LEGACY_MAGIC {
            continue;
        }
        if at == 4 {
            return Err(corrupt("no legacy frame magic".into()));
        }
        let block = at.checked_add(len as usize).and_then(|end| stream.get(at..end)).ok_or_else(|| corrupt(format!("a block of {len} bytes at {:#x} runs past the end", at - 4)))?;
        at += block.len();
        let room = (cap - out.len()).min(LZ4_LEGACY_BLOCK);
        let filled = out.len();
        out.resize(filled + room, 0);
        match lz4_flex::block::decompress_into(block, &mut out[filled..]) {
            Ok(n) => out.truncate(filled + n),
            // A block that does not fit the room left under the cap.
            Err(lz4_flex::block::DecompressError::OutputTooSmall { .. }) if room < LZ4_LEGACY_BLOCK => {
                return Err(DecompressError::TooLarge { limit: cap as u64, announced: None });
            }
            Err(e) => return Err(corrupt(format!("block at {:#x}: {e}", at - block.len() - 4))),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::boot::bzimage;

    /// A legacy LZ4 frame of `data`, in blocks of `block` bytes.
    fn lz4_frame(data: &[u8], block: usize) -> Vec<u8> {
        let mut out = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        for chunk in data.chunks(block) {
            let c = lz4_flex::block::compress(chunk);
            out.extend_from_slice(&(c.len() as u32).to_le_bytes());
            out.extend_from_slice(&c);
        }
        out
    }

    /// A fake ELF of `len` bytes: the magic and a compressible pattern.
    fn elf(len: usize) -> Vec<u8> {
        let mut v: Vec<u8> = (0..len).map(|i| (i / 7 % 251) as u8).collect();
        v[..4].copy_from_slice(b"\x7fELF");
        v
    }

    /// `stream` with the kernel build's size trailer.
    fn with_size(mut stream: Vec<u8>, size: usize) -> Vec<u8> {
        stream.extend_from_slice(&(size as u32).to_le_bytes());
        stream
    }

    /// A fake bzImage (setup_sects 1: code from 1024) whose header points
    /// at `payload`, placed `pad` bytes into the protected-mode code.
    fn bzimage_with(payload: &[u8], pad: usize, version: u16) -> Vec<u8> {
        let code = (pad + payload.len()).next_multiple_of(16);
        let mut image = bzimage::tests::fake_bzimage(version, linux_loader::loader::bootparam::XLF_KERNEL_64, code as u32, 1024 + code);
        image[1024 + pad..1024 + pad + payload.len()].copy_from_slice(payload);
        // payload_offset at 0x248, payload_length at 0x24c (boot.rst).
        image[0x248..0x24c].copy_from_slice(&(pad as u32).to_le_bytes());
        image[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        image
    }

    fn find(image: &[u8]) -> Result<Payload<'_>, DecompressError> {
        payload(image, &bzimage::parse(image).unwrap())
    }

    #[test]
    fn the_payload_is_where_the_setup_header_says() {
        let data = elf(100_000);
        let p = with_size(lz4_frame(&data, LZ4_LEGACY_BLOCK), data.len());
        let image = bzimage_with(&p, 0x3a0, 0x020f);
        let found = find(&image).unwrap();
        assert_eq!((found.compression, found.offset, found.bytes, found.announced), (Compression::Lz4, 1024 + 0x3a0, &p[..], 100_000));
        assert_eq!(decompress(&found, DECOMPRESSED_MAX).unwrap(), data);
    }

    #[test]
    fn a_header_before_2_08_or_pointing_outside_the_file_is_refused() {
        let p = with_size(lz4_frame(&elf(1000), 1000), 1000);
        // parse() refuses anything before 2.12; payload() on its own
        // refuses a header without the payload fields.
        let image = bzimage_with(&p, 0, 0x020f);
        let mut info = bzimage::parse(&image).unwrap();
        info.header.version = 0x0207;
        let e = payload(&image, &info).unwrap_err();
        assert!(matches!(e, DecompressError::OldProtocol(0x0207)), "{e}");
        assert!(e.to_string().contains("2.07"), "{e}");
        let mut image = bzimage_with(&p, 16, 0x020f);
        image[0x24c..0x250].copy_from_slice(&0x10_0000u32.to_le_bytes());
        let e = find(&image).unwrap_err();
        assert!(e.to_string().contains("lies outside"), "{e}");
        image[0x248..0x24c].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(find(&image), Err(DecompressError::Outside { .. })));
        image[0x248..0x250].copy_from_slice(&[16, 0, 0, 0, 5, 0, 0, 0]);
        assert!(matches!(find(&image), Err(DecompressError::TooShort(5))));
    }

    #[test]
    fn every_format_the_kernel_uses_is_told_by_its_magic() {
        for (magic, c) in [
            (&b"\x1f\x8b\x08"[..], Compression::Gzip),
            (b"BZh9", Compression::Bzip2),
            (b"\x5d\x00\x00\x00\x04", Compression::Lzma),
            (b"\xfd7zXZ\x00\x00", Compression::Xz),
            (b"\x89LZO\x00", Compression::Lzo),
            (b"\x02\x21\x4c\x18", Compression::Lz4),
            (b"\x28\xb5\x2f\xfd", Compression::Zstd),
        ] {
            assert_eq!(Compression::from_magic(magic), Some(c), "{magic:02x?}");
        }
        assert_eq!(Compression::from_magic(b"\x7fELF"), None);
        let image = bzimage_with(b"\x7fELF and more bytes", 0, 0x020f);
        assert!(matches!(find(&image), Err(DecompressError::UnknownFormat(_))));
        let image = bzimage_with(&with_size(b"BZh91AY&SY".to_vec(), 10), 0, 0x020f);
        let e = decompress(&find(&image).unwrap(), DECOMPRESSED_MAX).unwrap_err();
        assert!(e.to_string().contains("--kernel-decompress guest"), "{e}");
    }

    #[test]
    fn gzip_and_lz4_in_several_blocks_decompress() {
        let data = elf(3 * 1000 + 17);
        let p = with_size(lz4_frame(&data, 1000), data.len());
        let image = bzimage_with(&p, 0, 0x020f);
        assert_eq!(decompress(&find(&image).unwrap(), DECOMPRESSED_MAX).unwrap(), data);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&data).unwrap();
        let image = bzimage_with(&gz.finish().unwrap(), 0, 0x020f);
        let found = find(&image).unwrap();
        assert_eq!((found.compression, found.announced), (Compression::Gzip, data.len() as u64), "gzip's ISIZE is the size");
        assert_eq!(decompress(&found, DECOMPRESSED_MAX).unwrap(), data);
    }

    /// The same 4 KiB as `elf(4096)`, compressed by the command-line tools
    /// the way the kernel's build calls them (scripts/Makefile.lib,
    /// scripts/xz_wrap.sh): `xz --check=crc32 --x86 --lzma2=dict=1MiB`,
    /// `xz --format=lzma -9`, `zstd -19`.
    const XZ: &[u8] = include_bytes!("testdata/elf4k.xz");
    const LZMA: &[u8] = include_bytes!("testdata/elf4k.lzma");
    const ZSTD: &[u8] = include_bytes!("testdata/elf4k.zst");

    #[test]
    fn xz_with_the_x86_filter_lzma_and_zstd_decompress() {
        let data = elf(4096);
        for (stream, c) in [(XZ, Compression::Xz), (LZMA, Compression::Lzma), (ZSTD, Compression::Zstd)] {
            let image = bzimage_with(&with_size(stream.to_vec(), data.len()), 0, 0x020f);
            let found = find(&image).unwrap();
            assert_eq!(found.compression, c);
            assert_eq!(decompress(&found, DECOMPRESSED_MAX).unwrap(), data, "{c}");
            // Cut short, each is corrupt or truncated.
            let cut = with_size(stream[..stream.len() * 2 / 3].to_vec(), data.len());
            let e = decompress(&find(&bzimage_with(&cut, 0, 0x020f)).unwrap(), DECOMPRESSED_MAX).unwrap_err();
            assert!(matches!(e, DecompressError::Corrupt { .. }), "{c}: {e}");
            // And a cap below the trailer's size stops it before it starts;
            // a trailer that lies is stopped at the cap.
            let e = decompress(&found, 4000).unwrap_err();
            assert!(matches!(e, DecompressError::TooLarge { announced: Some(4096), .. }), "{c}: {e}");
            let liar = bzimage_with(&with_size(stream.to_vec(), 100), 0, 0x020f);
            let e = decompress(&find(&liar).unwrap(), 1000).unwrap_err();
            assert!(matches!(e, DecompressError::TooLarge { limit: 1000, announced: None }), "{c}: {e}");
        }
    }

    #[test]
    fn the_cap_stops_a_bomb_before_and_while_decompressing() {
        let data = elf(200_000);
        // The trailer tells the truth: refused before any allocation.
        let image = bzimage_with(&with_size(lz4_frame(&data, 64 << 10), data.len()), 0, 0x020f);
        let e = decompress(&find(&image).unwrap(), 100_000).unwrap_err();
        assert!(matches!(e, DecompressError::TooLarge { limit: 100_000, announced: Some(200_000) }), "{e}");
        // The trailer lies: the stream is stopped at the cap.
        for block in [64 << 10, LZ4_LEGACY_BLOCK] {
            let image = bzimage_with(&with_size(lz4_frame(&data, block), 1000), 0, 0x020f);
            let e = decompress(&find(&image).unwrap(), 100_000).unwrap_err();
            assert!(matches!(e, DecompressError::TooLarge { limit: 100_000, announced: None }), "{block}: {e}");
        }
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&data).unwrap();
        let mut gz = gz.finish().unwrap();
        let n = gz.len();
        gz[n - 4..].copy_from_slice(&1000u32.to_le_bytes());
        let e = decompress(&find(&bzimage_with(&gz, 0, 0x020f)).unwrap(), 100_000).unwrap_err();
        assert!(matches!(e, DecompressError::TooLarge { announced: None, .. }), "{e}");
        // Under the cap, a lying trailer is a mismatch.
        let image = bzimage_with(&with_size(lz4_frame(&data, 64 << 10), 1000), 0, 0x020f);
        let e = decompress(&find(&image).unwrap(), DECOMPRESSED_MAX).unwrap_err();
        assert!(matches!(e, DecompressError::SizeMismatch { got: 200_000, want: 1000 }), "{e}");
    }

    #[test]
    fn corrupt_or_truncated_payloads_are_one_clear_error() {
        let data = elf(50_000);
        let frame = lz4_frame(&data, 16 << 10);
        // Cut in the middle of a block.
        let cut = with_size(frame[..frame.len() / 2].to_vec(), data.len());
        let e = decompress(&find(&bzimage_with(&cut, 0, 0x020f)).unwrap(), DECOMPRESSED_MAX).unwrap_err();
        assert!(e.to_string().starts_with("the lz4 data is corrupt or truncated"), "{e}");
        // Garbage inside a block.
        let mut bad = frame.clone();
        for b in &mut bad[12..60] {
            *b = 0xff;
        }
        let e = decompress(&find(&bzimage_with(&with_size(bad, data.len()), 0, 0x020f)).unwrap(), DECOMPRESSED_MAX).unwrap_err();
        assert!(matches!(e, DecompressError::Corrupt { .. } | DecompressError::SizeMismatch { .. }), "{e}");
        // A gzip stream with its middle cut out (its last 4 bytes, ISIZE,
        // still the size).
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&data).unwrap();
        let gz = gz.finish().unwrap();
        let cut = [&gz[..gz.len() / 2], &gz[gz.len() - 4..]].concat();
        let e = decompress(&find(&bzimage_with(&cut, 0, 0x020f)).unwrap(), DECOMPRESSED_MAX).unwrap_err();
        assert!(e.to_string().starts_with("the gzip data is corrupt or truncated"), "{e}");
        // Truncated xz, lzma and zstd headers.
        for magic in [&b"\xfd7zXZ\x00\x00\x01\x02\x03"[..], b"\x5d\x00\x00\x80\x00\xff", b"\x28\xb5\x2f\xfd\x00"] {
            let e = decompress(&find(&bzimage_with(&with_size(magic.to_vec(), 100), 0, 0x020f)).unwrap(), DECOMPRESSED_MAX).unwrap_err();
            assert!(matches!(e, DecompressError::Corrupt { .. }), "{magic:02x?}: {e}");
        }
    }

    #[test]
    fn the_output_must_be_an_elf() {
        let data = vec![7u8; 5000];
        let image = bzimage_with(&with_size(lz4_frame(&data, 4096), data.len()), 0, 0x020f);
        let e = decompress(&find(&image).unwrap(), DECOMPRESSED_MAX).unwrap_err();
        assert!(matches!(e, DecompressError::NotElf(_)), "{e}");
    }
}
