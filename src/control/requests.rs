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

/// A request waiting for its reply; dropped, it is given up (a caller
/// whose wait was cut short leaves nothing behind).
pub struct Waiting<'a> {
    /// The request's id.
    pub id: u64,
    /// Where its reply comes (closed if the connection ends first).
    pub reply: oneshot::Receiver<Reply>,
    requests: &'a Requests,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.requests.give_up(self.id);
    }
}

/// The requests of one connection still waiting for a reply.
#[derive(Default)]
pub struct Requests {
    waiting: Mutex<HashMap<u64, oneshot::Sender<Reply>>>,
    next: AtomicU64,
}

impl Requests {
    /// A new request: its id, and where its reply will come (given up
    /// when dropped, however the wait for it ends).
    pub fn begin(&self) -> Waiting<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.waiting.lock().unwrap().insert(id, tx);
        Waiting { id, reply: rx, requests: self }
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
        let a = r.begin().id;
        let mut b = r.begin();
        assert_ne!(a, b.id);
        // The reply to the request given up (dropped) comes first: dropped.
        assert!(!r.answer(a, Ok(Message::Checksums { sums: vec![1] })));
        assert!(b.reply.try_recv().is_err(), "the late reply answered another request");
        assert!(r.answer(b.id, Ok(Message::Ok)));
        assert!(matches!(b.reply.try_recv(), Ok(Ok(Message::Ok))));
        // Overlapping requests get their own replies, in any order.
        let (mut c, mut d) = (r.begin(), r.begin());
        let no = Refusal { message: "no".into(), code: None };
        assert!(r.answer(d.id, Err(no)) && r.answer(c.id, Ok(Message::Resumed)));
        assert!(matches!(c.reply.try_recv(), Ok(Ok(Message::Resumed))));
        assert!(matches!(d.reply.try_recv(), Ok(Err(_))));
        assert!(!r.answer(99, Ok(Message::Ok)), "a made-up number answers nothing");
        let mut e = r.begin();
        r.clear();
        assert!(matches!(e.reply.try_recv(), Err(oneshot::error::TryRecvError::Closed)));
        drop((b, c, d, e));
        assert!(r.waiting.lock().unwrap().is_empty(), "requests left behind");
    }
}
