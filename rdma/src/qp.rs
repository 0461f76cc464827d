//! Reliable-connected queue pairs: endpoint exchange, posting writes, and
//! event-driven completion polling.

use crate::{chain, Device, PathMtu, QpAttrs, RdmaError, SourceGid};
use rdma_mummy_sys::{ibv_ack_cq_events, ibv_cq, ibv_get_cq_event, ibv_req_notify_cq, ibv_sge};
use sideway::ibverbs::address::{AddressHandleAttribute, Gid};
use sideway::ibverbs::completion::{
    BasicCompletionQueue, CompletionChannel, CompletionQueue, PollCompletionQueueError, WorkCompletionOperationType,
    WorkCompletionStatus,
};
use sideway::ibverbs::device_context::Mtu;
use sideway::ibverbs::queue_pair::{
    BasicQueuePair, PostSendGuard, QueuePair as _, QueuePairAttribute, QueuePairState, QueuePairType,
    SetScatterGatherEntry, WorkRequestFlags,
};
use sideway::ibverbs::AccessFlags;
use std::sync::{Arc, Mutex};
use tokio::io::unix::AsyncFd;

pub const ENDPOINT_LEN: usize = 32;

fn verr(op: &'static str, e: &dyn std::error::Error) -> RdmaError {
    RdmaError::Verbs { op, msg: chain(e) }
}

/// What a peer needs to connect its queue pair to ours.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub qpn: u32,
    pub psn: u32,
    pub lid: u16,
    pub gid: [u8; 16],
    /// The port's active MTU (version 1); None: an endpoint of version 0,
    /// from a peer that uses 1024.
    pub mtu: Option<PathMtu>,
}

impl Endpoint {
    /// `qpn u32 | psn u32 | lid u16 | 0 [2] | gid [16] | version u8 | mtu u8 | 0 [2]`,
    /// little-endian. Version 0 (no MTU) is what peers before version 1
    /// send and accept: send version 1 only to a peer known to read it.
    pub fn encode(&self) -> [u8; ENDPOINT_LEN] {
        let mut b = [0u8; ENDPOINT_LEN];
        b[..4].copy_from_slice(&self.qpn.to_le_bytes());
        b[4..8].copy_from_slice(&self.psn.to_le_bytes());
        b[8..10].copy_from_slice(&self.lid.to_le_bytes());
        b[12..28].copy_from_slice(&self.gid);
        if let Some(m) = self.mtu {
            b[28] = 1;
            b[29] = m.code();
        }
        b
    }

    /// Decodes a peer's endpoint (either version); queue pair numbers and
    /// PSNs are 24-bit, reserved bytes zero.
    pub fn decode(b: &[u8; ENDPOINT_LEN]) -> Result<Self, RdmaError> {
        let u = |r: std::ops::Range<usize>| u32::from_le_bytes(b[r].try_into().expect("4 bytes"));
        let (qpn, psn) = (u(0..4), u(4..8));
        let mtu = match (b[28], b[29]) {
            (0, 0) => Ok(None),
            (1, code) => PathMtu::from_code(code).map(Some).ok_or(()),
            _ => Err(()),
        };
        let bad = qpn == 0 || qpn >= 1 << 24 || psn >= 1 << 24 || b[10..12] != [0, 0] || b[30..] != [0; 2];
        match mtu {
            Ok(mtu) if !bad => Ok(Self {
                qpn,
                psn,
                lid: u16::from_le_bytes([b[8], b[9]]),
                gid: b[12..28].try_into().expect("16 bytes"),
                mtu,
            }),
            _ => Err(RdmaError::Endpoint(format!("qpn {qpn:#x}, psn {psn:#x}, version {}, mtu code {}", b[28], b[29]))),
        }
    }
}

/// One RDMA WRITE of a contiguous run.
#[derive(Clone, Copy, Debug)]
pub struct Write {
    pub local_addr: u64,
    pub len: u32,
    pub lkey: u32,
    pub remote_addr: u64,
    pub rkey: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompletionKind {
    /// A signaled send-side request finished (the batch left; not yet applied remotely).
    Sent,
    /// A WRITE_WITH_IMM arrived: every earlier write on this queue pair is in our memory.
    Received { imm: u32 },
}

#[derive(Debug)]
pub struct Completion {
    pub wr_id: u64,
    pub result: Result<CompletionKind, String>,
}

/// A reliable-connected queue pair with its own completion queue, whose
/// completion channel is waited on with tokio.
pub struct QueuePair {
    // Field order is drop order: the queue pair before its completion queue.
    qp: Mutex<BasicQueuePair>,
    cq: Arc<BasicCompletionQueue>,
    events: AsyncFd<Arc<CompletionChannel>>,
    dev: Arc<Device>,
    gid: SourceGid,
    psn: u32,
}

impl QueuePair {
    /// A queue pair in INIT state; `remote_write` lets the peer write into
    /// this side's registered memory (a receiver's), else the peer may not
    /// touch it (a sender's); its packets leave from `gid`. Must be called
    /// inside a tokio runtime.
    pub fn new(
        dev: &Arc<Device>,
        gid: SourceGid,
        send_depth: u32,
        recv_depth: u32,
        remote_write: bool,
        pkey_index: u16,
    ) -> Result<Self, RdmaError> {
        let ch = dev.ctx.create_comp_channel().map_err(|e| verr("ibv_create_comp_channel", &e))?;
        ch.set_nonblocking(true).map_err(|e| verr("completion channel", &e))?;
        let cq = dev
            .ctx
            .create_cq_builder()
            .setup_cqe(send_depth + recv_depth + 1)
            .setup_comp_channel(&ch, 0)
            .build()
            .map_err(|e| verr("ibv_create_cq", &e))?;
        let qp = dev
            .pd
            .create_qp_builder()
            .setup_qp_type(QueuePairType::ReliableConnection)
            .setup_max_send_wr(send_depth)
            .setup_max_recv_wr(recv_depth.max(1))
            .setup_max_send_sge(1)
            .setup_max_recv_sge(1)
            .setup_send_cq(Arc::clone(&cq))
            .setup_recv_cq(Arc::clone(&cq))
            .build()
            .map_err(|e| verr("ibv_create_qp", &e))?;
        // SAFETY: the channel's fd stays open while registered: `events` holds the Arc.
        let events = unsafe { AsyncFd::register_with_interest(Arc::clone(&ch), tokio::io::Interest::READABLE) }
            .map_err(|e| RdmaError::Verbs { op: "registering the completion channel", msg: e.to_string() })?;
        let me = Self { qp: Mutex::new(qp), cq, events, dev: dev.clone(), gid, psn: rand::random::<u32>() & 0xff_ffff };
        let mut a = QueuePairAttribute::new();
        a.setup_state(QueuePairState::Init).setup_pkey_index(pkey_index).setup_port(dev.port).setup_access_flags(
            if remote_write { AccessFlags::LocalWrite | AccessFlags::RemoteWrite } else { AccessFlags::LocalWrite },
        );
        me.qp.lock().unwrap().modify(&a).map_err(|e| verr("queue pair to INIT", &e))?;
        Ok(me)
    }

    /// The GID its packets leave from.
    pub fn source_gid(&self) -> SourceGid {
        self.gid
    }

    /// This end's endpoint; with the port's active MTU (version 1) if
    /// `mtu`, else version 0.
    pub fn endpoint(&self, mtu: Option<PathMtu>) -> Endpoint {
        Endpoint { qpn: self.qp.lock().unwrap().qp_number(), psn: self.psn, lid: self.dev.lid, gid: self.gid.gid, mtu }
    }

    /// Moves to RTR and RTS, connected to `remote`, with `attrs` (see
    /// [`crate::qp_attrs`]).
    pub fn connect(&self, remote: &Endpoint, attrs: &QpAttrs) -> Result<(), RdmaError> {
        let mut ah = AddressHandleAttribute::new();
        ah.setup_dest_lid(remote.lid).setup_port(self.dev.port).setup_service_level(attrs.service_level);
        if attrs.global {
            ah.setup_grh(&Gid { raw: remote.gid }, 0, self.gid.index, attrs.hop_limit, attrs.traffic_class);
        }
        let mtu = match attrs.path_mtu {
            PathMtu::M256 => Mtu::Mtu256,
            PathMtu::M512 => Mtu::Mtu512,
            PathMtu::M1024 => Mtu::Mtu1024,
            PathMtu::M2048 => Mtu::Mtu2048,
            PathMtu::M4096 => Mtu::Mtu4096,
        };
        let mut qp = self.qp.lock().unwrap();
        let mut a = QueuePairAttribute::new();
        a.setup_state(QueuePairState::ReadyToReceive)
            .setup_path_mtu(mtu)
            .setup_dest_qp_num(remote.qpn)
            .setup_rq_psn(remote.psn)
            .setup_max_dest_read_atomic(1)
            .setup_min_rnr_timer(attrs.min_rnr_timer)
            .setup_address_vector(&ah);
        qp.modify(&a).map_err(|e| verr("queue pair to RTR", &e))?;
        let mut a = QueuePairAttribute::new();
        a.setup_state(QueuePairState::ReadyToSend)
            .setup_sq_psn(self.psn)
            .setup_timeout(attrs.timeout)
            .setup_retry_cnt(attrs.retry_cnt)
            .setup_rnr_retry(attrs.rnr_retry)
            .setup_max_read_atomic(1);
        qp.modify(&a).map_err(|e| verr("queue pair to RTS", &e))?;
        Ok(())
    }

    /// Posts `n` zero-length receives (they consume WRITE_WITH_IMMs).
    pub fn post_recvs(&self, first_id: u64, n: u32) -> Result<(), RdmaError> {
        if n == 0 {
            return Ok(()); // posting an empty list is not allowed
        }
        let mut qp = self.qp.lock().unwrap();
        let mut g = qp.start_post_recv();
        for i in 0..n as u64 {
            let _ = g.construct_wr(first_id + i);
        }
        g.post().map_err(|e| RdmaError::Verbs { op: "ibv_post_recv", msg: e.to_string() })
    }

    /// Posts the writes (unsignaled) and a zero-length WRITE_WITH_IMM carrying
    /// `imm` (signaled, with `wr_id`) in one chain; `imm_target` is any valid
    /// remote address and its rkey.
    pub fn post_batch(&self, wr_id: u64, writes: &[Write], imm: u32, imm_target: (u64, u32)) -> Result<(), RdmaError> {
        let sges: Vec<ibv_sge> =
            writes.iter().map(|w| ibv_sge { addr: w.local_addr, length: w.len, lkey: w.lkey }).collect();
        let mut qp = self.qp.lock().unwrap();
        let mut g = qp.start_post_send();
        for (w, sge) in writes.iter().zip(&sges) {
            // SAFETY: the SGE is copied into the request; the memory it names is registered.
            unsafe {
                g.construct_wr(wr_id, WorkRequestFlags::none())
                    .setup_write(w.rkey, w.remote_addr)
                    .setup_sge_list(std::slice::from_ref(sge));
            }
        }
        // Zero-length: no local memory is read.
        g.construct_wr(wr_id, WorkRequestFlags::Signaled).setup_write_imm(imm_target.1, imm_target.0, imm);
        g.post().map_err(|e| RdmaError::Verbs { op: "ibv_post_send", msg: e.to_string() })
    }

    /// Moves the queue pair to the error state: nothing more lands through it
    /// (a fence) and outstanding requests complete with flush errors.
    pub fn set_error(&self) -> Result<(), RdmaError> {
        let mut a = QueuePairAttribute::new();
        a.setup_state(QueuePairState::Error);
        self.qp.lock().unwrap().modify(&a).map_err(|e| RdmaError::Verbs { op: "queue pair to ERROR", msg: chain(&e) })
    }

    /// Completions polled so far, without waiting.
    pub fn poll(&self) -> Result<Vec<Completion>, RdmaError> {
        let mut out = Vec::new();
        match self.cq.start_poll() {
            Ok(poller) => {
                for wc in poller {
                    let status = WorkCompletionStatus::from(wc.status());
                    // The opcode is undefined for failed completions: look at it only on success.
                    let result = if status != WorkCompletionStatus::Success {
                        Err(format!("{status:?} (vendor error {:#x})", wc.vendor_err()))
                    } else {
                        match WorkCompletionOperationType::from(wc.opcode()) {
                            WorkCompletionOperationType::ReceiveWithImmediate => {
                                Ok(CompletionKind::Received { imm: wc.imm_data() })
                            }
                            _ => Ok(CompletionKind::Sent),
                        }
                    };
                    out.push(Completion { wr_id: wc.wr_id(), result });
                }
            }
            Err(PollCompletionQueueError::CompletionQueueEmpty) => {}
            Err(e) => return Err(RdmaError::Verbs { op: "ibv_poll_cq", msg: e.to_string() }),
        }
        Ok(out)
    }

    /// Waits for completions (event-driven) and returns all that are there.
    pub async fn completions(&self) -> Result<Vec<Completion>, RdmaError> {
        loop {
            let got = self.poll()?;
            if !got.is_empty() {
                return Ok(got);
            }
            // Arm, then poll again: a completion between the poll and the arm raises no event.
            // SAFETY: the CQ is alive (we hold it).
            let rc = unsafe { ibv_req_notify_cq(self.cq.cq().as_ptr(), 0) };
            if rc != 0 {
                return Err(RdmaError::Verbs {
                    op: "ibv_req_notify_cq",
                    msg: std::io::Error::from_raw_os_error(rc).to_string(),
                });
            }
            let got = self.poll()?;
            if !got.is_empty() {
                return Ok(got);
            }
            let mut guard = self
                .events
                .readable()
                .await
                .map_err(|e| RdmaError::Verbs { op: "completion channel", msg: e.to_string() })?;
            self.ack_events();
            guard.clear_ready();
        }
    }

    /// Reads and acknowledges pending channel events (a CQ cannot be
    /// destroyed with unacknowledged ones).
    fn ack_events(&self) {
        let mut n = 0u32;
        loop {
            let mut cq: *mut ibv_cq = std::ptr::null_mut();
            let mut ctx: *mut std::ffi::c_void = std::ptr::null_mut();
            // SAFETY: the channel is non-blocking and alive; the out-pointers are valid.
            let rc = unsafe { ibv_get_cq_event(self.events.get_ref().comp_channel().as_ptr(), &mut cq, &mut ctx) };
            if rc != 0 {
                break;
            }
            n += 1;
        }
        if n > 0 {
            // SAFETY: acknowledges exactly the events just read from this CQ's channel.
            unsafe { ibv_ack_cq_events(self.cq.cq().as_ptr(), n) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_round_trip_and_bounds() {
        let e = Endpoint { qpn: 0x11, psn: 0xabcdef, lid: 3, gid: [7; 16], mtu: None };
        assert_eq!(Endpoint::decode(&e.encode()).unwrap(), e);
        assert_eq!(e.encode()[28..], [0; 4], "version 0, as peers before version 1 read it");
        let v1 = Endpoint { mtu: Some(PathMtu::M4096), ..e };
        assert_eq!(Endpoint::decode(&v1.encode()).unwrap(), v1);
        let mut b = v1.encode();
        b[29] = 9; // no such MTU
        assert!(Endpoint::decode(&b).is_err());
        let mut b = v1.encode();
        b[28] = 2; // a version not spoken here
        assert!(Endpoint::decode(&b).is_err());
        let mut b = e.encode();
        b[29] = 5; // an MTU in a version-0 endpoint
        assert!(Endpoint::decode(&b).is_err());
        let mut b = e.encode();
        b[3] = 1; // qpn beyond 24 bits
        assert!(Endpoint::decode(&b).is_err());
        let mut b = e.encode();
        b[30] = 1;
        assert!(Endpoint::decode(&b).is_err());
        assert!(Endpoint::decode(&[0; ENDPOINT_LEN]).is_err());
    }
}
