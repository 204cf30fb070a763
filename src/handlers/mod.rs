//! What runs for an event.
//!
//! - [`sql`]: SQL projectors, compiled into one PL/pgSQL function per
//!   projector so that a whole batch runs inside PostgreSQL.
//! - [`set_wise`]: a partitioned projector's statements rewritten to apply a
//!   wave of events (one per stream) at once.
//! - [`command`]: command projectors, a child process speaking JSON lines.

pub mod command;
pub mod set_wise;
pub mod sql;

use anyhow::Result;
use tokio_postgres::GenericClient;

use crate::db::Database;
use crate::ledger::Run;
use crate::manifest::Projector;
use crate::store::StoreShape;
use command::CommandRunner;
use sql::CompiledProjector;

/// What runs a projector's events: its compiled SQL handlers, or its command.
pub enum Runner {
    Sql(CompiledProjector),
    Command(Box<CommandRunner>),
}

impl Runner {
    /// Prepares a projector on this connection (SQL: installs its function);
    /// a command runs in `dir`, the manifest's directory.
    pub async fn new(
        shape: &StoreShape,
        p: &Projector,
        run: Run,
        database: &Database,
        dir: &std::path::Path,
        client: &impl GenericClient,
    ) -> Result<Runner> {
        if let Some(argv) = &p.command {
            let command = CommandRunner::new(p, argv, run, database, dir);
            return Ok(Runner::Command(Box::new(command)));
        }
        let compiled = CompiledProjector::compile(shape, p);
        compiled.install(client).await?;
        Ok(Runner::Sql(compiled))
    }

    /// The end of a run: a command's stdin is closed.
    pub async fn finish(&mut self) {
        if let Runner::Command(c) = self {
            c.finish().await;
        }
    }
}
