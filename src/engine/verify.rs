//! `verify`: the sweeper. Runs each `[[projectors.X.check]]`: its two queries
//! must return the same rows. Both run in one repeatable-read snapshot so a
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
            let run = |q: String| {
                let tx = &tx;
                async move {
                    let rows = tx
                        .query(&format!("SELECT q::text FROM ({q}) q ORDER BY 1"), &[])
                        .await?;
                    Ok::<Vec<String>, tokio_postgres::Error>(
                        rows.iter()
                            .map(|r| r.get::<_, Option<String>>(0).unwrap_or_default())
                            .collect(),
                    )
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
