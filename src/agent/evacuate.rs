//! Evacuating this host (`dcmigrate evacuate`): every VM here migrates to
//! one of the hosts given, through a queue that keeps at most
//! `max_parallel` (and the agent's `--max-outgoing`) migrations out at once.
//! Each VM goes to the candidate that takes it (not drained, under its
//! session limit, room for its RAM) with the fewest incoming migrations and
//! then the most room, as the candidates advertise it (`CapacityQuery`);
//! the others, in that order, are its fallback hosts. A migration that
//! fails with the VM still here is tried again, up to [`ATTEMPTS`] times.

use super::Agent;
use crate::engine::options::MAX_FALLBACKS;
use crate::engine::{MigrateOptions, MigrationHandle, Outcome};
use crate::protocol::control::Capacity;
use crate::protocol::{Features, Message};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Tries per VM.
pub const ATTEMPTS: u32 = 3;
/// How often the queue looks at its migrations and, when one may start,
/// asks the candidates.
const TICK: Duration = Duration::from_millis(250);
/// With nothing running, how long the queue waits for any candidate to
/// take a VM before the rest fail.
const NO_ROOM_FOR: Duration = Duration::from_secs(120);
/// A failed migration is tried again after this, times its tries.
const RETRY_AFTER: Duration = Duration::from_secs(2);
/// Beyond this many migrations at once, a quarter of a migration's best
/// rate is no sign of a slow destination.
const SHARED_LINK: usize = 3;
/// Most hosts one evacuation may name.
pub const MAX_CANDIDATES: usize = 16;

/// Where a VM of an evacuation is.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Waiting for a slot and a destination.
    Queued,
    /// Its migration runs.
    Migrating,
    /// It runs elsewhere now.
    Completed,
    /// It stays here (every try failed, or the evacuation was cancelled).
    Failed,
    /// Its migration's outcome is unknown (see `dcmigrate resolve`).
    Unknown,
}

/// One VM of an evacuation.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct EvacuatedVm {
    /// The VM.
    pub vm: String,
    /// Where it is in the queue.
    pub stage: Stage,
    /// Its (last) destination.
    pub destination: Option<String>,
    /// Migrations tried.
    pub attempts: u32,
    /// Its RAM.
    pub ram_bytes: u64,
    /// How much of it the destination holds (while it migrates).
    pub at_destination_bytes: u64,
    /// How long its last migration took.
    pub ms: Option<f64>,
    /// Retargets of its last migration (fallbacks, drains).
    pub retargets: u32,
    /// Why it is not (yet) elsewhere.
    pub error: Option<String>,
}

/// An evacuation as the API shows it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct EvacuationStatus {
    /// Its id.
    pub id: String,
    /// The host evacuated (this one).
    pub host: String,
    /// The candidate destinations.
    pub to: Vec<String>,
    /// Most migrations out at once.
    pub max_parallel: usize,
    /// Whether it ended.
    pub done: bool,
    /// Since it started.
    pub elapsed_ms: f64,
    /// Most migrations this evacuation had out at once.
    pub peak_parallel: usize,
    /// Every VM, in queue order.
    pub vms: Vec<EvacuatedVm>,
}

/// A running (or ended) evacuation.
pub struct Evacuation {
    status: Mutex<EvacuationStatus>,
    started: Instant,
    /// Stops it: nothing more starts, running migrations are cancelled.
    cancel: tokio_util::sync::CancellationToken,
}

impl Evacuation {
    /// What it did so far.
    pub fn status(&self) -> EvacuationStatus {
        let mut s = self.status.lock().unwrap().clone();
        s.elapsed_ms = self.started.elapsed().as_secs_f64() * 1e3;
        s
    }

    /// A field of `vm`'s entry, without cloning the whole status.
    fn of<T>(&self, vm: &str, f: impl FnOnce(&EvacuatedVm) -> T) -> Option<T> {
        self.status.lock().unwrap().vms.iter().find(|v| v.vm == vm).map(f)
    }

    fn update(&self, vm: &str, f: impl FnOnce(&mut EvacuatedVm)) {
        if let Some(v) = self.status.lock().unwrap().vms.iter_mut().find(|v| v.vm == vm) {
            f(v);
        }
    }
}

/// A candidate's answer, ranked.
struct Candidate {
    host: String,
    /// What it advertises; `Ok(None)` from a peer too old to say (protocol
    /// 2): it may take the VM, and is tried after those that said.
    capacity: Result<Option<Capacity>, String>,
    /// This evacuation's migrations heading there.
    ours: usize,
}

impl Candidate {
    /// Why it cannot take `need` bytes now, of which `huge` on huge pages
    /// (bytes per page size), if it cannot.
    fn refuses(&self, need: u64, huge: &std::collections::BTreeMap<u64, u64>) -> Option<String> {
        let c = match &self.capacity {
            Ok(Some(c)) => c,
            Ok(None) => return None,
            Err(e) => return Some(e.clone()),
        };
        if c.drained {
            return Some("drained".into());
        }
        if c.max_incoming.is_some_and(|m| c.incoming.max(self.ours as u32) >= m) {
            return Some(format!("{} incoming migrations, its limit", c.incoming));
        }
        let base = need.saturating_sub(huge.values().sum());
        if c.max_session_bytes.is_some_and(|m| need > m) || c.free_bytes < base {
            return Some(format!("room for {} MiB, {} MiB needed", c.free_bytes >> 20, base >> 20));
        }
        for (page, bytes) in huge {
            let room = c.huge_free.get(page).copied().unwrap_or(0);
            if room < *bytes {
                let pages = crate::memory::backing::show(*page);
                return Some(format!("room for {} MiB on {pages} pages, {} MiB needed", room >> 20, bytes >> 20));
            }
        }
        None
    }

    /// Lower is better: those that said their room first, then the fewest
    /// migrations heading there (this evacuation's counted too), then the
    /// most room.
    fn rank(&self) -> (u8, u32, std::cmp::Reverse<u64>) {
        let ours = self.ours as u32;
        match &self.capacity {
            Ok(Some(c)) => (0, c.incoming.max(ours), std::cmp::Reverse(c.free_bytes)),
            Ok(None) => (1, ours, std::cmp::Reverse(0)),
            Err(_) => (2, ours, std::cmp::Reverse(0)),
        }
    }
}

impl Agent {
    /// Starts evacuating every VM of this host to `to`.
    pub(super) fn evacuate(
        self: &Arc<Self>,
        to: Vec<String>,
        max_parallel: usize,
        options: MigrateOptions,
    ) -> Result<EvacuationStatus, super::RequestError> {
        use super::RequestError::Evacuate;
        if to.is_empty() || to.len() > MAX_CANDIDATES {
            return Err(Evacuate(format!("give 1 to {MAX_CANDIDATES} destination hosts")));
        }
        for h in &to {
            if h == &self.cfg.name {
                return Err(Evacuate(format!("{h} is the host being evacuated")));
            }
            self.peer_addr(h)?;
        }
        if to.iter().collect::<std::collections::HashSet<_>>().len() != to.len() {
            return Err(Evacuate("a destination host is named twice".into()));
        }
        if !(1..=64).contains(&max_parallel) {
            return Err(Evacuate("max_parallel must be 1 to 64".into()));
        }
        options.check()?;
        let mut options = options;
        // Migrations sharing this host's link each get a share of it: against
        // its best alone, each would look slow. Only a set rate judges them.
        if max_parallel > SHARED_LINK && options.slow_rate_mbps.is_none() && options.slow_for_s > 0 {
            tracing::info!(
                "evacuation: more than {SHARED_LINK} at once and no slow rate given: falling behind is not judged"
            );
            options.slow_for_s = 0;
        }
        if self.evacuations.lock().unwrap().iter().any(|e| !e.status().done) {
            return Err(Evacuate("an evacuation of this host is already running".into()));
        }
        let mut names: Vec<(String, u64)> =
            self.vms.lock().unwrap().values().map(|r| (r.name.clone(), r.ram.iter().map(|f| f.size).sum())).collect();
        names.sort();
        let ev = Arc::new(Evacuation {
            started: Instant::now(),
            cancel: Default::default(),
            status: Mutex::new(EvacuationStatus {
                id: format!("e{}-{}", self.evacuations.lock().unwrap().len() + 1, std::process::id()),
                host: self.cfg.name.clone(),
                to: to.clone(),
                max_parallel,
                done: false,
                elapsed_ms: 0.0,
                peak_parallel: 0,
                vms: names
                    .iter()
                    .map(|(vm, ram)| EvacuatedVm {
                        vm: vm.clone(),
                        stage: Stage::Queued,
                        destination: None,
                        attempts: 0,
                        ram_bytes: *ram,
                        at_destination_bytes: 0,
                        ms: None,
                        retargets: 0,
                        error: None,
                    })
                    .collect(),
            }),
        });
        self.evacuations.lock().unwrap().push(ev.clone());
        tracing::info!(vms = names.len(), ?to, max_parallel, "evacuating this host");
        let queue = Queue { agent: self.clone(), ev: ev.clone(), to, max_parallel, options };
        tokio::spawn(queue.run(names.into_iter().map(|(v, _)| v).collect()));
        Ok(ev.status())
    }

    /// The evacuation `id`, or the latest; with `cancel`, cancels it first
    /// (VMs not yet moved stay here).
    pub(super) fn evacuation(&self, id: Option<&str>, cancel: bool) -> Result<EvacuationStatus, super::RequestError> {
        let all = self.evacuations.lock().unwrap();
        let found = match id {
            Some(id) => all.iter().find(|e| e.status().id == id),
            None => all.last(),
        };
        let ev = found.ok_or_else(|| super::RequestError::Evacuate("no such evacuation".into()))?;
        if cancel {
            tracing::info!(id = %ev.status().id, "evacuation cancelled");
            ev.cancel.cancel();
        }
        Ok(ev.status())
    }

    /// Migrations this host runs as source now.
    pub(super) fn outgoing(&self) -> usize {
        self.migrations.lock().unwrap().values().filter(|m| !m.is_done()).count()
    }
}

/// The evacuation's queue, run on a task of its own.
struct Queue {
    agent: Arc<Agent>,
    ev: Arc<Evacuation>,
    to: Vec<String>,
    max_parallel: usize,
    options: MigrateOptions,
}

/// Why a VM did not start now.
enum NotStarted {
    /// It may later (no candidate takes it now, the agent is busy).
    NotNow(String),
    /// It never will in this evacuation (gone, migrating already, unknown outcome).
    Final(String),
}

impl Queue {
    async fn run(self, vms: VecDeque<String>) {
        let mut queue: VecDeque<(String, Instant)> = vms.into_iter().map(|v| (v, Instant::now())).collect();
        let mut running: HashMap<String, Arc<MigrationHandle>> = HashMap::new();
        let mut no_room_since: Option<Instant> = None;
        loop {
            self.collect(&mut running, &mut queue);
            if queue.is_empty() && running.is_empty() {
                break;
            }
            let stop = match (self.agent.shutdown.is_cancelled(), self.ev.cancel.is_cancelled()) {
                (true, _) => Some("the agent is shutting down"),
                (_, true) => Some("the evacuation was cancelled"),
                _ => None,
            };
            if let Some(why) = stop {
                queue.drain(..).for_each(|(vm, _)| self.fail(&vm, why));
                running.values().for_each(|h| h.cancel.cancel());
                tokio::time::sleep(TICK).await;
                continue;
            }
            let limit = self.max_parallel.min(self.agent.cfg.max_outgoing.map_or(usize::MAX, |m| m as usize));
            let slot = running.len() < limit && self.agent.outgoing() < limit;
            // A failed VM waits before its next try: its last destination
            // may still be discarding its session.
            let now = Instant::now();
            let due: Vec<String> = queue.iter().filter(|(_, at)| *at <= now).map(|(v, _)| v.clone()).collect();
            if !slot || due.is_empty() {
                tokio::time::sleep(TICK).await;
                continue;
            }
            match self.start_one(&due, &running).await {
                Ok((vm, h)) => {
                    queue.retain(|(v, _)| v != &vm);
                    running.insert(vm, h);
                    no_room_since = None;
                    let mut s = self.ev.status.lock().unwrap();
                    s.peak_parallel = s.peak_parallel.max(running.len());
                }
                Err(Some(vm)) => queue.retain(|(v, _)| v != &vm),
                Err(None) => {
                    let since = *no_room_since.get_or_insert_with(Instant::now);
                    if running.is_empty() && since.elapsed() > NO_ROOM_FOR {
                        let why = format!("no destination took it for {} s", NO_ROOM_FOR.as_secs());
                        queue.drain(..).for_each(|(vm, _)| self.fail(&vm, &why));
                        continue;
                    }
                    // Nothing fits now: ask the candidates again later.
                    tokio::time::sleep(RETRY_AFTER).await;
                }
            }
        }
        self.ev.status.lock().unwrap().done = true;
        let s = self.ev.status();
        let moved = s.vms.iter().filter(|v| v.stage == Stage::Completed).count();
        tracing::info!(moved, of = s.vms.len(), ms = s.elapsed_ms, "evacuation ended");
    }

    /// Starts the first of `due` that a candidate takes; `Err(Some(vm))`: a
    /// VM that failed for good (out of the queue), `Err(None)`: none now.
    async fn start_one(
        &self,
        due: &[String],
        running: &HashMap<String, Arc<MigrationHandle>>,
    ) -> Result<(String, Arc<MigrationHandle>), Option<String>> {
        let candidates = self.ask(running).await;
        // The questions take time: a cancel or shutdown meanwhile wins.
        if self.ev.cancel.is_cancelled() || self.agent.shutdown.is_cancelled() {
            return Err(None);
        }
        for vm in due {
            match self.start(vm, &candidates) {
                Ok(h) => return Ok((vm.clone(), h)),
                Err(NotStarted::Final(why)) => {
                    self.fail(vm, &why);
                    return Err(Some(vm.clone()));
                }
                Err(NotStarted::NotNow(why)) => self.ev.update(vm, |v| v.error = Some(why)),
            }
        }
        Err(None)
    }

    /// Records migrations that ended; a failed one is queued again while
    /// tries are left and the VM is still here (a cancelled one is not: an
    /// operator cancelled it).
    fn collect(&self, running: &mut HashMap<String, Arc<MigrationHandle>>, queue: &mut VecDeque<(String, Instant)>) {
        let ended: Vec<String> = running.iter().filter(|(_, h)| h.is_done()).map(|(v, _)| v.clone()).collect();
        for (vm, h) in running.iter() {
            let p = h.status().progress;
            self.ev.update(vm, |v| {
                v.destination = Some(p.target.clone());
                v.at_destination_bytes = p.at_destination_bytes;
                v.retargets = p.retargets;
            });
        }
        for vm in ended {
            let Some(h) = running.remove(&vm) else { continue };
            let Some(r) = h.status().report else {
                self.fail(&vm, "its migration ended without a report");
                continue;
            };
            let again = r.result == Outcome::Failed
                && self.agent.has_vm(&vm)
                && self.ev.of(&vm, |v| v.attempts < ATTEMPTS).unwrap_or(false);
            self.ev.update(&vm, |v| {
                v.destination = Some(r.destination.clone());
                v.ms = Some(r.total_ms);
                v.retargets = r.retargets.len() as u32;
                v.error = r.error.clone();
                v.stage = match r.result {
                    Outcome::Completed => Stage::Completed,
                    Outcome::Unknown => Stage::Unknown,
                    _ if again => Stage::Queued,
                    _ => Stage::Failed,
                };
            });
            if again {
                tracing::warn!(%vm, "evacuation: the migration failed; trying again later");
                let tries = self.ev.of(&vm, |v| v.attempts).unwrap_or(1);
                queue.push_back((vm, Instant::now() + RETRY_AFTER * tries));
            }
        }
    }

    /// Starts `vm`'s migration to the best candidate that takes it; its
    /// fallback hosts are the other candidates that take it.
    fn start(&self, vm: &str, candidates: &[Candidate]) -> Result<Arc<MigrationHandle>, NotStarted> {
        let need = self.ev.of(vm, |v| v.ram_bytes).unwrap_or(0);
        // RAM on huge pages needs a host with room on pages of that size.
        let mut huge = std::collections::BTreeMap::new();
        for r in self.agent.vm_record(vm).map(|r| r.ram).unwrap_or_default() {
            if r.page_size > crate::memory::PAGE_SIZE as u64 {
                *huge.entry(r.page_size).or_insert(0u64) += r.size;
            }
        }
        let (takers, refusing): (Vec<&Candidate>, Vec<&Candidate>) =
            candidates.iter().partition(|c| c.refuses(need, &huge).is_none());
        let Some(best) = takers.first() else {
            let why: Vec<String> = refusing
                .iter()
                .map(|c| format!("{}: {}", c.host, c.refuses(need, &huge).unwrap_or_default()))
                .collect();
            return Err(NotStarted::NotNow(format!("no candidate takes it now ({})", why.join("; "))));
        };
        let fallback = takers[1..].iter().take(MAX_FALLBACKS).map(|c| c.host.clone()).collect();
        let options = MigrateOptions { fallback, ..self.options.clone() };
        tracing::info!(%vm, to = %best.host, fallback = ?options.fallback, "evacuation: migrating");
        use super::RequestError as E;
        match self.agent.clone().migrate(vm.to_owned(), best.host.clone(), options) {
            Ok(_) => {}
            Err(e @ (E::Busy(_) | E::ShuttingDown)) => return Err(NotStarted::NotNow(crate::error_chain(&e))),
            Err(e) => return Err(NotStarted::Final(crate::error_chain(&e))),
        }
        self.ev.update(vm, |v| {
            v.attempts += 1;
            v.stage = Stage::Migrating;
            v.destination = Some(best.host.clone());
            v.error = None;
        });
        self.agent.migration(vm).map_err(|e| NotStarted::Final(crate::error_chain(&e)))
    }

    /// Every candidate's advertised room, asked at once.
    async fn ask(&self, running: &HashMap<String, Arc<MigrationHandle>>) -> Vec<Candidate> {
        let asks = self.to.iter().map(|h| {
            let (agent, h) = (self.agent.clone(), h.clone());
            tokio::spawn(async move {
                let r = agent.ask_peer(&h, Message::CapacityQuery, Features::leave, "capacity queries").await;
                let capacity = match r {
                    Ok(Message::Capacity(c)) => Ok(Some(c)),
                    Ok(other) => Err(format!("unexpected {}", other.name())),
                    Err(super::ask::AskError::Old { .. }) => Ok(None),
                    Err(e) => Err(e.to_string()),
                };
                (h, capacity)
            })
        });
        let mut out = vec![];
        for a in asks.collect::<Vec<_>>() {
            if let Ok((host, capacity)) = a.await {
                let ours = running.values().filter(|m| !m.is_done() && m.status().progress.target == host).count();
                out.push(Candidate { host, capacity, ours });
            }
        }
        // Stable: equal candidates stay in the order given.
        out.sort_by_key(Candidate::rank);
        out
    }

    fn fail(&self, vm: &str, why: &str) {
        self.ev.update(vm, |v| {
            v.stage = Stage::Failed;
            v.error = Some(why.to_owned());
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_on_huge_pages_needs_room_on_pages_of_that_size() {
        let capacity = Capacity {
            free_bytes: 1 << 30,
            max_session_bytes: None,
            incoming: 0,
            max_incoming: None,
            drained: false,
            huge_free: [(2 << 20, 512 << 20)].into(),
        };
        let c = Candidate { host: "B".into(), capacity: Ok(Some(capacity)), ours: 0 };
        let none = Default::default();
        assert_eq!(c.refuses(512 << 20, &none), None, "base pages: the data dir's room");
        let huge: std::collections::BTreeMap<u64, u64> = [(2 << 20, 512 << 20)].into();
        assert_eq!(c.refuses(512 << 20, &huge), None, "fits the 2 MiB mount");
        let more: std::collections::BTreeMap<u64, u64> = [(2 << 20, 1 << 30)].into();
        let why = c.refuses(1 << 30, &more).expect("too big for the mount");
        assert!(why.contains("on 2 MiB pages"), "{why}");
        let gib: std::collections::BTreeMap<u64, u64> = [(1 << 30, 1 << 30)].into();
        assert!(c.refuses(1 << 30, &gib).is_some(), "no mount of 1 GiB pages there");
    }
}
