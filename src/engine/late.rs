//! Late events: events that appear inside a hole in the positions that a
//! projector had already passed (an explicit position inserted below the
//! head, or an id a session reserved from a sequence cache before the hole
//! was seen). They were never applied, so they are never silently lost:
//! status lists them and exits 1, verify reports them, play counts them in
//! its metrics, and the alert command runs once for each. A reset applies
//! them. With `[store] transaction` they cannot happen.

use anyhow::Result;
use tokio_postgres::GenericClient;

use crate::engine::Context;
use crate::ledger::{LateEvent, Run};
use crate::store::StoreShape;

/// The late events of the projectors `names` (empty: all), keeping only the
/// event types each projector handles.
pub async fn find(
    ctx: &Context,
    shape: &StoreShape,
    client: &impl GenericClient,
    names: &[String],
) -> Result<Vec<LateEvent>> {
    let late = ctx.ledger.late_events(client, shape, names).await?;
    Ok(late
        .into_iter()
        .filter(|l| {
            let types = ctx
                .manifest
                .projector(&l.projector)
                .and_then(|p| p.event_types());
            match (types, &l.event_type) {
                (None, _) => true,
                (Some(types), Some(t)) => types.contains(t),
                (Some(_), None) => false,
            }
        })
        .collect())
}

/// Finds late events, remembers them, and logs and alerts those not seen
/// before (once each).
pub async fn report(
    ctx: &Context,
    shape: &StoreShape,
    client: &impl GenericClient,
    run: Run,
    names: &[String],
) -> Result<Vec<LateEvent>> {
    let late = find(ctx, shape, client, names).await?;
    let new = ctx.ledger.note_late_events(client, &late).await?;
    if !new.is_empty() {
        tracing::error!(
            "{} late event(s) appeared inside holes their projectors had already passed and were not applied ({}): \
             reset those projectors to apply them; a [store] transaction column prevents this",
            new.len(),
            describe(&new)
        );
        let doc = crate::engine::alert::late_events(ctx, run, &new);
        if let Err(e) = crate::engine::alert::send(ctx, &doc).await {
            tracing::warn!("{e}");
        }
    }
    Ok(late)
}

/// `band #17 BandCreated, band #40 …` (the first few).
pub fn describe(late: &[LateEvent]) -> String {
    let mut parts: Vec<String> = late
        .iter()
        .take(5)
        .map(|l| {
            format!(
                "{} #{} {}",
                l.projector,
                l.position,
                l.event_type.as_deref().unwrap_or("?")
            )
        })
        .collect();
    if late.len() > 5 {
        parts.push(format!("… {} more", late.len() - 5));
    }
    parts.join(", ")
}
