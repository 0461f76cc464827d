//! Agent-to-agent control connections: mutual TLS plus the protocol
//! handshake, which also checks that a peer's claimed host name is one its
//! CA-signed certificate was issued for.

use crate::protocol::{read_message, write_message, Message, ProtocolError, VERSION};
use crate::tls::{cert_host_names, TlsConfig};
use rustls::pki_types::ServerName;
use std::net::SocketAddr;
use std::time::Duration;
use thiserror::Error;
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

pub type ClientStream = tokio_rustls::client::TlsStream<TcpStream>;
pub type ServerStream = tokio_rustls::server::TlsStream<TcpStream>;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Control sessions can be idle for long (a forwarder, a destination during
/// long rounds); keepalive makes a vanished peer end them within ~25 s, so
/// a destination discards a session whose source is gone.
pub fn keepalive(tcp: &TcpStream) {
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(10))
        .with_interval(Duration::from_secs(5))
        .with_retries(3);
    if let Err(e) = socket2::SockRef::from(tcp).set_tcp_keepalive(&ka) {
        tracing::warn!("TCP keepalive: {e}");
    }
}

#[derive(Debug, Error)]
pub enum PeerError {
    #[error("unknown host {0:?} (not in this agent's --peer list)")]
    UnknownHost(String),
    #[error("connecting to {host} at {addr}: {source}")]
    Connect { host: String, addr: SocketAddr, source: std::io::Error },
    #[error("TLS with {host}: {source}")]
    Tls { host: String, source: std::io::Error },
    #[error("handshake with {host}: {source}")]
    Protocol { host: String, source: ProtocolError },
    #[error("peer claims to be {claimed:?} but its certificate is for {names:?}")]
    Identity { claimed: String, names: Vec<String> },
    #[error("{host} did not answer within {0:?}", HANDSHAKE_TIMEOUT)]
    Timeout { host: String },
}

/// Connects to `host` at `addr` as `me`.
pub async fn connect(tls: &TlsConfig, me: &str, host: &str, addr: SocketAddr) -> Result<ClientStream, PeerError> {
    let fut = async {
        let tcp =
            TcpStream::connect(addr).await.map_err(|source| PeerError::Connect { host: host.into(), addr, source })?;
        tcp.set_nodelay(true).ok();
        keepalive(&tcp);
        let name = ServerName::try_from(host.to_owned()).map_err(|_| PeerError::UnknownHost(host.into()))?;
        let mut s = TlsConnector::from(tls.client.clone())
            .connect(name, tcp)
            .await
            .map_err(|source| PeerError::Tls { host: host.into(), source })?;
        let proto = |source| PeerError::Protocol { host: host.into(), source };
        write_message(&mut s, &Message::Hello { version: VERSION, host: me.into() }).await.map_err(proto)?;
        match read_message(&mut s).await.map_err(proto)? {
            Message::Welcome { version, .. } if version == VERSION => Ok(s),
            Message::Welcome { version, .. } => Err(proto(ProtocolError::Version(version))),
            other => Err(proto(ProtocolError::Unexpected(other.name()))),
        }
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, fut).await.map_err(|_| PeerError::Timeout { host: host.into() })?
}

/// Accepts a peer; returns the stream and the peer's verified host name.
pub async fn accept(tls: &TlsConfig, me: &str, tcp: TcpStream) -> Result<(ServerStream, String), PeerError> {
    keepalive(&tcp);
    let fut = async {
        let addr = tcp.peer_addr().map(|a| a.to_string()).unwrap_or_default();
        let mut s = TlsAcceptor::from(tls.server.clone())
            .accept(tcp)
            .await
            .map_err(|source| PeerError::Tls { host: addr.clone(), source })?;
        let proto = |source| PeerError::Protocol { host: addr.clone(), source };
        let (version, claimed) = match read_message(&mut s).await.map_err(proto)? {
            Message::Hello { version, host } => (version, host),
            other => return Err(proto(ProtocolError::Unexpected(other.name()))),
        };
        let names = s.get_ref().1.peer_certificates().and_then(|c| c.first()).map(cert_host_names).unwrap_or_default();
        if !names.contains(&claimed) {
            return Err(PeerError::Identity { claimed, names });
        }
        if version != VERSION {
            let _ = write_message(
                &mut s,
                &Message::Error {
                    message: format!("protocol version {version} not supported, this agent speaks {VERSION}"),
                },
            )
            .await;
            return Err(proto(ProtocolError::Version(version)));
        }
        write_message(&mut s, &Message::Welcome { version: VERSION, host: me.into() }).await.map_err(proto)?;
        Ok((s, claimed))
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, fut)
        .await
        .map_err(|_| PeerError::Timeout { host: "incoming peer".into() })?
}
