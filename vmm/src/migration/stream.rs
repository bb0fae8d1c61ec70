//! The migration stream: a versioned preamble, then checksummed frames.
//!
//! ```text
//! preamble (24 bytes, each side sends one first):
//!   0  16  "memvisor-migrate"
//!   16  4  stream version, u32 little-endian ([`VERSION`])
//!   20  4  zero
//! frame:
//!   0   4  "MVFR"
//!   4   2  kind ([`Kind`]), u16 little-endian
//!   6   2  zero
//!   8   4  payload length, u32 little-endian (at most [`MAX_PAYLOAD`])
//!   12  4  CRC-32 of bytes 0..12 and the payload
//!   16  …  payload
//! ```
//!
//! The preamble's layout never changes, so two builds that speak different
//! versions can still tell each other so and stop, each with a clear error
//! ([`check_preamble`]). Every frame carries a CRC-32 (the zlib one, as
//! snapshot chunks do) over its header and payload: a frame damaged on the
//! way, cut short or of an unknown kind is an error, never acted on.
//! Payloads are binary for memory ([`Kind::Pages`]: a RAM offset then whole
//! pages; [`Kind::Zeros`]: runs of zero pages) and JSON for the rest.
//!
//! Everything here is pure over `Read`/`Write`: no KVM, no guest memory.

use std::io::{Read, Write};

use thiserror::Error;

/// The preamble's magic.
pub const MAGIC: &[u8; 16] = b"memvisor-migrate";
/// The stream version this build speaks. Bump it with any change to the
/// frames, their payloads or the order of the conversation.
pub const VERSION: u32 = 2;
/// Bytes of the preamble.
pub const PREAMBLE_BYTES: usize = 24;
/// A frame's magic.
pub const FRAME_MAGIC: &[u8; 4] = b"MVFR";
/// Bytes of a frame header.
pub const HEADER_BYTES: usize = 16;
/// Largest payload accepted: 1 MiB of pages plus their offset, with room
/// for the JSON of a vCPU's state (~17 KiB) many times over.
pub const MAX_PAYLOAD: usize = 2 << 20;
/// Bytes of one page.
pub const PAGE: u64 = 4096;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Kind {
    /// Source → destination: the VM's configuration and RAM layout (JSON).
    Hello = 1,
    /// Destination → source: the configuration fits; migration may start.
    Accept = 2,
    /// Either way: a refusal or an abandoned migration, with the reason
    /// (JSON string).
    Abort = 3,
    /// Source → destination: the vCPU's CPUID (JSON), so the destination
    /// creates its vCPU while pages flow.
    Setup = 4,
    /// Source → destination: a RAM offset (u64) and whole pages from it.
    Pages = 5,
    /// Source → destination: runs of pages that are all zero: pairs of RAM
    /// offset and page count (u64 each).
    Zeros = 6,
    /// Source → destination: the end of a pre-copy round (u64 round).
    RoundEnd = 7,
    /// Source → destination: the vCPU, irqchip and device state (JSON),
    /// the last thing before the switch.
    State = 8,
    /// Destination → source: the state is loaded; the guest can run here.
    Ready = 9,
    /// Source → destination: run the guest (the source never will again).
    Commit = 10,
    /// Destination → source: the guest runs here.
    Resumed = 11,
    /// Source → destination: post-copy starts: runs of pages still to come
    /// (pairs as in [`Kind::Zeros`]); the state follows.
    PostcopyPending = 12,
    /// Destination → source: send these pages first (a RAM offset and a
    /// page count, u64 each).
    PageRequest = 13,
    /// Source → destination: every pending page has been sent.
    PostcopyDone = 14,
    /// Destination → source: every page of the round named (u64, as in
    /// [`Kind::RoundEnd`]) is in guest RAM. The source waits for it before
    /// it measures the round or stops the guest, so the bandwidth it
    /// measures is what the destination absorbs, and no backlog sits in
    /// socket buffers while the guest is stopped (version 1 stopped with
    /// up to a socket buffer of pages still to be written: tens of
    /// milliseconds of downtime on a loaded host).
    RoundAck = 15,
}

impl Kind {
    const ALL: [Kind; 15] = [
        Kind::Hello,
        Kind::Accept,
        Kind::Abort,
        Kind::Setup,
        Kind::Pages,
        Kind::Zeros,
        Kind::RoundEnd,
        Kind::State,
        Kind::Ready,
        Kind::Commit,
        Kind::Resumed,
        Kind::PostcopyPending,
        Kind::PageRequest,
        Kind::PostcopyDone,
        Kind::RoundAck,
    ];

    /// Decodes a raw kind.
    #[must_use]
    pub fn from_raw(raw: u16) -> Option<Kind> {
        Self::ALL.into_iter().find(|k| *k as u16 == raw)
    }
}

/// What is wrong with the stream.
#[derive(Debug, Error)]
pub enum StreamError {
    /// Reading or writing failed (the peer went away, a timeout).
    #[error("{what}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The peer closed the connection.
    #[error("the peer closed the connection {0}")]
    Closed(&'static str),
    /// The peer is not a memvisor migration stream.
    #[error("the peer does not speak the memvisor migration stream (its first bytes are {0:02x?})")]
    NotMigration(Vec<u8>),
    /// The peer speaks another version.
    #[error("the peer speaks migration stream version {peer}, this build version {VERSION}; migrate between builds that speak the same version")]
    Version {
        /// The peer's version.
        peer: u32,
    },
    /// A frame that does not start with the frame magic.
    #[error("frame header is damaged (magic {0:02x?})")]
    BadMagic([u8; 4]),
    /// A kind this build does not know.
    #[error("frame of unknown kind {0}")]
    UnknownKind(u16),
    /// A payload longer than [`MAX_PAYLOAD`].
    #[error("frame payload of {0} bytes is longer than {MAX_PAYLOAD}")]
    TooLong(u32),
    /// The checksum does not match.
    #[error("{kind:?} frame of {len} bytes fails its checksum")]
    BadChecksum {
        /// The frame's kind.
        kind: Kind,
        /// Its payload length.
        len: usize,
    },
    /// A payload that does not decode.
    #[error("malformed {kind:?} frame: {why}")]
    Malformed {
        /// The frame's kind.
        kind: Kind,
        /// What is wrong.
        why: String,
    },
    /// A frame that has no place at this point of the conversation.
    #[error("unexpected {got:?} frame while waiting for {expected}")]
    Unexpected {
        /// What arrived.
        got: Kind,
        /// What was expected.
        expected: &'static str,
    },
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> StreamError {
    move |source| {
        if source.kind() == std::io::ErrorKind::UnexpectedEof {
            StreamError::Closed(what)
        } else {
            StreamError::Io { what, source }
        }
    }
}

/// This build's preamble.
#[must_use]
pub fn preamble() -> [u8; PREAMBLE_BYTES] {
    let mut p = [0u8; PREAMBLE_BYTES];
    p[..16].copy_from_slice(MAGIC);
    p[16..20].copy_from_slice(&VERSION.to_le_bytes());
    p
}

/// Checks the peer's preamble.
///
/// # Errors
/// [`StreamError::NotMigration`] or [`StreamError::Version`].
pub fn check_preamble(bytes: &[u8; PREAMBLE_BYTES]) -> Result<(), StreamError> {
    if &bytes[..16] != MAGIC {
        return Err(StreamError::NotMigration(bytes[..16].to_vec()));
    }
    let peer = u32::from_le_bytes(bytes[16..20].try_into().expect("4 bytes"));
    if peer != VERSION {
        return Err(StreamError::Version { peer });
    }
    Ok(())
}

/// Sends this build's preamble and checks the peer's: both sides call it
/// first thing, so a version mismatch is seen by both.
///
/// # Errors
/// As [`check_preamble`], or the I/O failing.
pub fn exchange_preambles(stream: &mut (impl Read + Write)) -> Result<(), StreamError> {
    stream.write_all(&preamble()).map_err(io("sending the stream preamble"))?;
    stream.flush().map_err(io("sending the stream preamble"))?;
    let mut peer = [0u8; PREAMBLE_BYTES];
    stream.read_exact(&mut peer).map_err(io("before its stream preamble"))?;
    check_preamble(&peer)
}

/// The header of a frame of `kind` with `payload`, its CRC filled in.
#[must_use]
pub fn header(kind: Kind, payload: &[&[u8]]) -> [u8; HEADER_BYTES] {
    let len: usize = payload.iter().map(|p| p.len()).sum();
    let mut h = [0u8; HEADER_BYTES];
    h[..4].copy_from_slice(FRAME_MAGIC);
    h[4..6].copy_from_slice(&(kind as u16).to_le_bytes());
    h[8..12].copy_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&h[..12]);
    for p in payload {
        crc.update(p);
    }
    h[12..16].copy_from_slice(&crc.finalize().to_le_bytes());
    h
}

/// Writes one frame whose payload is the concatenation of `payload`.
///
/// # Errors
/// [`StreamError::Io`]; [`StreamError::TooLong`] for a payload over
/// [`MAX_PAYLOAD`] (a bug: nothing is written).
pub fn write_frame(w: &mut impl Write, kind: Kind, payload: &[&[u8]]) -> Result<(), StreamError> {
    let len: usize = payload.iter().map(|p| p.len()).sum();
    if len > MAX_PAYLOAD {
        return Err(StreamError::TooLong(u32::try_from(len).unwrap_or(u32::MAX)));
    }
    w.write_all(&header(kind, payload)).map_err(io("sending a frame"))?;
    for p in payload {
        w.write_all(p).map_err(io("sending a frame"))?;
    }
    Ok(())
}

/// Writes a frame whose payload is `value` as JSON.
///
/// # Errors
/// As [`write_frame`].
pub fn write_json(w: &mut impl Write, kind: Kind, value: &impl serde::Serialize) -> Result<(), StreamError> {
    let bytes = serde_json::to_vec(value).map_err(|e| StreamError::Malformed { kind, why: e.to_string() })?;
    write_frame(w, kind, &[&bytes])
}

/// Reads one frame into `buf` (reused; its length becomes the payload's)
/// and returns its kind, after checking magic, kind, length and CRC.
///
/// # Errors
/// Any [`StreamError`]; `buf` then holds nothing to act on.
pub fn read_frame(r: &mut impl Read, buf: &mut Vec<u8>) -> Result<Kind, StreamError> {
    let mut h = [0u8; HEADER_BYTES];
    r.read_exact(&mut h).map_err(io("while the migration was under way"))?;
    let magic: [u8; 4] = h[..4].try_into().expect("4 bytes");
    if &magic != FRAME_MAGIC || h[6..8] != [0, 0] {
        return Err(StreamError::BadMagic(magic));
    }
    let raw = u16::from_le_bytes(h[4..6].try_into().expect("2 bytes"));
    let kind = Kind::from_raw(raw).ok_or(StreamError::UnknownKind(raw))?;
    let len = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
    if len as usize > MAX_PAYLOAD {
        return Err(StreamError::TooLong(len));
    }
    buf.resize(len as usize, 0);
    r.read_exact(buf).map_err(io("in the middle of a frame"))?;
    let mut crc = crc32fast::Hasher::new();
    crc.update(&h[..12]);
    crc.update(buf);
    if crc.finalize().to_le_bytes() != h[12..16] {
        buf.clear();
        return Err(StreamError::BadChecksum { kind, len: len as usize });
    }
    Ok(kind)
}

/// Decodes a JSON payload.
///
/// # Errors
/// [`StreamError::Malformed`].
pub fn json<T: serde::de::DeserializeOwned>(kind: Kind, payload: &[u8]) -> Result<T, StreamError> {
    serde_json::from_slice(payload).map_err(|e| StreamError::Malformed { kind, why: e.to_string() })
}

/// Decodes a [`Kind::Pages`] payload: the RAM offset and the pages.
///
/// # Errors
/// [`StreamError::Malformed`] when it is not an offset and whole pages, or
/// the offset is not page-aligned.
pub fn pages(payload: &[u8]) -> Result<(u64, &[u8]), StreamError> {
    let bad = |why: String| StreamError::Malformed { kind: Kind::Pages, why };
    if payload.len() < 8 + PAGE as usize || !(payload.len() - 8).is_multiple_of(PAGE as usize) {
        return Err(bad(format!("{} bytes are not an offset and whole pages", payload.len())));
    }
    let offset = u64::from_le_bytes(payload[..8].try_into().expect("8 bytes"));
    if !offset.is_multiple_of(PAGE) {
        return Err(bad(format!("RAM offset {offset:#x} is not page-aligned")));
    }
    Ok((offset, &payload[8..]))
}

/// Encodes runs `(RAM offset, pages)` for [`Kind::Zeros`],
/// [`Kind::PostcopyPending`] and [`Kind::PageRequest`].
#[must_use]
pub fn encode_runs(runs: &[(u64, u64)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(runs.len() * 16);
    for &(offset, pages) in runs {
        out.extend_from_slice(&offset.to_le_bytes());
        out.extend_from_slice(&pages.to_le_bytes());
    }
    out
}

/// Decodes runs `(RAM offset, pages)`.
///
/// # Errors
/// [`StreamError::Malformed`] for a length that is not whole pairs, an
/// unaligned offset, an empty run or one whose end overflows.
pub fn runs(kind: Kind, payload: &[u8]) -> Result<Vec<(u64, u64)>, StreamError> {
    let bad = |why: String| StreamError::Malformed { kind, why };
    if !payload.len().is_multiple_of(16) {
        return Err(bad(format!("{} bytes are not whole (offset, pages) pairs", payload.len())));
    }
    payload
        .chunks_exact(16)
        .map(|pair| {
            let offset = u64::from_le_bytes(pair[..8].try_into().expect("8 bytes"));
            let pages = u64::from_le_bytes(pair[8..].try_into().expect("8 bytes"));
            if !offset.is_multiple_of(PAGE) || pages == 0 || pages.checked_mul(PAGE).and_then(|b| b.checked_add(offset)).is_none() {
                return Err(bad(format!("run of {pages} pages at RAM offset {offset:#x}")));
            }
            Ok((offset, pages))
        })
        .collect()
}

/// Decodes a u64 payload ([`Kind::RoundEnd`]).
///
/// # Errors
/// [`StreamError::Malformed`] unless it is 8 bytes.
pub fn u64_payload(kind: Kind, payload: &[u8]) -> Result<u64, StreamError> {
    payload.try_into().map(u64::from_le_bytes).map_err(|_| StreamError::Malformed { kind, why: format!("{} bytes, not 8", payload.len()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: Kind, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        write_frame(&mut out, kind, &[payload]).unwrap();
        out
    }

    #[test]
    fn frames_round_trip_with_their_kind_and_payload() {
        let mut wire = frame(Kind::RoundEnd, &7u64.to_le_bytes());
        let page = vec![0xabu8; PAGE as usize];
        write_frame(&mut wire, Kind::Pages, &[&8192u64.to_le_bytes(), &page]).unwrap();
        write_json(&mut wire, Kind::Abort, &"no").unwrap();
        let mut r = wire.as_slice();
        let mut buf = Vec::new();
        assert_eq!(read_frame(&mut r, &mut buf).unwrap(), Kind::RoundEnd);
        assert_eq!(u64_payload(Kind::RoundEnd, &buf).unwrap(), 7);
        assert_eq!(read_frame(&mut r, &mut buf).unwrap(), Kind::Pages);
        let (offset, data) = pages(&buf).unwrap();
        assert_eq!((offset, data), (8192, page.as_slice()));
        assert_eq!(read_frame(&mut r, &mut buf).unwrap(), Kind::Abort);
        assert_eq!(json::<String>(Kind::Abort, &buf).unwrap(), "no");
        assert!(matches!(read_frame(&mut r, &mut buf), Err(StreamError::Closed(_))), "the end of the stream is a closed peer");
    }

    #[test]
    fn a_flipped_bit_anywhere_fails_the_checksum_or_the_header() {
        let wire = frame(Kind::Pages, &[&4096u64.to_le_bytes()[..], &[1u8; 4096]].concat());
        for byte in 0..wire.len() {
            let mut bad = wire.clone();
            bad[byte] ^= 0x04;
            let e = read_frame(&mut bad.as_slice(), &mut Vec::new()).unwrap_err();
            assert!(
                matches!(e, StreamError::BadChecksum { .. } | StreamError::BadMagic(_) | StreamError::UnknownKind(_) | StreamError::TooLong(_) | StreamError::Closed(_)),
                "byte {byte}: {e}"
            );
        }
    }

    #[test]
    fn truncated_oversized_and_unknown_frames_are_refused() {
        let wire = frame(Kind::RoundEnd, &1u64.to_le_bytes());
        for cut in 0..wire.len() {
            let e = read_frame(&mut &wire[..cut], &mut Vec::new()).unwrap_err();
            assert!(matches!(e, StreamError::Closed(_)), "cut at {cut}: {e}");
        }
        let mut long = wire.clone();
        long[8..12].copy_from_slice(&(MAX_PAYLOAD as u32 + 1).to_le_bytes());
        assert!(matches!(read_frame(&mut long.as_slice(), &mut Vec::new()), Err(StreamError::TooLong(_))));
        let mut unknown = wire.clone();
        unknown[4..6].copy_from_slice(&999u16.to_le_bytes());
        assert!(matches!(read_frame(&mut unknown.as_slice(), &mut Vec::new()), Err(StreamError::UnknownKind(999))));
        assert!(write_frame(&mut Vec::new(), Kind::Pages, &[&vec![0u8; MAX_PAYLOAD + 1]]).is_err());
    }

    #[test]
    fn preambles_of_another_version_or_protocol_are_refused() {
        assert!(check_preamble(&preamble()).is_ok());
        let mut other = preamble();
        other[16..20].copy_from_slice(&(VERSION + 1).to_le_bytes());
        let e = check_preamble(&other).unwrap_err();
        assert!(e.to_string().contains(&format!("version {}", VERSION + 1)), "{e}");
        let mut http = [0u8; PREAMBLE_BYTES];
        http[..16].copy_from_slice(b"GET / HTTP/1.1\r\n");
        assert!(matches!(check_preamble(&http), Err(StreamError::NotMigration(_))));
    }

    #[test]
    fn page_and_run_payloads_are_checked() {
        assert!(pages(&[0u8; 8]).is_err(), "no page");
        assert!(pages(&[0u8; 8 + 4095]).is_err(), "a partial page");
        let mut unaligned = vec![0u8; 8 + 4096];
        unaligned[0] = 1;
        assert!(pages(&unaligned).is_err());
        let r = [(0, 1), (1 << 30, 262_144)];
        assert_eq!(runs(Kind::Zeros, &encode_runs(&r)).unwrap(), r);
        assert!(runs(Kind::Zeros, &[0u8; 15]).is_err());
        assert!(runs(Kind::Zeros, &encode_runs(&[(4096, 0)])).is_err(), "an empty run");
        assert!(runs(Kind::Zeros, &encode_runs(&[(1, 1)])).is_err(), "unaligned");
        assert!(runs(Kind::Zeros, &encode_runs(&[(4096, u64::MAX / 2)])).is_err(), "overflowing");
    }
}
