//! dcmigrate benchmarks. Every figure is compared with a baseline measured
//! in the same run on the same machine (iperf3 for link throughput).
//!
//! `dcmigrate-bench core` : throughput of an idle guest over loopback vs
//! iperf3 (1 and 4 streams), and downtime/total time of a dirtying guest.
//! Writes bench/results/core.json and prints a Markdown table.
//!
//! `dcmigrate-bench retarget` (root): three hosts in network namespaces with
//! shaped links; retarget at several fractions, forwarding vs restart, with
//! the ideal time from the link model. Writes bench/results/retarget.json.

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
    /// Loopback throughput vs iperf3, and downtime under a dirtying guest.
    Core {
        /// Idle guest size for the throughput runs, in GiB.
        #[arg(long, default_value_t = 4)]
        idle_gib: u64,
        /// Dirtying guest size in GiB and its dirty rate in MB/s.
        #[arg(long, default_value_t = 1)]
        dirty_gib: u64,
        #[arg(long, default_value_t = 50.0)]
        dirty_mbps: f64,
        /// Repetitions of the downtime run (median reported).
        #[arg(long, default_value_t = 3)]
        repeat: usize,
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
    if Command::new("iperf3").arg("--version").stdout(Stdio::null()).status().is_ok() {
        return Ok(());
    }
    eprintln!("installing iperf3 (Debian package) for the baseline");
    let ok = Command::new("sh")
        .args(["-c", "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iperf3 >/dev/null"])
        .status()?
        .success();
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
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
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

fn core(idle_gib: u64, dirty_gib: u64, dirty_mbps: f64, repeat: usize) -> Result<Value> {
    ensure_iperf3()?;
    let exe = exe()?;
    let first_touch = touch_memory(2 * idle_gib + 1)?;
    let warm_touch = touch_memory(2 * idle_gib + 1)?;
    eprintln!("tmpfs write rate: first touch {first_touch:.0} MB/s, warm {warm_touch:.0} MB/s");
    let mut rows = vec![];
    {
        let mut tb = Testbed::start(&exe, &["hostA", "hostB"])?;
        let idle = Workload { dirty_rate_mbps: 0.0, hot_fraction: 1.0, pattern: Pattern::Random, seed: 3 };
        tb.start_guest("hostA", "idle", idle_gib << 30, &idle, false, &[])?;
        let mut hosts = ("hostA", "hostB");
        for streams in [1usize, 4] {
            let baseline = iperf3(streams)?;
            let r = migrate(&tb, hosts.0, "idle", hosts.1, MigrateOptions { streams, ..Default::default() })?;
            let round0 = &r["rounds"][0];
            let mbps = round0["bytes"].as_f64().unwrap() / (round0["ms"].as_f64().unwrap() / 1e3) / 1e6;
            eprintln!("idle {idle_gib} GiB, {streams} streams: {mbps:.0} MB/s vs iperf3 {baseline:.0} MB/s");
            rows.push(
                json!({"streams": streams, "guest_gib": idle_gib, "migration_mbps": mbps, "iperf3_mbps": baseline,
                             "ratio": mbps / baseline, "total_ms": r["total_ms"], "downtime_ms": r["downtime_ms"]}),
            );
            hosts = (hosts.1, hosts.0);
        }
    }
    let mut runs = vec![];
    {
        let mut tb = Testbed::start(&exe, &["hostA", "hostB"])?;
        let w = Workload { dirty_rate_mbps: dirty_mbps, hot_fraction: 1.0, pattern: Pattern::Random, seed: 5 };
        tb.start_guest("hostA", "busy", dirty_gib << 30, &w, false, &[])?;
        let mut hosts = ("hostA", "hostB");
        for _ in 0..repeat {
            let r = migrate(&tb, hosts.0, "busy", hosts.1, MigrateOptions::default())?;
            eprintln!(
                "busy {dirty_gib} GiB at {dirty_mbps} MB/s: total {:.0} ms, downtime {:.1} ms",
                r["total_ms"].as_f64().unwrap(),
                r["downtime_ms"].as_f64().unwrap()
            );
            runs.push(r);
            hosts = (hosts.1, hosts.0);
        }
    }
    let get = |k: &str| runs.iter().map(|r| r[k].as_f64().unwrap()).collect::<Vec<_>>();
    let dt = json!({
        "guest_gib": dirty_gib, "dirty_mbps": dirty_mbps, "repeat": repeat,
        "downtime_ms_median": median(get("downtime_ms")), "total_ms_median": median(get("total_ms")),
        "rounds": runs.iter().map(|r| r["rounds"].as_array().unwrap().len()).collect::<Vec<_>>(),
        "downtime_phases": runs.iter().map(|r| r["downtime"].clone()).collect::<Vec<_>>(),
    });
    Ok(json!({"throughput": rows, "downtime": dt,
              "memory": {"first_touch_mbps": first_touch, "warm_mbps": warm_touch}}))
}

/// CPU seconds (user + system) used so far by every `dcmigrate agent` process.
fn agents_cpu_s() -> f64 {
    let tick = 100.0; // USER_HZ on Linux
    let mut total = 0.0;
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd);
        if !cmd.contains("dcmigrate\0agent") {
            continue;
        }
        if let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) {
            let f: Vec<&str> = stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
            // After the name: state is field 3, utime 14 and stime 15 (1-based).
            let t = |i: usize| f.get(i - 3).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
            total += (t(14) + t(15)) / tick;
        }
    }
    total
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
    for (kind, name) in [(TransportKind::Tcp, "tcp"), (TransportKind::Rdma, "rdma"), (TransportKind::Tcp, "tcp"), (TransportKind::Rdma, "rdma")] {
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
        eprintln!("{name}: {mbps:.0} MB/s, {:.0} ms in all, agents' CPU {cpu:.2} s ({:.2} s/GiB)", r["total_ms"].as_f64().unwrap_or(0.0), cpu / gib.max(1e-9));
        rows.push(json!({"transport": name, "transport_used": r["transport"], "streams": streams, "guest_mib": guest_mib,
            "round0_mbps": mbps, "total_ms": r["total_ms"], "agents_cpu_s": cpu, "cpu_s_per_gib": cpu / gib.max(1e-9)}));
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

fn retarget(guest_gib: f64, rate_mbit: u64, at: &[f64], dirty: &[f64]) -> Result<Value> {
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
    Ok(json!({"rows": rows, "rate_mbit": rate_mbit, "guest_gib": guest_gib, "link_goodput_mbps": goodputs}))
}

/// Writes `results/NAME.json`, stamped with the machine and date.
fn save(results: &Path, name: &str, v: &mut Value) -> Result<()> {
    v["machine"] = machine();
    std::fs::write(results.join(format!("{name}.json")), serde_json::to_string_pretty(v)?)?;
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let results = Path::new(env!("CARGO_MANIFEST_DIR")).join("results");
    std::fs::create_dir_all(&results)?;
    match cli.cmd {
        Cmd::Downtime { guest_gib, rate_mbit, dirty_mbps, max_time_s } => {
            let mut v = downtime(guest_gib, rate_mbit, &dirty_mbps, max_time_s)?;
            save(&results, "downtime", &mut v)?;
            println!("| dirty MB/s | downtime ms | rounds | total s | switchover |\n|---|---|---|---|---|");
            for r in v["rows"].as_array().unwrap() {
                println!(
                    "| {} | {:.0} | {} | {:.1} | {} |",
                    r["dirty_mbps"],
                    r["downtime_ms"].as_f64().unwrap_or(0.0),
                    r["rounds"],
                    r["total_ms"].as_f64().unwrap_or(0.0) / 1e3,
                    r["switchover"].as_str().unwrap_or("?")
                );
            }
        }
        Cmd::Transport { guest_mib, streams } => {
            let v = transport(guest_mib, streams)?;
            println!("RESULT-JSON {}", serde_json::to_string(&v)?);
        }
        Cmd::Retarget { guest_gib, rate_mbit, at, dirty_mbps } => {
            let mut v = retarget(guest_gib, rate_mbit, &at, &dirty_mbps)?;
            save(&results, "retarget", &mut v)?;
            println!("| dirty MB/s | retarget at | forward ms | restart ms | forward/restart | forward/ideal | restart/ideal |");
            println!("|---|---|---|---|---|---|---|");
            let rows = v["rows"].as_array().unwrap();
            for pair in rows.chunks(2) {
                let (fw, rs) = (&pair[0], &pair[1]);
                let g = |r: &Value, k: &str| r[k].as_f64().unwrap_or(0.0);
                println!(
                    "| {} | {:.0}% | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} |",
                    fw["dirty_mbps"],
                    g(fw, "retarget_at") * 100.0,
                    g(fw, "after_retarget_ms"),
                    g(rs, "after_retarget_ms"),
                    g(fw, "after_retarget_ms") / g(rs, "after_retarget_ms"),
                    g(fw, "ratio_to_ideal"),
                    g(rs, "ratio_to_ideal")
                );
            }
        }
        Cmd::Core { idle_gib, dirty_gib, dirty_mbps, repeat } => {
            let mut v = core(idle_gib, dirty_gib, dirty_mbps, repeat)?;
            save(&results, "core", &mut v)?;
            println!("| streams | guest | dcmigrate MB/s | iperf3 MB/s | ratio |\n|---|---|---|---|---|");
            for r in v["throughput"].as_array().unwrap() {
                println!(
                    "| {} | {} GiB idle | {:.0} | {:.0} | {:.2} |",
                    r["streams"],
                    r["guest_gib"],
                    r["migration_mbps"].as_f64().unwrap(),
                    r["iperf3_mbps"].as_f64().unwrap(),
                    r["ratio"].as_f64().unwrap()
                );
            }
            let d = &v["downtime"];
            println!(
                "\n{} GiB guest dirtying {} MB/s: downtime {:.1} ms, total {:.0} ms (medians of {}), rounds {}",
                d["guest_gib"],
                d["dirty_mbps"],
                d["downtime_ms_median"].as_f64().unwrap(),
                d["total_ms_median"].as_f64().unwrap(),
                d["repeat"],
                d["rounds"]
            );
        }
    }
    Ok(())
}
