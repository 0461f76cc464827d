//! The whole fault matrix (README "Faults"): who (the source A, the first
//! destination B, which becomes a forwarder, the new destination C) × what
//! (SIGKILL then restart; SIGSTOP past the bounds then SIGCONT; the link
//! cut past the bounds then mended) × when (setup, round 0, retarget
//! install, forwarding, final round, verification, device state, commit).
//! Each moment is made certain by a test-only gate (the agent waits at that
//! point until the test has struck) or by a held switchover.
//!
//! All 66 cells take about half an hour, so a suite run takes a sample
//! ([`SAMPLE`]: each host, each fault and the pause's moments at least
//! once); the whole matrix runs on request: `DCMIGRATE_FAULT_MATRIX=all`
//! (or a filter such as `kill` or `hostB/stop`) with `cargo test --release
//! --features test-hooks --test fault_matrix -- --nocapture`. Link cuts
//! need root (network namespaces).
//!
//! Every cell must show: the VM registered and running (or, where it moved,
//! paused as asked and then resumable) on exactly one host; byte-exact RAM
//! where it moved; nothing left on the other hosts; settled within a
//! minute; and, unless the source agent itself was stopped or killed (then
//! nothing can resume the guest until it is back), a pause no longer than
//! the downtime limit plus the switchover deadline.

mod common;

use common::*;
use dcmigrate::agent::api::Client;
use dcmigrate::engine::MigrateOptions;
use dcmigrate::testbed::net::{cleanup_stale, Net};
use dcmigrate::testbed::{wait_for, Testbed};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const PEER_TIMEOUT: u64 = 2;
const SWITCHOVER_TIMEOUT_MS: u64 = 3000;
const DOWNTIME_MS: f64 = 300.0;
/// How long a stopped agent or a cut link stays so: past every bound.
const FAULT_FOR: Duration = Duration::from_secs(PEER_TIMEOUT + 3);
const VM: &str = "m";
/// The cells every suite run takes.
const SAMPLE: [&str; 6] = [
    "hostb/kill/round0",
    "hostb/cut/forwarding",
    "hosta/stop/verify",
    "hosta/kill/devicestate",
    "hostc/stop/finalround",
    "hostc/kill/commit",
];

#[derive(Clone, Copy, Debug, PartialEq)]
enum What {
    Kill,
    Stop,
    Cut,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum When {
    Setup,
    Round0,
    RetargetInstall,
    Forwarding,
    FinalRound,
    Verify,
    DeviceState,
    Commit,
}

impl When {
    /// The gate that holds the agent at this moment, and on which host.
    fn gate(self) -> Option<(&'static str, &'static str)> {
        match self {
            When::Setup => Some(("hostB", "incoming-open")),
            When::RetargetInstall => Some(("hostA", "retarget-install")),
            When::FinalRound => Some(("hostA", "final-round")),
            When::Verify => Some(("hostA", "verify")),
            When::DeviceState => Some(("hostA", "device-state")),
            When::Commit => Some(("hostC", "commit")),
            When::Round0 | When::Forwarding => None,
        }
    }

    fn retargets(self) -> bool {
        !matches!(self, When::Setup | When::Round0)
    }
}

struct Cell {
    who: &'static str,
    what: What,
    when: When,
}

impl Cell {
    fn name(&self) -> String {
        format!("{}/{:?}/{:?}", self.who, self.what, self.when).to_lowercase()
    }
}

fn cells() -> Vec<Cell> {
    let mut v = vec![];
    for when in [
        When::Setup,
        When::Round0,
        When::RetargetInstall,
        When::Forwarding,
        When::FinalRound,
        When::Verify,
        When::DeviceState,
        When::Commit,
    ] {
        for who in ["hostA", "hostB", "hostC"] {
            // C takes part only from the retarget on.
            if who == "hostC" && !when.retargets() {
                continue;
            }
            for what in [What::Kill, What::Stop, What::Cut] {
                v.push(Cell { who, what, when });
            }
        }
    }
    v
}

fn wait_file(p: &Path, secs: u64) -> bool {
    wait_for(secs, || p.exists().then_some(())).is_some()
}

/// What a cell saw, for the table.
struct Seen {
    runs_on: String,
    settle_s: f64,
    pause_ms: Option<f64>,
}

type Call = std::thread::JoinHandle<Result<(), dcmigrate::agent::api::ApiError>>;

fn gate(gates: &Path, host: &str, point: &str, end: &str) -> PathBuf {
    gates.join(format!("{host}.{point}.{end}"))
}

const HOSTS: [&str; 3] = ["hostA", "hostB", "hostC"];

fn start_bed(cell: &Cell, gates: &Path, tag: &str) -> Testbed {
    let pt = PEER_TIMEOUT.to_string();
    let gate_dir = gates.display().to_string();
    let mut env = vec![("DCMIGRATE_PEER_TIMEOUT", pt.as_str()), ("DCMIGRATE_TEST_GATE_DIR", gate_dir.as_str())];
    if let Some((_, point)) = cell.when.gate() {
        env.push(("DCMIGRATE_TEST_GATE", point));
    }
    if cell.when == When::Forwarding {
        env.push(("DCMIGRATE_TEST_FORWARD_DELAY_MS", "300"));
    }
    let mut tb = if cell.what == What::Cut {
        let net = Net::create(tag, &HOSTS, 10_000, None).expect("network namespaces");
        Testbed::start_net_with_env(exe(), net, &env).expect("test bed")
    } else {
        Testbed::start_with_env(exe(), &HOSTS, &env).expect("test bed")
    };
    tb.start_guest("hostA", VM, 64 * MIB, &workload(10.0), true, &[]).unwrap();
    tb
}

/// Starts the migration (A to B, then C) and brings it to the cell's moment;
/// returns the API calls still under way.
fn reach(tb: &Testbed, cell: &Cell, gates: &Path) -> Vec<Call> {
    let opts = held(MigrateOptions {
        max_bandwidth_mbps: Some(40.0),
        suspend: true,
        switchover_timeout_ms: Some(SWITCHOVER_TIMEOUT_MS),
        ..Default::default()
    });
    let api = tb.host("hostA").api.clone();
    let mut calls: Vec<Call> = vec![];
    calls.push(std::thread::spawn({
        let api = api.clone();
        move || Client::new(&api).migrate(VM, "hostB", opts).map(|_| ())
    }));
    match cell.when {
        When::Setup => assert!(wait_file(&gate(gates, "hostB", "incoming-open", "reached"), 30)),
        _ => assert!(wait_for(30, || (progress(tb, "hostA", VM)?.1 > 0).then_some(())).is_some()),
    }
    if cell.when.retargets() {
        let reached = wait_for(60, || {
            let (_, at, done) = progress(tb, "hostA", VM)?;
            (done || at >= 32 * MIB).then_some(!done)
        });
        assert_eq!(reached, Some(true), "the migration ended before the retarget");
        let r = std::thread::spawn(move || Client::new(&api).retarget(VM, "hostC", true).map(|_| ()));
        if cell.when == When::RetargetInstall {
            assert!(wait_file(&gate(gates, "hostA", "retarget-install", "reached"), 30));
            calls.push(r);
        } else {
            r.join().unwrap().expect("retarget");
        }
    }
    if matches!(cell.when, When::FinalRound | When::Verify | When::DeviceState | When::Commit) {
        release(tb, "hostA", VM);
        let (host, point) = cell.when.gate().unwrap();
        assert!(wait_file(&gate(gates, host, point, "reached"), 60), "never reached {point}");
    }
    calls
}

/// Strikes `cell.who`, lets every gate go, and ends the fault.
fn strike(tb: &mut Testbed, cell: &Cell, gates: &Path) {
    let open_gates = || {
        for h in HOSTS {
            for p in ["incoming-open", "retarget-install", "final-round", "verify", "device-state", "commit"] {
                let _ = std::fs::write(gate(gates, h, p, "open"), b"");
            }
        }
    };
    match cell.what {
        What::Kill => {
            tb.kill_agent(cell.who);
            open_gates();
            std::thread::sleep(Duration::from_millis(500));
            tb.restart_agent(cell.who, &[]).expect("restart");
        }
        What::Stop => {
            assert!(tb.signal_agent(cell.who, libc::SIGSTOP));
            open_gates();
            std::thread::sleep(FAULT_FOR);
            assert!(tb.signal_agent(cell.who, libc::SIGCONT));
        }
        What::Cut => {
            tb.set_link(cell.who, false).unwrap();
            open_gates();
            std::thread::sleep(FAULT_FOR);
            tb.set_link(cell.who, true).unwrap();
        }
    }
    // A held migration may go on, where the source still has it.
    #[cfg(feature = "test-hooks")]
    let _ = tb.client("hostA").release(VM);
}

/// The source's migration ends and the VM settles on exactly one host.
fn owner(tb: &Testbed) -> String {
    // A restarted source has no migration at all: that counts as ended.
    let ended = wait_for(60, || {
        tb.client("hostA").status(None).ok()?.iter().filter(|m| m.vm == VM).all(|m| m.done).then_some(())
    });
    assert!(ended.is_some(), "the migration did not end\n{}", tb.logs());
    let on = || -> Vec<&str> { HOSTS.iter().copied().filter(|h| tb.vm_on(h, VM).is_some()).collect() };
    wait_for(60, || (on().len() == 1).then(|| on()[0].to_owned()))
        .unwrap_or_else(|| panic!("the VM is registered on {:?}\n{}", on(), tb.logs()))
}

/// Checks the outcome: where the VM runs, its bytes, its pause, and that
/// the other hosts kept nothing.
fn check(tb: &Testbed, cell: &Cell, owner: &str) -> Option<f64> {
    let mut pause_ms = None;
    if owner == "hostA" {
        assert_running_on(tb, "hostA", VM);
        let p = state(tb, "hostA", VM).and_then(|s| s.longest_pause_ms).unwrap_or(0.0);
        pause_ms = Some(p);
        let source_down = cell.who == "hostA" && cell.what != What::Cut;
        let bound = DOWNTIME_MS + SWITCHOVER_TIMEOUT_MS as f64 + 1000.0;
        assert!(source_down || p <= bound, "the guest was paused {p} ms (bound {bound})");
    } else {
        // Moved: paused there as asked, its RAM the source's at the switchover.
        assert_same_bytes(&ram_file(tb, "hostA", VM), &ram_file(tb, owner, VM));
        tb.client(owner).resume(VM).expect("resume where it moved");
        assert_running_on(tb, owner, VM);
    }
    let kept = format!("{VM}-ram0.ram");
    for h in HOSTS.iter().filter(|h| **h != owner) {
        let files =
            || -> Vec<String> { vm_files(tb, h, VM).into_iter().filter(|f| !(*h == "hostA" && *f == kept)).collect() };
        let left =
            wait_for(30, || (files().is_empty() && tb.vm_on(h, VM).is_none() && !incoming_on(tb, h, VM)).then_some(()));
        assert!(left.is_some(), "{h} kept {:?} (incoming: {})", files(), incoming_on(tb, h, VM));
    }
    pause_ms
}

fn run_cell(cell: &Cell, gates: &Path, tag: &str) -> Seen {
    let mut tb = start_bed(cell, gates, tag);
    let calls = reach(&tb, cell, gates);
    let t = Instant::now();
    strike(&mut tb, cell, gates);
    for c in calls {
        let _ = c.join();
    }
    let owner = owner(&tb);
    let settle_s = t.elapsed().as_secs_f64();
    let pause_ms = check(&tb, cell, &owner);
    Seen { runs_on: owner, settle_s, pause_ms }
}

#[test]
#[cfg_attr(not(feature = "test-hooks"), ignore = "needs the test-only switches: cargo test --features test-hooks")]
fn fault_matrix() {
    let filter = std::env::var("DCMIGRATE_FAULT_MATRIX").ok();
    let root = nix_is_root();
    cleanup_stale("fm");
    let mut rows = vec![];
    let mut failed = vec![];
    for (i, cell) in cells().iter().enumerate() {
        let name = cell.name();
        let wanted = match filter.as_deref() {
            None => SAMPLE.contains(&name.as_str()),
            Some("all") => true,
            Some(f) => name.contains(&f.to_lowercase()),
        };
        if !wanted {
            continue;
        }
        if cell.what == What::Cut && !root {
            rows.push(format!("| {name} | skipped: link cuts need root | | |"));
            continue;
        }
        let gates = tempfile::tempdir().unwrap();
        let tag = format!("fm{i}");
        eprintln!("== {name}");
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_cell(cell, gates.path(), &tag)));
        match r {
            Ok(s) => rows.push(format!(
                "| {name} | runs on {} | {:.1} | {} |",
                s.runs_on,
                s.settle_s,
                s.pause_ms.map_or("-".into(), |p| format!("{p:.0}"))
            )),
            Err(e) => {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                let first = msg.lines().next().unwrap_or("").to_owned();
                rows.push(format!("| {name} | FAILED: {first} | | |"));
                failed.push(format!("{name}: {msg}"));
            }
        }
    }
    println!("| cell (who/what/when) | outcome | settled after s | source guest's longest pause ms |");
    println!("|---|---|---|---|");
    for r in &rows {
        println!("{r}");
    }
    assert!(failed.is_empty(), "{} cells failed:\n{}", failed.len(), failed.join("\n\n"));
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
