//! QEMU guests for the test bed: starts `qemu-system-x86_64` (TCG) on a
//! host with its RAM in shared backends and a QMP socket, and adds it to
//! that host's agent with a launch spec whose paths use `{dir}`.

use super::{err, wait_for, Testbed, TestbedError};
use crate::vm::LaunchSpec;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The QEMU program the test bed runs unless `DCMIGRATE_QEMU` names another.
pub const QEMU: &str = "qemu-system-x86_64";

/// Waits until QEMU accepts connections on its QMP socket: the socket file
/// appears at bind(), a moment before listen(), and a connect in between
/// is refused. The probe connection is closed at once; QEMU then takes the
/// next client.
pub fn qmp_listening(qmp: &Path, secs: u64) -> Option<()> {
    wait_for(secs, || std::os::unix::net::UnixStream::connect(qmp).ok().map(drop))
}

/// The QEMU binary the test bed runs: `DCMIGRATE_QEMU` (for example a QEMU
/// 10 unpacked from bookworm-backports), else `qemu-system-x86_64` on PATH.
pub fn qemu_binary() -> String {
    std::env::var("DCMIGRATE_QEMU").unwrap_or_else(|_| QEMU.into())
}

/// The kind of shared memory backend that holds a RAM region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// `memory-backend-file,share=on` on `{dir}/ID.ram`, created by the test bed.
    File,
    /// `memory-backend-memfd,share=on`: no file name; the agent finds it
    /// through QEMU's process.
    Memfd,
    /// `memory-backend-file,share=on,prealloc=on` on `{huge}/VM-ID.ram`, a
    /// file QEMU creates on the spec's hugetlbfs mount.
    HugeFile,
    /// The same with `mem-path={huge}`, the mount itself: QEMU creates a
    /// file there and unlinks it (as libvirt has it do).
    HugeDir,
}

/// What to boot: RAM backends (id, size, kind) and an optional guest image
/// (a directory with `vmlinuz` and `initrd.gz`, from `tests/guest-image/build`).
pub struct QemuSpec {
    /// RAM regions: backend id, size in bytes, backend kind; several become
    /// one NUMA node each.
    pub ram: Vec<(String, u64, Backend)>,
    /// The guest image to boot; without one, QEMU runs its firmware with
    /// nothing to boot.
    pub image: Option<PathBuf>,
    /// The hugetlbfs mount of [`Backend::HugeFile`] and [`Backend::HugeDir`].
    pub huge: Option<PathBuf>,
}

/// Where `tests/guest-image/build` leaves the guest (`DCMIGRATE_GUEST_IMAGE` overrides).
pub fn guest_image() -> Option<PathBuf> {
    let dir = std::env::var_os("DCMIGRATE_GUEST_IMAGE")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/guest-image"));
    (dir.join("vmlinuz").is_file() && dir.join("initrd.gz").is_file()).then_some(dir)
}

/// Whether the test bed's QEMU ([`qemu_binary`]) runs here.
pub fn qemu_available() -> bool {
    Command::new(qemu_binary())
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl QemuSpec {
    /// The command line, with `{dir}` for the VM's directory and `{vm}`
    /// for its name.
    pub fn args(&self) -> Vec<String> {
        let huge = self.huge.as_ref().map(|h| h.display().to_string()).unwrap_or_default();
        let total: u64 = self.ram.iter().map(|r| r.1).sum();
        let mut a: Vec<String> = ["-accel", "tcg", "-nodefaults", "-no-user-config", "-display", "none"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.extend(["-serial".into(), "file:{dir}/serial.log".into(), "-m".into(), format!("{}M", total >> 20)]);
        for (id, size, kind) in &self.ram {
            let obj = match kind {
                Backend::File => {
                    format!("memory-backend-file,id={id},size={},mem-path={{dir}}/{id}.ram,share=on", size)
                }
                Backend::Memfd => format!("memory-backend-memfd,id={id},size={},share=on", size),
                Backend::HugeFile => format!(
                    "memory-backend-file,id={id},size={size},mem-path={huge}/{{vm}}-{id}.ram,share=on,prealloc=on"
                ),
                Backend::HugeDir => {
                    format!("memory-backend-file,id={id},size={size},mem-path={huge},share=on,prealloc=on")
                }
            };
            a.extend(["-object".into(), obj]);
        }
        if let [(id, _, _)] = self.ram.as_slice() {
            a.extend(["-machine".into(), format!("memory-backend={id}")]);
        } else {
            for (id, _, _) in &self.ram {
                a.extend(["-numa".into(), format!("node,memdev={id}")]);
            }
        }
        if let Some(img) = &self.image {
            a.extend([
                "-kernel".into(),
                img.join("vmlinuz").display().to_string(),
                "-initrd".into(),
                img.join("initrd.gz").display().to_string(),
                "-append".into(),
                "console=ttyS0 quiet panic=-1".into(),
            ]);
        }
        a
    }
}

/// "heartbeat N" counters the test guest prints on its serial console, in
/// order; a line split across two logs (a migration) joins up when the logs
/// are concatenated.
pub fn heartbeats(text: &str) -> Vec<u64> {
    text.split("heartbeat ")
        .skip(1)
        .filter_map(|s| s.chars().take_while(char::is_ascii_digit).collect::<String>().parse().ok())
        .collect()
}

/// A QEMU started on a test host.
pub struct QemuGuest {
    /// The VM's name at the agents.
    pub name: String,
    /// Its directory on the source host (`{dir}` there).
    pub dir: PathBuf,
}

impl QemuGuest {
    /// Its serial console log on the source host (the guest prints its
    /// heartbeats there until it migrates).
    pub fn serial(&self) -> PathBuf {
        self.dir.join("serial.log")
    }
}

impl Testbed {
    /// Starts QEMU on `host` (in the host's network namespace, if any) and
    /// adds it to the agent there.
    pub fn start_qemu(&mut self, host: &str, name: &str, spec: &QemuSpec) -> Result<QemuGuest, TestbedError> {
        let h = self.host(host);
        let dir = h.data_dir.join(format!("{name}.src"));
        std::fs::create_dir_all(&dir).map_err(err)?;
        let ds = dir.display().to_string();
        let qmp = dir.join("qmp.sock");
        for (id, size, kind) in &spec.ram {
            if *kind == Backend::File {
                let f = std::fs::File::create(dir.join(format!("{id}.ram"))).map_err(err)?;
                f.set_len(*size).map_err(err)?;
            }
        }
        let fill = |a: &String| a.replace("{dir}", &ds).replace("{vm}", name);
        let args: Vec<String> = spec.args().iter().map(fill).collect();
        let log = std::fs::File::create(dir.join("qemu.log")).map_err(err)?;
        let mut cmd = self.command(host, qemu_binary());
        cmd.args(&args).arg("-qmp").arg(format!("unix:{},server=on,wait=off", qmp.display()));
        cmd.stdin(Stdio::null()).stdout(log.try_clone().map_err(err)?).stderr(log);
        self.guests.push(cmd.spawn().map_err(|e| TestbedError(format!("starting {}: {e}", qemu_binary())))?);
        qmp_listening(&qmp, 30)
            .ok_or_else(|| TestbedError(format!("QEMU on {host} did not open its QMP socket: see {ds}/qemu.log")))?;
        let args = spec.args().iter().map(|a| a.replace("{vm}", name)).collect();
        let launch = LaunchSpec::Qemu { binary: qemu_binary(), args };
        self.client(host).attach_qemu(name, qmp, Some(launch)).map_err(|e| err(crate::error_chain(&e)))?;
        Ok(QemuGuest { name: name.into(), dir })
    }

    /// Pids of QEMU processes whose command line mentions `needle` (a path).
    pub fn qemu_pids(needle: &Path) -> Vec<u32> {
        let n = needle.display().to_string();
        super::pids_by_cmdline(|cmd| {
            let prog = cmd.split('\0').next().unwrap_or_default();
            prog.ends_with("qemu-system-x86_64") && cmd.contains(&n)
        })
        .into_iter()
        .filter(|pid| crate::vm::qemu::alive(*pid))
        .collect()
    }
}
