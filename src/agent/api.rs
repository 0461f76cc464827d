//! The agent's local API: JSON lines over a unix socket, used by the CLI and
//! by orchestrators. Every request is an object with a `cmd`; every reply an
//! object with `ok` (and `error` when false). See README "Agent API".

use crate::engine::MigrateOptions;
use crate::vm::VmRecord;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use thiserror::Error;

#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// This agent's name, addresses and peers.
    Info,
    /// A VM on this host puts itself under the agent's management.
    Register { vm: VmRecord },
    /// Puts a running QEMU under the agent's management, found by its QMP
    /// socket. `launch` is how destinations start it (default: its own
    /// command line, read from /proc).
    AttachQemu {
        name: String,
        qmp: std::path::PathBuf,
        #[serde(default)]
        launch: Option<crate::vm::LaunchSpec>,
    },
    /// VMs on this host and their state.
    List,
    /// Starts migrating a VM of this host; returns at once (see `status`, `wait`).
    Migrate {
        vm: String,
        to: String,
        #[serde(default)]
        options: MigrateOptions,
    },
    /// Changes the destination of the VM's running migration. With `forward`
    /// (default) the old destination sends what it holds to the new one.
    Retarget {
        vm: String,
        to: String,
        #[serde(default = "yes")]
        forward: bool,
    },
    /// Progress of the VM's migration (or of all of them), with the report once finished.
    Status {
        #[serde(default)]
        vm: Option<String>,
    },
    /// Blocks until the VM's migration finished; returns its report.
    Wait { vm: String },
    /// Cancels the VM's migration: it keeps running here.
    Cancel { vm: String },
    /// Starts a VM left paused by `migrate --suspend`.
    Resume { vm: String },
    /// Stops the agent.
    Shutdown,
    /// Test builds only: lets a migration started with `hold_switchover` switch over.
    #[cfg(feature = "test-hooks")]
    Release { vm: String },
}

fn yes() -> bool {
    true
}

#[derive(Debug, Error)]
pub enum ApiError {
    #[error("agent API {path}: {source} (is `dcmigrate agent` running?)")]
    Connect { path: String, source: std::io::Error },
    #[error("agent API: {0}")]
    Io(#[from] std::io::Error),
    #[error("agent API: bad reply: {0}")]
    Decode(String),
    #[error("{0}")]
    Agent(String),
}

/// Sends one request and returns the reply (an `ok: false` reply becomes an error).
pub fn call(socket: &Path, req: &Request) -> Result<Value, ApiError> {
    let mut s = UnixStream::connect(socket)
        .map_err(|source| ApiError::Connect { path: socket.display().to_string(), source })?;
    let mut line = serde_json::to_vec(req).expect("json");
    line.push(b'\n');
    s.write_all(&line)?;
    let mut resp = String::new();
    BufReader::new(&s).read_line(&mut resp)?;
    let v: Value = serde_json::from_str(&resp).map_err(|e| ApiError::Decode(format!("{e}: {resp:?}")))?;
    if v["ok"] != Value::Bool(true) {
        return Err(ApiError::Agent(v["error"].as_str().unwrap_or("request failed").to_owned()));
    }
    Ok(v)
}
