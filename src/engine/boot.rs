//! `boot`: the deploy step. Selects the projectors that need booting, plays
//! each to the head concurrently (batch by batch, each batch committed with
//! its position), and on the first handler failure marks that projector
//! `broken` and every other unfinished one `stalled`, runs the alert, and
//! reports.
//!
//! One boot runs at a time per database (an advisory lock), and each
//! projector is held under its own lock so no runner interleaves with it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use tokio::sync::{Semaphore, watch};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::db::quote_qualified;
use crate::engine::Context;
use crate::engine::batch::{self, Batch, OnFailure, Runner};
use crate::error::Failure;
use crate::handlers::sql::HandlerFailure;
use crate::ledger::{LedgerRow, State};
use crate::manifest::{Mode, Projector};
use crate::report::progress::{Progress, ProjectorProgress};
use crate::store::{HoleTracker, Position, StoreShape};

#[derive(Clone, Debug)]
pub struct BootOptions {
    /// Limit the selection to these projectors (empty: all that need it).
    pub names: Vec<String>,
    /// How many projectors boot at once.
    pub jobs: usize,
    /// How long to wait for another boot's (or runner's) lock; `None` fails at once.
    pub lock_timeout: Option<Duration>,
    /// Events per batch (one transaction each).
    pub batch_size: i64,
    /// How long to wait, at the end, for running transactions that hold events back.
    pub writer_wait: Duration,
    /// The run command projectors are told about (`boot` or `reset`).
    pub run: &'static str,
}

impl Default for BootOptions {
    fn default() -> Self {
        BootOptions {
            names: Vec::new(),
            jobs: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
            lock_timeout: Some(Duration::from_secs(600)),
            batch_size: 10_000,
            writer_wait: Duration::from_secs(60),
            run: "boot",
        }
    }
}

/// Why a projector was selected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Never booted.
    New,
    /// Interrupted, broken or stalled: resumed from its position.
    Resume,
    /// Its manifest version went up: reset, then replayed.
    Rebuild,
}

/// What boot did to one projector.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ProjectorOutcome {
    pub name: String,
    pub mode: &'static str,
    pub action: Action,
    pub state: State,
    pub position: i64,
    pub events: i64,
    pub seconds: f64,
    /// Why it stopped short of the committed head (running transactions held events back).
    pub held_back: Option<String>,
}

/// The broken projector of a failed boot.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Broken {
    pub projector: String,
    #[serde(flatten)]
    pub failure: HandlerFailure,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct BootReport {
    pub projectors: Vec<ProjectorOutcome>,
    pub broken: Option<Broken>,
    /// The alert command's own failure, if it failed (never fatal).
    pub alert_error: Option<String>,
    /// Events left behind running transactions that never finished while boot waited.
    pub held_back: Option<String>,
}

impl BootReport {
    pub fn succeeded(&self) -> bool {
        self.broken.is_none()
    }
}

/// Committed positions of this boot's projectors, for `after`.
struct Shared {
    abort: CancellationToken,
    positions: HashMap<String, watch::Sender<(Position, bool)>>,
    opts: BootOptions,
    shape: StoreShape,
}

enum TaskEnd {
    Done(ProjectorOutcome),
    Stalled(ProjectorOutcome),
    Broken(ProjectorOutcome, HandlerFailure),
}

/// Boots the manifest's projectors that need it.
pub async fn boot(ctx: &Context, opts: BootOptions, progress: &Progress) -> Result<BootReport> {
    let mut control = ctx.connect("boot").await?;
    ctx.ledger.ensure_exists(&control).await?;
    let shape = crate::engine::validate::validate(&ctx.manifest, &mut control).await?;

    for name in &opts.names {
        if ctx.manifest.projector(name).is_none() {
            return Err(Failure::Usage(format!(
                "no projector `{name}` in {}\n  projectors: {}",
                ctx.manifest.path.display(),
                ctx.manifest
                    .projectors
                    .iter()
                    .map(|p| p.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
            .into());
        }
    }

    ctx.locks
        .lock(
            &control,
            "boot",
            "boot (one at a time per database)",
            opts.lock_timeout,
        )
        .await?;

    let rows: HashMap<String, LedgerRow> = ctx
        .ledger
        .rows(&control)
        .await?
        .into_iter()
        .map(|r| (r.name.clone(), r))
        .collect();
    let present: Vec<String> = ctx
        .manifest
        .projectors
        .iter()
        .map(|p| p.name.clone())
        .collect();
    ctx.ledger.note_missing(&control, &present).await?;

    let plan = select(ctx, &opts, &rows)?;
    if plan.is_empty() {
        tracing::info!("nothing to boot: every projector is live or finished");
    }

    let shared = Arc::new(Shared {
        abort: CancellationToken::new(),
        positions: plan
            .iter()
            .map(|(p, _, row)| {
                let start = row.as_ref().map(|r| r.position).unwrap_or_default();
                (p.name.clone(), watch::channel((start, false)).0)
            })
            .collect(),
        opts: opts.clone(),
        shape,
    });
    let permits = Arc::new(Semaphore::new(opts.jobs.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    // Spawned in dependency order: the semaphore is fair, so a projector never
    // holds a slot while what it waits for queues behind it.
    for (projector, action, row) in plan {
        let ctx = ctx.clone();
        let shared = shared.clone();
        let permits = permits.clone();
        let bar = progress.projector(&projector.name);
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await.expect("semaphore");
            let name = projector.name.clone();
            let result = boot_one(&ctx, &shared, &projector, action, row, &bar).await;
            if let Some(tx) = shared.positions.get(&name) {
                tx.send_modify(|v| v.1 = true);
            }
            if matches!(result, Err(_) | Ok(TaskEnd::Broken(..))) {
                shared.abort.cancel();
            }
            result.with_context(|| format!("booting projector `{name}`"))
        });
    }

    let mut report = BootReport {
        projectors: Vec::new(),
        broken: None,
        alert_error: None,
        held_back: None,
    };
    let mut first_error = None;
    while let Some(joined) = tasks.join_next().await {
        match joined.context("a boot task panicked")? {
            Ok(TaskEnd::Done(o)) | Ok(TaskEnd::Stalled(o)) => report.projectors.push(o),
            Ok(TaskEnd::Broken(o, failure)) => {
                report.broken = Some(Broken {
                    projector: o.name.clone(),
                    failure,
                });
                report.projectors.push(o);
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    ctx.locks.unlock(&control, "boot").await.ok();
    report.projectors.sort_by(|a, b| a.name.cmp(&b.name));
    let held: Vec<String> = report
        .projectors
        .iter()
        .filter_map(|p| p.held_back.clone())
        .collect();
    if !held.is_empty() {
        report.held_back = Some(held.join("\n"));
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    if let Some(b) = &report.broken {
        let stalled: Vec<_> = report
            .projectors
            .iter()
            .filter(|p| p.state == State::Stalled)
            .map(|p| serde_json::json!({"name": p.name, "position": p.position}))
            .collect();
        if let Some(command) = &ctx.manifest.alert {
            let doc = serde_json::json!({
                "event": "projector_broken",
                "run": "boot",
                "projector": b.projector,
                "position": b.failure.position,
                "type": b.failure.event_type,
                "stream": b.failure.stream,
                "error": b.failure.message,
                "detail": b.failure.detail,
                "hint": b.failure.hint,
                "sqlstate": b.failure.sqlstate,
                "stalled": stalled,
                "database": ctx.database.target(),
                "time": chrono::Utc::now().to_rfc3339(),
            });
            report.alert_error = crate::engine::alert::run(command, ctx.manifest.dir(), &doc)
                .await
                .err();
        }
    }
    Ok(report)
}

/// The projectors to boot, with why, in dependency order.
fn select(
    ctx: &Context,
    opts: &BootOptions,
    rows: &HashMap<String, LedgerRow>,
) -> Result<Vec<(Projector, Action, Option<LedgerRow>)>> {
    let mut plan = Vec::new();
    for p in &ctx.manifest.projectors {
        if !opts.names.is_empty() && !opts.names.contains(&p.name) {
            continue;
        }
        let row = rows.get(&p.name);
        let action = match row {
            None => Action::New,
            Some(r) if r.state == State::Retired => {
                return Err(Failure::Usage(format!(
                    "projector `{}` is retired: it was removed and its ledger row kept so that its side effects are never replayed\n  \
                     boot refuses to play it again. To revive it deliberately, run `projectionist reset {} --allow-side-effects`, \
                     or give the projector a new name in {}",
                    p.name,
                    p.name,
                    ctx.manifest.path.display()
                ))
                .into());
            }
            Some(r) if p.version > r.version => Action::Rebuild,
            Some(r) if matches!(r.state, State::Booting | State::Broken | State::Stalled) => {
                Action::Resume
            }
            Some(_) => continue,
        };
        plan.push((p.clone(), action, row.cloned()));
    }
    // Dependency order (the manifest has no cycles).
    let mut ordered: Vec<(Projector, Action, Option<LedgerRow>)> = Vec::new();
    let mut pending = plan;
    while !pending.is_empty() {
        let names: Vec<String> = pending.iter().map(|(p, ..)| p.name.clone()).collect();
        let (ready, rest): (Vec<_>, Vec<_>) = pending
            .into_iter()
            .partition(|(p, ..)| p.after.iter().all(|d| !names.contains(d) || d == &p.name));
        if ready.is_empty() {
            ordered.extend(rest);
            break;
        }
        ordered.extend(ready);
        pending = rest;
    }
    Ok(ordered)
}

async fn boot_one(
    ctx: &Context,
    shared: &Shared,
    p: &Projector,
    action: Action,
    row: Option<LedgerRow>,
    bar: &ProjectorProgress,
) -> Result<TaskEnd> {
    let started = Instant::now();
    let mut outcome = ProjectorOutcome {
        name: p.name.clone(),
        mode: p.mode.as_str(),
        action,
        state: State::Booting,
        position: row.as_ref().map(|r| r.position.id).unwrap_or(0),
        events: 0,
        seconds: 0.0,
        held_back: None,
    };
    let mut client = ctx.connect("boot").await?;
    let lock_key = format!("projector:{}", p.name);
    ctx.locks
        .lock(
            &client,
            &lock_key,
            &format!("projector `{}`", p.name),
            shared.opts.lock_timeout,
        )
        .await?;

    if shared.abort.is_cancelled() {
        // Another projector broke before this one started.
        if row.is_none() {
            ctx.ledger
                .start(
                    &client,
                    p,
                    start_position(ctx, shared, &client, p).await?,
                    None,
                )
                .await?;
        }
        ctx.ledger
            .set_state(&client, &p.name, State::Stalled)
            .await?;
        outcome.state = State::Stalled;
        bar.finish("stalled");
        return Ok(TaskEnd::Stalled(outcome));
    }

    let mut pos = match (action, &row) {
        (Action::Resume, Some(r)) => {
            ctx.ledger.resume(&client, p).await?;
            r.position
        }
        (Action::Rebuild, _) => {
            let start = start_position(ctx, shared, &client, p).await?;
            let tx = client.transaction().await?;
            reset_tables(&tx, p).await?;
            ctx.ledger.start(&tx, p, start, None).await?;
            tx.commit().await.context("committing the reset")?;
            start
        }
        _ => {
            let start = start_position(ctx, shared, &client, p).await?;
            let time = shared.shape.time_at(&client, start).await?;
            ctx.ledger.start(&client, p, start, time).await?;
            start
        }
    };
    publish(shared, &p.name, pos);

    let mut runner = Runner::new(ctx, &shared.shape, p, &client, shared.opts.run).await?;
    let mut holes = HoleTracker::new(ctx.ledger.schema());
    let mut held_since: Option<Instant> = None;
    let mut last_hold_note = Instant::now();
    bar.set_position(pos.id);

    let end_state = loop {
        if shared.abort.is_cancelled() {
            break State::Stalled;
        }
        let head = shared.shape.safe_head(&client, pos, &mut holes).await?;
        let (bound, waiting_on) = dependency_bound(ctx, shared, &client, p, head.position).await?;
        bar.set_target(bound.id.max(pos.id));
        if bound > pos {
            held_since = None;
            // Play to the bound, batch by batch.
            while pos < bound {
                if shared.abort.is_cancelled() {
                    break;
                }
                let end = shared
                    .shape
                    .batch_end(&client, pos, bound, shared.opts.batch_size)
                    .await?;
                let batch = batch::run(
                    ctx,
                    &shared.shape,
                    &mut client,
                    &mut runner,
                    &p.name,
                    pos,
                    end,
                    shared.opts.run,
                    OnFailure::Break,
                    None,
                )
                .await?
                .expect("no lock to miss");
                match batch {
                    Batch::Done { handled } => {
                        outcome.events += handled;
                        pos = end;
                        publish(shared, &p.name, pos);
                        bar.set_position(pos.id);
                    }
                    Batch::Failed {
                        kept,
                        handled,
                        failure,
                    } => {
                        outcome.events += handled;
                        outcome.position = kept.id;
                        outcome.state = State::Broken;
                        outcome.seconds = started.elapsed().as_secs_f64();
                        publish(shared, &p.name, kept);
                        bar.set_position(kept.id);
                        runner.finish().await;
                        bar.finish("broken");
                        return Ok(TaskEnd::Broken(outcome, *failure));
                    }
                }
            }
            continue;
        }
        if let Some(dep) = waiting_on {
            // Caught up with a projector of this boot that is still playing: wait for it.
            let mut rx = shared.positions[&dep].subscribe();
            tokio::select! {
                _ = rx.changed() => {}
                _ = shared.abort.cancelled() => {}
            }
            continue;
        }
        if head.is_held() {
            let since = *held_since.get_or_insert_with(Instant::now);
            if since.elapsed() < shared.opts.writer_wait {
                if last_hold_note.elapsed() >= Duration::from_secs(10) {
                    tracing::warn!(
                        "projector `{}` waits at {pos}: events up to {} are committed behind running transactions {}",
                        p.name,
                        head.visible,
                        describe_holders(&head.held_by)
                    );
                    last_hold_note = Instant::now();
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            // A once projector is never played again: it must not finish short of the head.
            let note = format!(
                "projector `{}` stopped at {pos}: transactions {} still hold committed events up to {} back; {}",
                p.name,
                describe_holders(&head.held_by),
                head.visible,
                if p.mode == Mode::Once {
                    "it stays booting and the next boot finishes it"
                } else {
                    "play will project them"
                }
            );
            tracing::warn!("{note}");
            outcome.held_back = Some(note);
            if p.mode == Mode::Once {
                break State::Booting;
            }
        }
        break if p.mode == Mode::Once {
            State::Finished
        } else {
            State::Live
        };
    };
    runner.finish().await;
    ctx.ledger.set_state(&client, &p.name, end_state).await?;
    ctx.locks.unlock(&client, &lock_key).await.ok();
    outcome.state = end_state;
    outcome.position = pos.id;
    outcome.seconds = started.elapsed().as_secs_f64();
    bar.finish(end_state.as_str());
    Ok(match end_state {
        State::Stalled => TaskEnd::Stalled(outcome),
        _ => TaskEnd::Done(outcome),
    })
}

/// Where a projector starts: the beginning, or the head for `from_now`.
async fn start_position(
    ctx: &Context,
    shared: &Shared,
    client: &Client,
    p: &Projector,
) -> Result<Position> {
    if p.mode == Mode::FromNow {
        shared
            .shape
            .release_head(client, ctx.ledger.schema(), shared.opts.writer_wait)
            .await
    } else {
        Ok(Position::START)
    }
}

/// Truncates the owned tables, or runs the projector's `reset` SQL.
pub async fn reset_tables(
    client: &impl tokio_postgres::GenericClient,
    p: &Projector,
) -> Result<()> {
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

/// The bound `after` puts on a projector, and the dependency of this boot it
/// would have to wait for to go further.
async fn dependency_bound(
    ctx: &Context,
    shared: &Shared,
    client: &Client,
    p: &Projector,
    head: Position,
) -> Result<(Position, Option<String>)> {
    let mut bound = head;
    let mut waiting = None;
    for dep in &p.after {
        let (dep_pos, playing) = match shared.positions.get(dep) {
            Some(tx) => {
                let (pos, done) = *tx.borrow();
                (pos, !done)
            }
            None => match ctx.ledger.row(client, dep).await? {
                Some(r) => (r.position, false),
                None => (Position::START, false),
            },
        };
        if dep_pos < bound {
            bound = dep_pos;
            waiting = playing.then(|| dep.clone());
        }
    }
    Ok((bound, waiting))
}

fn publish(shared: &Shared, name: &str, pos: Position) {
    if let Some(tx) = shared.positions.get(name) {
        tx.send_modify(|v| v.0 = pos);
    }
}

fn describe_holders(held_by: &[(i32, f64)]) -> String {
    if held_by.is_empty() {
        return "(unknown)".into();
    }
    held_by
        .iter()
        .map(|(pid, secs)| {
            format!(
                "pid {pid} (running {})",
                humantime::format_duration(Duration::from_secs(*secs as u64))
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}
