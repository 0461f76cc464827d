//! The agent as a service: the systemd unit in `dist/` (it verifies, and
//! runs the agent from its configuration file, reloads with SIGHUP and
//! leaves the VMs' scopes alone), and an agent that runs from a
//! configuration file alone, with a flag overriding it.

mod common;

use common::*;
use dcmigrate::agent::api::Client;
use dcmigrate::testbed::wait_for;
use std::path::Path;
use std::process::{Command, Stdio};

const UNIT: &str = include_str!("../dist/dcmigrate-agent.service");

/// `systemd-analyze verify` of the unit, with ExecStart pointing at this
/// build's binary (the installed path does not exist on a build machine):
/// no complaint at all, not even a warning.
#[test]
fn the_unit_verifies() {
    let Ok(out) = Command::new("systemd-analyze").arg("--version").output() else {
        skip("the_unit_verifies", "systemd-analyze is not installed (Debian: systemd)");
        return;
    };
    assert!(out.status.success());
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("dcmigrate-agent.service");
    std::fs::write(&unit, UNIT.replace("/usr/local/bin/dcmigrate", &exe().display().to_string())).unwrap();
    let out = Command::new("systemd-analyze").arg("verify").arg(&unit).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify failed: {stderr}");
    let own: Vec<&str> = stderr.lines().filter(|l| l.contains("dcmigrate-agent.service")).collect();
    assert!(own.is_empty(), "systemd-analyze complains about the unit: {own:?}");
}

/// What the README and the agent promise of the unit, line by line.
#[test]
fn the_unit_runs_from_the_config_reloads_and_spares_the_vms() {
    let lines: Vec<&str> = UNIT.lines().map(str::trim).collect();
    let has = |l: &str| lines.contains(&l);
    assert!(has("ExecStart=/usr/local/bin/dcmigrate agent --config /etc/dcmigrate/agent.toml"));
    assert!(has("ExecReload=/bin/kill -HUP $MAINPID"));
    assert!(has("Restart=on-failure"));
    // The agent alone gets SIGTERM (it cancels its migrations, 30 s at
    // most, within the stop timeout); VMs are in scopes of their own.
    assert!(has("KillMode=mixed"));
    let stop: u64 = lines.iter().find_map(|l| l.strip_prefix("TimeoutStopSec=")).unwrap().parse().unwrap();
    assert!(stop > 30, "the agent may take 30 s to stop");
}

#[test]
fn an_agent_runs_from_its_config_file_and_flags_override_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    dcmigrate::tls::init_certs(&d.join("certs"), &["hostA".into(), "hostB".into()]).unwrap();
    let api = d.join("api.sock");
    let config = format!(
        "name = \"hostA\"\nlisten = \"127.0.0.1:0\"\ncerts = \"{certs}\"\napi = \"{api}\"\n\
         data_dir = \"{data}\"\nstate_dir = \"{state}\"\nno_rdma = true\nmax_session_ram = \"1G\"\n\
         [peers]\nhostB = \"127.0.0.1:1\"\n",
        certs = d.join("certs").display(),
        api = d.join("not-this.sock").display(),
        data = d.join("data").display(),
        state = d.join("state").display(),
    );
    let file = d.join("agent.toml");
    std::fs::write(&file, config).unwrap();
    let log = std::fs::File::create(d.join("agent.log")).unwrap();
    // The API socket from the flag, not the file's; hostB's address too.
    let mut agent = Command::new(exe())
        .args(["agent", "--config"])
        .arg(&file)
        .arg("--api")
        .arg(&api)
        .args(["--peer", "hostB=127.0.0.1:2", "--qemu-scope", "off"])
        .stdin(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let info = wait_for(20, || Client::new(&api).info().ok());
    let agent_log = || std::fs::read_to_string(d.join("agent.log")).unwrap_or_default();
    let info = info.unwrap_or_else(|| {
        let _ = agent.kill();
        panic!("the agent did not come up: {}", agent_log())
    });
    assert_eq!(info.name, "hostA");
    assert_eq!(info.peers, ["hostB"]);
    assert!(!d.join("not-this.sock").exists());
    assert!(d.join("state").is_dir() && d.join("data").is_dir(), "{}", agent_log());
    Client::new(&api).shutdown().unwrap();
    let exited = wait_for(30, || agent.try_wait().ok().flatten());
    assert!(exited.is_some_and(|s| s.success()), "{}", agent_log());
}

#[test]
fn an_agent_with_a_bad_config_file_says_where() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agent.toml");
    std::fs::write(&file, "name = \"hostA\"\ncerts = \"/c\"\nmax_sesion_ram = \"1G\"\n").unwrap();
    let out = Command::new(exe()).args(["agent", "--config"]).arg(&file).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(&*file.display().to_string()) && err.contains("max_sesion_ram"), "{err}");
    assert!(Path::new(&file).exists());
}

/// Moves the files of `from` (a `certs init` directory) over those of `to`,
/// each by a rename, as an operator's deployment would.
fn replace_certs(from: &Path, to: &Path, files: &[&str]) {
    for f in files {
        let tmp = to.join(format!(".{f}.new"));
        std::fs::copy(from.join(f), &tmp).unwrap();
        std::fs::rename(&tmp, to.join(f)).unwrap();
    }
}

/// Waits until `host`'s agent presents the certificate in `pem`.
fn wait_presenting(tb: &dcmigrate::testbed::Testbed, host: &str, pem: &Path) {
    let want = dcmigrate::tls::CertInfo::of_pem(pem).unwrap().fingerprint;
    let now = wait_for(20, || tb.client(host).info().ok().filter(|i| i.cert_fingerprint == want));
    assert!(now.is_some(), "{host} does not present {} after SIGHUP:\n{}", pem.display(), tb.agent_log(host));
}

/// hostA migrates `vm` to hostB: the outcome, and the error if any.
fn migrate_result(tb: &dcmigrate::testbed::Testbed, vm: &str) -> (dcmigrate::engine::Outcome, String) {
    let opts = dcmigrate::engine::MigrateOptions { suspend: false, ..Default::default() };
    match tb.client("hostA").migrate(vm, "hostB", opts) {
        Ok(_) => {
            let r = wait_report(tb, "hostA", vm);
            (r.result, r.error.unwrap_or_default())
        }
        Err(e) => (dcmigrate::engine::Outcome::Failed, dcmigrate::error_chain(&e)),
    }
}

/// SIGHUP loads the certificates again: once hostB has a new CA's, hostA
/// (still on the old CA) cannot migrate to it; once hostA has them too, it
/// can. Certificates that do not load leave the agent as it was.
#[test]
fn sighup_reloads_the_certificates() {
    let mut tb = testbed(&["hostA", "hostB"]);
    let certs = tb.certs_dir();
    let before = tb.client("hostB").info().unwrap();
    assert_eq!(
        before.cert_fingerprint,
        dcmigrate::tls::CertInfo::of_pem(&certs.join("hostB.pem")).unwrap().fingerprint
    );
    assert!(before.cert_not_after > 0);
    tb.start_guest("hostA", "vm1", 16 * MIB, &workload(0.0), true, &[]).unwrap();

    // A new CA and both hosts' certificates from it; only hostB reloads.
    let fresh = tempfile::tempdir().unwrap();
    dcmigrate::tls::init_certs(fresh.path(), &["hostA".into(), "hostB".into()]).unwrap();
    replace_certs(fresh.path(), &certs, &["ca.pem", "hostA.pem", "hostA.key", "hostB.pem", "hostB.key"]);
    assert!(tb.signal_agent("hostB", libc::SIGHUP));
    wait_presenting(&tb, "hostB", &certs.join("hostB.pem"));
    let (result, error) = migrate_result(&tb, "vm1");
    assert_eq!(result, dcmigrate::engine::Outcome::Failed, "{}", tb.logs());
    // Refused in the handshake: hostA does not trust hostB's new CA.
    assert!(error.contains("TLS") || error.contains("certificate"), "{error}");
    println!("before hostA reloaded: {error}");
    assert!(tb.vm_on("hostA", "vm1").is_some(), "the VM stays on hostA");

    // A key that does not load: hostA keeps its (old CA's) identity.
    std::fs::write(certs.join("hostA.key"), "not a key").unwrap();
    let old_a = tb.client("hostA").info().unwrap().cert_fingerprint;
    assert!(tb.signal_agent("hostA", libc::SIGHUP));
    let refused = wait_for(20, || tb.agent_log("hostA").contains("certificates not reloaded").then_some(()));
    assert!(refused.is_some(), "{}", tb.agent_log("hostA"));
    assert_eq!(tb.client("hostA").info().unwrap().cert_fingerprint, old_a, "the old identity stays");

    replace_certs(fresh.path(), &certs, &["hostA.key"]);
    assert!(tb.signal_agent("hostA", libc::SIGHUP));
    wait_presenting(&tb, "hostA", &certs.join("hostA.pem"));
    let (result, error) = migrate_result(&tb, "vm1");
    assert_eq!(result, dcmigrate::engine::Outcome::Completed, "{error}\n{}", tb.logs());
    assert!(tb.vm_on("hostB", "vm1").is_some());
}
