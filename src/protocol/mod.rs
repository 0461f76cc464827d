//! The agent-to-agent control protocol: versioned messages over a mutually
//! authenticated TLS stream, framed as a big-endian u32 length and JSON.
//! It carries session setup, checksums, device state and switchover; never
//! bulk pages (those go over the data plane, see [`data`]).
//!
//! ```text
//!  source agent (S)                               destination agent (D)
//!   | --- Hello{version, host} ------------------------> |  cert checked against CA,
//!   | <-- Welcome{version, host} ----------------------- |  host name against cert
//!   | --- OpenSession{vm, regions, launch} ------------> |  create + map RAM files,
//!   | <-- SessionOpened{data_port, token, rdma?} ------- |  launch incoming VM paused
//!   |     (rdma: its RAM registered for RDMA writes: addresses and keys)
//!   | === data streams: hello(token), pages, batch ends ===> (acks <===)
//!   |        ... rounds of dirty pages ...               |
//!   |  [pause VM, final round]                           |
//!   | --- ChecksumRequest ------------------------------> |
//!   | <-- Checksums{per chunk} ------------------------- |  (mismatching chunks resent)
//!   | --- DeviceState{state} --------------------------> |  loaded into incoming VM
//!   | <-- Ok ------------------------------------------- |
//!   | --- Resume{start} -------------------------------> |  VM runs on D now
//!   | <-- Resumed -------------------------------------- |
//!   |  [stop VM on S]                                    |
//!   | --- Abort{reason} (any time before Resume) ------> |  discard RAM and VM
//! ```
//! A control connection that closes before `Resume` aborts the session on D.
//!
//! Retarget from O to N: S opens a session on N as above, then turns O into
//! a forwarder of what it holds. S stays the coordinator: it decides, chunk
//! by chunk, which pages O sends (the ledger's one-writer rule applies to
//! them as to S's own), and O reports each batch once N acknowledged it.
//! ```text
//!  S                                   O (old destination)             N
//!   | --- ForwardTo{N's data addr, token,  --> | === data streams (token) ===> |
//!   |      N's RDMA regions?}                  |   (TCP frames, or RDMA writes) |
//!   | <-- ForwardReady{transport} ------------ |                              |
//!   | --- Forward{batch, page runs} ---------> | === pages, batch end =======> |
//!   | <-- Forwarded{batch, applied, bytes} --- | <== applied ================= |
//!   |        ... while S sends what only S has to N directly ...            |
//!   | --- Abort{"no longer needed"} ---------> |  O discards its RAM and VM    |
//! ```
//! If a forward fails, S first has N fence O's streams (`Fence`), and only
//! then lets anyone else write those pages.

pub mod data;

use crate::memory::RegionSpec;
use crate::vm::LaunchSpec;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub const VERSION: u32 = 1;
/// Control messages are small; anything bigger is refused before allocation.
pub const MAX_MESSAGE: usize = 64 << 20;

#[derive(Debug, Error)]
pub enum ProtocolError {
    #[error("connection closed")]
    Closed,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("message of {0} bytes exceeds the limit")]
    TooLarge(usize),
    #[error("malformed message: {0}")]
    Decode(String),
    #[error("peer speaks protocol version {0}, this agent {VERSION}")]
    Version(u32),
    #[error("unexpected message: {0}")]
    Unexpected(String),
    #[error("peer error: {0}")]
    Peer(String),
}

#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    Hello {
        version: u32,
        host: String,
    },
    Welcome {
        version: u32,
        host: String,
    },
    OpenSession {
        vm: String,
        regions: Vec<RegionSpec>,
        chunk_size: u64,
        launch: LaunchSpec,
    },
    SessionOpened {
        data_port: u16,
        token: String,
        /// The destination's RAM registered for RDMA writes, if it offers RDMA.
        #[serde(default)]
        rdma: Option<Vec<crate::transport::rdma::RdmaRegion>>,
    },
    ChecksumRequest,
    Checksums {
        sums: Vec<u64>,
    },
    DeviceState {
        /// base64
        state: String,
    },
    Resume {
        /// false: leave the VM paused on the destination (`--suspend`).
        start: bool,
    },
    Resumed,
    Abort {
        reason: String,
    },
    /// S to an old destination: open data streams to the new one, as
    /// sender `sender` (its host id in the migration).
    ForwardTo {
        host: String,
        data_addr: std::net::SocketAddr,
        token: String,
        streams: usize,
        sender: u8,
        /// The new destination's registered RAM, if it offers RDMA.
        #[serde(default)]
        rdma: Option<Vec<crate::transport::rdma::RdmaRegion>>,
        #[serde(default)]
        transport: crate::transport::TransportKind,
    },
    /// A forwarder's answer to `ForwardTo`: its streams are open.
    ForwardReady {
        transport: String,
    },
    /// S to a forwarder: send these page runs (global page, count) to `to`.
    /// Answered by `Forwarded` once `to` applied them; refused if the
    /// forwarder is not (or no longer) forwarding to `to`.
    Forward {
        batch: u64,
        to: String,
        runs: Vec<(usize, usize)>,
    },
    /// S to the destination: cut every data stream of `sender` and answer
    /// `Ok` once none of its frames can still be written. After a sender
    /// failed, its last frames could otherwise land on top of newer pages.
    Fence {
        sender: u8,
    },
    Forwarded {
        batch: u64,
        applied: bool,
        #[serde(default)]
        error: Option<String>,
        /// Payload bytes this forwarder has sent so far.
        bytes: u64,
    },
    Ok,
    Error {
        message: String,
    },
}

impl Message {
    pub fn name(&self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v.get("type").and_then(|t| t.as_str()).map(str::to_owned))
            .unwrap_or_default()
    }
}

pub async fn write_message<W: AsyncWrite + Unpin>(w: &mut W, m: &Message) -> Result<(), ProtocolError> {
    let body = serde_json::to_vec(m).map_err(|e| ProtocolError::Decode(e.to_string()))?;
    if body.len() > MAX_MESSAGE {
        return Err(ProtocolError::TooLarge(body.len()));
    }
    w.write_all(&(body.len() as u32).to_be_bytes()).await?;
    w.write_all(&body).await?;
    w.flush().await?;
    Ok(())
}

pub async fn read_message<R: AsyncRead + Unpin>(r: &mut R) -> Result<Message, ProtocolError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(ProtocolError::Closed),
        r => r?,
    };
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_MESSAGE {
        return Err(ProtocolError::TooLarge(len));
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body).await?;
    let m: Message = serde_json::from_slice(&body).map_err(|e| ProtocolError::Decode(e.to_string()))?;
    if let Message::Error { message } = m {
        return Err(ProtocolError::Peer(message));
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn roundtrip_and_limits() {
        let (mut a, mut b) = tokio::io::duplex(1 << 20);
        write_message(&mut a, &Message::Resume { start: true }).await.unwrap();
        assert!(matches!(read_message(&mut b).await.unwrap(), Message::Resume { start: true }));
        a.write_all(&(u32::MAX).to_be_bytes()).await.unwrap();
        assert!(matches!(read_message(&mut b).await, Err(ProtocolError::TooLarge(_))));
        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(&3u32.to_be_bytes()).await.unwrap();
        a.write_all(b"{x}").await.unwrap();
        assert!(matches!(read_message(&mut b).await, Err(ProtocolError::Decode(_))));
        drop(a);
        assert!(matches!(read_message(&mut b).await, Err(ProtocolError::Closed)));
    }
}
