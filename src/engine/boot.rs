//! `boot`: the deploy step. Selects the projectors that need booting, plays
//! each to the head concurrently (batch by batch, each batch committed with
//! its position), and on the first handler failure marks that projector
//! `broken` and every other unfinished one `stalled`, runs the alert, and
//! reports.
//!
//! One boot runs at a time per database (an advisory lock held by the
//! control connection, which heartbeats: if the database goes silent, boot
//! gives up within the liveness budget and exits 3, and the server drops its
//! sessions and locks). Each projector is held under its own lock so no
//! runner interleaves with it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot, watch};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::db::Session;
use crate::engine::Context;
use crate::engine::batch::{Batch, OnFailure, Player, Range};
use crate::error::Failure;
use crate::failure::HandlerFailure;
use crate::handlers::Runner;
use crate::ledger::{LateEvent, LedgerRow, LockKey, Record, Run, State, Subject};
use crate::manifest::{Manifest, Mode, Projector};
use crate::report::progress::{Progress, ProjectorProgress};
use crate::store::{Partition, Plan, Position, Reader, StoreShape};

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
    /// The run command projectors are told about (boot or reset).
    pub run: Run,
    /// New projectors to boot on top of the rows their tables already hold.
    pub adopt: Vec<String>,
    /// Projectors to rebuild from scratch whatever their version (reset).
    pub rebuild: Vec<String>,
    /// Rebuild in place (empty the tables and replay), even projectors that
    /// rebuild beside their live tables.
    pub in_place: bool,
    /// Rebuild side-effecting projectors too (their side effects run again).
    pub allow_side_effects: bool,
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
            run: Run::Boot,
            adopt: Vec::new(),
            rebuild: Vec::new(),
            in_place: false,
            allow_side_effects: false,
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
    /// Its manifest version went up (or a reset asked for it): rebuilt from
    /// scratch, beside the live tables or in place.
    Rebuild,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::New => "new",
            Action::Resume => "resume",
            Action::Rebuild => "rebuild",
        }
    }
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
    /// Events that appeared inside holes the booted projectors had passed.
    pub late_events: Vec<LateEvent>,
    /// The versions built beside the live ones and swapped in.
    pub swaps: Vec<crate::engine::rebuild::Swapped>,
}

impl BootReport {
    pub fn succeeded(&self) -> bool {
        self.broken.is_none()
    }
}

/// A projector selected for booting, with why.
#[derive(Clone, Debug)]
pub struct Selected {
    pub projector: Projector,
    pub action: Action,
    pub row: Option<LedgerRow>,
}

/// Committed positions of this boot's projectors, for `after`.
struct Shared {
    abort: CancellationToken,
    /// Each projector's committed position, and whether it has finished.
    positions: HashMap<String, watch::Sender<(Position, bool)>>,
    opts: BootOptions,
    shape: StoreShape,
    /// One per projector (or part of a partitioned one) booting at once (`--jobs`).
    permits: Arc<Semaphore>,
}

impl Shared {
    /// A permit to boot (`--jobs`), saying on the bar when it has to wait.
    /// Permits go in the plan's (dependency) order: `before` resolves once
    /// the projector planned before this one has its permit. Tasks start in
    /// no set order, so without it a projector could take the last permit
    /// and wait for one planned before it that has none.
    async fn turn(
        &self,
        bar: &ProjectorProgress,
        before: oneshot::Receiver<()>,
    ) -> Option<OwnedSemaphorePermit> {
        ordered_permit(&self.permits, before, || {
            bar.waiting(&format!("waiting for its turn (--jobs {})", self.opts.jobs))
        })
        .await
    }
}

/// A permit of `permits` once `before` has resolved (sent, or dropped by a
/// task that ended first); `waiting` is called when it has to wait.
async fn ordered_permit(
    permits: &Arc<Semaphore>,
    mut before: oneshot::Receiver<()>,
    waiting: impl Fn(),
) -> Option<OwnedSemaphorePermit> {
    if let Err(oneshot::error::TryRecvError::Empty) = before.try_recv() {
        waiting();
        let _ = before.await;
    }
    match permits.clone().try_acquire_owned() {
        Ok(permit) => Some(permit),
        Err(_) => {
            waiting();
            permits.clone().acquire_owned().await.ok()
        }
    }
}

enum TaskEnd {
    Done(ProjectorOutcome),
    Stalled(ProjectorOutcome),
    Broken(ProjectorOutcome, HandlerFailure),
}

/// Boots the manifest's projectors that need it.
pub async fn boot(ctx: &Context, opts: BootOptions, progress: &Progress) -> Result<BootReport> {
    let mut control = ctx.connect("boot", Session::Holder).await?;
    ctx.ledger.ensure_exists(&control).await?;
    let shape = crate::engine::validate::validate(&ctx.manifest, &mut control).await?;
    for name in opts.names.iter().chain(&opts.adopt) {
        ctx.projector(name)?;
    }
    ctx.locks
        .lock(&ctx.database, &control, LockKey::Boot, opts.lock_timeout)
        .await?;

    let rows: HashMap<String, LedgerRow> = ctx
        .ledger
        .rows(&control)
        .await?
        .into_iter()
        .map(|r| (r.name.clone(), r))
        .collect();
    ctx.ledger
        .note_missing(&control, &ctx.manifest.names())
        .await?;

    let plan = select(&ctx.manifest, &opts, &rows)?;
    warn_older_manifest(ctx, &rows);
    let new: Vec<&Projector> = plan
        .iter()
        .filter(|s| {
            s.action == Action::New
                && s.projector.mode != Mode::FromNow
                && !opts.adopt.contains(&s.projector.name)
        })
        .map(|s| &s.projector)
        .collect();
    crate::engine::start::refuse_filled(&control, &new).await?;
    if plan.is_empty() {
        tracing::info!("nothing to boot: every projector is live or finished");
    }
    let names: Vec<String> = plan.iter().map(|s| s.projector.name.clone()).collect();
    let run = opts.run;
    let mut report = run_plan(ctx, shape.clone(), plan, opts.clone(), progress, &control).await?;
    if report.broken.is_none() {
        report.swaps = swap_built(ctx, &mut control, (&shape, &opts), &mut report).await?;
    }
    ctx.locks.unlock(&control, LockKey::Boot).await.ok();

    if !names.is_empty() {
        report.late_events =
            crate::engine::late::report(ctx, &shape, &control, run, &names).await?;
    }
    if let Some(b) = &report.broken {
        let stalled = report
            .projectors
            .iter()
            .filter(|p| p.state == State::Stalled)
            .map(|p| (p.name.clone(), p.position))
            .collect();
        let doc = crate::engine::alert::projector_broken(
            ctx,
            run,
            &b.projector,
            &b.failure,
            Some(stalled),
        );
        report.alert_error = crate::engine::alert::send(ctx, &doc).await.err();
    }
    Ok(report)
}

/// Swaps in the versions this boot built beside the live ones: projectors
/// linked by `after` together, in one transaction. Each group's builds are
/// caught up to the head first, and again under the projectors' locks, so
/// the new version has every event the live one has.
async fn swap_built(
    ctx: &Context,
    control: &mut Client,
    (shape, opts): (&StoreShape, &BootOptions),
    report: &mut BootReport,
) -> Result<Vec<crate::engine::rebuild::Swapped>> {
    let built: Vec<&Projector> = report
        .projectors
        .iter()
        .filter(|o| o.state == State::Built)
        .filter_map(|o| ctx.manifest.projector(&o.name))
        .collect();
    let mut swaps = Vec::new();
    for group in linked_groups(&built) {
        let group = in_dependency_order(group);
        if !catch_up_group(ctx, control, (shape, opts), &group, report, false).await? {
            continue;
        }
        let mut names: Vec<&str> = group.iter().map(|p| p.name.as_str()).collect();
        names.sort();
        for name in &names {
            ctx.locks
                .lock(
                    &ctx.database,
                    control,
                    LockKey::Projector(name),
                    opts.lock_timeout,
                )
                .await?;
        }
        let swapped = async {
            if !catch_up_group(ctx, control, (shape, opts), &group, report, true).await? {
                return Ok(None);
            }
            let mut members = Vec::new();
            for p in &group {
                let incoming = ctx.ledger.build(&*control, &p.name).await?.ok_or_else(|| {
                    anyhow::anyhow!("the build of projector `{}` went missing", p.name)
                })?;
                members.push(crate::engine::rebuild::Member {
                    projector: p,
                    incoming,
                    state: crate::engine::rebuild::done_state(p.mode),
                });
            }
            let swapped = crate::engine::rebuild::swap(ctx, control, &members).await?;
            for o in report.projectors.iter_mut() {
                if let Some(m) = members.iter().find(|m| m.projector.name == o.name) {
                    o.state = m.state;
                }
            }
            Ok::<_, anyhow::Error>(Some(swapped))
        }
        .await;
        for name in &names {
            ctx.locks
                .unlock(&*control, LockKey::Projector(name))
                .await
                .ok();
        }
        if let Some(swapped) = swapped? {
            swaps.push(swapped);
        }
    }
    Ok(swaps)
}

/// Plays a group's builds to the head (each never past the builds it comes
/// `after`); false when one broke on the way (recorded in the report: the
/// group is not swapped, the live versions stay).
async fn catch_up_group(
    ctx: &Context,
    control: &Client,
    (shape, opts): (&StoreShape, &BootOptions),
    group: &[&Projector],
    report: &mut BootReport,
    locked: bool,
) -> Result<bool> {
    use crate::engine::catch_up::{CaughtUp, catch_up};
    let mut at: HashMap<&str, Position> = HashMap::new();
    for p in group {
        let build =
            ctx.ledger.build(control, &p.name).await?.ok_or_else(|| {
                anyhow::anyhow!("the build of projector `{}` went missing", p.name)
            })?;
        let mut bound: Option<Position> = None;
        for dep in &p.after {
            let dep_pos = match at.get(dep.as_str()) {
                Some(pos) => *pos,
                None => ctx
                    .ledger
                    .row(control, dep)
                    .await?
                    .map(|r| r.position)
                    .unwrap_or_default(),
            };
            bound = Some(bound.map_or(dep_pos, |b| b.min(dep_pos)));
        }
        let caught = catch_up(ctx, shape, p, build.id, bound, opts.batch_size);
        match heartbeating(ctx, control, caught).await?? {
            CaughtUp::At(pos) => {
                at.insert(p.name.as_str(), pos);
            }
            CaughtUp::Broken(failure) => {
                tracing::error!(
                    "the build of projector `{}` broke at event {} while boot caught it up{}: the live version stays",
                    p.name,
                    failure.short(),
                    if locked { " for the swap" } else { "" }
                );
                for o in report.projectors.iter_mut() {
                    if group.iter().any(|g| g.name == o.name) {
                        o.state = if o.name == p.name {
                            State::Broken
                        } else {
                            State::Stalled
                        };
                    }
                }
                report.broken.get_or_insert(Broken {
                    projector: p.name.clone(),
                    failure: *failure,
                });
                return Ok(false);
            }
        }
    }
    Ok(true)
}

/// Runs `work` while keeping `client`'s session answering: it holds locks,
/// and the server drops a session idle for the session timeout.
async fn heartbeating<T>(
    ctx: &Context,
    client: &Client,
    work: impl std::future::Future<Output = T>,
) -> Result<T> {
    tokio::pin!(work);
    let database = &ctx.database;
    loop {
        tokio::select! {
            done = &mut work => return Ok(done),
            _ = tokio::time::sleep(database.liveness().heartbeat()) => database.heartbeat(client).await?,
        }
    }
}

/// A group's projectors, each after those it comes `after`.
fn in_dependency_order<'a>(group: Vec<&'a Projector>) -> Vec<&'a Projector> {
    let mut ordered: Vec<&'a Projector> = Vec::new();
    let mut pending = group;
    while !pending.is_empty() {
        let (ready, rest): (Vec<_>, Vec<_>) = pending.iter().partition(|p| {
            p.after.iter().all(|d| {
                ordered.iter().any(|o| &o.name == d) || !pending.iter().any(|q| &q.name == d)
            })
        });
        if ready.is_empty() {
            ordered.extend(rest);
            break;
        }
        ordered.extend(ready);
        pending = rest;
    }
    ordered
}

/// The projectors in groups linked by `after` (each group swaps together).
fn linked_groups<'a>(projectors: &[&'a Projector]) -> Vec<Vec<&'a Projector>> {
    let mut groups: Vec<Vec<&'a Projector>> = Vec::new();
    for p in projectors {
        let linked: Vec<usize> = groups
            .iter()
            .enumerate()
            .filter(|(_, g)| {
                g.iter()
                    .any(|q| q.after.contains(&p.name) || p.after.contains(&q.name))
            })
            .map(|(i, _)| i)
            .collect();
        let mut merged = vec![*p];
        for i in linked.into_iter().rev() {
            merged.extend(groups.remove(i));
        }
        groups.push(merged);
    }
    groups
}

/// A deploy rolled back to a manifest whose version of a projector is older
/// than the live one: play leaves it alone; `rollback` brings it back.
fn warn_older_manifest(ctx: &Context, rows: &HashMap<String, LedgerRow>) {
    for p in &ctx.manifest.projectors {
        if let Some(r) = rows.get(&p.name)
            && p.version < r.version
        {
            tracing::warn!(
                "projector `{}` is live at version {} and {} says version {}: play leaves it alone; \
                 `projectionist rollback {}` swaps version {} back in (if it is kept)",
                p.name,
                r.version,
                ctx.manifest.path.display(),
                p.version,
                p.name,
                p.version
            );
        }
    }
}

/// Plays every selected projector (at most `jobs` at once) while the control
/// connection heartbeats; collects what each did.
async fn run_plan(
    ctx: &Context,
    shape: StoreShape,
    plan: Vec<Selected>,
    opts: BootOptions,
    progress: &Progress,
    control: &Client,
) -> Result<BootReport> {
    let shared = Arc::new(Shared {
        abort: CancellationToken::new(),
        positions: plan
            .iter()
            .map(|s| {
                let start = s.row.as_ref().map(|r| r.position).unwrap_or_default();
                (s.projector.name.clone(), watch::channel((start, false)).0)
            })
            .collect(),
        opts: opts.clone(),
        shape,
        permits: Arc::new(Semaphore::new(opts.jobs.max(1))),
    });
    let mut tasks = tokio::task::JoinSet::new();
    // Turns are taken in dependency order (see `turn`): a projector never
    // holds a slot while what it waits for queues behind it.
    let (first, mut before) = oneshot::channel();
    let _ = first.send(());
    for selected in plan {
        let ctx = ctx.clone();
        let shared = shared.clone();
        let bar = progress.projector(&selected.projector.name);
        let (taken, next) = oneshot::channel();
        let before = std::mem::replace(&mut before, next);
        tasks.spawn(async move {
            let _permit = shared.turn(&bar, before).await;
            let _ = taken.send(());
            let name = selected.projector.name.clone();
            let task = Booting {
                ctx: &ctx,
                shared: &shared,
                p: &selected.projector,
                action: selected.action,
                row: selected.row,
                bar: &bar,
                started: Instant::now(),
            };
            let result = task.run().await;
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
        late_events: Vec::new(),
        swaps: Vec::new(),
    };
    let mut first_error = None;
    loop {
        let joined = tokio::select! {
            joined = tasks.join_next() => joined,
            _ = tokio::time::sleep(ctx.database.liveness().heartbeat()) => {
                if let Err(e) = ctx.database.heartbeat(control).await {
                    // The database went silent: stop everything; the server
                    // drops our sessions, and the next boot resumes.
                    shared.abort.cancel();
                    tasks.abort_all();
                    return Err(e);
                }
                continue;
            }
        };
        let Some(joined) = joined else { break };
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
    if let Some(e) = first_error {
        return Err(e);
    }
    report.projectors.sort_by(|a, b| a.name.cmp(&b.name));
    let held: Vec<String> = report
        .projectors
        .iter()
        .filter_map(|p| p.held_back.clone())
        .collect();
    if !held.is_empty() {
        report.held_back = Some(held.join("\n"));
    }
    Ok(report)
}

/// The projectors to boot, with why, in dependency order. `opts.names`
/// limits the selection (empty: all); `opts.rebuild` are rebuilt whatever
/// their version.
pub fn select(
    manifest: &Manifest,
    opts: &BootOptions,
    rows: &HashMap<String, LedgerRow>,
) -> Result<Vec<Selected>> {
    let mut plan = Vec::new();
    for p in &manifest.projectors {
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
                    manifest.path.display()
                ))
                .into());
            }
            Some(r) if r.state == State::Paused => {
                tracing::info!(
                    "projector `{}` is paused: boot leaves it (`projectionist resume {}` puts it back)",
                    p.name,
                    p.name
                );
                continue;
            }
            Some(r)
                if p.version > r.version
                    || opts.rebuild.contains(&p.name)
                    || (p.version == r.version && p.partitions != r.partitions) =>
            {
                if p.side_effects && !opts.allow_side_effects {
                    let why = if p.partitions != r.partitions && p.version == r.version {
                        format!("partitions {} → {}", r.partitions, p.partitions)
                    } else {
                        format!("version {} → {}", r.version, p.version)
                    };
                    return Err(Failure::Usage(format!(
                        "projector `{}` has side effects: rebuilding it ({why}) replays them (every email sent again)\n  \
                         if that is what you want, pass --allow-side-effects; otherwise keep its version at {} and its partitions at {}",
                        p.name, r.version, r.partitions
                    ))
                    .into());
                }
                Action::Rebuild
            }
            Some(r) if matches!(r.state, State::Booting | State::Broken | State::Stalled) => {
                Action::Resume
            }
            Some(_) => continue,
        };
        plan.push(Selected {
            projector: p.clone(),
            action,
            row: row.cloned(),
        });
    }
    // Dependency order (the manifest has no cycles).
    let mut ordered: Vec<Selected> = Vec::new();
    let mut pending = plan;
    while !pending.is_empty() {
        let names: Vec<String> = pending.iter().map(|s| s.projector.name.clone()).collect();
        let (ready, rest): (Vec<_>, Vec<_>) = pending.into_iter().partition(|s| {
            s.projector
                .after
                .iter()
                .all(|d| !names.contains(d) || d == &s.projector.name)
        });
        if ready.is_empty() {
            ordered.extend(rest);
            break;
        }
        ordered.extend(ready);
        pending = rest;
    }
    Ok(ordered)
}

/// One projector being booted.
struct Booting<'a> {
    ctx: &'a Context,
    shared: &'a Shared,
    p: &'a Projector,
    action: Action,
    row: Option<LedgerRow>,
    bar: &'a ProjectorProgress,
    started: Instant,
}

/// Where one projector's boot stands while it plays.
struct Playing {
    /// The part it plays of a partitioned projector, and where every part
    /// stands (the projector's position is the lowest).
    part: Option<(Partition, Arc<std::sync::Mutex<Vec<Position>>>)>,
    /// Ends the run early (stalled): the boot is aborted, or another part broke.
    stop: CancellationToken,
    pos: Position,
    /// Events handled so far.
    events: i64,
    /// Since when committed events have been held back by running transactions.
    held_since: Option<Instant>,
    last_hold_note: Instant,
    /// Why it stopped short of the head, if it did.
    held_back: Option<String>,
}

/// Where a projector's play to the head ended.
enum Ended {
    State(State),
    Broken(Position, Box<HandlerFailure>),
}

impl Booting<'_> {
    fn outcome(&self, state: State, position: Position, events: i64) -> ProjectorOutcome {
        ProjectorOutcome {
            name: self.p.name.clone(),
            mode: self.p.mode.as_str(),
            action: self.action,
            state,
            position: position.id,
            events,
            seconds: self.started.elapsed().as_secs_f64(),
            held_back: None,
        }
    }

    /// Whether this boot builds the projector beside its live tables.
    fn builds_beside(&self) -> bool {
        self.action == Action::Rebuild
            && !self.shared.opts.in_place
            && crate::engine::rebuild::beside(self.p)
    }

    async fn run(self) -> Result<TaskEnd> {
        let ctx = self.ctx;
        let name = &self.p.name;
        let build = self.builds_beside();
        let mut client = ctx.connect("boot", Session::Holder).await?;
        // A build leaves the live version to play: it locks only the build.
        let key = if build {
            LockKey::Build(name)
        } else {
            LockKey::Projector(name)
        };
        ctx.locks
            .lock(&ctx.database, &client, key, self.shared.opts.lock_timeout)
            .await?;
        if self.shared.abort.is_cancelled() {
            return self.stall_before_start(&client, build).await;
        }
        let (record, start) = if build {
            let (id, start) = crate::engine::rebuild::start_build(
                ctx,
                &self.shared.shape,
                &mut client,
                self.p,
                self.shared.opts.writer_wait,
            )
            .await?;
            crate::engine::rebuild::enter_build_schema(ctx, &client).await?;
            (Record::Build(id), start)
        } else {
            (Record::Live, self.prepare(&mut client).await?)
        };
        let mut progress = Playing {
            part: None,
            stop: self.shared.abort.clone(),
            pos: start,
            events: 0,
            held_since: None,
            last_hold_note: Instant::now(),
            held_back: None,
        };
        self.publish(&progress, start);
        let end = if self.p.partitions > 1 {
            self.play_parts(&client, record, &mut progress).await?
        } else {
            self.play_to_head(&mut client, record, &mut progress)
                .await?
        };
        let events = progress.events;
        match end {
            Ended::Broken(kept, failure) => {
                self.bar.finish(if build {
                    "broken (the build)"
                } else {
                    "broken"
                });
                Ok(TaskEnd::Broken(
                    self.outcome(State::Broken, kept, events),
                    *failure,
                ))
            }
            Ended::State(state) => {
                // A build at the head waits to be swapped in.
                let state = match state {
                    State::Live | State::Finished if build => State::Built,
                    other => other,
                };
                let subject = Subject {
                    name,
                    version: self.p.version,
                    record,
                    partition: None,
                };
                ctx.ledger.set_state(&client, &subject, state).await?;
                ctx.locks.unlock(&client, key).await.ok();
                let position = *self.shared.positions[name].borrow();
                let mut outcome = self.outcome(state, position.0, events);
                outcome.held_back = progress.held_back;
                self.bar.finish(state.as_str());
                Ok(match state {
                    State::Stalled => TaskEnd::Stalled(outcome),
                    _ => TaskEnd::Done(outcome),
                })
            }
        }
    }

    /// Another projector broke before this one started: it is stalled where
    /// it is (a build's live version is left as it is).
    async fn stall_before_start(&self, client: &Client, build: bool) -> Result<TaskEnd> {
        let ctx = self.ctx;
        let name = &self.p.name;
        let mut position = self.row.as_ref().map(|r| r.position).unwrap_or_default();
        if build {
            self.bar.finish("stalled");
            let mut outcome = self.outcome(State::Stalled, position, 0);
            outcome.held_back = Some(format!(
                "the build of `{name}` did not start: its live version stays"
            ));
            return Ok(TaskEnd::Stalled(outcome));
        }
        if self.row.is_none() {
            let (start, time) = crate::engine::start::start_position(
                &self.shared.shape,
                client,
                self.p,
                self.shared.opts.writer_wait,
            )
            .await?;
            ctx.ledger.start(client, self.p, start, time).await?;
            position = start;
        }
        let subject = Subject {
            name,
            version: self.p.version,
            record: Record::Live,
            partition: None,
        };
        ctx.ledger
            .set_state(client, &subject, State::Stalled)
            .await?;
        self.bar.finish("stalled");
        Ok(TaskEnd::Stalled(self.outcome(State::Stalled, position, 0)))
    }

    /// Puts the ledger row where this boot starts: resumed, rebuilt or new.
    async fn prepare(&self, client: &mut Client) -> Result<Position> {
        let ctx = self.ctx;
        let opts = &self.shared.opts;
        match (self.action, &self.row) {
            (Action::Resume, Some(r)) => {
                ctx.ledger.resume(client, self.p).await?;
                Ok(r.position)
            }
            (Action::Rebuild, _) => {
                crate::engine::start::rebuild_in_place(
                    ctx,
                    &self.shared.shape,
                    client,
                    self.p,
                    opts.writer_wait,
                )
                .await
            }
            _ => {
                let (start, time) = crate::engine::start::start_position(
                    &self.shared.shape,
                    client,
                    self.p,
                    opts.writer_wait,
                )
                .await?;
                ctx.ledger.start(client, self.p, start, time).await?;
                Ok(start)
            }
        }
    }

    /// Plays batches until the head (or what holds it back), a failure, or an abort.
    async fn play_to_head(
        &self,
        client: &mut Client,
        record: Record,
        progress: &mut Playing,
    ) -> Result<Ended> {
        let ctx = self.ctx;
        let shared = self.shared;
        let partition = progress.part.as_ref().map(|(p, _)| *p);
        let part_shape = partition.map(|p| shared.shape.partition(p));
        let shape = part_shape.as_ref().unwrap_or(&shared.shape);
        let mut runner = Runner::new(
            shape,
            self.p,
            shared.opts.run,
            &ctx.database,
            ctx.manifest.dir(),
            &*client,
        )
        .await?;
        let player = Player {
            ctx,
            shape,
            projector: self.p,
            run: shared.opts.run,
            state: State::Booting,
            lock_each_batch: false,
            record,
            partition,
        };
        let mut reader = Reader::knowing_holes(ctx.ledger.known_holes_sql());
        let mut target = Target::default();
        let end = loop {
            if progress.stop.is_cancelled() {
                break Ended::State(State::Stalled);
            }
            target
                .refresh(shape, &*client, progress.pos, self.bar)
                .await?;
            let (bound, waiting_on) = self.dependency_bound(client).await?;
            let plan = reader
                .plan(shape, &*client, progress.pos, bound, shared.opts.batch_size)
                .await?;
            let ended = match plan {
                Plan::Batch { end, holes } => {
                    progress.held_since = None;
                    let range = Range {
                        from: progress.pos,
                        to: end,
                        holes,
                    };
                    let batch = player
                        .batch_retrying(client, &mut runner, range, OnFailure::Break, 5)
                        .await?;
                    self.after_batch(batch, end, progress)?
                }
                Plan::CaughtUp => match waiting_on {
                    Some(dep) => {
                        self.wait_for(&dep, client).await?;
                        None
                    }
                    None => Some(Ended::State(self.done_state())),
                },
                Plan::Held { visible, by } => self.held(progress, visible, &by).await,
            };
            if let Some(ended) = ended {
                break ended;
            }
        };
        runner.finish().await;
        Ok(end)
    }

    /// Takes a batch's outcome; `Some` when the projector broke.
    fn after_batch(
        &self,
        batch: Batch,
        end: Position,
        progress: &mut Playing,
    ) -> Result<Option<Ended>> {
        match batch {
            Batch::Done { handled } => {
                progress.events += handled;
                progress.pos = end;
                self.publish(progress, end);
                Ok(None)
            }
            Batch::Failed {
                kept,
                handled,
                failure,
            } => {
                progress.events += handled;
                progress.pos = kept;
                self.publish(progress, kept);
                Ok(Some(Ended::Broken(kept, failure)))
            }
            Batch::Locked => anyhow::bail!(
                "projector `{}` was locked by another run although this boot holds its lock",
                self.p.name
            ),
            Batch::Stale(why) => {
                anyhow::bail!("projector `{}` changed under this boot: {why}", self.p.name)
            }
        }
    }

    /// Caught up with a projector of this boot that is still playing: waits
    /// for it to move (heartbeating this session meanwhile).
    async fn wait_for(&self, dep: &str, client: &Client) -> Result<()> {
        let mut rx = self.shared.positions[dep].subscribe();
        let database = &self.ctx.database;
        tokio::select! {
            _ = rx.changed() => {}
            _ = self.shared.abort.cancelled() => {}
            _ = tokio::time::sleep(database.liveness().heartbeat()) => database.heartbeat(client).await?,
        }
        Ok(())
    }

    /// Committed events are held back by running transactions: waits up to
    /// `--writer-wait`, then ends (a once projector stays booting: it must not
    /// finish short of the head).
    async fn held(
        &self,
        progress: &mut Playing,
        visible: Position,
        by: &[crate::store::Holder],
    ) -> Option<Ended> {
        let since = *progress.held_since.get_or_insert_with(Instant::now);
        let holders = by
            .iter()
            .map(|h| h.to_string())
            .collect::<Vec<_>>()
            .join("; ");
        let pos = progress.pos;
        if since.elapsed() < self.shared.opts.writer_wait {
            if progress.last_hold_note.elapsed() >= Duration::from_secs(10) {
                tracing::warn!(
                    "projector `{}` waits at {pos}: events up to {visible} are committed behind running transactions ({holders})",
                    self.p.name
                );
                progress.last_hold_note = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            return None;
        }
        let once = self.p.mode == Mode::Once;
        let note = format!(
            "projector `{}` stopped at {pos}: running transactions ({holders}) still hold committed events from {visible} on back; {}",
            self.p.name,
            if once {
                "it stays booting and the next boot finishes it"
            } else {
                "play will project them"
            }
        );
        tracing::warn!("{note}");
        progress.held_back = Some(note);
        Some(Ended::State(if once {
            State::Booting
        } else {
            State::Live
        }))
    }

    fn done_state(&self) -> State {
        if self.p.mode == Mode::Once {
            State::Finished
        } else {
            State::Live
        }
    }

    /// The bound `after` puts on this projector, and the dependency of this
    /// boot it would have to wait for to go further.
    async fn dependency_bound(
        &self,
        client: &Client,
    ) -> Result<(Option<Position>, Option<String>)> {
        let mut bound: Option<Position> = None;
        let mut waiting = None;
        for dep in &self.p.after {
            let (dep_pos, playing) = match self.shared.positions.get(dep) {
                Some(tx) => {
                    let (pos, done) = *tx.borrow();
                    (pos, !done)
                }
                None => match self.ctx.ledger.row(client, dep).await? {
                    Some(r) => (r.position, false),
                    None => (Position::START, false),
                },
            };
            if bound.is_none_or(|b| dep_pos < b) {
                bound = Some(dep_pos);
                waiting = playing.then(|| dep.clone());
            }
        }
        Ok((bound, waiting))
    }

    /// Publishes where the projector stands (for `after` and the bar): the
    /// position of the run, or the lowest of its parts.
    fn publish(&self, progress: &Playing, pos: Position) {
        let pos = match &progress.part {
            None => pos,
            Some((part, all)) => {
                let mut all = all.lock().unwrap_or_else(|e| e.into_inner());
                all[part.index as usize] = pos;
                all.iter().copied().min().unwrap_or(pos)
            }
        };
        if let Some(tx) = self.shared.positions.get(&self.p.name) {
            tx.send_modify(|v| v.0 = pos);
        }
        self.bar.set_position(pos.id);
    }

    /// Plays the parts of a partitioned projector to the head side by side,
    /// each on its own connection. The projector's own turn under `--jobs`
    /// plays parts one after the other until none is left; more turns, as
    /// they come free, play the others meanwhile. (Waiting for them first
    /// could wait forever: a projector `after` this one may hold the last.)
    /// The first part that breaks stops the others.
    async fn play_parts(
        &self,
        client: &Client,
        record: Record,
        progress: &mut Playing,
    ) -> Result<Ended> {
        let parts = self.ctx.ledger.parts(client, &self.p.name, record).await?;
        if parts.len() != self.p.partitions as usize {
            anyhow::bail!(
                "projector `{}` has {} partition rows in the ledger for {} partitions: was the ledger altered by hand? \
                 `projectionist reset {}` rebuilds it",
                self.p.name,
                parts.len(),
                self.p.partitions,
                self.p.name
            );
        }
        let all = Arc::new(std::sync::Mutex::new(
            parts.iter().map(|r| r.position).collect::<Vec<_>>(),
        ));
        let queue =
            std::sync::Mutex::new(parts.into_iter().collect::<std::collections::VecDeque<_>>());
        let drained = CancellationToken::new();
        let stop = progress.stop.child_token();
        let workers = (0..self.p.partitions).map(|w| {
            let (queue, drained, stop, all) = (&queue, &drained, &stop, &all);
            async move {
                // The first worker has the projector's turn; the others wait for one.
                let _turn = if w == 0 {
                    None
                } else {
                    tokio::select! {
                        turn = self.shared.permits.clone().acquire_owned() => turn.ok(),
                        _ = drained.cancelled() => return Ok::<_, anyhow::Error>(Vec::new()),
                    }
                };
                let mut ends = Vec::new();
                loop {
                    let next = {
                        let mut queue = queue.lock().unwrap_or_else(|e| e.into_inner());
                        let next = queue.pop_front();
                        if queue.is_empty() {
                            // Every part is taken: workers still waiting for a turn are not needed.
                            drained.cancel();
                        }
                        next
                    };
                    let Some(row) = next else {
                        return Ok(ends);
                    };
                    let mut own = Playing {
                        part: Some((row.part(), all.clone())),
                        stop: stop.clone(),
                        pos: row.position,
                        events: 0,
                        held_since: None,
                        last_hold_note: Instant::now(),
                        held_back: None,
                    };
                    let mut part_client = self.ctx.connect("boot", Session::Holder).await?;
                    if let Record::Build(_) = record {
                        crate::engine::rebuild::enter_build_schema(self.ctx, &part_client).await?;
                    }
                    let end = self.play_to_head(&mut part_client, record, &mut own).await;
                    if matches!(end, Err(_) | Ok(Ended::Broken(..))) {
                        stop.cancel();
                    }
                    ends.push((end?, own));
                }
            }
        });
        // The projector's own session holds its lock meanwhile.
        let done = heartbeating(self.ctx, client, futures_util::future::join_all(workers)).await?;
        let mut combined: Option<Ended> = None;
        for worker in done {
            for (end, own) in worker? {
                progress.events += own.events;
                if progress.held_back.is_none() {
                    progress.held_back = own.held_back;
                }
                combined = Some(match (combined, end) {
                    (Some(Ended::Broken(k, f)), _) | (_, Ended::Broken(k, f)) => {
                        Ended::Broken(k, f)
                    }
                    (Some(Ended::State(a)), Ended::State(b)) => Ended::State(weaker(a, b)),
                    (None, e) => e,
                });
            }
        }
        progress.pos = all
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .copied()
            .min()
            .unwrap_or(progress.pos);
        combined.ok_or_else(|| anyhow::anyhow!("projector `{}` has no partitions", self.p.name))
    }
}

/// The head a progress bar counts towards, looked up again once reached.
/// The state of a partitioned projector whose parts ended in `a` and `b`:
/// stalled if any stalled, still booting if any is, else the same.
fn weaker(a: State, b: State) -> State {
    let rank = |s: State| match s {
        State::Stalled => 0,
        State::Booting => 1,
        _ => 2,
    };
    if rank(b) < rank(a) { b } else { a }
}

#[derive(Default)]
struct Target {
    head: Option<i64>,
    looked: Option<Instant>,
}

impl Target {
    async fn refresh(
        &mut self,
        shape: &StoreShape,
        client: &Client,
        pos: Position,
        bar: &ProjectorProgress,
    ) -> Result<()> {
        let stale = self
            .looked
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(2));
        if self.head.is_some_and(|h| h > pos.id) && !stale {
            return Ok(());
        }
        let head = shape
            .visible_head(client)
            .await?
            .map(|(p, _)| p.id)
            .unwrap_or(0);
        self.head = Some(head);
        self.looked = Some(Instant::now());
        bar.set_target(head.max(pos.id));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn manifest(projectors: &str) -> Manifest {
        Manifest::parse(
            Path::new("projectors.toml"),
            format!(
                "[store]\ntable = \"events\"\nposition = \"id\"\ntype = \"name\"\ndata = \"data\"\n{projectors}"
            ),
        )
        .unwrap()
    }

    fn row(name: &str, state: State, version: i32) -> LedgerRow {
        LedgerRow::sample(name, state, version, 10)
    }

    fn rows(list: Vec<LedgerRow>) -> HashMap<String, LedgerRow> {
        list.into_iter().map(|r| (r.name.clone(), r)).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn turns_are_taken_in_plan_order_whichever_task_starts_first() {
        // One permit; the task planned first starts late. The one planned
        // after it must not take the permit first (it would wait for the
        // first one forever while holding it).
        let permits = Arc::new(Semaphore::new(1));
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (ready, first_before) = oneshot::channel();
        ready.send(()).unwrap();
        let (first_taken, second_before) = oneshot::channel();
        let late = {
            let (permits, order) = (permits.clone(), order.clone());
            tokio::spawn(async move {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                let permit = ordered_permit(&permits, first_before, || {}).await;
                let _ = first_taken.send(());
                order.lock().unwrap().push("first");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                drop(permit);
            })
        };
        let waited = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let early = {
            let (permits, order, waited) = (permits.clone(), order.clone(), waited.clone());
            tokio::spawn(async move {
                let _permit = ordered_permit(&permits, second_before, || {
                    waited.store(true, std::sync::atomic::Ordering::SeqCst)
                })
                .await;
                order.lock().unwrap().push("second");
            })
        };
        late.await.unwrap();
        early.await.unwrap();
        assert_eq!(*order.lock().unwrap(), ["first", "second"]);
        assert!(waited.load(std::sync::atomic::Ordering::SeqCst));
    }

    #[test]
    fn selects_new_interrupted_broken_stalled_and_bumped_versions_in_dependency_order() {
        let m = manifest(
            "[projectors.z]\nafter = [\"a\"]\non.A = \"SELECT 1\"\n\
             [projectors.a]\non.A = \"SELECT 1\"\n\
             [projectors.live]\non.A = \"SELECT 1\"\n\
             [projectors.broken]\non.A = \"SELECT 1\"\n\
             [projectors.bumped]\nversion = 2\non.A = \"SELECT 1\"\n",
        );
        let plan = select(
            &m,
            &BootOptions::default(),
            &rows(vec![
                row("live", State::Live, 1),
                row("broken", State::Broken, 1),
                row("bumped", State::Live, 1),
            ]),
        )
        .unwrap();
        let got: Vec<(&str, Action)> = plan
            .iter()
            .map(|s| (s.projector.name.as_str(), s.action))
            .collect();
        assert_eq!(
            got,
            vec![
                ("a", Action::New),
                ("broken", Action::Resume),
                ("bumped", Action::Rebuild),
                ("z", Action::New),
            ]
        );
    }

    #[test]
    fn names_limit_the_selection_and_retired_projectors_are_refused() {
        let m =
            manifest("[projectors.a]\non.A = \"SELECT 1\"\n[projectors.b]\non.A = \"SELECT 1\"\n");
        let only_b = BootOptions {
            names: vec!["b".into()],
            ..Default::default()
        };
        let plan = select(&m, &only_b, &HashMap::new()).unwrap();
        assert_eq!(plan.len(), 1);
        assert_eq!(plan[0].projector.name, "b");
        let err = select(
            &m,
            &BootOptions::default(),
            &rows(vec![row("a", State::Retired, 1)]),
        )
        .unwrap_err();
        assert_eq!(
            crate::error::exit_status(&err),
            crate::error::ExitStatus::Usage
        );
        assert!(err.to_string().contains("--allow-side-effects"));
    }
}
