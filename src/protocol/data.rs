//! Wire format of the TCP data plane: fixed-size little-endian headers.
//!
//! ```text
//! sender -> receiver, once:  "DCMD" | version u16 | sender u8 | mode u8 | token [32]
//! receiver -> sender, once:  status u8 (0 ok, 1 bad token, 2 bad version, 3 sender fenced, 4 no RDMA)
//! mode 0 is this TCP stream of frames; mode 1 pairs an RDMA queue pair
//! (see `transport::rdma`) and the stream then carries only replies.
//! sender -> receiver:        header [24] = kind u8 | 0 [3] | region u32 | offset u64 | len u32 | 0 [4]
//!                            kind 1 = pages (len payload bytes follow), 2 = batch end (offset = batch id)
//! receiver -> sender:        reply [16] = kind u8 | 0 [3] | code u32 | value u64
//!                            kind 1 = batch applied (value = batch id), 2 = error (code, then close)
//! ```
//! A receiver checks every header against the session's RAM before it reads
//! the payload, so a bad frame writes nothing. `sender` names the sending
//! host within the migration, so that a destination can fence one sender's
//! streams (see `Message::Fence`).

use crate::memory::PAGE_SIZE;
use thiserror::Error;

pub const MAGIC: &[u8; 4] = b"DCMD";
pub const DATA_VERSION: u16 = 1;
pub const HELLO_LEN: usize = 40;
pub const HEADER_LEN: usize = 24;
pub const REPLY_LEN: usize = 16;
pub const TOKEN_LEN: usize = 32;
/// Largest payload in one pages frame.
pub const MAX_PAYLOAD: u32 = 4 << 20;

pub const HELLO_OK: u8 = 0;
pub const HELLO_BAD_TOKEN: u8 = 1;
pub const HELLO_BAD_VERSION: u8 = 2;
pub const HELLO_FENCED: u8 = 3;
pub const HELLO_NO_RDMA: u8 = 4;

pub const MODE_TCP: u8 = 0;
pub const MODE_RDMA: u8 = 1;

pub const ERR_BAD_FRAME: u32 = 1;
pub const ERR_OUT_OF_BOUNDS: u32 = 2;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("unknown frame kind {0}")]
    Kind(u8),
    #[error("pages frame with bad length {0}")]
    Length(u32),
    #[error("pages frame at unaligned offset {0}")]
    Unaligned(u64),
    #[error("not a dcmigrate data stream")]
    Magic,
}

pub type Token = [u8; TOKEN_LEN];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    Pages { region: u32, offset: u64, len: u32 },
    BatchEnd { batch: u64 },
}

pub fn encode_hello(token: &Token, sender: u8) -> [u8; HELLO_LEN] {
    encode_hello_mode(token, sender, MODE_TCP)
}

pub fn encode_hello_mode(token: &Token, sender: u8, mode: u8) -> [u8; HELLO_LEN] {
    let mut b = [0u8; HELLO_LEN];
    b[..4].copy_from_slice(MAGIC);
    b[4..6].copy_from_slice(&DATA_VERSION.to_le_bytes());
    b[6] = sender;
    b[7] = mode;
    b[8..].copy_from_slice(token);
    b
}

/// A decoded hello.
pub struct Hello {
    pub version: u16,
    pub sender: u8,
    pub mode: u8,
    pub token: Token,
}

pub fn decode_hello(b: &[u8; HELLO_LEN]) -> Result<Hello, FrameError> {
    if &b[..4] != MAGIC {
        return Err(FrameError::Magic);
    }
    let version = u16::from_le_bytes([b[4], b[5]]);
    Ok(Hello { version, sender: b[6], mode: b[7], token: b[8..].try_into().expect("32 bytes") })
}

impl Frame {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        match *self {
            Frame::Pages { region, offset, len } => {
                b[0] = 1;
                b[4..8].copy_from_slice(&region.to_le_bytes());
                b[8..16].copy_from_slice(&offset.to_le_bytes());
                b[16..20].copy_from_slice(&len.to_le_bytes());
            }
            Frame::BatchEnd { batch } => {
                b[0] = 2;
                b[8..16].copy_from_slice(&batch.to_le_bytes());
            }
        }
        b
    }

    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Frame, FrameError> {
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
        match b[0] {
            1 => {
                let (region, offset, len) = (u32_at(4), u64_at(8), u32_at(16));
                if len == 0 || len > MAX_PAYLOAD || len % PAGE_SIZE as u32 != 0 {
                    return Err(FrameError::Length(len));
                }
                if offset % PAGE_SIZE as u64 != 0 {
                    return Err(FrameError::Unaligned(offset));
                }
                Ok(Frame::Pages { region, offset, len })
            }
            2 => Ok(Frame::BatchEnd { batch: u64_at(8) }),
            k => Err(FrameError::Kind(k)),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    Applied { batch: u64 },
    Error { code: u32 },
}

impl Reply {
    pub fn encode(&self) -> [u8; REPLY_LEN] {
        let mut b = [0u8; REPLY_LEN];
        match *self {
            Reply::Applied { batch } => {
                b[0] = 1;
                b[8..].copy_from_slice(&batch.to_le_bytes());
            }
            Reply::Error { code } => {
                b[0] = 2;
                b[4..8].copy_from_slice(&code.to_le_bytes());
            }
        }
        b
    }

    pub fn decode(b: &[u8; REPLY_LEN]) -> Result<Reply, FrameError> {
        match b[0] {
            1 => Ok(Reply::Applied { batch: u64::from_le_bytes(b[8..].try_into().unwrap()) }),
            2 => Ok(Reply::Error { code: u32::from_le_bytes(b[4..8].try_into().unwrap()) }),
            k => Err(FrameError::Kind(k)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn frames_roundtrip() {
        for f in [Frame::Pages { region: 3, offset: 8192, len: 4096 }, Frame::BatchEnd { batch: u64::MAX }] {
            assert_eq!(Frame::decode(&f.encode()), Ok(f));
        }
        let t = [9u8; TOKEN_LEN];
        let h = decode_hello(&encode_hello_mode(&t, 3, MODE_RDMA)).unwrap();
        assert_eq!((h.version, h.sender, h.mode, h.token), (DATA_VERSION, 3, MODE_RDMA, t));
        for r in [Reply::Applied { batch: 7 }, Reply::Error { code: 2 }] {
            assert_eq!(Reply::decode(&r.encode()), Ok(r));
        }
    }

    #[test]
    fn rejects_bad_headers() {
        let mut b = Frame::Pages { region: 0, offset: 0, len: 4096 }.encode();
        b[16..20].copy_from_slice(&(MAX_PAYLOAD + 4096).to_le_bytes());
        assert!(Frame::decode(&b).is_err());
        b[16..20].copy_from_slice(&100u32.to_le_bytes());
        assert!(Frame::decode(&b).is_err());
        let mut b = Frame::Pages { region: 0, offset: 0, len: 4096 }.encode();
        b[8] = 1;
        assert_eq!(Frame::decode(&b), Err(FrameError::Unaligned(1)));
        b[0] = 9;
        assert_eq!(Frame::decode(&b), Err(FrameError::Kind(9)));
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::array::uniform24(any::<u8>())) {
            let _ = Frame::decode(&bytes);
        }
    }
}
