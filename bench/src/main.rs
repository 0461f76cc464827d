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
//! three agents: memory, CPU per GiB, tracker cost), `transport` (TCP vs
//! RDMA, run inside the SoftRoCE VM by `bench/transport-in-vm`).

mod plot;
mod qemu;
mod report;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use dcmigrate::agent::api::Request;
use dcmigrate::engine::MigrateOptions;
use dcmigrate::testbed::Testbed;
use dcmigrate::vm::synthetic::{Pattern, Workload};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

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

fn exe() -> Result<PathBuf> {
    // The dcmigrate binary sits next to this one in target/<profile>/.
    let me = std::env::current_exe()?;
    let p = me.with_file_name("dcmigrate");
    if !p.exists() {
        bail!("{} not found: build it first (cargo build --release)", p.display());
    }
    Ok(p)
}

fn ensure_iperf3() -> Result<()> {
    // The project's one install helper: decides from dpkg's status, installs as root.
    let need = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/lib/need");
    let ok = Command::new(need).args(["--who", "dcmigrate-bench", "iperf3"]).status()?.success();
    if !ok {
        bail!("iperf3 is needed for the baseline and could not be installed");
    }
    Ok(())
}

/// iperf3 over loopback with `streams` parallel streams, in MB/s.
fn iperf3(streams: usize) -> Result<f64> {
    iperf3_between(&[], &[], "127.0.0.1", streams)
}

/// iperf3 from a client run with `client` (a command prefix such as
/// `ip netns exec NS`) to a server run with `server` at `ip`, in MB/s.
fn iperf3_between(client: &[&str], server: &[&str], ip: &str, streams: usize) -> Result<f64> {
    let cmd = |prefix: &[&str]| match prefix.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg("iperf3");
            c
        }
        None => Command::new("iperf3"),
    };
    let mut srv = cmd(server).args(["-s", "-1", "-p", "25201"]).stdout(Stdio::null()).spawn()?;
    std::thread::sleep(std::time::Duration::from_millis(300));
    let out = cmd(client).args(["-c", ip, "-p", "25201", "-t", "4", "-J", "-P", &streams.to_string()]).output()?;
    let _ = srv.wait();
    let v: Value = serde_json::from_slice(&out.stdout).context("iperf3 JSON")?;
    let bps = v["end"]["sum_received"]["bits_per_second"].as_f64().context("iperf3 result")?;
    Ok(bps / 8e6)
}

fn migrate(tb: &Testbed, from: &str, vm: &str, to: &str, options: MigrateOptions) -> Result<Value> {
    tb.call(from, &Request::Migrate { vm: vm.into(), to: to.into(), options })?;
    let r = tb.call(from, &Request::Wait { vm: vm.into() })?["report"].clone();
    if r["result"] != "completed" {
        bail!("migration failed: {r}");
    }
    Ok(r)
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Touches `gib` GiB of tmpfs memory and frees it, returning the rate (MB/s).
/// On a virtual machine the first touch of memory is slow (the hypervisor
/// backs it on demand); a destination's fresh RAM pays that, iperf3 does not.
/// Warming first measures the engine, not the hypervisor; the cold rate is
/// reported alongside.
fn touch_memory(gib: u64) -> Result<f64> {
    let p = Path::new("/dev/shm/dcmigrate-bench-warm");
    let t = std::time::Instant::now();
    let st = Command::new("dd")
        .args(["if=/dev/zero", &format!("of={}", p.display()), "bs=1M", &format!("count={}", gib << 10)])
        .stderr(Stdio::null())
        .status()?;
    let secs = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(p);
    if !st.success() {
        bail!("dd failed warming memory");
    }
    Ok((gib << 30) as f64 / secs / 1e6)
}

fn throughput(guest_gib: u64) -> Result<Value> {
    ensure_iperf3()?;
    let exe = exe()?;
    let first_touch = touch_memory(2 * guest_gib + 1)?;
    let warm_touch = touch_memory(2 * guest_gib + 1)?;
    eprintln!("tmpfs write rate: first touch {first_touch:.0} MB/s, warm {warm_touch:.0} MB/s");
    let mut rows = vec![];
    let mut tb = Testbed::start(&exe, &["hostA", "hostB"])?;
    let idle = Workload { dirty_rate_mbps: 0.0, hot_fraction: 1.0, pattern: Pattern::Random, seed: 3 };
    tb.start_guest("hostA", "idle", guest_gib << 30, &idle, false, &["--zero-every", "0"])?;
    let mut hosts = ("hostA", "hostB");
    for streams in [1usize, 2, 4] {
        let baseline = iperf3(streams)?;
        let r = migrate(&tb, hosts.0, "idle", hosts.1, MigrateOptions { streams, ..Default::default() })?;
        let round0 = &r["rounds"][0];
        let mbps = round0["bytes"].as_f64().unwrap() / (round0["ms"].as_f64().unwrap() / 1e3) / 1e6;
        eprintln!("idle {guest_gib} GiB, {streams} streams: {mbps:.0} MB/s vs iperf3 {baseline:.0} MB/s");
        rows.push(json!({"streams": streams, "guest_gib": guest_gib, "migration_mbps": mbps, "iperf3_mbps": baseline,
                         "ratio": mbps / baseline, "total_ms": r["total_ms"], "downtime_ms": r["downtime_ms"]}));
        hosts = (hosts.1, hosts.0);
    }
    Ok(json!({"rows": rows, "first_touch_mbps": first_touch, "warm_touch_mbps": warm_touch}))
}

/// Anonymous resident memory (heap, stacks: not the mapped RAM files) of a process, in MiB.
fn anon_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("RssAnon:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// CPU seconds (user + system) a process used so far: fields 14 and 15 of
/// its stat, counted from 1, in USER_HZ (100) ticks.
fn cpu_s(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let f: Vec<&str> = stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
    let t = |i: usize| f.get(i - 3).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    (t(14) + t(15)) / 100.0
}

/// The pid of the agent whose command line names `api`.
fn agent_pid(api: &Path) -> Option<u32> {
    let needle = api.display().to_string();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid = e.file_name().to_str()?.parse::<u32>().ok()?;
        let cmd = String::from_utf8_lossy(&std::fs::read(e.path().join("cmdline")).ok()?).into_owned();
        (cmd.contains("\0agent\0") && cmd.contains(&needle)).then_some(pid)
    })
}

fn scale(guest_gib: u64, dirty_mbps: f64) -> Result<Value> {
    let exe = exe()?;
    let free = Command::new("df").args(["-B1", "--output=avail", "/dev/shm"]).output()?;
    let avail: u64 =
        String::from_utf8_lossy(&free.stdout).lines().nth(1).and_then(|l| l.trim().parse().ok()).unwrap_or(0);
    if avail < (guest_gib << 30) * 5 / 2 {
        bail!(
            "/dev/shm has {} GiB free; a {guest_gib} GiB guest with three hosts needs about {} GiB",
            avail >> 30,
            guest_gib * 5 / 2
        );
    }
    let mut tb = Testbed::start(&exe, &["hostA", "hostB", "hostC"])?;
    let w = Workload { dirty_rate_mbps: dirty_mbps, hot_fraction: 1.0, pattern: Pattern::Random, seed: 11 };
    // No dirty log: the general-purpose hash tracker, as for a QEMU guest here.
    tb.start_guest("hostA", "big", guest_gib << 30, &w, false, &["--zero-every", "0", "--no-dirty-log"])?;
    let pids: Vec<(String, u32)> = tb.hosts.iter().map(|h| (h.name.clone(), agent_pid(&h.api).unwrap_or(0))).collect();
    let cpu0: Vec<f64> = pids.iter().map(|(_, p)| cpu_s(*p)).collect();
    let peaks = std::sync::Arc::new(std::sync::Mutex::new(vec![0.0f64; pids.len()]));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (peaks, stop, pids) = (peaks.clone(), stop.clone(), pids.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for (i, (_, p)) in pids.iter().enumerate() {
                    let m = anon_mib(*p);
                    let mut pk = peaks.lock().unwrap();
                    pk[i] = pk[i].max(m);
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        })
    };
    tb.call("hostA", &Request::Migrate { vm: "big".into(), to: "hostB".into(), options: MigrateOptions::default() })?;
    let reached = dcmigrate::testbed::wait_for(900, || {
        let v = tb.call("hostA", &Request::Status { vm: Some("big".into()) }).ok()?;
        let m = &v["migrations"][0];
        (m["done"] == true || m["progress"]["at_destination_bytes"].as_f64()? >= 0.5 * (guest_gib << 30) as f64)
            .then_some(())
    });
    if reached.is_some() {
        let _ = tb.call("hostA", &Request::Retarget { vm: "big".into(), to: "hostC".into(), forward: true });
    }
    let r = tb.call("hostA", &Request::Wait { vm: "big".into() })?["report"].clone();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = sampler.join();
    if r["result"] != "completed" {
        bail!("scale migration failed: {r}");
    }
    let moved: f64 = r["bytes_by_sender"].as_object().map_or(0.0, |m| m.values().filter_map(Value::as_f64).sum());
    let gib = moved / (1u64 << 30) as f64;
    let peaks = peaks.lock().unwrap().clone();
    let agents: Vec<Value> = pids
        .iter()
        .enumerate()
        .map(|(i, (h, p))| {
            let cpu = cpu_s(*p) - cpu0[i];
            json!({"host": h, "peak_anon_mib": peaks[i], "cpu_s": cpu, "cpu_s_per_gib": cpu / gib.max(1e-9)})
        })
        .collect();
    let syncs: Vec<f64> = r["rounds"].as_array().into_iter().flatten().filter_map(|x| x["sync_ms"].as_f64()).collect();
    let max_sync = syncs.iter().cloned().fold(0.0, f64::max);
    eprintln!("scale: {gib:.2} GiB moved, agents {agents:?}, sync median {:.0} ms", median(syncs.clone()));
    tb.stop_vm("hostC", "big");
    Ok(json!({"guest_gib": guest_gib, "dirty_mbps": dirty_mbps, "tracker": r["tracker"], "total_ms": r["total_ms"],
              "gib_moved": gib, "agents": agents, "sync_ms_median": median(syncs), "sync_ms_max": max_sync,
              "rounds": r["rounds"].as_array().map_or(0, Vec::len), "retargeted": reached.is_some()}))
}

/// CPU seconds (user + system) used so far by every `dcmigrate agent` process.
fn agents_cpu_s() -> f64 {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            String::from_utf8_lossy(&cmd).contains("dcmigrate\0agent")
        })
        .map(cpu_s)
        .sum()
}

fn transport(guest_mib: u64, streams: usize) -> Result<Value> {
    use dcmigrate::engine::TransportKind;
    let exe = exe()?;
    let mut tb = Testbed::start(&exe, &["hostA", "hostB"])?;
    let idle = Workload { dirty_rate_mbps: 0.0, hot_fraction: 1.0, pattern: Pattern::Random, seed: 5 };
    // No holes: every page travels.
    tb.start_guest("hostA", "t", guest_mib << 20, &idle, false, &["--zero-every", "0"])?;
    let mut rows = vec![];
    let mut from = ("hostA", "hostB");
    for (kind, name) in [
        (TransportKind::Tcp, "tcp"),
        (TransportKind::Rdma, "rdma"),
        (TransportKind::Tcp, "tcp"),
        (TransportKind::Rdma, "rdma"),
    ] {
        let cpu0 = agents_cpu_s();
        let opts = MigrateOptions { transport: kind, streams, verify: false, ..Default::default() };
        tb.call(from.0, &Request::Migrate { vm: "t".into(), to: from.1.into(), options: opts })?;
        let r = tb.call(from.0, &Request::Wait { vm: "t".into() })?["report"].clone();
        if r["result"] != "completed" {
            bail!("{name} migration failed: {r}");
        }
        let cpu = agents_cpu_s() - cpu0;
        let round0 = &r["rounds"][0];
        let mbps = round0["bytes"].as_f64().unwrap_or(0.0) / round0["ms"].as_f64().unwrap_or(1.0) / 1e3;
        let gib = r["bytes_by_sender"][from.0].as_f64().unwrap_or(0.0) / (1u64 << 30) as f64;
        eprintln!(
            "{name}: {mbps:.0} MB/s, {:.0} ms in all, agents' CPU {cpu:.2} s ({:.2} s/GiB)",
            r["total_ms"].as_f64().unwrap_or(0.0),
            cpu / gib.max(1e-9)
        );
        rows.push(
            json!({"transport": name, "transport_used": r["transport"], "streams": streams, "guest_mib": guest_mib,
            "round0_mbps": mbps, "total_ms": r["total_ms"], "agents_cpu_s": cpu, "cpu_s_per_gib": cpu / gib.max(1e-9)}),
        );
        from = (from.1, from.0);
    }
    Ok(json!({"rows": rows, "machine": machine()}))
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|s| {
        s.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
    });
    let date = Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    json!({"cpu": cpu, "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0), "date": date})
}

fn downtime(guest_gib: f64, rate_mbit: u64, dirty: &[f64], max_time_s: u64) -> Result<Value> {
    use dcmigrate::testbed::net::{cleanup_stale, Net};
    let exe = exe()?;
    ensure_iperf3()?;
    cleanup_stale("d");
    let size = ((guest_gib * (1u64 << 30) as f64) as u64) & !((2 << 20) - 1);
    let net = Net::create("d", &["hostA", "hostB"], rate_mbit, None)?;
    let (a, b) = (&net.hosts[0], &net.hosts[1]);
    let goodput =
        iperf3_between(&["ip", "netns", "exec", &a.ns], &["ip", "netns", "exec", &b.ns], &b.ip.to_string(), 4)?;
    eprintln!("shaped link: {goodput:.1} MB/s of TCP payload");
    let mut tb = Testbed::start_net(&exe, net)?;
    let mut rows = vec![];
    for (i, &d) in dirty.iter().enumerate() {
        let vm = format!("d{i}");
        let w = Workload { dirty_rate_mbps: d, hot_fraction: 1.0, pattern: Pattern::Random, seed: i as u64 };
        tb.start_guest("hostA", &vm, size, &w, false, &["--zero-every", "0"])?;
        let options = MigrateOptions { max_time_s, ..Default::default() };
        let r = migrate(&tb, "hostA", &vm, "hostB", options)?;
        let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
        eprintln!(
            "dirty {d} MB/s: downtime {:.0} ms, {} rounds, total {:.1} s, {}",
            f("downtime_ms"),
            r["rounds"].as_array().map_or(0, Vec::len),
            f("total_ms") / 1e3,
            r["switchover"].as_str().unwrap_or("?")
        );
        rows.push(json!({
            "dirty_mbps": d, "downtime_ms": r["downtime_ms"], "downtime": r["downtime"], "total_ms": r["total_ms"],
            "rounds": r["rounds"].as_array().map_or(0, Vec::len), "switchover": r["switchover"],
            "limit_ms": 300, "link_goodput_mbps": goodput,
        }));
        tb.stop_vm("hostB", &vm);
    }
    Ok(json!({"rows": rows, "guest_gib": guest_gib, "rate_mbit": rate_mbit, "max_time_s": max_time_s}))
}

/// Ideal time from the retarget to the end (no switchover costs), in ms.
/// Each sender is limited by its egress rate `l`, the guest dirties `d`;
/// `data` bytes must reach the new destination, `held` of them are current
/// at the old one. Forwarding: the source alone must send what only it has,
/// and both together send everything: max((data-held)/(l-d), data/(2l-d)).
/// Restart: the source sends everything: data/(l-d).
fn ideal_ms(forward: bool, data: f64, held: f64, l: f64, d: f64) -> f64 {
    let s = if forward { ((data - held).max(0.0) / (l - d)).max(data / (2.0 * l - d)) } else { data / (l - d) };
    s * 1e3
}

fn retarget(guest_gib: f64, rate_mbit: u64, at: &[f64], dirty: &[f64], with_qemu: bool) -> Result<Value> {
    use dcmigrate::memory::{GuestRam, Layout, RegionSpec, DEFAULT_CHUNK_SIZE, PAGE_SIZE};
    use dcmigrate::testbed::net::{cleanup_stale, Net};
    let exe = exe()?;
    cleanup_stale("b");
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM])?;
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            cleanup_stale("b");
            std::process::exit(130);
        }
    });
    ensure_iperf3()?;
    let size = ((guest_gib * (1u64 << 30) as f64) as u64) & !((2 << 20) - 1);
    let mut rows = vec![];
    let mut goodputs = vec![];
    let mut n = 0;
    for &d in dirty {
        let net = Net::create("b", &["hostA", "hostB", "hostC"], rate_mbit, None)?;
        // The link model's rate: TCP payload over one shaped egress, measured
        // now (headers take ~5 % of the nominal rate).
        let (a, c) = (&net.hosts[0], &net.hosts[2]);
        let l = iperf3_between(&["ip", "netns", "exec", &a.ns], &["ip", "netns", "exec", &c.ns], &c.ip.to_string(), 4)?
            * 1e6;
        eprintln!("shaped link: {:.1} MB/s of TCP payload ({rate_mbit} Mbit/s nominal)", l / 1e6);
        goodputs.push(l / 1e6);
        let mut tb = Testbed::start_net(&exe, net)?;
        for &f in at {
            for forward in [true, false] {
                n += 1;
                let vm = format!("g{n}");
                let w = Workload { dirty_rate_mbps: d, hot_fraction: 1.0, pattern: Pattern::Random, seed: n };
                // No holes: "x % of RAM reached the old destination" then
                // means x % of the bytes that must travel.
                tb.start_guest("hostA", &vm, size, &w, false, &["--zero-every", "0"])?;
                // Bytes that must travel: RAM less the holes the engine skips.
                let src = tb.host("hostA").data_dir.join(format!("{vm}-ram0.ram"));
                let layout = Layout::new(vec![RegionSpec { id: "ram0".into(), size }], DEFAULT_CHUNK_SIZE)?;
                let data_pages = GuestRam::open(layout, &[src])?.data_pages()?.count() as f64;
                let data = data_pages * PAGE_SIZE as f64;
                let zero = size as f64 - data;
                tb.call(
                    "hostA",
                    &Request::Migrate { vm: vm.clone(), to: "hostB".into(), options: MigrateOptions::default() },
                )?;
                let reached = dcmigrate::testbed::wait_for(600, || {
                    let v = tb.call("hostA", &Request::Status { vm: Some(vm.clone()) }).ok()?;
                    let m = &v["migrations"][0];
                    if m["done"] == true {
                        return Some(Err(m["report"].to_string()));
                    }
                    (m["progress"]["at_destination_bytes"].as_f64()? >= f * size as f64).then_some(Ok(()))
                });
                match reached {
                    Some(Ok(())) => {}
                    Some(Err(r)) => bail!("{vm} ended before the retarget point: {r}"),
                    None => bail!("{vm} never reached {f}"),
                }
                tb.call("hostA", &Request::Retarget { vm: vm.clone(), to: "hostC".into(), forward })?;
                let r = tb.call("hostA", &Request::Wait { vm: vm.clone() })?["report"].clone();
                if r["result"] != "completed" {
                    bail!("{vm}: {r}");
                }
                let at_old = r["retargets"][0]["at_old_destination_bytes"].as_f64().unwrap_or(0.0);
                let held = (at_old - zero).max(0.0);
                let ideal = ideal_ms(forward, data, held, l, d * 1e6);
                let after = r["after_retarget_ms"].as_f64().unwrap_or(0.0);
                let mode = if forward { "forward" } else { "restart" };
                eprintln!("dirty {d} MB/s, retarget at {f}: {mode} {after:.0} ms after retarget (ideal {ideal:.0}), total {:.0} ms", r["total_ms"].as_f64().unwrap_or(0.0));
                rows.push(json!({
                    "retarget_at": f, "at_old_destination": at_old / size as f64, "dirty_mbps": d, "mode": mode,
                    "after_retarget_ms": after, "total_ms": r["total_ms"], "ideal_ms": ideal,
                    "ratio_to_ideal": after / ideal, "downtime_ms": r["downtime_ms"],
                    "bytes_after": r["retargets"][0]["bytes_after"], "guest_bytes": size, "data_bytes": data,
                }));
                // The VM now runs on hostC: stop it there.
                tb.stop_vm("hostC", &vm);
            }
        }
    }
    if with_qemu && dcmigrate::testbed::qemu::qemu_available() {
        // Stock QEMU, idle guest of the same size full of data, same links.
        let net = Net::create("b", &["hostA", "hostB", "hostC"], rate_mbit, None)?;
        let dir = Path::new("/dev/shm/dcmigrate-bench-qemu");
        std::fs::create_dir_all(dir)?;
        let l = goodputs.first().copied().unwrap_or(f64::NAN) * 1e6;
        for &f in at {
            let (after, total) = qemu::restart(&net.hosts, dir, size, f)?;
            let ideal = ideal_ms(true, size as f64, f * size as f64, l, 0.0);
            eprintln!("stock QEMU, cancel at {f} and restart: {after:.0} ms after the cancel (ideal with forwarding {ideal:.0}), total {total:.0} ms");
            rows.push(json!({
                "retarget_at": f, "dirty_mbps": 0.0, "mode": "qemu-restart", "after_retarget_ms": after,
                "total_ms": total, "ideal_ms": ideal, "ratio_to_ideal": after / ideal, "guest_bytes": size,
            }));
        }
        let _ = std::fs::remove_dir_all(dir);
    } else if with_qemu {
        eprintln!("qemu-system-x86_64 not installed: no stock-QEMU rows");
    }
    Ok(json!({"rows": rows, "rate_mbit": rate_mbit, "guest_gib": guest_gib, "link_goodput_mbps": goodputs}))
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

fn main() -> Result<()> {
    let cli = Cli::parse();
    let bench_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let results = bench_dir.join("results");
    std::fs::create_dir_all(&results)?;
    match cli.cmd {
        Cmd::Downtime { guest_gib, rate_mbit, dirty_mbps, max_time_s } => {
            let mut v = downtime(guest_gib, rate_mbit, &dirty_mbps, max_time_s)?;
            save(&results, "downtime", &mut v)?;
            report::update(bench_dir)?;
        }
        Cmd::Transport { guest_mib, streams } => {
            let v = transport(guest_mib, streams)?;
            println!("RESULT-JSON {}", serde_json::to_string(&v)?);
        }
        Cmd::Retarget { guest_gib, rate_mbit, at, dirty_mbps, no_qemu } => {
            let mut v = retarget(guest_gib, rate_mbit, &at, &dirty_mbps, !no_qemu)?;
            save(&results, "retarget", &mut v)?;
            report::update(bench_dir)?;
        }
        Cmd::Throughput { guest_gib } => {
            let mut v = throughput(guest_gib)?;
            save(&results, "throughput", &mut v)?;
            report::update(bench_dir)?;
        }
        Cmd::Scale { guest_gib, dirty_mbps } => {
            let mut v = scale(guest_gib, dirty_mbps)?;
            save(&results, "scale", &mut v)?;
            report::update(bench_dir)?;
        }
        Cmd::Report => report::update(bench_dir)?,
        Cmd::All { no_qemu } => {
            let t = std::time::Instant::now();
            let mut v = throughput(4)?;
            save(&results, "throughput", &mut v)?;
            let mut v = downtime(1.0, 1000, &[0.0, 25.0, 50.0, 100.0, 150.0], 60)?;
            save(&results, "downtime", &mut v)?;
            let mut v = scale(6, 50.0)?;
            save(&results, "scale", &mut v)?;
            let mut v = retarget(2.0, 1000, &[0.1, 0.3, 0.5, 0.7, 0.9], &[0.0, 50.0], !no_qemu)?;
            save(&results, "retarget", &mut v)?;
            report::update(bench_dir)?;
            eprintln!(
                "all scenarios done in {:.0} s; bench/README.md and bench/results/ updated",
                t.elapsed().as_secs_f64()
            );
        }
    }
    Ok(())
}
