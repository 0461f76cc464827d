//! Choosing and opening a data plane to one destination: RDMA where both
//! ends can and the migration allows it (saying why not otherwise), else TCP.

use super::queue::{PageSender, StreamSpec};
use super::rdma::Rdma;
use super::{rdma, tcp, TransportError};
use crate::protocol::{RdmaRegion, TransportKind};
use std::sync::Arc;
use thiserror::Error;

/// What choosing a data plane needs beyond the streams themselves.
pub struct SenderSpec<'a> {
    /// The destination's name, for messages.
    pub host: &'a str,
    /// What the migration allows.
    pub transport: TransportKind,
    /// This host's RDMA device, or why there is none.
    pub rdma: &'a Result<Arc<Rdma>, String>,
    /// The destination's registered RAM, if it offers RDMA.
    pub offer: Option<&'a [RdmaRegion]>,
    /// The queue-pair endpoint version the destination reads.
    pub rdma_endpoint: u8,
    /// The streams.
    pub streams: StreamSpec,
}

/// No data plane could be opened.
#[derive(Debug, Error)]
pub enum OpenError {
    /// `--transport rdma` and RDMA is not possible.
    #[error("--transport rdma: no RDMA to {host}: {why}")]
    RdmaRequired {
        /// The destination.
        host: String,
        /// Why not.
        why: String,
    },
    /// The TCP streams could not be opened.
    #[error("data streams to {host}")]
    Tcp {
        /// The destination.
        host: String,
        /// What failed.
        #[source]
        source: TransportError,
    },
}

/// Opens the data plane to a destination.
pub async fn open_sender(spec: SenderSpec<'_>) -> Result<Box<dyn PageSender>, OpenError> {
    let host = spec.host;
    let mut why_not_rdma = None;
    if spec.transport != TransportKind::Tcp {
        let why_not = match (spec.rdma, spec.offer) {
            (Err(e), _) => format!("not on this host: {e}"),
            (Ok(_), None) => format!("{host} offers no RDMA"),
            (Ok(r), Some(offer)) => {
                let fallback = spec.transport == TransportKind::Auto;
                match rdma::connect(r, spec.streams.clone(), offer, spec.rdma_endpoint, fallback).await {
                    Ok(q) => {
                        tracing::info!(to = host, device = %r.name(), "data plane: RDMA");
                        return Ok(Box::new(q));
                    }
                    Err(e) => format!("connecting: {}", crate::error_chain(&e)),
                }
            }
        };
        if spec.transport == TransportKind::Rdma {
            return Err(OpenError::RdmaRequired { host: host.to_owned(), why: why_not });
        }
        tracing::info!(to = host, "data plane: TCP (no RDMA: {why_not})");
        why_not_rdma = Some(why_not);
    }
    let mut q = tcp::connect(spec.streams).await.map_err(|source| OpenError::Tcp { host: host.to_owned(), source })?;
    q.why_not_rdma = why_not_rdma;
    Ok(Box::new(q))
}
