//! What a qcow2 image's header says it needs from the host: a backing file
//! (and its format) and an external data file. A destination reads this
//! itself, bounded, before QEMU sees the image, so that every file of the
//! chain is one it opened beneath its storage; QEMU is then given the whole
//! chain explicitly and never opens a name from an image.

use std::os::unix::fs::FileExt;
use thiserror::Error;

const MAGIC: u32 = 0x5146_49fb;
/// Header extension: the backing file's format name.
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Header extension: the external data file's name.
const EXT_DATA_FILE: u32 = 0x4441_5441;
/// Incompatible feature bit: data lives in an external file.
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// QEMU's own limit on a backing file name.
const MAX_NAME: usize = 1023;
/// Most bytes of header extensions read (QEMU keeps them in the first cluster).
const MAX_HEADER: u64 = 64 << 10;

/// Why an image's header was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum Qcow2Error {
    /// Reading the image failed.
    #[error("reading the header: {0}")]
    Io(String),
    /// Not a qcow2 image, or a version QEMU does not write.
    #[error("not a qcow2 image (version 2 or 3)")]
    NotQcow2,
    /// An encrypted image (it needs secrets a destination does not have).
    #[error("an encrypted image")]
    Encrypted,
    /// A field outside the header's bounds.
    #[error("a malformed header: {0}")]
    Malformed(&'static str),
}

/// What the header asks for.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Header {
    /// The backing file, as written in the image.
    pub backing: Option<String>,
    /// The backing file's format, if the image says.
    pub backing_format: Option<String>,
    /// The external data file, as written in the image.
    pub data_file: Option<String>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn text(bytes: &[u8]) -> Result<String, Qcow2Error> {
    let s = std::str::from_utf8(bytes).map_err(|_| Qcow2Error::Malformed("a name that is not UTF-8"))?;
    if s.is_empty() || s.len() > MAX_NAME || s.chars().any(char::is_control) {
        return Err(Qcow2Error::Malformed("an empty, long or unprintable name"));
    }
    Ok(s.to_owned())
}

/// Whether `bytes` start like a qcow2 image.
pub fn is_qcow2(first: &[u8]) -> bool {
    first.len() >= 8 && be32(first, 0) == MAGIC && matches!(be32(first, 4), 2 | 3)
}

/// Reads the header of the image open as `f`.
pub fn read(f: &std::fs::File) -> Result<Header, Qcow2Error> {
    let len = f.metadata().map_err(|e| Qcow2Error::Io(e.to_string()))?.len();
    let mut head = vec![0u8; len.min(MAX_HEADER) as usize];
    f.read_exact_at(&mut head, 0).map_err(|e| Qcow2Error::Io(e.to_string()))?;
    parse(&head)
}

/// Parses a header from the image's first bytes (at most [`MAX_HEADER`]).
pub fn parse(b: &[u8]) -> Result<Header, Qcow2Error> {
    if b.len() < 72 || !is_qcow2(b) {
        return Err(Qcow2Error::NotQcow2);
    }
    let version = be32(b, 4);
    if be32(b, 32) != 0 {
        return Err(Qcow2Error::Encrypted);
    }
    let mut h = Header::default();
    let (off, size) = (be64(b, 8), be32(b, 16) as u64);
    if off != 0 {
        let end = off.checked_add(size).filter(|e| *e <= b.len() as u64 && size > 0);
        let end = end.ok_or(Qcow2Error::Malformed("the backing file name lies outside the header"))?;
        h.backing = Some(text(&b[off as usize..end as usize])?);
    }
    let (ext_start, incompat) = if version >= 3 {
        if b.len() < 104 {
            return Err(Qcow2Error::Malformed("a short version-3 header"));
        }
        (be32(b, 100) as usize, be64(b, 72))
    } else {
        (72, 0)
    };
    let mut at = ext_start;
    loop {
        if at + 8 > b.len() {
            return Err(Qcow2Error::Malformed("header extensions run past the header"));
        }
        let (ty, len) = (be32(b, at), be32(b, at + 4) as usize);
        if ty == 0 {
            break;
        }
        let data = b.get(at + 8..at + 8 + len).ok_or(Qcow2Error::Malformed("an extension past the header"))?;
        match ty {
            EXT_BACKING_FORMAT => h.backing_format = Some(text(data)?),
            EXT_DATA_FILE => h.data_file = Some(text(data)?),
            _ => {}
        }
        at += 8 + len.div_ceil(8) * 8;
    }
    if incompat & INCOMPAT_DATA_FILE != 0 && h.data_file.is_none() {
        return Err(Qcow2Error::Malformed("an external data file without its name"));
    }
    if incompat & INCOMPAT_DATA_FILE == 0 {
        h.data_file = None;
    }
    Ok(h)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A version-3 header with an optional backing file and data file.
    pub(crate) fn header(backing: Option<&str>, format: Option<&str>, data: Option<&str>) -> Vec<u8> {
        let mut b = vec![0u8; 104];
        b[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&3u32.to_be_bytes());
        b[20..24].copy_from_slice(&16u32.to_be_bytes());
        b[100..104].copy_from_slice(&104u32.to_be_bytes());
        if data.is_some() {
            b[72..80].copy_from_slice(&INCOMPAT_DATA_FILE.to_be_bytes());
        }
        let mut ext = |ty: u32, s: &str| {
            b.extend(ty.to_be_bytes());
            b.extend((s.len() as u32).to_be_bytes());
            b.extend(s.as_bytes());
            b.resize(b.len().div_ceil(8) * 8, 0);
        };
        if let Some(f) = format {
            ext(EXT_BACKING_FORMAT, f);
        }
        if let Some(d) = data {
            ext(EXT_DATA_FILE, d);
        }
        b.extend([0u8; 8]);
        if let Some(name) = backing {
            let off = b.len() as u64;
            b[8..16].copy_from_slice(&off.to_be_bytes());
            b[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
            b.extend(name.as_bytes());
        }
        b
    }

    #[test]
    fn reads_backing_and_data_files() {
        let h = parse(&header(Some("base.qcow2"), Some("qcow2"), Some("data.raw"))).unwrap();
        assert_eq!(h.backing.as_deref(), Some("base.qcow2"));
        assert_eq!(h.backing_format.as_deref(), Some("qcow2"));
        assert_eq!(h.data_file.as_deref(), Some("data.raw"));
        assert_eq!(parse(&header(None, None, None)).unwrap(), Header::default());
    }

    #[test]
    fn refuses_what_lies_outside_the_header() {
        let mut b = header(Some("base"), None, None);
        b[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(parse(&b), Err(Qcow2Error::Malformed(_))));
        let mut b = header(None, None, None);
        b[100..104].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(parse(&b), Err(Qcow2Error::Malformed(_))));
        let mut b = header(None, None, None);
        b[32..36].copy_from_slice(&1u32.to_be_bytes());
        assert_eq!(parse(&b), Err(Qcow2Error::Encrypted));
        assert_eq!(
            parse(b"raw data, not an image at all ....................................................."),
            Err(Qcow2Error::NotQcow2)
        );
    }
}
