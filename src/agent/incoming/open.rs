//! Opening an incoming session: check what the source asks for, create the
//! RAM files, launch the incoming VM paused, register the session with the
//! data plane (and RAM with the RDMA device). Whatever fails on the way is
//! undone before the error goes back.

use super::super::capacity::Reservation;
use super::super::journal::IncomingEntry;
use super::super::Agent;
use super::Session;
use crate::memory::{GuestRam, Layout, LayoutError, MemoryError, RegionSpec};
use crate::protocol::Token;
use crate::vm::synthetic::{guest_paths, SyntheticIncoming};
use crate::vm::{qemu, IncomingVm, LaunchSpec, RamFile, VmError};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use thiserror::Error;

/// Why a destination refused a session.
#[derive(Debug, Error)]
pub enum OpenError {
    /// A VM name that cannot name files.
    #[error("invalid VM name {0:?}")]
    Name(String),
    /// A memory backend id that cannot name a file.
    #[error("invalid memory backend id {0:?}")]
    BackendId(String),
    /// The VM already runs here.
    #[error("a VM named {vm} already exists on {host}")]
    Exists {
        /// The VM.
        vm: String,
        /// This host.
        host: String,
    },
    /// Another session is receiving it.
    #[error("{vm} is already being migrated to {host}")]
    Busy {
        /// The VM.
        vm: String,
        /// This host.
        host: String,
    },
    /// Files of another session are in the way.
    #[error("{0} exists: another incoming session for this VM?")]
    Leftover(PathBuf),
    /// The layout is not usable.
    #[error("RAM layout")]
    Layout(#[from] LayoutError),
    /// A synthetic guest has one region.
    #[error("{0} RAM regions for a synthetic guest")]
    Regions(usize),
    /// The VM's files could not be handed to QEMU's user.
    #[error("QEMU's user")]
    User(#[from] qemu::UserError),
    /// It does not fit on this host.
    #[error("no room on this host")]
    Capacity(#[from] crate::agent::capacity::CapacityError),
    /// Creating the VM's directory failed.
    #[error("{0}")]
    Dir(PathBuf, #[source] std::io::Error),
    /// Creating the RAM files failed.
    #[error("creating the RAM files")]
    Ram(#[from] MemoryError),
    /// The incoming VM did not start.
    #[error("launching the incoming VM")]
    Launch(#[from] VmError),
    /// A blocking task failed.
    #[error("internal")]
    Task(#[from] tokio::task::JoinError),
}

/// Opens a session for `vm`; on error nothing is left behind.
pub(super) async fn open(
    agent: &Agent,
    vm: &str,
    (regions, chunk_size, holes): (Vec<RegionSpec>, u64, u64),
    launch: &LaunchSpec,
    rdma_slices: bool,
) -> Result<Session, OpenError> {
    if !crate::vm::valid_name(vm) {
        return Err(OpenError::Name(vm.to_owned()));
    }
    if agent.has_vm(vm) {
        return Err(OpenError::Exists { vm: vm.into(), host: agent.cfg.name.clone() });
    }
    let layout = Layout::new(regions.clone(), chunk_size)?;
    let (dir, paths) = ram_paths(&agent.cfg.data_dir, vm, &regions, launch)?;
    if let LaunchSpec::Qemu { binary, args } = launch {
        // Refused before anything is created for it.
        qemu::check_spec(binary, args, &dir, &agent.cfg.storage)?;
    }
    // Admission counts the whole RAM (holes are written once the VM runs);
    // the holes only tell what can still arrive before the switchover.
    let room =
        Reservation { bytes: layout.total_bytes(), files: paths.clone(), holes: holes.min(layout.total_bytes()) };
    if !agent.begin_incoming(vm, room)? {
        return Err(OpenError::Busy { vm: vm.into(), host: agent.cfg.name.clone() });
    }
    crate::hooks::gate(&agent.cfg.name, "incoming-open").await;
    let r = prepare(agent, vm, (layout, regions), (dir, paths), (launch, rdma_slices)).await;
    if r.is_err() {
        agent.end_incoming(vm);
    }
    r
}

/// Where the RAM files go: the synthetic guest's conventional file in the
/// data dir, or one file per backend in the VM's own directory (QEMU).
fn ram_paths(
    data_dir: &Path,
    vm: &str,
    regions: &[RegionSpec],
    launch: &LaunchSpec,
) -> Result<(PathBuf, Vec<PathBuf>), OpenError> {
    match launch {
        LaunchSpec::Synthetic { .. } => match regions.len() {
            1 => Ok((data_dir.to_owned(), vec![guest_paths(data_dir, vm).0])),
            n => Err(OpenError::Regions(n)),
        },
        LaunchSpec::Qemu { .. } => {
            if let Some(r) = regions.iter().find(|r| !qemu::valid_id(&r.id)) {
                return Err(OpenError::BackendId(r.id.clone()));
            }
            let dir = qemu::vm_dir(data_dir, vm);
            Ok((dir.clone(), regions.iter().map(|r| qemu::ram_path(&dir, &r.id)).collect()))
        }
    }
}

async fn prepare(
    agent: &Agent,
    vm: &str,
    (layout, regions): (Layout, Vec<RegionSpec>),
    (dir, paths): (PathBuf, Vec<PathBuf>),
    (launch, rdma_slices): (&LaunchSpec, bool),
) -> Result<Session, OpenError> {
    let owned_dir = matches!(launch, LaunchSpec::Qemu { .. }).then(|| dir.clone());
    if let Some(d) = &owned_dir {
        if d.exists() {
            return Err(OpenError::Leftover(d.clone()));
        }
        // The VM's own directory, for the agent's user alone.
        std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700)
            .create(d)
            .map_err(|e| OpenError::Dir(d.clone(), e))?;
    }
    let cleanup = |paths: &[PathBuf]| {
        paths.iter().for_each(|p| drop(std::fs::remove_file(p)));
        if let Some(d) = &owned_dir {
            let _ = std::fs::remove_dir_all(d);
        }
    };
    if let Some(p) = paths.iter().find(|p| p.exists()) {
        return Err(OpenError::Leftover(p.clone()));
    }
    let made = async {
        let ram = Arc::new(GuestRam::create(layout, &paths)?);
        if let (Some(u), Some(d)) = (&agent.cfg.qemu_user, &owned_dir) {
            // QEMU opens its RAM files and makes its sockets there as that user.
            std::iter::once(d).chain(&paths).try_for_each(|p| u.give(p))?;
        }
        let files: Vec<RamFile> = regions
            .iter()
            .zip(&paths)
            .map(|(r, p)| RamFile { id: r.id.clone(), path: p.clone(), size: r.size })
            .collect();
        // Registration pins (and allocates) the whole RAM, which takes time
        // that grows with its size: while QEMU starts, off the event loop.
        let registering = agent.rdma.as_ref().ok().map(|r| {
            let (r, ram) = (r.clone(), ram.clone());
            tokio::task::spawn_blocking(move || r.register_target(&ram, rdma_slices))
        });
        let launched = launch_incoming(vm, &agent.cfg, &dir, files, launch);
        match launched.await {
            Ok(incoming) => Ok((ram, incoming, registering)),
            Err(e) => {
                // The RAM is unpinned and unmapped before its files go.
                if let Some(r) = registering {
                    let _ = r.await;
                }
                Err(e)
            }
        }
    };
    let (ram, incoming, registering) = match made.await {
        Ok(x) => x,
        Err(e) => {
            cleanup(&paths);
            return Err(e);
        }
    };
    let mut leftovers: Vec<PathBuf> = paths.clone();
    leftovers.extend(owned_dir.clone());
    agent.journal_incoming(vm, Some(IncomingEntry { vm: vm.into(), paths: leftovers }));
    let token = Token::random();
    let receiving = agent.receiver.add(token, ram.clone());
    if let Some(registering) = registering {
        match registering.await {
            Ok(Ok(t)) => receiving.set_rdma(t),
            Ok(Err(e)) => tracing::warn!(%vm, "RDMA registration failed, offering TCP only: {e}"),
            Err(e) => tracing::warn!(%vm, "RDMA registration failed, offering TCP only: {e}"),
        }
    }
    Ok(Session { vm: vm.to_owned(), token, ram, incoming, receiving, forward: None, device_state: Default::default() })
}

async fn launch_incoming(
    vm: &str,
    cfg: &super::super::AgentConfig,
    dir: &Path,
    files: Vec<RamFile>,
    launch: &LaunchSpec,
) -> Result<Arc<dyn IncomingVm>, OpenError> {
    let (name, dir, storage, launch) = (vm.to_owned(), dir.to_owned(), cfg.storage.clone(), launch.clone());
    let (user, scope) = (cfg.qemu_user.clone(), cfg.qemu_scope.clone());
    let i = tokio::task::spawn_blocking(move || -> Result<Arc<dyn IncomingVm>, VmError> {
        Ok(match &launch {
            LaunchSpec::Synthetic { .. } => {
                Arc::new(SyntheticIncoming::launch(&name, (&dir, scope.as_ref()), &files, &launch)?)
            }
            LaunchSpec::Qemu { .. } => Arc::new(qemu::QemuIncoming::launch(
                &name,
                (&dir, &storage, user.as_ref(), scope.as_ref()),
                &files,
                &launch,
            )?),
        })
    })
    .await??;
    Ok(i)
}
