//! What people and machines read: progress on stderr (bars on a terminal,
//! plain periodic lines elsewhere), and the results of commands on stdout.

pub mod boot;
pub mod failures;
pub mod metrics;
pub mod progress;
pub mod status;
pub mod verify;
