//! dcmigrate: live VM migration whose destination can change while it runs.
//!
//! From the bottom up: [`bitmap`] and [`ledger`] (which host holds each
//! page's current content), [`memory`] (guest RAM layouts and mappings),
//! [`dirty`] (trackers), [`protocol`] (what agents say to each other),
//! [`control`] (their mTLS connections), [`transport`] (the data planes),
//! [`vm`] (the synthetic guest and QEMU as sources and destinations),
//! [`engine`] (a migration), [`agent`] (the per-host daemon and its API),
//! [`cli`], [`guest`] and [`testbed`]. DESIGN.md, next to this crate's
//! sources, explains the design: the invariant, the protocol, the
//! switchover and what happens when something fails.
#![warn(missing_docs)]
#![warn(unreachable_pub)]

pub mod agent;
pub(crate) mod bitmap;
pub mod cli;
pub mod control;
pub mod dirty;
pub mod engine;
pub(crate) mod guest;
pub(crate) mod hooks;
pub(crate) mod ledger;
pub mod memory;
pub mod protocol;
pub mod testbed;
pub mod tls;
pub mod transport;
pub mod vm;

/// An error with its chain of causes, for reports and logs that carry a
/// single string (`destination hostB lost: control connection closed`).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let next = c.to_string();
        // Some errors repeat their source's text; say it once.
        if !s.ends_with(&next) {
            s.push_str(": ");
            s.push_str(&next);
        }
        cur = c.source();
    }
    s
}
