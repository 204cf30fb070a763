//! One batch of one projector, in one transaction: the handlers (or the
//! command's acknowledgements), the passed holes and the guarded position
//! update commit together, so every event's effect lands exactly once
//! whatever is killed when. Shared by boot, reset and play.
//!
//! A batch starts by locking the projector's ledger row and checking it is
//! still the one this runner plays (its version, its state, its position):
//! a runner left over from an older deploy, or one that lost a race, leaves
//! the projector alone instead of writing into it.
//!
//! A booting SQL projector's batches commit asynchronously (see
//! [`Player::batch`]); play's and command projectors' wait for the disk.

use anyhow::{Context as _, Result};
use chrono::{DateTime, Utc};
use tokio_postgres::{Client, Transaction};

use crate::engine::Context;
use crate::error::{Trouble, trouble};
use crate::failure::HandlerFailure;
use crate::handlers::Runner;
use crate::handlers::command::Delivery;
use crate::handlers::sql::{BatchOutcome, CompiledProjector};
use crate::ledger::{Advance, FailureKind, LockKey, Record, Run, State, Subject};
use crate::manifest::Projector;
use crate::store::{Partition, PassedHoles, Position, StoreShape};

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

/// What a batch did.
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
    /// Not now: a boot or a reset holds the projector.
    Locked,
    /// The ledger row is no longer what this runner plays: leave it alone.
    Stale(String),
}

/// The events a batch plays: (from, to], and whether it passes holes.
#[derive(Clone, Copy, Debug)]
pub struct Range {
    pub from: Position,
    pub to: Position,
    pub holes: Option<PassedHoles>,
}

/// A projector being played by one run: what every batch of it needs.
pub struct Player<'a> {
    pub ctx: &'a Context,
    pub shape: &'a StoreShape,
    pub projector: &'a Projector,
    pub run: Run,
    /// The state the ledger row must be in (play: live; boot and reset: booting).
    pub state: State,
    /// Take the projector's lock for each batch (play). Boot and reset hold it
    /// for their whole run.
    pub lock_each_batch: bool,
    /// The record the batches move: the live row, or a build's.
    pub record: Record,
    /// The part it plays of a partitioned projector (`shape` then reads only
    /// that part's events).
    pub partition: Option<Partition>,
}

/// A batch in its transaction.
struct Open<'t> {
    tx: Transaction<'t>,
    range: Range,
    /// The time of the event at the batch's end.
    time: Option<DateTime<Utc>>,
    on_failure: OnFailure,
}

impl Player<'_> {
    /// Runs one batch.
    pub async fn batch(
        &self,
        client: &mut Client,
        runner: &mut Runner,
        range: Range,
        on_failure: OnFailure,
    ) -> Result<Batch> {
        let time = self.shape.time_at(client, range.to).await?;
        let tx = client.transaction().await?;
        if self.lock_each_batch {
            // The parts of a partitioned projector play side by side: they
            // share the lock that boot and reset take alone.
            let key = LockKey::Projector(&self.projector.name);
            let locked = match self.partition {
                None => self.ctx.locks.try_xact_lock(&tx, key).await?,
                Some(_) => self.ctx.locks.try_xact_lock_shared(&tx, key).await?,
            };
            if !locked {
                return Ok(Batch::Locked);
            }
        }
        if let Some(why) = self.stale(&tx, range.from).await? {
            return Ok(Batch::Stale(why));
        }
        if self.state == State::Booting && matches!(runner, Runner::Sql(_)) {
            // The handlers' writes commit with the position in one
            // transaction: a server crash can only take back the last
            // batches whole (the tables step back to an earlier position),
            // and the next boot replays them. A booting projector is not (or
            // no longer) up to date for its readers anyway, so its commits
            // need not wait for the disk: boot keeps its CPUs busy instead. The run's last ledger
            // write (live, finished, stalled) waits as usual, which makes
            // every batch before it durable; so does a failure's record.
            tx.batch_execute("SET LOCAL synchronous_commit = off")
                .await
                .context("letting the batch commit without waiting for the disk")?;
        }
        let open = Open {
            tx,
            range,
            time,
            on_failure,
        };
        match runner {
            Runner::Sql(compiled) => {
                let outcome = compiled
                    .run(self.shape, &open.tx, range.from, range.to)
                    .await?;
                match outcome {
                    BatchOutcome::Done { handled } => {
                        self.commit(open, range.to, handled).await?;
                        Ok(Batch::Done { handled })
                    }
                    BatchOutcome::Failed { last_ok, failure } => {
                        self.keep_before(open, compiled, last_ok, failure).await
                    }
                }
            }
            Runner::Command(command) => {
                let delivery = command
                    .deliver(self.shape, &open.tx, range.from, range.to)
                    .await?;
                self.finish_delivery(open, delivery).await
            }
        }
    }

    /// [`batch`](Self::batch), tried again with backoff (up to `attempts`
    /// times) while the database says the trouble is transient (a deadlock,
    /// a serialization failure, a statement cancelled from outside): such a
    /// failure is never the handler's, and is never recorded as one.
    pub async fn batch_retrying(
        &self,
        client: &mut Client,
        runner: &mut Runner,
        range: Range,
        on_failure: OnFailure,
        attempts: u32,
    ) -> Result<Batch> {
        let mut wait = std::time::Duration::from_millis(500);
        let mut attempt = 1;
        loop {
            match self.batch(client, runner, range, on_failure).await {
                Err(e) if attempt < attempts && trouble(&e) == Trouble::Transient => {
                    tracing::warn!(
                        "projector `{}`: {}; trying the batch again in {} (attempt {attempt} of {attempts})",
                        self.projector.name,
                        crate::error::one_line(&e),
                        humantime::format_duration(wait)
                    );
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// Why the row is not this runner's to play any more, if it is not.
    async fn stale(&self, tx: &Transaction<'_>, from: Position) -> Result<Option<String>> {
        let p = self.projector;
        let ledger = &self.ctx.ledger;
        let Some(row) = ledger
            .lock_row(tx, &p.name, self.record, self.partition)
            .await?
        else {
            return Ok(Some("its ledger row is gone".into()));
        };
        Ok(if row.version != p.version {
            Some(format!(
                "it is at version {} in the ledger, and this run plays version {}",
                row.version, p.version
            ))
        } else if row.partitions != p.partitions {
            Some(format!(
                "it has {} partition(s) in the ledger, and this run plays {}",
                row.partitions, p.partitions
            ))
        } else if row.state != self.state {
            Some(format!("it is {} now", row.state.as_str()))
        } else if row.position != from {
            Some(format!(
                "its position moved from {from} to {} (another runner played it)",
                row.position
            ))
        } else {
            None
        })
    }

    /// Whose record the batches move.
    pub fn subject(&self) -> Subject<'_> {
        Subject {
            name: &self.projector.name,
            version: self.projector.version,
            record: self.record,
            partition: self.partition,
        }
    }

    fn advance(&self, from: Position, to: Position, handled: i64) -> Advance<'_> {
        Advance {
            subject: self.subject(),
            from,
            to,
            event_time: None,
            handled,
        }
    }

    /// Commits the batch up to `to` (its end, or before a failure), with the
    /// holes passed on the way.
    async fn commit(&self, open: Open<'_>, to: Position, handled: i64) -> Result<()> {
        self.move_to(&open, to, handled).await?;
        open.tx.commit().await.context("committing a batch")
    }

    async fn move_to(&self, open: &Open<'_>, to: Position, handled: i64) -> Result<()> {
        if let Some(holes) = open.range.holes {
            self.ctx
                .ledger
                .record_holes(
                    &open.tx,
                    self.shape,
                    &self.subject(),
                    (open.range.from, to),
                    holes,
                )
                .await?;
        }
        let time = if to == open.range.to {
            open.time
        } else {
            self.shape.time_at(&open.tx, to).await?
        };
        let advance = Advance {
            event_time: time,
            ..self.advance(open.range.from, to, handled)
        };
        self.ctx.ledger.advance(&open.tx, &advance).await
    }

    /// A handler failed: keep every event before the failing one (the batch
    /// runs again up to it), record the failure by the policy, commit.
    async fn keep_before(
        &self,
        open: Open<'_>,
        compiled: &CompiledProjector,
        last_ok: Option<Position>,
        failure: Box<HandlerFailure>,
    ) -> Result<Batch> {
        let from = open.range.from;
        let before = self.shape.predecessor(&open.tx, from, failure.at()).await?;
        if before <= from {
            return self.record(open, from, 0, failure).await;
        }
        let handled = match last_ok {
            None => 0,
            Some(_) => match compiled.run(self.shape, &open.tx, from, before).await? {
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
                    return self.record(open, from, 0, again).await;
                }
            },
        };
        self.move_to(&open, before, handled).await?;
        self.record(open, before, handled, failure).await
    }

    /// Records a failure by the policy (with Skip, moves past the failing
    /// event) and commits.
    async fn record(
        &self,
        open: Open<'_>,
        kept: Position,
        handled: i64,
        failure: Box<HandlerFailure>,
    ) -> Result<Batch> {
        let kind = match open.on_failure {
            OnFailure::Break => FailureKind::Broken,
            OnFailure::Retry => FailureKind::Retried,
            OnFailure::Skip => FailureKind::DeadLetter,
        };
        self.ctx
            .ledger
            .record_failure(&open.tx, &self.subject(), self.run, &failure, kind)
            .await?;
        // A failure is reported to whoever runs the boot: it waits for the disk.
        open.tx
            .batch_execute("SET LOCAL synchronous_commit TO DEFAULT")
            .await
            .context("recording the failure")?;
        let mut kept = kept;
        if open.on_failure == OnFailure::Skip {
            let past = failure.at();
            let time = self.shape.time_at(&open.tx, past).await?;
            let advance = Advance {
                event_time: time,
                ..self.advance(kept, past, 0)
            };
            self.ctx.ledger.advance(&open.tx, &advance).await?;
            kept = past;
        }
        open.tx.commit().await.context("recording the failure")?;
        Ok(Batch::Failed {
            kept,
            handled,
            failure,
        })
    }

    /// A command projector's batch: the ledger follows what the process acknowledged.
    async fn finish_delivery(&self, open: Open<'_>, delivery: Delivery) -> Result<Batch> {
        match delivery {
            Delivery::Done { sent } => {
                let to = open.range.to;
                self.commit(open, to, sent).await?;
                Ok(Batch::Done { handled: sent })
            }
            Delivery::Failed {
                acked,
                sent,
                failure,
            } => {
                let from = open.range.from;
                let kept = match acked.filter(|a| *a > from) {
                    Some(a) => {
                        self.move_to(&open, a, sent).await?;
                        a
                    }
                    None => from,
                };
                self.record(open, kept, sent, failure).await
            }
        }
    }
}
