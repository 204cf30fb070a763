//! `reset`: rebuild projectors from scratch.
//!
//! By default an SQL projector is rebuilt beside its live tables and swapped
//! in (see [`crate::engine::rebuild`]): readers keep the old read model until
//! the new one is complete. In place (`--in-place`, `--no-replay`,
//! `rebuild = "in_place"`, command projectors): holding the projector's lock
//! so a runner cannot interleave, its owned tables are emptied (or its `reset`
//! SQL runs) and its position put back to the start (the head for
//! `from_now`), state `booting`, in one transaction; then it replays as boot
//! does. Several projectors are reset independently: one failing leaves the
//! others done.

use anyhow::Result;

use crate::db::Session;
use crate::engine::Context;
use crate::engine::boot::{self, BootOptions, BootReport};
use crate::error::Failure;
use crate::ledger::{LockKey, Run};
use crate::report::progress::Progress;
use crate::store::StoreShape;

#[derive(Clone, Debug)]
pub struct ResetOptions {
    pub allow_side_effects: bool,
    /// Leave the replay to the next boot (in place).
    pub no_replay: bool,
    /// Empty the tables and replay where they are, even for a projector that
    /// rebuilds beside its live tables.
    pub in_place: bool,
    pub boot: BootOptions,
}

/// What happened to one projector.
#[derive(Debug, serde::Serialize)]
pub struct ResetOutcome {
    pub name: String,
    /// The replay, unless `--no-replay`.
    pub replay: Option<BootReport>,
}

/// Checks names and side effects before anything is written.
pub fn check(ctx: &Context, names: &[String], allow_side_effects: bool) -> Result<()> {
    if names.is_empty() {
        return Err(Failure::Usage(
            "name the projectors to reset, e.g. `projectionist reset band`".into(),
        )
        .into());
    }
    for name in names {
        let p = ctx.projector(name)?;
        if p.side_effects && !allow_side_effects {
            return Err(Failure::Usage(format!(
                "projector `{name}` has side effects: a reset replays them (every email sent again)\n  \
                 if that is what you want, pass --allow-side-effects"
            ))
            .into());
        }
    }
    Ok(())
}

/// Resets each projector, then replays it unless told not to.
pub async fn reset(
    ctx: &Context,
    names: &[String],
    opts: &ResetOptions,
    progress: &Progress,
) -> Result<Vec<ResetOutcome>> {
    check(ctx, names, opts.allow_side_effects)?;
    let mut control = ctx.connect("reset", Session::Reader).await?;
    ctx.ledger.ensure_exists(&control).await?;
    let shape = crate::engine::validate::validate(&ctx.manifest, &mut control).await?;
    let mut outcomes = Vec::new();
    for name in names {
        let p = ctx.projector(name)?;
        // Beside a live version that keeps serving; a projector that has none
        // (never booted, retired) starts over in place.
        let serving = ctx
            .ledger
            .row(&control, name)
            .await?
            .is_some_and(|r| r.state != crate::ledger::State::Retired);
        let beside =
            serving && !opts.in_place && !opts.no_replay && crate::engine::rebuild::beside(p);
        if !beside {
            reset_one(ctx, &shape, name, opts).await?;
        }
        let replay = if opts.no_replay {
            None
        } else {
            let b = BootOptions {
                names: vec![name.clone()],
                run: Run::Reset,
                rebuild: if beside {
                    vec![name.clone()]
                } else {
                    Vec::new()
                },
                in_place: !beside,
                allow_side_effects: opts.allow_side_effects,
                ..opts.boot.clone()
            };
            Some(boot::boot(ctx, b, progress).await?)
        };
        outcomes.push(ResetOutcome {
            name: name.clone(),
            replay,
        });
    }
    Ok(outcomes)
}

async fn reset_one(
    ctx: &Context,
    shape: &StoreShape,
    name: &str,
    opts: &ResetOptions,
) -> Result<()> {
    let p = ctx.projector(name)?;
    let mut client = ctx.connect("reset", Session::Holder).await?;
    let key = LockKey::Projector(name);
    ctx.locks
        .lock(&ctx.database, &client, key, opts.boot.lock_timeout)
        .await?;
    let start =
        crate::engine::start::rebuild_in_place(ctx, shape, &mut client, p, opts.boot.writer_wait)
            .await?;
    ctx.locks.unlock(&client, key).await.ok();
    tracing::info!("reset projector `{name}`: tables emptied, position {start}, state booting");
    Ok(())
}
