//! The stock-QEMU baseline of the retarget scenario: QEMU's own migration to
//! the old host, cancelled when the same fraction of RAM got there, and
//! restarted to the new host, over the same shaped links.

use anyhow::{bail, Context, Result};
use dcmigrate::testbed::net::NetHost;
use dcmigrate::vm::qmp::Qmp;
use qapi::qmp;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const PORT: u16 = 25301;

pub struct QemuProc {
    child: Child,
    pub qmp: PathBuf,
}

impl Drop for QemuProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// QEMU (TCG, never started: `-S`) in namespace `ns` with `size` bytes of
/// RAM in a file backend at `ram`; `incoming` makes it wait for a migration.
pub fn start(ns: &str, dir: &Path, name: &str, ram: &Path, size: u64, incoming: Option<&NetHost>) -> Result<QemuProc> {
    let qmp = dir.join(format!("{name}.qmp"));
    let _ = std::fs::remove_file(&qmp);
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, "qemu-system-x86_64", "-accel", "tcg", "-nodefaults", "-display", "none", "-S"]);
    c.args(["-m", &format!("{}M", size >> 20)]);
    c.arg("-object").arg(format!("memory-backend-file,id=ram0,size={size},mem-path={},share=on", ram.display()));
    c.args(["-machine", "memory-backend=ram0"]);
    c.arg("-qmp").arg(format!("unix:{},server=on,wait=off", qmp.display()));
    if let Some(h) = incoming {
        c.args(["-incoming", &format!("tcp:{}:{PORT}", h.ip)]);
    }
    let child = c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().context("starting QEMU")?;
    let p = QemuProc { child, qmp };
    let end = Instant::now() + Duration::from_secs(30);
    // The socket file appears a moment before QEMU listens on it.
    while std::os::unix::net::UnixStream::connect(&p.qmp).is_err() {
        if Instant::now() > end {
            bail!("QEMU in {ns} did not open its QMP socket");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(p)
}

fn connect(p: &QemuProc) -> Result<Qmp> {
    Ok(Qmp::connect(&p.qmp, Duration::from_secs(30))?)
}

/// Fills a RAM file with pseudo-random bytes (nothing for QEMU to skip as zero).
pub fn fill(path: &Path, size: u64) -> Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut x = 0x9e3779b97f4a7c15u64;
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..size >> 20 {
        for c in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&buf)?;
    }
    Ok(())
}

/// Migrates from `src` to an incoming QEMU at `to`; with `cancel_at`, cancels
/// once that many bytes were transferred. Returns when done or cancelled.
fn migrate(src: &QemuProc, to: &NetHost, cancel_at: Option<u64>) -> Result<()> {
    let mut q = connect(src)?;
    q.execute(&qmp::migrate_set_parameters(qmp::MigrateSetParameters {
        max_bandwidth: Some(u32::MAX as u64), // the shaped link is the limit, not QEMU's 32 MiB/s default
        ..Default::default()
    }))?;
    let uri = format!("tcp:{}:{PORT}", to.ip);
    q.execute(&qmp::migrate { uri: Some(uri), channels: None, detach: None, resume: None })?;
    loop {
        let info = q.query_migrate()?;
        match info.status {
            Some(qmp::MigrationStatus::completed) => return Ok(()),
            Some(qmp::MigrationStatus::failed) => bail!("QEMU migration failed: {:?}", info.error_desc),
            Some(qmp::MigrationStatus::cancelled) => return Ok(()),
            _ => {}
        }
        if let (Some(limit), Some(ram)) = (cancel_at, info.ram.as_ref()) {
            if ram.transferred.max(0) as u64 >= limit {
                q.execute(&qmp::migrate_cancel {})?;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One cancel-and-restart: returns (ms after the cancel, total ms).
pub fn restart(hosts: &[NetHost], dir: &Path, size: u64, at: f64) -> Result<(f64, f64)> {
    let (a, b, c) = (&hosts[0], &hosts[1], &hosts[2]);
    let ram = |h: &str| dir.join(format!("qemu-{h}.ram"));
    fill(&ram("A"), size)?;
    for h in ["B", "C"] {
        std::fs::File::create(ram(h))?.set_len(size)?;
    }
    let src = start(&a.ns, dir, "A", &ram("A"), size, None)?;
    let t0 = Instant::now();
    {
        let _dst = start(&b.ns, dir, "B", &ram("B"), size, Some(b))?;
        std::thread::sleep(Duration::from_millis(300));
        migrate(&src, b, Some((at * size as f64) as u64))?;
    }
    let t_cancel = Instant::now();
    let _dst = start(&c.ns, dir, "C", &ram("C"), size, Some(c))?;
    std::thread::sleep(Duration::from_millis(300));
    migrate(&src, c, None)?;
    let end = Instant::now();
    for h in ["A", "B", "C"] {
        let _ = std::fs::remove_file(ram(h));
    }
    Ok(((end - t_cancel).as_secs_f64() * 1e3, (end - t0).as_secs_f64() * 1e3))
}
