//! Prometheus metrics (`agent --metrics ADDR`): `GET /metrics` over plain
//! HTTP/1, in the text exposition format, built at each scrape from the
//! agent's state (its migrations' progress and reports, incoming sessions,
//! the data dir's space, its certificate) and from the few totals the
//! agent counts as migrations end ([`Totals`]). Clients are local and
//! untrusted: one request per connection, headers within a size and a
//! time limit, a bounded number of connections, and nothing but
//! `GET /metrics` answered with metrics.

use super::Agent;
use crate::engine::{MigrationStatus, Outcome};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// Connections served at once; more are closed.
const MAX_CONNECTIONS: usize = 64;
/// Connections one address may hold at once.
const PER_ADDR: usize = 4;
/// A connection's whole life: request, scrape, response.
const CONNECTION_TIME: Duration = Duration::from_secs(5);
/// The request's headers must arrive within this.
const HEADER_TIME: Duration = Duration::from_secs(2);
/// Largest request head (hyper's minimum buffer).
const MAX_REQUEST: usize = 8192;
/// The phases a migration's `phase` gauge has a series for.
const PHASES: [&str; 5] = ["setup", "precopy", "verify", "switchover", "done"];

/// What the agent counts as it goes (the rest is read at each scrape).
#[derive(Default)]
pub(crate) struct Totals {
    completed: AtomicU64,
    failed: AtomicU64,
    cancelled: AtomicU64,
    gave_up: AtomicU64,
    unknown: AtomicU64,
    incoming: AtomicU64,
}

impl Totals {
    /// A migration this agent ran as the source ended so.
    pub(crate) fn ended(&self, result: Outcome) {
        let c = match result {
            Outcome::Completed => &self.completed,
            Outcome::Failed => &self.failed,
            Outcome::Cancelled => &self.cancelled,
            Outcome::GaveUp => &self.gave_up,
            Outcome::Unknown => &self.unknown,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// An incoming session was admitted.
    pub(crate) fn incoming_opened(&self) {
        self.incoming.fetch_add(1, Ordering::Relaxed);
    }
}

type Labels = Vec<(&'static str, String)>;

fn counter(v: u64) -> Counter {
    let c = Counter::default();
    c.inc_by(v);
    c
}

fn gauge(v: i64) -> Gauge {
    let g = Gauge::default();
    g.set(v);
    g
}

/// The `phase` label of a migration's progress: one of [`PHASES`].
fn phase_label(phase: &str) -> &'static str {
    match phase {
        p if p.starts_with("round") => "precopy",
        p if p.starts_with("verify") => "verify",
        p if p.starts_with("switchover") => "switchover",
        "done" => "done",
        _ => "setup",
    }
}

/// Per-migration families, filled one migration at a time.
#[derive(Default)]
struct PerMigration {
    bytes_sent: Family<Labels, Counter>,
    rate: Family<Labels, Gauge<f64, AtomicU64>>,
    rounds: Family<Labels, Gauge>,
    ram: Family<Labels, Gauge>,
    remaining: Family<Labels, Gauge>,
    phase: Family<Labels, Gauge>,
    downtime: Family<Labels, Gauge<f64, AtomicU64>>,
    retargets: Family<Labels, Counter>,
}

impl PerMigration {
    fn add(&self, m: &MigrationStatus) {
        let l: Labels = vec![("vm", m.vm.clone()), ("destination", m.to.clone()), ("migration", m.id.clone())];
        let p = &m.progress;
        let report = m.report.as_ref();
        self.bytes_sent.get_or_create(&l).inc_by(p.bytes_sent);
        self.rate.get_or_create(&l).set(if m.done { 0.0 } else { p.rate_mbps });
        let rounds = report.map_or(p.round, |r| r.rounds.len() as u32);
        self.rounds.get_or_create(&l).set(rounds.into());
        self.ram.get_or_create(&l).set(p.ram_bytes.try_into().unwrap_or(i64::MAX));
        self.remaining.get_or_create(&l).set(p.remaining_bytes.try_into().unwrap_or(i64::MAX));
        let now = phase_label(&p.phase);
        for phase in PHASES {
            let mut pl = l.clone();
            pl.push(("phase", phase.to_owned()));
            self.phase.get_or_create(&pl).set((phase == now).into());
        }
        if let Some(ms) = report.and_then(|r| r.downtime_ms) {
            self.downtime.get_or_create(&l).set(ms);
        }
        self.retargets.get_or_create(&l).inc_by(p.retargets.into());
    }

    fn register(self, r: &mut Registry) {
        r.register("migration_bytes_sent", "Payload bytes sent by every host", self.bytes_sent);
        r.register("migration_rate_mbps", "Throughput to the destination, MB/s (0 once ended)", self.rate);
        r.register("migration_rounds", "Rounds so far (all of them once ended)", self.rounds);
        r.register("migration_ram_bytes", "The VM's RAM", self.ram);
        r.register("migration_remaining_bytes", "RAM the destination still lacks", self.remaining);
        r.register("migration_phase", "1 for the phase the migration is in", self.phase);
        r.register("migration_downtime_ms", "How long the VM was paused, once known", self.downtime);
        r.register("migration_retargets", "Changes of destination", self.retargets);
    }
}

/// The metrics of `agent` now, in the text exposition format.
pub(crate) fn render(agent: &Agent) -> String {
    let mut r = Registry::with_prefix("dcmigrate");
    let per = PerMigration::default();
    let handles: Vec<_> = agent.migrations.lock().unwrap().values().cloned().collect();
    for h in handles {
        per.add(&h.status());
    }
    per.register(&mut r);
    let t = &agent.totals;
    let results: Family<Vec<(&'static str, &'static str)>, Counter> = Family::default();
    for (name, c) in [
        ("completed", &t.completed),
        ("failed", &t.failed),
        ("cancelled", &t.cancelled),
        ("gave_up", &t.gave_up),
        ("unknown", &t.unknown),
    ] {
        results.get_or_create(&vec![("result", name)]).inc_by(c.load(Ordering::Relaxed));
    }
    r.register("migrations", "Migrations this agent ran as the source, by how they ended", results);
    let faults = t.failed.load(Ordering::Relaxed) + t.unknown.load(Ordering::Relaxed);
    r.register("migration_failures", "Migrations that ended failed or with an unknown outcome", counter(faults));
    r.register("incoming_sessions", "Incoming sessions admitted", counter(t.incoming.load(Ordering::Relaxed)));
    let incoming = agent.incoming.lock().unwrap().len();
    r.register("incoming_sessions_open", "Incoming sessions now", gauge(incoming as i64));
    if let Ok((free, size)) = super::capacity::space(&agent.cfg.data_dir) {
        let as_gauge = |v: u64| gauge(v.try_into().unwrap_or(i64::MAX));
        r.register("data_dir_free_bytes", "Bytes the data dir's file system can still take", as_gauge(free));
        r.register("data_dir_capacity_bytes", "Size of the data dir's file system", as_gauge(size));
    }
    let c = agent.capacity();
    r.register("drained", "1 while the host takes no new incoming migrations", gauge(i64::from(c.drained)));
    let room = gauge(c.free_bytes.try_into().unwrap_or(i64::MAX));
    r.register("room_bytes", "Incoming RAM the host still takes, as it advertises to peers", room);
    let cert = agent.cfg.tls.current().cert.clone();
    r.register("cert_not_after_seconds", "When the agent's certificate expires", gauge(cert.not_after));
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &r);
    out
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp
}

fn answer(agent: &Agent, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let text = "text/plain; charset=utf-8";
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => {
            reply(StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", render(agent))
        }
        (_, "/metrics") => reply(StatusCode::METHOD_NOT_ALLOWED, text, "only GET\n".into()),
        _ => reply(StatusCode::NOT_FOUND, text, "not found: try GET /metrics\n".into()),
    }
}

/// Serves `GET /metrics` on `listener` until the agent shuts down.
pub(crate) async fn serve(agent: Arc<Agent>, listener: TcpListener) {
    use crate::transport::session::{first_byte, Admission, Listener};
    // Slow clients hold a few slots each, for seconds at most: a scraper
    // always finds one.
    let admission = Admission { reserved: Default::default(), per_addr: PER_ADDR, total: Some(MAX_CONNECTIONS) };
    let listener = Listener::with(listener, "metrics listener", admission);
    loop {
        let (tcp, _, slot) = tokio::select! {
            c = listener.accept() => c,
            _ = agent.shutdown.cancelled() => return,
        };
        let me = agent.clone();
        tokio::spawn(async move {
            if !first_byte(&tcp).await {
                return;
            }
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let resp = answer(&me, &req);
                async move { Ok::<_, std::convert::Infallible>(resp) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIME)
                .max_buf_size(MAX_REQUEST)
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), service);
            // A client that dawdles past the limit is dropped.
            let _ = tokio::time::timeout(CONNECTION_TIME, conn).await;
            drop(slot);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_are_a_fixed_set() {
        for (p, want) in [
            ("setup", "setup"),
            ("round 7", "precopy"),
            ("verify (live)", "verify"),
            ("switchover: device state", "switchover"),
            ("done", "done"),
            ("anything else", "setup"),
        ] {
            assert_eq!(phase_label(p), want);
            assert!(PHASES.contains(&phase_label(p)));
        }
    }

    #[test]
    fn totals_count_by_result() {
        let t = Totals::default();
        t.ended(Outcome::Completed);
        t.ended(Outcome::Unknown);
        t.ended(Outcome::Unknown);
        t.incoming_opened();
        assert_eq!(t.completed.load(Ordering::Relaxed), 1);
        assert_eq!(t.unknown.load(Ordering::Relaxed), 2);
        assert_eq!(t.incoming.load(Ordering::Relaxed), 1);
    }
}
