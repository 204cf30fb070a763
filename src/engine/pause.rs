//! `pause` and `resume`: take projectors out of play and back. The pause is
//! a ledger state, so it survives restarts, deploys and every runner: play
//! leaves a paused projector alone, boot leaves it paused, status shows it.

use anyhow::Result;

use crate::db::Session;
use crate::engine::Context;
use crate::error::Failure;
use crate::ledger::{LockKey, State};

/// What pause or resume did to one projector.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Paused {
    pub name: String,
    /// Its state before.
    pub from: State,
    /// Its state now.
    pub to: State,
}

/// Pauses (`pause`) or resumes each projector; a projector's batch in flight
/// finishes first.
pub async fn set(
    ctx: &Context,
    names: &[String],
    pause: bool,
    lock_timeout: Option<std::time::Duration>,
) -> Result<Vec<Paused>> {
    if names.is_empty() {
        return Err(Failure::Usage(format!(
            "name the projectors to {}, e.g. `projectionist {} band`",
            if pause { "pause" } else { "resume" },
            if pause { "pause" } else { "resume" }
        ))
        .into());
    }
    let mut client = ctx
        .connect(if pause { "pause" } else { "resume" }, Session::Holder)
        .await?;
    ctx.ledger.ensure_exists(&client).await?;
    let mut done = Vec::new();
    for name in names {
        // Waits for a play batch or a boot of the projector to finish.
        ctx.locks
            .lock(
                &ctx.database,
                &client,
                LockKey::Projector(name),
                lock_timeout,
            )
            .await?;
        let tx = client.transaction().await?;
        let result = if pause {
            ctx.ledger.pause(&tx, name).await.map(|from| Paused {
                name: name.clone(),
                from,
                to: State::Paused,
            })
        } else {
            ctx.ledger.unpause(&tx, name).await.map(|to| Paused {
                name: name.clone(),
                from: State::Paused,
                to,
            })
        };
        match result {
            Ok(p) => {
                tx.commit().await?;
                ctx.locks.unlock(&client, LockKey::Projector(name)).await?;
                done.push(p);
            }
            Err(e) => {
                drop(tx);
                ctx.locks
                    .unlock(&client, LockKey::Projector(name))
                    .await
                    .ok();
                return Err(e);
            }
        }
    }
    Ok(done)
}
