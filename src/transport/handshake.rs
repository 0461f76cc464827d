//! Opening a data stream, both ends: the sender dials and says hello (the
//! session token, its host id, the stream's mode); the receiver reads the
//! hello and answers with a [`HelloStatus`]. Every step has a deadline.

use super::secure::{self, ClientTls, DataStream};
use super::TransportError;
use crate::protocol::data::{Hello, HelloStatus, HELLO_LEN};
use std::net::SocketAddr;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

pub use super::HANDSHAKE_TIMEOUT;

/// A data-plane connection to `addr` (no Nagle delay).
pub async fn dial(addr: SocketAddr) -> Result<TcpStream, TransportError> {
    let s = tokio::time::timeout(HANDSHAKE_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| TransportError::Timeout { what: "connecting a data stream" })?
        .map_err(|source| TransportError::Connect { addr, source })?;
    s.set_nodelay(true).ok();
    Ok(s)
}

/// Dials `addr` (over TLS when `tls` is given) and says `hello`; returns
/// the stream once the receiver accepted it.
pub async fn open(addr: SocketAddr, hello: Hello, tls: Option<&ClientTls>) -> Result<DataStream, TransportError> {
    open_from(addr, hello, tls).await.map(|(s, _)| s)
}

/// Like [`open`], also saying which local address the connection left from.
pub async fn open_from(
    addr: SocketAddr,
    hello: Hello,
    tls: Option<&ClientTls>,
) -> Result<(DataStream, Option<std::net::IpAddr>), TransportError> {
    let tcp = dial(addr).await?;
    let local = tcp.local_addr().ok().map(|a| a.ip());
    let mut s = match tls {
        Some(t) => secure::client(tcp, t).await?,
        None => DataStream::plain(tcp),
    };
    let io = |what| move |source| TransportError::Io { what, source };
    s.write_all(&hello.encode()).await.map_err(io("sending the hello"))?;
    s.flush().await.map_err(io("sending the hello"))?;
    let mut status = [0u8; 1];
    tokio::time::timeout(HANDSHAKE_TIMEOUT, s.read_exact(&mut status))
        .await
        .map_err(|_| TransportError::Timeout { what: "the receiver's answer to the hello" })?
        .map_err(io("reading the receiver's answer"))?;
    match HelloStatus::try_from(status[0]) {
        Ok(HelloStatus::Ok) => Ok((s, local)),
        Ok(refused) => Err(TransportError::Refused(refused)),
        Err(_) => Err(TransportError::Status(status[0])),
    }
}

/// Reads a sender's hello (within the deadline).
pub async fn read_hello(s: &mut (impl AsyncRead + Unpin)) -> Result<Hello, TransportError> {
    let mut b = [0u8; HELLO_LEN];
    tokio::time::timeout(HANDSHAKE_TIMEOUT, s.read_exact(&mut b))
        .await
        .map_err(|_| TransportError::Timeout { what: "a data stream's hello" })?
        .map_err(|source| TransportError::Io { what: "reading a hello", source })?;
    Ok(Hello::decode(&b)?)
}

/// Answers a hello.
pub async fn answer(s: &mut (impl AsyncWrite + Unpin), status: HelloStatus) -> Result<(), TransportError> {
    let io = |source| TransportError::Io { what: "answering a hello", source };
    s.write_all(&[status.into()]).await.map_err(io)?;
    s.flush().await.map_err(io)
}
