//! Before the first round: map the VM's RAM, start the best dirty tracker
//! that passes its self-test, find the holes, and open the first
//! destination's session and data plane.

use super::fallback::{self, Fallback};
use super::link::{Link, LinkError, LinkSpec};
use super::schedule::SOURCE;
use super::watch::EventKind;
use super::{EngineError, Job, Prepared, Report};
use crate::bitmap::Bitmap;
use crate::dirty::{DirtyTracker, SendObserver, TrackerKind};
use crate::ledger::{HostId, Ledger};
use crate::memory::{GuestRam, Layout};
use crate::transport::Completion;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::mpsc;

/// Everything up to a running first round's prerequisites.
pub(super) async fn prepare(
    job: &Job,
    report: &mut Report,
    to: &str,
    addr: SocketAddr,
) -> Result<Prepared, EngineError> {
    job.handle.set_progress(|p| p.phase = "setup".into());
    tracing::info!(vm = %report.vm, "phase: setup");
    let rec = job.vm.record().clone();
    let layout = Layout::new(rec.regions(), job.opts.chunk_size).map_err(EngineError::Layout)?;
    // Each file as it was handed over (never a path swapped since), mapped
    // through the descriptor that was checked.
    let mut files = vec![];
    for r in &rec.ram {
        let f = crate::vm::ident::open(&r.path, rec.ident(&r.path), true)
            .map_err(|source| EngineError::Ram(crate::memory::MemoryError::Io { path: r.path.clone(), source }))?;
        files.push(f);
    }
    let paths: Vec<_> = files.iter().map(crate::vm::ident::fd_path).collect();
    let ram = Arc::new(GuestRam::open(layout.clone(), &paths).map_err(EngineError::Ram)?);
    drop(files);
    let ledger = Ledger::new(layout.total_pages(), SOURCE);
    #[cfg(feature = "test-hooks")]
    let ledger = ledger.unordered(job.ctx.unordered);
    if job.ctx.unordered {
        tracing::warn!("test switch: the one-writer rule is OFF; pages may arrive stale");
    }
    job.handle.set_progress(|p| {
        p.ram_bytes = layout.total_bytes();
        p.remaining_bytes = layout.total_bytes();
        p.target = to.to_owned();
    });
    let mut tracker = start_tracker(job, &ram).await?;
    report.tracker = Some(tracker.kind());
    let observer = tracker.observer();
    check_cancel(job)?;

    // Everything is unsent: start tracking from here. Then find the holes,
    // before the data plane opens (registering RAM for RDMA allocates them).
    let r = ram.clone();
    let (tracker, first) = tokio::task::spawn_blocking(move || {
        let d = tracker.sync(&r);
        (tracker, d)
    })
    .await
    .map_err(EngineError::Task)?;
    first.map_err(EngineError::Sync)?;
    let zero_pages = holes(&ram).await;
    let completions = mpsc::unbounded_channel();
    let mut fb = Fallback::new(job.ctx.fallbacks.clone());
    let (mut to, mut addr) = (to.to_owned(), addr);
    let link = loop {
        let mut spec = link_spec(job, (&to, 1, addr), &ram, &observer, &completions.0);
        spec.holes = hole_bytes(&zero_pages);
        match Link::open(spec).await {
            Ok(l) => break l,
            Err(e) => {
                check_cancel(job)?;
                let err = open_error(&to, e);
                let (me, t0) = (&job.ctx.me, job.start);
                let (next, next_addr) = fallback::first_refused(&mut fb, report, (&to, err), t0, me)?;
                if let Some(d) = report.decisions.last() {
                    let (target, reason, action) = (d.target.clone(), d.reason.clone(), d.action.clone());
                    job.handle.emit(EventKind::Decision { target, reason: reason.clone(), action });
                    job.handle.emit(EventKind::Retarget { to: next.clone(), forward: false, reason, error: None });
                }
                (to, addr) = (next, next_addr);
                job.handle.set_progress(|p| p.target = to.clone());
            }
        }
    };
    if let Err(e) = check_cancel(job) {
        link.abort("cancelled").await;
        return Err(e);
    }
    Ok(Prepared { ram, ledger, tracker, zero_pages, observer, link, completions, to, fb })
}

fn check_cancel(job: &Job) -> Result<(), EngineError> {
    match job.handle.cancel.is_cancelled() {
        true => Err(EngineError::Cancelled),
        false => Ok(()),
    }
}

/// The tracker asked for, else the VM's best that passes its self-test.
async fn start_tracker(job: &Job, ram: &Arc<GuestRam>) -> Result<Box<dyn DirtyTracker>, EngineError> {
    let kinds = match job.opts.tracker {
        Some(k) => vec![k],
        None => job.vm.trackers(),
    };
    let mut errors = vec![];
    let regions = ram.layout().regions().len() as u32;
    let huge = (0..regions).any(|r| ram.page_size(r).is_some_and(|p| p > crate::memory::PAGE_SIZE as u64));
    for kind in kinds {
        // The kernel keeps no soft-dirty bits for hugetlb pages: such a
        // tracker would miss every write.
        if huge && kind == TrackerKind::SoftDirty {
            errors.push(format!("{}: it does not track RAM on huge pages", kind.name()));
            continue;
        }
        let (vm, r) = (job.vm.clone(), ram.clone());
        match tokio::task::spawn_blocking(move || vm.start_tracker(kind, &r)).await.map_err(EngineError::Task)? {
            Ok(t) => {
                tracing::info!(tracker = kind.name(), "dirty tracker ready");
                return Ok(t);
            }
            Err(e) => {
                let why = crate::error_chain(&e);
                tracing::warn!(tracker = kind.name(), "tracker unusable: {why}");
                errors.push(format!("{}: {why}", kind.name()));
            }
        }
    }
    Err(EngineError::NoTracker(errors.join("; ")))
}

/// Pages that are holes in the source's RAM files (never written: zero).
async fn holes(ram: &Arc<GuestRam>) -> Option<Bitmap> {
    let r = ram.clone();
    match tokio::task::spawn_blocking(move || r.data_pages()).await {
        Ok(Ok(data)) => {
            let mut zero = Bitmap::new(data.len());
            (0..data.len()).filter(|&p| !data.get(p)).for_each(|p| zero.set(p));
            Some(zero)
        }
        other => {
            tracing::info!("not skipping zero pages: {other:?}");
            None
        }
    }
}

/// How to open a session on `host` as host id `id`.
pub(super) fn link_spec(
    job: &Job,
    (host, id, addr): (&str, HostId, SocketAddr),
    ram: &Arc<GuestRam>,
    observer: &Option<Arc<dyn SendObserver>>,
    completions: &mpsc::UnboundedSender<Completion>,
) -> LinkSpec {
    LinkSpec {
        tls: job.ctx.tls.clone(),
        data_encryption: job.ctx.data_encryption,
        me: job.ctx.me.clone(),
        host: host.to_owned(),
        id,
        addr,
        vm: job.vm.record().clone(),
        chunk_size: job.opts.chunk_size,
        streams: job.opts.streams,
        ram: ram.clone(),
        observer: observer.clone(),
        completions: completions.clone(),
        transport: job.opts.transport,
        rdma: job.ctx.rdma.clone(),
        peer_timeout: job.ctx.peer_timeout,
        holes: 0,
        migration: job.handle.migration,
    }
}

/// Bytes of RAM still holes at the source (see `Migration::skip_holes`).
pub(super) fn hole_bytes(zero_pages: &Option<Bitmap>) -> u64 {
    zero_pages.as_ref().map_or(0, |z| z.count() as u64 * crate::memory::PAGE_SIZE as u64)
}

/// A session that could not be opened on `host`.
pub(super) fn open_error(host: &str, e: LinkError) -> EngineError {
    let host = host.to_owned();
    match e {
        LinkError::Refused(_) => EngineError::Refused { host, source: e },
        LinkError::DataPlane(_) => EngineError::NoDataPlane { host, source: e },
        e => EngineError::DestinationLost { host, source: e },
    }
}
