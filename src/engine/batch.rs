//! One batch of one SQL projector, in one transaction: the handlers and the
//! guarded position update commit together, so every event's effect lands
//! exactly once whatever is killed when. Shared by boot, reset and play.

use anyhow::{Context as _, Result};
use tokio_postgres::Client;

use crate::engine::Context;
use crate::handlers::command::{CommandRunner, Delivery};
use crate::handlers::sql::{BatchOutcome, CompiledProjector, HandlerFailure};
use crate::ledger::FailureKind;
use crate::manifest::Projector;
use crate::store::{Position, StoreShape};

/// What runs a projector's events: its compiled SQL handlers, or its command.
pub enum Runner {
    Sql(CompiledProjector),
    Command(Box<CommandRunner>),
}

impl Runner {
    /// Prepares a projector on this connection (SQL: installs its function).
    pub async fn new(
        ctx: &Context,
        shape: &StoreShape,
        p: &Projector,
        client: &Client,
        run: &'static str,
    ) -> Result<Runner> {
        if p.command.is_some() {
            let command = CommandRunner::new(p, run, ctx.manifest.dir());
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

/// What to do when a handler fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnFailure {
    /// Keep the events before the failing one and mark the projector broken.
    Break,
    /// Keep the events before the failing one, record the failing event as a
    /// dead letter and move past it.
    Skip,
    /// Keep the events before the failing one and record the failure; the
    /// caller tries the failing event again later.
    Retry,
}

#[derive(Debug)]
pub enum Batch {
    /// Every event up to the batch's end was projected; `handled` of them had handlers.
    Done { handled: i64 },
    /// A handler failed: the position is now `kept` (before the failing event,
    /// or past it with [`OnFailure::Skip`]).
    Failed {
        kept: Position,
        handled: i64,
        failure: Box<HandlerFailure>,
    },
}

/// Runs (from, to] for projector `name`; `run` names the command in the failures table.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    ctx: &Context,
    shape: &StoreShape,
    client: &mut Client,
    runner: &mut Runner,
    name: &str,
    from: Position,
    to: Position,
    run: &str,
    on_failure: OnFailure,
    projector_lock: Option<&str>,
) -> Result<Option<Batch>> {
    let time = shape.time_at(client, to).await?;
    let tx = client.transaction().await?;
    if let Some(key) = projector_lock
        && !ctx.locks.try_xact_lock(&tx, key).await?
    {
        // Held by a boot or reset: not now.
        return Ok(None);
    }
    let compiled = match runner {
        Runner::Sql(c) => c,
        Runner::Command(c) => {
            let delivery = c.deliver(shape, &tx, from, to).await?;
            return finish_delivery(
                ctx, shape, tx, name, from, to, time, delivery, run, on_failure,
            )
            .await;
        }
    };
    match compiled.run(&tx, from, to).await? {
        BatchOutcome::Done { handled } => {
            ctx.ledger
                .advance(&tx, name, from, to, time, handled)
                .await?;
            tx.commit().await.context("committing a batch")?;
            Ok(Some(Batch::Done { handled }))
        }
        BatchOutcome::Failed { last_ok, failure } => {
            // Keep everything before the failing event: replay the batch up to the event before it.
            let mut kept = from;
            let mut handled = 0;
            let before = shape.predecessor(&tx, from, failure.at()).await?;
            if before > from {
                let n = match last_ok {
                    Some(_) => match compiled.run(&tx, from, before).await? {
                        BatchOutcome::Done { handled } => handled,
                        BatchOutcome::Failed {
                            failure: mut again, ..
                        } => {
                            // Not deterministic (a plan change, a volatile function): break at the
                            // earlier failure, keeping nothing of this batch.
                            again.message = format!(
                                "{} (it failed at #{} first, then at #{} when the events before were replayed: the handler is not deterministic)",
                                again.message, failure.position, again.position
                            );
                            record(ctx, shape, &tx, name, run, on_failure, &again, &mut kept)
                                .await?;
                            tx.commit().await.context("recording the failure")?;
                            return Ok(Some(Batch::Failed {
                                kept,
                                handled: 0,
                                failure: again,
                            }));
                        }
                    },
                    None => 0,
                };
                let time = shape.time_at(&tx, before).await?;
                ctx.ledger.advance(&tx, name, from, before, time, n).await?;
                kept = before;
                handled = n;
            }
            record(ctx, shape, &tx, name, run, on_failure, &failure, &mut kept).await?;
            tx.commit().await.context("recording the failure")?;
            Ok(Some(Batch::Failed {
                kept,
                handled,
                failure,
            }))
        }
    }
}

/// Records a failure by the policy; with Skip moves `kept` past the failing event.
#[allow(clippy::too_many_arguments)]
async fn record(
    ctx: &Context,
    shape: &StoreShape,
    tx: &tokio_postgres::Transaction<'_>,
    name: &str,
    run: &str,
    on_failure: OnFailure,
    failure: &HandlerFailure,
    kept: &mut Position,
) -> Result<()> {
    match on_failure {
        OnFailure::Break => {
            ctx.ledger
                .record_failure(tx, name, run, failure, FailureKind::Broken)
                .await?
        }
        OnFailure::Retry => {
            ctx.ledger
                .record_failure(tx, name, run, failure, FailureKind::Retried)
                .await?
        }
        OnFailure::Skip => {
            ctx.ledger
                .record_failure(tx, name, run, failure, FailureKind::DeadLetter)
                .await?;
            let past = failure.at();
            let time = shape.time_at(tx, past).await?;
            ctx.ledger.advance(tx, name, *kept, past, time, 0).await?;
            *kept = past;
        }
    }
    Ok(())
}

/// A command projector's batch: the ledger follows what the process acknowledged.
#[allow(clippy::too_many_arguments)]
async fn finish_delivery(
    ctx: &Context,
    shape: &StoreShape,
    tx: tokio_postgres::Transaction<'_>,
    name: &str,
    from: Position,
    to: Position,
    time: Option<chrono::DateTime<chrono::Utc>>,
    delivery: Delivery,
    run: &str,
    on_failure: OnFailure,
) -> Result<Option<Batch>> {
    match delivery {
        Delivery::Done { sent } => {
            ctx.ledger.advance(&tx, name, from, to, time, sent).await?;
            tx.commit().await.context("checkpointing a batch")?;
            Ok(Some(Batch::Done { handled: sent }))
        }
        Delivery::Failed {
            acked,
            sent,
            failure,
        } => {
            let mut kept = from;
            if let Some(a) = acked.filter(|a| *a > from) {
                let time = shape.time_at(&tx, a).await?;
                ctx.ledger.advance(&tx, name, from, a, time, sent).await?;
                kept = a;
            }
            record(ctx, shape, &tx, name, run, on_failure, &failure, &mut kept).await?;
            tx.commit().await.context("recording the failure")?;
            Ok(Some(Batch::Failed {
                kept,
                handled: sent,
                failure,
            }))
        }
    }
}
