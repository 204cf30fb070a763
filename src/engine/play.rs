//! `play`: the live runner. Keeps every `live` projector up to date until
//! SIGINT/SIGTERM, waking on LISTEN/NOTIFY when the store notifies and
//! polling otherwise.
//!
//! Ownership: each projector is played by one runner at a time, across
//! processes and machines. A runner owns a projector by holding the session
//! advisory lock `owner:NAME` on that projector's own connection; when the
//! runner dies its connection closes, the lock goes, and another runner's
//! next poll takes the projector over. Each batch also takes the
//! transaction lock `projector:NAME`, which boot and reset hold while they
//! work on it, so play never interleaves with them.
//!
//! Isolation: a projector's failure is handled by its `on_error` policy and
//! never stops the others; a lost connection is not a failure: the worker
//! ends and the next poll reconnects and takes the projector again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use tokio::sync::watch;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::engine::Context;
use crate::engine::batch::{self, Batch, OnFailure, Runner};
use crate::handlers::sql::HandlerFailure;
use crate::ledger::State;
use crate::manifest::{OnError, Projector};
use crate::report::metrics::Metrics;
use crate::store::{HoleTracker, Position, StoreShape};

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

/// Plays until `shutdown` is cancelled; then finishes the batches in flight
/// and returns.
pub async fn play(
    ctx: &Context,
    opts: PlayOptions,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<()> {
    let mut control = ctx.connect("play").await?;
    ctx.ledger.ensure_exists(&control).await?;
    let shape = Arc::new(crate::engine::validate::validate(&ctx.manifest, &mut control).await?);

    // Wake-ups: a counter bumped by every notification (and by nothing else).
    let (wake_tx, wake_rx) = watch::channel(0u64);
    let listener = match &ctx.manifest.store.notify {
        Some(channel) => Some(listen(ctx, channel, wake_tx.clone()).await?),
        None => None,
    };

    let mut workers: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
    let mut warned: HashMap<String, String> = HashMap::new();
    let mut control = Some(control);
    let mut backoff = Duration::from_millis(500);
    tracing::info!(
        "playing live projectors ({}), polling every {}",
        match &ctx.manifest.store.notify {
            Some(c) => format!("woken by NOTIFY on `{c}`"),
            None => "no notify channel".into(),
        },
        humantime::format_duration(opts.poll)
    );
    metrics.set_up(true);
    while !shutdown.is_cancelled() {
        let client = match control.take() {
            Some(c) if !c.is_closed() => c,
            _ => match ctx.connect("play").await {
                Ok(c) => {
                    backoff = Duration::from_millis(500);
                    c
                }
                Err(e) => {
                    tracing::warn!(
                        "lost the database, retrying in {}: {}",
                        humantime::format_duration(backoff),
                        crate::error::render(&e)
                    );
                    metrics.set_up(false);
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.cancelled() => break,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    continue;
                }
            },
        };
        metrics.set_up(true);
        workers.retain(|_, h| !h.is_finished());
        if let Err(e) = supervise(
            ctx,
            &opts,
            &client,
            &shape,
            &metrics,
            &wake_rx,
            &shutdown,
            &mut workers,
            &mut warned,
        )
        .await
        {
            tracing::warn!("play: {}", crate::error::render(&e));
        }
        metrics.set_owned(workers.len());
        control = Some(client);
        // Supervision runs every poll; new events wake the workers, not this loop.
        tokio::select! {
            _ = tokio::time::sleep(opts.poll) => {}
            _ = shutdown.cancelled() => {}
        }
    }
    // Shutdown: the workers finish their batch in flight and release their projectors.
    for (_, handle) in workers {
        let _ = handle.await;
    }
    if let Some(l) = listener {
        l.abort();
    }
    tracing::info!("play stopped");
    Ok(())
}

/// One pass of the control loop: the ledger read again (projectors booted by
/// a later deploy are picked up), orphans noted, free live projectors taken.
#[allow(clippy::too_many_arguments)]
async fn supervise(
    ctx: &Context,
    opts: &PlayOptions,
    client: &Client,
    shape: &Arc<StoreShape>,
    metrics: &Arc<Metrics>,
    wake: &watch::Receiver<u64>,
    shutdown: &CancellationToken,
    workers: &mut HashMap<String, tokio::task::JoinHandle<()>>,
    warned: &mut HashMap<String, String>,
) -> Result<()> {
    let rows = ctx.ledger.rows(client).await?;
    let present: Vec<String> = ctx
        .manifest
        .projectors
        .iter()
        .map(|p| p.name.clone())
        .collect();
    ctx.ledger.note_missing(client, &present).await?;
    let head = shape.visible_head(client).await?;
    metrics.observe(
        &rows,
        head.as_ref().map(|h| h.0.id).unwrap_or(0),
        head.and_then(|h| h.1),
    );

    for p in &ctx.manifest.projectors {
        let Some(row) = rows.iter().find(|r| r.name == p.name) else {
            continue;
        };
        // The ledger and this manifest disagree: a deploy happened since play started.
        let mismatch = if row.version != p.version {
            Some(format!(
                "version {} in the ledger, {} in the manifest: run `projectionist boot`, then restart play",
                row.version, p.version
            ))
        } else if row.mode != p.mode.as_str() {
            Some(format!(
                "mode {} in the ledger, {} in the manifest: restart play with the manifest that booted it",
                row.mode,
                p.mode.as_str()
            ))
        } else {
            None
        };
        if let Some(m) = mismatch {
            if warned.get(&p.name) != Some(&m) {
                tracing::warn!("projector `{}`: {m}", p.name);
                warned.insert(p.name.clone(), m);
            }
            continue;
        }
        if row.state != State::Live || workers.contains_key(&p.name) {
            continue;
        }
        if ctx
            .locks
            .holder(client, &owner_key(&p.name))
            .await?
            .is_some()
        {
            continue; // Another runner owns it.
        }
        let worker_client = ctx.connect("play").await?;
        if !ctx
            .locks
            .try_lock(&worker_client, &owner_key(&p.name))
            .await?
        {
            continue;
        }
        tracing::info!(
            "playing projector `{}` from position {}",
            p.name,
            row.position
        );
        let worker = Worker {
            ctx: ctx.clone(),
            projector: p.clone(),
            shape: shape.clone(),
            opts: opts.clone(),
            metrics: metrics.clone(),
            wake: wake.clone(),
            shutdown: shutdown.clone(),
        };
        workers.insert(
            p.name.clone(),
            tokio::spawn(async move {
                let name = worker.projector.name.clone();
                if let Err(e) = worker.run(worker_client).await {
                    tracing::warn!(
                        "projector `{name}` paused: {}; it is taken again at the next poll",
                        crate::error::render(&e)
                    );
                }
            }),
        );
    }
    Ok(())
}

fn owner_key(name: &str) -> String {
    format!("owner:{name}")
}

/// Listens on the notify channel, bumping `wake` on each notification; reconnects when lost.
async fn listen(
    ctx: &Context,
    channel: &str,
    wake: watch::Sender<u64>,
) -> Result<tokio::task::JoinHandle<()>> {
    let ctx = ctx.clone();
    let channel = channel.to_string();
    // The first connection is made here, so a bad channel fails play at once.
    let (client, rx) = ctx
        .database
        .connect_listening(&crate::engine::application_name("play listen"))
        .await?;
    client
        .batch_execute(&format!("LISTEN {}", crate::db::quote_ident(&channel)))
        .await
        .context("LISTEN on the notify channel")?;
    Ok(tokio::spawn(async move {
        let mut current = Some((client, rx));
        loop {
            let (client, mut rx) = match current.take() {
                Some(c) => c,
                None => {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    match ctx
                        .database
                        .connect_listening(&crate::engine::application_name("play listen"))
                        .await
                    {
                        Ok((c, rx)) => {
                            if c.batch_execute(&format!(
                                "LISTEN {}",
                                crate::db::quote_ident(&channel)
                            ))
                            .await
                            .is_err()
                            {
                                continue;
                            }
                            // Events may have come while we were away.
                            wake.send_modify(|n| *n += 1);
                            (c, rx)
                        }
                        Err(_) => continue,
                    }
                }
            };
            while rx.recv().await.is_some() {
                wake.send_modify(|n| *n += 1);
            }
            drop(client);
        }
    }))
}

struct Worker {
    ctx: Context,
    projector: Projector,
    shape: Arc<StoreShape>,
    opts: PlayOptions,
    metrics: Arc<Metrics>,
    wake: watch::Receiver<u64>,
    shutdown: CancellationToken,
}

impl Worker {
    async fn run(mut self, mut client: Client) -> Result<()> {
        let name = self.projector.name.clone();
        let mut runner =
            Runner::new(&self.ctx, &self.shape, &self.projector, &client, "play").await?;
        let mut holes = HoleTracker::new(self.ctx.ledger.schema());
        let lock = format!("projector:{name}");
        let mut retries = 0u32;
        while !self.shutdown.is_cancelled() {
            // The ledger is the truth: a reset or a rebuild may have moved the position.
            let Some(row) = self.ctx.ledger.row(&client, &name).await? else {
                break;
            };
            if row.state != State::Live {
                tracing::info!(
                    "projector `{name}` is {} now: play leaves it",
                    row.state.as_str()
                );
                break;
            }
            let pos = row.position;
            let head = self.shape.safe_head(&client, pos, &mut holes).await?;
            let bound = self.after_bound(&client, head.position).await?;
            if bound <= pos {
                if bound < head.visible {
                    // Held back (a running transaction, or an `after` projector):
                    // what releases it notifies nobody, so look again soon.
                    tokio::select! {
                        _ = tokio::time::sleep(self.opts.poll.min(Duration::from_millis(100))) => {}
                        _ = self.shutdown.cancelled() => {}
                    }
                } else {
                    self.idle().await;
                }
                continue;
            }
            let end = self
                .shape
                .batch_end(&client, pos, bound, self.opts.batch_size)
                .await?;
            let policy = match self.projector.on_error {
                OnError::Stop => OnFailure::Break,
                OnError::Skip => OnFailure::Skip,
                OnError::Retry if retries >= self.projector.max_retries => OnFailure::Break,
                OnError::Retry => OnFailure::Retry,
            };
            let batch = batch::run(
                &self.ctx,
                &self.shape,
                &mut client,
                &mut runner,
                &name,
                pos,
                end,
                "play",
                policy,
                Some(&lock),
            )
            .await?;
            match batch {
                None => self.idle().await, // A boot or reset holds it.
                Some(Batch::Done { handled }) => {
                    retries = 0;
                    self.metrics.processed(&name, handled);
                }
                Some(Batch::Failed {
                    handled, failure, ..
                }) => {
                    self.metrics.processed(&name, handled);
                    self.metrics.failed(&name);
                    match policy {
                        OnFailure::Break => {
                            tracing::error!(
                                "projector `{name}` broke at event {}",
                                failure.short()
                            );
                            self.alert(&failure).await;
                            break;
                        }
                        OnFailure::Skip => {
                            tracing::warn!(
                                "projector `{name}` skipped event {} (dead letter recorded)",
                                failure.short()
                            );
                        }
                        OnFailure::Retry => {
                            retries += 1;
                            let wait = Duration::from_secs(1u64 << retries.min(6));
                            tracing::warn!(
                                "projector `{name}` failed at event {}; retry {retries} of {} in {}",
                                failure.short(),
                                self.projector.max_retries,
                                humantime::format_duration(wait)
                            );
                            tokio::select! {
                                _ = tokio::time::sleep(wait) => {}
                                _ = self.shutdown.cancelled() => {}
                            }
                        }
                    }
                }
            }
        }
        runner.finish().await;
        let _ = self.ctx.locks.unlock(&client, &owner_key(&name)).await;
        Ok(())
    }

    /// Waits for a notification, the poll interval, or shutdown.
    async fn idle(&mut self) {
        tokio::select! {
            _ = self.wake.changed() => {}
            _ = tokio::time::sleep(self.opts.poll) => {}
            _ = self.shutdown.cancelled() => {}
        }
    }

    /// Never past what the `after` projectors have committed.
    async fn after_bound(&self, client: &Client, head: Position) -> Result<Position> {
        let mut bound = head;
        for dep in &self.projector.after {
            let dep_pos = self
                .ctx
                .ledger
                .row(client, dep)
                .await?
                .map(|r| r.position)
                .unwrap_or_default();
            bound = bound.min(dep_pos);
        }
        Ok(bound)
    }

    async fn alert(&self, failure: &HandlerFailure) {
        let Some(command) = &self.ctx.manifest.alert else {
            return;
        };
        let doc = serde_json::json!({
            "event": "projector_broken",
            "run": "play",
            "projector": self.projector.name,
            "position": failure.position,
            "type": failure.event_type,
            "stream": failure.stream,
            "error": failure.message,
            "detail": failure.detail,
            "hint": failure.hint,
            "sqlstate": failure.sqlstate,
            "database": self.ctx.database.target(),
            "time": chrono::Utc::now().to_rfc3339(),
        });
        if let Err(e) = crate::engine::alert::run(command, self.ctx.manifest.dir(), &doc).await {
            tracing::warn!("{e}");
        }
    }
}
