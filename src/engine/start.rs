//! Where a projector starts, and the one path that rebuilds a projector in
//! place (boot's version bump and reset both take it): in one transaction,
//! under the projector's lock, its tables are emptied (or its `reset` SQL
//! runs) and its ledger row goes back to the start, state `booting`.

use std::time::Duration;

use anyhow::{Context as _, Result};
use chrono::{DateTime, Utc};
use tokio_postgres::{Client, GenericClient};

use crate::db::{RowExt, quote_qualified};
use crate::engine::Context;
use crate::error::Failure;
use crate::manifest::{Mode, Projector};
use crate::store::{Position, Reader, StoreShape};

/// Where a projector starts: the beginning, or for `from_now` the newest
/// committed event once nothing can still commit behind it (waiting up to
/// `writer_wait`); with the time of that event.
pub async fn start_position(
    shape: &StoreShape,
    client: &impl GenericClient,
    p: &Projector,
    writer_wait: Duration,
) -> Result<(Position, Option<DateTime<Utc>>)> {
    if p.mode != Mode::FromNow {
        return Ok((Position::START, None));
    }
    let start = Reader::new()
        .release_head(shape, client, writer_wait)
        .await?;
    Ok((start, shape.time_at(client, start).await?))
}

/// Rebuilds a projector in place: its tables emptied and its row at the
/// start, in one transaction. The caller holds the projector's lock.
pub async fn rebuild_in_place(
    ctx: &Context,
    shape: &StoreShape,
    client: &mut Client,
    p: &Projector,
    writer_wait: Duration,
) -> Result<Position> {
    let (start, time) = start_position(shape, client, p, writer_wait).await?;
    let tx = client.transaction().await?;
    reset_tables(&tx, p).await?;
    ctx.ledger.start(&tx, p, start, time).await?;
    tx.commit().await.context("committing the rebuild")?;
    Ok(start)
}

/// Truncates the owned tables, or runs the projector's `reset` SQL.
async fn reset_tables(client: &impl GenericClient, p: &Projector) -> Result<()> {
    let sql = match &p.reset {
        Some(sql) => sql.clone(),
        None if p.tables.is_empty() => return Ok(()),
        None => format!(
            "TRUNCATE {}",
            p.tables
                .iter()
                .map(|t| quote_qualified(t))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    client
        .batch_execute(&sql)
        .await
        .with_context(|| format!("resetting the tables of projector `{}`", p.name))
}

/// The owned tables of `p` that already hold rows.
pub async fn filled_tables(client: &impl GenericClient, p: &Projector) -> Result<Vec<String>> {
    let mut filled = Vec::new();
    for t in &p.tables {
        let any: bool = client
            .query_one(
                &format!("SELECT EXISTS (SELECT 1 FROM {})", quote_qualified(t)),
                &[],
            )
            .await
            .with_context(|| format!("looking into table `{t}` of projector `{}`", p.name))?
            .col(0)?;
        if any {
            filled.push(t.clone());
        }
    }
    Ok(filled)
}

/// Refuses to boot a never-booted projector on top of tables that already
/// hold rows (its ledger row was lost, or the tables belong to something
/// else): replaying on top of them would apply every event twice.
pub async fn refuse_filled(client: &impl GenericClient, p: &Projector) -> Result<()> {
    let filled = filled_tables(client, p).await?;
    if filled.is_empty() {
        return Ok(());
    }
    Err(Failure::Usage(format!(
        "projector `{name}` has never been booted (no ledger row), but its table{s} {tables} already hold{s2} rows: \
         its ledger row was lost, or the tables belong to something else\n  \
         boot refuses to replay it on top of them. Rebuild it from scratch with `projectionist reset {name}`, \
         or, if its handlers are idempotent and the rows are right, adopt them deliberately with \
         `projectionist boot --adopt {name}` (it replays every event over the rows)",
        name = p.name,
        s = if filled.len() == 1 { "" } else { "s" },
        s2 = if filled.len() == 1 { "s" } else { "" },
        tables = filled.iter().map(|t| format!("`{t}`")).collect::<Vec<_>>().join(", "),
    ))
    .into())
}
