//! VMs whose migration's outcome is unknown: `Resume` went to the
//! destination and its answer was lost, so the VM may run there. Such a VM
//! stays paused here and is neither migrated nor resumed until the outcome
//! is settled: by asking the destination (it knows whether it committed),
//! again and again until it answers, or by an operator (`dcmigrate
//! resolve`). The VM never runs twice.

use super::Agent;
use crate::protocol::{Features, Message, MigrationId, RemoteOutcome};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// Committed migrations a destination remembers.
pub(super) const COMMITTED: usize = 4096;

/// How often the destination is asked, at most.
const ASK_EVERY_MAX: Duration = Duration::from_secs(30);

/// A VM waiting for its outcome.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub(super) struct Unknown {
    /// The destination that may run it.
    pub destination: String,
    /// The migration asked about (absent in journals of earlier releases:
    /// asked by the VM's name then).
    #[serde(default)]
    pub migration: Option<MigrationId>,
}

/// How an outcome was settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Settled {
    /// The VM runs on the destination: stopped and forgotten here.
    Moved,
    /// The destination never committed it: resumed here.
    Here,
}

impl Agent {
    /// The migration of `vm` to `destination` ended with its outcome
    /// unknown: refuse to touch the VM, and ask the destination until it says.
    pub(super) fn outcome_unknown(self: &Arc<Self>, vm: &str, destination: &str, migration: Option<MigrationId>) {
        tracing::warn!(%vm, %destination, "switchover outcome unknown: the VM stays paused here until it is settled");
        let u = Unknown { destination: destination.to_owned(), migration };
        self.unknown.lock().unwrap().insert(vm.to_owned(), u);
        self.journal_vms();
        let (me, vm) = (self.clone(), vm.to_owned());
        tokio::spawn(async move { me.settle_by_asking(&vm).await });
    }

    /// Why `vm` may not be touched, if its outcome is unknown.
    pub(super) fn unknown_outcome(&self, vm: &str) -> Option<Unknown> {
        self.unknown.lock().unwrap().get(vm).cloned()
    }

    /// Asks the destination until it knows, with a growing pause between tries.
    async fn settle_by_asking(self: Arc<Self>, vm: &str) {
        // The destination may still be committing: give it a peer timeout first.
        let mut wait = self.cfg.peer_timeout;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.shutdown.cancelled() => return,
            }
            wait = (wait * 2).min(ASK_EVERY_MAX);
            let Some(u) = self.unknown_outcome(vm) else { return };
            match self.ask(vm, &u).await {
                Ok(RemoteOutcome::Committed) => {
                    let _ = self.settle(vm, Settled::Moved).await;
                    return;
                }
                Ok(RemoteOutcome::NotHere) => {
                    let _ = self.settle(vm, Settled::Here).await;
                    return;
                }
                Ok(RemoteOutcome::Pending) => {
                    tracing::info!(%vm, "the destination still has the session open; asking again")
                }
                Err(e) => tracing::info!(%vm, destination = %u.destination, "cannot ask about the outcome yet: {e}"),
            }
        }
    }

    /// One question to the destination, about this migration.
    async fn ask(&self, vm: &str, u: &Unknown) -> Result<RemoteOutcome, String> {
        let q = Message::OutcomeQuery { vm: vm.to_owned(), migration: u.migration };
        let what = "outcome queries; settle it with `dcmigrate resolve`";
        match self.ask_peer(&u.destination, q, Features::heartbeats, what).await.map_err(|e| e.to_string())? {
            Message::OutcomeAnswer { outcome, .. } => Ok(outcome),
            other => Err(format!("unexpected {}", other.name())),
        }
    }

    /// What this host knows of a migration of `vm` (asked by a source that
    /// lost the answer to its `Resume`). With the migration's id, the
    /// answer is about that migration alone: a session another source
    /// opened for a VM of the same name never settles it. Without (a
    /// protocol-3 source), about the VM's name.
    /// The answer is for the peer that opened that migration's session
    /// (`asker`) alone.
    pub fn outcome_of(&self, vm: &str, migration: Option<MigrationId>, asker: &str) -> RemoteOutcome {
        let Some(id) = migration else {
            return if self.has_vm(vm) {
                RemoteOutcome::Committed
            } else if self.incoming.lock().unwrap().contains_key(vm) {
                RemoteOutcome::Pending
            } else {
                RemoteOutcome::NotHere
            };
        };
        if self.committed.lock().unwrap().iter().any(|(c, peer)| *c == id && peer == asker) {
            RemoteOutcome::Committed
        } else if self.incoming.lock().unwrap().values().any(|r| r.migration == Some(id) && r.peer == asker) {
            RemoteOutcome::Pending
        } else {
            RemoteOutcome::NotHere
        }
    }

    /// A migration committed here: remembered (the last [`COMMITTED`]) for
    /// sources that ask after losing the answer.
    pub(super) fn committed(&self, id: Option<MigrationId>, peer: &str) {
        let Some(id) = id else { return };
        let mut c = self.committed.lock().unwrap();
        c.push_back((id, peer.to_owned()));
        while c.len() > COMMITTED {
            c.pop_front();
        }
    }

    /// Settles `vm`'s outcome: stops it here (it runs on the destination) or
    /// resumes it here (the destination never committed it).
    pub(super) async fn settle(&self, vm: &str, how: Settled) -> Result<(), crate::vm::VmError> {
        let Some(rec) = self.vm_record(vm) else {
            self.unknown.lock().unwrap().remove(vm);
            return Ok(());
        };
        let src = Self::source_vm(rec);
        let r = match how {
            Settled::Moved => tokio::task::spawn_blocking(move || src.stop()).await,
            Settled::Here => tokio::task::spawn_blocking(move || src.resume()).await,
        };
        let r = r.unwrap_or_else(|e| Err(crate::vm::VmError::Launch(format!("internal: {e}"))));
        if r.is_ok() {
            self.unknown.lock().unwrap().remove(vm);
            if how == Settled::Moved {
                self.vms.lock().unwrap().remove(vm);
            }
            self.journal_vms();
            tracing::info!(%vm, ?how, "switchover outcome settled");
        }
        r
    }
}
