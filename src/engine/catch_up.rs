//! Catching a build up to the head just before its swap. A build that
//! reached the head may have waited for the other builds of its boot while
//! `play` kept the live version going: swapping it in as it is would show
//! readers an older read model for a moment. So boot plays each build to the
//! head again, then once more while it holds the projectors' locks (play's
//! batches of them wait), so that the new version has every event the live
//! one has when the swap takes its place.

use anyhow::Result;

use crate::db::Session;
use crate::engine::Context;
use crate::engine::batch::{Batch, OnFailure, Player, Range};
use crate::failure::HandlerFailure;
use crate::handlers::Runner;
use crate::ledger::{Record, Run, State};
use crate::manifest::Projector;
use crate::store::{Partition, Plan, Position, Reader, StoreShape};

/// Where a build stands after catching up.
pub enum CaughtUp {
    /// At the head (or its bound); the build's position.
    At(Position),
    /// A handler failed on an event that came during the build: the build is
    /// broken (recorded), the live version stays.
    Broken(Box<HandlerFailure>),
}

/// Plays the build `id` of `p` from where it stands to the head, never past
/// `bound` (its `after` projectors' builds), part by part if partitioned.
pub async fn catch_up(
    ctx: &Context,
    shape: &StoreShape,
    p: &Projector,
    id: i64,
    bound: Option<Position>,
    batch_size: i64,
) -> Result<CaughtUp> {
    let mut client = ctx.connect("boot", Session::Holder).await?;
    crate::engine::rebuild::enter_build_schema(ctx, &client).await?;
    let parts: Vec<Option<Partition>> = match Partition::all(p.partitions) {
        parts if parts.is_empty() => vec![None],
        parts => parts.into_iter().map(Some).collect(),
    };
    for part in parts {
        let part_shape = part.map(|k| shape.partition(k));
        let shape = part_shape.as_ref().unwrap_or(shape);
        let mut runner = Runner::new(
            shape,
            p,
            Run::Boot,
            &ctx.database,
            ctx.manifest.dir(),
            &client,
        )
        .await?;
        let player = Player {
            ctx,
            shape,
            projector: p,
            run: Run::Boot,
            state: State::Built,
            lock_each_batch: false,
            record: Record::Build(id),
            partition: part,
        };
        let mut pos = match part {
            None => ctx
                .ledger
                .lock_row(&client, &p.name, Record::Build(id), None)
                .await?
                .map(|r| r.position),
            Some(k) => ctx
                .ledger
                .parts(&client, &p.name, Record::Build(id))
                .await?
                .into_iter()
                .find(|r| r.partition == k.index)
                .map(|r| r.position),
        }
        .ok_or_else(|| anyhow::anyhow!("the build of projector `{}` went missing", p.name))?;
        let mut reader = Reader::knowing_holes(ctx.ledger.known_holes_sql());
        loop {
            // A transaction still writing is not waited for: the build swaps
            // in where it is, and play goes on from there.
            let Plan::Batch { end, holes } =
                reader.plan(shape, &client, pos, bound, batch_size).await?
            else {
                break;
            };
            let range = Range {
                from: pos,
                to: end,
                holes,
            };
            match player
                .batch_retrying(&mut client, &mut runner, range, OnFailure::Break, 5)
                .await?
            {
                Batch::Done { .. } => pos = end,
                Batch::Failed { failure, .. } => {
                    runner.finish().await;
                    return Ok(CaughtUp::Broken(failure));
                }
                Batch::Locked | Batch::Stale(_) => anyhow::bail!(
                    "the build of projector `{}` changed while boot caught it up",
                    p.name
                ),
            }
        }
        runner.finish().await;
    }
    let row = ctx
        .ledger
        .lock_row(&client, &p.name, Record::Build(id), None)
        .await?
        .ok_or_else(|| anyhow::anyhow!("the build of projector `{}` went missing", p.name))?;
    Ok(CaughtUp::At(row.position))
}
