//! One question to a peer on a control connection of its own (a settled
//! outcome, its room for an evacuation): connect, ask, one answer within a
//! deadline, close.

use super::Agent;
use crate::control::{self, Channel, Heartbeat};
use crate::protocol::Message;

impl Agent {
    /// Asks `host` one question; needs protocol `min_version` (`what` names
    /// the question in the error). The answer, or why there is none.
    pub(super) async fn ask_peer(
        &self,
        host: &str,
        m: Message,
        min_version: u32,
        what: &str,
    ) -> Result<Message, String> {
        let addr = self.cfg.peers.get(host).copied().ok_or("not a configured peer")?;
        let conn = control::connect(&self.cfg.tls.current(), &self.cfg.name, host, addr)
            .await
            .map_err(|e| crate::error_chain(&e))?;
        if conn.version < min_version {
            return Err(format!("{host} speaks protocol {}, which cannot answer {what}", conn.version));
        }
        let mut ch = Channel::new(conn.stream, Some(Heartbeat::pinging(self.cfg.peer_timeout)));
        ch.out.send(m).map_err(|_| "connection closed")?;
        let answer = tokio::time::timeout(self.cfg.peer_timeout * 2, ch.inbox.recv()).await;
        ch.closed.cancel();
        match answer {
            Ok(Some(Ok(Message::Error { message }))) => Err(message),
            Ok(Some(Ok(m))) => Ok(m),
            Ok(Some(Err(e))) => Err(crate::error_chain(&e)),
            Ok(None) => Err("connection closed".into()),
            Err(_) => Err("no answer".into()),
        }
    }
}
