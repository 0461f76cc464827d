//! Encrypted data streams: TLS 1.3 with the agents' own mTLS identities
//! (the control channel's CA and certificates), so that neither pages nor
//! the session token can be read on the path, and a stream's sender is a
//! host this one accepts, not just someone who saw a token. A receiver tells
//! a TLS stream from a plain one by its first byte; whether it takes plain
//! ones is its operator's choice (`--data-encryption`).

use super::{TransportError, HANDSHAKE_TIMEOUT};
use crate::tls::cert_host_names;
use rustls::pki_types::ServerName;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// What a data stream can be: plain TCP or TLS over it.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A data stream, encrypted or not.
pub type DataStream = Box<dyn Io>;

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
    /// This host's server identity (requires a CA-signed client certificate).
    pub config: Arc<rustls::ServerConfig>,
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

fn tls_err(source: std::io::Error) -> TransportError {
    TransportError::Io { what: "TLS on a data stream", source }
}

/// The sending end: TLS to `tls.host` over `tcp`, within the handshake deadline.
pub async fn client(tcp: TcpStream, tls: &ClientTls) -> Result<DataStream, TransportError> {
    let name = ServerName::try_from(tls.host.clone())
        .map_err(|_| tls_err(std::io::Error::other(format!("invalid host name {:?}", tls.host))))?;
    let s = tokio::time::timeout(HANDSHAKE_TIMEOUT, TlsConnector::from(tls.config.clone()).connect(name, tcp))
        .await
        .map_err(|_| TransportError::Timeout { what: "the TLS handshake of a data stream" })?
        .map_err(tls_err)?;
    Ok(Box::new(s))
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
        return Ok(Accepted { stream: Box::new(tcp), peer: None });
    }
    let Some(tls) = tls else {
        return Err(tls_err(std::io::Error::other("this receiver has no TLS identity")));
    };
    let s = tokio::time::timeout(HANDSHAKE_TIMEOUT, TlsAcceptor::from(tls.config.clone()).accept(tcp))
        .await
        .map_err(|_| TransportError::Timeout { what: "the TLS handshake of a data stream" })?
        .map_err(tls_err)?;
    let names = s.get_ref().1.peer_certificates().and_then(|c| c.first()).map(cert_host_names).unwrap_or_default();
    match names.iter().find(|n| (tls.allowed)(n)) {
        Some(peer) => Ok(Accepted { peer: Some(peer.clone()), stream: Box::new(s) }),
        None => Err(TransportError::NotAPeer(names)),
    }
}
