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

/// Empties the owned tables, or runs the projector's `reset` SQL. A table a
/// foreign key of another (not owned) table points at cannot be truncated:
/// its rows are deleted instead, so the foreign key decides (nothing refers
/// to them, or it cascades, or the rebuild fails naming it).
async fn reset_tables(client: &impl GenericClient, p: &Projector) -> Result<()> {
    if let Some(sql) = &p.reset {
        return client
            .batch_execute(sql)
            .await
            .with_context(|| format!("resetting the tables of projector `{}`", p.name));
    }
    if p.tables.is_empty() {
        return Ok(());
    }
    let tables: Vec<String> = p.tables.iter().map(|t| quote_qualified(t)).collect();
    let referenced: Vec<bool> = client
        .query_one(
            "SELECT array_agg(EXISTS (SELECT 1 FROM pg_constraint c WHERE c.contype = 'f' \
               AND c.confrelid = to_regclass(t) \
               AND c.conrelid <> ALL (SELECT to_regclass(o) FROM unnest($1::text[]) o)) ORDER BY i) \
             FROM unnest($1::text[]) WITH ORDINALITY AS x(t, i)",
            &[&tables],
        )
        .await
        .context("looking for foreign keys to the owned tables")?
        .col(0)?;
    let (deleted, truncated): (Vec<_>, Vec<_>) =
        tables.iter().zip(&referenced).partition(|(_, r)| **r);
    let mut sql = String::new();
    if !truncated.is_empty() {
        let names: Vec<&str> = truncated.iter().map(|(t, _)| t.as_str()).collect();
        sql.push_str(&format!("TRUNCATE {};", names.join(", ")));
    }
    for (t, _) in deleted {
        sql.push_str(&format!("DELETE FROM {t};"));
    }
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

/// Refuses to boot never-booted projectors on top of tables that already
/// hold rows (their ledger rows were lost, or the tables belong to something
/// else): replaying on top of them would apply every event twice. Names
/// every such projector at once.
pub async fn refuse_filled(client: &impl GenericClient, projectors: &[&Projector]) -> Result<()> {
    let mut refused = Vec::new();
    for p in projectors {
        let filled = filled_tables(client, p).await?;
        if !filled.is_empty() {
            refused.push(format!(
                "`{}` (table{} {})",
                p.name,
                if filled.len() == 1 { "" } else { "s" },
                filled
                    .iter()
                    .map(|t| format!("`{t}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    if refused.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = projectors
        .iter()
        .filter(|p| {
            refused
                .iter()
                .any(|r| r.starts_with(&format!("`{}`", p.name)))
        })
        .map(|p| p.name.as_str())
        .collect();
    Err(Failure::Usage(format!(
        "never booted (no ledger row), but their tables already hold rows: {}\n  \
         their ledger rows were lost, or the tables belong to something else: boot refuses to replay \
         on top of them, and changed nothing. Rebuild them from scratch with `projectionist reset {} --yes`, \
         or, if their handlers are idempotent and the rows are right, adopt the rows deliberately with \
         `projectionist boot {}` (every event is replayed over them)",
        refused.join(", "),
        names.join(" "),
        names.iter().map(|n| format!("--adopt {n}")).collect::<Vec<_>>().join(" "),
    ))
    .into())
}
