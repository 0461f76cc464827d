//! `dcmigrate demo`: three agents on this machine, a guest that dirties
//! memory (the synthetic one, or a real QEMU booting the test guest image),
//! a live migration with progress and a retarget, and the final report.

use super::parse_size;
use super::progress;
use crate::agent::api::Client;
use crate::engine::options::{DEFAULT_DOWNTIME_MS, DEFAULT_STREAMS};
use crate::engine::{MigrateOptions, Report};
use crate::testbed::qemu::{self, heartbeats};
use crate::testbed::Testbed;
use crate::vm::synthetic::{Pattern, Workload};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::{Path, PathBuf};

/// The kind of VM the demo migrates.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DemoVm {
    /// The synthetic guest (no QEMU needed).
    Synthetic,
    /// qemu-system-x86_64 (TCG) booting the image from tests/guest-image/build.
    Qemu,
}

/// `dcmigrate demo` arguments.
#[derive(Args)]
pub struct DemoArgs {
    /// The kind of VM to migrate.
    #[arg(long, value_enum, default_value_t = DemoVm::Synthetic)]
    pub vm: DemoVm,
    /// Guest RAM size.
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    pub guest_size: u64,
    /// MB/s of memory the guest dirties.
    #[arg(long, default_value_t = 50.0)]
    pub dirty_rate: f64,
    /// Retarget to the third host once this fraction of what there is to send
    /// (RAM without holes) reached the second.
    #[arg(long)]
    pub retarget_at: Option<f64>,
    /// Cap in MB/s per migration (default: none; 40 for --vm qemu, whose
    /// guest holds little data, so that there is time to retarget).
    #[arg(long)]
    pub max_bandwidth: Option<f64>,
    /// Largest acceptable downtime, in milliseconds.
    #[arg(long, default_value_t = DEFAULT_DOWNTIME_MS)]
    pub downtime_ms: u64,
    /// Parallel data streams per migration.
    #[arg(long, default_value_t = DEFAULT_STREAMS)]
    pub streams: usize,
    /// Print only the JSON report.
    #[arg(long)]
    pub json: bool,
}

/// Runs the demo; returns the exit code of the migration it shows.
pub(crate) fn run(a: DemoArgs) -> Result<i32> {
    if let Some(f) = a.retarget_at {
        if !(0.0..1.0).contains(&f) {
            bail!("--retarget-at takes a fraction of RAM in [0, 1), got {f}");
        }
    }
    let say = |s: String| {
        if !a.json {
            eprintln!("{s}");
        }
    };
    let exe = std::env::current_exe()?;
    let mut tb = Testbed::start(&exe, &["hostA", "hostB", "hostC"]).context("starting three local agents")?;
    for h in &tb.hosts {
        say(format!("agent {} up: control {}, API {}", h.name, h.control, h.api.display()));
    }
    let (serial_a, cap) = start_vm(&a, &mut tb, &say)?;
    let options = MigrateOptions {
        downtime_ms: a.downtime_ms,
        streams: a.streams,
        max_bandwidth_mbps: cap,
        ..Default::default()
    };
    say("migrating demo-vm from hostA to hostB".into());
    let client = tb.client("hostA");
    client.migrate("demo-vm", "hostB", options)?;
    let report = follow(&client, a.retarget_at, a.json)?;
    progress::print_report(&report, a.json);
    let on: Vec<_> =
        tb.hosts.iter().filter(|h| tb.vm_on(&h.name, "demo-vm").is_some()).map(|h| h.name.clone()).collect();
    say(format!("demo-vm is registered on: {}", on.join(", ")));
    if let (Some(serial_a), Some(host)) = (serial_a, report.vm_runs_on.as_deref()) {
        say(heartbeat_line(&tb, &serial_a, host));
    }
    Ok(progress::exit_code(&report))
}

/// Starts the demo's VM on hostA; returns its serial console (QEMU) and the
/// rate cap to migrate it with.
fn start_vm(a: &DemoArgs, tb: &mut Testbed, say: &impl Fn(String)) -> Result<(Option<PathBuf>, Option<f64>)> {
    match a.vm {
        DemoVm::Synthetic => {
            let w = Workload { dirty_rate_mbps: a.dirty_rate, hot_fraction: 1.0, pattern: Pattern::Random, seed: 7 };
            say(format!(
                "starting guest demo-vm on hostA: {} MiB RAM, dirtying {} MB/s",
                a.guest_size >> 20,
                a.dirty_rate
            ));
            tb.start_guest("hostA", "demo-vm", a.guest_size, &w, false, &[])?;
            Ok((None, a.max_bandwidth))
        }
        DemoVm::Qemu => {
            if !qemu::qemu_available() {
                bail!("{} not found: apt-get install qemu-system-x86", qemu::QEMU);
            }
            let image = qemu::guest_image().context("no guest image: run tests/guest-image/build first")?;
            say(format!("booting QEMU demo-vm on hostA: {} MiB RAM in a shared file backend", a.guest_size >> 20));
            let spec = qemu::QemuSpec {
                ram: vec![("ram0".into(), a.guest_size, qemu::Backend::File)],
                image: Some(image),
                huge: None,
            };
            let g = tb.start_qemu("hostA", "demo-vm", &spec)?;
            let booted = crate::testbed::wait_for(120, || {
                let s = std::fs::read_to_string(g.serial()).unwrap_or_default();
                (heartbeats(&s).len() >= 3).then_some(())
            });
            booted.context("the guest did not print its heartbeat within 120 s")?;
            say(format!("guest booted; its serial console: {}", g.serial().display()));
            Ok((Some(g.serial()), a.max_bandwidth.or(Some(40.0))))
        }
    }
}

/// Follows the migration; once hostB holds the chosen share, retargets to hostC.
fn follow(client: &Client, retarget_at: Option<f64>, json: bool) -> Result<Report> {
    let mut pending = retarget_at;
    let mut to_send = None;
    progress::follow_with(client, "demo-vm", json, |m| {
        let f = pending?;
        let sent = m.progress.bytes_sent as f64;
        if sent <= 0.0 {
            return None;
        }
        // What there was to send: fixed at the first look, once holes are known.
        let total = *to_send.get_or_insert(sent + m.progress.remaining_bytes as f64);
        let frac = sent / f64::max(total, 1.0);
        if m.done || frac < f {
            return None;
        }
        pending = None;
        Some(match client.retarget("demo-vm", "hostC", true) {
            Ok(_) => {
                format!(
                    "{:.0}% of the RAM reached hostB: retargeted to hostC; hostB forwards what it holds",
                    frac * 100.0
                )
            }
            Err(e) => format!("retarget to hostC failed: {e}"),
        })
    })
}

/// The QEMU guest's heartbeat before and after the move.
fn heartbeat_line(tb: &Testbed, serial_a: &Path, host: &str) -> String {
    let last = heartbeats(&std::fs::read_to_string(serial_a).unwrap_or_default()).last().copied();
    let dest = tb.vm_on(host, "demo-vm").and_then(|v| v.console).unwrap_or_default();
    let next = crate::testbed::wait_for(20, || {
        let b = heartbeats(&std::fs::read_to_string(&dest).unwrap_or_default());
        (b.len() >= 2).then_some(b)
    });
    format!(
        "guest heartbeat: last on hostA {}, then on {host} {}",
        last.map_or("none".into(), |n| n.to_string()),
        next.map_or("nothing yet".into(), |b| format!("{b:?}"))
    )
}
