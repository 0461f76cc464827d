//! Where a destination's open session is, as one value holding each
//! phase's data: receiving pages, forwarding them (after a retarget),
//! sealed for the pause, receiving the device state, holding it. A message
//! that does not belong to the phase is refused here, by name, whatever
//! the VM backend would make of it (`Resume` before the device state
//! ended, a device-state chunk after its end, a sealed target asked to
//! forward).

use crate::protocol::Message;
use crate::transport::PageSender;
use std::sync::Arc;
use thiserror::Error;

/// Largest device state a destination accepts (a VM with a lot of video RAM fits).
pub(super) const MAX_DEVICE_STATE: usize = 512 << 20;

/// A session's phase and what it holds.
pub(crate) enum Stage {
    /// Receiving pages from the source (and from its forwarders).
    Receiving,
    /// A retarget made this host a forwarder: it sends what it holds to `to`.
    Forwarding {
        /// The new destination.
        to: String,
        /// The streams to it.
        sender: Arc<dyn PageSender>,
    },
    /// Sealed for the pause: only the source's streams go on.
    Sealed,
    /// The device state is arriving in chunks.
    DeviceState(DeviceState),
    /// The device state is loaded: only `Resume` (or `Abort`) may follow.
    Loaded,
}

/// A message that does not belong to the session's phase.
#[derive(Debug, Error, PartialEq)]
pub(super) enum OutOfOrder {
    /// `Resume` before the device state was loaded.
    #[error("resume before the device state ended (the session is {stage})")]
    ResumeEarly {
        /// The phase.
        stage: &'static str,
    },
    /// Any other message out of place.
    #[error("{got} refused: the session is {stage}")]
    NotNow {
        /// The message.
        got: &'static str,
        /// The phase.
        stage: &'static str,
    },
}

impl Stage {
    /// The phase, as a refusal names it.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Stage::Receiving => "receiving pages",
            Stage::Forwarding { .. } => "forwarding to a new destination",
            Stage::Sealed => "sealed for the switchover",
            Stage::DeviceState(_) => "receiving the device state",
            Stage::Loaded => "holding the device state until resume",
        }
    }

    /// Whether `msg` may come now. `Forward` always may: a host that is not
    /// forwarding answers it with a failed `Forwarded`, which the source
    /// pairs with the batch.
    pub(crate) fn admit(&self, msg: &Message) -> Result<(), OutOfOrder> {
        use Message as M;
        use Stage as S;
        let ok = match (msg, self) {
            // A release's fence may come at any point, even between chunks.
            (M::Abort { .. } | M::OutcomeQuery { .. } | M::Fence { .. } | M::Forward { .. }, _) => true,
            (M::ForwardTo { .. }, S::Receiving | S::Forwarding { .. }) => true,
            (M::AddSender { .. }, S::Receiving) => true,
            (M::ChecksumRequest { .. }, S::Receiving | S::Sealed) => true,
            // Without chunks: an empty device state (protocol 2), or a whole one (protocol 1).
            (M::DeviceState { .. } | M::DeviceStateEnd { .. }, S::Receiving | S::Sealed) => true,
            (M::DeviceStateChunk { .. }, S::Receiving | S::Sealed | S::DeviceState(_)) => true,
            (M::DeviceStateEnd { .. }, S::DeviceState(_)) => true,
            (M::Resume { .. }, S::Loaded) => true,
            _ => false,
        };
        match (ok, msg) {
            (true, _) => Ok(()),
            (false, M::Resume { .. }) => Err(OutOfOrder::ResumeEarly { stage: self.name() }),
            (false, m) => Err(OutOfOrder::NotNow { got: m.name(), stage: self.name() }),
        }
    }

    /// The forward streams, if this host forwards.
    pub(crate) fn forwarding(&self) -> Option<(&str, &Arc<dyn PageSender>)> {
        match self {
            Stage::Forwarding { to, sender } => Some((to, sender)),
            _ => None,
        }
    }

    /// A device-state chunk (admitted): the first one starts the state.
    pub(crate) fn chunk(&mut self, bytes: &[u8]) {
        if !matches!(self, Stage::DeviceState(_)) {
            *self = Stage::DeviceState(DeviceState::default());
        }
        if let Stage::DeviceState(d) = self {
            d.add(bytes);
        }
    }

    /// The device state's end (admitted): the whole state, if it is
    /// complete and within the limit; the chunks are gone either way (the
    /// session is receiving again until it is sealed and the state loaded).
    pub(crate) fn end_device_state(&mut self, total: u64) -> Result<Vec<u8>, String> {
        match std::mem::replace(self, Stage::Receiving) {
            Stage::DeviceState(mut d) => d.take(total),
            _ => DeviceState::default().take(total),
        }
    }
}

/// Device state arriving in chunks, bounded by [`MAX_DEVICE_STATE`].
#[derive(Default)]
pub(crate) struct DeviceState {
    bytes: Vec<u8>,
    /// Bytes offered in all, kept even past the limit (to say how many).
    offered: u64,
}

impl DeviceState {
    fn add(&mut self, chunk: &[u8]) {
        self.offered += chunk.len() as u64;
        // Past the limit nothing more is kept: refused at the end, where the
        // source waits for an answer.
        if self.offered <= MAX_DEVICE_STATE as u64 {
            self.bytes.extend_from_slice(chunk);
        }
    }

    fn take(&mut self, total: u64) -> Result<Vec<u8>, String> {
        let offered = std::mem::take(&mut self.offered);
        let bytes = std::mem::take(&mut self.bytes);
        if offered > MAX_DEVICE_STATE as u64 {
            return Err(format!("device state of {offered} bytes exceeds the limit of {MAX_DEVICE_STATE}"));
        }
        if offered != total {
            return Err(format!("device state: {offered} bytes received, {total} announced"));
        }
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resume() -> Message {
        Message::Resume { start: true, migration: None }
    }

    fn chunk(n: usize) -> Message {
        Message::DeviceStateChunk { len: n as u32, bytes: vec![7; n] }
    }

    #[test]
    fn resume_only_once_the_device_state_is_loaded() {
        for s in [Stage::Receiving, Stage::Sealed, Stage::DeviceState(DeviceState::default())] {
            let e = s.admit(&resume()).unwrap_err();
            assert_eq!(e, OutOfOrder::ResumeEarly { stage: s.name() });
            assert!(e.to_string().starts_with("resume before the device state ended"), "{e}");
        }
        assert_eq!(Stage::Loaded.admit(&resume()), Ok(()));
    }

    #[test]
    fn the_device_state_in_order() {
        let mut s = Stage::Receiving;
        s.admit(&chunk(3)).unwrap();
        s.chunk(&[1, 2, 3]);
        s.admit(&chunk(2)).unwrap();
        s.chunk(&[4, 5]);
        // Nothing else between the chunks and their end.
        let sums = Message::ChecksumRequest { blocks: None, block_pages: None, pause: true };
        assert_eq!(
            s.admit(&sums),
            Err(OutOfOrder::NotNow { got: "checksum_request", stage: "receiving the device state" })
        );
        s.admit(&Message::DeviceStateEnd { total: 5 }).unwrap();
        assert_eq!(s.end_device_state(5), Ok(vec![1, 2, 3, 4, 5]));
        assert!(matches!(s, Stage::Receiving));
        // Loaded: no more chunks, no second state.
        let s = Stage::Loaded;
        assert!(s.admit(&chunk(1)).is_err());
        assert!(s.admit(&Message::DeviceStateEnd { total: 0 }).is_err());
        assert!(s.admit(&Message::Fence { sender: 2 }).is_ok(), "a release's fence comes at any time");
    }

    #[test]
    fn a_wrong_total_or_too_much_is_refused() {
        let mut s = Stage::Receiving;
        s.chunk(&[0; 10]);
        assert!(s.end_device_state(11).unwrap_err().contains("10 bytes received, 11 announced"));
        let mut s = Stage::Receiving;
        assert_eq!(s.end_device_state(0), Ok(vec![]), "an empty device state has no chunks");
    }

    #[test]
    fn a_sealed_target_forwards_nothing_and_adds_no_sender() {
        let forward = Message::AddSender { sender: 2, host: "c".into(), rdma: false };
        assert!(Stage::Receiving.admit(&forward).is_ok());
        assert!(Stage::Sealed.admit(&forward).is_err());
        assert!(Stage::Loaded.admit(&forward).is_err());
    }
}
