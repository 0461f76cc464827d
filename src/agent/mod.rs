//! The per-host daemon: owns the VMs registered on this host, runs
//! migrations as their source, serves peers as a destination, and exposes the
//! local API ([`api`]) that the CLI and orchestrators use.

pub mod api;
pub mod incoming;
pub mod peer;

use crate::engine::{self, MigrationHandle};
use crate::tls::TlsConfig;
use crate::transport::tcp::Receiver;
use crate::vm::synthetic::SyntheticVm;
use crate::vm::{LaunchSpec, SourceVm, VmRecord};
use api::Request;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Error)]
pub enum AgentError {
    #[error("binding {what} {addr}: {source}")]
    Bind { what: &'static str, addr: String, source: std::io::Error },
    #[error("data dir {0}: {1}")]
    DataDir(PathBuf, std::io::Error),
}

#[derive(Clone)]
pub struct AgentConfig {
    pub name: String,
    /// Control channel (mTLS) address.
    pub listen: SocketAddr,
    /// Data plane address; port 0 picks one.
    pub data_listen: SocketAddr,
    pub api: PathBuf,
    pub tls: TlsConfig,
    pub peers: HashMap<String, SocketAddr>,
    /// Where incoming VMs' RAM lives (tmpfs recommended).
    pub data_dir: PathBuf,
    /// RDMA device to use (default: the first with an active port).
    pub rdma_device: Option<String>,
    /// Never use RDMA.
    pub no_rdma: bool,
}

pub struct Agent {
    pub cfg: AgentConfig,
    pub receiver: Receiver,
    data_addr: Mutex<Option<SocketAddr>>,
    vms: Mutex<HashMap<String, VmRecord>>,
    /// VMs with an incoming session here (at most one each).
    incoming: Mutex<std::collections::HashSet<String>>,
    migrations: Mutex<HashMap<String, Arc<MigrationHandle>>>,
    shutdown: CancellationToken,
    /// This host's RDMA device, or why there is none.
    pub rdma: Result<Arc<crate::transport::rdma::Rdma>, String>,
}

impl Agent {
    pub fn new(cfg: AgentConfig) -> Arc<Self> {
        let rdma = if cfg.no_rdma {
            Err("disabled (--no-rdma)".to_string())
        } else {
            crate::transport::rdma::open(cfg.rdma_device.as_deref())
        };
        match &rdma {
            Ok(r) => tracing::info!(device = %r.name(), "RDMA available"),
            Err(e) => tracing::info!("RDMA unavailable, TCP only: {e}"),
        }
        Arc::new(Self {
            rdma,
            cfg,
            receiver: Receiver::default(),
            data_addr: Mutex::new(None),
            vms: Mutex::new(HashMap::new()),
            incoming: Mutex::new(Default::default()),
            migrations: Mutex::new(HashMap::new()),
            shutdown: CancellationToken::new(),
        })
    }

    /// Asks [`run`](Self::run) to return.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    pub fn data_port(&self) -> u16 {
        self.data_addr.lock().unwrap().map(|a| a.port()).unwrap_or(0)
    }

    pub fn has_vm(&self, name: &str) -> bool {
        self.vms.lock().unwrap().contains_key(name)
    }

    /// Claims the right to receive `vm`; false if a session already has it.
    pub fn begin_incoming(&self, vm: &str) -> bool {
        self.incoming.lock().unwrap().insert(vm.to_owned())
    }

    pub fn end_incoming(&self, vm: &str) {
        self.incoming.lock().unwrap().remove(vm);
    }

    pub fn add_vm(&self, rec: VmRecord) {
        tracing::info!(vm = %rec.name, "VM registered");
        self.vms.lock().unwrap().insert(rec.name.clone(), rec);
    }

    fn source_vm(rec: VmRecord) -> Arc<dyn SourceVm> {
        match rec.launch {
            LaunchSpec::Synthetic { .. } => Arc::new(SyntheticVm::new(rec)),
            LaunchSpec::Qemu { .. } => Arc::new(crate::vm::qemu::QemuVm::new(rec)),
        }
    }

    /// Runs the agent until `shutdown`.
    pub async fn run(self: Arc<Self>) -> Result<(), AgentError> {
        std::fs::create_dir_all(&self.cfg.data_dir).map_err(|e| AgentError::DataDir(self.cfg.data_dir.clone(), e))?;
        crate::vm::qemu::clean_leftovers(&self.cfg.data_dir);
        let bind = |what, addr: SocketAddr| async move {
            TcpListener::bind(addr).await.map_err(|source| AgentError::Bind { what, addr: addr.to_string(), source })
        };
        let control = bind("control listener", self.cfg.listen).await?;
        let data = bind("data listener", self.cfg.data_listen).await?;
        *self.data_addr.lock().unwrap() = data.local_addr().ok();
        if let Some(dir) = self.cfg.api.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let _ = std::fs::remove_file(&self.cfg.api);
        let api = UnixListener::bind(&self.cfg.api).map_err(|source| AgentError::Bind {
            what: "API socket",
            addr: self.cfg.api.display().to_string(),
            source,
        })?;
        tracing::info!(name = %self.cfg.name, control = %self.cfg.listen, data = ?data.local_addr().ok(), api = %self.cfg.api.display(), "agent up");
        tokio::spawn(self.receiver.clone().serve(data));
        {
            let me = self.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((tcp, addr)) = control.accept().await else {
                        continue;
                    };
                    tcp.set_nodelay(true).ok();
                    let me = me.clone();
                    tokio::spawn(async move {
                        match peer::accept(&me.cfg.tls, &me.cfg.name, tcp).await {
                            Ok((stream, host)) => incoming::serve(me, stream, host).await,
                            Err(e) => tracing::warn!(%addr, "refused peer: {e}"),
                        }
                    });
                }
            });
        }
        loop {
            tokio::select! {
                conn = api.accept() => {
                    if let Ok((s, _)) = conn {
                        tokio::spawn(self.clone().serve_api(s));
                    }
                }
                _ = self.shutdown.cancelled() => break,
            }
        }
        for m in self.migrations.lock().unwrap().values() {
            m.cancel.cancel();
        }
        let _ = std::fs::remove_file(&self.cfg.api);
        Ok(())
    }

    async fn serve_api(self: Arc<Self>, s: UnixStream) {
        let (rd, mut wr) = s.into_split();
        let mut lines = BufReader::new(rd).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let reply = match serde_json::from_str::<Request>(&line) {
                Ok(req) => match self.clone().handle(req).await {
                    Ok(mut v) => {
                        v["ok"] = json!(true);
                        v
                    }
                    Err(e) => json!({"ok": false, "error": e}),
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

    fn peer_addr(&self, host: &str) -> Result<SocketAddr, String> {
        self.cfg
            .peers
            .get(host)
            .copied()
            .ok_or_else(|| format!("unknown host {host:?}: start the agent with --peer {host}=ADDR"))
    }

    fn migration(&self, vm: &str) -> Result<Arc<MigrationHandle>, String> {
        self.migrations.lock().unwrap().get(vm).cloned().ok_or_else(|| format!("no migration of {vm:?} on this host"))
    }

    async fn handle(self: Arc<Self>, req: Request) -> Result<Value, String> {
        match req {
            Request::Info => Ok(json!({
                "name": self.cfg.name, "control": self.cfg.listen.to_string(),
                "data_port": self.data_port(), "peers": self.cfg.peers.keys().collect::<Vec<_>>(),
                "rdma": match &self.rdma { Ok(r) => json!({"device": r.name()}), Err(e) => json!({"unavailable": e}) },
            })),
            Request::Register { vm } => {
                if self.has_vm(&vm.name) {
                    return Err(format!("a VM named {:?} is already registered here", vm.name));
                }
                self.add_vm(vm);
                Ok(json!({}))
            }
            Request::AttachQemu { name, qmp, launch } => {
                if !crate::vm::qemu::valid_id(&name) {
                    return Err(format!("invalid VM name {name:?}: use letters, digits, '-', '_' or '.'"));
                }
                if self.has_vm(&name) {
                    return Err(format!("a VM named {name:?} is already registered here"));
                }
                let rec = tokio::task::spawn_blocking(move || crate::vm::qemu::attach(&name, &qmp, launch))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?;
                tracing::info!(vm = %rec.name, regions = rec.ram.len(), "QEMU VM added");
                let out = json!({ "ram": rec.ram });
                self.add_vm(rec);
                Ok(out)
            }
            Request::List => {
                let vms: Vec<VmRecord> = self.vms.lock().unwrap().values().cloned().collect();
                let mut out = vec![];
                for rec in vms {
                    let name = rec.name.clone();
                    let st = tokio::task::spawn_blocking(move || Self::source_vm(rec).status()).await.ok();
                    let state = match st {
                        Some(Ok(v)) => v,
                        Some(Err(e)) => json!({"error": e.to_string()}),
                        None => Value::Null,
                    };
                    out.push(json!({"name": name, "state": state}));
                }
                Ok(json!({ "vms": out }))
            }
            Request::Migrate { vm, to, options } => {
                let rec = self
                    .vms
                    .lock()
                    .unwrap()
                    .get(&vm)
                    .cloned()
                    .ok_or_else(|| format!("no VM named {vm:?} on {}", self.cfg.name))?;
                if to == self.cfg.name {
                    return Err(format!("{vm} already runs on {to}"));
                }
                let addr = self.peer_addr(&to)?;
                if let Ok(m) = self.migration(&vm) {
                    if !m.is_done() {
                        return Err(format!("{vm} is already migrating to {}", m.to));
                    }
                }
                if !(1..=64).contains(&options.streams) {
                    return Err(format!("streams must be 1 to 64, not {}", options.streams));
                }
                if options.max_bandwidth_mbps.is_some_and(|b| !(b >= 0.1 && b.is_finite())) {
                    return Err("max_bandwidth_mbps must be at least 0.1".into());
                }
                let ctx = engine::Context {
                    me: self.cfg.name.clone(),
                    tls: self.cfg.tls.clone(),
                    unordered: crate::hooks::unordered().is_some(),
                    rdma: self.rdma.clone(),
                };
                let handle = MigrationHandle::new(&vm, &to);
                self.migrations.lock().unwrap().insert(vm.clone(), handle.clone());
                let me = self.clone();
                let h = handle.clone();
                tokio::spawn(async move {
                    let vm_name = rec.name.clone();
                    let run =
                        tokio::spawn(engine::run(ctx, Self::source_vm(rec), to.clone(), addr, options, h.clone()));
                    // Whatever happens, the handle gets a report: waiters never hang.
                    let report = run.await.unwrap_or_else(|e| engine::Report {
                        vm: vm_name,
                        destination: to,
                        error: Some(format!("internal error: {e}; check where the VM runs")),
                        ..Default::default()
                    });
                    if report.result == engine::Outcome::Completed {
                        me.vms.lock().unwrap().remove(&report.vm);
                    }
                    h.finish(report);
                });
                Ok(json!({ "migration": handle.id }))
            }
            Request::Retarget { vm, to, forward } => {
                let m = self.migration(&vm)?;
                if m.is_done() {
                    return Err(format!("the migration of {vm} has already finished"));
                }
                if to == self.cfg.name {
                    return Err(format!("{to} is the source of this migration"));
                }
                let addr = self.peer_addr(&to)?;
                m.retarget(to.clone(), addr, forward).await?;
                Ok(json!({ "retargeted_to": to }))
            }
            Request::Status { vm } => {
                let all: Vec<Arc<MigrationHandle>> = match vm {
                    Some(v) => vec![self.migration(&v)?],
                    None => self.migrations.lock().unwrap().values().cloned().collect(),
                };
                Ok(json!({ "migrations": all.iter().map(|m| m.snapshot()).collect::<Vec<_>>() }))
            }
            Request::Wait { vm } => {
                let m = self.migration(&vm)?;
                m.wait().await;
                Ok(m.snapshot())
            }
            Request::Cancel { vm } => {
                let m = self.migration(&vm)?;
                if m.is_done() {
                    return Err(format!("the migration of {vm} has already finished"));
                }
                m.cancel.cancel();
                m.wait().await;
                Ok(m.snapshot())
            }
            Request::Resume { vm } => {
                let rec =
                    self.vms.lock().unwrap().get(&vm).cloned().ok_or_else(|| format!("no VM named {vm:?} here"))?;
                tokio::task::spawn_blocking(move || Self::source_vm(rec).resume())
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?;
                Ok(json!({}))
            }
            Request::Shutdown => {
                self.shutdown.cancel();
                Ok(json!({}))
            }
            #[cfg(feature = "test-hooks")]
            Request::Release { vm } => {
                self.migration(&vm)?.released.send_replace(true);
                Ok(json!({}))
            }
        }
    }
}
