//! Following a migration from the CLI: a progress bar on a terminal, and
//! the final report for people or (with `--json`) machines.

use crate::agent::api::Client;
use crate::engine::{MigrationStatus, Outcome, Report};
use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Polls the agent until the VM's migration ends; returns its report.
/// Ctrl-C cancels the migration (the VM keeps running on the source).
pub(crate) fn follow(client: &Client, vm: &str, quiet: bool) -> Result<Report> {
    follow_with(client, vm, quiet, |_| None)
}

/// The progress bar of a migration (and of an evacuation): bytes at the destination.
pub(crate) fn bar() -> ProgressBar {
    let b = ProgressBar::new(0);
    b.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:32.cyan/blue} {bytes}/{total_bytes} {msg}")
            .expect("template")
            .progress_chars("=> "),
    );
    b
}

/// Like [`follow`]; `hook` sees every status and may return a line to
/// print above the progress bar (the demo retargets from it).
pub(crate) fn follow_with(
    client: &Client,
    vm: &str,
    quiet: bool,
    mut hook: impl FnMut(&MigrationStatus) -> Option<String>,
) -> Result<Report> {
    let interrupted = Arc::new(AtomicBool::new(false));
    // A second Ctrl-C, while the cancel is awaited, exits at once (130).
    signal_hook::flag::register_conditional_shutdown(signal_hook::consts::SIGINT, 130, interrupted.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGINT, interrupted.clone())?;
    let bar = (!quiet && std::io::stderr().is_terminal()).then(bar);
    let (mut last_phase, mut last_target) = (String::new(), String::new());
    let mut cancel_sent = false;
    loop {
        if interrupted.load(Ordering::SeqCst) && !cancel_sent {
            eprintln!("interrupted: cancelling the migration of {vm}");
            let _ = client.cancel(vm);
            cancel_sent = true;
        }
        let m = client.status(Some(vm))?.into_iter().next().ok_or_else(|| anyhow::anyhow!("no migration of {vm}"))?;
        if let Some(line) = hook(&m).filter(|_| !quiet) {
            match &bar {
                Some(b) => b.println(line),
                None => eprintln!("{line}"),
            }
        }
        let p = &m.progress;
        match &bar {
            Some(b) => {
                b.set_length(p.ram_bytes);
                b.set_position(p.at_destination_bytes);
                let eta = p.eta_s.map(|e| format!(" eta {e:.1}s")).unwrap_or_default();
                b.set_message(format!(
                    "to {} | {} | {:.0} MB/s | dirty {:.0} MB/s{eta}",
                    p.target, p.phase, p.rate_mbps, p.dirty_rate_mbps
                ));
                b.tick();
            }
            None if !quiet && (p.phase != last_phase || p.target != last_target) => eprintln!(
                "[{:>7.2}s] {} to {}: {} of {} MB at destination, {:.0} MB/s",
                p.elapsed_ms / 1e3,
                p.phase,
                p.target,
                p.at_destination_bytes / 1_000_000,
                p.ram_bytes / 1_000_000,
                p.rate_mbps
            ),
            None => {}
        }
        (last_phase, last_target) = (p.phase.clone(), p.target.clone());
        if m.done {
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            return m.report.ok_or_else(|| anyhow::anyhow!("the migration of {vm} ended without a report"));
        }
        std::thread::sleep(Duration::from_millis(150));
    }
}

/// The CLI's exit code for a migration's outcome: 0 completed, 3
/// cancelled, 4 gave up (budget), 5 failed (the VM runs on the source), 6
/// outcome unknown (see `dcmigrate resolve`). 1 and 2 are the CLI's own
/// errors.
pub(crate) fn exit_code(report: &Report) -> i32 {
    match report.result {
        Outcome::Completed => 0,
        Outcome::Cancelled => 3,
        Outcome::GaveUp => 4,
        Outcome::Failed => 5,
        Outcome::Unknown => 6,
    }
}

fn mb(b: u64) -> f64 {
    b as f64 / 1e6
}

/// Prints a report for people, or as JSON.
pub(crate) fn print_report(r: &Report, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(r).expect("a report serializes"));
        return;
    }
    let result = serde_json::to_value(r.result).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
    println!("Migration of {} from {} to {}: {result} in {:.2} s", r.vm, r.source, r.destination, r.total_ms / 1e3);
    if let Some(e) = &r.error {
        println!("  error: {e}");
    }
    if let Some(d) = r.downtime_ms {
        let p = &r.downtime;
        println!(
            "  downtime {d:.1} ms (pause {:.1}, final sync {:.1}, final send {:.1}, verify {:.1}, device state {:.1}, resume {:.1})",
            p.pause_ms, p.final_sync_ms, p.final_send_ms, p.verify_ms, p.device_state_ms, p.resume_ms
        );
    }
    let name = |v: serde_json::Result<serde_json::Value>| v.ok().and_then(|v| v.as_str().map(str::to_owned));
    println!(
        "  {} rounds, switchover {}, tracker {}, transport {} x{}",
        r.rounds.len(),
        name(serde_json::to_value(r.switchover)).unwrap_or_else(|| "none".into()),
        r.tracker.map_or("none", |t| t.name()),
        name(serde_json::to_value(r.transport)).unwrap_or_default(),
        r.streams
    );
    for t in &r.retargets {
        let after: Vec<String> = t.bytes_after.iter().map(|(h, b)| format!("{h} {:.1} MB", mb(*b))).collect();
        println!(
            "  retarget at {:.2} s ({}): {} -> {} ({}; {:.1} MB were at {}), sent after it: {}",
            t.at_ms / 1e3,
            t.reason,
            t.from,
            t.to,
            if t.forwarding { "old destination forwarded" } else { "old destination dropped" },
            mb(t.at_old_destination_bytes),
            t.from,
            after.join(", ")
        );
    }
    for d in &r.decisions {
        println!("  decided at {:.2} s about {}: {} -> {}", d.at_ms / 1e3, d.target, d.reason, d.action);
    }
    if let Some(ms) = r.after_retarget_ms {
        println!("  {:.2} s from the last retarget to the end", ms / 1e3);
    }
    let parts: Vec<String> = r.bytes_by_sender.iter().map(|(h, b)| format!("{h} {:.1} MB", mb(*b))).collect();
    println!("  sent: {} (RAM {:.1} MB)", parts.join(", "), mb(r.ram_bytes));
    if r.verified {
        println!("  verified: RAM identical at switchover ({} mismatching chunks resent)", r.verify_mismatched_chunks);
    }
    if let Some(h) = &r.vm_runs_on {
        println!("  the VM runs on {h}");
    }
}

/// Prints migrations' progress (and reports, for those that ended).
pub(crate) fn print_status(migrations: &[MigrationStatus]) {
    if migrations.is_empty() {
        println!("no migrations");
    }
    for m in migrations {
        let p = &m.progress;
        println!(
            "{} -> {}: {} ({} of {} MB at destination, {:.0} MB/s)",
            m.vm,
            m.to,
            p.phase,
            p.at_destination_bytes / 1_000_000,
            p.ram_bytes / 1_000_000,
            p.rate_mbps
        );
        if let Some(r) = &m.report {
            print_report(r, false);
        }
    }
}
