//! Encrypted data streams: TLS 1.3 with the agents' own mTLS identities
//! (the control channel's CA and certificates), so that neither pages nor
//! the session token can be read on the path, and a stream's sender is a
//! host this one accepts, not just someone who saw a token. A receiver tells
//! a TLS stream from a plain one by its first byte; whether it takes plain
//! ones is its operator's choice (`--data-encryption`). When both ends
//! offer it, the stream leaves TLS's records for sealed ones after the
//! handshake ([`super::seal`]): the receiver then sends a first record, and
//! the sender waits for it before it says anything, so that no byte of the
//! new records can be left behind in TLS's buffers.

use super::seal::{self, SealedReader, SealedWriter, ALPN_SEALED};
use super::{TransportError, HANDSHAKE_TIMEOUT};
use crate::tls::cert_host_names;
use rustls::pki_types::ServerName;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// What a data stream can be: plain TCP or TLS over it.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A data stream: plain, TLS, or sealed records after a TLS handshake.
pub enum DataStream {
    /// Plain TCP, or TLS's own records.
    Stream(Box<dyn Io>),
    /// Sealed records (both ends offered them).
    Sealed(Box<Sealed>),
}

/// Both directions of a sealed stream.
pub struct Sealed {
    /// What the peer sends.
    pub rd: SealedReader<OwnedReadHalf>,
    /// What this end sends.
    pub wr: SealedWriter<OwnedWriteHalf>,
}

/// The reading half of a [`DataStream`].
pub enum DataReader {
    /// Plain or TLS.
    Stream(tokio::io::ReadHalf<Box<dyn Io>>),
    /// Sealed records.
    Sealed(Box<SealedReader<OwnedReadHalf>>),
}

/// The writing half of a [`DataStream`].
pub enum DataWriter {
    /// Plain or TLS.
    Stream(tokio::io::WriteHalf<Box<dyn Io>>),
    /// Sealed records.
    Sealed(Box<SealedWriter<OwnedWriteHalf>>),
}

impl DataStream {
    /// A plain stream.
    pub fn plain(tcp: TcpStream) -> Self {
        DataStream::Stream(Box::new(tcp))
    }

    /// Its two halves, each usable on its own.
    pub fn split(self) -> (DataReader, DataWriter) {
        match self {
            DataStream::Stream(s) => {
                let (r, w) = tokio::io::split(s);
                (DataReader::Stream(r), DataWriter::Stream(w))
            }
            DataStream::Sealed(s) => (DataReader::Sealed(Box::new(s.rd)), DataWriter::Sealed(Box::new(s.wr))),
        }
    }
}

impl DataWriter {
    /// Writes one frame, `buf[seal::PREFIX..]`: a record of its own on a
    /// sealed stream, sealed in place (`buf` is then the sealed record).
    pub async fn write_frame(&mut self, buf: &mut Vec<u8>) -> std::io::Result<()> {
        match self {
            DataWriter::Stream(w) => w.write_all(&buf[seal::PREFIX..]).await,
            DataWriter::Sealed(w) => w.write_record(buf).await,
        }
    }
}

impl AsyncRead for DataStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            DataStream::Stream(s) => Pin::new(s).poll_read(cx, buf),
            DataStream::Sealed(s) => Pin::new(&mut s.rd).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for DataStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            DataStream::Stream(s) => Pin::new(s).poll_write(cx, buf),
            DataStream::Sealed(s) => Pin::new(&mut s.wr).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            DataStream::Stream(s) => Pin::new(s).poll_flush(cx),
            DataStream::Sealed(s) => Pin::new(&mut s.wr).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            DataStream::Stream(s) => Pin::new(s).poll_shutdown(cx),
            DataStream::Sealed(s) => Pin::new(&mut s.wr).poll_shutdown(cx),
        }
    }
}

impl AsyncRead for DataReader {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            DataReader::Stream(s) => Pin::new(s).poll_read(cx, buf),
            DataReader::Sealed(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for DataWriter {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            DataWriter::Stream(s) => Pin::new(s).poll_write(cx, buf),
            DataWriter::Sealed(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            DataWriter::Stream(s) => Pin::new(s).poll_flush(cx),
            DataWriter::Sealed(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            DataWriter::Stream(s) => Pin::new(s).poll_shutdown(cx),
            DataWriter::Sealed(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

/// A TLS record carrying a handshake starts with this byte; a plain stream
/// starts with the hello's magic (`DCMD`).
const TLS_HANDSHAKE: u8 = 0x16;

/// What a sender needs to encrypt its streams to one destination.
#[derive(Clone)]
pub struct ClientTls {
    /// This host's client identity (the CA it trusts, its certificate).
    pub config: Arc<rustls::ClientConfig>,
    /// The destination's name, which its certificate must carry.
    pub host: String,
}

/// A receiver's encryption policy.
#[derive(Clone)]
pub struct ServerTls {
    /// This host's identity (its server side requires a CA-signed client
    /// certificate), as it is when a stream comes in.
    pub config: crate::tls::SharedTls,
    /// Plain streams are refused.
    pub required: bool,
    /// Which certified host names may send data here.
    pub allowed: Arc<dyn Fn(&str) -> bool + Send + Sync>,
}

/// An accepted stream and, if it is encrypted, the sender's verified name.
pub struct Accepted {
    /// The stream, ready for the hello.
    pub stream: DataStream,
    /// The sender, when the stream is TLS.
    pub peer: Option<String>,
}

/// Bytes read from the socket at a time under TLS.
const READ_BUFFER: usize = 256 << 10;

/// rustls reads at most 4 KiB per call: unbuffered, a stream of pages
/// costs a read syscall per 4 KiB, which halved one stream's throughput.
fn buffered(tcp: TcpStream) -> tokio::io::BufReader<TcpStream> {
    tokio::io::BufReader::with_capacity(READ_BUFFER, tcp)
}

fn tls_err(source: std::io::Error) -> TransportError {
    TransportError::Io { what: "TLS on a data stream", source }
}

/// The sending end: TLS to `tls.host` over `tcp`, within the handshake deadline.
pub async fn client(tcp: TcpStream, tls: &ClientTls) -> Result<DataStream, TransportError> {
    let name = ServerName::try_from(tls.host.clone())
        .map_err(|_| tls_err(std::io::Error::other(format!("invalid host name {:?}", tls.host))))?;
    let mut config = (*tls.config).clone();
    config.alpn_protocols = vec![ALPN_SEALED.to_vec()];
    let s = tokio::time::timeout(HANDSHAKE_TIMEOUT, TlsConnector::from(Arc::new(config)).connect(name, buffered(tcp)))
        .await
        .map_err(|_| TransportError::Timeout { what: "the TLS handshake of a data stream" })?
        .map_err(tls_err)?;
    if !sealing(s.get_ref().1.alpn_protocol(), s.get_ref().1.protocol_version()) {
        return Ok(DataStream::Stream(Box::new(s))); // a receiver that keeps TLS's records
    }
    let keys = exported(s.get_ref().1.export_keying_material([0u8; 64], seal::EXPORTER_LABEL, None))?;
    let (io, conn) = s.into_inner();
    let mut sealed = switch(io, keys, true, conn.wants_write())?;
    // The receiver's first record: from here on, only sealed records.
    let mut ready = [0u8; 1];
    tokio::time::timeout(HANDSHAKE_TIMEOUT, sealed.rd.read_exact(&mut ready))
        .await
        .map_err(|_| TransportError::Timeout { what: "the receiver's first sealed record" })?
        .map_err(tls_err)?;
    if ready != READY {
        return Err(tls_err(std::io::Error::other("the receiver's first sealed record is not the expected one")));
    }
    Ok(DataStream::Sealed(Box::new(sealed)))
}

/// Whether a finished handshake switches to sealed records: both ends
/// offered them, over TLS 1.3 (in 1.2 the server speaks last in the
/// handshake, so its first record could reach rustls's buffers).
fn sealing(alpn: Option<&[u8]>, version: Option<rustls::ProtocolVersion>) -> bool {
    alpn == Some(ALPN_SEALED) && version == Some(rustls::ProtocolVersion::TLSv1_3)
}

/// What a receiver's first sealed record holds.
const READY: [u8; 1] = [1];

/// 64 bytes of key material exported from a finished TLS session.
fn exported(material: Result<[u8; 64], rustls::Error>) -> Result<[u8; 64], TransportError> {
    material.map_err(|e| tls_err(std::io::Error::other(format!("exporting keys: {e}"))))
}

/// Leaves TLS for sealed records on `io`, which must hold no unread bytes
/// and `rustls` no unsent ones (the protocol's order makes sure of it).
fn switch(
    io: tokio::io::BufReader<TcpStream>,
    material: [u8; 64],
    client: bool,
    unsent: bool,
) -> Result<Sealed, TransportError> {
    if unsent || !io.buffer().is_empty() {
        return Err(tls_err(std::io::Error::other("bytes left over from the TLS handshake")));
    }
    let (seal, open) = seal::keys(&material, client);
    let (rd, wr) = io.into_inner().into_split();
    Ok(Sealed { rd: SealedReader::new(rd, open), wr: SealedWriter::new(wr, seal) })
}

/// The receiving end: TLS if the sender starts it (needs a policy), else
/// the plain stream; the caller refuses a plain one if its policy says so.
pub async fn server(tcp: TcpStream, tls: Option<&ServerTls>) -> Result<Accepted, TransportError> {
    let mut first = [0u8; 1];
    let n = tokio::time::timeout(HANDSHAKE_TIMEOUT, tcp.peek(&mut first))
        .await
        .map_err(|_| TransportError::Timeout { what: "a data stream's first byte" })?
        .map_err(|source| TransportError::Io { what: "reading a data stream", source })?;
    if n == 0 || first[0] != TLS_HANDSHAKE {
        return Ok(Accepted { stream: DataStream::plain(tcp), peer: None });
    }
    let Some(tls) = tls else {
        return Err(tls_err(std::io::Error::other("this receiver has no TLS identity")));
    };
    let mut config = (*tls.config.current().server).clone();
    config.alpn_protocols = vec![ALPN_SEALED.to_vec()];
    // No session tickets: they would follow the handshake in TLS records.
    config.send_tls13_tickets = 0;
    let s = tokio::time::timeout(HANDSHAKE_TIMEOUT, TlsAcceptor::from(Arc::new(config)).accept(buffered(tcp)))
        .await
        .map_err(|_| TransportError::Timeout { what: "the TLS handshake of a data stream" })?
        .map_err(tls_err)?;
    let names = s.get_ref().1.peer_certificates().and_then(|c| c.first()).map(cert_host_names).unwrap_or_default();
    let Some(peer) = names.iter().find(|n| (tls.allowed)(n)).cloned() else {
        return Err(TransportError::NotAPeer(names));
    };
    if !sealing(s.get_ref().1.alpn_protocol(), s.get_ref().1.protocol_version()) {
        return Ok(Accepted { peer: Some(peer), stream: DataStream::Stream(Box::new(s)) });
    }
    let keys = exported(s.get_ref().1.export_keying_material([0u8; 64], seal::EXPORTER_LABEL, None))?;
    let (io, conn) = s.into_inner();
    let mut sealed = switch(io, keys, false, conn.wants_write())?;
    sealed.wr.write_all(&READY).await.map_err(tls_err)?;
    sealed.wr.flush().await.map_err(tls_err)?;
    Ok(Accepted { peer: Some(peer), stream: DataStream::Sealed(Box::new(sealed)) })
}
