//! `dcmigrate vm add`: a running QEMU put under the local agent, and how
//! other hosts will run it (its description), said back to the operator.

use super::VmCmd;
use crate::agent::api::Client;
use anyhow::{Context as _, Result};

/// The file format of `vm add --launch-spec`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LaunchSpecFile {
    /// The QEMU program destinations run.
    pub binary: String,
    /// Its arguments; `{dir}` stands for the VM's directory there.
    pub args: Vec<String>,
}

/// Reads a `vm add --launch-spec` file into a QEMU launch spec.
pub(crate) fn read_launch_spec(path: &std::path::Path) -> Result<crate::vm::LaunchSpec> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let f: LaunchSpecFile = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    Ok(crate::vm::LaunchSpec::Qemu { binary: f.binary, args: f.args })
}

/// `dcmigrate vm add`.
pub(super) fn add(cmd: VmCmd) -> Result<i32> {
    let VmCmd::Add { name, qmp, launch_spec, networks, json, api } = cmd;
    let launch = launch_spec.as_deref().map(read_launch_spec).transpose()?;
    let qmp = std::path::absolute(&qmp).unwrap_or(qmp);
    let r = Client::new(api.api).attach_qemu_on(&name, qmp, launch, networks.into_iter().collect())?;
    if json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(0);
    }
    for f in &r.ram {
        println!("  RAM {} ({} MiB): {}", f.id, f.size >> 20, f.path.display());
    }
    if let Some(d) = &r.description {
        print_description(d);
    }
    for n in &r.notes {
        println!("  {n}");
    }
    println!("{name} added");
    Ok(0)
}

/// How destinations will run a VM, in a few lines.
fn print_description(d: &crate::vm::qemu::Description) {
    println!("  on other hosts: qemu-system-{}, machine {}", d.arch, d.machine.get("type").map_or("(default)", |s| s));
    for disk in &d.disks {
        println!("    disk {}: {} ({:?}) beneath each host's --storage", disk.id, disk.image, disk.format);
    }
    for n in &d.nets {
        println!("    NIC {}: network {} (each host's --network {}=...)", n.id, n.network, n.network);
    }
    for c in &d.chardevs {
        println!("    chardev {}: {:?}, in the VM's runtime directory there", c.id, c.kind);
    }
    let b = &d.boot;
    for (what, f) in [("kernel", &b.kernel), ("initrd", &b.initrd), ("dtb", &b.dtb)] {
        if let Some(f) = f {
            println!("    {what}: {f} beneath each host's --storage");
        }
    }
}

pub(super) fn parse_pair(s: &str) -> std::result::Result<(String, String), String> {
    let (a, b) = s.split_once('=').ok_or("expected ID=NAME")?;
    Ok((a.to_owned(), b.to_owned()))
}
