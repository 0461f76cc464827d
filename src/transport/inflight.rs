//! The batches one stream has put on the wire and not yet seen applied, in
//! order, with the window that bounds them. Both data planes' stream loops
//! share it: acknowledgements must come in order, and whatever is still in
//! flight when a stream ends is failed, never lost.

use super::batch::Batch;
use super::TransportError;
use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// In-flight batches of one stream, keyed by what the receiver echoes
/// (the batch id on TCP, the write sequence number on RDMA).
pub struct InFlight {
    queue: Mutex<VecDeque<(u64, Batch, Instant)>>,
    window: Semaphore,
}

impl InFlight {
    /// At most `window` batches in flight.
    pub fn new(window: usize) -> Self {
        Self { queue: Mutex::new(VecDeque::new()), window: Semaphore::new(window) }
    }

    /// Waits for room in the window and takes it.
    pub async fn reserve(&self) {
        // The semaphore is never closed, so acquiring cannot fail.
        if let Ok(p) = self.window.acquire().await {
            p.forget();
        }
    }

    /// A batch went on the wire under `key` (after [`reserve`](Self::reserve)).
    pub fn push(&self, key: u64, b: Batch) {
        self.queue.lock().unwrap().push_back((key, b, Instant::now()));
    }

    /// The receiver applied the batch sent under `key`, which must be the
    /// oldest in flight; frees its place in the window.
    pub fn ack(&self, key: u64) -> Result<Batch, TransportError> {
        let mut q = self.queue.lock().unwrap();
        match q.front() {
            Some((k, _, _)) if *k == key => {
                let (_, b, _) = q.pop_front().expect("checked");
                self.window.add_permits(1);
                Ok(b)
            }
            // Left in place: the stream's end fails it, so no batch is lost.
            _ => Err(TransportError::UnexpectedAck(key)),
        }
    }

    /// Everything still in flight (the stream ended).
    pub fn drain(&self) -> Vec<Batch> {
        self.queue.lock().unwrap().drain(..).map(|(_, b, _)| b).collect()
    }

    /// Resolves with an error once the oldest batch in flight has waited
    /// `timeout` for its acknowledgement: the receiver froze, or the path
    /// went silent. (Writes that block count too: the batch is in flight.)
    pub async fn watchdog(&self, timeout: Duration) -> TransportError {
        let check = (timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        loop {
            tokio::time::sleep(check).await;
            let oldest = self.queue.lock().unwrap().front().map(|(_, _, t)| t.elapsed());
            if oldest.is_some_and(|age| age > timeout) {
                return TransportError::Timeout { what: "the receiver's acknowledgement" };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(id: u64) -> Batch {
        Batch { id, chunk: 0, from: 0, to: 1, runs: vec![], epochs: vec![] }
    }

    #[tokio::test]
    async fn acks_in_order_and_nothing_lost() {
        let f = InFlight::new(2);
        f.reserve().await;
        f.push(1, batch(10));
        f.reserve().await;
        f.push(2, batch(11));
        assert!(matches!(f.ack(2), Err(TransportError::UnexpectedAck(2))), "out of order");
        assert_eq!(f.ack(1).unwrap().id, 10);
        f.reserve().await; // the ack freed a place
        let left: Vec<u64> = f.drain().iter().map(|b| b.id).collect();
        assert_eq!(left, vec![11], "the out-of-order ack left its batch to fail");
    }
}
