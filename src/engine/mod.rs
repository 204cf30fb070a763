//! The commands' logic, one module each: what `migrate`, `validate`, `boot`
//! and `init` do to the database and the files. Output for people goes
//! through [`crate::report`]; the CLI only maps results to exit codes.

pub mod alert;
pub mod batch;
pub mod boot;
pub mod init;
pub mod migrate;
pub mod notify;
pub mod play;
pub mod reset;
pub mod retire;
pub mod status;
pub mod validate;
pub mod verify;

use anyhow::Result;
use tokio_postgres::Client;

use crate::db::Database;
use crate::ledger::{Ledger, Locks};
use crate::manifest::Manifest;

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
    pub async fn connect(&self, command: &str) -> Result<Client> {
        self.database.connect(&application_name(command)).await
    }
}

/// `projectionist boot @host pid 1234`.
pub fn application_name(command: &str) -> String {
    let host = gethostname::gethostname().to_string_lossy().into_owned();
    let mut name = format!("projectionist {command} @{host} pid {}", std::process::id());
    name.truncate(63);
    name
}
