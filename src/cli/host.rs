//! The operator's commands on a whole host: `evacuate` (every VM off it,
//! through the agent's queue, followed until it ends) and `drain` /
//! `undrain` (no new incoming migrations; running ones move elsewhere).

use super::ApiArg;
use crate::agent::api::Client;
use crate::agent::evacuate::{EvacuationStatus, Stage};
use crate::engine::options::{DEFAULT_DOWNTIME_MS, DEFAULT_SLOW_FOR_S, DEFAULT_STREAMS};
use crate::engine::MigrateOptions;
use crate::protocol::TransportKind;
use anyhow::{bail, Result};
use clap::Args;
use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How often `evacuate` asks the agent how far it is.
const POLL: Duration = Duration::from_millis(500);

/// `dcmigrate evacuate` arguments.
#[derive(Args)]
pub struct EvacuateArgs {
    /// The host to empty: the agent at --api.
    pub host: String,
    /// Candidate destinations (comma-separated); each VM goes to the one
    /// with the fewest incoming migrations and the most room, the others
    /// are its fallback hosts.
    #[arg(long, value_delimiter = ',', required = true)]
    pub to: Vec<String>,
    /// Most migrations out of the host at once (the agent's --max-outgoing
    /// also applies).
    #[arg(long, default_value_t = 2)]
    pub max_parallel: usize,
    /// Largest acceptable downtime of each migration.
    #[arg(long, default_value_t = DEFAULT_DOWNTIME_MS)]
    pub downtime_ms: u64,
    /// Cap on each migration's sending rate (MB/s).
    #[arg(long)]
    pub max_bandwidth: Option<f64>,
    /// Parallel data streams per migration.
    #[arg(long, default_value_t = DEFAULT_STREAMS)]
    pub streams: usize,
    /// Data plane.
    #[arg(long, value_enum, default_value_t = TransportKind::Auto)]
    pub transport: TransportKind,
    /// When a destination falls behind.
    #[command(flatten)]
    pub slow: SlowArgs,
    /// Print only the final report, as JSON.
    #[arg(long)]
    pub json: bool,
    /// Start it and return; follow it with `dcmigrate evacuation`.
    #[arg(long)]
    pub detach: bool,
    /// The agent of the host to empty.
    #[command(flatten)]
    pub api: ApiArg,
}

/// When a destination falls behind (`migrate`, `evacuate`).
#[derive(Args)]
pub struct SlowArgs {
    /// Falling behind: below this rate, MB/s (default: a quarter of its
    /// best); a fallback host then takes over.
    #[arg(long)]
    pub slow_rate: Option<f64>,
    /// ... for this long, seconds (0: never judged).
    #[arg(long, default_value_t = DEFAULT_SLOW_FOR_S)]
    pub slow_for: u64,
}

/// Refuses a HOST that is not the agent at the API socket.
fn same_host(client: &Client, host: &str) -> Result<()> {
    let me = client.info()?.name;
    if me != host {
        bail!(
            "{host} is not the agent at {} (that is {me}): run this on {host}, or give its --api",
            client.path().display()
        );
    }
    Ok(())
}

/// `evacuate`: starts the evacuation and follows it to its end.
pub(crate) fn evacuate(a: EvacuateArgs) -> Result<i32> {
    let client = Client::new(&a.api.api);
    same_host(&client, &a.host)?;
    let options = MigrateOptions {
        downtime_ms: a.downtime_ms,
        max_bandwidth_mbps: a.max_bandwidth,
        streams: a.streams,
        transport: a.transport,
        slow_rate_mbps: a.slow.slow_rate,
        slow_for_s: a.slow.slow_for,
        ..Default::default()
    };
    let started = client.evacuate(&a.to, a.max_parallel, options)?;
    if a.detach {
        println!("evacuation {} of {} VMs from {} started", started.id, started.vms.len(), a.host);
        return Ok(0);
    }
    let end = follow(&client, &started.id, a.json)?;
    print_evacuation(&end, a.json);
    Ok(exit_code(&end))
}

/// `evacuation`: an evacuation's state (the latest by default).
pub(crate) fn show(api: &ApiArg, id: Option<&str>, cancel: bool, json: bool) -> Result<i32> {
    let s = Client::new(&api.api).evacuation(id, cancel)?;
    print_evacuation(&s, json);
    Ok(if s.done { exit_code(&s) } else { 0 })
}

/// Polls until the evacuation ends, printing each VM's changes for people
/// (above a bar of the RAM landed, on a terminal). Ctrl-C cancels it.
fn follow(client: &Client, id: &str, quiet: bool) -> Result<EvacuationStatus> {
    let interrupted = Arc::new(AtomicBool::new(false));
    // A second Ctrl-C, while the cancel is awaited, exits at once (130).
    signal_hook::flag::register_conditional_shutdown(signal_hook::consts::SIGINT, 130, interrupted.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGINT, interrupted.clone())?;
    let bar = (!quiet && std::io::stderr().is_terminal()).then(super::progress::bar);
    let mut seen: HashMap<String, (Stage, Option<String>)> = HashMap::new();
    let mut cancel = false;
    loop {
        let ask = interrupted.load(Ordering::SeqCst) && !cancel;
        if ask {
            eprintln!("interrupted: cancelling the evacuation (VMs not yet moved stay here)");
            cancel = true;
        }
        let s = client.evacuation(Some(id), ask)?;
        for v in &s.vms {
            let now = (v.stage, v.destination.clone());
            if !quiet && seen.get(&v.vm) != Some(&now) && v.stage != Stage::Queued {
                let to = v.destination.as_deref().unwrap_or("-");
                let line = format!("{:>8.1} s  {}: {} ({to})", s.elapsed_ms / 1e3, v.vm, stage_name(v.stage));
                match &bar {
                    Some(b) => b.println(line),
                    None => println!("{line}"),
                }
            }
            seen.insert(v.vm.clone(), now);
        }
        if let Some(b) = &bar {
            let landed = |v: &crate::agent::evacuate::EvacuatedVm| match v.stage {
                Stage::Completed => v.ram_bytes,
                Stage::Migrating => v.at_destination_bytes,
                _ => 0,
            };
            b.set_length(s.vms.iter().map(|v| v.ram_bytes).sum());
            b.set_position(s.vms.iter().map(landed).sum());
            let moved = s.vms.iter().filter(|v| v.stage == Stage::Completed).count();
            b.set_message(format!("{moved}/{} VMs moved", s.vms.len()));
        }
        if s.done {
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            return Ok(s);
        }
        std::thread::sleep(POLL);
    }
}

fn stage_name(s: Stage) -> &'static str {
    match s {
        Stage::Queued => "queued",
        Stage::Migrating => "migrating",
        Stage::Completed => "completed",
        Stage::Failed => "failed",
        Stage::Unknown => "outcome unknown",
    }
}

/// Prints an evacuation's report for people, or as JSON.
pub(crate) fn print_evacuation(s: &EvacuationStatus, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(s).expect("a status serializes"));
        return;
    }
    let moved = s.vms.iter().filter(|v| v.stage == Stage::Completed).count();
    let state = if s.done { "ended" } else { "running" };
    println!(
        "Evacuation {} of {}: {state}, {moved}/{} VMs moved in {:.1} s (at most {} at once)",
        s.id,
        s.host,
        s.vms.len(),
        s.elapsed_ms / 1e3,
        s.peak_parallel
    );
    for v in &s.vms {
        let secs = v.ms.map_or("-".into(), |m| format!("{:.1} s", m / 1e3));
        let to = v.destination.as_deref().unwrap_or("-");
        println!("  {:<16} {:<16} {:<10} {secs:>9}  retargets {}", v.vm, to, stage_name(v.stage), v.retargets);
        if let (Some(e), false) = (&v.error, v.stage == Stage::Completed) {
            println!("      {e}");
        }
    }
}

/// 0 when every VM moved; else as `migrate`'s codes: 6 if an outcome is
/// unknown, 5 if a VM stayed.
pub(crate) fn exit_code(s: &EvacuationStatus) -> i32 {
    if s.vms.iter().any(|v| v.stage == Stage::Unknown) {
        6
    } else if s.vms.iter().any(|v| v.stage != Stage::Completed) {
        5
    } else {
        0
    }
}

/// `dcmigrate drain` and `undrain` arguments.
#[derive(Args)]
pub struct DrainArgs {
    /// This host (the agent at --api).
    pub host: String,
    /// Print the agent's answer as JSON.
    #[arg(long)]
    pub json: bool,
    /// The local agent.
    #[command(flatten)]
    pub api: ApiArg,
}

/// `drain` and `undrain`.
pub(crate) fn drain(d: DrainArgs, on: bool) -> Result<i32> {
    let DrainArgs { host, json, api } = d;
    let client = Client::new(&api.api);
    same_host(&client, &host)?;
    let r = client.drain(on)?;
    match (json, r.drained) {
        (true, _) => println!("{}", serde_json::to_string(&r)?),
        (false, true) => println!(
            "{host} drained: no new incoming migrations; the sources of the {} incoming ones are asked to move them elsewhere",
            r.incoming
        ),
        (false, false) => println!("{host} takes incoming migrations again"),
    }
    Ok(0)
}
