//! Command-line interface: argument definitions and the commands that talk
//! to an agent's API. The daemon itself lives in [`crate::agent`].

pub(crate) mod agent;
pub(crate) mod config;
pub(crate) mod demo;
pub(crate) mod host;
pub(crate) mod operate;
pub(crate) mod progress;
pub(crate) mod vm;

use crate::agent::api::Client;
use crate::dirty::TrackerKind;
use crate::engine::options::VerifyMode;
use crate::engine::options::{DEFAULT_DOWNTIME_MS, DEFAULT_MAX_ROUNDS, DEFAULT_MAX_TIME_S, DEFAULT_STREAMS};
use crate::engine::{BudgetAction, MigrateOptions, Steering};
use crate::guest::GuestOptions;
use crate::protocol::TransportKind;
use crate::vm::synthetic::{Pattern, Workload};
use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

const DEFAULT_API: &str = "/run/dcmigrate/agent.sock";

/// The whole command line.
#[derive(Parser)]
#[command(name = "dcmigrate", version, about = "Live VM migration whose destination can change while it runs")]
pub struct Cli {
    /// The command to run.
    #[command(subcommand)]
    pub cmd: Cmd,
}

/// Parses the command line (exits on an error, as clap does); for `agent`,
/// notes which options the command line or the environment gave, which
/// win over its configuration file.
pub fn parse() -> Cli {
    try_parse_from(std::env::args_os()).unwrap_or_else(|e| e.exit())
}

/// [`parse`] of `argv` (the program's name first).
pub fn try_parse_from<I, T>(argv: I) -> Result<Cli, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    use clap::{CommandFactory, FromArgMatches};
    let m = Cli::command().try_get_matches_from(argv)?;
    let mut cli = Cli::from_arg_matches(&m)?;
    if let (Cmd::Agent(a), Some(sub)) = (&mut cli.cmd, m.subcommand_matches("agent")) {
        a.given = config::given(sub);
    }
    Ok(cli)
}

/// `dcmigrate agent`: its options merged with its configuration file
/// (here: `config` fills `agent`'s arguments), then the agent.
fn run_agent(mut a: agent::AgentArgs) -> Result<()> {
    let given = std::mem::take(&mut a.given);
    let file = a.config.clone();
    config::merge(&mut a, file.as_deref(), &given)?;
    agent::run_agent(a)
}

/// `--api`, for the commands that talk to the local agent.
#[derive(Args, Clone)]
pub struct ApiArg {
    /// The local agent's API socket.
    #[arg(long, env = "DCMIGRATE_API", default_value = DEFAULT_API, global = true)]
    pub api: PathBuf,
}

/// The commands.
#[derive(Subcommand)]
pub enum Cmd {
    /// Run the per-host agent (daemon).
    Agent(Box<agent::AgentArgs>),
    /// TLS material for agents.
    Certs {
        /// What to do with them.
        #[command(subcommand)]
        cmd: CertsCmd,
    },
    /// Run a synthetic guest (a process that behaves like a VM).
    Guest(GuestArgs),
    /// Live-migrate a VM of the local agent to another host.
    Migrate(MigrateArgs),
    /// Change the destination of a running migration.
    Retarget {
        /// The VM being migrated.
        vm: String,
        /// The new destination host.
        #[arg(long)]
        to: String,
        /// Drop the old destination instead of having it forward what it holds
        /// (cancel-and-restart, for comparison).
        #[arg(long)]
        no_forward: bool,
        /// Print the agent's answer as JSON.
        #[arg(long)]
        json: bool,
        /// The local agent.
        #[command(flatten)]
        api: ApiArg,
    },
    /// Change a running migration: its rate cap and downtime limit.
    Set {
        /// The VM being migrated.
        vm: String,
        /// The source's new rate cap, MB/s (0 lifts the cap); taken at once.
        #[arg(long, value_name = "MBPS", value_parser = operate::parse_rate)]
        max_bandwidth: Option<f64>,
        /// The new downtime limit, ms; taken at the next round's end.
        #[arg(long, value_name = "MS")]
        downtime_ms: Option<u64>,
        /// Print the agent's answer as JSON.
        #[arg(long)]
        json: bool,
        /// The local agent.
        #[command(flatten)]
        api: ApiArg,
    },
    /// Have a running migration switch over at its next round's end,
    /// whatever its downtime estimate.
    ForceComplete {
        /// The VM being migrated.
        vm: String,
        /// Print the agent's answer as JSON.
        #[arg(long)]
        json: bool,
        /// The local agent.
        #[command(flatten)]
        api: ApiArg,
    },
    /// Move every VM off this host (see `evacuation` for its state).
    Evacuate(host::EvacuateArgs),
    /// An evacuation's state or final report (default: the latest).
    Evacuation {
        /// Its id.
        id: Option<String>,
        /// Cancel it: nothing more starts, running migrations are cancelled.
        #[arg(long)]
        cancel: bool,
        /// Print it as JSON.
        #[arg(long)]
        json: bool,
        /// The local agent.
        #[command(flatten)]
        api: ApiArg,
    },
    /// Take no new incoming migrations on this host; running ones move to
    /// their fallback hosts (this host forwards what it holds).
    Drain(host::DrainArgs),
    /// End a drain.
    Undrain(host::DrainArgs),
    /// Stream migration events as JSON lines (phases, rounds, progress,
    /// retargets, operator changes, the end): of VM's migration until it
    /// ends, or of every migration until interrupted.
    Watch {
        /// Only this VM's migration (default: all of them, until ^C).
        vm: Option<String>,
        /// The local agent.
        #[command(flatten)]
        api: ApiArg,
    },
    /// Progress or result of migrations on the local agent.
    Status {
        /// Only this VM's migration (default: all of them).
        vm: Option<String>,
        /// Print the migrations as JSON.
        #[arg(long)]
        json: bool,
        /// The local agent.
        #[command(flatten)]
        api: ApiArg,
    },
    /// Cancel a migration: the VM keeps running here.
    Cancel {
        /// The VM whose migration to cancel.
        vm: String,
        /// Print the final report as JSON.
        #[arg(long)]
        json: bool,
        /// The local agent.
        #[command(flatten)]
        api: ApiArg,
    },
    /// Start a VM that `migrate --suspend` left paused on this host.
    Resume {
        /// The paused VM to start.
        vm: String,
        /// The local agent.
        #[command(flatten)]
        api: ApiArg,
    },
    /// Settle a VM whose migration's outcome is unknown (its `Resume` was
    /// sent and the answer lost): say where it runs.
    Resolve {
        /// The VM.
        vm: String,
        /// Where it runs: the destination's host name (it is then stopped
        /// and forgotten here), or `here` (it is resumed here).
        #[arg(long)]
        runs_on: String,
        /// The local agent.
        #[command(flatten)]
        api: ApiArg,
    },
    /// VMs on the local agent.
    Vms {
        /// Print the VMs and their state as JSON.
        #[arg(long)]
        json: bool,
        /// The local agent.
        #[command(flatten)]
        api: ApiArg,
    },
    /// Manage the local agent's VMs.
    Vm {
        /// What to do.
        #[command(subcommand)]
        cmd: VmCmd,
    },
    /// Three agents on this machine, a guest, a migration with a retarget, a report.
    Demo(demo::DemoArgs),
}

/// `dcmigrate vm` commands.
#[derive(Subcommand)]
pub enum VmCmd {
    /// Put a running QEMU under the local agent (its RAM must be in shared
    /// memory backends; see the README).
    Add {
        /// The name the VM gets at the agent.
        name: String,
        /// The QEMU's QMP socket (`-qmp unix:PATH,server=on,wait=off`), for the agent alone.
        #[arg(long)]
        qmp: PathBuf,
        /// JSON file {"binary": "qemu-system-x86_64", "args": [...]}: the
        /// command line the VM's description is read from, instead of the
        /// QEMU's own.
        #[arg(long)]
        launch_spec: Option<PathBuf>,
        /// The operator network a netdev is on, ID=NAME (each destination
        /// maps NAME with its `--network`); default: `user` for user
        /// networking, a tap's bridge for a tap (repeat).
        #[arg(long = "network", value_name = "ID=NAME", value_parser = vm::parse_pair)]
        networks: Vec<(String, String)>,
        /// Print the agent's answer (the RAM backends found) as JSON.
        #[arg(long)]
        json: bool,
        /// The local agent.
        #[command(flatten)]
        api: ApiArg,
    },
}

/// `dcmigrate certs` commands.
#[derive(Subcommand)]
pub enum CertsCmd {
    /// Make a CA and one certificate per host in DIR.
    Init {
        /// Where to write ca.pem, ca.key and HOST.pem/HOST.key (created if missing).
        dir: PathBuf,
        /// Comma-separated host names.
        #[arg(long, value_delimiter = ',', required = true)]
        hosts: Vec<String>,
    },
}

/// Parses sizes like 256M, 1G, 4GiB, 65536 (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim().trim_end_matches("iB").trim_end_matches('B');
    let (num, mult) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 1 << 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 1 << 30),
        Some('T' | 't') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    let n: f64 = num.trim().parse().map_err(|_| format!("not a size: {s:?}"))?;
    if n.is_nan() || n <= 0.0 {
        return Err(format!("size must be positive: {s:?}"));
    }
    Ok((n * mult as f64) as u64)
}

/// `dcmigrate guest` arguments.
#[derive(Args)]
pub struct GuestArgs {
    /// The VM's name.
    #[arg(long)]
    pub name: String,
    /// RAM size (e.g. 256M, 1G).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub size: u64,
    /// Megabytes per second of pages dirtied.
    #[arg(long, default_value_t = 0.0)]
    pub dirty_rate: f64,
    /// Fraction of RAM that receives the writes.
    #[arg(long, default_value_t = 1.0)]
    pub hot_fraction: f64,
    /// Which pages the writes go to.
    #[arg(long, value_enum, default_value_t = Pattern::Random)]
    pub pattern: Pattern,
    /// Seed of the initial RAM content and of the random page choice.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Where the RAM file, dirty log and control socket go.
    #[arg(long, default_value = "/dev/shm")]
    pub dir: PathBuf,
    /// Register with the agent at this API socket.
    #[arg(long)]
    pub agent: Option<PathBuf>,
    /// Keep the RAM file when the guest quits.
    #[arg(long)]
    pub keep_ram: bool,
    /// Do not offer the guest's dirty log to the agent (it then tracks the
    /// guest like any VM: soft-dirty or hash).
    #[arg(long)]
    pub no_dirty_log: bool,
    /// Leave every Nth page of RAM unwritten (zero) at start; 0: none.
    #[arg(long, default_value_t = 8)]
    pub zero_every: usize,
    /// Of the other pages, give only every Nth data and write zeros to the
    /// rest (allocated, zero by content: a guest that zeroed its memory).
    #[arg(long, default_value_t = 1)]
    pub data_every: usize,
    /// Make the device state this large (MiB), as a VM with a lot of device
    /// memory (video RAM) has.
    #[arg(long, default_value_t = 0)]
    pub device_state_mb: u64,
    /// (agents) wait for device state on an existing RAM file.
    #[arg(long, hide = true)]
    pub incoming: bool,
    /// The RAM file to create (default DIR/NAME-ram0.ram), e.g. on a
    /// hugetlbfs mount for a guest on huge pages; with --incoming, the one
    /// the agent created.
    #[arg(long)]
    pub ram_file: Option<PathBuf>,
    /// (agents) quit if the agent that started the guest dies before it is committed.
    #[arg(long, hide = true)]
    pub exit_with_parent: bool,
    /// (test builds) leave every Nth write out of the dirty log, like a
    /// tracker that misses writes.
    #[cfg(feature = "test-hooks")]
    #[arg(long, hide = true, default_value_t = 0)]
    pub test_miss_every: u64,
}

/// `dcmigrate migrate` arguments.
#[derive(Args)]
pub struct MigrateArgs {
    /// The VM to migrate.
    pub vm: String,
    /// Destination host (a peer of the local agent).
    #[arg(long)]
    pub to: String,
    /// Largest acceptable downtime; rounds continue until the estimate fits.
    #[arg(long, default_value_t = DEFAULT_DOWNTIME_MS)]
    pub downtime_ms: u64,
    /// Parallel data streams.
    #[arg(long, default_value_t = DEFAULT_STREAMS)]
    pub streams: usize,
    /// Data plane: RDMA where both ends can (auto), or only TCP, or only RDMA.
    #[arg(long, value_enum, default_value_t = TransportKind::Auto)]
    pub transport: TransportKind,
    /// Round budget before `--on-budget` applies.
    #[arg(long, default_value_t = DEFAULT_MAX_ROUNDS)]
    pub max_rounds: u32,
    /// Time budget in seconds before `--on-budget` applies.
    #[arg(long, default_value_t = DEFAULT_MAX_TIME_S)]
    pub max_time: u64,
    /// What to do when the budget runs out before convergence.
    #[arg(long, value_enum, default_value_t = BudgetAction::Force)]
    pub on_budget: BudgetAction,
    /// How both ends' RAM is compared before the destination resumes: `live`
    /// (every chunk while the guest runs, the pause only what changed since),
    /// `full` (every chunk in the pause), `off`.
    #[arg(long, value_enum, default_value_t = VerifyMode::Live)]
    pub verify: VerifyMode,
    /// The same as `--verify off`.
    #[arg(long)]
    pub no_verify: bool,
    /// Leave the VM paused on the destination.
    #[arg(long)]
    pub suspend: bool,
    /// Force a dirty tracker (default: the VM's best that passes its self-test).
    #[arg(long, value_enum)]
    pub tracker: Option<TrackerKind>,
    /// Cap the sending rate (MB/s).
    #[arg(long)]
    pub max_bandwidth: Option<f64>,
    /// Milliseconds the pause may take before `Resume`; past it the VM
    /// resumes here and the destination discards everything (default: the
    /// larger of the downtime limit and the estimate, plus 5 s).
    #[arg(long)]
    pub switchover_timeout: Option<u64>,
    /// Hosts to move to, in order, if the destination is lost or refuses
    /// before the switchover, is drained, or falls behind (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub fallback: Vec<String>,
    /// When the destination falls behind.
    #[command(flatten)]
    pub slow: host::SlowArgs,
    /// Print only the final report, as JSON.
    #[arg(long)]
    pub json: bool,
    /// Start the migration and return; follow it with `status`.
    #[arg(long)]
    pub detach: bool,
    /// The local agent, which runs the migration.
    #[command(flatten)]
    pub api: ApiArg,
}

impl MigrateArgs {
    /// The migration options these arguments ask for (defaults elsewhere).
    pub fn options(&self) -> MigrateOptions {
        MigrateOptions {
            downtime_ms: self.downtime_ms,
            streams: self.streams,
            transport: self.transport,
            max_rounds: self.max_rounds,
            max_time_s: self.max_time,
            on_budget: self.on_budget,
            verify: if self.no_verify { VerifyMode::Off } else { self.verify },
            suspend: self.suspend,
            tracker: self.tracker,
            max_bandwidth_mbps: self.max_bandwidth,
            switchover_timeout_ms: self.switchover_timeout,
            fallback: self.fallback.clone(),
            slow_rate_mbps: self.slow.slow_rate,
            slow_for_s: self.slow.slow_for,
            ..Default::default()
        }
    }
}

/// Runs a parsed command line; returns the process's exit code.
pub fn run(cli: Cli) -> Result<i32> {
    match cli.cmd {
        Cmd::Agent(a) => run_agent(*a).map(|_| 0),
        Cmd::Certs { cmd: CertsCmd::Init { dir, hosts } } => {
            crate::tls::init_certs(&dir, &hosts)?;
            println!("CA and certificates for {} written to {}", hosts.join(", "), dir.display());
            Ok(0)
        }
        Cmd::Guest(g) => run_guest(g).map(|_| 0),
        Cmd::Migrate(m) => migrate(m),
        Cmd::Retarget { vm, to, no_forward, json, api } => {
            let r = Client::new(api.api).retarget(&vm, &to, !no_forward)?;
            match json {
                true => println!("{}", serde_json::to_string(&r)?),
                false => println!("{vm} now migrates to {to}"),
            }
            Ok(0)
        }
        Cmd::Set { vm, max_bandwidth, downtime_ms, json, api } => {
            let s = Steering { max_bandwidth_mbps: max_bandwidth, downtime_ms, force_complete: false };
            operate::steer(&api.api, &vm, s, json)
        }
        Cmd::ForceComplete { vm, json, api } => {
            operate::steer(&api.api, &vm, Steering { force_complete: true, ..Default::default() }, json)
        }
        Cmd::Watch { vm, api } => operate::watch(&api.api, vm.as_deref()),
        Cmd::Evacuate(a) => host::evacuate(a),
        Cmd::Evacuation { id, cancel, json, api } => host::show(&api, id.as_deref(), cancel, json),
        Cmd::Drain(d) => host::drain(d, true),
        Cmd::Undrain(d) => host::drain(d, false),
        Cmd::Status { vm, json, api } => {
            let all = Client::new(api.api).status(vm.as_deref())?;
            match json {
                true => println!("{}", serde_json::to_string_pretty(&all)?),
                false => progress::print_status(&all),
            }
            Ok(0)
        }
        Cmd::Cancel { vm, json, api } => {
            let m = Client::new(api.api).cancel(&vm)?;
            if let Some(r) = &m.report {
                progress::print_report(r, json);
            }
            Ok(0)
        }
        Cmd::Resume { vm, api } => {
            Client::new(api.api).resume(&vm)?;
            println!("{vm} resumed");
            Ok(0)
        }
        Cmd::Resolve { vm, runs_on, api } => {
            Client::new(api.api).resolve(&vm, &runs_on)?;
            println!("{vm}: settled, it runs on {runs_on}");
            Ok(0)
        }
        Cmd::Vms { json, api } => {
            let vms = Client::new(api.api).list()?;
            match json {
                true => println!("{}", serde_json::to_string_pretty(&vms)?),
                false => vms.iter().for_each(|v| {
                    use crate::memory::backing::show;
                    let ram: Vec<String> = v
                        .ram
                        .iter()
                        .map(|r| format!("{} {} MiB on {} pages", r.id, r.size >> 20, show(r.page_size)))
                        .collect();
                    println!("{}\t{}\t{}", v.name, v.state.phase.as_deref().unwrap_or("unknown"), ram.join(", "))
                }),
            }
            Ok(0)
        }
        Cmd::Vm { cmd } => vm::add(cmd),
        Cmd::Demo(d) => demo::run(d),
    }
}

fn migrate(m: MigrateArgs) -> Result<i32> {
    let client = Client::new(m.api.api.clone());
    client.migrate(&m.vm, &m.to, m.options())?;
    if m.detach {
        println!("migration of {} to {} started", m.vm, m.to);
        return Ok(0);
    }
    let report = progress::follow(&client, &m.vm, m.json)?;
    progress::print_report(&report, m.json);
    Ok(progress::exit_code(&report))
}

fn run_guest(g: GuestArgs) -> Result<()> {
    if g.incoming && g.ram_file.is_none() {
        bail!("--incoming needs --ram-file");
    }
    let opts = GuestOptions {
        name: g.name,
        dir: g.dir,
        size: g.size,
        workload: Workload {
            dirty_rate_mbps: g.dirty_rate,
            hot_fraction: g.hot_fraction,
            pattern: g.pattern,
            seed: g.seed,
        },
        keep_ram: g.keep_ram,
        incoming_ram: if g.incoming { g.ram_file.clone() } else { None },
        ram_file: if g.incoming { None } else { g.ram_file },
        exit_with_parent: g.exit_with_parent,
        zero_every: g.zero_every,
        data_every: g.data_every,
        device_state_bytes: g.device_state_mb << 20,
        #[cfg(feature = "test-hooks")]
        miss_every: g.test_miss_every,
    };
    let (agent, incoming, no_log) = (g.agent, g.incoming, g.no_dirty_log);
    crate::guest::run(opts, |rec| match &agent {
        Some(api_path) => {
            let mut vm = rec.clone();
            if no_log {
                vm.dirty_log = None;
            }
            Client::new(api_path).register(vm).map_err(|e| crate::error_chain(&e))?;
            eprintln!("guest {} registered with {}", rec.name, api_path.display());
            Ok(())
        }
        // Incoming guests are managed by the agent that launched them.
        None if incoming => Ok(()),
        None => {
            println!("{}", serde_json::to_string(rec).expect("json"));
            Ok(())
        }
    })?;
    Ok(())
}
