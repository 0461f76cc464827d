//! The per-host daemon: owns the VMs registered on this host, runs
//! migrations as their source, serves peers as a destination
//! ([`incoming`]), and exposes the local API ([`api`], one handler per
//! request in `handlers`) that the CLI and orchestrators use, and
//! Prometheus metrics ([`metrics`]).

pub(crate) mod access;
pub mod api;
pub(crate) mod ask;
pub(crate) mod capacity;
pub mod evacuate;
mod handlers;
pub(crate) mod journal;
pub(crate) mod metrics;
mod outcome;
mod users;

pub use handlers::RequestError;
pub(crate) mod incoming;

use crate::engine::MigrationHandle;
use crate::tls::SharedTls;
use crate::transport::Receiver;
use crate::vm::synthetic::SyntheticVm;
use crate::vm::{LaunchSpec, SourceVm, VmRecord};
use api::{Request, MAX_LINE};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixStream};
use tokio_util::sync::CancellationToken;

/// How long shutting down waits for migrations to end.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(30);

/// The agent could not start.
#[derive(Debug, Error)]
pub enum AgentError {
    /// A listener could not be bound.
    #[error("binding {what} {addr}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// Its address.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The data directory could not be created.
    #[error("data dir {0}")]
    DataDir(PathBuf, #[source] std::io::Error),
    /// A directory or the API socket cannot be set up safely.
    #[error("setting up the agent's files")]
    Access(#[from] access::AccessError),
    /// The data dir cannot be opened to `--qemu-user`.
    #[error("preparing the data dir for QEMU's user")]
    QemuUser(#[from] crate::vm::qemu::UserError),
}

/// An agent's configuration.
#[derive(Clone)]
pub struct AgentConfig {
    /// This host's name (must be the DNS name in its certificate).
    pub name: String,
    /// Control channel (mTLS) address.
    pub listen: SocketAddr,
    /// Data plane address; port 0 picks one.
    pub data_listen: SocketAddr,
    /// The local API socket.
    pub api: PathBuf,
    /// Who may use the API besides root and the agent's user.
    pub api_access: access::ApiAccess,
    /// The TLS identity (SIGHUP replaces it: see [`Agent::reload_certs`]).
    pub tls: SharedTls,
    /// Where `tls` was loaded from (ca.pem, NAME.pem, NAME.key): SIGHUP
    /// loads them again.
    pub certs: PathBuf,
    /// Where Prometheus metrics are served (`GET /metrics`), if anywhere.
    pub metrics: Option<SocketAddr>,
    /// Hosts this agent may migrate and forward to.
    pub peers: HashMap<String, SocketAddr>,
    /// Hosts that may migrate VMs to this one (`None`: every peer).
    pub accept_from: Option<HashSet<String>>,
    /// Directories a peer's launch spec may name files under (disk images,
    /// kernels), besides the VM's own directory.
    pub storage: Vec<PathBuf>,
    /// Limits on incoming RAM and sessions.
    pub limits: capacity::Limits,
    /// Most outgoing migrations at once.
    pub max_outgoing: Option<u32>,
    /// Start drained (a drain set through the API is journaled too).
    pub drained: bool,
    /// Encrypt TCP data streams, and refuse plain ones.
    pub data_encryption: bool,
    /// Who incoming QEMUs run as: a uid of their own each, one shared
    /// user, or the agent's user.
    pub qemu_run_as: crate::vm::qemu::RunAs,
    /// What the networks VM descriptions name are on this host.
    pub networks: crate::vm::qemu::network::Networks,
    /// Take peers' synthetic guests (test and demo beds; never by default).
    pub synthetic_guests: bool,
    /// The systemd scope incoming VMs start in (else the agent's children).
    pub qemu_scope: Option<crate::vm::scope::Scope>,
    /// Where incoming VMs' RAM on base pages lives (tmpfs recommended).
    pub data_dir: PathBuf,
    /// Where incoming RAM on huge pages lives: one hugetlbfs mount per
    /// page size.
    pub hugepages: Vec<crate::memory::backing::HugeMount>,
    /// RDMA device, GID and queue-pair settings.
    pub rdma: crate::transport::rdma::RdmaOptions,
    /// Never use RDMA.
    pub no_rdma: bool,
    /// A peer silent this long (no heartbeat, no acknowledgement) is lost.
    pub peer_timeout: Duration,
    /// Where the journal lives (VMs, migrations, incoming sessions).
    pub state_dir: PathBuf,
}

impl AgentConfig {
    /// Hosts that may send data streams here: sources this host accepts,
    /// and its peers (forwarders).
    fn data_senders(&self) -> Arc<dyn Fn(&str) -> bool + Send + Sync> {
        let hosts: HashSet<String> = self.peers.keys().chain(self.accept_from.iter().flatten()).cloned().collect();
        Arc::new(move |h: &str| hosts.contains(h))
    }

    /// The addresses of the configured peers (their connections keep slots
    /// of their own on the listeners).
    pub fn peer_ips(&self) -> HashSet<std::net::IpAddr> {
        self.peers.values().map(|a| crate::transport::session::counted_as(a.ip())).collect()
    }

    /// Whether `host` (a verified peer name) may send data streams here.
    pub fn sends_data(&self, host: &str) -> bool {
        self.peers.contains_key(host) || self.accept_from.as_ref().is_some_and(|a| a.contains(host))
    }

    /// Whether `host` (a verified peer name) may open sessions here.
    pub fn accepts_from(&self, host: &str) -> bool {
        match &self.accept_from {
            Some(hosts) => hosts.contains(host),
            None => self.peers.contains_key(host),
        }
    }
}

/// A running agent.
pub struct Agent {
    /// Its configuration.
    pub cfg: AgentConfig,
    /// Its data plane's sessions.
    pub receiver: Receiver,
    data_addr: Mutex<Option<SocketAddr>>,
    vms: Mutex<HashMap<String, VmRecord>>,
    /// VMs with an incoming session here (at most one each), and the room
    /// each holds in the data dir.
    incoming: Mutex<HashMap<String, capacity::Reservation>>,
    migrations: Mutex<HashMap<String, Arc<MigrationHandle>>>,
    /// VMs whose migration's outcome is unknown (see `outcome`).
    unknown: Mutex<HashMap<String, outcome::Unknown>>,
    shutdown: CancellationToken,
    /// This host's RDMA device, or why there is none.
    pub rdma: Result<Arc<crate::transport::rdma::Rdma>, String>,
    /// Every migration's events, for `watch` (see [`crate::engine::watch`]).
    events: crate::engine::watch::EventSink,
    /// Whether this host is drained; incoming sessions watch it.
    drained: tokio::sync::watch::Sender<bool>,
    /// Evacuations of this host (see [`evacuate`]).
    evacuations: Mutex<Vec<Arc<evacuate::Evacuation>>>,
    /// What the metrics count as it happens.
    totals: metrics::Totals,
    /// Where metrics are served, once bound.
    metrics_addr: Mutex<Option<SocketAddr>>,
    /// Uids incoming sessions hold (see `take_identity`).
    uids: Mutex<HashSet<u32>>,
    /// Migrations that committed here lately (see `outcome_of`).
    committed: Mutex<std::collections::VecDeque<(crate::protocol::MigrationId, String)>>,
}

impl Agent {
    /// An agent with this configuration (it does nothing until [`run`](Self::run)).
    pub fn new(cfg: AgentConfig) -> Arc<Self> {
        let rdma =
            if cfg.no_rdma { Err("disabled (--no-rdma)".to_string()) } else { crate::transport::rdma::open(&cfg.rdma) };
        match &rdma {
            Ok(r) => {
                tracing::info!(device = %r.name(), "RDMA available");
                if let Some(w) = r.warning() {
                    tracing::warn!("RDMA: {w}");
                }
            }
            Err(e) => tracing::info!("RDMA unavailable, TCP only: {e}"),
        }
        let receiver = Receiver::new(crate::transport::secure::ServerTls {
            config: cfg.tls.clone(),
            required: cfg.data_encryption,
            allowed: cfg.data_senders(),
        });
        Arc::new(Self {
            rdma,
            cfg,
            receiver,
            data_addr: Mutex::new(None),
            vms: Mutex::new(HashMap::new()),
            incoming: Mutex::new(HashMap::new()),
            migrations: Mutex::new(HashMap::new()),
            unknown: Mutex::new(HashMap::new()),
            shutdown: CancellationToken::new(),
            // Watchers that fall this far behind are told how many they missed.
            events: tokio::sync::broadcast::channel(4096).0,
            drained: tokio::sync::watch::channel(false).0,
            evacuations: Mutex::new(vec![]),
            totals: Default::default(),
            metrics_addr: Mutex::new(None),
            uids: Mutex::new(HashSet::new()),
            committed: Mutex::new(Default::default()),
        })
    }

    /// Loads the certificates again from the same directory (SIGHUP): new
    /// connections use them, open ones keep theirs. If they cannot be
    /// loaded, the agent keeps the identity it has and says why.
    pub fn reload_certs(&self) -> Result<crate::tls::CertInfo, crate::tls::TlsError> {
        match crate::tls::TlsConfig::load_dir(&self.cfg.certs, &self.cfg.name) {
            Ok(tls) => {
                let cert = tls.cert.clone();
                self.cfg.tls.replace(tls);
                tracing::info!(fingerprint = %cert.fingerprint, not_after = cert.not_after, "certificates reloaded");
                Ok(cert)
            }
            Err(e) => {
                let dir = self.cfg.certs.display();
                tracing::error!(
                    "certificates not reloaded from {dir}, keeping the current ones: {}",
                    crate::error_chain(&e)
                );
                Err(e)
            }
        }
    }

    /// Where VMs' runtime directories (monitor, logs) are: the agent's own.
    pub fn runtime_root(&self) -> PathBuf {
        self.cfg.state_dir.join("vms")
    }

    /// Asks [`run`](Self::run) to return.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// The data listener's port (0 before `run` bound it).
    pub fn data_port(&self) -> u16 {
        self.data_addr.lock().unwrap().map(|a| a.port()).unwrap_or(0)
    }

    /// Whether a VM of this name is registered here.
    pub fn has_vm(&self, name: &str) -> bool {
        self.vms.lock().unwrap().contains_key(name)
    }

    /// Claims the right to receive `vm` into `room`: refused if a session
    /// already has it (`Ok(false)`), or if it does not fit beside the others.
    pub fn begin_incoming(&self, vm: &str, room: capacity::Reservation) -> Result<bool, capacity::CapacityError> {
        let mut incoming = self.incoming.lock().unwrap();
        if incoming.contains_key(vm) {
            return Ok(false);
        }
        // No two VMs of this host write one disk image.
        let vms = self.vms.lock().unwrap();
        let users = vms.values().map(|v| (&v.name, &v.disks)).chain(incoming.iter().map(|(n, r)| (n, &r.disks)));
        for (name, disks) in users {
            if disks.iter().any(|d| room.disks.contains(d)) {
                return Err(capacity::CapacityError::DiskInUse(name.clone()));
            }
        }
        drop(vms);
        // A migration's id names one session, once: never a second one.
        if let Some(id) = room.migration {
            let pending = incoming.values().any(|r| r.migration == Some(id));
            if pending || self.committed.lock().unwrap().iter().any(|(c, _)| *c == id) {
                return Err(capacity::CapacityError::Reused(id));
            }
        }
        if *self.drained.borrow() {
            return Err(capacity::CapacityError::Drained);
        }
        capacity::admit(&self.cfg.limits, (&self.cfg.data_dir, &self.cfg.hugepages), &room, incoming.values())?;
        incoming.insert(vm.to_owned(), room);
        self.totals.incoming_opened();
        Ok(true)
    }

    /// What this host advertises to peers choosing a destination.
    pub fn capacity(&self) -> crate::protocol::control::Capacity {
        // Outside the lock: it reads the files' sizes and the file system,
        // and admitting a session waits for the lock.
        let incoming: Vec<capacity::Reservation> = self.incoming.lock().unwrap().values().cloned().collect();
        let at = (self.cfg.data_dir.as_path(), self.cfg.hugepages.as_slice());
        capacity::advertise(&self.cfg.limits, at, incoming.iter(), *self.drained.borrow())
    }

    /// Why `vm`'s incoming session can no longer complete here, if the data
    /// dir's free space fell below what its RAM files still need.
    pub fn short_of_room(&self, vm: &str) -> Option<String> {
        // Outside the lock: it reads the files' sizes and the file system.
        let room = self.incoming.lock().unwrap().get(vm).cloned()?;
        capacity::shortfall(&self.cfg.data_dir, &room)
    }

    /// Whether this host is drained.
    pub fn is_drained(&self) -> bool {
        *self.drained.borrow()
    }

    /// Drains this host (or ends the drain): incoming sessions are told,
    /// and ask their sources to leave. Kept in the state dir.
    pub fn set_drained(&self, on: bool) {
        if self.drained.send_replace(on) != on {
            tracing::info!(drained = on, "{}", if on { "drained: no new incoming migrations" } else { "drain ended" });
        }
        self.journal_drain(on);
    }

    /// Resolves when the drain state changes; gives the new state.
    pub fn drain_watch(&self) -> tokio::sync::watch::Receiver<bool> {
        self.drained.subscribe()
    }

    /// The disk images `vm`'s incoming session will write.
    pub fn incoming_disks(&self, vm: &str) -> Vec<crate::vm::ident::FileIdent> {
        self.incoming.lock().unwrap().get(vm).map(|r| r.disks.clone()).unwrap_or_default()
    }

    /// Gives the claim of [`begin_incoming`](Self::begin_incoming) back.
    pub fn end_incoming(&self, vm: &str) {
        self.incoming.lock().unwrap().remove(vm);
    }

    /// Registers a VM that now lives on this host.
    pub fn add_vm(&self, rec: VmRecord) {
        tracing::info!(vm = %rec.name, "VM registered");
        self.vms.lock().unwrap().insert(rec.name.clone(), rec);
        self.journal_vms();
    }

    /// The VM left this host.
    fn remove_vm(&self, name: &str) {
        self.vms.lock().unwrap().remove(name);
        self.journal_vms();
    }

    fn source_vm(rec: VmRecord) -> Arc<dyn SourceVm> {
        match rec.launch {
            LaunchSpec::Synthetic { .. } => Arc::new(SyntheticVm::new(rec)),
            LaunchSpec::Qemu { .. } | LaunchSpec::QemuVm { .. } => Arc::new(crate::vm::qemu::QemuVm::new(rec)),
        }
    }

    /// Runs the agent until `shutdown`.
    pub async fn run(self: Arc<Self>) -> Result<(), AgentError> {
        access::own_dir(&self.cfg.data_dir)?;
        self.cfg.hugepages.iter().try_for_each(|m| access::own_dir(&m.dir))?;
        self.open_data_dir()?;
        access::own_dir(&self.cfg.state_dir)?;
        access::own_dir(&self.runtime_root())?;
        self.journal_init().map_err(|e| AgentError::DataDir(self.cfg.state_dir.clone(), e))?;
        let ram_dirs: Vec<&Path> = std::iter::once(self.cfg.data_dir.as_path())
            .chain(self.cfg.hugepages.iter().map(|m| m.dir.as_path()))
            .collect();
        crate::vm::qemu::clean_leftovers(&self.runtime_root(), &ram_dirs, &self.cfg.name);
        self.recover().await;
        let bind = |what, addr: SocketAddr| async move {
            TcpListener::bind(addr).await.map_err(|source| AgentError::Bind { what, addr: addr.to_string(), source })
        };
        let control = bind("control listener", self.cfg.listen).await?;
        let data = bind("data listener", self.cfg.data_listen).await?;
        *self.data_addr.lock().unwrap() = data.local_addr().ok();
        let api = self.cfg.api_access.bind(&self.cfg.api)?;
        if let Some(addr) = self.cfg.metrics {
            let listener = bind("metrics listener", addr).await?;
            *self.metrics_addr.lock().unwrap() = listener.local_addr().ok();
            tracing::info!(metrics = ?listener.local_addr().ok(), "serving Prometheus metrics at /metrics");
            tokio::spawn(metrics::serve(self.clone(), listener));
        }
        tracing::info!(name = %self.cfg.name, control = %self.cfg.listen, data = ?data.local_addr().ok(), api = %self.cfg.api.display(), "agent up");
        tokio::spawn(self.receiver.clone().serve(data, self.cfg.peer_ips()));
        tokio::spawn(self.clone().serve_peers(control));
        loop {
            tokio::select! {
                conn = api.accept() => match conn {
                    Ok((s, _)) => drop(tokio::spawn(self.clone().serve_api(s))),
                    Err(e) => {
                        tracing::warn!("API socket: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                _ = self.shutdown.cancelled() => break,
            }
        }
        self.stop_migrations().await;
        let _ = std::fs::remove_file(&self.cfg.api);
        Ok(())
    }

    /// On shutdown: every migration is cancelled (the VM keeps running here,
    /// destinations discard) and waited for, within a bound; one past
    /// `Resume` cannot be cancelled and is waited for too.
    async fn stop_migrations(&self) {
        let running: Vec<Arc<MigrationHandle>> =
            self.migrations.lock().unwrap().values().filter(|m| !m.is_done()).cloned().collect();
        if running.is_empty() {
            return;
        }
        tracing::info!(n = running.len(), "shutting down: cancelling migrations");
        for m in &running {
            m.cancel.cancel();
        }
        // The migrations run on tasks of their own: waiting for each in turn
        // ends when the last has.
        let all = async {
            for m in &running {
                m.wait().await;
            }
        };
        if tokio::time::timeout(SHUTDOWN_WAIT, all).await.is_err() {
            tracing::warn!("migrations did not end within {SHUTDOWN_WAIT:?}; leaving the rest to the journal");
        }
    }

    /// Accepts control connections from peers; each becomes an incoming session.
    async fn serve_peers(self: Arc<Self>, control: TcpListener) {
        let control = crate::transport::session::Listener::new(control, "control listener", self.cfg.peer_ips());
        loop {
            let (tcp, addr, slot) = control.accept().await;
            tcp.set_nodelay(true).ok();
            let me = self.clone();
            tokio::spawn(async move {
                if !crate::transport::session::first_byte(&tcp).await {
                    tracing::debug!(%addr, "control connection: nothing sent in time; closed");
                    return;
                }
                let allowed = |host: &str| me.cfg.accepts_from(host);
                match crate::control::accept(&me.cfg.tls.current(), &me.cfg.name, allowed, tcp).await {
                    Ok(conn) => incoming::serve(me, conn).await,
                    Err(e) => tracing::warn!(%addr, "refused peer: {}", crate::error_chain(&e)),
                }
                drop(slot);
            });
        }
    }

    /// One API connection: a request per line, a reply per line.
    async fn serve_api(self: Arc<Self>, s: UnixStream) {
        let cred = s.peer_cred();
        let groups = access::peer_groups(std::os::fd::AsFd::as_fd(&s));
        let (rd, mut wr) = s.into_split();
        let uid = match cred {
            Ok(c) if self.cfg.api_access.allows(c.uid(), c.gid(), &groups) => c.uid(),
            other => {
                let who = other.map_or("unknown".into(), |c| c.uid().to_string());
                tracing::warn!(uid = %who, "API connection refused: not root, the agent's user or --api-group");
                let msg =
                    json!({"ok": false, "error": format!("permission denied: uid {who} may not use this agent's API")});
                let _ = wr.write_all(format!("{msg}\n").as_bytes()).await;
                // Read (and drop) what the client sends for a moment, so its
                // request is not cut off by a reset before it reads the reply.
                let mut sink = tokio::io::sink();
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    tokio::io::copy(&mut rd.take(MAX_LINE as u64), &mut sink),
                )
                .await;
                return;
            }
        };
        let mut lines = BufReader::new(rd.take(u64::MAX));
        loop {
            let mut line = String::new();
            // A line may not exceed MAX_LINE: the limit is reset per line.
            lines.get_mut().set_limit(MAX_LINE as u64 + 1);
            match lines.read_line(&mut line).await {
                Ok(0) | Err(_) => return,
                Ok(n) if n > MAX_LINE => {
                    let _ = wr.write_all(b"{\"ok\":false,\"error\":\"request line too long\"}\n").await;
                    return;
                }
                Ok(_) => {}
            }
            let reply = match serde_json::from_str::<Request>(&line) {
                Ok(Request::Watch { vm }) => {
                    self.watch(vm, &mut lines, &mut wr).await;
                    return;
                }
                Ok(req) => match self.clone().handle_from(uid, req).await {
                    Ok(mut v) => {
                        v["ok"] = json!(true);
                        v
                    }
                    Err(e) => json!({"ok": false, "error": crate::error_chain(&e)}),
                },
                Err(e) => json!({"ok": false, "error": format!("bad request: {e}")}),
            };
            let mut out = reply.to_string();
            out.push('\n');
            if wr.write_all(out.as_bytes()).await.is_err() {
                return;
            }
        }
    }

    /// `watch`: an `ok` line, then every event (of `vm`'s migrations, or
    /// all) as a line, until the client leaves, or `vm`'s migration ended.
    async fn watch<R, W>(&self, vm: Option<String>, client: &mut R, wr: &mut W)
    where
        R: tokio::io::AsyncBufRead + Unpin,
        W: tokio::io::AsyncWrite + Unpin,
    {
        use crate::engine::watch::EventKind;
        // Subscribed first: an end after the check below is in the stream.
        let mut rx = self.events.subscribe();
        // A VM of this host may be watched before its migration starts.
        let mut one = match &vm {
            Some(v) => match self.migration(v) {
                Ok(m) => Some(m),
                Err(_) if self.vm_record(v).is_some() => None,
                Err(e) => {
                    let msg = json!({"ok": false, "error": crate::error_chain(&e)});
                    let _ = wr.write_all(format!("{msg}\n").as_bytes()).await;
                    return;
                }
            },
            None => None,
        };
        if wr.write_all(b"{\"ok\":true}\n").await.is_err() {
            return;
        }
        let mut buf = String::new();
        loop {
            // The VM's migration ended before, or among events this watcher
            // missed: its end, from the report, closes the stream.
            if let Some(m) = one.as_ref().filter(|m| m.is_done()) {
                if let Some(e) = m.ended_event() {
                    let _ =
                        wr.write_all(format!("{}\n", serde_json::to_string(&e).unwrap_or_default()).as_bytes()).await;
                }
                return;
            }
            let line = tokio::select! {
                e = rx.recv() => match e {
                    Ok(e) if vm.as_ref().is_none_or(|v| *v == e.vm) => {
                        let end = vm.is_some() && matches!(e.kind, EventKind::Ended { .. });
                        (serde_json::to_string(&e).unwrap_or_default(), end)
                    }
                    Ok(_) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        // The missed events may hold the end: checked above.
                        if let Some(v) = &vm {
                            one = self.migration(v).ok();
                        }
                        (json!({"event": "lagged", "missed": n}).to_string(), false)
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
                // The client closed its end (or sent more: not expected).
                _ = client.read_line(&mut buf) => return,
                _ = self.shutdown.cancelled() => return,
            };
            if wr.write_all(format!("{}\n", line.0).as_bytes()).await.is_err() || line.1 {
                return;
            }
        }
    }

    fn peer_addr(&self, host: &str) -> Result<SocketAddr, RequestError> {
        self.cfg.peers.get(host).copied().ok_or_else(|| RequestError::UnknownHost(host.into()))
    }

    fn migration(&self, vm: &str) -> Result<Arc<MigrationHandle>, RequestError> {
        self.migrations.lock().unwrap().get(vm).cloned().ok_or_else(|| RequestError::NoMigration(vm.into()))
    }

    pub(super) fn vm_record(&self, vm: &str) -> Option<VmRecord> {
        self.vms.lock().unwrap().get(vm).cloned()
    }

    /// Serializes a handler's reply as the API's object.
    fn reply<T: serde::Serialize>(r: T) -> Result<Value, RequestError> {
        Ok(serde_json::to_value(r)?)
    }
}
