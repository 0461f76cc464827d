//! A destination's side of an RDMA stream: its queue pair, the
//! acknowledgements, and the fence when the sender leaves or fails.

use super::device::{attrs, first_time, rdma_err, read_endpoint, source_gid, write_endpoint, Target};
use crate::protocol::data::{HelloStatus, RejectCode, Reply};
use crate::transport::handshake;
use crate::transport::secure::DataStream;
use crate::transport::{Stop, TransportError};
use dcmigrate_rdma::{CompletionKind, QueuePair};
use std::net::IpAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Receives kept posted at a destination (each consumes one WRITE_WITH_IMM).
pub(super) const RECV_DEPTH: u32 = 64;
/// Pairings this process served (for a test hook).
static PAIRINGS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static TARGET_HOOK_FIRED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A destination's side of one RDMA stream (after the hello was checked):
/// acknowledges each batch when its WRITE_WITH_IMM arrives, until the
/// sender leaves or `stop` says so; then nothing more can land.
pub async fn serve(t: &Target, mut s: DataStream, stop: Stop, local: Option<IpAddr>) -> Result<(), TransportError> {
    let device = &t.local.device;
    let gid = source_gid(device, t.gid_fixed, local)?;
    let qp = QueuePair::new(device, gid, 1, RECV_DEPTH, true, t.qp.pkey_index).map_err(rdma_err)?;
    handshake::answer(&mut s, HelloStatus::Ok).await?;
    // A sender cut while it pairs (a fence, the seal) stops here at once:
    // nothing it pairs can land.
    let remote = tokio::select! {
        r = read_endpoint(&mut s) => r?,
        _ = stop.wait() => return Ok(()),
    };
    // The port is asked once: what is used is what is told.
    let port = device.port_info().map_err(rdma_err)?;
    // The version the sender spoke: an MTU only to one that sent its own.
    let mine = qp.endpoint(remote.mtu.map(|_| port.active_mtu));
    let attrs = match attrs(&port, &gid, &remote, &t.qp) {
        Ok(a) => a,
        Err(e) => {
            // The sender then finds the same problem and says it.
            let _ = write_endpoint(&mut s, mine).await;
            return Err(e);
        }
    };
    qp.connect(&remote, &attrs).map_err(rdma_err)?;
    qp.post_recvs(0, RECV_DEPTH).map_err(rdma_err)?;
    // Before the sender hears of the queue pair: not even its probe lands.
    let unreachable = crate::hooks::rdma_unreachable()
        .is_some_and(|from| PAIRINGS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1 >= from);
    if unreachable {
        tracing::warn!("test hook: nothing written to this queue pair arrives");
        let _ = qp.set_error();
    }
    write_endpoint(&mut s, mine).await?;
    tracing::info!(gid_index = gid.index, path_mtu = attrs.path_mtu.bytes(), "RDMA stream paired");
    acknowledge(&qp, s, stop).await
}

/// Acknowledges each batch of a paired queue pair until the sender leaves
/// or `stop` says so; then moves the queue pair to the error state.
async fn acknowledge(qp: &QueuePair, s: DataStream, stop: Stop) -> Result<(), TransportError> {
    let (mut rd, mut wr) = tokio::io::split(s);
    let acks = async {
        let mut received = 0u64;
        loop {
            for c in qp.completions().await.map_err(rdma_err)? {
                let io = |source| TransportError::Io { what: "acknowledging a batch", source };
                match c.result {
                    Ok(CompletionKind::Received { imm }) => {
                        wr.write_all(&Reply::Applied { batch: imm as u64 }.encode()).await.map_err(io)?;
                        wr.flush().await.map_err(io)?;
                        qp.post_recvs(0, 1).map_err(rdma_err)?;
                        received += 1;
                        if crate::hooks::rdma_target_qp_error_after() == Some(received)
                            && first_time(&TARGET_HOOK_FIRED)
                        {
                            tracing::warn!(received, "test hook: moving the queue pair to the error state");
                            let _ = qp.set_error();
                        }
                    }
                    Ok(CompletionKind::Sent) => {}
                    Err(e) => {
                        // Fenced before the sender hears of it, so it may
                        // pair a new queue pair at once.
                        let _ = qp.set_error();
                        let rejected = Reply::Rejected { code: RejectCode::QueuePairFailed };
                        let _ = wr.write_all(&rejected.encode()).await;
                        let _ = wr.flush().await;
                        return Err(TransportError::QueuePair(format!("receive failed: {e}")));
                    }
                }
            }
        }
    };
    // The sender sends nothing more on TCP: reading only notices it leave.
    let gone = async {
        let mut b = [0u8; 1];
        let _ = rd.read(&mut b).await;
        Ok::<(), TransportError>(())
    };
    let r = tokio::select! {
        r = acks => r,
        r = gone => r,
        _ = stop.wait() => Ok(()),
    };
    // Before the fence (or session end) is confirmed: nothing more lands.
    if let Err(e) = qp.set_error() {
        tracing::warn!("fencing a queue pair: {e}");
    }
    r
}
