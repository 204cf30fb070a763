//! `retire`: write the reviewable migration that removes a projector gone
//! from the manifest: drop its owned tables (remembered by the ledger) and
//! delete its ledger row, or, for a side-effecting projector, keep the row as
//! `retired` so it is never replayed. It writes nothing to the database.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;
use chrono::Utc;
use tokio_postgres::Client;

use crate::db::{quote_literal, quote_qualified};
use crate::engine::Context;
use crate::error::Failure;
use crate::ledger::State;

#[derive(Debug)]
pub struct Retirement {
    pub path: PathBuf,
    pub sql: String,
}

pub async fn retire(
    ctx: &Context,
    client: &Client,
    name: &str,
    min_age: Duration,
    migrations: &Path,
) -> Result<Retirement> {
    if ctx.manifest.projector(name).is_some() {
        return Err(Failure::Usage(format!(
            "projector `{name}` is still in {}: retiring starts by deleting its code\n  \
             remove it from the manifest and deploy; retire it once it has been gone for --min-age",
            ctx.manifest.path.display()
        ))
        .into());
    }
    ctx.ledger.ensure_exists(client).await?;
    let Some(row) = ctx.ledger.row(client, name).await? else {
        return Err(Failure::Usage(format!(
            "no projector `{name}` in the ledger: nothing to retire"
        ))
        .into());
    };
    if row.state == State::Retired {
        return Err(Failure::Usage(format!("projector `{name}` is already retired")).into());
    }
    let Some(since) = row.missing_since else {
        return Err(Failure::Usage(format!(
            "the ledger does not know yet when `{name}` left the manifest: run `projectionist boot` (or play) with this manifest first, then retire it after --min-age"
        ))
        .into());
    };
    let age = (Utc::now() - since).to_std().unwrap_or_default();
    if age < min_age {
        return Err(Failure::Usage(format!(
            "projector `{name}` left the manifest {} ago; retire waits {} (--min-age) so that a rollback can still find its data\n  \
             retry after {}, or pass --min-age with a shorter duration",
            humantime::format_duration(Duration::from_secs(age.as_secs())),
            humantime::format_duration(min_age),
            (since + chrono::Duration::from_std(min_age).unwrap_or_default()).format("%Y-%m-%d %H:%M UTC")
        ))
        .into());
    }

    let projectors = ctx.ledger.table("projectors");
    let mut sql = format!(
        "-- Retire projector `{name}` (written by `projectionist retire` on {}).\n\
         -- It left the manifest on {}.\n",
        Utc::now().format("%Y-%m-%d"),
        since.format("%Y-%m-%d %H:%M UTC"),
    );
    if row.side_effects {
        sql.push_str(
            "-- It has side effects: its tables are dropped, but its ledger row is kept as `retired`\n\
             -- so that it is never replayed (a replay would fire its side effects again).\n\n",
        );
    } else {
        sql.push_str("-- This drops its read-model tables and deletes its position record from the ledger.\n\n");
    }
    for t in &row.tables {
        sql.push_str(&format!("DROP TABLE IF EXISTS {};\n", quote_qualified(t)));
    }
    // Its other versions: a build under way, previous versions kept for rollback.
    let versions: Vec<_> = ctx
        .ledger
        .versions(client)
        .await?
        .into_iter()
        .filter(|v| v.projector == name)
        .collect();
    for v in &versions {
        for t in &v.stored {
            sql.push_str(&format!(
                "DROP TABLE IF EXISTS {}; -- version {}\n",
                quote_qualified(t),
                v.version
            ));
        }
    }
    if !versions.is_empty() {
        sql.push_str(&format!(
            "DELETE FROM {} WHERE projector = {};\n",
            ctx.ledger.table("versions"),
            quote_literal(name)
        ));
    }
    if row.side_effects {
        sql.push_str(&format!(
            "UPDATE {projectors} SET state = 'retired', updated_at = now() WHERE name = {};\n",
            quote_literal(name)
        ));
    } else {
        sql.push_str(&format!(
            "DELETE FROM {projectors} WHERE name = {};\n",
            quote_literal(name)
        ));
    }
    let version = crate::engine::migrate::next_version(migrations)?;
    Ok(Retirement {
        path: migrations.join(format!("V{version}__retire_{name}.sql")),
        sql,
    })
}

/// Writes the migration; never overwrites.
pub fn write(r: &Retirement) -> Result<()> {
    crate::engine::migrate::write_new(&r.path, &r.sql)
}
