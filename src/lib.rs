//! dcmigrate: live VM migration whose destination can change while it runs.
pub mod bitmap;
pub mod ledger;
pub mod memory;
