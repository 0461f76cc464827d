//! `dcmigrate demo`: three agents on this machine, a synthetic guest that
//! dirties memory, a live migration with progress, and the final report.

use super::parse_size;
use super::progress;
use crate::agent::api::Request;
use crate::engine::MigrateOptions;
use crate::testbed::Testbed;
use crate::vm::synthetic::{Pattern, Workload};
use anyhow::{bail, Context, Result};
use clap::Args;

#[derive(Args)]
pub struct DemoArgs {
    /// Guest RAM size.
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    pub guest_size: u64,
    /// MB/s of memory the guest dirties.
    #[arg(long, default_value_t = 50.0)]
    pub dirty_rate: f64,
    /// Retarget to the third host once this fraction of RAM reached the second.
    #[arg(long)]
    pub retarget_at: Option<f64>,
    #[arg(long, default_value_t = 300)]
    pub downtime_ms: u64,
    #[arg(long, default_value_t = 4)]
    pub streams: usize,
    /// Print only the JSON report.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: DemoArgs) -> Result<i32> {
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
    let w = Workload { dirty_rate_mbps: a.dirty_rate, hot_fraction: 1.0, pattern: Pattern::Random, seed: 7 };
    say(format!("starting guest demo-vm on hostA: {} MiB RAM, dirtying {} MB/s", a.guest_size >> 20, a.dirty_rate));
    tb.start_guest("hostA", "demo-vm", a.guest_size, &w, false, &[])?;
    let options = MigrateOptions { downtime_ms: a.downtime_ms, streams: a.streams, ..Default::default() };
    say("migrating demo-vm from hostA to hostB".into());
    tb.call("hostA", &Request::Migrate { vm: "demo-vm".into(), to: "hostB".into(), options })?;
    // Follow the migration; once hostB holds the chosen share, retarget to hostC.
    let api_a = tb.host("hostA").api.clone();
    let mut pending = a.retarget_at;
    let report = progress::follow_with(&api_a, "demo-vm", a.json, |m| {
        let f = pending?;
        let p = &m["progress"];
        let frac = p["at_destination_bytes"].as_f64()? / p["ram_bytes"].as_f64()?.max(1.0);
        if m["done"] == true || frac < f {
            return None;
        }
        pending = None;
        let req = Request::Retarget { vm: "demo-vm".into(), to: "hostC".into(), forward: true };
        Some(match crate::agent::api::call(&api_a, &req) {
            Ok(_) => {
                format!("{:.0}% of RAM reached hostB: retargeted to hostC; hostB forwards what it holds", frac * 100.0)
            }
            Err(e) => format!("retarget to hostC failed: {e}"),
        })
    })?;
    progress::print_report(&report, a.json);
    let on: Vec<_> =
        tb.hosts.iter().filter(|h| tb.vm_on(&h.name, "demo-vm").is_some()).map(|h| h.name.clone()).collect();
    say(format!("demo-vm is registered on: {}", on.join(", ")));
    Ok(progress::exit_code(&report))
}
