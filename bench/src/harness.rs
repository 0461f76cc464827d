//! What every scenario uses: the dcmigrate binary, iperf3 baselines, a
//! migration run to its report, and the /proc readers for agents' memory
//! and CPU.

use anyhow::{bail, Context, Result};
use dcmigrate::agent::api::Request;
use dcmigrate::engine::MigrateOptions;
use dcmigrate::testbed::{pids_by_cmdline, Testbed};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub fn exe() -> Result<PathBuf> {
    // The dcmigrate binary sits next to this one in target/<profile>/.
    let me = std::env::current_exe()?;
    let p = me.with_file_name("dcmigrate");
    if !p.exists() {
        bail!("{} not found: build it first (cargo build --release)", p.display());
    }
    Ok(p)
}

pub fn ensure_iperf3() -> Result<()> {
    // The project's one install helper: decides from dpkg's status, installs as root.
    let need = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/lib/need");
    let ok = Command::new(need).args(["--who", "dcmigrate-bench", "iperf3"]).status()?.success();
    if !ok {
        bail!("iperf3 is needed for the baseline and could not be installed");
    }
    Ok(())
}

/// iperf3 over loopback with `streams` parallel streams, in MB/s.
pub fn iperf3(streams: usize) -> Result<f64> {
    iperf3_between(&[], &[], "127.0.0.1", streams)
}

/// iperf3 from a client run with `client` (a command prefix such as
/// `ip netns exec NS`) to a server run with `server` at `ip`, in MB/s.
pub fn iperf3_between(client: &[&str], server: &[&str], ip: &str, streams: usize) -> Result<f64> {
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

pub fn migrate(tb: &Testbed, from: &str, vm: &str, to: &str, options: MigrateOptions) -> Result<Value> {
    tb.call(from, &Request::Migrate { vm: vm.into(), to: to.into(), options })?;
    let r = tb.call(from, &Request::Wait { vm: vm.into() })?["report"].clone();
    if r["result"] != "completed" {
        bail!("migration failed: {r}");
    }
    Ok(r)
}

pub fn median(mut v: Vec<f64>) -> f64 {
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
pub fn touch_memory(gib: u64) -> Result<f64> {
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

/// Anonymous resident memory (heap, stacks: not the mapped RAM files) of a process, in MiB.
pub fn anon_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("RssAnon:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// CPU seconds (user + system) a process used so far: fields 14 and 15 of
/// its stat, counted from 1, in USER_HZ (100) ticks.
pub fn cpu_s(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let f: Vec<&str> = stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
    let t = |i: usize| f.get(i - 3).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    (t(14) + t(15)) / 100.0
}

/// The pid of the agent whose command line names `api`.
pub fn agent_pid(api: &Path) -> Option<u32> {
    let needle = api.display().to_string();
    pids_by_cmdline(|cmd| cmd.contains("\0agent\0") && cmd.contains(&needle)).first().copied()
}

/// Kills the agents and guests this benchmark started (interrupted: their
/// network namespaces go, but processes inside a namespace outlive it).
pub fn kill_strays() {
    let Ok(exe) = exe() else { return };
    let prefix = format!("{}\0", exe.display());
    for pid in pids_by_cmdline(|cmd| cmd.starts_with(&prefix)) {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
}

/// CPU seconds (user + system) used so far by every `dcmigrate agent` process.
pub fn agents_cpu_s() -> f64 {
    pids_by_cmdline(|cmd| cmd.contains("dcmigrate\0agent")).into_iter().map(cpu_s).sum()
}

pub fn machine() -> Value {
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
