//! The agent's small on-disk journal, so that a restarted agent (crash,
//! upgrade) knows what it had: its VMs (and which of them wait for an
//! unknown outcome), the migrations it was running as source with their
//! phase, and the incoming sessions whose files must go if they never
//! committed. Files are written whole (temporary file, then rename), mode
//! 0600, in a directory only the agent's user can enter.
//!
//! On start the agent settles what the journal says: a VM paused by a
//! migration that cannot have committed (no `Resume` was sent) is resumed;
//! one whose `Resume` was sent waits for its outcome; an incoming session's
//! leftovers are removed (its source saw the connection drop and gave up).

use super::outcome::Unknown;
use super::Agent;
use crate::engine::phase::Phase;
use crate::vm::VmRecord;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The registry: VMs on this host, and those waiting for an outcome.
#[derive(Serialize, Deserialize, Default)]
struct Registry {
    vms: Vec<VmRecord>,
    #[serde(default)]
    unknown: HashMap<String, Unknown>,
    /// Migrations that committed here lately (newest last), for sources
    /// that lost the answer to their `Resume`.
    #[serde(default)]
    committed: Vec<(crate::protocol::MigrationId, String)>,
}

/// A migration this host runs as source.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub(crate) struct MigrationEntry {
    /// The VM.
    pub vm: String,
    /// Its current destination.
    pub destination: String,
    /// How far it got.
    pub phase: JournalPhase,
    /// Its id (absent in journals of earlier releases).
    #[serde(default)]
    pub migration: Option<crate::protocol::MigrationId>,
}

/// The phases that matter after a crash.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub(crate) enum JournalPhase {
    /// The VM runs (rounds).
    Running,
    /// The VM is paused; `Resume` was not sent: resume it here.
    Paused,
    /// `Resume` was sent: the outcome is the destination's to tell.
    ResumeSent,
}

impl From<Phase> for JournalPhase {
    fn from(p: Phase) -> Self {
        match p {
            Phase::Setup | Phase::Precopy => JournalPhase::Running,
            Phase::Paused | Phase::Committing => JournalPhase::Paused,
            Phase::ResumeSent => JournalPhase::ResumeSent,
        }
    }
}

/// An incoming session's files.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub(crate) struct IncomingEntry {
    /// The VM.
    pub vm: String,
    /// Files and directories to remove if it never commits.
    pub paths: Vec<PathBuf>,
}

/// Writes `value` to `path` whole, 0600.
fn write_json(path: &Path, value: &impl Serialize) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
    f.write_all(&serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Option<T> {
    let text = std::fs::read(path).ok()?;
    serde_json::from_slice(&text)
        .inspect_err(|e| tracing::warn!(path = %path.display(), "journal entry unreadable, ignored: {e}"))
        .ok()
}

fn entries(dir: &Path) -> Vec<PathBuf> {
    let Ok(d) = std::fs::read_dir(dir) else { return vec![] };
    d.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "json")).collect()
}

/// A file name for a VM's entry (VM names are checked to be file-safe).
fn entry(dir: &Path, vm: &str) -> PathBuf {
    dir.join(format!("{vm}.json"))
}

impl Agent {
    fn state(&self, sub: &str) -> PathBuf {
        self.cfg.state_dir.join(sub)
    }

    /// Creates the journal's directories (0700).
    pub(super) fn journal_init(&self) -> std::io::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        for d in [self.cfg.state_dir.clone(), self.state("migrations"), self.state("incoming")] {
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&d)?;
        }
        Ok(())
    }

    /// Writes the registry (after every change of it).
    pub(super) fn journal_vms(&self) {
        let reg = Registry {
            vms: self.vms.lock().unwrap().values().cloned().collect(),
            unknown: self.unknown.lock().unwrap().clone(),
            committed: self.committed.lock().unwrap().iter().cloned().collect(),
        };
        if let Err(e) = write_json(&self.state("vms.json"), &reg) {
            tracing::warn!("journal: {e}");
        }
    }

    /// Records (or, with `None`, forgets) a migration this host runs as source.
    pub(super) fn journal_migration(&self, vm: &str, e: Option<MigrationEntry>) {
        let path = entry(&self.state("migrations"), vm);
        let r = match e {
            Some(e) => write_json(&path, &e),
            None => std::fs::remove_file(&path).or_else(|e| match e.kind() {
                std::io::ErrorKind::NotFound => Ok(()),
                _ => Err(e),
            }),
        };
        if let Err(e) = r {
            tracing::warn!("journal: {e}");
        }
    }

    /// Records whether the host is drained (a file `drained` while it is).
    pub(super) fn journal_drain(&self, on: bool) {
        let path = self.state("drained");
        let r = match on {
            true => std::fs::write(&path, b"drained\n"),
            false => std::fs::remove_file(&path).or_else(|e| match e.kind() {
                std::io::ErrorKind::NotFound => Ok(()),
                _ => Err(e),
            }),
        };
        if let Err(e) = r {
            tracing::warn!("journal: {e}");
        }
    }

    /// Records (or forgets) an incoming session's files.
    pub(crate) fn journal_incoming(&self, vm: &str, e: Option<IncomingEntry>) {
        let path = entry(&self.state("incoming"), vm);
        let r = match e {
            Some(e) => write_json(&path, &e),
            None => std::fs::remove_file(&path).or(Ok(())),
        };
        if let Err(e) = r {
            tracing::warn!("journal: {e}");
        }
    }

    /// Reads the journal and settles what a previous run left.
    pub(super) async fn recover(self: &Arc<Self>) {
        if self.cfg.drained || self.state("drained").exists() {
            self.set_drained(true);
        }
        if let Some(reg) = read_json::<Registry>(&self.state("vms.json")) {
            self.committed.lock().unwrap().extend(reg.committed);
            for rec in reg.vms {
                let (name, r) = (rec.name.clone(), rec.clone());
                match tokio::task::spawn_blocking(move || Self::source_vm(r).status()).await {
                    Ok(Ok(_)) => {
                        tracing::info!(vm = %name, "VM from the journal is still here");
                        self.vms.lock().unwrap().insert(name, rec);
                    }
                    _ => tracing::info!(vm = %name, "VM from the journal is gone; forgotten"),
                }
            }
            for (vm, u) in reg.unknown {
                if self.has_vm(&vm) {
                    self.outcome_unknown(&vm, &u.destination, u.migration);
                }
            }
        }
        for path in entries(&self.state("incoming")) {
            if let Some(e) = read_json::<IncomingEntry>(&path) {
                tracing::warn!(vm = %e.vm, "removing an incoming session an earlier run left");
                for p in &e.paths {
                    let _ = std::fs::remove_dir_all(p).or_else(|_| std::fs::remove_file(p));
                }
            }
            let _ = std::fs::remove_file(&path);
        }
        for path in entries(&self.state("migrations")) {
            if let Some(m) = read_json::<MigrationEntry>(&path) {
                self.recover_migration(m).await;
            }
            let _ = std::fs::remove_file(&path);
        }
        self.journal_vms();
    }

    /// A migration the previous run was in the middle of.
    async fn recover_migration(self: &Arc<Self>, m: MigrationEntry) {
        match m.phase {
            // The destination discarded its session when the connection dropped.
            JournalPhase::Running => {
                tracing::warn!(vm = %m.vm, "a migration to {} ended with the agent", m.destination)
            }
            JournalPhase::Paused => {
                tracing::warn!(vm = %m.vm, "a migration ended with the agent while the VM was paused: resuming it");
                if let Some(rec) = self.vm_record(&m.vm) {
                    let r = tokio::task::spawn_blocking(move || Self::source_vm(rec).resume()).await;
                    if !matches!(r, Ok(Ok(()))) {
                        tracing::warn!(vm = %m.vm, "resuming it failed: {r:?}");
                    }
                }
            }
            JournalPhase::ResumeSent => {
                if self.has_vm(&m.vm) {
                    self.outcome_unknown(&m.vm, &m.destination, m.migration);
                }
            }
        }
    }
}
