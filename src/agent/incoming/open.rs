//! Opening an incoming session: check what the source asks for (a QEMU VM's
//! description against the allow-lists, the files it names beneath storage,
//! its networks), create the RAM files, launch the incoming VM paused as
//! its own user, register the session with the data plane (and RAM with the
//! RDMA device). Every refusal comes before anything is created; whatever
//! fails later is undone before the error goes back.

use super::super::capacity::Reservation;
use super::super::journal::IncomingEntry;
use super::super::Agent;
use super::Session;
use crate::agent::capacity::RamShare;
use crate::memory::backing::{self, HugeMount};
use crate::memory::{GuestRam, Layout, LayoutError, MemoryError, RegionSpec, PAGE_SIZE};
use crate::protocol::{ErrorCode, Token};
use crate::vm::ident::FileIdent;
use crate::vm::qemu::command::ResourceError;
use crate::vm::qemu::confine::Storage;
use crate::vm::qemu::user::Identity;
use crate::vm::qemu::{self, Description, DescriptionError};
use crate::vm::synthetic::{guest_paths, SyntheticIncoming};
use crate::vm::{IncomingVm, LaunchSpec, RamFile, VmError};
use std::path::PathBuf;
use std::sync::Arc;
use thiserror::Error;

/// Why a destination refused a session.
#[derive(Debug, Error)]
pub(super) enum OpenError {
    /// A VM name that cannot name files.
    #[error("invalid VM name {0:?}")]
    Name(String),
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
    /// This host takes no synthetic guests.
    #[error("{0} takes no synthetic guests (it runs QEMU VMs; --synthetic-guests is for test beds)")]
    Synthetic(String),
    /// Page sizes that do not match the regions.
    #[error("{sizes} page sizes for {regions} RAM regions")]
    PageSizes {
        /// Page sizes given.
        sizes: usize,
        /// Regions.
        regions: usize,
    },
    /// A region on huge pages this host has no mount for.
    #[error(
        "RAM region {region} is on {} pages at the source, and this host has no hugetlbfs mount of that page size \
         (--hugepages): {mounts}",
        backing::show(*page_size)
    )]
    NoHugePages {
        /// The region.
        region: String,
        /// Its page size.
        page_size: u64,
        /// The mounts this host has.
        mounts: String,
    },
    /// A region that is not a whole number of its pages.
    #[error("RAM region {region}: {size} bytes are not a whole number of {} pages", backing::show(*page_size))]
    NotWholePages {
        /// The region.
        region: String,
        /// Its size.
        size: u64,
        /// Its page size.
        page_size: u64,
    },
    /// A synthetic guest has one region.
    #[error("{0} RAM regions for a synthetic guest")]
    Regions(usize),
    /// The description's RAM is not the session's.
    #[error("the description's RAM regions ({described}) are not the session's ({session})")]
    RamMismatch {
        /// The description's regions.
        described: String,
        /// The session's.
        session: String,
    },
    /// A peer's description was refused.
    #[error("the VM's description")]
    Description(#[from] DescriptionError),
    /// A protocol-3 peer's command line cannot be described.
    #[error("the source's QEMU command line")]
    Describe(#[from] qemu::DescribeError),
    /// A file or network the description names is not here.
    #[error("what the VM needs from this host")]
    Resources(#[from] ResourceError),
    /// No user to run it as.
    #[error("no user for the VM: {0}")]
    Identity(String),
    /// The VM's files could not be handed to its user.
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

impl OpenError {
    /// Its kind, as the source is told it.
    pub(super) fn code(&self) -> ErrorCode {
        use ErrorCode as C;
        match self {
            OpenError::Name(_)
            | OpenError::Layout(_)
            | OpenError::PageSizes { .. }
            | OpenError::NotWholePages { .. }
            | OpenError::Regions(_)
            | OpenError::RamMismatch { .. }
            | OpenError::Description(_)
            | OpenError::Describe(_) => C::Invalid,
            OpenError::Exists { .. } | OpenError::Busy { .. } | OpenError::Leftover(_) => C::Conflict,
            OpenError::Synthetic(_)
            | OpenError::NoHugePages { .. }
            | OpenError::Resources(_)
            | OpenError::Identity(_)
            | OpenError::User(_) => C::Unsupported,
            OpenError::Capacity(c) => c.code(),
            OpenError::Dir(..) | OpenError::Ram(_) | OpenError::Launch(_) | OpenError::Task(_) => C::Failed,
        }
    }
}

/// What a session creates for its VM, decided before anything is.
enum Plan {
    /// The synthetic guest: its RAM file in the data dir or on a huge-page
    /// mount.
    Synthetic { ram: PathBuf },
    /// QEMU: RAM files in a directory of the data dir and one on each
    /// huge-page mount it uses (`ram_dirs`, the data dir's first), runtime
    /// files in the agent's state dir, QEMU built from the description.
    Qemu { desc: Box<Description>, ram_dirs: Vec<PathBuf>, runtime: PathBuf, ram: Vec<PathBuf>, disks: Vec<FileIdent> },
}

impl Plan {
    fn ram(&self) -> Vec<PathBuf> {
        match self {
            Plan::Synthetic { ram } => vec![ram.clone()],
            Plan::Qemu { ram, .. } => ram.clone(),
        }
    }

    /// Its RAM files as capacity counts them.
    fn shares(&self, regions: &[RegionSpec], places: &[Option<&HugeMount>]) -> Vec<RamShare> {
        let page = |i: usize| places.get(i).copied().flatten().map_or(PAGE_SIZE as u64, |m| m.page_size);
        let files = self.ram().into_iter().zip(regions).enumerate();
        files.map(|(i, (path, r))| RamShare { path, bytes: r.size, page_size: page(i) }).collect()
    }

    fn disks(&self) -> Vec<FileIdent> {
        match self {
            Plan::Synthetic { .. } => vec![],
            Plan::Qemu { disks, .. } => disks.clone(),
        }
    }
}

/// What a source asks for in `OpenSession`.
pub(super) struct Open<'a> {
    /// The VM.
    pub vm: &'a str,
    /// Its RAM regions.
    pub regions: Vec<RegionSpec>,
    /// Each region's page size at the source (empty: base pages).
    pub page_sizes: Vec<u64>,
    /// The layout's chunk size.
    pub chunk_size: u64,
    /// Bytes of RAM that are holes at the source.
    pub holes: u64,
    /// How to start it.
    pub launch: &'a LaunchSpec,
    /// RDMA registration (in slices, if the source takes them), unless the
    /// migration is TCP only.
    pub rdma_slices: Option<bool>,
    /// The migration (protocol 4).
    pub migration: Option<crate::protocol::MigrationId>,
    /// The source's verified host name.
    pub peer: &'a str,
}

/// Opens a session; on error nothing is left behind. The source's
/// data-plane token is bound to it, unless it is `shared` with the
/// source's forwarders (a protocol-3 source).
pub(super) async fn open(agent: &Agent, o: Open<'_>, shared: bool) -> Result<Session, OpenError> {
    let Open { vm, regions, page_sizes, chunk_size, holes, launch, rdma_slices, migration, peer } = o;
    if !crate::vm::valid_name(vm) {
        return Err(OpenError::Name(vm.to_owned()));
    }
    if agent.has_vm(vm) {
        return Err(OpenError::Exists { vm: vm.into(), host: agent.cfg.name.clone() });
    }
    let layout = Layout::new(regions.clone(), chunk_size)?;
    let places = place(agent, &regions, &page_sizes)?;
    let plan = plan(agent, vm, (&regions, &places), launch)?;
    // Admission counts the whole RAM (holes are written once the VM runs);
    // the holes only tell what can still arrive before the switchover.
    let room = Reservation {
        bytes: layout.total_bytes(),
        files: plan.shares(&regions, &places),
        holes: holes.min(layout.total_bytes()),
        migration,
        peer: peer.to_owned(),
        disks: plan.disks(),
    };
    if !agent.begin_incoming(vm, room)? {
        return Err(OpenError::Busy { vm: vm.into(), host: agent.cfg.name.clone() });
    }
    crate::hooks::gate(&agent.cfg.name, "incoming-open").await;
    let r = prepare(agent, vm, (layout, regions), plan, (launch, rdma_slices, (peer, shared))).await;
    if r.is_err() {
        agent.end_incoming(vm);
    }
    r.map(|s| Session { migration, peer: peer.to_owned(), ..s })
}

/// Where each region's file goes: the data dir (`None`), or the huge-page
/// mount of the page size it has at the source; never smaller pages.
fn place<'a>(
    agent: &'a Agent,
    regions: &[RegionSpec],
    page_sizes: &[u64],
) -> Result<Vec<Option<&'a HugeMount>>, OpenError> {
    if !page_sizes.is_empty() && page_sizes.len() != regions.len() {
        return Err(OpenError::PageSizes { sizes: page_sizes.len(), regions: regions.len() });
    }
    let mounts = &agent.cfg.hugepages;
    let each = |(i, r): (usize, &RegionSpec)| {
        let page_size = page_sizes.get(i).copied().unwrap_or(PAGE_SIZE as u64);
        if page_size == PAGE_SIZE as u64 {
            return Ok(None);
        }
        match mounts.iter().find(|m| m.page_size == page_size) {
            Some(m) if r.size % page_size == 0 => Ok(Some(m)),
            Some(_) => Err(OpenError::NotWholePages { region: r.id.clone(), size: r.size, page_size }),
            None => {
                let have: Vec<String> = mounts
                    .iter()
                    .map(|m| format!("{} pages at {}", backing::show(m.page_size), m.dir.display()))
                    .collect();
                let mounts = if have.is_empty() { "it has none".into() } else { format!("it has {}", have.join(", ")) };
                Err(OpenError::NoHugePages { region: r.id.clone(), page_size, mounts })
            }
        }
    };
    regions.iter().enumerate().map(each).collect()
}

/// Checks what the source asks for and decides where everything goes.
fn plan(
    agent: &Agent,
    vm: &str,
    (regions, places): (&[RegionSpec], &[Option<&HugeMount>]),
    launch: &LaunchSpec,
) -> Result<Plan, OpenError> {
    let dir_of = |i: usize| places.get(i).copied().flatten().map_or(agent.cfg.data_dir.as_path(), |m| &m.dir);
    if !matches!(launch, LaunchSpec::Synthetic { .. }) && matches!(agent.cfg.qemu_run_as, qemu::RunAs::Agent) {
        return Err(OpenError::Identity(
            "this agent is not root and has no --qemu-user: a peer's QEMU would run as the agent itself".into(),
        ));
    }
    let desc = match launch {
        LaunchSpec::Synthetic { .. } if !agent.cfg.synthetic_guests => {
            return Err(OpenError::Synthetic(agent.cfg.name.clone()));
        }
        LaunchSpec::Synthetic { .. } => {
            return match regions.len() {
                1 => Ok(Plan::Synthetic { ram: guest_paths(dir_of(0), vm).0 }),
                n => Err(OpenError::Regions(n)),
            }
        }
        LaunchSpec::QemuVm { description } => {
            description.check()?;
            description.clone()
        }
        // An older source's command line: read as a source reads its own,
        // against this host's storage; never run as it is.
        LaunchSpec::Qemu { binary, args } => {
            let networks = Default::default();
            let args = qemu::strip_control(args);
            let src = qemu::describe::Source {
                binary,
                args: &args,
                ram: regions,
                storage: &agent.cfg.storage,
                networks: &networks,
            };
            Box::new(qemu::describe(&src)?.description)
        }
    };
    let described = desc.regions();
    if described.as_slice() != regions {
        let show = |r: &[RegionSpec]| r.iter().map(|r| format!("{}:{}", r.id, r.size)).collect::<Vec<_>>().join(",");
        return Err(OpenError::RamMismatch { described: show(&described), session: show(regions) });
    }
    let disks = qemu::command::check_resources(&desc, &Storage::new(&agent.cfg.storage), &agent.cfg.networks)?;
    let mut ram_dirs = vec![qemu::vm_dir(&agent.cfg.data_dir, vm)];
    let mut ram = Vec::new();
    for (i, r) in regions.iter().enumerate() {
        let dir = qemu::vm_dir(dir_of(i), vm);
        ram.push(qemu::ram_path(&dir, &r.id));
        if !ram_dirs.contains(&dir) {
            ram_dirs.push(dir);
        }
    }
    Ok(Plan::Qemu { desc, ram_dirs, runtime: agent.runtime_root().join(vm), ram, disks })
}

async fn prepare(
    agent: &Agent,
    vm: &str,
    (layout, regions): (Layout, Vec<RegionSpec>),
    plan: Plan,
    (launch, rdma_slices, source): (&LaunchSpec, Option<bool>, (&str, bool)),
) -> Result<Session, OpenError> {
    let paths = plan.ram();
    let identity = match &plan {
        Plan::Qemu { .. } => agent.take_identity().map_err(OpenError::Identity)?,
        Plan::Synthetic { .. } => None,
    };
    let uid = identity.as_ref().map(|i| i.uid);
    let r = prepare_as(agent, vm, (layout, regions), &plan, identity, (launch, rdma_slices, source)).await;
    match r {
        Ok(mut s) => {
            s.uid = uid;
            Ok(s)
        }
        Err(e) => {
            agent.release_uid(uid);
            if let Plan::Qemu { ram_dirs, runtime, .. } = &plan {
                ram_dirs.iter().for_each(|d| drop(std::fs::remove_dir_all(d)));
                let _ = std::fs::remove_dir_all(runtime);
            } else {
                paths.iter().for_each(|p| drop(std::fs::remove_file(p)));
            }
            Err(e)
        }
    }
}

/// Creates the plan's RAM directories, refusing if anything of an earlier
/// session is in the way.
fn make_dirs(plan: &Plan, own_user: bool) -> Result<(), OpenError> {
    match plan {
        Plan::Qemu { ram_dirs, runtime, .. } => {
            if let Some(d) = ram_dirs.iter().chain([runtime]).find(|d| d.exists()) {
                return Err(OpenError::Leftover(d.clone()));
            }
            // The agent's directories: QEMU's user may only pass through
            // them to its RAM files, never create anything in them.
            let mode = if own_user { 0o711 } else { 0o700 };
            for d in ram_dirs {
                std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), mode)
                    .create(d)
                    .map_err(|e| OpenError::Dir(d.clone(), e))?;
            }
            Ok(())
        }
        Plan::Synthetic { ram } if ram.exists() => Err(OpenError::Leftover(ram.clone())),
        Plan::Synthetic { .. } => Ok(()),
    }
}

async fn prepare_as(
    agent: &Agent,
    vm: &str,
    (layout, regions): (Layout, Vec<RegionSpec>),
    plan: &Plan,
    identity: Option<Identity>,
    (launch, rdma_slices, source): (&LaunchSpec, Option<bool>, (&str, bool)),
) -> Result<Session, OpenError> {
    let paths = plan.ram();
    make_dirs(plan, identity.is_some())?;
    let ram = Arc::new(GuestRam::create(layout, &paths)?);
    if let Some(id) = &identity {
        paths.iter().try_for_each(|p| qemu::user::give(p, id))?;
    }
    let files: Vec<RamFile> = regions
        .iter()
        .zip(&paths)
        .enumerate()
        .map(|(i, (r, p))| RamFile {
            page_size: ram.page_size(i as u32).unwrap_or(PAGE_SIZE as u64),
            ..RamFile::new(r.id.clone(), p.clone(), r.size)
        })
        .collect();
    // Registration pins (and allocates) the whole RAM, which takes time
    // that grows with its size: while the VM starts, off the event loop.
    let registering = rdma_slices.and_then(|slices| {
        let (r, ram) = (agent.rdma.as_ref().ok()?.clone(), ram.clone());
        Some(tokio::task::spawn_blocking(move || r.register_target(&ram, slices)))
    });
    let incoming = match launch_incoming(agent, vm, plan, files, launch, identity).await {
        Ok(i) => i,
        Err(e) => {
            // The RAM is unpinned and unmapped before its files go.
            if let Some(r) = registering {
                let _ = r.await;
            }
            return Err(e);
        }
    };
    let mut leftovers: Vec<PathBuf> = paths.clone();
    if let Plan::Qemu { ram_dirs, runtime, .. } = plan {
        leftovers.extend(ram_dirs.iter().cloned());
        leftovers.push(runtime.clone());
    }
    agent.journal_incoming(vm, Some(IncomingEntry { vm: vm.into(), paths: leftovers }));
    let token = Token::random();
    let receiving = agent.receiver.add(token, ram.clone(), Some(source.0), source.1);
    if let Some(registering) = registering {
        match registering.await {
            Ok(Ok(t)) => receiving.set_rdma(t),
            Ok(Err(e)) => tracing::warn!(%vm, "RDMA registration failed, offering TCP only: {e}"),
            Err(e) => tracing::warn!(%vm, "RDMA registration failed, offering TCP only: {e}"),
        }
    }
    Ok(Session {
        vm: vm.to_owned(),
        token,
        ram,
        incoming,
        receiving,
        stage: super::Stage::Receiving,
        uid: None,
        migration: None,
        peer: String::new(),
    })
}

async fn launch_incoming(
    agent: &Agent,
    vm: &str,
    plan: &Plan,
    files: Vec<RamFile>,
    launch: &LaunchSpec,
    identity: Option<Identity>,
) -> Result<Arc<dyn IncomingVm>, OpenError> {
    let cfg = &agent.cfg;
    let (name, launch, scope) = (vm.to_owned(), launch.clone(), cfg.qemu_scope.clone());
    let i: Arc<dyn IncomingVm> = match plan {
        Plan::Synthetic { .. } => {
            let dir = cfg.data_dir.clone();
            tokio::task::spawn_blocking(move || -> Result<Arc<dyn IncomingVm>, VmError> {
                Ok(Arc::new(SyntheticIncoming::launch(&name, (&dir, scope.as_ref()), &files, &launch)?))
            })
            .await??
        }
        Plan::Qemu { desc, ram_dirs, runtime, .. } => {
            let (desc, ram_dirs, runtime) = (desc.clone(), ram_dirs.clone(), runtime.clone());
            let (storage, networks, agent_name) = (Storage::new(&cfg.storage), cfg.networks.clone(), cfg.name.clone());
            tokio::task::spawn_blocking(move || -> Result<Arc<dyn IncomingVm>, VmError> {
                let host = qemu::incoming::Host {
                    agent: &agent_name,
                    storage: &storage,
                    networks: &networks,
                    identity: identity.as_ref(),
                    scope: scope.as_ref(),
                };
                let ram: (&[RamFile], &[PathBuf]) = (&files, &ram_dirs);
                Ok(Arc::new(qemu::QemuIncoming::launch(&name, &desc, ram, &runtime, &host)?))
            })
            .await??
        }
    };
    Ok(i)
}
