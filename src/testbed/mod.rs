//! Local test beds: several agents (and guests) on one machine, each a real
//! process with its own API socket, ports, data dir and TLS identity, on
//! loopback or (as root) in network namespaces with shaped links ([`net`]).
//! Used by `dcmigrate demo`, the integration tests and the benchmarks.
//! Everything it started is stopped and removed when it is dropped.

pub mod huge;
pub mod net;
pub mod qemu;

use crate::agent::api::{Client, Request, VmEntry};
use crate::vm::synthetic::Workload;
use serde_json::Value;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use thiserror::Error;

/// Starting or driving a test bed failed; says what.
#[derive(Debug, Error)]
#[error("test bed: {0}")]
pub struct TestbedError(pub String);

fn err(e: impl std::fmt::Display) -> TestbedError {
    TestbedError(e.to_string())
}

/// One agent of a test bed.
pub struct Host {
    /// The host's name (its agent's `--name` and certificate).
    pub name: String,
    /// The agent's API socket.
    pub api: PathBuf,
    /// Where the agent puts incoming VMs' RAM (`--data-dir`).
    pub data_dir: PathBuf,
    /// The agent's control channel (mTLS) address.
    pub control: SocketAddr,
    /// The agent's stdout and stderr.
    pub log: PathBuf,
    /// Its storage directories besides the guest image's (`--storage`).
    pub storage: Vec<PathBuf>,
    /// Its networks (`--network NAME=...`).
    pub networks: Vec<String>,
    /// Its huge-page mounts (`--hugepages`).
    pub hugepages: Vec<PathBuf>,
    child: Option<Child>,
}

impl Host {
    /// The agent's state dir (its journal, VMs' runtime directories).
    pub fn state_dir(&self) -> PathBuf {
        self.log.with_file_name("state")
    }
}

/// Agents (and guests) started together; stopped and removed on drop.
pub struct Testbed {
    exe: PathBuf,
    /// Holds the certificates and one directory per host; removed on drop.
    pub dir: tempfile::TempDir,
    /// The agents, in the order their names were given.
    pub hosts: Vec<Host>,
    guests: Vec<Child>,
    env: Vec<(String, String)>,
    /// Commands agents run under, by host (e.g. `setpriv … --`).
    wrappers: std::collections::HashMap<String, Vec<String>>,
    /// Dropped after the agents (field order), so namespaces outlive them.
    net: Option<net::Net>,
}

/// A free port below the kernel's ephemeral range, so that no listener
/// bound to port 0 (data planes, other test beds) can take it meanwhile.
fn free_port() -> Result<u16, TestbedError> {
    use rand::Rng;
    for _ in 0..1000 {
        let port = rand::thread_rng().gen_range(20000..32000);
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(TestbedError("no free port in 20000..32000".into()))
}

/// Pids of the processes whose command line (arguments joined by NULs)
/// satisfies `pred`; processes that end meanwhile are left out.
pub fn pids_by_cmdline(pred: impl Fn(&str) -> bool) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return vec![] };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| pred(&String::from_utf8_lossy(&c))))
        .collect()
}

/// Polls `f` until it returns Some or `secs` pass.
pub fn wait_for<T>(secs: u64, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Where a test bed's agents listen.
enum Place {
    /// Each in its host's namespace of this network.
    Net(net::Net),
    /// All on this address of this host.
    At(std::net::IpAddr),
}

impl Testbed {
    /// Starts one agent per name on loopback, all peers of each other.
    pub fn start(exe: &Path, names: &[&str]) -> Result<Self, TestbedError> {
        Self::start_with_env(exe, names, &[])
    }

    /// Like [`start`](Self::start), with extra environment for the agents.
    pub fn start_with_env(exe: &Path, names: &[&str], env: &[(&str, &str)]) -> Result<Self, TestbedError> {
        Self::start_in(exe, names, env, Place::At([127, 0, 0, 1].into()))
    }

    /// Like [`start`](Self::start), with the agents listening on `ip` (an
    /// address of this host) instead of loopback.
    pub fn start_at(exe: &Path, names: &[&str], ip: std::net::IpAddr) -> Result<Self, TestbedError> {
        Self::start_in(exe, names, &[], Place::At(ip))
    }

    /// One agent per host of `net`, each inside its host's namespace.
    pub fn start_net(exe: &Path, net: net::Net) -> Result<Self, TestbedError> {
        Self::start_net_with_env(exe, net, &[])
    }

    /// Like [`start_net`](Self::start_net), with extra environment for the agents.
    pub fn start_net_with_env(exe: &Path, net: net::Net, env: &[(&str, &str)]) -> Result<Self, TestbedError> {
        let names: Vec<String> = net.hosts.iter().map(|h| h.name.clone()).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        Self::start_in(exe, &names, env, Place::Net(net))
    }

    /// Cuts `host`'s link (or mends it): only for a test bed in namespaces.
    pub fn set_link(&self, host: &str, up: bool) -> Result<(), TestbedError> {
        let net = self.net.as_ref().ok_or_else(|| TestbedError("this test bed has no links to cut".into()))?;
        net.set_link(host, up)
    }

    /// Shapes the link into `host` to `mbit` Mbit/s: only in namespaces.
    pub fn shape(&self, host: &str, mbit: u64) -> Result<(), TestbedError> {
        let net = self.net.as_ref().ok_or_else(|| TestbedError("this test bed has no links to shape".into()))?;
        net.shape_ingress(host, mbit)
    }

    fn start_in(exe: &Path, names: &[&str], env: &[(&str, &str)], place: Place) -> Result<Self, TestbedError> {
        let (net, ip) = match place {
            Place::Net(n) => (Some(n), None),
            Place::At(ip) => (None, Some(ip)),
        };
        let shm = Path::new("/dev/shm");
        let dir = tempfile::Builder::new()
            .prefix("dcmigrate-")
            .tempdir_in(if shm.is_dir() { shm } else { Path::new("/tmp") })
            .map_err(err)?;
        let certs = dir.path().join("certs");
        crate::tls::init_certs(&certs, &names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).map_err(err)?;
        let mut hosts = vec![];
        for n in names {
            let control = match net.as_ref().and_then(|net| net.host(n)) {
                Some(h) => SocketAddr::new(h.ip, 4710),
                None => SocketAddr::new(ip.unwrap_or([127, 0, 0, 1].into()), free_port()?),
            };
            let hdir = dir.path().join(n);
            std::fs::create_dir_all(&hdir).map_err(err)?;
            hosts.push(Host {
                name: n.to_string(),
                api: hdir.join("api.sock"),
                data_dir: hdir.join("data"),
                control,
                log: hdir.join("agent.log"),
                storage: vec![],
                networks: vec![],
                hugepages: vec![],
                child: None,
            });
        }
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut tb = Self { exe: exe.to_owned(), dir, hosts, guests: vec![], env, wrappers: Default::default(), net };
        for i in 0..tb.hosts.len() {
            tb.spawn_agent(i, &certs)?;
        }
        for h in &tb.hosts {
            wait_for(20, || Client::new(&h.api).info().ok())
                .ok_or_else(|| TestbedError(format!("agent {} did not come up; see {}", h.name, h.log.display())))?;
        }
        Ok(tb)
    }

    /// A command that runs on `host` (inside its network namespace, if any).
    fn command(&self, host: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        match self.net.as_ref().and_then(|n| n.host(host)) {
            Some(nh) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &nh.ns]).arg(program);
                c
            }
            None => Command::new(program),
        }
    }

    fn spawn_agent(&mut self, i: usize, certs: &Path) -> Result<(), TestbedError> {
        self.spawn_agent_with(i, certs, &[])
    }

    fn spawn_agent_with(&mut self, i: usize, certs: &Path, extra: &[(&str, &str)]) -> Result<(), TestbedError> {
        let h = &self.hosts[i];
        let mut cmd = match self.wrappers.get(&h.name).and_then(|w| w.split_first()) {
            Some((program, args)) => {
                let mut c = self.command(&h.name, program);
                c.args(args).arg(&self.exe);
                c
            }
            None => self.command(&h.name, &self.exe),
        };
        cmd.args(["agent", "--name", &h.name, "--listen", &h.control.to_string(), "--synthetic-guests"]);
        cmd.arg("--certs").arg(certs).arg("--api").arg(&h.api).arg("--data-dir").arg(&h.data_dir);
        cmd.arg("--state-dir").arg(h.state_dir());
        if let Some(img) = qemu::guest_image() {
            // VM descriptions boot the test guest's kernel from there.
            cmd.arg("--storage").arg(img);
        }
        for s in &h.storage {
            cmd.arg("--storage").arg(s);
        }
        for n in &h.networks {
            cmd.arg("--network").arg(n);
        }
        for d in &h.hugepages {
            cmd.arg("--hugepages").arg(d);
        }
        for p in &self.hosts {
            if p.name != h.name {
                cmd.arg("--peer").arg(format!("{}={}", p.name, p.control));
            }
        }
        let log = std::fs::File::create(&h.log).map_err(err)?;
        cmd.stdin(Stdio::null()).stdout(log.try_clone().map_err(err)?).stderr(log);
        cmd.env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()));
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd.envs(extra.iter().copied());
        let child = cmd.spawn().map_err(err)?;
        self.hosts[i].child = Some(child);
        Ok(())
    }

    /// Stops `host`'s agent (SIGKILL) and starts it again with `extra`
    /// environment on top of the test bed's; waits until it answers.
    pub fn restart_agent(&mut self, host: &str, extra: &[(&str, &str)]) -> Result<(), TestbedError> {
        self.kill_agent(host);
        let i =
            self.hosts.iter().position(|h| h.name == host).ok_or_else(|| TestbedError(format!("no host {host}")))?;
        let certs = self.certs_dir();
        self.spawn_agent_with(i, &certs, extra)?;
        let h = &self.hosts[i];
        wait_for(20, || Client::new(&h.api).info().ok())
            .map(|_| ())
            .ok_or_else(|| TestbedError(format!("agent {host} did not come back; see {}", h.log.display())))
    }

    /// Restarts `host`'s agent under `wrapper` (a command that runs the
    /// rest of its command line, such as `setpriv … --`), from now on.
    pub fn restart_agent_under(&mut self, host: &str, wrapper: &[&str]) -> Result<(), TestbedError> {
        self.wrappers.insert(host.to_owned(), wrapper.iter().map(|s| s.to_string()).collect());
        self.restart_agent(host, &[])
    }

    /// Gives `host`'s agent `dir` as a storage directory too, from its next start.
    pub fn add_storage(&mut self, host: &str, dir: &Path) {
        if let Some(h) = self.hosts.iter_mut().find(|h| h.name == host) {
            h.storage.push(dir.to_owned());
        }
    }

    /// Gives `host`'s agent the huge-page mount `dir`, from its next start.
    pub fn add_hugepages(&mut self, host: &str, dir: &Path) {
        if let Some(h) = self.hosts.iter_mut().find(|h| h.name == host) {
            h.hugepages.push(dir.to_owned());
        }
    }

    /// Gives `host`'s agent the network `spec` (`NAME=...`), from its next start.
    pub fn add_network(&mut self, host: &str, spec: &str) {
        if let Some(h) = self.hosts.iter_mut().find(|h| h.name == host) {
            h.networks.push(spec.to_owned());
        }
    }

    /// The host named `name`; panics if there is none.
    pub fn host(&self, name: &str) -> &Host {
        self.hosts.iter().find(|h| h.name == name).expect("host in test bed")
    }

    /// The CA and the hosts' certificates and keys (`certs init` layout).
    pub fn certs_dir(&self) -> PathBuf {
        self.dir.path().join("certs")
    }

    /// Starts a synthetic guest on `host`, registered with its agent;
    /// `extra`: more `dcmigrate guest` arguments.
    pub fn start_guest(
        &mut self,
        host: &str,
        name: &str,
        size: u64,
        w: &Workload,
        keep_ram: bool,
        extra: &[&str],
    ) -> Result<(), TestbedError> {
        let h = self.host(host);
        let mut cmd = Command::new(&self.exe);
        cmd.args(["guest", "--name", name, "--size", &size.to_string()]);
        cmd.args([
            "--dirty-rate",
            &w.dirty_rate_mbps.to_string(),
            "--hot-fraction",
            &w.hot_fraction.to_string(),
            "--seed",
            &w.seed.to_string(),
        ]);
        cmd.args([
            "--pattern",
            match w.pattern {
                crate::vm::synthetic::Pattern::Random => "random",
                crate::vm::synthetic::Pattern::Sequential => "sequential",
                crate::vm::synthetic::Pattern::Alternate => "alternate",
            },
        ]);
        cmd.arg("--dir").arg(&h.data_dir).arg("--agent").arg(&h.api);
        if keep_ram {
            cmd.arg("--keep-ram");
        }
        cmd.args(extra);
        std::fs::create_dir_all(&h.data_dir).map_err(err)?;
        let log = std::fs::File::create(h.log.with_file_name(format!("guest-{name}.log"))).map_err(err)?;
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
        let api_path = h.api.clone();
        self.guests.push(cmd.spawn().map_err(err)?);
        // Filling RAM is first-touch of tmpfs, which some machines back slowly.
        let secs = 60 + (size >> 30) * 30;
        wait_for(secs, || self.vm(&api_path, name))
            .map(|_| ())
            .ok_or_else(|| TestbedError(format!("guest {name} did not register with {host}")))
    }

    fn vm(&self, api_path: &Path, name: &str) -> Option<VmEntry> {
        Client::new(api_path).list().ok()?.into_iter().find(|v| v.name == name)
    }

    /// The VM's entry in `host`'s list (with its live state), if it is there.
    pub fn vm_on(&self, host: &str, name: &str) -> Option<VmEntry> {
        self.vm(&self.host(host).api, name)
    }

    /// A typed client of `host`'s agent.
    pub fn client(&self, host: &str) -> Client {
        Client::new(&self.host(host).api)
    }

    /// One request to `host`'s agent; the reply's fields.
    pub fn call(&self, host: &str, req: &Request) -> Result<Value, TestbedError> {
        self.client(host).call_value(req).map_err(|e| err(crate::error_chain(&e)))
    }

    /// Stops a VM that runs on `host` (SIGTERM to its process) and waits
    /// until its agent no longer lists it.
    pub fn stop_vm(&self, host: &str, name: &str) {
        if let Some(pid) = self.vm_on(host, name).and_then(|v| v.state.pid) {
            // SAFETY: plain syscall.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            wait_for(10, || self.vm_on(host, name).map_or(Some(()), |_| None));
        }
    }

    /// SIGKILLs an agent (a host failure).
    pub fn kill_agent(&mut self, host: &str) {
        if let Some(h) = self.hosts.iter_mut().find(|h| h.name == host) {
            if let Some(mut c) = h.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    /// The pid of `host`'s agent, if it runs.
    pub fn agent_pid(&self, host: &str) -> Option<u32> {
        self.hosts.iter().find(|h| h.name == host).and_then(|h| h.child.as_ref()).map(|c| c.id())
    }

    /// Sends `sig` to `host`'s agent (SIGSTOP freezes it, SIGCONT thaws it,
    /// SIGTERM asks it to stop); false if it is not running.
    pub fn signal_agent(&self, host: &str, sig: i32) -> bool {
        let Some(pid) = self.agent_pid(host) else {
            return false;
        };
        // SAFETY: a signal to our own child process.
        unsafe { libc::kill(pid as i32, sig) == 0 }
    }

    /// Waits up to `secs` for `host`'s agent to exit; whether it did.
    pub fn wait_agent_exit(&mut self, host: &str, secs: u64) -> bool {
        let Some(h) = self.hosts.iter_mut().find(|h| h.name == host) else { return true };
        let Some(c) = h.child.as_mut() else { return true };
        let exited = wait_for(secs, || c.try_wait().ok().flatten()).is_some();
        if exited {
            h.child = None;
        }
        exited
    }

    /// One agent's log so far (every run of it since the testbed started
    /// the last one).
    pub fn agent_log(&self, host: &str) -> String {
        let h = self.hosts.iter().find(|h| h.name == host).unwrap_or_else(|| panic!("no host {host}"));
        std::fs::read_to_string(&h.log).unwrap_or_default()
    }

    /// Every agent's and guest's log, for test failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for h in &self.hosts {
            let dir = h.log.parent().expect("host dir");
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                if e.path().extension().is_some_and(|x| x == "log") {
                    out += &format!(
                        "==== {}\n{}\n",
                        e.path().display(),
                        std::fs::read_to_string(e.path()).unwrap_or_default()
                    );
                }
            }
        }
        out
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        // Guests first (wherever they run now), then agents.
        for h in &self.hosts {
            for vm in Client::new(&h.api).list().unwrap_or_default() {
                if let Some(pid) = vm.state.pid {
                    // SAFETY: plain syscall.
                    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
                }
            }
        }
        for g in &mut self.guests {
            let _ = g.kill();
            let _ = g.wait();
        }
        for h in &mut self.hosts {
            let _ = Client::new(&h.api).shutdown();
            if let Some(mut c) = h.child.take() {
                if wait_for(3, || c.try_wait().ok().flatten()).is_none() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
            }
        }
    }
}
