//! One handler per API request, each returning its reply type (see
//! [`super::api`]); `handle` only dispatches.

use super::api::{
    AttachReply, Done, DrainReply, InfoReply, ListReply, MigrateReply, RdmaInfo, Request, RetargetReply, StatusReply,
    SteerReply, VmEntry,
};
use super::journal::MigrationEntry;
use super::outcome::Settled;
use super::Agent;
use crate::engine::{self, MigrateOptions, MigrationHandle, MigrationStatus};
use crate::vm::{LaunchSpec, VmRecord, VmState};
use serde_json::Value;
use std::path::PathBuf;
use std::sync::Arc;
use thiserror::Error;

/// Why the agent refused an API request (the client gets the message).
#[derive(Debug, Error)]
pub enum RequestError {
    /// No such VM here.
    #[error("no VM named {vm:?} on {host}")]
    NoVm {
        /// The VM.
        vm: String,
        /// This host.
        host: String,
    },
    /// A VM of that name is registered already.
    #[error("a VM named {0:?} is already registered here")]
    Exists(String),
    /// A record or path the caller may not hand over.
    #[error("refused")]
    Record(#[from] super::access::RecordError),
    /// A name that cannot name files.
    #[error("invalid VM name {0:?}: use letters, digits, '-', '_' or '.'")]
    Name(String),
    /// A destination this agent has no address for.
    #[error("unknown host {0:?}: start the agent with --peer {0}=ADDR")]
    UnknownHost(String),
    /// Migrating a VM to where it is.
    #[error("{vm} already runs on {host}")]
    AlreadyHere {
        /// The VM.
        vm: String,
        /// This host.
        host: String,
    },
    /// A migration of the VM is running.
    #[error("{vm} is already migrating to {to}")]
    Migrating {
        /// The VM.
        vm: String,
        /// Where to.
        to: String,
    },
    /// No migration of the VM here.
    #[error("no migration of {0:?} on this host")]
    NoMigration(String),
    /// The migration ended.
    #[error("the migration of {0} has already finished")]
    Finished(String),
    /// Retargeting to the source.
    #[error("{0} is the source of this migration")]
    IsSource(String),
    /// The VM's last migration has an unknown outcome.
    #[error("{vm}'s migration to {destination} has an unknown outcome: it may run there; it stays paused here until the outcome is settled (asked of {destination} until it answers, or `dcmigrate resolve {vm} --runs-on HOST|here`)")]
    OutcomeUnknown {
        /// The VM.
        vm: String,
        /// The destination that may run it.
        destination: String,
    },
    /// `resolve` for a VM whose outcome is known.
    #[error("{0}'s outcome is not unknown: nothing to resolve")]
    NotUnknown(String),
    /// Options no migration can run with.
    #[error("invalid options")]
    Options(#[from] crate::engine::options::OptionsError),
    /// A change a running migration cannot take.
    #[error("{0}")]
    Steering(String),
    /// An evacuation that cannot run (or none to show).
    #[error("evacuate: {0}")]
    Evacuate(String),
    /// A fallback host that cannot be one.
    #[error("fallback: {0}")]
    Fallback(String),
    /// The agent is shutting down.
    #[error("the agent is shutting down")]
    ShuttingDown,
    /// As many outgoing migrations as the agent allows run already.
    #[error("{0} migrations already leave this host, the most it runs at once (--max-outgoing)")]
    Busy(u32),
    /// The engine refused the retarget.
    #[error("retarget refused: {0}")]
    Retarget(String),
    /// The VM failed the request.
    #[error("the VM")]
    Vm(#[from] crate::vm::VmError),
    /// A blocking task failed.
    #[error("internal")]
    Task(#[from] tokio::task::JoinError),
    /// A reply that does not serialize.
    #[error("internal: the reply does not serialize")]
    Reply(#[from] serde_json::Error),
}

impl Agent {
    /// Runs one API request; the reply's fields, or why it was refused.
    /// Dispatches a request from a client running as `caller` (a uid).
    pub(super) async fn handle_from(self: Arc<Self>, caller: u32, req: Request) -> Result<Value, RequestError> {
        match req {
            Request::Info => Self::reply(self.info()),
            Request::Register { vm } => Self::reply(self.register(caller, *vm)?),
            Request::AttachQemu { name, qmp, launch, networks } => {
                Self::reply(self.attach_qemu(caller, name, qmp, (launch, networks)).await?)
            }
            Request::List => Self::reply(self.list().await),
            Request::Migrate { vm, to, options } => Self::reply(self.migrate(vm, to, options)?),
            Request::Retarget { vm, to, forward } => Self::reply(self.retarget(vm, to, forward).await?),
            Request::Status { vm } => Self::reply(self.status(vm)?),
            Request::Wait { vm } => Self::reply(self.wait(&vm).await?),
            Request::Steer { vm, steering } => Self::reply(self.steer(&vm, steering)?),
            // Streamed by the API server itself (see `Agent::watch`).
            Request::Watch { .. } => Err(RequestError::Steering("watch streams on its own connection".into())),
            Request::Cancel { vm } => Self::reply(self.cancel(&vm).await?),
            Request::Resume { vm } => Self::reply(self.resume(&vm).await?),
            Request::Resolve { vm, runs_on } => Self::reply(self.resolve(&vm, &runs_on).await?),
            Request::Drain => Self::reply(self.drain(true)),
            Request::Undrain => Self::reply(self.drain(false)),
            Request::Evacuate { to, max_parallel, options } => Self::reply(self.evacuate(to, max_parallel, options)?),
            Request::Evacuation { id, cancel } => Self::reply(self.evacuation(id.as_deref(), cancel)?),
            Request::Shutdown => {
                self.shutdown.cancel();
                Self::reply(Done {})
            }
            #[cfg(feature = "test-hooks")]
            Request::Release { vm } => {
                let m = self.migration(&vm)?;
                m.released.send_replace(true);
                m.wake();
                Self::reply(Done {})
            }
        }
    }

    fn info(&self) -> InfoReply {
        // Before the struct: it locks `incoming` too.
        let capacity = self.capacity();
        let cert = self.cfg.tls.current().cert.clone();
        InfoReply {
            name: self.cfg.name.clone(),
            control: self.cfg.listen.to_string(),
            data_port: self.data_port(),
            peers: self.cfg.peers.keys().cloned().collect(),
            rdma: match &self.rdma {
                Ok(r) => RdmaInfo::Device { device: r.name(), warning: r.warning() },
                Err(e) => RdmaInfo::Unavailable { unavailable: e.clone() },
            },
            incoming: self.incoming.lock().unwrap().keys().cloned().collect(),
            capacity,
            cert_fingerprint: cert.fingerprint,
            cert_not_after: cert.not_after,
            metrics: self.metrics_addr.lock().unwrap().map(|a| a.to_string()),
        }
    }

    fn register(&self, caller: u32, mut vm: VmRecord) -> Result<Done, RequestError> {
        vm.idents = super::access::check_record(&vm, caller)?;
        // What the client says of its pages is not taken: read here.
        for r in &mut vm.ram {
            r.page_size =
                crate::memory::backing::of_path(&r.path).map_or(crate::memory::PAGE_SIZE as u64, |fs| fs.page_size);
        }
        if self.has_vm(&vm.name) {
            return Err(RequestError::Exists(vm.name));
        }
        self.add_vm(vm);
        Ok(Done {})
    }

    async fn attach_qemu(
        &self,
        caller: u32,
        name: String,
        qmp: PathBuf,
        (launch, networks): (Option<LaunchSpec>, std::collections::BTreeMap<String, String>),
    ) -> Result<AttachReply, RequestError> {
        if !crate::vm::valid_name(&name) {
            return Err(RequestError::Name(name));
        }
        // Only the owner of a QEMU's monitor (or root) may hand it over.
        let control = super::access::check_socket(&qmp, caller)?;
        if self.has_vm(&name) {
            return Err(RequestError::Exists(name));
        }
        let storage = self.cfg.storage.clone();
        let rec = tokio::task::spawn_blocking(move || {
            let with = crate::vm::qemu::source::Describing { storage: &storage, networks: &networks };
            crate::vm::qemu::attach(&name, (&qmp, Some(control)), launch, &with)
        })
        .await??;
        let mut rec = rec;
        // Whatever answers on that socket names the RAM: an unprivileged
        // caller's own files only (root's QEMU may use a memfd or symlink).
        // Either way every file is held to what it is now.
        rec.idents = if super::access::privileged(caller) {
            let mut idents = std::collections::BTreeMap::new();
            for r in &rec.ram {
                let m = std::fs::metadata(&r.path)
                    .map_err(|e| crate::vm::VmError::Launch(format!("{}: {e}", r.path.display())))?;
                idents.insert(r.path.clone(), crate::vm::ident::FileIdent::of(&m));
            }
            idents
        } else {
            super::access::check_record(&rec, caller)?
        };
        // The socket checked before QEMU was asked anything.
        rec.idents.insert(rec.control.clone(), control);
        // The images it writes: no VM arriving here may write them too.
        if let LaunchSpec::QemuVm { description } = &rec.launch {
            let storage = crate::vm::qemu::confine::Storage::new(&self.cfg.storage);
            for d in description.disks.iter().filter(|d| !d.read_only) {
                let top = storage.disk(d).ok().and_then(|c| c.nodes.first()?.file.metadata().ok());
                rec.disks.extend(top.map(|m| crate::vm::ident::FileIdent::of(&m)));
            }
        }
        tracing::info!(vm = %rec.name, regions = rec.ram.len(), "QEMU VM added");
        let description = match &rec.launch {
            LaunchSpec::QemuVm { description } => Some((**description).clone()),
            _ => None,
        };
        let reply = AttachReply { ram: rec.ram.clone(), description, notes: rec.notes.clone() };
        self.add_vm(rec);
        Ok(reply)
    }

    async fn list(&self) -> ListReply {
        let vms: Vec<VmRecord> = self.vms.lock().unwrap().values().cloned().collect();
        let mut out = vec![];
        for rec in vms {
            let (name, console, uid, runtime_dir, ram) =
                (rec.name.clone(), rec.console.clone(), rec.uid, rec.runtime_dir.clone(), rec.ram.clone());
            let state = match tokio::task::spawn_blocking(move || Self::source_vm(rec).status()).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => VmState::error(crate::error_chain(&e)),
                Err(e) => VmState::error(e.to_string()),
            };
            out.push(VmEntry { name, state, console, uid, runtime_dir, ram });
        }
        ListReply { vms: out }
    }

    pub(super) fn migrate(
        self: Arc<Self>,
        vm: String,
        to: String,
        options: MigrateOptions,
    ) -> Result<MigrateReply, RequestError> {
        let rec =
            self.vm_record(&vm).ok_or_else(|| RequestError::NoVm { vm: vm.clone(), host: self.cfg.name.clone() })?;
        self.refuse_unknown(&vm)?;
        if to == self.cfg.name {
            return Err(RequestError::AlreadyHere { vm, host: to });
        }
        let addr = self.peer_addr(&to)?;
        options.check()?;
        let mut fallbacks = vec![];
        for h in &options.fallback {
            if h == &self.cfg.name || h == &to {
                return Err(RequestError::Fallback(format!("{h} is the source or the destination")));
            }
            fallbacks.push((h.clone(), self.peer_addr(h)?));
        }
        let ctx = engine::Context {
            me: self.cfg.name.clone(),
            tls: self.cfg.tls.clone(),
            data_encryption: self.cfg.data_encryption,
            unordered: crate::hooks::unordered().is_some(),
            rdma: self.rdma.clone(),
            peer_timeout: self.cfg.peer_timeout,
            fallbacks,
        };
        let handle = MigrationHandle::new(&vm, &to);
        // Checked and claimed under one lock: two requests at once (the API
        // and an evacuation) cannot both start the VM, or pass the limit.
        {
            let mut all = self.migrations.lock().unwrap();
            if self.shutdown.is_cancelled() {
                return Err(RequestError::ShuttingDown);
            }
            if let Some(m) = all.get(&vm).filter(|m| !m.is_done()) {
                return Err(RequestError::Migrating { vm, to: m.to.clone() });
            }
            let out = all.values().filter(|m| !m.is_done()).count();
            if let Some(max) = self.cfg.max_outgoing.filter(|&m| out >= m as usize) {
                return Err(RequestError::Busy(max));
            }
            all.insert(vm.clone(), handle.clone());
        }
        handle.on_events(self.events.clone());
        handle.emit(engine::watch::EventKind::Started { to: to.clone() });
        let journal = self.clone();
        let migration = Some(handle.migration);
        handle.on_phase(Box::new(move |vm, destination, phase| {
            let e = MigrationEntry { vm: vm.into(), destination: destination.into(), phase: phase.into(), migration };
            journal.journal_migration(vm, Some(e));
        }));
        let (me, h) = (self.clone(), handle.clone());
        tokio::spawn(async move {
            let vm_name = rec.name.clone();
            let run = tokio::spawn(engine::run(ctx, Self::source_vm(rec), to.clone(), addr, options, h.clone()));
            // Whatever happens, the handle gets a report: waiters never hang.
            let report = run.await.unwrap_or_else(|e| engine::Report {
                vm: vm_name,
                destination: to,
                error: Some(format!("internal error: {e}; check where the VM runs")),
                reason: Some(engine::Reason::of(engine::FailureKind::Internal)),
                ..Default::default()
            });
            match report.result {
                engine::Outcome::Completed => me.remove_vm(&report.vm),
                engine::Outcome::Unknown => me.outcome_unknown(&report.vm, &report.destination, Some(h.migration)),
                _ => {}
            }
            me.journal_migration(&report.vm, None);
            me.totals.ended(report.result);
            h.finish(report);
        });
        Ok(MigrateReply { migration: handle.id.clone() })
    }

    async fn retarget(&self, vm: String, to: String, forward: bool) -> Result<RetargetReply, RequestError> {
        let m = self.migration(&vm)?;
        if m.is_done() {
            return Err(RequestError::Finished(vm));
        }
        if to == self.cfg.name {
            return Err(RequestError::IsSource(to));
        }
        let addr = self.peer_addr(&to)?;
        m.retarget(to.clone(), addr, forward).await.map_err(RequestError::Retarget)?;
        Ok(RetargetReply { retargeted_to: to })
    }

    fn status(&self, vm: Option<String>) -> Result<StatusReply, RequestError> {
        let all: Vec<Arc<MigrationHandle>> = match vm {
            Some(v) => vec![self.migration(&v)?],
            None => self.migrations.lock().unwrap().values().cloned().collect(),
        };
        Ok(StatusReply { migrations: all.iter().map(|m| m.status()).collect() })
    }

    async fn wait(&self, vm: &str) -> Result<MigrationStatus, RequestError> {
        let m = self.migration(vm)?;
        m.wait().await;
        Ok(m.status())
    }

    fn steer(&self, vm: &str, s: engine::Steering) -> Result<SteerReply, RequestError> {
        let m = self.migration(vm)?;
        if m.is_done() {
            return Err(RequestError::Finished(vm.into()));
        }
        if m.switching_over() {
            return Err(RequestError::Steering(format!("too late: {vm} is paused for its switchover")));
        }
        if s.is_empty() {
            return Err(RequestError::Steering(
                "nothing to change: give a rate cap, a downtime limit or force-complete".into(),
            ));
        }
        if s.max_bandwidth_mbps.is_some_and(|b| !(b == 0.0 || (b >= 0.1 && b.is_finite()))) {
            return Err(RequestError::Steering("max_bandwidth_mbps must be 0 (no cap) or at least 0.1".into()));
        }
        if s.downtime_ms.is_some_and(|d| !(1..=crate::engine::options::MAX_DOWNTIME_MS).contains(&d)) {
            return Err(RequestError::Steering(format!(
                "downtime_ms must be 1 to {}",
                crate::engine::options::MAX_DOWNTIME_MS
            )));
        }
        m.steer(&s);
        Ok(SteerReply { migration: m.id.clone(), steering: s })
    }

    fn drain(&self, on: bool) -> DrainReply {
        self.set_drained(on);
        let c = self.capacity();
        DrainReply { host: self.cfg.name.clone(), drained: c.drained, incoming: c.incoming }
    }

    async fn cancel(&self, vm: &str) -> Result<MigrationStatus, RequestError> {
        let m = self.migration(vm)?;
        if m.is_done() {
            return Err(RequestError::Finished(vm.into()));
        }
        m.cancel.cancel();
        m.wait().await;
        Ok(m.status())
    }

    async fn resume(&self, vm: &str) -> Result<Done, RequestError> {
        let rec =
            self.vm_record(vm).ok_or_else(|| RequestError::NoVm { vm: vm.into(), host: self.cfg.name.clone() })?;
        self.refuse_unknown(vm)?;
        tokio::task::spawn_blocking(move || Self::source_vm(rec).resume()).await??;
        Ok(Done {})
    }
}

impl Agent {
    fn refuse_unknown(&self, vm: &str) -> Result<(), RequestError> {
        match self.unknown_outcome(vm) {
            Some(u) => Err(RequestError::OutcomeUnknown { vm: vm.into(), destination: u.destination }),
            None => Ok(()),
        }
    }

    /// An operator settles an unknown outcome: the VM runs on `runs_on`
    /// (stopped and forgotten here) or here (resumed).
    async fn resolve(&self, vm: &str, runs_on: &str) -> Result<Done, RequestError> {
        if self.unknown_outcome(vm).is_none() {
            return Err(RequestError::NotUnknown(vm.into()));
        }
        let how = if runs_on == "here" || runs_on == self.cfg.name { Settled::Here } else { Settled::Moved };
        self.settle(vm, how).await?;
        Ok(Done {})
    }
}
