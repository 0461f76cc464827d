//! `agent --metrics`: a real HTTP client scrapes `GET /metrics` while a
//! migration runs (its bytes move between scrapes) and after it ended (the
//! agent's totals count it); anything else is refused.

mod common;

use common::*;
use dcmigrate::engine::{Outcome, Steering};
use dcmigrate::testbed::{wait_for, Testbed};
use dcmigrate::vm::synthetic::Workload;

fn url(tb: &Testbed, host: &str, path: &str) -> String {
    let addr = tb.client(host).info().unwrap().metrics.expect("the agent serves metrics");
    format!("http://{addr}{path}")
}

fn scrape(tb: &Testbed, host: &str) -> String {
    let mut resp = ureq::get(&url(tb, host, "/metrics")).call().expect("GET /metrics");
    let ct = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    assert!(ct.contains("openmetrics-text") || ct.contains("text/plain"), "content type {ct}");
    resp.body_mut().read_to_string().unwrap()
}

/// The value of the sample of `name` whose labels include every one of `labels`.
fn value(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, v) = l.rsplit_once(' ')?;
        let (n, rest) = series.split_once('{').unwrap_or((series, ""));
        (n == name && labels.iter().all(|want| rest.contains(want))).then(|| v.parse().ok())?
    })
}

#[test]
fn metrics_follow_a_running_migration_and_count_it_when_it_ends() {
    let mut tb =
        Testbed::start_with_env(exe(), &["hostA", "hostB"], &[("DCMIGRATE_METRICS", "127.0.0.1:0")]).expect("test bed");
    let w = Workload { hot_fraction: 1.0 / 64.0, ..workload(30.0) };
    tb.start_guest("hostA", "vm1", 64 * MIB, &w, true, &[]).unwrap();
    let idle = scrape(&tb, "hostA");
    assert_eq!(value(&idle, "dcmigrate_migrations_total", &["result=\"completed\""]), Some(0.0), "{idle}");
    assert!(value(&idle, "dcmigrate_data_dir_free_bytes", &[]).is_some_and(|v| v > 0.0), "{idle}");
    assert!(value(&idle, "dcmigrate_data_dir_capacity_bytes", &[]).is_some_and(|v| v > 0.0), "{idle}");
    assert!(value(&idle, "dcmigrate_cert_not_after_seconds", &[]).is_some_and(|v| v > 0.0), "{idle}");

    start_migration(&tb, "hostA", "vm1", "hostB", never_converging());
    let vm = ["vm=\"vm1\"", "destination=\"hostB\""];
    let sent = |text: &str| value(text, "dcmigrate_migration_bytes_sent_total", &vm);
    let first = wait_for(120, || sent(&scrape(&tb, "hostA")).filter(|&b| b > 0.0));
    let first = first.unwrap_or_else(|| panic!("no bytes sent: {}\n{}", scrape(&tb, "hostA"), tb.logs()));
    // It cannot end before force-complete: its bytes must move on.
    let later = wait_for(120, || {
        let text = scrape(&tb, "hostA");
        sent(&text).filter(|&b| b > first).map(|_| text)
    });
    let later = later.unwrap_or_else(|| panic!("bytes stayed at {first}: {}", scrape(&tb, "hostA")));
    assert_eq!(value(&later, "dcmigrate_migration_phase", &["phase=\"done\""]), Some(0.0), "{later}");
    assert!(value(&later, "dcmigrate_migration_rounds", &vm).is_some(), "{later}");
    assert!(value(&later, "dcmigrate_migration_rate_mbps", &vm).is_some(), "{later}");
    let on_b = scrape(&tb, "hostB");
    assert_eq!(value(&on_b, "dcmigrate_incoming_sessions_total", &[]), Some(1.0), "{on_b}");
    assert_eq!(value(&on_b, "dcmigrate_incoming_sessions_open", &[]), Some(1.0), "{on_b}");

    let done = Steering { force_complete: true, ..Default::default() };
    tb.client("hostA").steer("vm1", done).expect("force-complete accepted");
    let report = wait_report(&tb, "hostA", "vm1");
    assert_eq!(report.result, Outcome::Completed, "{report:#?}\n{}", tb.logs());
    let end = scrape(&tb, "hostA");
    assert_eq!(value(&end, "dcmigrate_migrations_total", &["result=\"completed\""]), Some(1.0), "{end}");
    assert_eq!(value(&end, "dcmigrate_migrations_total", &["result=\"failed\""]), Some(0.0), "{end}");
    assert_eq!(value(&end, "dcmigrate_migration_failures_total", &[]), Some(0.0), "{end}");
    assert_eq!(value(&end, "dcmigrate_migration_phase", &["phase=\"done\""]), Some(1.0), "{end}");
    // The exposition prints floats to 17 digits: equal within rounding.
    let downtime = value(&end, "dcmigrate_migration_downtime_ms", &vm).expect("downtime exported");
    let ms = report.downtime_ms.expect("a completed migration paused");
    assert!((downtime - ms).abs() <= 1e-9 * ms.max(1.0), "{downtime} vs {ms}: {end}");
    assert!(sent(&end) >= sent(&later), "{end}");
}

#[test]
fn only_get_metrics_is_answered() {
    let tb = Testbed::start_with_env(exe(), &["hostA"], &[("DCMIGRATE_METRICS", "127.0.0.1:0")]).expect("test bed");
    let status = |r: Result<_, ureq::Error>| match r {
        Ok(_) => 200,
        Err(ureq::Error::StatusCode(c)) => c,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(status(ureq::get(&url(&tb, "hostA", "/")).call()), 404);
    assert_eq!(status(ureq::get(&url(&tb, "hostA", "/metrics/x")).call()), 404);
    assert_eq!(status(ureq::post(&url(&tb, "hostA", "/metrics")).send_empty()), 405);
    // A head larger than the server takes is refused, and it serves on.
    let big = "x".repeat(64 << 10);
    let r = ureq::get(&url(&tb, "hostA", "/metrics")).header("x-padding", &big).call();
    assert!(r.is_err(), "an oversized request was answered");
    assert_eq!(status(ureq::get(&url(&tb, "hostA", "/metrics")).call()), 200);
}

/// Slow clients (a request trickling in a byte at a time, never finished)
/// from one address, as many as it can open, hold a few slots each for
/// seconds at most: a scraper from another address is answered every time
/// (with a client timeout of 5 s, as a scraper has) while they go on.
#[test]
fn slow_clients_cannot_hold_the_metrics_listener() {
    let tb = Testbed::start_with_env(exe(), &["hostA"], &[("DCMIGRATE_METRICS", "127.0.0.1:0")]).expect("test bed");
    let addr: std::net::SocketAddr = tb.client("hostA").info().unwrap().metrics.unwrap().parse().unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let slow = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut refused = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let mut held = vec![];
                for _ in 0..80 {
                    let Ok(s) = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None) else {
                        continue;
                    };
                    let src = std::net::SocketAddr::from(([127, 0, 0, 2], 0));
                    if s.bind(&src.into()).is_ok() && s.connect(&addr.into()).is_ok() {
                        held.push(s);
                    }
                }
                // Closed at once, before a byte was sent: refused by the cap.
                std::thread::sleep(std::time::Duration::from_millis(200));
                refused += held
                    .iter()
                    .filter(|s| {
                        let mut b = [std::mem::MaybeUninit::<u8>::uninit(); 1];
                        s.set_nonblocking(true).is_ok() && matches!(s.peek(&mut b), Ok(0))
                    })
                    .count();
                for b in b"GET /metrics HTTP/1.1\r\n" {
                    held.iter_mut().for_each(|s| drop(std::io::Write::write(s, &[*b])));
                    std::thread::sleep(std::time::Duration::from_millis(300));
                    if stop.load(std::sync::atomic::Ordering::SeqCst) {
                        break;
                    }
                }
            }
            refused
        })
    };
    std::thread::sleep(std::time::Duration::from_secs(1));
    let client: ureq::Agent =
        ureq::Agent::config_builder().timeout_global(Some(std::time::Duration::from_secs(5))).build().into();
    for i in 0..5 {
        let r = client.get(&url(&tb, "hostA", "/metrics")).call();
        assert!(r.is_ok(), "scrape {i} during the slow clients: {:?}", r.err());
        std::thread::sleep(std::time::Duration::from_millis(700));
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let refused = slow.join().unwrap();
    assert!(refused > 0, "the listener never closed a slow client's connection: no cap was reached");
}
