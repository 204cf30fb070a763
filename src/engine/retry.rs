//! `failures` and `retry`: the recorded failures and dead letters of
//! projectors, and applying dead letters again with the current handlers
//! (a fixed handler, fixed data), in position order, each event with its
//! ledger record in one transaction. A command projector gets its dead
//! letters delivered again through the protocol.

use anyhow::{Context as _, Result};

use crate::db::Session;
use crate::engine::Context;
use crate::failure::HandlerFailure;
use crate::handlers::Runner;
use crate::handlers::command::Delivery;
use crate::handlers::sql::BatchOutcome;
use crate::ledger::{FailureKind, FailureRecord, LockKey, Record, Run, Subject};
use crate::store::Position;

/// The failures of `names` (empty: all).
pub async fn failures(ctx: &Context, names: &[String]) -> Result<Vec<FailureRecord>> {
    for n in names {
        if ctx.manifest.projector(n).is_none() {
            // A projector gone from the manifest may still have failures: look it up in the ledger.
            let client = ctx.connect("failures", Session::Reader).await?;
            if ctx.ledger.row(&client, n).await?.is_none() {
                ctx.projector(n)?;
            }
        }
    }
    let client = ctx.connect("failures", Session::Reader).await?;
    ctx.ledger.ensure_exists(&client).await?;
    ctx.ledger.failure_records(&client, names).await
}

/// What applying one dead letter again did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Retried {
    pub position: i64,
    #[serde(rename = "type")]
    pub event_type: Option<String>,
    /// Applied: the dead letter is resolved.
    pub ok: bool,
    /// Why it failed again.
    pub error: Option<String>,
}

/// Applies a projector's dead letters (those at `positions`, when given) again.
pub async fn retry(ctx: &Context, name: &str, positions: &[i64]) -> Result<Vec<Retried>> {
    let p = ctx.projector(name)?;
    let mut client = ctx.connect("retry", Session::Holder).await?;
    ctx.ledger.ensure_exists(&client).await?;
    let shape = crate::engine::validate::validate(&ctx.manifest, &mut client).await?;
    let letters = ctx.ledger.dead_letters(&client, name, positions).await?;
    let mut runner = Runner::new(
        &shape,
        p,
        Run::Retry,
        &ctx.database,
        ctx.manifest.dir(),
        &client,
    )
    .await?;
    let subject = Subject {
        name,
        version: p.version,
        record: Record::Live,
        partition: None,
    };
    let mut done = Vec::new();
    for letter in letters {
        let Some(at) = event_at(&shape, &client, letter.position).await? else {
            done.push(Retried {
                position: letter.position,
                event_type: letter.event_type.clone(),
                ok: false,
                error: Some("the event is no longer in the store".into()),
            });
            continue;
        };
        let before = Position {
            tx: at.tx,
            id: at.id - 1,
        };
        let tx = client.transaction().await?;
        // Never beside a play batch or a boot of the projector.
        ctx.locks.xact_lock(&tx, LockKey::Projector(name)).await?;
        let failure: Option<Box<HandlerFailure>> = match &mut runner {
            Runner::Sql(compiled) => match compiled.run(&shape, &tx, before, at).await? {
                BatchOutcome::Done { .. } => None,
                BatchOutcome::Failed { failure, .. } => Some(failure),
            },
            Runner::Command(command) => match command.deliver(&shape, &tx, before, at).await? {
                Delivery::Done { .. } => None,
                Delivery::Failed { failure, .. } => Some(failure),
            },
        };
        match &failure {
            None => ctx.ledger.resolve(&tx, name, letter.position).await?,
            Some(f) => {
                ctx.ledger
                    .record_failure(&tx, &subject, Run::Retry, f, FailureKind::DeadLetter)
                    .await?
            }
        }
        tx.commit()
            .await
            .context("committing a retried dead letter")?;
        done.push(Retried {
            position: letter.position,
            event_type: letter.event_type.clone(),
            ok: failure.is_none(),
            error: failure.map(|f| f.message),
        });
    }
    runner.finish().await;
    Ok(done)
}

/// The place in the order of the event at position `id`, if it is there.
async fn event_at(
    shape: &crate::store::StoreShape,
    client: &tokio_postgres::Client,
    id: i64,
) -> Result<Option<Position>> {
    let sql = format!(
        "SELECT {}::text FROM {} WHERE {} = $1::bigint",
        shape.tx_expr(),
        shape.relation(),
        shape.position_expr()
    );
    match client.query_opt(&sql, &[&id]).await? {
        Some(r) => Ok(Some(Position::from_parts(
            crate::db::RowExt::col(&r, 0)?,
            id,
        )?)),
        None => Ok(None),
    }
}
