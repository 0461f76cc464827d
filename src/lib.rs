//! dcmigrate: live VM migration whose destination can change while it runs.
pub mod agent;
pub mod bitmap;
pub mod cli;
pub mod dirty;
pub mod engine;
pub mod guest;
pub mod hooks;
pub mod ledger;
pub mod memory;
pub mod protocol;
pub mod testbed;
pub mod tls;
pub mod transport;
pub mod vm;
