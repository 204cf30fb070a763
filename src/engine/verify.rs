//! `verify`: the sweeper. Runs each `[[projectors.X.check]]`: its two queries
//! must return the same rows (as a multiset; column names do not matter). Both run in one repeatable-read snapshot so a
//! write between them cannot fake a mismatch.

use anyhow::{Context as _, Result};
use tokio_postgres::Client;

use crate::engine::Context;
use crate::error::Failure;

#[derive(Clone, Debug, serde::Serialize)]
pub struct CheckResult {
    pub projector: String,
    pub check: String,
    pub ok: bool,
    /// Rows of each query, as row text, sorted.
    pub projection: Vec<String>,
    pub events: Vec<String>,
}

pub async fn verify(
    ctx: &Context,
    client: &mut Client,
    names: &[String],
) -> Result<Vec<CheckResult>> {
    for n in names {
        if ctx.manifest.projector(n).is_none() {
            return Err(Failure::Usage(format!(
                "no projector `{n}` in {}",
                ctx.manifest.path.display()
            ))
            .into());
        }
    }
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    let mut results = Vec::new();
    for p in &ctx.manifest.projectors {
        if !names.is_empty() && !names.contains(&p.name) {
            continue;
        }
        for c in &p.checks {
            // Rows as text (each column as PostgreSQL prints it), sorted: a multiset.
            let run = |q: String| {
                let tx = &tx;
                async move {
                    let mut rows: Vec<String> = tx
                        .simple_query(&q)
                        .await?
                        .iter()
                        .filter_map(|m| match m {
                            tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                                (0..r.len())
                                    .map(|i| r.get(i).unwrap_or("NULL"))
                                    .collect::<Vec<_>>()
                                    .join(", "),
                            ),
                            _ => None,
                        })
                        .collect();
                    rows.sort();
                    Ok::<Vec<String>, tokio_postgres::Error>(rows)
                }
            };
            let projection = run(c.projection.clone()).await.with_context(|| {
                format!("check \"{}\" of `{}`: the projection query", c.name, p.name)
            })?;
            let events = run(c.events.clone()).await.with_context(|| {
                format!("check \"{}\" of `{}`: the events query", c.name, p.name)
            })?;
            results.push(CheckResult {
                projector: p.name.clone(),
                check: c.name.clone(),
                ok: projection == events,
                projection,
                events,
            });
        }
    }
    tx.rollback().await?;
    Ok(results)
}
