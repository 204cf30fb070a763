//! `play`: the live runner. Keeps every `live` projector up to date until
//! SIGINT/SIGTERM, waking on LISTEN/NOTIFY when the store notifies and
//! polling otherwise.
//!
//! Ownership: each projector is played by one runner at a time, across
//! processes and machines. A runner owns a projector by holding the session
//! advisory lock [`LockKey::Owner`] on that projector's own connection; when
//! the runner dies its connection closes (or the server drops the silent
//! session within the liveness budget), the lock goes, and another runner's
//! next poll takes the projector over. Each batch also takes the transaction
//! lock [`LockKey::Projector`], which boot and reset hold while they work on
//! it, and checks the ledger row is still the version it plays.
//!
//! Isolation and faults: a projector's failure is handled by its `on_error`
//! policy and never stops the others. Transient database errors are retried
//! with backoff, never recorded as failures; a lost or silent database is
//! not a failure either: play waits for it, reconnects and takes the
//! projectors again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use tokio::sync::watch;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::db::Session;
use crate::engine::Context;
use crate::engine::batch::{Batch, OnFailure, Player, Range};
use crate::error::{Trouble, trouble};
use crate::failure::HandlerFailure;
use crate::handlers::Runner;
use crate::ledger::{LockKey, Record, Run, State};
use crate::manifest::{OnError, Projector};
use crate::report::metrics::Metrics;
use crate::store::{Partition, Plan, Position, Reader, StoreShape};

#[derive(Clone, Debug)]
pub struct PlayOptions {
    /// How often to look for new events without a notification, and for
    /// projectors to take over.
    pub poll: Duration,
    pub batch_size: i64,
}

impl Default for PlayOptions {
    fn default() -> Self {
        PlayOptions {
            poll: Duration::from_secs(1),
            batch_size: 10_000,
        }
    }
}

/// How often play looks for late events.
const LATE_EVERY: Duration = Duration::from_secs(30);
/// The longest play waits between two attempts to reach the database.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Plays until `shutdown` is cancelled; then finishes the batches in flight
/// and returns.
pub async fn play(
    ctx: &Context,
    opts: PlayOptions,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<()> {
    let Some((control, shape)) = start(ctx, &metrics, &shutdown).await? else {
        return Ok(());
    };
    let shape = Arc::new(shape);
    // Wake-ups: a counter bumped by every notification (and by nothing else).
    let (wake_tx, wake_rx) = watch::channel(0u64);
    let listener = ctx
        .manifest
        .store
        .notify
        .as_ref()
        .map(|channel| listen(ctx, channel, wake_tx));
    tracing::info!(
        "playing live projectors ({}), polling every {}",
        match &ctx.manifest.store.notify {
            Some(c) => format!("woken by NOTIFY on `{c}`"),
            None => "no notify channel".into(),
        },
        humantime::format_duration(opts.poll)
    );
    let mut supervisor = Supervisor {
        ctx,
        opts: &opts,
        shape,
        metrics: metrics.clone(),
        wake: wake_rx,
        shutdown: shutdown.clone(),
        workers: HashMap::new(),
        sharing: Default::default(),
        warned: HashMap::new(),
        late_checked: None,
    };
    let mut control = Some(control);
    metrics.set_up(true);
    while !shutdown.is_cancelled() {
        let Some(client) = supervisor.reconnect(control.take()).await else {
            break;
        };
        control = supervisor.tick(client).await?;
        // Supervision runs every poll; new events wake the workers, not this loop.
        tokio::select! {
            _ = tokio::time::sleep(opts.poll) => {}
            _ = shutdown.cancelled() => {}
        }
    }
    supervisor.stop().await;
    if let Some(l) = listener {
        l.abort();
    }
    tracing::info!("play stopped");
    Ok(())
}

/// Connects and checks the manifest against the database; a database that
/// cannot be reached yet is waited for (a supervised runner keeps trying,
/// and says so). `None`: shut down while waiting.
async fn start(
    ctx: &Context,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> Result<Option<(Client, StoreShape)>> {
    let mut backoff = Duration::from_secs(1);
    loop {
        let attempt = async {
            let mut control = ctx.connect("play", Session::Reader).await?;
            let checks = async {
                ctx.ledger.ensure_exists(&control).await?;
                crate::engine::validate::validate(&ctx.manifest, &mut control).await
            };
            let shape = ctx.database.within(checks).await??;
            Ok::<_, anyhow::Error>((control, shape))
        };
        let attempt = tokio::select! {
            attempt = attempt => attempt,
            _ = shutdown.cancelled() => return Ok(None),
        };
        match attempt {
            Ok(started) => return Ok(Some(started)),
            Err(e) if trouble(&e) == Trouble::Connection => {
                metrics.set_up(false);
                tracing::warn!(
                    "cannot reach the database yet, trying again in {}: {}",
                    humantime::format_duration(backoff),
                    crate::error::one_line(&e)
                );
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.cancelled() => return Ok(None),
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            Err(e) => return Err(e),
        }
    }
}

/// A worker of this runner: its task, and the token that asks it alone to
/// leave (its projector's part goes to another runner).
struct Running {
    handle: tokio::task::JoinHandle<()>,
    leave: CancellationToken,
}

/// The control loop's state: the runners of the projectors this process owns.
struct Supervisor<'a> {
    ctx: &'a Context,
    opts: &'a PlayOptions,
    shape: Arc<StoreShape>,
    metrics: Arc<Metrics>,
    wake: watch::Receiver<u64>,
    shutdown: CancellationToken,
    workers: HashMap<String, Running>,
    /// The partitioned projectors whose sharing lock this runner holds on
    /// its control connection.
    sharing: std::collections::HashSet<String>,
    /// The last warning given per projector (said once).
    warned: HashMap<String, String>,
    late_checked: Option<Instant>,
}

impl Supervisor<'_> {
    /// The control connection: `client` if it is still open, else a new one,
    /// waiting with backoff for a database that cannot be reached (`None`:
    /// shut down while waiting).
    async fn reconnect(&mut self, client: Option<Client>) -> Option<Client> {
        if let Some(c) = client.filter(|c| !c.is_closed()) {
            return Some(c);
        }
        // A new session holds none of the old one's locks.
        self.sharing.clear();
        self.connect_control().await
    }

    /// A new control connection, waiting with backoff (`None`: shut down).
    async fn connect_control(&mut self) -> Option<Client> {
        let mut backoff = Duration::from_millis(500);
        loop {
            let connected = tokio::select! {
                c = self.ctx.connect("play", Session::Reader) => c,
                _ = self.shutdown.cancelled() => return None,
            };
            match connected {
                Ok(c) => return Some(c),
                Err(e) => {
                    tracing::warn!(
                        "cannot reach the database, trying again in {}: {}",
                        humantime::format_duration(backoff),
                        crate::error::one_line(&e)
                    );
                    self.metrics.set_up(false);
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = self.shutdown.cancelled() => return None,
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// One supervision pass on `client`, bounded by the liveness budget;
    /// returns the connection to use next (`None`: reconnect).
    async fn tick(&mut self, client: Client) -> Result<Option<Client>> {
        self.metrics.set_up(true);
        let pass = self.ctx.database.within(self.pass(&client)).await;
        let next = match pass.and_then(|r| r) {
            Ok(()) => Some(client),
            Err(e) if trouble(&e) == Trouble::Connection => {
                // Silent or gone: whatever the runners hold may be gone too.
                tracing::warn!(
                    "{}; reconnecting and taking the projectors again",
                    crate::error::one_line(&e)
                );
                self.metrics.set_up(false);
                self.abort_workers();
                None
            }
            // The ledger or the store no longer fits (altered by hand): nothing to play safely.
            Err(e) if crate::error::exit_status(&e) == crate::error::ExitStatus::Usage => {
                self.abort_workers();
                return Err(e);
            }
            Err(e) => {
                tracing::warn!("play: {}", crate::error::render(&e));
                Some(client)
            }
        };
        self.metrics.set_owned(self.workers.len());
        Ok(next)
    }

    /// Shutdown: the workers finish their batch in flight and release their
    /// projectors; a batch that does not finish within the session timeout (a
    /// frozen network) is given up: the server rolls it back.
    async fn stop(&mut self) {
        let limit = self.ctx.database.liveness().session;
        for (name, Running { mut handle, .. }) in self.workers.drain() {
            if tokio::time::timeout(limit, &mut handle).await.is_err() {
                handle.abort();
                tracing::warn!(
                    "projector `{name}`: its batch in flight did not finish within {}; given up (the server rolls it back)",
                    humantime::format_duration(limit)
                );
            }
        }
    }

    /// One pass: the ledger read again (projectors booted by a later deploy
    /// are picked up), orphans noted, metrics updated, late events looked
    /// for now and then, free live projectors taken.
    async fn pass(&mut self, client: &Client) -> Result<()> {
        let ctx = self.ctx;
        self.workers.retain(|_, w| !w.handle.is_finished());
        let rows = ctx.ledger.rows(client).await?;
        ctx.ledger
            .note_missing(client, &ctx.manifest.names())
            .await?;
        let head = self.shape.visible_head(client).await?;
        let head_id = head.as_ref().map(|h| h.0.id).unwrap_or(0);
        self.metrics.observe(&rows, head_id, head.and_then(|h| h.1));
        let dead_letters = ctx.ledger.dead_letters_waiting(client).await?;
        let holes = ctx.ledger.holes_passed(client).await?;
        let versions = ctx.ledger.versions(client).await?;
        self.metrics
            .ledger_counts(&rows, &dead_letters, &holes, &versions, head_id);
        if self.late_checked.is_none_or(|t| t.elapsed() >= LATE_EVERY) {
            self.late_checked = Some(Instant::now());
            let late =
                crate::engine::late::report(ctx, &self.shape, client, Run::Play, &[]).await?;
            self.metrics.late_events(&rows, &late);
        }
        for p in &ctx.manifest.projectors {
            let Some(row) = rows.iter().find(|r| r.name == p.name) else {
                continue;
            };
            // The ledger and this manifest disagree: a deploy happened since play started.
            let mismatch = if row.version != p.version {
                Some(format!(
                    "version {} in the ledger, {} in the manifest: play leaves it alone; run `projectionist boot`, then restart play with the manifest that booted it",
                    row.version, p.version
                ))
            } else if row.partitions != p.partitions {
                Some(format!(
                    "{} partition(s) in the ledger, {} in the manifest: play leaves it alone; run `projectionist boot` (it rebuilds it), then restart play",
                    row.partitions, p.partitions
                ))
            } else if row.mode != p.mode {
                Some(format!(
                    "mode {} in the ledger, {} in the manifest: restart play with the manifest that booted it",
                    row.mode.as_str(),
                    p.mode.as_str()
                ))
            } else {
                None
            };
            let playable = mismatch.is_none() && row.state == State::Live;
            if p.partitions > 1 {
                self.share(client, p, playable).await?;
            }
            if let Some(m) = mismatch {
                if self.warned.get(&p.name) != Some(&m) {
                    tracing::warn!("projector `{}`: {m}", p.name);
                    self.warned.insert(p.name.clone(), m);
                }
                continue;
            }
            if !playable {
                continue;
            }
            if p.partitions <= 1 {
                self.take(client, p, None, row.position).await?;
                continue;
            }
            let runners = ctx.locks.holders(client, sharing_key(p)).await?.max(1);
            // Each runner plays its share of the parts: it takes free ones up
            // to its share, and gives one up per pass while it holds more
            // (another runner came).
            let share = (p.partitions as usize).div_ceil(runners);
            let mine: Vec<Partition> = Partition::all(p.partitions)
                .into_iter()
                .filter(|part| self.workers.contains_key(&worker_key(&p.name, Some(*part))))
                .collect();
            if mine.len() > share {
                if let Some(part) = mine.last()
                    && let Some(w) = self.workers.get(&worker_key(&p.name, Some(*part)))
                    && !w.leave.is_cancelled()
                {
                    tracing::info!(
                        "leaving {part} of projector `{}` to another runner ({runners} runners share its parts)",
                        p.name
                    );
                    w.leave.cancel();
                }
                continue;
            }
            let mut held = mine.len();
            for part in Partition::all(p.partitions) {
                if held >= share {
                    break;
                }
                if self.take(client, p, Some(part), row.position).await? {
                    held += 1;
                }
            }
        }
        Ok(())
    }

    /// Counts this runner among those that share the parts of `p` while it
    /// can play it (its manifest has the ledger's version and partitions),
    /// and no longer once it cannot: a runner left over from an older deploy
    /// must not hold a share it will never play.
    async fn share(&mut self, client: &Client, p: &Projector, playable: bool) -> Result<()> {
        let held = self.sharing.contains(&p.name);
        let key = sharing_key(p);
        if playable && !held {
            self.ctx.locks.try_lock_shared(client, key).await?;
            self.sharing.insert(p.name.clone());
        } else if !playable && held {
            self.ctx.locks.unlock_shared(client, key).await?;
            self.sharing.remove(&p.name);
        }
        Ok(())
    }

    /// Takes a live projector (or one part of it) unless a runner plays it;
    /// whether this runner took it now.
    async fn take(
        &mut self,
        client: &Client,
        p: &Projector,
        part: Option<Partition>,
        position: Position,
    ) -> Result<bool> {
        let ctx = self.ctx;
        let key = worker_key(&p.name, part);
        if self.workers.contains_key(&key) {
            return Ok(false);
        }
        let owner = match part {
            None => LockKey::Owner(&p.name),
            Some(part) => LockKey::PartOwner(&p.name, part.index),
        };
        if ctx.locks.holder(client, owner).await?.is_some() {
            return Ok(false); // Another runner owns it.
        }
        let worker_client = ctx.connect("play", Session::Holder).await?;
        if !ctx.locks.try_lock(&worker_client, owner).await? {
            return Ok(false);
        }
        match part {
            None => tracing::info!("playing projector `{}` from position {position}", p.name),
            Some(part) => tracing::info!("playing {part} of projector `{}`", p.name),
        }
        // Stops with play, or alone when the part goes to another runner.
        let leave = self.shutdown.child_token();
        let worker = Worker {
            ctx: ctx.clone(),
            projector: p.clone(),
            partition: part,
            shape: match part {
                None => self.shape.clone(),
                Some(part) => Arc::new(self.shape.partition(part)),
            },
            opts: self.opts.clone(),
            metrics: self.metrics.clone(),
            wake: self.wake.clone(),
            shutdown: leave.clone(),
        };
        let handle = tokio::spawn(async move {
            match worker.run(worker_client).await {
                Ok(()) => {}
                // A restart or a lost network ends every runner's session at
                // once; the main loop reconnects and takes them again.
                Err(e) if crate::error::trouble(&e) == crate::error::Trouble::Connection => {
                    tracing::warn!(
                        "projector `{key}`: lost the database ({}); it is taken again once the database answers",
                        crate::error::one_line(&e)
                    );
                }
                Err(e) => tracing::warn!(
                    "projector `{key}`: this runner stopped playing it: {}; it is taken again at the next poll",
                    crate::error::render(&e)
                ),
            }
        });
        self.workers
            .insert(worker_key(&p.name, part), Running { handle, leave });
        Ok(true)
    }

    /// Drops every runner at once (their connections close; the server
    /// releases what they held).
    fn abort_workers(&mut self) {
        for (_, w) in self.workers.drain() {
            w.handle.abort();
        }
    }
}

/// The lock the runners that can play a partitioned projector share.
fn sharing_key(p: &Projector) -> LockKey<'_> {
    LockKey::Sharing(&p.name, p.version, p.partitions)
}

/// The key of a runner: the projector, or `name#k` for its part k.
fn worker_key(name: &str, part: Option<Partition>) -> String {
    match part {
        None => name.to_string(),
        Some(p) => format!("{name}#{}", p.index),
    }
}

/// Listens on the notify channel, bumping `wake` on each notification;
/// reconnects when lost.
fn listen(ctx: &Context, channel: &str, wake: watch::Sender<u64>) -> tokio::task::JoinHandle<()> {
    let ctx = ctx.clone();
    let channel = channel.to_string();
    tokio::spawn(async move {
        let mut first = true;
        loop {
            if !first {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            first = false;
            let Ok((client, mut rx)) = ctx
                .database
                .connect_listening(&crate::engine::application_name("play listen"))
                .await
            else {
                continue;
            };
            let listening = client
                .batch_execute(&format!("LISTEN {}", crate::db::quote_ident(&channel)))
                .await;
            if let Err(e) = listening {
                tracing::warn!("LISTEN on `{channel}`: {e}");
                continue;
            }
            // Events may have come while we were away.
            wake.send_modify(|n| *n += 1);
            while rx.recv().await.is_some() {
                wake.send_modify(|n| *n += 1);
            }
            drop(client);
        }
    })
}

/// Plays one projector this runner owns.
struct Worker {
    ctx: Context,
    projector: Projector,
    /// The part it plays of a partitioned projector; `shape` reads only its events.
    partition: Option<Partition>,
    shape: Arc<StoreShape>,
    opts: PlayOptions,
    metrics: Arc<Metrics>,
    wake: watch::Receiver<u64>,
    shutdown: CancellationToken,
}

/// What a worker does after one step.
enum Next {
    Again,
    /// Nothing to do until a notification or the poll.
    Idle,
    /// Held back by something that notifies nobody: look again soon.
    Soon,
    /// Wait before trying again.
    Wait(Duration),
    /// The projector is not this runner's to play any more.
    Leave,
}

impl Worker {
    async fn run(mut self, mut client: Client) -> Result<()> {
        let name = self.projector.name.clone();
        let mut runner = Runner::new(
            &self.shape,
            &self.projector,
            Run::Play,
            &self.ctx.database,
            self.ctx.manifest.dir(),
            &client,
        )
        .await?;
        let mut reader = Reader::knowing_holes(self.ctx.ledger.known_holes_sql());
        let mut retries = 0u32;
        let mut transient = Duration::from_millis(500);
        let result = loop {
            if self.shutdown.is_cancelled() {
                break Ok(());
            }
            let next = match self
                .step(&mut client, &mut runner, &mut reader, &mut retries)
                .await
            {
                Ok(next) => {
                    transient = Duration::from_millis(500);
                    next
                }
                Err(e) if trouble(&e) == Trouble::Transient => {
                    tracing::warn!(
                        "projector `{name}`: {}; trying again in {} (not a handler failure)",
                        crate::error::one_line(&e),
                        humantime::format_duration(transient)
                    );
                    let wait = transient;
                    transient = (transient * 2).min(MAX_BACKOFF);
                    Next::Wait(wait)
                }
                Err(e) => break Err(e),
            };
            let waited = match next {
                Next::Again => Ok(()),
                Next::Idle => {
                    self.idle().await;
                    Ok(())
                }
                Next::Soon => {
                    let soon = self.opts.poll.min(Duration::from_millis(100));
                    self.pause(&client, soon).await
                }
                Next::Wait(d) => self.pause(&client, d).await,
                Next::Leave => break Ok(()),
            };
            if let Err(e) = waited {
                break Err(e);
            }
        };
        runner.finish().await;
        let owner = match self.partition {
            None => LockKey::Owner(&name),
            Some(part) => LockKey::PartOwner(&name, part.index),
        };
        let _ = self.ctx.locks.unlock(&client, owner).await;
        result
    }

    /// Reads where the projector stands, and plays its next batch if any.
    async fn step(
        &mut self,
        client: &mut Client,
        runner: &mut Runner,
        reader: &mut Reader,
        retries: &mut u32,
    ) -> Result<Next> {
        let ctx = &self.ctx;
        let name = &self.projector.name;
        // The ledger is the truth: a reset or a rebuild may have moved the position.
        let Some(row) = ctx
            .database
            .within(ctx.ledger.row(&*client, name))
            .await??
        else {
            return Ok(Next::Leave);
        };
        if row.state != State::Live {
            tracing::info!(
                "projector `{name}` is {} now: play leaves it",
                row.state.as_str()
            );
            return Ok(Next::Leave);
        }
        if row.version != self.projector.version {
            tracing::warn!(
                "projector `{name}` is at version {} now and this runner plays version {}: it leaves the projector alone (restart play with the new manifest)",
                row.version,
                self.projector.version
            );
            return Ok(Next::Leave);
        }
        if row.partitions != self.projector.partitions {
            tracing::warn!(
                "projector `{name}` has {} partition(s) now and this runner plays {}: it leaves the projector alone (restart play with the new manifest)",
                row.partitions,
                self.projector.partitions
            );
            return Ok(Next::Leave);
        }
        let pos = match self.partition {
            None => row.position,
            Some(part) => {
                let own = ctx
                    .database
                    .within(ctx.ledger.part(&*client, name, part))
                    .await??;
                let Some(own) = own else {
                    return Ok(Next::Leave);
                };
                own.position
            }
        };
        let bound = ctx.database.within(self.after_bound(client)).await??;
        let plan = ctx
            .database
            .within(reader.plan(&self.shape, &*client, pos, bound, self.opts.batch_size))
            .await??;
        let (end, holes) = match plan {
            Plan::CaughtUp => return Ok(Next::Idle),
            // What releases it notifies nobody: look again soon.
            Plan::Held { .. } => return Ok(Next::Soon),
            Plan::Batch { end, holes } => (end, holes),
        };
        let policy = match self.projector.on_error {
            OnError::Stop => OnFailure::Break,
            OnError::Skip => OnFailure::Skip,
            OnError::Retry if *retries >= self.projector.max_retries => OnFailure::Break,
            OnError::Retry => OnFailure::Retry,
        };
        let player = Player {
            ctx,
            shape: &self.shape,
            projector: &self.projector,
            run: Run::Play,
            state: State::Live,
            lock_each_batch: true,
            record: Record::Live,
            partition: self.partition,
        };
        let range = Range {
            from: pos,
            to: end,
            holes,
        };
        Ok(match player.batch(client, runner, range, policy).await? {
            Batch::Locked => Next::Idle, // A boot or reset holds it.
            Batch::Stale(why) => {
                tracing::warn!("projector `{name}`: {why}; this runner leaves it alone");
                Next::Leave
            }
            Batch::Done { handled } => {
                *retries = 0;
                self.metrics.processed(name, handled);
                Next::Again
            }
            Batch::Failed {
                handled, failure, ..
            } => {
                self.metrics.processed(name, handled);
                self.metrics.failed(name);
                self.after_failure(policy, &failure, retries).await
            }
        })
    }

    async fn after_failure(
        &self,
        policy: OnFailure,
        failure: &HandlerFailure,
        retries: &mut u32,
    ) -> Next {
        let name = &self.projector.name;
        match policy {
            OnFailure::Break => {
                tracing::error!("projector `{name}` broke at event {}", failure.short());
                let doc = crate::engine::alert::projector_broken(
                    &self.ctx,
                    Run::Play,
                    name,
                    failure,
                    None,
                );
                if let Err(e) = crate::engine::alert::send(&self.ctx, &doc).await {
                    tracing::warn!("{e}");
                }
                Next::Leave
            }
            OnFailure::Skip => {
                tracing::warn!(
                    "projector `{name}` skipped event {} (dead letter recorded)",
                    failure.short()
                );
                Next::Again
            }
            OnFailure::Retry => {
                *retries += 1;
                let wait = Duration::from_secs(1u64 << (*retries).min(6));
                tracing::warn!(
                    "projector `{name}` failed at event {}; retry {retries} of {} in {}",
                    failure.short(),
                    self.projector.max_retries,
                    humantime::format_duration(wait)
                );
                Next::Wait(wait)
            }
        }
    }

    /// Waits for a notification, the poll interval, or shutdown; never longer
    /// than a heartbeat (the owner's session must not look dead to the server).
    async fn idle(&mut self) {
        let wait = self.opts.poll.min(self.ctx.database.liveness().heartbeat());
        tokio::select! {
            _ = self.wake.changed() => {}
            _ = tokio::time::sleep(wait) => {}
            _ = self.shutdown.cancelled() => {}
        }
    }

    /// Waits `wait` (or until shutdown), with heartbeats on the owner's session.
    async fn pause(&self, client: &Client, wait: Duration) -> Result<()> {
        let until = Instant::now() + wait;
        let heartbeat = self.ctx.database.liveness().heartbeat();
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            tokio::select! {
                _ = tokio::time::sleep(left.min(heartbeat)) => {}
                _ = self.shutdown.cancelled() => return Ok(()),
            }
            if Instant::now() < until {
                self.ctx.database.heartbeat(client).await?;
            }
        }
    }

    /// Never past what the `after` projectors have committed.
    async fn after_bound(&self, client: &Client) -> Result<Option<Position>> {
        let mut bound: Option<Position> = None;
        for dep in &self.projector.after {
            let dep_pos = self
                .ctx
                .ledger
                .row(client, dep)
                .await
                .context("reading an `after` projector's position")?
                .map(|r| r.position)
                .unwrap_or_default();
            bound = Some(bound.map_or(dep_pos, |b| b.min(dep_pos)));
        }
        Ok(bound)
    }
}
