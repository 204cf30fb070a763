//! The commands' logic, one module each; the binary only parses arguments,
//! prints and maps outcomes to exit codes.
//!
//! - [`migrate`]: the ledger's schema and the project's migrations.
//! - [`validate`]: the manifest against the database, writing nothing.
//! - [`boot`]: the deploy step (new, interrupted, broken, stalled, rebuilt projectors to the head).
//! - [`play`]: the live runner, shared by several processes.
//! - [`status`]: where every projector stands.
//! - [`reset`]: rebuild projectors from scratch.
//! - [`verify`]: the consistency checks, compared at each projector's position.
//! - [`retire`]: the migration that removes a projector.
//! - [`rebuild`]: rebuilds beside the live tables, the swap, `rollback`, `prune`.
//! - [`pause`]: `pause` and `resume`.
//! - [`retry`]: `failures` and `retry` (dead letters applied again).
//! - [`init`], [`notify`]: the starter files; the NOTIFY trigger migration.
//!
//! Shared pieces: [`batch`] (one batch in one transaction), [`start`] (where
//! a projector starts, and rebuilding one in place), [`late`] (events that
//! appear in passed holes), [`alert`] (the `[alert]` command).

pub mod alert;
pub mod batch;
pub mod boot;
pub mod catch_up;
pub mod init;
pub mod late;
pub mod migrate;
pub mod notify;
pub mod pause;
pub mod play;
pub mod rebuild;
pub mod reset;
pub mod retire;
pub mod retry;
pub mod start;
pub mod status;
pub mod validate;
pub mod verify;

use anyhow::Result;
use tokio_postgres::Client;

use crate::db::{Database, Session};
use crate::error::Failure;
use crate::ledger::{Ledger, Locks};
use crate::manifest::{Manifest, Projector};

/// What every command that touches projectors needs: the manifest, the
/// database, the ledger and its locks.
#[derive(Clone, Debug)]
pub struct Context {
    pub manifest: Manifest,
    pub database: Database,
    pub ledger: Ledger,
    pub locks: Locks,
}

impl Context {
    pub fn new(manifest: Manifest, database: Database) -> Context {
        let ledger = Ledger::new(&manifest.ledger_schema);
        let locks = Locks::new(&manifest.ledger_schema);
        Context {
            manifest,
            database,
            ledger,
            locks,
        }
    }

    /// A connection named after the command, so `pg_stat_activity` (and a
    /// waiting boot) can tell who holds what.
    pub async fn connect(&self, command: &str, session: Session) -> Result<Client> {
        self.database
            .connect(&application_name(command), session)
            .await
    }

    /// The manifest's projector `name`, or a usage error listing the known ones.
    pub fn projector(&self, name: &str) -> Result<&Projector> {
        self.manifest.projector(name).ok_or_else(|| {
            Failure::Usage(format!(
                "no projector `{name}` in {}\n  projectors: {}",
                self.manifest.path.display(),
                self.manifest
                    .projectors
                    .iter()
                    .map(|p| p.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
            .into()
        })
    }
}

/// `projectionist boot @host pid 1234`. The `projectionist ` prefix marks
/// projectionist's own sessions (the gap-safety rules leave out those that
/// write no events).
pub fn application_name(command: &str) -> String {
    let host = gethostname::gethostname().to_string_lossy().into_owned();
    let mut name = format!("projectionist {command} @{host} pid {}", std::process::id());
    name.truncate(63);
    name
}
