//! Wire format of the data plane: fixed-size little-endian headers.
//!
//! ```text
//! sender -> receiver, once:  "DCMD" | version u16 | sender u8 | mode u8 | token [32]
//! receiver -> sender, once:  status u8 (HelloStatus)
//! mode Tcp is this TCP stream of frames; mode Rdma pairs an RDMA queue pair
//! (see `transport::rdma`) and the stream then carries only replies.
//! sender -> receiver:        header [24] = kind u8 | 0 [3] | region u32 | offset u64 | len u32 | 0 [4]
//!                            kind 1 = pages (len payload bytes follow), 2 = batch end (offset = batch id),
//!                            3 = zero pages (len bytes of pages that are all zero; no payload)
//! receiver -> sender:        reply [16] = kind u8 | 0 [3] | code u32 | value u64
//!                            kind 1 = batch applied (value = batch id), 2 = rejected (code, then close)
//! ```
//! A receiver checks every header against the session's RAM before it reads
//! the payload, so a bad frame writes nothing. Zero frames go only to a
//! receiver whose agent speaks control protocol 5 or later (the sender is
//! told so by its engine: the data wire version is unchanged). `sender` names the sending
//! host within the migration, so that a destination can fence one sender's
//! streams (see `Message::Fence`).

use super::types::{Token, TOKEN_LEN};
use crate::memory::PAGE_SIZE;
use num_enum::{IntoPrimitive, TryFromPrimitive};
use thiserror::Error;

/// First bytes of every data stream.
pub const MAGIC: &[u8; 4] = b"DCMD";
/// The data plane's wire version.
pub const DATA_VERSION: u16 = 1;
/// Bytes in a hello.
pub const HELLO_LEN: usize = 40;
/// Bytes in a frame header.
pub const HEADER_LEN: usize = 24;
/// Bytes in a reply.
pub const REPLY_LEN: usize = 16;
/// Largest payload in one pages frame.
pub const MAX_PAYLOAD: u32 = 4 << 20;
/// Most bytes one zero frame covers: as much as a pages frame (the
/// receiver reads every page it covers, so its work per 24-byte frame stays
/// what a frame's payload would cost).
pub const MAX_ZERO: u32 = MAX_PAYLOAD;

/// The receiver's answer to a hello.
#[derive(Clone, Copy, Debug, PartialEq, Eq, TryFromPrimitive, IntoPrimitive)]
#[repr(u8)]
pub enum HelloStatus {
    /// Accepted.
    Ok = 0,
    /// No session has this token.
    BadToken = 1,
    /// Unknown wire version or stream mode.
    BadVersion = 2,
    /// This sender was fenced: its streams are refused from now on.
    Fenced = 3,
    /// RDMA was asked for and the session offers none.
    NoRdma = 4,
    /// The pause's verification began: no new streams for this session.
    Sealed = 5,
    /// This receiver takes encrypted (TLS) streams only.
    EncryptionRequired = 6,
    /// The token belongs to another sender, or to another host.
    WrongSender = 7,
}

/// What a data stream carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, TryFromPrimitive, IntoPrimitive)]
#[repr(u8)]
pub enum StreamMode {
    /// Page frames on this stream.
    Tcp = 0,
    /// This stream pairs an RDMA queue pair and carries only replies.
    Rdma = 1,
}

/// Why a receiver rejected a frame (then closed the stream).
#[derive(Clone, Copy, Debug, PartialEq, Eq, TryFromPrimitive, IntoPrimitive)]
#[repr(u32)]
pub enum RejectCode {
    /// The header does not decode.
    BadFrame = 1,
    /// The frame points outside the session's RAM.
    OutOfBounds = 2,
    /// The receiver's queue pair of this RDMA stream failed; it is in the
    /// error state (fenced) when this is sent, so the sender may re-pair.
    QueuePairFailed = 3,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, TryFromPrimitive, IntoPrimitive)]
#[repr(u8)]
enum FrameKind {
    Pages = 1,
    BatchEnd = 2,
    Zero = 3,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, TryFromPrimitive, IntoPrimitive)]
#[repr(u8)]
enum ReplyKind {
    Applied = 1,
    Rejected = 2,
}

/// A data-plane header that does not decode.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    /// Not a known frame or reply kind.
    #[error("unknown frame kind {0}")]
    Kind(u8),
    /// A pages frame whose length is zero, too large or not whole pages.
    #[error("pages frame with bad length {0}")]
    Length(u32),
    /// A pages frame at an offset that is not page aligned.
    #[error("pages frame at unaligned offset {0}")]
    Unaligned(u64),
    /// A hello without the magic bytes.
    #[error("not a dcmigrate data stream")]
    Magic,
    /// A reply with an unknown rejection code.
    #[error("unknown rejection code {0}")]
    Code(u32),
}

/// What a sender says first on a data stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    /// The sender's data wire version.
    pub version: u16,
    /// The sending host's id within the migration.
    pub sender: u8,
    /// The stream's mode (a raw byte: an unknown one is answered, not dropped).
    pub mode: u8,
    /// The destination session's token.
    pub token: Token,
}

impl Hello {
    /// A hello for this wire version.
    pub fn new(token: Token, sender: u8, mode: StreamMode) -> Self {
        Self { version: DATA_VERSION, sender, mode: mode.into(), token }
    }

    /// The hello's bytes.
    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        b[..4].copy_from_slice(MAGIC);
        b[4..6].copy_from_slice(&self.version.to_le_bytes());
        b[6] = self.sender;
        b[7] = self.mode;
        b[8..].copy_from_slice(&self.token.0);
        b
    }

    /// Decodes a hello (the version and mode are checked by the receiver).
    pub fn decode(b: &[u8; HELLO_LEN]) -> Result<Self, FrameError> {
        if &b[..4] != MAGIC {
            return Err(FrameError::Magic);
        }
        let mut token = [0u8; TOKEN_LEN];
        token.copy_from_slice(&b[8..]);
        Ok(Self { version: u16::from_le_bytes([b[4], b[5]]), sender: b[6], mode: b[7], token: Token(token) })
    }
}

/// A frame header from sender to receiver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// `len` bytes of whole pages at `offset` of `region` follow.
    Pages {
        /// Index of the RAM region.
        region: u32,
        /// Byte offset in the region (page aligned).
        offset: u64,
        /// Payload bytes (whole pages, at most [`MAX_PAYLOAD`]).
        len: u32,
    },
    /// Every frame of batch `batch` was sent: acknowledge once applied.
    BatchEnd {
        /// The batch id.
        batch: u64,
    },
    /// `len` bytes of whole pages at `offset` of `region` are all zero at
    /// the sender (no payload follows).
    Zero {
        /// Index of the RAM region.
        region: u32,
        /// Byte offset in the region (page aligned).
        offset: u64,
        /// Bytes (whole pages, at most [`MAX_ZERO`]).
        len: u32,
    },
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[i..i + 8]);
    u64::from_le_bytes(w)
}

impl Frame {
    /// The header's bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        match *self {
            Frame::Pages { region, offset, len } | Frame::Zero { region, offset, len } => {
                let kind = if matches!(self, Frame::Pages { .. }) { FrameKind::Pages } else { FrameKind::Zero };
                b[0] = kind.into();
                b[4..8].copy_from_slice(&region.to_le_bytes());
                b[8..16].copy_from_slice(&offset.to_le_bytes());
                b[16..20].copy_from_slice(&len.to_le_bytes());
            }
            Frame::BatchEnd { batch } => {
                b[0] = FrameKind::BatchEnd.into();
                b[8..16].copy_from_slice(&batch.to_le_bytes());
            }
        }
        b
    }

    /// Decodes and checks a header (bounds against RAM are the receiver's).
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Frame, FrameError> {
        let kind = FrameKind::try_from(b[0]).map_err(|_| FrameError::Kind(b[0]))?;
        match kind {
            FrameKind::Pages | FrameKind::Zero => {
                let (region, offset, len) = (u32_at(b, 4), u64_at(b, 8), u32_at(b, 16));
                let max = if kind == FrameKind::Pages { MAX_PAYLOAD } else { MAX_ZERO };
                if len == 0 || len > max || len % PAGE_SIZE as u32 != 0 {
                    return Err(FrameError::Length(len));
                }
                if offset % PAGE_SIZE as u64 != 0 {
                    return Err(FrameError::Unaligned(offset));
                }
                Ok(match kind {
                    FrameKind::Pages => Frame::Pages { region, offset, len },
                    _ => Frame::Zero { region, offset, len },
                })
            }
            FrameKind::BatchEnd => Ok(Frame::BatchEnd { batch: u64_at(b, 8) }),
        }
    }
}

/// A reply from receiver to sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// Every page of the batch is in the receiver's RAM.
    Applied {
        /// The batch id (the RDMA data plane: the write sequence number).
        batch: u64,
    },
    /// A frame was rejected; the receiver closes the stream.
    Rejected {
        /// Why.
        code: RejectCode,
    },
}

impl Reply {
    /// The reply's bytes.
    pub fn encode(&self) -> [u8; REPLY_LEN] {
        let mut b = [0u8; REPLY_LEN];
        match *self {
            Reply::Applied { batch } => {
                b[0] = ReplyKind::Applied.into();
                b[8..].copy_from_slice(&batch.to_le_bytes());
            }
            Reply::Rejected { code } => {
                b[0] = ReplyKind::Rejected.into();
                b[4..8].copy_from_slice(&u32::from(code).to_le_bytes());
            }
        }
        b
    }

    /// Decodes a reply.
    pub fn decode(b: &[u8; REPLY_LEN]) -> Result<Reply, FrameError> {
        match ReplyKind::try_from(b[0]).map_err(|_| FrameError::Kind(b[0]))? {
            ReplyKind::Applied => Ok(Reply::Applied { batch: u64_at(b, 8) }),
            ReplyKind::Rejected => {
                let code = u32_at(b, 4);
                Ok(Reply::Rejected { code: RejectCode::try_from(code).map_err(|_| FrameError::Code(code))? })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn frames_roundtrip() {
        for f in [
            Frame::Pages { region: 3, offset: 8192, len: 4096 },
            Frame::BatchEnd { batch: u64::MAX },
            Frame::Zero { region: 1, offset: 4096, len: MAX_ZERO },
        ] {
            assert_eq!(Frame::decode(&f.encode()), Ok(f));
        }
        let h = Hello::new(Token([9u8; TOKEN_LEN]), 3, StreamMode::Rdma);
        assert_eq!(Hello::decode(&h.encode()), Ok(h));
        assert_eq!(StreamMode::try_from(h.mode), Ok(StreamMode::Rdma));
        for r in [Reply::Applied { batch: 7 }, Reply::Rejected { code: RejectCode::OutOfBounds }] {
            assert_eq!(Reply::decode(&r.encode()), Ok(r));
        }
        assert_eq!(HelloStatus::try_from(4u8), Ok(HelloStatus::NoRdma));
        assert_eq!(HelloStatus::try_from(6u8), Ok(HelloStatus::EncryptionRequired));
        assert!(HelloStatus::try_from(8u8).is_err());
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
        let mut z = Frame::Zero { region: 0, offset: 0, len: 4096 }.encode();
        z[16..20].copy_from_slice(&(MAX_ZERO + 4096).to_le_bytes());
        assert_eq!(Frame::decode(&z), Err(FrameError::Length(MAX_ZERO + 4096)));
        z[16..20].copy_from_slice(&0u32.to_le_bytes());
        assert_eq!(Frame::decode(&z), Err(FrameError::Length(0)));
        let mut r = Reply::Rejected { code: RejectCode::BadFrame }.encode();
        r[4] = 77;
        assert_eq!(Reply::decode(&r), Err(FrameError::Code(77)));
        let mut h = Hello::new(Token([0; TOKEN_LEN]), 0, StreamMode::Tcp).encode();
        h[0] = b'X';
        assert_eq!(Hello::decode(&h), Err(FrameError::Magic));
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::array::uniform24(any::<u8>()), reply in proptest::array::uniform16(any::<u8>())) {
            let _ = Frame::decode(&bytes);
            let _ = Reply::decode(&reply);
        }
    }
}
