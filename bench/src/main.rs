//! dcmigrate benchmarks. Every figure is compared with a baseline measured
//! in the same run on the same machine (iperf3 for link throughput, stock
//! QEMU's migration and cancel-and-restart for retargets, the link model).
//!
//! `dcmigrate-bench all` (root) runs every scenario below, writes
//! `bench/results/*.json`, draws the PNG plots and rewrites the tables in
//! `bench/README.md`; `report` redoes only the last two from the JSON.
//! Scenarios: `retarget` (retarget vs restart vs stock QEMU on shaped links
//! in network namespaces), `throughput` (loopback vs iperf3, 1/2/4 streams),
//! `downtime` (rising dirty rates on a shaped link), `scale` (a large guest,
//! three agents: memory, CPU per GiB, tracker cost), `encryption` (TLS data
//! streams vs `--data-encryption off` on loopback), `transport` (TCP vs
//! RDMA, run inside the SoftRoCE VM by `bench/transport-in-vm`),
//! `qemu-trackers` (the `qemu`, `hash` and `soft-dirty` trackers on a booted
//! QEMU guest: `bench/qemu-trackers` runs it here and in the test VM),
//! `evacuate` (a host emptied over shaped links, a destination drained
//! half-way: forwarding vs cancel-and-restart), `hugepages` (a guest on
//! 2 MiB pages against tmpfs, and one zero by content, on loopback).

mod downtime;
mod encryption;
mod evacuate;
mod harness;
mod hugepages;
mod plot;
mod qemu;
mod qemu_trackers;
#[cfg(feature = "rdma")]
mod registration;
mod report;
mod retarget;
mod scale;
mod sizes;
mod throughput;
mod trackers;
mod transport;

use anyhow::Result;
use clap::{Parser, Subcommand};
use harness::machine;
use serde_json::{json, Value};
use std::path::Path;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Every scenario with its defaults, then plots and README tables (root; ~40 min).
    All {
        /// Leave out the stock-QEMU rows of the retarget scenario.
        #[arg(long)]
        no_qemu: bool,
    },
    /// Plots and README tables from the existing results, without running anything.
    Report,
    /// Encrypted (TLS) against plain data streams on loopback, same run.
    Encryption {
        #[arg(long, default_value_t = 1)]
        guest_gib: u64,
        /// Runs of each kind per stream count (medians are compared).
        #[arg(long, default_value_t = 5)]
        reps: usize,
    },
    /// Loopback throughput of an idle guest with 1, 2 and 4 streams vs iperf3.
    Throughput {
        #[arg(long, default_value_t = 4)]
        guest_gib: u64,
    },
    /// A large guest, three agents on this machine, a retarget at 50 %:
    /// agents' memory beyond the mapped RAM, CPU per GiB, tracker cost.
    Scale {
        #[arg(long, default_value_t = 6)]
        guest_gib: u64,
        #[arg(long, default_value_t = 50.0)]
        dirty_mbps: f64,
    },
    /// Downtime, rounds and total time at rising dirty rates on a shaped link.
    Downtime {
        #[arg(long, default_value_t = 1.0)]
        guest_gib: f64,
        #[arg(long, default_value_t = 1000)]
        rate_mbit: u64,
        #[arg(long, value_delimiter = ',', default_value = "0,25,50,100,150")]
        dirty_mbps: Vec<f64>,
        /// Time budget per migration (then the switchover is forced).
        #[arg(long, default_value_t = 60)]
        max_time_s: u64,
    },
    /// TCP against RDMA on this machine's RDMA device (SoftRoCE in
    /// bench/transport-in-vm): throughput and agents' CPU per GiB. Prints
    /// the result as one JSON line (the VM's tree is read-only).
    Transport {
        #[arg(long, default_value_t = 512)]
        guest_mib: u64,
        #[arg(long, default_value_t = 2)]
        streams: usize,
    },
    /// What grows with the guest's size: downtime, rounds, verification per
    /// pass, tracker cost per round, agents' memory (1-8 GiB on a shaped
    /// link; a sparse 64 GiB guest).
    Sizes {
        #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
        gib: Vec<u64>,
        #[arg(long, default_value_t = 1000)]
        rate_mbit: u64,
        /// The sparse guest's size (0: none). Its whole size must fit the
        /// destination's data dir (a session that does not is refused),
        /// a 24 GiB tmpfs on the project's machine.
        #[arg(long, default_value_t = 20)]
        sparse_gib: u64,
    },
    /// What a dirty sync costs per GiB, per tracker, against reading the
    /// RAM once (soft-dirty only where the kernel has it: see
    /// bench/trackers-in-vm).
    Trackers {
        #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
        gib: Vec<u64>,
        #[arg(long, default_value_t = 50.0)]
        dirty_mbps: f64,
        /// Where the RAM files go (tmpfs).
        #[arg(long, default_value = "/dev/shm")]
        dir: std::path::PathBuf,
        /// Print the result as one JSON line instead of saving it (a
        /// read-only tree, as in the test VM).
        #[arg(long)]
        print: bool,
    },
    /// The trackers on a booted QEMU guest: `qemu` (a QEMU built with
    /// qemu-patches/), `hash`, and `soft-dirty` where the kernel has it
    /// (bench/qemu-trackers runs it here and in the test VM).
    QemuTrackers {
        /// Guest sizes, MiB.
        #[arg(long, value_delimiter = ',', default_value = "512,2048,16384")]
        mib: Vec<u64>,
        /// A QEMU built with qemu-patches/build.
        #[arg(long)]
        qemu: std::path::PathBuf,
        /// The guest image (tests/guest-image/build).
        #[arg(long, default_value = "target/guest-image")]
        image: std::path::PathBuf,
        /// Where the RAM files go (tmpfs).
        #[arg(long, default_value = "/dev/shm")]
        dir: std::path::PathBuf,
        /// Print the result as one JSON line instead of saving it.
        #[arg(long)]
        print: bool,
    },
    /// The trackers scenario's "VM": fills a RAM file, then dirties it.
    #[command(hide = true)]
    Dirtier {
        #[arg(long)]
        file: std::path::PathBuf,
        #[arg(long)]
        size: u64,
        #[arg(long)]
        rate_mbps: f64,
    },
    /// Evacuating a host of guests over shaped links, one destination
    /// drained half-way: its migration forwarded vs cancelled and restarted.
    Evacuate {
        #[arg(long, default_value_t = 4)]
        vms: usize,
        #[arg(long, default_value_t = 1.0)]
        guest_gib: f64,
        /// Egress rate of every host, Mbit/s.
        #[arg(long, default_value_t = 1000)]
        rate_mbit: u64,
        #[arg(long, default_value_t = 10.0)]
        dirty_mbps: f64,
    },
    /// A guest on 2 MiB hugetlbfs pages against the same on tmpfs, and one
    /// zero by content against random, on loopback (root; reserves and
    /// gives back 2 × the guest in huge pages).
    Hugepages {
        #[arg(long, default_value_t = 8)]
        guest_gib: u64,
    },
    /// Retarget vs cancel-and-restart on shaped links (the prototype's Fig. 2).
    Retarget {
        #[arg(long, default_value_t = 2.0)]
        guest_gib: f64,
        /// Egress rate of every host, Mbit/s.
        #[arg(long, default_value_t = 1000)]
        rate_mbit: u64,
        #[arg(long, value_delimiter = ',', default_value = "0.1,0.3,0.5,0.7,0.9")]
        at: Vec<f64>,
        #[arg(long, value_delimiter = ',', default_value = "0,50")]
        dirty_mbps: Vec<f64>,
        /// Leave out the stock-QEMU cancel-and-restart rows.
        #[arg(long)]
        no_qemu: bool,
    },
}

/// Writes `results/NAME.json`, stamped with the machine and date.
fn save(results: &Path, name: &str, v: &mut Value) -> Result<()> {
    v["machine"] = machine();
    if v.get("command").is_none() {
        v["command"] = json!(format!("cargo run --release -p dcmigrate-bench -- {name}"));
    }
    std::fs::write(results.join(format!("{name}.json")), serde_json::to_string_pretty(v)?)?;
    Ok(())
}

/// Saves a scenario's result and rewrites the README's tables; or, with
/// `print` naming the wrapper script (a read-only tree, as in the test VM),
/// prints it as one line for that script to save.
fn publish(results: &Path, bench_dir: &Path, name: &str, mut v: Value, print: Option<&str>) -> Result<()> {
    match print {
        Some(command) => {
            v["machine"] = machine();
            v["command"] = json!(command);
            println!("RESULT-JSON {}", serde_json::to_string(&v)?);
        }
        None => {
            save(results, name, &mut v)?;
            report::update(bench_dir)?;
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let bench_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let results = bench_dir.join("results");
    std::fs::create_dir_all(&results)?;
    match cli.cmd {
        Cmd::Downtime { guest_gib, rate_mbit, dirty_mbps, max_time_s } => {
            publish(
                &results,
                bench_dir,
                "downtime",
                downtime::downtime(guest_gib, rate_mbit, &dirty_mbps, max_time_s)?,
                None,
            )?;
        }
        Cmd::Transport { guest_mib, streams } => {
            let v = transport::transport(guest_mib, streams)?;
            println!("RESULT-JSON {}", serde_json::to_string(&v)?);
        }
        Cmd::Retarget { guest_gib, rate_mbit, at, dirty_mbps, no_qemu } => {
            publish(
                &results,
                bench_dir,
                "retarget",
                retarget::retarget(guest_gib, rate_mbit, &at, &dirty_mbps, !no_qemu)?,
                None,
            )?;
        }
        Cmd::Evacuate { vms, guest_gib, rate_mbit, dirty_mbps } => {
            let v = evacuate::evacuate(vms, guest_gib, rate_mbit, dirty_mbps)?;
            publish(&results, bench_dir, "evacuate", v, None)?;
        }
        Cmd::Hugepages { guest_gib } => {
            publish(&results, bench_dir, "hugepages", hugepages::hugepages(guest_gib)?, None)?;
        }
        Cmd::Throughput { guest_gib } => {
            publish(&results, bench_dir, "throughput", throughput::throughput(guest_gib)?, None)?;
        }
        Cmd::Encryption { guest_gib, reps } => {
            publish(&results, bench_dir, "encryption", encryption::encryption(guest_gib, reps)?, None)?;
        }
        Cmd::Scale { guest_gib, dirty_mbps } => {
            publish(&results, bench_dir, "scale", scale::scale(guest_gib, dirty_mbps)?, None)?;
        }
        Cmd::Sizes { gib, rate_mbit, sparse_gib } => {
            publish(&results, bench_dir, "sizes", sizes::sizes(&gib, rate_mbit, sparse_gib)?, None)?;
        }
        Cmd::Trackers { gib, dirty_mbps, dir, print } => {
            let v = trackers::trackers(&gib, dirty_mbps, &dir)?;
            publish(&results, bench_dir, "trackers", v, print.then_some("bench/trackers-in-vm"))?;
        }
        Cmd::QemuTrackers { mib, qemu, image, dir, print } => {
            let mut v = qemu_trackers::qemu_trackers(&mib, &qemu, &image, &dir)?;
            v["command"] = json!("bench/qemu-trackers");
            publish(&results, bench_dir, "qemu-trackers", v, print.then_some("bench/qemu-trackers"))?;
        }
        Cmd::Dirtier { file, size, rate_mbps } => trackers::dirtier(&file, size, rate_mbps)?,
        Cmd::Report => report::update(bench_dir)?,
        Cmd::All { no_qemu } => all(&results, bench_dir, no_qemu)?,
    }
    Ok(())
}

/// Every scenario with its defaults, then the plots and README tables.
fn all(results: &Path, bench_dir: &Path, no_qemu: bool) -> Result<()> {
    let t = std::time::Instant::now();
    let mut v = throughput::throughput(4)?;
    save(results, "throughput", &mut v)?;
    let mut v = encryption::encryption(1, 3)?;
    save(results, "encryption", &mut v)?;
    let mut v = downtime::downtime(1.0, 1000, &[0.0, 25.0, 50.0, 100.0, 150.0], 60)?;
    save(results, "downtime", &mut v)?;
    let mut v = scale::scale(6, 50.0)?;
    save(results, "scale", &mut v)?;
    let mut v = sizes::sizes(&[1, 2, 4, 8], 1000, 64)?;
    save(results, "sizes", &mut v)?;
    let mut v = trackers::trackers(&[1, 2, 4], 50.0, Path::new("/dev/shm"))?;
    save(results, "trackers", &mut v)?;
    let mut v = retarget::retarget(2.0, 1000, &[0.1, 0.3, 0.5, 0.7, 0.9], &[0.0, 50.0], !no_qemu)?;
    save(results, "retarget", &mut v)?;
    let mut v = evacuate::evacuate(4, 1.0, 1000, 10.0)?;
    save(results, "evacuate", &mut v)?;
    let mut v = hugepages::hugepages(8)?;
    save(results, "hugepages", &mut v)?;
    report::update(bench_dir)?;
    eprintln!("all scenarios done in {:.0} s; bench/README.md and bench/results/ updated", t.elapsed().as_secs_f64());
    Ok(())
}
