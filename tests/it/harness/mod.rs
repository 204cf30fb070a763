//! The test harness shared by every area of the suite. Tests run the real
//! binary, as users do, each in a database of its own on the server of
//! `DATABASE_URL` (scripts/test starts a throwaway one).
//!
//! - [`db`]: the databases tests run against (`TestDb`, the template, `Run`);
//! - [`example`]: the dancefinder example (its manifest, tables and the
//!   set-based projection its tables must equal);
//! - [`things`]: the small "Thing" stores tests build for themselves;
//! - [`ledger`]: what the ledger and the owner locks say;
//! - [`player`]: a running `projectionist play`, and waiting for conditions;
//! - [`net`]: free ports and the metrics endpoint;
//! - [`proxy`]: a loopback TCP proxy that can freeze or cut connections;
//! - [`cluster`]: a private PostgreSQL server a test may stop and restart.

pub mod cluster;
pub mod db;
pub mod example;
pub mod ledger;
pub mod net;
pub mod player;
pub mod proxy;
pub mod things;

pub use cluster::*;
pub use db::*;
pub use example::*;
pub use ledger::*;
pub use net::*;
pub use player::*;
pub use proxy::*;
pub use things::*;
