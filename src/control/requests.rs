//! Requests waiting for their replies on one control connection (protocol
//! 6): each has an id its reply names, so requests may overlap, and a reply
//! that comes after its request was given up answers nothing else.

use crate::protocol::{Message, Refusal};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use tokio::sync::oneshot;

/// A reply: the message, or the peer's `Error`.
pub type Reply = Result<Message, Refusal>;

/// The requests of one connection still waiting for a reply.
#[derive(Default)]
pub struct Requests {
    waiting: Mutex<HashMap<u64, oneshot::Sender<Reply>>>,
    next: AtomicU64,
}

impl Requests {
    /// A new request: its id, and where its reply will come.
    pub fn begin(&self) -> (u64, oneshot::Receiver<Reply>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.waiting.lock().unwrap().insert(id, tx);
        (id, rx)
    }

    /// The request `id` is given up (timed out, or never sent).
    pub fn give_up(&self, id: u64) {
        self.waiting.lock().unwrap().remove(&id);
    }

    /// A reply naming request `re`; false if no request waits for it (one
    /// given up, or a number the peer made up): it is dropped.
    pub fn answer(&self, re: u64, reply: Reply) -> bool {
        match self.waiting.lock().unwrap().remove(&re) {
            Some(tx) => tx.send(reply).is_ok(),
            None => false,
        }
    }

    /// The connection ended: every waiting request gets no reply.
    pub fn clear(&self) {
        self.waiting.lock().unwrap().clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_late_reply_answers_nothing_else() {
        let r = Requests::default();
        let (a, _a_rx) = r.begin();
        r.give_up(a);
        let (b, mut b_rx) = r.begin();
        assert_ne!(a, b);
        // The reply to the request given up comes first: dropped.
        assert!(!r.answer(a, Ok(Message::Checksums { sums: vec![1] })));
        assert!(b_rx.try_recv().is_err(), "the late reply answered another request");
        assert!(r.answer(b, Ok(Message::Ok)));
        assert!(matches!(b_rx.try_recv(), Ok(Ok(Message::Ok))));
        // Overlapping requests get their own replies, in any order.
        let ((c, mut c_rx), (d, mut d_rx)) = (r.begin(), r.begin());
        let no = Refusal { message: "no".into(), code: None };
        assert!(r.answer(d, Err(no)) && r.answer(c, Ok(Message::Resumed)));
        assert!(matches!(c_rx.try_recv(), Ok(Ok(Message::Resumed))));
        assert!(matches!(d_rx.try_recv(), Ok(Err(_))));
        assert!(!r.answer(99, Ok(Message::Ok)), "a made-up number answers nothing");
        let (_, mut e_rx) = r.begin();
        r.clear();
        assert!(matches!(e_rx.try_recv(), Err(oneshot::error::TryRecvError::Closed)));
    }
}
