//! One question to a peer on a control connection of its own (a settled
//! outcome, its room for an evacuation): connect, ask, one answer within a
//! deadline, close.

use super::Agent;
use crate::control::{self, Channel, Heartbeat};
use crate::protocol::{Features, Message};
use thiserror::Error;

/// A question a peer did not answer.
#[derive(Debug, Error)]
pub(crate) enum AskError {
    /// It speaks a protocol older than the question.
    #[error("{host} speaks protocol {version}, which cannot answer {what}")]
    Old {
        /// The peer.
        host: String,
        /// Its version.
        version: u32,
        /// The question.
        what: String,
    },
    /// No answer (unknown peer, connection, refusal, deadline).
    #[error("{0}")]
    Failed(String),
}

impl Agent {
    /// Asks `host` one question, which needs the protocol feature `needs`
    /// (`what` names the question in the error). The answer, or why there is none.
    pub(super) async fn ask_peer(
        &self,
        host: &str,
        m: Message,
        needs: fn(Features) -> bool,
        what: &str,
    ) -> Result<Message, AskError> {
        let failed = |s: &str| AskError::Failed(s.to_owned());
        let addr = self.cfg.peers.get(host).copied().ok_or_else(|| failed("not a configured peer"))?;
        let conn = control::connect(&self.cfg.tls.current(), &self.cfg.name, host, addr)
            .await
            .map_err(|e| AskError::Failed(crate::error_chain(&e)))?;
        if !needs(conn.features()) {
            return Err(AskError::Old { host: host.into(), version: conn.version, what: what.into() });
        }
        let mut ch = Channel::new(conn.stream, Some(Heartbeat::pinging(self.cfg.peer_timeout)));
        ch.out.send(m).map_err(|_| failed("connection closed"))?;
        let answer = tokio::time::timeout(self.cfg.peer_timeout * 2, ch.inbox.recv()).await;
        ch.closed.cancel();
        match answer {
            Ok(Some(Ok(Message::Error { message, .. }))) => Err(AskError::Failed(message)),
            Ok(Some(Ok(m))) => Ok(m),
            Ok(Some(Err(e))) => Err(AskError::Failed(crate::error_chain(&e))),
            Ok(None) => Err(failed("connection closed")),
            Err(_) => Err(failed("no answer")),
        }
    }
}
