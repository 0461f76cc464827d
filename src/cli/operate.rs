//! The operator's commands on a running migration: `set` and
//! `force-complete` (steering), `watch` (its events as JSON lines).

use crate::agent::api::Client;
use crate::engine::Steering;
use anyhow::{bail, Result};
use std::io::Write;
use std::path::Path;

/// `set` and `force-complete`: asks the agent at `api` to change `vm`'s
/// migration; prints what it took.
pub(crate) fn steer(api: &Path, vm: &str, s: Steering, json: bool) -> Result<i32> {
    if s.is_empty() {
        bail!("give --max-bandwidth MBPS and/or --downtime-ms MS");
    }
    let r = Client::new(api).steer(vm, s)?;
    match json {
        true => println!("{}", serde_json::to_string(&r)?),
        false => println!("{vm}: {}", describe(&r.steering)),
    }
    Ok(0)
}

/// `watch`: prints the agent's events, one JSON object per line, until the
/// agent ends the stream (the VM's migration ended) or stdout closes. For
/// one VM, a stream that ends without its `ended` event (the agent went
/// away) is an error.
pub(crate) fn watch(api: &Path, vm: Option<&str>) -> Result<i32> {
    let mut w = Client::new(api).watch(vm)?;
    let mut out = std::io::stdout().lock();
    let mut ended = false;
    while let Some(e) = w.next_value()? {
        ended = e["event"] == "ended";
        // A reader that went away (a closed pipe) ends the watch.
        if writeln!(out, "{e}").and_then(|()| out.flush()).is_err() {
            return Ok(0);
        }
    }
    if let (Some(vm), false) = (vm, ended) {
        bail!("the agent ended the stream before {vm}'s migration ended");
    }
    Ok(0)
}

/// A rate for `set --max-bandwidth`: finite, not negative (JSON has no
/// infinity: it would reach the agent as no value at all).
pub(crate) fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r.is_finite() && r >= 0.0 => Ok(r),
        _ => Err(format!("{s:?} is not a rate in MB/s (0 lifts the cap)")),
    }
}

/// What `set` or `force-complete` asked, for a person.
fn describe(s: &Steering) -> String {
    let mut parts = vec![];
    match s.max_bandwidth_mbps {
        Some(b) if b > 0.0 => parts.push(format!("rate cap {b} MB/s from now on")),
        Some(_) => parts.push("rate cap lifted".into()),
        None => {}
    }
    if let Some(d) = s.downtime_ms {
        parts.push(format!("downtime limit {d} ms from the next round's end"));
    }
    if s.force_complete {
        parts.push("switching over at the next round's end".into());
    }
    parts.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_finite_and_not_negative() {
        assert_eq!(parse_rate("200"), Ok(200.0));
        assert_eq!(parse_rate("0"), Ok(0.0));
        for bad in ["inf", "NaN", "-1", "fast", ""] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
    }
}
