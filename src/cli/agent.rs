//! `dcmigrate agent`: the daemon's options, turned into its configuration,
//! and the agent run until a signal stops it.

use super::{parse_size, ApiArg};
use crate::agent::{Agent, AgentConfig};
use crate::tls::TlsConfig;
use crate::vm::scope::ScopeMode;
use anyhow::{Context as _, Result};
use clap::Args;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;

/// `dcmigrate agent` arguments.
#[derive(Args)]
pub struct AgentArgs {
    /// A TOML file with any of these options (keys named as the flags,
    /// `[peers]` a table of NAME = "ADDR"); flags given here or by their
    /// environment variable win over it.
    #[arg(long, env = "DCMIGRATE_CONFIG")]
    pub config: Option<PathBuf>,
    /// This host's name (must match its certificate); required, here or in
    /// the configuration file.
    #[arg(long)]
    pub name: Option<String>,
    /// Control channel (mTLS) listen address.
    #[arg(long, default_value = "127.0.0.1:4710")]
    pub listen: SocketAddr,
    /// Data plane listen address (default: the control IP, any port).
    #[arg(long)]
    pub data_listen: Option<SocketAddr>,
    /// Directory with ca.pem, NAME.pem and NAME.key (from `certs init`);
    /// required, here or in the configuration file. SIGHUP loads them again.
    #[arg(long)]
    pub certs: Option<PathBuf>,
    /// A peer agent, NAME=ADDR (repeat for each).
    #[arg(long = "peer", value_parser = parse_peer)]
    pub peers: Vec<(String, SocketAddr)>,
    /// Peers that may migrate VMs to this host (repeat for each; default:
    /// every --peer). Others are refused after their certificate is checked.
    #[arg(long = "accept-from", env = "DCMIGRATE_ACCEPT_FROM", value_delimiter = ',')]
    pub accept_from: Vec<String>,
    /// A directory of disk images, kernels and firmware: a VM description
    /// names its files by their name beneath one (the first that has it);
    /// a source's VMs must have theirs beneath one too (repeat for each;
    /// or colon-separated in DCMIGRATE_STORAGE).
    #[arg(long = "storage", env = "DCMIGRATE_STORAGE", value_delimiter = ':', value_parser = parse_storage)]
    pub storage: Vec<PathBuf>,
    /// Where incoming VMs' RAM files on base pages go (tmpfs recommended).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// A hugetlbfs mount for incoming RAM on huge pages (its page size is
    /// read from the mount): a source region on huge pages lands on the
    /// mount of the same page size, or the migration is refused. Repeat
    /// for each page size.
    #[arg(long = "hugepages", value_name = "DIR")]
    pub hugepages: Vec<PathBuf>,
    /// Largest RAM of one incoming migration (e.g. 256G); larger ones are
    /// refused at session open. Sessions must always fit in the data dir's
    /// free space.
    #[arg(long, value_parser = parse_size)]
    pub max_session_ram: Option<u64>,
    /// Encrypt TCP data streams with TLS (the agents' certificates), and
    /// take only encrypted ones; `off` for trusted fabrics (then on both
    /// ends). RDMA is never encrypted.
    #[arg(long, env = "DCMIGRATE_DATA_ENCRYPTION", default_value = "on", value_parser = ["on", "off"])]
    pub data_encryption: String,
    /// Run every incoming QEMU as this one user (it gets each VM's RAM
    /// files; the data dir becomes 0711), instead of a uid of its own per VM.
    #[arg(long, env = "DCMIGRATE_QEMU_USER", conflicts_with = "qemu_uids")]
    pub qemu_user: Option<String>,
    /// Uids (FIRST-LAST) no account uses, one per incoming QEMU (gid the
    /// same number, plus the kvm group). Default for an agent running as
    /// root: 4026531840-4026597375.
    #[arg(long, env = "DCMIGRATE_QEMU_UIDS")]
    pub qemu_uids: Option<String>,
    /// Take peers' synthetic guests (`dcmigrate guest`), as test beds and
    /// the demo do; an operator's agent takes QEMU VMs only.
    #[arg(long, env = "DCMIGRATE_SYNTHETIC_GUESTS")]
    pub synthetic_guests: bool,
    /// What a network VM descriptions name is on this host: NAME=user
    /// (QEMU's user networking, restrict=on) or NAME=bridge:BRIDGE (a tap
    /// on that bridge); repeat. `user=user` is always there unless redefined.
    #[arg(long = "network", value_name = "NAME=user|bridge:BR")]
    pub networks: Vec<String>,
    /// Largest RAM of all incoming migrations at once.
    #[arg(long, value_parser = parse_size)]
    pub max_incoming_ram: Option<u64>,
    /// Most incoming migrations at once; more are refused at session open
    /// (a source with fallback hosts then tries the next). Default 32.
    #[arg(long, env = "DCMIGRATE_MAX_INCOMING")]
    pub max_incoming: Option<u32>,
    /// Most incoming migrations from one source at once. Default 16.
    #[arg(long, env = "DCMIGRATE_MAX_INCOMING_PER_PEER")]
    pub max_incoming_per_peer: Option<u32>,
    /// Most outgoing migrations at once (`migrate` beyond it is refused;
    /// `evacuate` queues).
    #[arg(long, env = "DCMIGRATE_MAX_OUTGOING")]
    pub max_outgoing: Option<u32>,
    /// Start drained: no new incoming migrations (as `dcmigrate drain`).
    /// A drain set through the API is kept in the state dir across restarts.
    #[arg(long)]
    pub drained: bool,
    /// Where the agent keeps its journal (VMs, migrations, incoming
    /// sessions), so that a restart settles what was in flight. Default:
    /// /var/lib/dcmigrate/NAME.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// RDMA device for the data plane (default: the first with an active port).
    #[arg(long, env = "DCMIGRATE_RDMA_DEVICE")]
    pub rdma_device: Option<String>,
    /// RoCE: the GID index to use (default: the port's RoCEv2 GID of an
    /// IPv4 address, else a global IPv6 one, else link-local).
    #[arg(long, env = "DCMIGRATE_RDMA_GID_INDEX")]
    pub rdma_gid_index: Option<u8>,
    /// Traffic class of RDMA packets (RoCE: DSCP << 2 | ECN; e.g. 106 for
    /// DSCP 26 with ECN), so that they land in the fabric's lossless class.
    #[arg(long, env = "DCMIGRATE_RDMA_TRAFFIC_CLASS", default_value_t = 0)]
    pub rdma_traffic_class: u8,
    /// InfiniBand service level (0-15).
    #[arg(long, env = "DCMIGRATE_RDMA_SL", default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=15))]
    pub rdma_sl: u8,
    /// InfiniBand P_Key index.
    #[arg(long, env = "DCMIGRATE_RDMA_PKEY_INDEX", default_value_t = 0)]
    pub rdma_pkey_index: u16,
    /// Threads that fault guest RAM in before it is registered for RDMA
    /// (default: one per core; 1 faults it in while pinning, serially).
    #[arg(long, env = "DCMIGRATE_RDMA_REGISTER_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub rdma_register_threads: Option<u16>,
    /// Register guest RAM for RDMA with on-demand paging instead of
    /// pinning it (devices that support it for RC writes, e.g. ConnectX-4
    /// and later): no locked-memory limit to raise, and pages the guest
    /// gives back are not held. A device without it uses TCP, saying why.
    #[arg(long, env = "DCMIGRATE_RDMA_ODP")]
    pub rdma_odp: bool,
    /// Use TCP only, even where RDMA is available.
    #[arg(long, env = "DCMIGRATE_NO_RDMA")]
    pub no_rdma: bool,
    /// Seconds after which a peer that sends nothing (not even a heartbeat
    /// or an acknowledgement) is declared lost.
    #[arg(long, env = "DCMIGRATE_PEER_TIMEOUT", default_value_t = 10.0)]
    pub peer_timeout: f64,
    /// Where the agent serves its API.
    #[command(flatten)]
    pub api: ApiArg,
    /// Members of this group (a name or a gid) may use the API too; by
    /// default only root and the agent's own user may (the socket is 0600).
    #[arg(long, env = "DCMIGRATE_API_GROUP")]
    pub api_group: Option<String>,
    /// Start incoming QEMUs in a systemd scope of their own, so that
    /// restarting the agent's service does not stop them: `auto` does when
    /// the agent runs under systemd.
    #[arg(long, env = "DCMIGRATE_QEMU_SCOPE", value_enum, default_value_t = ScopeMode::Auto)]
    pub qemu_scope: ScopeMode,
    /// Serve Prometheus metrics over HTTP at ADDR (`GET /metrics`).
    #[arg(long, env = "DCMIGRATE_METRICS")]
    pub metrics: Option<SocketAddr>,
    /// The options the command line or the environment gave (they win over
    /// the configuration file); filled by [`super::parse`].
    #[arg(skip)]
    pub given: HashSet<String>,
}

/// A `--storage` prefix: an absolute path without `..`.
pub(super) fn parse_storage(s: &str) -> Result<PathBuf, String> {
    let p = PathBuf::from(s);
    if !p.is_absolute() || p.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
        return Err(format!("{s}: a storage prefix is an absolute path without '..'"));
    }
    Ok(p)
}

/// Who incoming QEMUs run as: `--qemu-user`, `--qemu-uids`, or (root)
/// the default uid range, or (not root) the agent's own user.
fn run_as(user: Option<&str>, uids: Option<&str>) -> Result<crate::vm::qemu::RunAs> {
    use crate::vm::qemu::user::{UidRange, DEFAULT_UIDS};
    use crate::vm::qemu::{QemuUser, RunAs};
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    Ok(match (user, uids) {
        (Some(u), _) => RunAs::User(QemuUser::lookup(u)?),
        (None, Some(r)) if !root => {
            anyhow::bail!("--qemu-uids {r}: only an agent running as root can run QEMU as other users")
        }
        (None, Some(r)) => RunAs::Uids(r.parse::<UidRange>().map_err(|e| anyhow::anyhow!("--qemu-uids {e}"))?),
        (None, None) if root => RunAs::Uids(DEFAULT_UIDS),
        (None, None) => RunAs::Agent,
    })
}

fn parse_peer(s: &str) -> Result<(String, SocketAddr), String> {
    let (n, a) = s.split_once('=').ok_or("expected NAME=ADDR")?;
    Ok((n.to_owned(), a.parse().map_err(|e| format!("{a}: {e}"))?))
}

/// The agent's directory on each `--hugepages` mount (as the data dir's
/// default is on /dev/shm: the mount itself may be shared).
fn huge_mounts(dirs: &[PathBuf], name: &str) -> Result<Vec<crate::memory::backing::HugeMount>> {
    let mounts = crate::memory::backing::HugeMount::probe_all(dirs).context("--hugepages")?;
    Ok(mounts.into_iter().map(|m| m.within(&format!("dcmigrate-{name}"))).collect())
}

/// The agent's configuration from its arguments (merged with its
/// configuration file by the caller: see `cli::config`).
fn agent_config(a: AgentArgs) -> Result<AgentConfig> {
    let (Some(name), Some(certs)) = (a.name.clone(), a.certs.clone()) else {
        anyhow::bail!("the agent's name and certificate directory are required");
    };
    let tls = TlsConfig::load_dir(&certs, &name)
        .with_context(|| format!("loading TLS material for {name} from {}", certs.display()))?;
    let data_listen = a.data_listen.unwrap_or(SocketAddr::new(a.listen.ip(), 0));
    let state_dir = a.state_dir.clone().unwrap_or_else(|| PathBuf::from(format!("/var/lib/dcmigrate/{name}")));
    let hugepages = huge_mounts(&a.hugepages, &name)?;
    Ok(AgentConfig {
        data_dir: a.data_dir.unwrap_or_else(|| PathBuf::from(format!("/dev/shm/dcmigrate-{name}"))),
        name,
        listen: a.listen,
        data_listen,
        api: a.api.api,
        api_access: crate::agent::access::ApiAccess::with_group(a.api_group.as_deref())?,
        tls: crate::tls::SharedTls::new(tls),
        certs,
        metrics: a.metrics,
        peers: a.peers.into_iter().collect::<HashMap<_, _>>(),
        accept_from: (!a.accept_from.is_empty()).then(|| a.accept_from.into_iter().collect()),
        storage: a.storage,
        hugepages,
        data_encryption: a.data_encryption == "on",
        qemu_run_as: run_as(a.qemu_user.as_deref(), a.qemu_uids.as_deref())?,
        synthetic_guests: a.synthetic_guests,
        networks: {
            let mut n = crate::vm::qemu::network::Networks::default();
            for spec in &a.networks {
                n.add(spec)?;
            }
            n
        },
        qemu_scope: a.qemu_scope.resolve()?,
        limits: crate::agent::capacity::Limits {
            per_session: a.max_session_ram,
            total: a.max_incoming_ram,
            sessions: Some(a.max_incoming.unwrap_or(crate::agent::capacity::DEFAULT_MAX_INCOMING)),
            per_peer: Some(a.max_incoming_per_peer.unwrap_or(crate::agent::capacity::DEFAULT_MAX_PER_PEER)),
        },
        max_outgoing: a.max_outgoing,
        drained: a.drained,
        rdma: crate::transport::rdma::RdmaOptions {
            device: a.rdma_device,
            gid_index: a.rdma_gid_index,
            traffic_class: a.rdma_traffic_class,
            service_level: a.rdma_sl,
            pkey_index: a.rdma_pkey_index,
            register_threads: a.rdma_register_threads.map(usize::from),
            on_demand: a.rdma_odp,
        },
        no_rdma: a.no_rdma,
        peer_timeout: std::time::Duration::from_secs_f64(a.peer_timeout.clamp(0.5, 3600.0)),
        state_dir,
    })
}

/// Runs the agent until SIGTERM or SIGINT (or the API's `shutdown`);
/// SIGHUP loads its certificates again.
pub(crate) fn run_agent(a: AgentArgs) -> Result<()> {
    crate::vm::synthetic::own_exe().context("locating this program")?;
    let cfg = agent_config(a)?;
    if let Some(s) = &cfg.qemu_scope {
        tracing::info!(slice = %s.slice, "incoming VMs start in systemd scopes of their own");
    }
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let agent = Agent::new(cfg);
        // Listening before the agent is up: a SIGHUP must never end it.
        let mut hup =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).context("listening for SIGHUP")?;
        let reload = agent.clone();
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                // A failure is logged, and the identity stays as it was.
                let _ = reload.reload_certs();
            }
        });
        let stop = agent.clone();
        tokio::spawn(async move {
            // SIGTERM (systemd, kill) and SIGINT (Ctrl-C) stop the agent the
            // same way: migrations are cancelled first.
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            let terminated = async {
                match term.as_mut() {
                    Some(t) => drop(t.recv().await),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => tracing::info!("interrupted: stopping"),
                _ = terminated => tracing::info!("terminated: stopping"),
            }
            stop.shutdown();
        });
        agent.run().await?;
        Ok(())
    })
}
